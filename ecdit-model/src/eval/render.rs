//! Ground-truth and deliberately wrong scenes for evaluation prompts: what a
//! perfect model would draw, and what typical mistakes look like. The tests
//! judge both to check the detector and the rules.
//!
//! Scenes follow the shapes world's conventions (`crate::data`): object
//! half-sizes 3 to 8 pixels at 32x32 (scaled with the size), centres on pixel
//! centres, boxes a margin inside the image; here boxes keep two margins
//! apart, and related objects satisfy GenEval's rule with the world's margin
//! (the named axis's normalised offset above 0.6, the other below 0.3 in
//! magnitude). Objects come in include order (a position prompt's reference
//! object first); the scene's caption is the prompt, even for a wrong scene.

use super::prompts::PromptSpec;
use crate::data::{Colour, Object, Relation, Scene, Shape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random placements tried per round before objects are made smaller.
const TRIES: usize = 200;
/// Rounds of shrinking before the grid fallback.
const ROUNDS: usize = 5;
/// Position: the named axis of GenEval's normalised offset passes this (it
/// needs 0.5), the other stays within `POSITION_CROSS`.
const POSITION_CLEAR: f64 = 0.6;
const POSITION_CROSS: f64 = 0.3;

/// A deliberate mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// One object of a named colour is drawn in another colour.
    WrongColour,
    /// A counted shape appears N - 1 or N + 1 times.
    WrongCount,
    /// The relation is flipped (left of <-> right of, above <-> below).
    WrongPosition,
    /// Two named colours trade places ("a blue circle and a red square" for
    /// "a red circle and a blue square").
    SwappedAttributes,
    /// The objects of one include are left out.
    MissingObject,
}

impl Corruption {
    /// Every kind.
    pub const ALL: [Corruption; 5] = [
        Corruption::WrongColour,
        Corruption::WrongCount,
        Corruption::WrongPosition,
        Corruption::SwappedAttributes,
        Corruption::MissingObject,
    ];

    /// A short name ("wrong colour").
    pub fn name(self) -> &'static str {
        match self {
            Corruption::WrongColour => "wrong colour",
            Corruption::WrongCount => "wrong count",
            Corruption::WrongPosition => "wrong position",
            Corruption::SwappedAttributes => "swapped attributes",
            Corruption::MissingObject => "missing object",
        }
    }
}

/// The objects of one include: a shape, one colour per object, and a
/// relation to an earlier group.
#[derive(Clone, Debug)]
struct Group {
    shape: Shape,
    colours: Vec<Colour>,
    position: Option<(Relation, usize)>,
}

/// What a perfect image of `spec` holds: each include's count of its class, in
/// its colour or (unnamed) a random colour that no exclude of the class names.
fn plan(spec: &PromptSpec, rng: &mut StdRng) -> Vec<Group> {
    spec.include
        .iter()
        .map(|req| {
            let allowed: Vec<Colour> = Colour::ALL
                .into_iter()
                .filter(|&c| !spec.exclude.iter().any(|e| e.class == req.class && e.color == Some(c)))
                .collect();
            let allowed = if allowed.is_empty() {
                Colour::ALL.to_vec()
            } else {
                allowed
            };
            let colours = (0..req.count)
                .map(|_| req.color.unwrap_or_else(|| allowed[rng.gen_range(0..allowed.len())]))
                .collect();
            Group {
                shape: req.class,
                colours,
                position: req.position,
            }
        })
        .collect()
}

