//! The built-in data world: coloured shapes on a black background, captioned
//! in GenEval's phrasing.
//!
//! Every sample derives its own RNG from (seed, index), so the world is
//! unlimited and any index is reachable in O(1). Captions are true of their
//! picture: objects never overlap, counts and colours are exact, and position
//! scenes satisfy GenEval's relative-position rule with a margin.

use super::{DataError, Dataset, Sample};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Background colour (RGB, 0..=255).
pub const BACKGROUND: [u8; 3] = [0, 0, 0];

/// Object shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An isosceles triangle, apex up, filling its box.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The caption word for several.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }

    /// Whether the point (dx, dy) from the centre lies inside the shape of half-size `r`
    /// (y points down).
    pub fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex at (0, -r), base from (-r, r) to (r, r).
            Shape::Triangle => dy >= -r && dy <= r && dx.abs() <= (dy + r) * 0.5,
        }
    }
}

/// Object colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// White.
    White,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::White,
    ];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::White => "white",
        }
    }

    /// RGB, 0..=255; far apart from each other and from the background so
    /// colour segmentation can tell them apart.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [230, 30, 30],
            Colour::Green => [30, 200, 40],
            Colour::Blue => [40, 80, 240],
            Colour::Yellow => [240, 220, 30],
            Colour::Purple => [160, 40, 200],
            Colour::White => [240, 240, 240],
        }
    }
}

/// Where object A is relative to object B ("a circle left of a square").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    /// A's centre is left of B's.
    LeftOf,
    /// A's centre is right of B's.
    RightOf,
    /// A's centre is above B's (smaller y).
    Above,
    /// A's centre is below B's.
    Below,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 4] = [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    /// The caption phrase, as GenEval writes it.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
}

/// GenEval's six task tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tag {
    /// One object: "a photo of a circle".
    SingleObject,
    /// Two different shapes: "a photo of a circle and a square".
    TwoObject,
    /// One to four of a shape: "a photo of three triangles".
    Counting,
    /// One object of a named colour: "a photo of a red circle".
    Colors,
    /// Two shapes in a relation: "a photo of a circle left of a square".
    Position,
    /// Two shapes with named colours: "a photo of a red circle and a blue square".
    ColorAttr,
}

impl Tag {
    /// Every tag.
    pub const ALL: [Tag; 6] = [
        Tag::SingleObject,
        Tag::TwoObject,
        Tag::Counting,
        Tag::Colors,
        Tag::Position,
        Tag::ColorAttr,
    ];

    /// The tag as GenEval writes it.
    pub fn name(self) -> &'static str {
        match self {
            Tag::SingleObject => "single_object",
            Tag::TwoObject => "two_object",
            Tag::Counting => "counting",
            Tag::Colors => "colors",
            Tag::Position => "position",
            Tag::ColorAttr => "color_attr",
        }
    }
}

/// One object of a scene; coordinates are pixels of the image the scene was
/// drawn for (x right, y down).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// What it is.
    pub shape: Shape,
    /// Its fill.
    pub colour: Colour,
    /// Centre x.
    pub cx: f32,
    /// Centre y.
    pub cy: f32,
    /// Half the side of its bounding box.
    pub radius: f32,
}

impl Object {
    /// Bounding box `[x0, y0, x1, y1]` (every shape fills its box edge to edge).
    pub fn bbox(&self) -> [f32; 4] {
        let r = self.radius;
        [self.cx - r, self.cy - r, self.cx + r, self.cy + r]
    }
}

/// A drawn scene: its objects in caption order (for position scenes, object 0
/// is A and object 1 is B of "A left of B"), its tag and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// The objects.
    pub objects: Vec<Object>,
    /// The GenEval task it exercises.
    pub tag: Tag,
    /// The caption.
    pub caption: String,
}

/// Settings of the shapes world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapesConfig {
    /// Seeds the whole world.
    pub seed: u64,
    /// Image side in pixels (16..=1024).
    pub size: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self { seed: 0, size: 32 }
    }
}

/// The unlimited, reproducible world of captioned shapes.
#[derive(Clone, Debug)]
pub struct ShapesWorld {
    config: ShapesConfig,
    /// Smallest and largest half-size of an object.
    r_min: f32,
    r_max: f32,
    /// Least gap between two objects' boxes, and between a box and the image edge.
    margin: f32,
}

