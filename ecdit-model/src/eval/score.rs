//! GenEval's rules applied to the detector's findings, and the summary report.
//!
//! An image is correct when every include holds and no exclude does:
//! - include `{class, count}`: at least `count` detections of `class`
//!   (single object, two objects: at least one of each);
//! - with `color`: at least `count` of them have that colour (GenEval asks a
//!   CLIP colour classifier about its `count` most confident detections of the
//!   class; here a detection of another colour does not hide one of the right
//!   colour);
//! - with `position: [relation, j]`: each of the include's chosen detections
//!   (the `count` largest that matched its class and colour; size stands in
//!   for GenEval's confidence) stands in `relation` to each detection chosen
//!   for include `j`, by GenEval's rule ([`relative_position`]); an include
//!   that failed leaves no target;
//! - exclude `{class, count}` (with `color`, those of that colour): fewer than
//!   `count` detections. Counting prompts include N and exclude N + 1, so
//!   they need exactly N.

use super::detector::{detect, Detection};
use super::prompts::{PromptSpec, Requirement};
use crate::data::{Relation, Tag};
use serde_json::{json, Map, Value};

/// GenEval's box-size allowance in its position rule (its default
/// `position_threshold`).
const POSITION_THRESHOLD: f64 = 0.1;

/// The relations of box `a` to box `b` (`[x0, y0, x1, y1]`, y down), by
/// GenEval's rule: per axis the offset of the centres shrinks toward zero by
/// 0.1 x (the sum of the two boxes' sides along that axis), is divided by the
/// length of the original offset, and "left of" needs x below -0.5 ("right
/// of" x above 0.5, "above" y below -0.5, "below" y above 0.5). None when the
/// shrunk offset vanishes (overlapping, concentric boxes).
pub fn relative_position(a: [f32; 4], b: [f32; 4]) -> Vec<Relation> {
    let centre = |q: [f32; 4]| {
        [
            (f64::from(q[0]) + f64::from(q[2])) / 2.0,
            (f64::from(q[1]) + f64::from(q[3])) / 2.0,
        ]
    };
    let sides = |q: [f32; 4]| [f64::from(q[2] - q[0]).abs(), f64::from(q[3] - q[1]).abs()];
    let (ca, cb, da, db) = (centre(a), centre(b), sides(a), sides(b));
    let offset = [ca[0] - cb[0], ca[1] - cb[1]];
    let revised: Vec<f64> = (0..2)
        .map(|k| (offset[k].abs() - POSITION_THRESHOLD * (da[k] + db[k])).max(0.0) * offset[k].signum())
        .collect();
    if revised.iter().all(|v| v.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = offset[0].hypot(offset[1]);
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let mut out = Vec::new();
    if dx < -0.5 {
        out.push(Relation::LeftOf);
    }
    if dx > 0.5 {
        out.push(Relation::RightOf);
    }
    if dy < -0.5 {
        out.push(Relation::Above);
    }
    if dy > 0.5 {
        out.push(Relation::Below);
    }
    out
}

/// The verdict on one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    /// Whether the image shows what the prompt asks for.
    pub pass: bool,
    /// Why not, one clause per broken requirement joined by "; " (empty on a pass).
    pub reason: String,
    /// What the detector found, largest first.
    pub detections: Vec<Detection>,
}

/// Judges a [3, size, size] image in [-1, 1] against `spec` by GenEval's rules
/// (an image of another size fails, saying so).
pub fn judge(image: &[f32], size: usize, spec: &PromptSpec) -> Judgement {
    if image.len() != 3 * size * size {
        return Judgement {
            pass: false,
            reason: format!(
                "the image holds {} values; a 3x{size}x{size} image has {}",
                image.len(),
                3 * size * size
            ),
            detections: Vec::new(),
        };
    }
    let detections = detect(image, size);
    let (pass, reason) = judge_detections(&detections, spec);
    Judgement {
        pass,
        reason,
        detections,
    }
}

fn matches(d: &Detection, r: &Requirement) -> bool {
    d.shape == r.class && r.color.is_none_or(|c| d.colour == c)
}