/// FNV-1a of the prompt, so different prompts with the same seed get different layouts.
fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn rng_for(spec: &PromptSpec, seed: u64, salt: u64) -> StdRng {
    StdRng::seed_from_u64(hash(&spec.prompt) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}

/// A scene that satisfies `spec` (deterministic in `seed`), for rendering
/// with `crate::data::render` at `size`.
pub fn render_prompt(spec: &PromptSpec, size: usize, seed: u64) -> Scene {
    let mut rng = rng_for(spec, seed, 0);
    let groups = plan(spec, &mut rng);
    scene(spec, &groups, size, &mut rng)
}

/// A scene that gets `spec` wrong in the way `kind` says, or `None` when the
/// mistake does not apply: wrong colour needs a named colour, wrong count an
/// exclude on an included shape (counting), wrong position a relation,
/// swapped attributes two named, different colours on different shapes;
/// missing object always applies (with one include, the image is empty).
pub fn corrupt(spec: &PromptSpec, kind: Corruption, size: usize, seed: u64) -> Option<Scene> {
    let mut rng = rng_for(spec, seed, 1 + kind as u64);
    let mut groups = plan(spec, &mut rng);
    let pick = |rng: &mut StdRng, candidates: &[usize]| -> Option<usize> {
        (!candidates.is_empty()).then(|| candidates[rng.gen_range(0..candidates.len())])
    };
    match kind {
        Corruption::WrongColour => {
            let coloured: Vec<usize> = (0..groups.len()).filter(|&i| spec.include[i].color.is_some()).collect();
            let g = pick(&mut rng, &coloured)?;
            let asked = spec.include[g].color?;
            let others: Vec<Colour> = Colour::ALL.into_iter().filter(|&c| c != asked).collect();
            let k = rng.gen_range(0..groups[g].colours.len());
            groups[g].colours[k] = others[rng.gen_range(0..others.len())];
        }
        Corruption::WrongCount => {
            let counted: Vec<usize> = (0..groups.len())
                .filter(|&i| spec.exclude.iter().any(|e| e.class == spec.include[i].class))
                .collect();
            let g = pick(&mut rng, &counted)?;
            if rng.gen_bool(0.5) {
                groups[g].colours.pop();
            } else {
                let c = spec.include[g]
                    .color
                    .unwrap_or_else(|| Colour::ALL[rng.gen_range(0..Colour::ALL.len())]);
                groups[g].colours.push(c);
            }
        }
        Corruption::WrongPosition => {
            let placed: Vec<usize> = (0..groups.len()).filter(|&i| groups[i].position.is_some()).collect();
            let g = pick(&mut rng, &placed)?;
            let (rel, target) = groups[g].position?;
            let flipped = match rel {
                Relation::LeftOf => Relation::RightOf,
                Relation::RightOf => Relation::LeftOf,
                Relation::Above => Relation::Below,
                Relation::Below => Relation::Above,
            };
            groups[g].position = Some((flipped, target));
        }
        Corruption::SwappedAttributes => {
            let inc = &spec.include;
            let mut pairs = Vec::new();
            for i in 0..inc.len() {
                for j in i + 1..inc.len() {
                    if let (Some(a), Some(b)) = (inc[i].color, inc[j].color) {
                        if a != b && inc[i].class != inc[j].class {
                            pairs.push((i, j));
                        }
                    }
                }
            }
            let (i, j) = pairs.get(rng.gen_range(0..pairs.len().max(1))).copied()?;
            let (a, b) = (inc[i].color?, inc[j].color?);
            groups[i].colours.iter_mut().for_each(|c| *c = b);
            groups[j].colours.iter_mut().for_each(|c| *c = a);
        }
        Corruption::MissingObject => {
            let all: Vec<usize> = (0..groups.len()).collect();
            let g = pick(&mut rng, &all)?;
            groups[g].colours.clear();
            for other in &mut groups {
                if other.position.is_some_and(|p| p.1 == g) {
                    other.position = None;
                }
            }
        }
    }
    Some(scene(spec, &groups, size, &mut rng))
}

/// Places the groups' objects and builds the scene.
fn scene(spec: &PromptSpec, groups: &[Group], size: usize, rng: &mut StdRng) -> Scene {
    // (group, shape, colour) per object, in include order.
    let kinds: Vec<(usize, Shape, Colour)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| group.colours.iter().map(move |&c| (g, group.shape, c)))
        .collect();
    let layout = Layout::new(size);
    let boxes = layout.place(rng, &kinds, groups);
    let objects = kinds
        .iter()
        .zip(boxes)
        .map(|(&(_, shape, colour), (cx, cy, radius))| Object {
            shape,
            colour,
            cx,
            cy,
            radius,
        })
        .collect();
    Scene {
        objects,
        tag: spec.tag,
        caption: spec.prompt.clone(),
    }
}