/// Smallest image side: below it four objects no longer fit legibly.
const MIN_SIZE: usize = 16;
/// Largest image side, against accidental huge allocations.
const MAX_SIZE: usize = 1024;
/// Random placements tried per round before objects are made smaller.
const TRIES: usize = 100;
/// Rounds of shrinking before the deterministic grid placement.
const ROUNDS: usize = 4;
/// Position scenes: the named axis of GenEval's normalised offset must pass
/// this (GenEval needs 0.5) and the other axis stay within `POSITION_CROSS`, so
/// exactly one relation holds, clearly.
const POSITION_CLEAR: f32 = 0.6;
const POSITION_CROSS: f32 = 0.3;
/// GenEval's box-size allowance in its relative-position rule.
const GENEVAL_THRESHOLD: f32 = 0.1;
/// Anti-aliasing: sub-samples per pixel side.
const SUPERSAMPLE: usize = 4;

const NUMBER_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

impl ShapesWorld {
    /// A world of `size` x `size` images; sizes and margins scale with `size / 32`.
    pub fn new(config: ShapesConfig) -> Result<Self, DataError> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&config.size) {
            return Err(DataError::Config {
                field: "size".into(),
                value: config.size.to_string(),
                reason: format!("the shapes world draws images of {MIN_SIZE} to {MAX_SIZE} pixels a side"),
            });
        }
        let scale = config.size as f32 / 32.0;
        let r_min = (3.0 * scale).max(2.5);
        Ok(Self {
            config,
            r_min,
            r_max: (8.0 * scale).max(r_min),
            margin: scale.max(1.0),
        })
    }

    /// The settings.
    pub fn config(&self) -> ShapesConfig {
        self.config
    }

    /// The scene of sample `index` (what `sample` renders).
    pub fn draw_scene(&self, index: u64) -> Scene {
        let mut rng = StdRng::seed_from_u64(splitmix64(splitmix64(self.config.seed) ^ index));
        let tag = Tag::ALL[rng.gen_range(0..Tag::ALL.len())];
        let photo = rng.gen_bool(0.5);
        let mut kinds: Vec<(Shape, Colour)> = Vec::new();
        let mut relation = None;
        let body = match tag {
            Tag::SingleObject => {
                let s = pick(&mut rng, &Shape::ALL);
                kinds.push((s, pick(&mut rng, &Colour::ALL)));
                format!("a {}", s.name())
            }
            Tag::TwoObject => {
                let (a, b) = two_distinct(&mut rng, &Shape::ALL);
                kinds.push((a, pick(&mut rng, &Colour::ALL)));
                kinds.push((b, pick(&mut rng, &Colour::ALL)));
                format!("a {} and a {}", a.name(), b.name())
            }
            Tag::Counting => {
                let n = rng.gen_range(1..=4usize);
                let s = pick(&mut rng, &Shape::ALL);
                for _ in 0..n {
                    kinds.push((s, pick(&mut rng, &Colour::ALL)));
                }
                let noun = if n == 1 { s.name() } else { s.plural() };
                format!("{} {noun}", NUMBER_WORDS[n])
            }
            Tag::Colors => {
                let (s, c) = (pick(&mut rng, &Shape::ALL), pick(&mut rng, &Colour::ALL));
                kinds.push((s, c));
                format!("a {} {}", c.name(), s.name())
            }
            Tag::Position => {
                let (a, b) = two_distinct(&mut rng, &Shape::ALL);
                let rel = pick(&mut rng, &Relation::ALL);
                relation = Some(rel);
                kinds.push((a, pick(&mut rng, &Colour::ALL)));
                kinds.push((b, pick(&mut rng, &Colour::ALL)));
                format!("a {} {} a {}", a.name(), rel.phrase(), b.name())
            }
            Tag::ColorAttr => {
                let (a, b) = two_distinct(&mut rng, &Shape::ALL);
                let (ca, cb) = two_distinct(&mut rng, &Colour::ALL);
                kinds.push((a, ca));
                kinds.push((b, cb));
                format!("a {} {} and a {} {}", ca.name(), a.name(), cb.name(), b.name())
            }
        };
        let caption = if photo { format!("a photo of {body}") } else { body };
        let boxes = self.place(&mut rng, kinds.len(), relation);
        let objects = kinds
            .iter()
            .zip(boxes)
            .map(|(&(shape, colour), (cx, cy, radius))| Object {
                shape,
                colour,
                cx,
                cy,
                radius,
            })
            .collect();
        Scene { objects, tag, caption }
    }

    /// Centres and half-sizes of `n` objects that satisfy `fits`: random
    /// placements first, objects made smaller each round, then a grid.
    fn place(&self, rng: &mut StdRng, n: usize, relation: Option<Relation>) -> Vec<(f32, f32, f32)> {
        let mut r_max = self.r_max;
        for _ in 0..ROUNDS {
            for _ in 0..TRIES {
                let boxes: Vec<_> = (0..n)
                    .map(|_| {
                        let r = rng.gen_range(self.r_min..=r_max);
                        (self.coordinate(rng, r), self.coordinate(rng, r), r)
                    })
                    .collect();
                if self.fits(&boxes, relation) {
                    return boxes;
                }
            }
            r_max = self.r_min + 0.5 * (r_max - self.r_min);
        }
        self.grid(n, relation)
    }

    /// A random centre coordinate for half-size `r`, on a pixel centre so the
    /// centre pixel is fully covered, with the box inside the image margin.
    fn coordinate(&self, rng: &mut StdRng, r: f32) -> f32 {
        let lo = (r + self.margin - 0.5).ceil();
        let hi = (self.config.size as f32 - self.margin - r - 0.5).floor().max(lo);
        rng.gen_range(lo as i64..=hi as i64) as f32 + 0.5
    }

    /// The fallback placement: smallest objects on a grid (or side by side, in
    /// the order a relation asks for).
    fn grid(&self, n: usize, relation: Option<Relation>) -> Vec<(f32, f32, f32)> {
        let (cols, rows) = match relation {
            Some(Relation::LeftOf | Relation::RightOf) => (2, 1),
            Some(Relation::Above | Relation::Below) => (1, 2),
            None => {
                let cols = (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1);
                (cols, n.div_ceil(cols))
            }
        };
        let cell_w = self.config.size as f32 / cols as f32;
        let cell_h = self.config.size as f32 / rows as f32;
        let centre = |i: usize, cell: f32| ((i as f32 + 0.5) * cell).floor() + 0.5;
        let mut boxes: Vec<_> = (0..n)
            .map(|i| (centre(i % cols, cell_w), centre(i / cols, cell_h), self.r_min))
            .collect();
        // A is object 0: right of, or below, B means swapping the two cells.
        if matches!(relation, Some(Relation::RightOf | Relation::Below)) && boxes.len() == 2 {
            boxes.swap(0, 1);
        }
        boxes
    }

    /// Whether the boxes lie inside the image, keep `margin` apart, and (for a
    /// relation) place object 0 clearly in that relation to object 1.
    fn fits(&self, boxes: &[(f32, f32, f32)], relation: Option<Relation>) -> bool {
        let (m, size) = (self.margin, self.config.size as f32);
        let inside = boxes
            .iter()
            .all(|&(x, y, r)| x - r >= m && y - r >= m && x + r <= size - m && y + r <= size - m);
        let apart = boxes.iter().enumerate().all(|(i, a)| {
            boxes[i + 1..].iter().all(|b| {
                let gap_x = (a.0 - b.0).abs() - a.2 - b.2;
                let gap_y = (a.1 - b.1).abs() - a.2 - b.2;
                gap_x >= m || gap_y >= m
            })
        });
        let related = match (relation, boxes) {
            (None, _) => true,
            (Some(rel), [a, b]) => {
                let Some((dx, dy)) = geneval_offset(*a, *b) else {
                    return false;
                };
                let (along, across) = match rel {
                    Relation::LeftOf => (-dx, dy),
                    Relation::RightOf => (dx, dy),
                    Relation::Above => (-dy, dx),
                    Relation::Below => (dy, dx),
                };
                along > POSITION_CLEAR && across.abs() < POSITION_CROSS
            }
            (Some(_), _) => false,
        };
        inside && apart && related
    }
}

