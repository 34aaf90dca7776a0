//! GenEval's prompt metadata: one JSON object a line, e.g.
//!
//! ```json
//! {"tag": "color_attr", "prompt": "a photo of a red circle and a blue square", "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}]}
//! ```
//!
//! Counting prompts add `"exclude": [{"class": "triangle", "count": N+1}]`
//! (exactly N); position prompts put `"position": ["right of", 0]` on the
//! second include: the object of include 1 is right of the object of include
//! 0 ("a photo of a circle right of a square" includes the square first, as
//! GenEval writes it). Classes are the shapes world's shape names, colours its
//! colour names.

use super::EvalError;
use crate::data::{Colour, Relation, Shape, Tag};
use serde_json::Value;
use std::path::Path;

/// One object (or several alike) a prompt asks for, or forbids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// The shape.
    pub class: Shape,
    /// Include: at least this many; exclude: fewer than this many.
    pub count: usize,
    /// The colour they must have, if named.
    pub color: Option<Colour>,
    /// Include only: the relation these objects have to those of an earlier
    /// include (its index).
    pub position: Option<(Relation, usize)>,
}

impl Requirement {
    /// `count` objects of `class`, any colour, anywhere.
    pub fn new(class: Shape, count: usize) -> Self {
        Self {
            class,
            count,
            color: None,
            position: None,
        }
    }

    /// The same, of colour `color`.
    pub fn coloured(self, color: Colour) -> Self {
        Self {
            color: Some(color),
            ..self
        }
    }

    /// The same, in `relation` to the objects of include `target`.
    pub fn placed(self, relation: Relation, target: usize) -> Self {
        Self {
            position: Some((relation, target)),
            ..self
        }
    }

    /// The JSON object, keys in GenEval's order (class, count, color, position).
    fn to_json_text(&self) -> String {
        let mut out = format!("{{\"class\": {}, \"count\": {}", quote(self.class.name()), self.count);
        if let Some(c) = self.color {
            out += &format!(", \"color\": {}", quote(c.name()));
        }
        if let Some((rel, target)) = self.position {
            out += &format!(", \"position\": [{}, {target}]", quote(rel.phrase()));
        }
        out + "}"
    }

    /// "2 red circles", "a square" (for reasons).
    pub fn describe(&self) -> String {
        let colour = self.color.map(|c| format!("{} ", c.name())).unwrap_or_default();
        let noun = if self.count == 1 {
            self.class.name()
        } else {
            self.class.plural()
        };
        format!("{} {colour}{noun}", self.count)
    }
}

/// One evaluation prompt and what an image of it must show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptSpec {
    /// The GenEval task.
    pub tag: Tag,
    /// The text given to the model.
    pub prompt: String,
    /// Objects that must be there (all of them).
    pub include: Vec<Requirement>,
    /// Objects that must not be there (any one fails the image).
    pub exclude: Vec<Requirement>,
}

impl PromptSpec {
    /// The metadata line (no newline), keys in the order tag, prompt, include,
    /// exclude (the last only when there is one); [`parse_prompt`] reads it back.
    pub fn to_json_line(&self) -> String {
        let list = |reqs: &[Requirement]| {
            let items: Vec<String> = reqs.iter().map(Requirement::to_json_text).collect();
            format!("[{}]", items.join(", "))
        };
        let mut out = format!(
            "{{\"tag\": {}, \"prompt\": {}, \"include\": {}",
            quote(self.tag.name()),
            quote(&self.prompt),
            list(&self.include)
        );
        if !self.exclude.is_empty() {
            out += &format!(", \"exclude\": {}", list(&self.exclude));
        }
        out + "}"
    }
}

fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The shape named `name` ("circle").
pub fn shape_from_name(name: &str) -> Option<Shape> {
    Shape::ALL.into_iter().find(|s| s.name() == name)
}

/// The colour named `name` ("red").
pub fn colour_from_name(name: &str) -> Option<Colour> {
    Colour::ALL.into_iter().find(|c| c.name() == name)
}

/// The relation GenEval writes as `phrase` ("left of").
pub fn relation_from_name(phrase: &str) -> Option<Relation> {
    Relation::ALL.into_iter().find(|r| r.phrase() == phrase)
}

/// The tag GenEval writes as `name` ("color_attr").
pub fn tag_from_name(name: &str) -> Option<Tag> {
    Tag::ALL.into_iter().find(|t| t.name() == name)
}

fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> String {
    all.iter()
        .map(|&t| format!("'{}'", name(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses one metadata line. Every field is checked: unknown fields, tags,
/// classes, colours and relations, counts below 1, positions on excludes and
/// positions that point at their own or a later include are errors (a typo
/// such as "colour" must not silently drop a constraint).
pub fn parse_prompt(line: &str) -> Result<PromptSpec, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("expected a JSON object".into());
    };
    for key in map.keys() {
        if !["tag", "prompt", "include", "exclude"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field '{key}' (expected 'tag', 'prompt', 'include', 'exclude')"
            ));
        }
    }
    let string = |key: &str| -> Result<&str, String> {
        match map.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("'{key}' must be a string, not {other}")),
            None => Err(format!("missing field '{key}'")),
        }
    };
    let tag_name = string("tag")?;
    let tag = tag_from_name(tag_name).ok_or_else(|| {
        format!(
            "unknown tag '{tag_name}' (expected one of {})",
            names(&Tag::ALL, Tag::name)
        )
    })?;
    let prompt = string("prompt")?.to_string();
    let include = match map.get("include") {
        Some(v) => requirements(v, "include")?,
        None => return Err("missing field 'include'".into()),
    };
    if include.is_empty() {
        return Err("'include' is empty: a prompt must ask for at least one object".into());
    }
    let exclude = match map.get("exclude") {
        Some(v) => requirements(v, "exclude")?,
        None => Vec::new(),
    };
    Ok(PromptSpec {
        tag,
        prompt,
        include,
        exclude,
    })
}

/// The requirements of an `include` or `exclude` list.
fn requirements(value: &Value, list: &str) -> Result<Vec<Requirement>, String> {
    let Value::Array(items) = value else {
        return Err(format!("'{list}' must be a list, not {value}"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| requirement(item, list == "include", i).map_err(|e| format!("{list}[{i}]: {e}")))
        .collect()
}

fn requirement(value: &Value, include: bool, index: usize) -> Result<Requirement, String> {
    let Value::Object(map) = value else {
        return Err(format!("expected an object, not {value}"));
    };
    for key in map.keys() {
        if !["class", "count", "color", "position"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field '{key}' (expected 'class', 'count', 'color', 'position')"
            ));
        }
    }
    let class = match map.get("class") {
        Some(Value::String(s)) => shape_from_name(s).ok_or_else(|| {
            format!(
                "unknown class '{s}' (expected one of {})",
                names(&Shape::ALL, Shape::name)
            )
        })?,
        Some(other) => return Err(format!("'class' must be a string, not {other}")),
        None => return Err("missing field 'class'".into()),
    };
    let count = match map.get("count") {
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => return Err(format!("'count' must be a whole number of at least 1, not {v}")),
        },
        None => return Err("missing field 'count'".into()),
    };
    let color = match map.get("color") {
        None => None,
        Some(Value::String(s)) => Some(colour_from_name(s).ok_or_else(|| {
            format!(
                "unknown color '{s}' (expected one of {})",
                names(&Colour::ALL, Colour::name)
            )
        })?),
        Some(other) => return Err(format!("'color' must be a string, not {other}")),
    };
    let position = match map.get("position") {
        None => None,
        Some(_) if !include => return Err("'position' is only allowed on include".into()),
        Some(v) => {
            let bad = || format!("'position' must be [relation, index of an earlier include], not {v}");
            let Some([rel, target]) = v.as_array().map(Vec::as_slice) else {
                return Err(bad());
            };
            let (Some(rel), Some(target)) = (rel.as_str(), target.as_u64()) else {
                return Err(bad());
            };
            let relation = relation_from_name(rel).ok_or_else(|| {
                format!(
                    "unknown relation '{rel}' (expected one of {})",
                    names(&Relation::ALL, Relation::phrase)
                )
            })?;
            if target as usize >= index {
                return Err(format!(
                    "position index {target} must name an earlier include (this is include {index})"
                ));
            }
            Some((relation, target as usize))
        }
    };
    Ok(Requirement {
        class,
        count,
        color,
        position,
    })
}