/// Sizes and margins for one image size (the shapes world's).
struct Layout {
    size: f32,
    r_min: f32,
    r_max: f32,
    margin: f32,
}

impl Layout {
    fn new(size: usize) -> Self {
        let scale = size as f32 / 32.0;
        let r_min = (3.0 * scale).max(2.5);
        Self {
            size: size as f32,
            r_min,
            r_max: (8.0 * scale).max(r_min),
            margin: scale.max(1.0),
        }
    }

    /// Centre and half-size per object: random placements, objects made
    /// smaller each round, then a grid.
    fn place(&self, rng: &mut StdRng, kinds: &[(usize, Shape, Colour)], groups: &[Group]) -> Vec<(f32, f32, f32)> {
        let mut r_max = self.r_max;
        for _ in 0..ROUNDS {
            for _ in 0..TRIES {
                let boxes: Vec<_> = kinds
                    .iter()
                    .map(|_| {
                        let r = rng.gen_range(self.r_min..=r_max);
                        (self.coordinate(rng, r), self.coordinate(rng, r), r)
                    })
                    .collect();
                if self.fits(&boxes, kinds, groups) {
                    return boxes;
                }
            }
            r_max = self.r_min + 0.5 * (r_max - self.r_min);
        }
        self.grid(kinds, groups)
    }

    /// A centre coordinate on a pixel centre, the box a margin inside the image.
    fn coordinate(&self, rng: &mut StdRng, r: f32) -> f32 {
        let lo = (r + self.margin - 0.5).ceil();
        let hi = (self.size - self.margin - r - 0.5).floor().max(lo);
        rng.gen_range(lo as i64..=hi as i64) as f32 + 0.5
    }

    /// Inside the image, two margins apart, relations clearly satisfied.
    fn fits(&self, boxes: &[(f32, f32, f32)], kinds: &[(usize, Shape, Colour)], groups: &[Group]) -> bool {
        let (m, size) = (self.margin, self.size);
        let inside = boxes
            .iter()
            .all(|&(x, y, r)| x - r >= m && y - r >= m && x + r <= size - m && y + r <= size - m);
        let apart = boxes.iter().enumerate().all(|(i, a)| {
            boxes[i + 1..].iter().all(|b| {
                let gap_x = (a.0 - b.0).abs() - a.2 - b.2;
                let gap_y = (a.1 - b.1).abs() - a.2 - b.2;
                gap_x >= 2.0 * m || gap_y >= 2.0 * m
            })
        });
        inside && apart && related(boxes, kinds, groups)
    }

    /// The fallback: smallest objects on a grid, in include order (a single
    /// relation between two objects puts them side by side in its order).
    fn grid(&self, kinds: &[(usize, Shape, Colour)], groups: &[Group]) -> Vec<(f32, f32, f32)> {
        let n = kinds.len();
        let relation = match (groups.iter().find_map(|g| g.position), n) {
            (Some((rel, _)), 2) => Some(rel),
            _ => None,
        };
        let (cols, rows) = match relation {
            Some(Relation::LeftOf | Relation::RightOf) => (2, 1),
            Some(Relation::Above | Relation::Below) => (1, 2),
            None => {
                let cols = (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1);
                (cols, n.div_ceil(cols))
            }
        };
        let cell_w = self.size / cols as f32;
        let cell_h = self.size / rows as f32;
        let centre = |i: usize, cell: f32| ((i as f32 + 0.5) * cell).floor() + 0.5;
        let mut boxes: Vec<_> = (0..n)
            .map(|i| (centre(i % cols, cell_w), centre(i / cols, cell_h), self.r_min))
            .collect();
        // Object 1 is placed relative to object 0: left of / above means it takes the first cell.
        if matches!(relation, Some(Relation::LeftOf | Relation::Above)) {
            boxes.swap(0, 1);
        }
        boxes
    }
}