/// GenEval's normalised offset of box A from box B: per axis the centre offset
/// shrinks toward zero by 0.1 x (sum of the two sides), then is divided by the
/// length of the original offset. `None` when the boxes are concentric.
fn geneval_offset(a: (f32, f32, f32), b: (f32, f32, f32)) -> Option<(f32, f32)> {
    let (ox, oy) = (a.0 - b.0, a.1 - b.1);
    let len = (ox * ox + oy * oy).sqrt();
    if len == 0.0 {
        return None;
    }
    let side = 2.0 * (a.2 + b.2);
    let shrink = |o: f32| (o.abs() - GENEVAL_THRESHOLD * side).max(0.0) * o.signum();
    Some((shrink(ox) / len, shrink(oy) / len))
}

/// Renders a scene to [3, size, size] in [-1, 1]: shapes filled and
/// anti-aliased (4x4 sub-samples a pixel) on the background colour.
pub fn render(scene: &Scene, size: usize) -> Vec<f32> {
    let plane = size * size;
    let mut rgb = vec![0f32; 3 * plane];
    for c in 0..3 {
        rgb[c * plane..(c + 1) * plane].fill(f32::from(BACKGROUND[c]));
    }
    let step = 1.0 / SUPERSAMPLE as f32;
    for o in &scene.objects {
        let colour = o.colour.rgb().map(f32::from);
        let [x0, y0, x1, y1] = o.bbox();
        // Only pixels touching the box can be covered.
        let span = |lo: f32, hi: f32| {
            let first = lo.floor().max(0.0) as usize;
            let last = (hi.ceil().max(0.0) as usize).min(size);
            first..last
        };
        for y in span(y0, y1) {
            for x in span(x0, x1) {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let px = x as f32 + (sx as f32 + 0.5) * step;
                        let py = y as f32 + (sy as f32 + 0.5) * step;
                        hits += usize::from(o.shape.contains(px - o.cx, py - o.cy, o.radius));
                    }
                }
                if hits > 0 {
                    let cover = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
                    for c in 0..3 {
                        let v = &mut rgb[c * plane + y * size + x];
                        *v += cover * (colour[c] - *v);
                    }
                }
            }
        }
    }
    rgb.iter().map(|&v| v / 127.5 - 1.0).collect()
}