/// Reads a metadata file; blank lines are skipped. Errors name the file and
/// (for a bad line) the line number, counted from 1.
pub fn read_prompts(path: impl AsRef<Path>) -> Result<Vec<PromptSpec>, EvalError> {
    let path = path.as_ref();
    let text = crate::limits::read_text_file(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_prompts(&text, path)
}

/// Parses the text of a metadata file as [`read_prompts`] does; `path` names
/// it in errors.
pub fn parse_prompts(text: &str, path: &Path) -> Result<Vec<PromptSpec>, EvalError> {
    let mut specs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let spec = parse_prompt(line).map_err(|reason| EvalError::Prompt {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        })?;
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(EvalError::Prompt {
            path: path.to_path_buf(),
            line: text.lines().count().max(1),
            reason: "the file holds no prompts".into(),
        });
    }
    Ok(specs)
}

/// Writes `specs` as a metadata file, one line each.
pub fn write_prompts(path: impl AsRef<Path>, specs: &[PromptSpec]) -> Result<(), EvalError> {
    let path = path.as_ref();
    let text: String = specs.iter().map(|s| s.to_json_line() + "\n").collect();
    std::fs::write(path, text).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Prompts of each tag in the shipped suite (equal shares, as the overall
/// score weighs the tags equally).
const PER_TAG: usize = 72;
/// Counting prompts: per shape, each of GenEval's counts 2..=4 this many
/// times, and "one" `COUNT_ONE` times (24 per shape in all).
const COUNT_EACH: usize = 7;
const COUNT_ONE: usize = 3;
const NUMBER_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

/// Ordered pairs of different items.
fn pairs<T: Copy>(items: &[T]) -> Vec<(T, T)> {
    let mut out = Vec::new();
    for (i, &a) in items.iter().enumerate() {
        for (j, &b) in items.iter().enumerate() {
            if i != j {
                out.push((a, b));
            }
        }
    }
    out
}

/// The shipped evaluation suite (`eval/prompts.jsonl`): 72 prompts of each of
/// GenEval's six tags, 432 in all, in GenEval's phrasing ("a photo of ...").
/// Deterministic (no RNG): each tag cycles through its combinations so every
/// shape, colour, count and relation is evenly covered:
/// single object 3 shapes x 24; two objects 6 ordered shape pairs x 12;
/// counting per shape 2, 3, 4 seven times each and one three times; colours
/// 18 shape-colour pairs x 4; position 6 ordered pairs of different shapes x
/// 4 relations x 3; colour attribution 72 of the 180 (shape pair, colour
/// pair) combinations, different shapes and different colours, taken with
/// stride 7. Prompts repeat (GenEval too samples several images a prompt);
/// callers seed each line differently.
pub fn make_prompts() -> Vec<PromptSpec> {
    let mut out = Vec::with_capacity(6 * PER_TAG);
    let spec = |tag, prompt: String, include, exclude| PromptSpec {
        tag,
        prompt,
        include,
        exclude,
    };
    let shape_pairs = pairs(&Shape::ALL);
    let colour_pairs = pairs(&Colour::ALL);
    for k in 0..PER_TAG {
        let s = Shape::ALL[k % 3];
        out.push(spec(
            Tag::SingleObject,
            format!("a photo of a {}", s.name()),
            vec![Requirement::new(s, 1)],
            vec![],
        ));
    }
    for k in 0..PER_TAG {
        let (a, b) = shape_pairs[k % shape_pairs.len()];
        out.push(spec(
            Tag::TwoObject,
            format!("a photo of a {} and a {}", a.name(), b.name()),
            vec![Requirement::new(a, 1), Requirement::new(b, 1)],
            vec![],
        ));
    }
    // Per shape: 2, 3, 4 cycled COUNT_EACH times, then COUNT_ONE ones; shapes interleaved.
    let counts: Vec<usize> = (0..3 * COUNT_EACH)
        .map(|i| 2 + i % 3)
        .chain(std::iter::repeat_n(1, COUNT_ONE))
        .collect();
    for k in 0..PER_TAG {
        let s = Shape::ALL[k % 3];
        let n = counts[k / 3];
        let noun = if n == 1 { s.name() } else { s.plural() };
        out.push(spec(
            Tag::Counting,
            format!("a photo of {} {noun}", NUMBER_WORDS[n]),
            vec![Requirement::new(s, n)],
            vec![Requirement::new(s, n + 1)],
        ));
    }
    for k in 0..PER_TAG {
        let (s, c) = (Shape::ALL[k % 3], Colour::ALL[(k / 3) % 6]);
        out.push(spec(
            Tag::Colors,
            format!("a photo of a {} {}", c.name(), s.name()),
            vec![Requirement::new(s, 1).coloured(c)],
            vec![],
        ));
    }
    for k in 0..PER_TAG {
        // "A rel B": B is include 0, A (placed) include 1.
        let (a, b) = shape_pairs[k % shape_pairs.len()];
        let rel = Relation::ALL[(k / shape_pairs.len()) % 4];
        out.push(spec(
            Tag::Position,
            format!("a photo of a {} {} a {}", a.name(), rel.phrase(), b.name()),
            vec![Requirement::new(b, 1), Requirement::new(a, 1).placed(rel, 0)],
            vec![],
        ));
    }
    let combos = shape_pairs.len() * colour_pairs.len();
    for k in 0..PER_TAG {
        // 7 is coprime to 180: the first 72 multiples are distinct combinations.
        let i = (7 * k) % combos;
        let ((a, b), (ca, cb)) = (
            shape_pairs[i / colour_pairs.len()],
            colour_pairs[i % colour_pairs.len()],
        );
        out.push(spec(
            Tag::ColorAttr,
            format!(
                "a photo of a {} {} and a {} {}",
                ca.name(),
                a.name(),
                cb.name(),
                b.name()
            ),
            vec![Requirement::new(a, 1).coloured(ca), Requirement::new(b, 1).coloured(cb)],
            vec![],
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The shipped file, relative to this crate.
    fn shipped() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../eval/prompts.jsonl")
    }

    #[test]
    fn shipped_prompt_file_parses_and_equals_make_prompts() {
        let path = shipped();
        let read = read_prompts(&path).unwrap_or_else(|e| panic!("{e}"));
        let made = make_prompts();
        assert_eq!(read.len(), made.len());
        for (i, (r, m)) in read.iter().zip(&made).enumerate() {
            assert_eq!(r, m, "line {}", i + 1);
        }
        // Byte for byte too: regenerate with `write_prompts("eval/prompts.jsonl", &make_prompts())`.
        let text = std::fs::read_to_string(&path).unwrap();
        let want: String = made.iter().map(|s| s.to_json_line() + "\n").collect();
        assert!(
            text == want,
            "eval/prompts.jsonl is stale: rewrite it from make_prompts()"
        );
    }

    /// Rewrites the shipped file: `cargo test -p ecdit-model --lib write_shipped_prompt_file -- --ignored`.
    #[test]
    #[ignore]
    fn write_shipped_prompt_file() {
        write_prompts(shipped(), &make_prompts()).unwrap();
    }

    #[test]
    fn make_prompts_covers_every_tag_shape_colour_count_and_relation() {
        let specs = make_prompts();
        assert!(specs.len() >= 300, "{}", specs.len());
        for tag in Tag::ALL {
            let n = specs.iter().filter(|s| s.tag == tag).count();
            assert_eq!(n, PER_TAG, "{}", tag.name());
        }
        let mut shapes = HashSet::new();
        let mut colours = HashSet::new();
        let mut counts = HashSet::new();
        let mut relations = HashSet::new();
        for s in &specs {
            assert!(s.prompt.starts_with("a photo of "), "{}", s.prompt);
            for r in &s.include {
                shapes.insert((s.tag, r.class));
                if let Some(c) = r.color {
                    colours.insert((s.tag, c));
                }
                if let Some((rel, _)) = r.position {
                    relations.insert(rel);
                }
            }
            match s.tag {
                Tag::Counting => {
                    let [inc] = &s.include[..] else { panic!("{}", s.prompt) };
                    assert_eq!(s.exclude, vec![Requirement::new(inc.class, inc.count + 1)]);
                    counts.insert(inc.count);
                }
                Tag::Position => {
                    let [b, a] = &s.include[..] else { panic!("{}", s.prompt) };
                    assert_ne!(a.class, b.class, "{}", s.prompt);
                    assert_eq!(a.position.map(|p| p.1), Some(0));
                    assert!(b.position.is_none() && s.exclude.is_empty());
                }
                Tag::ColorAttr | Tag::TwoObject => {
                    let [a, b] = &s.include[..] else { panic!("{}", s.prompt) };
                    assert_ne!(a.class, b.class, "{}", s.prompt);
                    assert_eq!(s.tag == Tag::ColorAttr, a.color.is_some() && b.color.is_some());
                    if s.tag == Tag::ColorAttr {
                        assert_ne!(a.color, b.color, "{}", s.prompt);
                    }
                }
                Tag::SingleObject | Tag::Colors => {
                    assert_eq!(s.include.len(), 1);
                    assert_eq!(s.tag == Tag::Colors, s.include[0].color.is_some());
                }
            }
        }
        for tag in Tag::ALL {
            for shape in Shape::ALL {
                assert!(
                    shapes.contains(&(tag, shape)),
                    "{} never asks for a {}",
                    tag.name(),
                    shape.name()
                );
            }
        }
        for tag in [Tag::Colors, Tag::ColorAttr] {
            for c in Colour::ALL {
                assert!(
                    colours.contains(&(tag, c)),
                    "{} never asks for {}",
                    tag.name(),
                    c.name()
                );
            }
        }
        assert_eq!(counts, HashSet::from([1, 2, 3, 4]));
        assert_eq!(relations.len(), 4);
        // Colour attribution: distinct combinations.
        let attr: HashSet<&str> = specs
            .iter()
            .filter(|s| s.tag == Tag::ColorAttr)
            .map(|s| s.prompt.as_str())
            .collect();
        assert_eq!(attr.len(), PER_TAG);
    }

    #[test]
    fn lines_round_trip_through_the_parser() {
        for s in make_prompts() {
            assert_eq!(parse_prompt(&s.to_json_line()).unwrap(), s);
        }
        // GenEval's own key order and a position given as a list parse too.
        let line = r#"{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a circle right of a square"}"#;
        let s = parse_prompt(line).unwrap();
        assert_eq!(s.tag, Tag::Position);
        assert_eq!(s.include[1].position, Some((Relation::RightOf, 0)));
        assert_eq!(s.include[0].class, Shape::Square);
    }

    #[test]
    fn reader_errors_name_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = make_prompts()[0].to_json_line();
        let cases: &[(&str, &str)] = &[
            ("{not json", "not valid JSON"),
            ("[1, 2]", "expected a JSON object"),
            (
                r#"{"tag": "colours", "prompt": "x", "include": [{"class": "circle", "count": 1}]}"#,
                "unknown tag 'colours'",
            ),
            (
                r#"{"tag": "colors", "prompt": "x", "include": [{"class": "dog", "count": 1}]}"#,
                "include[0]: unknown class 'dog'",
            ),
            (
                r#"{"tag": "colors", "prompt": "x", "include": [{"class": "circle", "count": 1, "color": "pink"}]}"#,
                "unknown color 'pink'",
            ),
            (
                r#"{"tag": "colors", "prompt": "x", "include": [{"class": "circle", "count": 1, "colour": "red"}]}"#,
                "unknown field 'colour'",
            ),
            (
                r#"{"tag": "position", "prompt": "x", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["beside", 0]}]}"#,
                "include[1]: unknown relation 'beside'",
            ),
            (
                r#"{"tag": "position", "prompt": "x", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["above", 1]}]}"#,
                "position index 1",
            ),
            (
                r#"{"tag": "position", "prompt": "x", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["above", 7]}]}"#,
                "position index 7",
            ),
            (
                r#"{"tag": "position", "prompt": "x", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["above"]}]}"#,
                "'position' must be",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3, "position": ["above", 0]}]}"#,
                "only allowed on include",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": [{"class": "circle", "count": 0}]}"#,
                "'count' must be",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": [{"class": "circle", "count": 2.5}]}"#,
                "'count' must be",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": [{"class": "circle"}]}"#,
                "missing field 'count'",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": []}"#,
                "'include' is empty",
            ),
            (
                r#"{"tag": "counting", "include": [{"class": "circle", "count": 1}]}"#,
                "missing field 'prompt'",
            ),
            (
                r#"{"tag": "counting", "prompt": "x", "include": [{"class": "circle", "count": 1}], "exlude": []}"#,
                "unknown field 'exlude'",
            ),
        ];
        for (k, (bad, why)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("p{k}.jsonl"));
            // Two good lines, a blank one, then the bad one on line 4.
            std::fs::write(&path, format!("{good}\n{good}\n\n{bad}\n{good}\n")).unwrap();
            let e = read_prompts(&path).unwrap_err().to_string();
            let at = format!("{}:4: ", path.display());
            assert!(e.starts_with(&at) && e.contains(why), "{bad}: {e}");
        }
        let missing = dir.path().join("missing.jsonl");
        let e = read_prompts(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "\n\n").unwrap();
        let e = read_prompts(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.jsonl") && e.contains("no prompts"), "{e}");
    }

    #[test]
    fn write_then_read_gives_the_same_specs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let specs = make_prompts();
        write_prompts(&path, &specs).unwrap();
        assert_eq!(read_prompts(&path).unwrap(), specs);
    }
}