/// Whether every object of a group with a position stands clearly in its
/// relation to every object of the target group.
fn related(boxes: &[(f32, f32, f32)], kinds: &[(usize, Shape, Colour)], groups: &[Group]) -> bool {
    kinds.iter().enumerate().all(|(i, &(g, _, _))| {
        let Some((rel, target)) = groups[g].position else {
            return true;
        };
        kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| k.0 == target)
            .all(|(j, _)| clearly(boxes[i], boxes[j], rel))
    })
}

/// GenEval's normalised offset of box a from box b passes `rel` with margin.
fn clearly(a: (f32, f32, f32), b: (f32, f32, f32), rel: Relation) -> bool {
    let (ox, oy) = (f64::from(a.0 - b.0), f64::from(a.1 - b.1));
    let len = ox.hypot(oy);
    if len == 0.0 {
        return false;
    }
    let side = 2.0 * f64::from(a.2 + b.2);
    let shrink = |o: f64| (o.abs() - 0.1 * side).max(0.0) * o.signum() / len;
    let (dx, dy) = (shrink(ox), shrink(oy));
    let (along, across) = match rel {
        Relation::LeftOf => (-dx, dy),
        Relation::RightOf => (dx, dy),
        Relation::Above => (-dy, dx),
        Relation::Below => (dy, dx),
    };
    along > POSITION_CLEAR && across.abs() < POSITION_CROSS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::render;
    use crate::eval::detector::tests::box_blur;
    use crate::eval::{judge, make_prompts};
    use std::collections::HashMap;

    const SIZE: usize = 32;
    const SEEDS: u64 = 8;

    #[test]
    fn ground_truth_renders_of_every_shipped_prompt_pass() {
        let specs = make_prompts();
        // 32x32 crisp and blurred, every prompt with SEEDS seeds; 64x64 with two.
        for (size, seeds, blur) in [(SIZE, SEEDS, false), (SIZE, SEEDS, true), (64, 2, false)] {
            let (mut passed, mut total) = (0, 0);
            let mut failures = Vec::new();
            for spec in &specs {
                for seed in 0..seeds {
                    let scene = render_prompt(spec, size, seed);
                    // The scene holds what the prompt asks for.
                    let want: usize = spec.include.iter().map(|r| r.count).sum();
                    assert_eq!(scene.objects.len(), want, "{}", spec.prompt);
                    assert_eq!((scene.tag, &scene.caption), (spec.tag, &spec.prompt));
                    let mut image = render(&scene, size);
                    if blur {
                        image = box_blur(&image, size);
                    }
                    let j = judge(&image, size, spec);
                    total += 1;
                    if j.pass {
                        passed += 1;
                    } else {
                        failures.push(format!("'{}' seed {seed}: {}", spec.prompt, j.reason));
                    }
                }
            }
            let rate = passed as f64 / total as f64;
            println!(
                "ground truth {size}x{size}{}: {passed} of {total} judged correct ({:.2}%)",
                if blur { " blurred 3x3" } else { "" },
                100.0 * rate
            );
            for f in failures.iter().take(10) {
                println!("  {f}");
            }
            // Blurred: objects a margin apart still pass nearly always.
            let want = if blur { 0.97 } else { 0.99 };
            assert!(rate >= want, "{passed} of {total}");
        }
    }

    #[test]
    fn render_prompt_is_deterministic_and_varies_with_the_seed() {
        let spec = &make_prompts()[300];
        assert_eq!(render_prompt(spec, SIZE, 4), render_prompt(spec, SIZE, 4));
        assert_ne!(render_prompt(spec, SIZE, 4), render_prompt(spec, SIZE, 5));
        assert_eq!(
            corrupt(spec, Corruption::MissingObject, SIZE, 4),
            corrupt(spec, Corruption::MissingObject, SIZE, 4)
        );
    }

    #[test]
    fn every_kind_of_corruption_is_judged_wrong() {
        let specs = make_prompts();
        let mut stats: HashMap<Corruption, (usize, usize)> = HashMap::new();
        let mut failures: HashMap<Corruption, Vec<String>> = HashMap::new();
        for spec in &specs {
            for kind in Corruption::ALL {
                for seed in 0..SEEDS {
                    let Some(scene) = corrupt(spec, kind, SIZE, seed) else {
                        continue;
                    };
                    let j = judge(&render(&scene, SIZE), SIZE, spec);
                    let entry = stats.entry(kind).or_default();
                    entry.1 += 1;
                    if !j.pass {
                        entry.0 += 1;
                    } else {
                        failures.entry(kind).or_default().push(format!(
                            "'{}' seed {seed}: judged correct; {:?}",
                            spec.prompt, scene.objects
                        ));
                    }
                }
            }
        }
        for kind in Corruption::ALL {
            let (wrong, total) = stats.get(&kind).copied().unwrap_or_default();
            println!(
                "{}: {wrong} of {total} judged wrong ({:.2}%)",
                kind.name(),
                100.0 * wrong as f64 / total.max(1) as f64
            );
            for f in failures.get(&kind).into_iter().flatten().take(5) {
                println!("  {f}");
            }
            assert!(total >= 200, "{}: only {total} cases", kind.name());
            if kind == Corruption::WrongPosition {
                assert!(
                    wrong as f64 >= 0.99 * total as f64,
                    "{}: {wrong} of {total}",
                    kind.name()
                );
            } else {
                assert_eq!(wrong, total, "{}", kind.name());
            }
        }
    }

    #[test]
    fn corruptions_apply_where_they_make_sense() {
        let specs = make_prompts();
        let find = |tag| specs.iter().find(|s| s.tag == tag).unwrap();
        use crate::data::Tag::*;
        let applies = |tag, kind| corrupt(find(tag), kind, SIZE, 0).is_some();
        assert!(!applies(SingleObject, Corruption::WrongColour));
        assert!(applies(Colors, Corruption::WrongColour));
        assert!(applies(Counting, Corruption::WrongCount));
        assert!(!applies(TwoObject, Corruption::WrongCount));
        assert!(applies(Position, Corruption::WrongPosition));
        assert!(!applies(ColorAttr, Corruption::WrongPosition));
        assert!(applies(ColorAttr, Corruption::SwappedAttributes));
        assert!(!applies(Colors, Corruption::SwappedAttributes));
        for tag in crate::data::Tag::ALL {
            assert!(applies(tag, Corruption::MissingObject));
        }
        // The swap keeps shapes and trades the two colours.
        let spec = find(ColorAttr);
        let scene = corrupt(spec, Corruption::SwappedAttributes, SIZE, 0).unwrap();
        let (a, b) = (&spec.include[0], &spec.include[1]);
        assert_eq!(
            (scene.objects[0].shape, scene.objects[0].colour),
            (a.class, b.color.unwrap())
        );
        assert_eq!(
            (scene.objects[1].shape, scene.objects[1].colour),
            (b.class, a.color.unwrap())
        );
        // Wrong count: N - 1 or N + 1 of the counted shape.
        for spec in specs.iter().filter(|s| s.tag == Counting) {
            for seed in 0..4 {
                let n = corrupt(spec, Corruption::WrongCount, SIZE, seed).unwrap().objects.len();
                assert!(
                    n + 1 == spec.include[0].count || n == spec.include[0].count + 1,
                    "{}: {n}",
                    spec.prompt
                );
            }
        }
    }
}