impl Dataset for ShapesWorld {
    fn describe(&self) -> String {
        let ShapesConfig { seed, size } = self.config;
        format!("shapes (seed {seed}, {size}x{size})")
    }

    fn channels(&self) -> usize {
        3
    }

    fn size(&self) -> usize {
        self.config.size
    }

    fn len(&self) -> Option<usize> {
        None
    }

    fn sample(&self, index: u64) -> Result<Sample, DataError> {
        let scene = self.draw_scene(index);
        Ok(Sample {
            image: render(&scene, self.config.size),
            caption: scene.caption,
        })
    }
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

/// Two different items, uniformly among ordered pairs.
fn two_distinct<T: Copy>(rng: &mut StdRng, items: &[T]) -> (T, T) {
    let i = rng.gen_range(0..items.len());
    let j = (i + rng.gen_range(1..items.len())) % items.len();
    (items[i], items[j])
}

/// SplitMix64's finaliser: spreads (seed, index) so neighbouring indices get
/// unrelated RNG streams.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{Tokenizer, Vocab};
    use std::collections::HashMap;

    fn world(seed: u64, size: usize) -> ShapesWorld {
        ShapesWorld::new(ShapesConfig { seed, size }).unwrap()
    }

    #[test]
    fn samples_are_deterministic_in_seed_and_index() {
        let (a, b) = (world(7, 32), world(7, 32));
        for i in [0, 1, 2, 1000, u64::MAX] {
            let (x, y) = (a.sample(i).unwrap(), b.sample(i).unwrap());
            assert_eq!(x.caption, y.caption);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x.image), bits(&y.image), "index {i}");
        }
        let other = world(8, 32);
        for i in 0..20 {
            assert_ne!(a.sample(i).unwrap().image, other.sample(i).unwrap().image, "index {i}");
            // Seeds are not shifted copies of each other.
            assert_ne!(
                a.sample(i + 1).unwrap().image,
                other.sample(i).unwrap().image,
                "index {i}"
            );
        }
        assert_ne!(a.sample(0).unwrap().image, a.sample(1).unwrap().image);
    }

    #[test]
    fn batch_equals_single_samples() {
        let w = world(3, 32);
        let b = w.batch(100, 37).unwrap();
        assert_eq!((b.n, b.channels, b.size), (37, 3, 32));
        for i in 0..37 {
            let s = w.sample(100 + i as u64).unwrap();
            assert_eq!(&b.images[i * 3072..(i + 1) * 3072], &s.image[..], "image {i}");
            assert_eq!(b.captions[i], s.caption);
        }
    }

    #[test]
    fn sizes_out_of_range_are_rejected() {
        for size in [0, 15, 1025] {
            let e = ShapesWorld::new(ShapesConfig { seed: 0, size })
                .unwrap_err()
                .to_string();
            assert!(e.contains("size") && e.contains(&size.to_string()), "{e}");
        }
    }

    #[test]
    fn every_caption_word_is_in_the_builtin_vocabulary() {
        let tok = Tokenizer::new(Vocab::builtin().unwrap(), 64).unwrap();
        let w = world(0, 32);
        for i in 0..2000 {
            let caption = w.draw_scene(i).caption;
            let t = tok.tokenize_quiet(&caption);
            assert!(
                t.unknown.is_empty() && !t.truncated,
                "sample {i}: '{caption}' has {:?}",
                t.unknown
            );
        }
    }

    /// What a caption says, read from its text alone.
    struct Said {
        /// (count, named colour, shape) per noun phrase, in order.
        phrases: Vec<(usize, Option<&'static str>, &'static str)>,
        relation: Option<&'static str>,
    }

    fn parse(caption: &str) -> Said {
        let words: Vec<&str> = caption.split(' ').collect();
        let mut rest = words.strip_prefix(&["a", "photo", "of"][..]).unwrap_or(&words);
        let mut said = Said {
            phrases: Vec::new(),
            relation: None,
        };
        let numbers = [("a", 1usize), ("one", 1), ("two", 2), ("three", 3), ("four", 4)];
        let colours = ["red", "green", "blue", "yellow", "purple", "white"];
        let nouns = [
            ("circle", 1),
            ("square", 1),
            ("triangle", 1),
            ("circles", 2),
            ("squares", 2),
            ("triangles", 2),
        ];
        loop {
            let (&det, tail) = rest
                .split_first()
                .unwrap_or_else(|| panic!("'{caption}': phrase expected"));
            let count = numbers
                .iter()
                .find(|n| n.0 == det)
                .unwrap_or_else(|| panic!("'{caption}': {det}"))
                .1;
            rest = tail;
            let colour = colours.iter().find(|&&c| Some(&c) == rest.first()).copied();
            if colour.is_some() {
                rest = &rest[1..];
            }
            let (noun, number) = nouns
                .iter()
                .find(|n| Some(&n.0) == rest.first())
                .unwrap_or_else(|| panic!("'{caption}': noun expected"));
            assert_eq!(*number == 1, count == 1, "'{caption}': number agreement");
            said.phrases.push((count, colour, noun.trim_end_matches('s')));
            rest = &rest[1..];
            match rest {
                [] => return said,
                ["and", tail @ ..] => rest = tail,
                ["left" | "right", "of", tail @ ..] | ["above" | "below", tail @ ..] => {
                    said.relation = Some(match rest[0] {
                        "left" => "left of",
                        "right" => "right of",
                        "above" => "above",
                        _ => "below",
                    });
                    rest = tail;
                }
                _ => panic!("'{caption}': unexpected {rest:?}"),
            }
        }
    }

    /// GenEval's relations of box A to box B, written from its evaluation script.
    fn geneval_relations(a: [f32; 4], b: [f32; 4]) -> Vec<&'static str> {
        let centre = |q: [f32; 4]| [(q[0] + q[2]) as f64 / 2.0, (q[1] + q[3]) as f64 / 2.0];
        let dims = |q: [f32; 4]| [(q[2] - q[0]) as f64, (q[3] - q[1]) as f64];
        let (ca, cb, da, db) = (centre(a), centre(b), dims(a), dims(b));
        let offset = [ca[0] - cb[0], ca[1] - cb[1]];
        let revised: Vec<f64> = (0..2)
            .map(|k| (offset[k].abs() - 0.1 * (da[k] + db[k])).max(0.0) * offset[k].signum())
            .collect();
        if revised.iter().all(|v| v.abs() < 1e-3) {
            return vec![];
        }
        let norm = offset[0].hypot(offset[1]);
        let (dx, dy) = (revised[0] / norm, revised[1] / norm);
        let mut out = vec![];
        if dx < -0.5 {
            out.push("left of");
        }
        if dx > 0.5 {
            out.push("right of");
        }
        if dy < -0.5 {
            out.push("above");
        }
        if dy > 0.5 {
            out.push("below");
        }
        out
    }

    /// Checks one scene and its rendering against its caption.
    fn check_truth(scene: &Scene, image: &[f32], size: usize) {
        let cap = &scene.caption;
        let said = parse(cap);
        // Counts and colours: each phrase matches exactly its number of objects, and nothing else is drawn.
        let total: usize = said.phrases.iter().map(|p| p.0).sum();
        assert_eq!(scene.objects.len(), total, "'{cap}'");
        for &(count, colour, shape) in &said.phrases {
            let n = scene
                .objects
                .iter()
                .filter(|o| o.shape.name() == shape && colour.is_none_or(|c| o.colour.name() == c))
                .count();
            assert_eq!(n, count, "'{cap}': {count} {colour:?} {shape}");
        }
        // Boxes inside the image and apart.
        let boxes: Vec<[f32; 4]> = scene.objects.iter().map(Object::bbox).collect();
        for (i, a) in boxes.iter().enumerate() {
            assert!(
                a[0] >= 0.0 && a[1] >= 0.0 && a[2] <= size as f32 && a[3] <= size as f32,
                "'{cap}' {a:?}"
            );
            for b in &boxes[i + 1..] {
                let overlap = a[0] < b[2] + 1.0 && b[0] < a[2] + 1.0 && a[1] < b[3] + 1.0 && b[1] < a[3] + 1.0;
                assert!(!overlap, "'{cap}': boxes {a:?} and {b:?} overlap (1 px margin)");
            }
        }
        // Position: GenEval finds the relation, and only it.
        if let Some(rel) = said.relation {
            let find = |p: usize| {
                let shape = said.phrases[p].2;
                scene.objects.iter().position(|o| o.shape.name() == shape).unwrap()
            };
            let (a, b) = (boxes[find(0)], boxes[find(1)]);
            assert_eq!(geneval_relations(a, b), vec![rel], "'{cap}': {a:?} vs {b:?}");
        }
        // Pixels: each centre pixel is its object's colour; the box is filled as its shape fills it.
        let plane = size * size;
        let px = |x: usize, y: usize| [0, 1, 2].map(|c| (image[c * plane + y * size + x] + 1.0) * 127.5);
        for o in &scene.objects {
            let got = px(o.cx as usize, o.cy as usize);
            let want = o.colour.rgb().map(f32::from);
            assert!(
                (0..3).all(|c| (got[c] - want[c]).abs() < 2.0),
                "'{cap}': centre {got:?} not {want:?}"
            );
            // Coverage of each pixel near the box: its colour projected on the
            // line from the background to the object's colour.
            let bg = BACKGROUND.map(f32::from);
            let ink = [0, 1, 2].map(|c| want[c] - bg[c]);
            let ink_len2: f32 = ink.iter().map(|v| v * v).sum();
            let [x0, y0, x1, y1] = o.bbox();
            let mut area = 0.0;
            for y in (y0.floor() as usize)..(y1.ceil() as usize) {
                for x in (x0.floor() as usize)..(x1.ceil() as usize) {
                    let p = px(x, y);
                    area += (0..3).map(|c| (p[c] - bg[c]) * ink[c]).sum::<f32>() / ink_len2;
                }
            }
            let fill = area / (4.0 * o.radius * o.radius);
            let expected = match o.shape.name() {
                "circle" => std::f32::consts::FRAC_PI_4,
                "square" => 1.0,
                _ => 0.5,
            };
            // 4x4 sub-samples quantise each edge by up to 1/8 px: a relative error
            // near 0.25 / r for the square, less for slanted edges.
            let tolerance = 0.02 + 0.3 / o.radius;
            assert!(
                (fill - expected).abs() < tolerance,
                "'{cap}': {:?} fills {fill} of its box",
                o.shape
            );
        }
        // Background: every pixel clear of all boxes is exactly the background colour.
        let background = BACKGROUND.map(|v| f32::from(v) / 127.5 - 1.0);
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f32, y as f32);
                let clear = boxes
                    .iter()
                    .all(|b| fx + 1.0 <= b[0] || fx >= b[2] || fy + 1.0 <= b[1] || fy >= b[3]);
                if clear {
                    let got = [0, 1, 2].map(|c| image[c * plane + y * size + x]);
                    assert_eq!(got, background, "'{cap}': pixel ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn captions_are_true_of_their_pictures() {
        for (size, n) in [(32, 2000), (16, 300), (64, 200)] {
            let w = world(1, size);
            for i in 0..n {
                let scene = w.draw_scene(i);
                check_truth(&scene, &render(&scene, size), size);
            }
        }
    }

    #[test]
    fn the_grid_fallback_is_also_true() {
        for size in [16, 32, 100] {
            let w = world(0, size);
            let cases = [
                (1, None, Tag::Counting),
                (2, None, Tag::Counting),
                (3, None, Tag::Counting),
                (4, None, Tag::Counting),
            ]
            .into_iter()
            .chain(Relation::ALL.map(|r| (2, Some(r), Tag::Position)));
            for (n, rel, tag) in cases {
                let boxes = w.grid(n, rel);
                assert!(w.fits(&boxes, rel), "size {size}, {n} objects, {rel:?}: {boxes:?}");
                let shapes = [Shape::Circle, Shape::Square];
                let objects: Vec<Object> = boxes
                    .iter()
                    .enumerate()
                    .map(|(i, &(cx, cy, radius))| Object {
                        shape: if rel.is_some() { shapes[i] } else { Shape::Triangle },
                        colour: Colour::ALL[i],
                        cx,
                        cy,
                        radius,
                    })
                    .collect();
                let caption = match rel {
                    Some(r) => format!("a circle {} a square", r.phrase()),
                    None if n == 1 => "one triangle".to_string(),
                    None => format!("{} triangles", NUMBER_WORDS[n]),
                };
                let scene = Scene { objects, tag, caption };
                check_truth(&scene, &render(&scene, size), size);
            }
        }
    }

    #[test]
    fn tags_shapes_colours_counts_and_sizes_all_occur() {
        let w = world(0, 32);
        let n = 3000;
        let mut tags: HashMap<Tag, usize> = HashMap::new();
        let mut counts = [0usize; 5];
        let (mut shapes, mut colours, mut relations) = (HashMap::new(), HashMap::new(), HashMap::new());
        let (mut photo, mut r_lo, mut r_hi) = (0, f32::MAX, 0f32);
        let (mut left_half, mut top_half) = (0, 0);
        for i in 0..n {
            let s = w.draw_scene(i);
            *tags.entry(s.tag).or_default() += 1;
            photo += usize::from(s.caption.starts_with("a photo of "));
            let said = parse(&s.caption);
            if s.tag == Tag::Counting {
                counts[said.phrases[0].0] += 1;
            }
            if let Some(r) = said.relation {
                *relations.entry(r).or_insert(0) += 1;
            }
            for o in &s.objects {
                *shapes.entry(o.shape).or_insert(0) += 1;
                *colours.entry(o.colour).or_insert(0) += 1;
                (r_lo, r_hi) = (r_lo.min(o.radius), r_hi.max(o.radius));
                left_half += usize::from(o.cx < 16.0);
                top_half += usize::from(o.cy < 16.0);
            }
        }
        // Uniform tags: 500 expected each, standard deviation about 20.
        for t in Tag::ALL {
            let k = tags.get(&t).copied().unwrap_or(0);
            assert!((400..=600).contains(&k), "{} drawn {k} times of {n}", t.name());
        }
        assert!(
            counts[1..].iter().all(|&k| k > 60),
            "counts 1..4 drawn {:?}",
            &counts[1..]
        );
        assert_eq!(relations.len(), 4, "{relations:?}");
        assert!(
            Shape::ALL.iter().all(|s| shapes.get(s).is_some_and(|&k| k > 500)),
            "{shapes:?}"
        );
        assert!(
            Colour::ALL.iter().all(|c| colours.get(c).is_some_and(|&k| k > 300)),
            "{colours:?}"
        );
        assert!((1300..=1700).contains(&photo), "'a photo of' in {photo} of {n}");
        assert!(r_lo < 3.5 && r_hi > 7.0, "radii span {r_lo}..{r_hi}");
        let objects: usize = shapes.values().sum();
        for half in [left_half, top_half] {
            assert!(
                (objects * 2 / 5..=objects * 3 / 5).contains(&half),
                "{half} of {objects} in one half"
            );
        }
    }
}