fn list(ds: &[&Detection]) -> String {
    if ds.is_empty() {
        return "none".into();
    }
    ds.iter()
        .map(|d| format!("{} {}", d.colour.name(), d.shape.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// GenEval's rules on given detections (largest, i.e. most confident,
/// first): whether they pass, and why not.
pub(crate) fn judge_detections(detections: &[Detection], spec: &PromptSpec) -> (bool, String) {
    let mut reasons = Vec::new();
    let mut groups: Vec<Option<Vec<&Detection>>> = Vec::new();
    for req in &spec.include {
        let of_class: Vec<&Detection> = detections.iter().filter(|d| d.shape == req.class).collect();
        let found: Vec<&Detection> = of_class
            .iter()
            .copied()
            .filter(|d| matches(d, req))
            .take(req.count)
            .collect();
        let mut matched = found.len() >= req.count;
        if !matched {
            reasons.push(format!(
                "expected at least {}, found {} ({} of its shape: {})",
                req.describe(),
                found.len(),
                of_class.len(),
                list(&of_class)
            ));
        } else if let Some((relation, target)) = req.position {
            match groups.get(target).and_then(Option::as_ref) {
                None => {
                    matched = false;
                    reasons.push(format!(
                        "no target for the {} to be {} (include {target} failed)",
                        req.class.name(),
                        relation.phrase()
                    ));
                }
                Some(targets) => {
                    'check: for obj in &found {
                        for t in targets {
                            let rels = relative_position(obj.bbox, t.bbox);
                            if !rels.contains(&relation) {
                                matched = false;
                                let got: Vec<&str> = rels.iter().map(|r| r.phrase()).collect();
                                reasons.push(format!(
                                    "expected the {} {} the {}, found it {}",
                                    obj.shape.name(),
                                    relation.phrase(),
                                    t.shape.name(),
                                    if got.is_empty() {
                                        "in no relation to it".to_string()
                                    } else {
                                        got.join(" and ")
                                    }
                                ));
                                break 'check;
                            }
                        }
                    }
                }
            }
        }
        groups.push(matched.then_some(found));
    }
    for req in &spec.exclude {
        let n = detections.iter().filter(|d| matches(d, req)).count();
        if n >= req.count {
            let colour = req.color.map(|c| format!("{} ", c.name())).unwrap_or_default();
            reasons.push(format!(
                "expected fewer than {} {colour}{}, found {n}",
                req.count,
                req.class.plural()
            ));
        }
    }
    (reasons.is_empty(), reasons.join("; "))
}

/// GenEval's summary: accuracy per tag and their mean.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// (tag, images passed, images judged), in `Tag::ALL` order, every tag listed.
    pub per_tag: Vec<(Tag, usize, usize)>,
    /// Mean of the tag accuracies (0..=1) over the tags with images, as
    /// GenEval's summary averages the tags present; 0 when nothing was judged.
    pub overall: f64,
}

impl Report {
    /// Tallies (tag, passed) pairs, one per image.
    pub fn from_judgements(results: &[(Tag, bool)]) -> Self {
        let per_tag: Vec<(Tag, usize, usize)> = Tag::ALL
            .iter()
            .map(|&tag| {
                let of_tag = results.iter().filter(|r| r.0 == tag);
                let total = of_tag.clone().count();
                let passed = of_tag.filter(|r| r.1).count();
                (tag, passed, total)
            })
            .collect();
        let accuracies: Vec<f64> = per_tag
            .iter()
            .filter(|t| t.2 > 0)
            .map(|&(_, p, n)| p as f64 / n as f64)
            .collect();
        let overall = if accuracies.is_empty() {
            0.0
        } else {
            accuracies.iter().sum::<f64>() / accuracies.len() as f64
        };
        Self { per_tag, overall }
    }

    /// The accuracy (0..=1) of `tag`; `None` when no image of it was judged.
    pub fn accuracy(&self, tag: Tag) -> Option<f64> {
        self.per_tag
            .iter()
            .find(|t| t.0 == tag)
            .filter(|t| t.2 > 0)
            .map(|&(_, p, n)| p as f64 / n as f64)
    }

    /// Images judged in all.
    pub fn total(&self) -> usize {
        self.per_tag.iter().map(|t| t.2).sum()
    }

    /// A table for people: tag, passed/total, accuracy, and the overall score.
    pub fn table(&self) -> String {
        let mut out = format!("{:<14} {:>12} {:>9}\n", "tag", "passed/total", "accuracy");
        for &(tag, passed, total) in &self.per_tag {
            let acc = self
                .accuracy(tag)
                .map_or_else(|| "-".to_string(), |a| format!("{:.2}%", 100.0 * a));
            out += &format!("{:<14} {:>12} {acc:>9}\n", tag.name(), format!("{passed}/{total}"));
        }
        let tags = self.per_tag.iter().filter(|t| t.2 > 0).count();
        let images = format!("{} images", self.total());
        out += &format!(
            "{:<14} {images:>12} {:>9}  (mean of {tags} tag accuracies)\n",
            "overall",
            format!("{:.2}%", 100.0 * self.overall)
        );
        out
    }

    /// `{"overall": 0.71, "single_object": 0.95, ..., "per_tag": {"single_object":
    /// {"passed": 19, "total": 20, "accuracy": 0.95}, ...}, "images": 120}`;
    /// accuracies are fractions, `null` for a tag with no images.
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert("overall".into(), json!(self.overall));
        let mut detail = Map::new();
        for &(tag, passed, total) in &self.per_tag {
            let acc = self.accuracy(tag);
            top.insert(tag.name().into(), json!(acc));
            detail.insert(
                tag.name().into(),
                json!({"passed": passed, "total": total, "accuracy": acc}),
            );
        }
        top.insert("per_tag".into(), Value::Object(detail));
        top.insert("images".into(), json!(self.total()));
        Value::Object(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Colour, Shape};

    fn det(shape: Shape, colour: Colour, bbox: [f32; 4], pixels: usize) -> Detection {
        Detection {
            shape,
            colour,
            bbox,
            pixels,
        }
    }

    #[test]
    fn relative_position_follows_genevals_rule() {
        let b = [10.0, 10.0, 16.0, 16.0];
        // Far left, level: left of only.
        assert_eq!(relative_position([0.0, 10.0, 6.0, 16.0], b), vec![Relation::LeftOf]);
        assert_eq!(relative_position(b, [0.0, 10.0, 6.0, 16.0]), vec![Relation::RightOf]);
        assert_eq!(relative_position([10.0, 0.0, 16.0, 6.0], b), vec![Relation::Above]);
        assert_eq!(relative_position([10.0, 20.0, 16.0, 26.0], b), vec![Relation::Below]);
        // Same centre: nothing.
        assert!(relative_position(b, b).is_empty());
        // Diagonal at 45 degrees: offset (10, 10), shrink 1.2 each: 8.8 / 14.14 = 0.62 > 0.5, both hold.
        assert_eq!(
            relative_position([20.0, 20.0, 26.0, 26.0], b),
            vec![Relation::RightOf, Relation::Below]
        );
        // Offset (4, 0) with boxes of width 6 and 6: (4 - 1.2) / 4 = 0.7: right of.
        assert_eq!(relative_position([14.0, 10.0, 20.0, 16.0], b), vec![Relation::RightOf]);
        // Big boxes eat small offsets: (2 - 0.1 * 24) < 0 -> 0 on x; nothing.
        assert!(relative_position([2.0, 0.0, 14.0, 12.0], [0.0, 0.0, 12.0, 12.0]).is_empty());
        // Offset (3, 4), length 5: x (3 - 1.2) / 5 = 0.36 (no), y (4 - 1.2) / 5 = 0.56 > 0.5 (below).
        assert_eq!(relative_position([13.0, 14.0, 19.0, 20.0], b), vec![Relation::Below]);
    }

    #[test]
    fn rules_on_handmade_detections() {
        let spec = |line: &str| super::super::parse_prompt(line).unwrap();
        let red_circle = det(Shape::Circle, Colour::Red, [0.0, 10.0, 6.0, 16.0], 28);
        let blue_square = det(Shape::Square, Colour::Blue, [20.0, 10.0, 26.0, 16.0], 36);
        let blue_circle = det(Shape::Circle, Colour::Blue, [10.0, 0.0, 16.0, 6.0], 20);
        // Two objects: one of each, colours irrelevant.
        let two = spec(
            r#"{"tag": "two_object", "prompt": "", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}"#,
        );
        assert!(judge_detections(&[red_circle, blue_square], &two).0);
        let (pass, why) = judge_detections(&[red_circle], &two);
        assert!(!pass && why.contains("1 square, found 0"), "{why}");
        // Colour attribution: any circle of the right colour counts.
        let attr = spec(
            r#"{"tag": "color_attr", "prompt": "", "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]}"#,
        );
        assert!(judge_detections(&[blue_square, blue_circle, red_circle], &attr).0);
        let (pass, why) = judge_detections(&[blue_square, blue_circle], &attr);
        assert!(
            !pass && why.contains("1 red circle, found 0") && why.contains("blue circle"),
            "{why}"
        );
        // Counting: exactly N.
        let count2 = spec(
            r#"{"tag": "counting", "prompt": "", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}"#,
        );
        assert!(!judge_detections(&[red_circle], &count2).0);
        assert!(judge_detections(&[red_circle, blue_circle, blue_square], &count2).0);
        let three = [red_circle, blue_circle, red_circle];
        let (pass, why) = judge_detections(&three, &count2);
        assert!(!pass && why.contains("fewer than 3 circles, found 3"), "{why}");
        // Position: the square (include 1) right of the circle (include 0).
        let pos = spec(
            r#"{"tag": "position", "prompt": "", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["right of", 0]}]}"#,
        );
        assert!(judge_detections(&[blue_square, red_circle], &pos).0);
        let left = spec(
            r#"{"tag": "position", "prompt": "", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]}"#,
        );
        let (pass, why) = judge_detections(&[blue_square, red_circle], &left);
        assert!(!pass && why.contains("found it right of"), "{why}");
        // The largest circle is the target: a bigger one right of the square decides.
        let big_blue = det(Shape::Circle, Colour::Blue, [28.0, 10.0, 34.0, 16.0], 40);
        let (pass, why) = judge_detections(&[blue_square, big_blue, red_circle], &pos);
        assert!(!pass, "{why}");
        // No target: the placed object's relation cannot be checked.
        let (pass, why) = judge_detections(&[blue_square], &pos);
        assert!(!pass && why.contains("no target"), "{why}");
    }

    #[test]
    fn overall_is_the_mean_of_the_six_tag_accuracies() {
        // By hand: single 3/4 = 0.75, two 1/2 = 0.5, counting 0/1 = 0, colors 2/2 = 1,
        // position 1/5 = 0.2, color_attr 2/3 = 0.6667; mean = 3.116667 / 6 = 0.519444.
        let mut results = Vec::new();
        let mut add = |tag, passed: usize, total: usize| {
            results.extend((0..total).map(|i| (tag, i < passed)));
        };
        add(Tag::SingleObject, 3, 4);
        add(Tag::TwoObject, 1, 2);
        add(Tag::Counting, 0, 1);
        add(Tag::Colors, 2, 2);
        add(Tag::Position, 1, 5);
        add(Tag::ColorAttr, 2, 3);
        // Order does not matter.
        results.reverse();
        let r = Report::from_judgements(&results);
        let by_hand = (0.75 + 0.5 + 0.0 + 1.0 + 0.2 + 2.0 / 3.0) / 6.0;
        assert!((r.overall - by_hand).abs() < 1e-12, "{} vs {by_hand}", r.overall);
        assert!((r.overall - 0.519_444_444).abs() < 1e-6);
        // Not the pooled accuracy over images (9 / 17 = 0.529).
        assert!((r.overall - 9.0 / 17.0).abs() > 1e-3);
        assert_eq!(r.per_tag[4], (Tag::Position, 1, 5));
        assert_eq!(r.total(), 17);
        let j = r.to_json();
        assert!((j["overall"].as_f64().unwrap() - by_hand).abs() < 1e-12);
        assert_eq!(j["colors"].as_f64(), Some(1.0));
        assert_eq!(j["position"].as_f64(), Some(0.2));
        assert_eq!(j["per_tag"]["color_attr"]["passed"], 2);
        assert_eq!(j["per_tag"]["color_attr"]["total"], 3);
        for tag in Tag::ALL {
            assert!(j[tag.name()].is_number(), "{}", tag.name());
        }
        let table = r.table();
        println!("{table}{}", j);
        assert!(
            table.contains("position") && table.contains("1/5") && table.contains("20.00%"),
            "{table}"
        );
        assert!(table.contains("51.94%") && table.contains("mean of 6"), "{table}");
        // A tag without images is left out of the mean and shown as '-' / null.
        let partial = Report::from_judgements(&[(Tag::Colors, true), (Tag::Counting, false)]);
        assert_eq!(partial.overall, 0.5);
        assert!(partial.to_json()["position"].is_null());
        assert!(partial.table().contains("0/0"));
        assert_eq!(Report::from_judgements(&[]).overall, 0.0);
    }
}
