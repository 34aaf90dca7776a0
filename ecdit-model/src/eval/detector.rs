//! A deterministic object detector for the shapes world.
//!
//! 1. Pixels: each pixel (RGB in 0..=255 after clamping the image to [-1, 1])
//!    is compared with the six palette colours by direction: an object pixel
//!    of the renderer is `coverage x colour` over the black background, so the
//!    pixel's hue is the palette colour's whatever the coverage. The pixel
//!    takes the palette colour at the smallest angle if that angle is at most
//!    [`MAX_HUE_ANGLE_DEG`] and the coverage (its projection on the colour,
//!    as a fraction of the colour) is above [`MIN_COVERAGE`]; anything else
//!    (background, dim or muddled pixels) is background.
//! 2. Components: 8-connected pixels of one colour; those smaller than
//!    [`min_pixels`] are dropped as specks, and those without a solid core
//!    ([`MIN_CORE`]) as noise.
//! 3. Shapes, from the component's light (each pixel's coverage, plus the
//!    faint light of unlabelled pixels of its hue next to it, so anti-aliased
//!    and blurred edges count): a triangle (apex up) has its light skewed to
//!    the bottom (vertical skewness -0.57; circles and squares 0); a square
//!    fills its box (light / (widest row x tallest column) = 1), a circle
//!    pi/4 of it, a triangle 1/2. Third moments and row/column sums barely
//!    move under a symmetric blur, which is why they were chosen over pixel
//!    counts in the thresholded box (a blurred 6-pixel square loses its
//!    corners and looks like a circle by those). Thresholds:
//!    [`TRIANGLE_SKEW`], [`TRIANGLE_FILL`].
//! 4. Square or circle: a fill above [`SQUARE_FILL`] is a square. Below
//!    it, the component's light (relative to its brightest pixel) is
//!    overlaid with a rectangle and an ellipse of the same centre and spread
//!    (second moments); the rectangle must overlap it better (soft IoU) by
//!    [`SQUARE_IOU_MARGIN`] for a square (blobs at least
//!    [`MIN_TEMPLATE_SIDE`] pixels across).
//!    A first version had only the fill threshold: generated squares with a
//!    ragged edge, a soft side or a one-pixel bump fill 0.85 to 0.93 of their
//!    extreme rows and columns, and were called circles; moments barely move
//!    under such flaws.

use crate::data::{Colour, Shape};

/// Pixels whose coverage of their colour (projection on the palette colour,
/// 1 = the full colour) is at most this are background. 0.5 keeps exactly
/// the pixels an anti-aliased shape covers more than half of, so boxes and
/// fill ratios match the ideal shapes, and two objects the world keeps one
/// pixel apart never touch; blur moves a straight edge's 0.5 level nowhere.
pub const MIN_COVERAGE: f32 = 0.5;

/// The largest angle (degrees) between a pixel's RGB vector and its palette
/// colour's. The closest palette pair (blue and purple, yellow and white) is
/// 30 degrees apart, so up to 15 degrees the nearest colour is unambiguous;
/// 22 degrees also takes saturated primaries a generator may produce instead
/// of the palette's (pure blue is 20.4 degrees from the palette's blue, pure
/// green 14, pure red 10.5) while rejecting mixtures such as cyan (28
/// degrees from blue, 35 from green). Faded colours drift toward white: a
/// half-and-half blend of red and white is read as white.
pub const MAX_HUE_ANGLE_DEG: f32 = 22.0;

/// Smallest component kept at 32x32 (scaled with the image area by
/// [`min_pixels`]). The world's smallest object (half-size 3 at 32x32) is a
/// triangle of 12 or 13 pixels above half coverage, a circle of about 25;
/// specks of up to 5 pixels, which noise and generated images produce, are
/// dropped.
pub const MIN_PIXELS_32: f32 = 6.0;

/// Share of a component's pixels that must be core pixels (all four
/// neighbours in the component); at least [`MIN_CORE_PIXELS`] must be.
/// Shapes are solid: the world's smallest triangles (12 or 13 pixels above
/// half coverage) have 2 core pixels (0.15), larger objects 0.3 to 0.5,
/// blurred too. Clusters of noise pixels are stringy: on uniform and
/// Gaussian RGB noise 4 of 1185 components of at least 6 pixels passed
/// both rules (one detection in 180 images of 16 to 64 pixels a side).
pub const MIN_CORE: f32 = 0.1;
/// See [`MIN_CORE`].
pub const MIN_CORE_PIXELS: usize = 2;

/// The smallest component kept in a `size` x `size` image: [`MIN_PIXELS_32`]
/// scaled with the area, at least 5 pixels (the world's objects keep a
/// half-size of at least 2.5 pixels however small the image).
pub fn min_pixels(size: usize) -> usize {
    let scale = size as f32 / 32.0;
    ((MIN_PIXELS_32 * scale * scale).round() as usize).max(5)
}

/// One detected object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// Its shape.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Bounding box `[x0, y0, x1, y1]` in pixels (x right, y down; x1 and y1
    /// exclusive: a one-pixel object at (3, 4) is `[3, 4, 4, 5]`).
    pub bbox: [f32; 4],
    /// Pixels in the component.
    pub pixels: usize,
}

impl Detection {
    /// Centre of the bounding box.
    pub fn centre(&self) -> (f32, f32) {
        let [x0, y0, x1, y1] = self.bbox;
        ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
    }
}

/// Unit palette directions and squared norms, in `Colour::ALL` order.
fn palette() -> [([f32; 3], f32, f32); 6] {
    Colour::ALL.map(|c| {
        let v = c.rgb().map(f32::from);
        let norm2 = v.iter().map(|x| x * x).sum::<f32>();
        let norm = norm2.sqrt();
        (v.map(|x| x / norm), norm, norm2)
    })
}

/// Per pixel: the palette index of its hue (if within [`MAX_HUE_ANGLE_DEG`]
/// of one) and its coverage of that colour (projection over the colour's
/// length; 1 = the full colour, 0 for black).
#[derive(Clone, Copy, Debug)]
struct Pixel {
    hue: Option<usize>,
    coverage: f32,
}

impl Pixel {
    /// The colour of an object pixel (hue matched, more than half covered).
    fn label(self) -> Option<usize> {
        self.hue.filter(|_| self.coverage > MIN_COVERAGE)
    }
}

fn read_pixels(image: &[f32], size: usize) -> Vec<Pixel> {
    let plane = size * size;
    let pal = palette();
    let min_cos = MAX_HUE_ANGLE_DEG.to_radians().cos();
    (0..plane)
        .map(|p| {
            let px = [0, 1, 2].map(|c| {
                let v = image[c * plane + p];
                // NaN (a diverged generator) reads as black.
                let v = if v.is_nan() { -1.0 } else { v.clamp(-1.0, 1.0) };
                (v + 1.0) * 127.5
            });
            let len = px.iter().map(|x| x * x).sum::<f32>().sqrt();
            let (best, dot) = pal
                .iter()
                .enumerate()
                .map(|(i, (u, _, _))| (i, px[0] * u[0] + px[1] * u[1] + px[2] * u[2]))
                .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
            Pixel {
                hue: (len > 0.0 && dot >= min_cos * len).then_some(best),
                coverage: (dot / pal[best].1).max(0.0),
            }
        })
        .collect()
}

/// Finds the objects of a [3, size, size] image with values in [-1, 1]
/// (values outside are clamped, NaN reads as black), largest first (ties in
/// raster order of their first pixel): the ordering stands in for a learned
/// detector's confidence.
/// An image that does not hold 3 x size x size values has no detections
/// ([`crate::eval::judge`] reports it as such).
pub fn detect(image: &[f32], size: usize) -> Vec<Detection> {
    detect_with_features(image, size).into_iter().map(|(d, _)| d).collect()
}

/// Pixels around a component's box whose faint same-coloured light (partly
/// covered edge pixels, blur) counts toward its shape.
const FRINGE: usize = 1;

/// The one component among the 8 neighbours of pixel `p`, if exactly one.
fn fringe_of(id: &[u32], size: usize, p: usize) -> Option<u32> {
    let (x, y) = ((p % size) as isize, (p / size) as isize);
    let mut found = None;
    for dy in -1..=1 {
        for dx in -1..=1 {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= size as isize || ny >= size as isize {
                continue;
            }
            let q = id[ny as usize * size + nx as usize];
            if q == u32::MAX {
                continue;
            }
            match found {
                None => found = Some(q),
                Some(f) if f != q => return None,
                Some(_) => {}
            }
        }
    }
    found
}

/// [`detect`], with each detection's shape features.
pub(crate) fn detect_with_features(image: &[f32], size: usize) -> Vec<(Detection, Features)> {
    if image.len() != 3 * size * size {
        return Vec::new();
    }
    let pixels = read_pixels(image, size);
    // Connected components (8-neighbours) of equal labels; ids per pixel.
    const NONE: u32 = u32::MAX;
    let mut id = vec![NONE; pixels.len()];
    let mut components: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..pixels.len() {
        let Some(colour) = pixels[start].label() else { continue };
        if id[start] != NONE {
            continue;
        }
        let k = components.len() as u32;
        id[start] = k;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(p) = stack.pop() {
            members.push(p);
            let (x, y) = ((p % size) as isize, (p / size) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= size as isize || ny >= size as isize {
                        continue;
                    }
                    let q = ny as usize * size + nx as usize;
                    if id[q] == NONE && pixels[q].label() == Some(colour) {
                        id[q] = k;
                        stack.push(q);
                    }
                }
            }
        }
        components.push((colour, members));
    }
    let min = min_pixels(size);
    let mut out = Vec::new();
    for (k, (colour, members)) in components.iter().enumerate() {
        let core = members
            .iter()
            .filter(|&&p| {
                let (x, y) = (p % size, p / size);
                x > 0
                    && y > 0
                    && x + 1 < size
                    && y + 1 < size
                    && [p - 1, p + 1, p - size, p + size].iter().all(|&q| id[q] == k as u32)
            })
            .count();
        if members.len() < min || core < MIN_CORE_PIXELS || (core as f32) < MIN_CORE * members.len() as f32 {
            continue;
        }
        let xs = members.iter().map(|&p| p % size);
        let ys = members.iter().map(|&p| p / size);
        let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0) + 1);
        let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0) + 1);
        // The component's light: its own pixels' coverage (up to 1), plus
        // unlabelled pixels of its hue around it (up to MIN_COVERAGE); other
        // components' pixels count nothing.
        let (wx0, wy0) = (x0.saturating_sub(FRINGE), y0.saturating_sub(FRINGE));
        let (wx1, wy1) = ((x1 + FRINGE).min(size), (y1 + FRINGE).min(size));
        let (w, h) = (wx1 - wx0, wy1 - wy0);
        let weights: Vec<f32> = (wy0..wy1)
            .flat_map(|y| (wx0..wx1).map(move |x| y * size + x))
            .map(|p| {
                let px = pixels[p];
                if id[p] == k as u32 {
                    px.coverage.min(1.0)
                } else if id[p] == NONE && px.hue == Some(*colour) && fringe_of(&id, size, p) == Some(k as u32) {
                    px.coverage.min(MIN_COVERAGE)
                } else {
                    0.0
                }
            })
            .collect();
        let f = features(&weights, w, h);
        out.push((
            Detection {
                shape: classify(&f, (x1 - x0).min(y1 - y0)),
                colour: Colour::ALL[*colour],
                bbox: [x0 as f32, y0 as f32, x1 as f32, y1 as f32],
                pixels: members.len(),
            },
            f,
        ));
    }
    // Stable: equal sizes keep raster order.
    out.sort_by_key(|d| std::cmp::Reverse(d.0.pixels));
    out
}

/// What the shape classifier looks at, computed from a component's light
/// (coverage per pixel, see [`detect_with_features`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Features {
    /// Light / (widest row's light x tallest column's light): the widest row
    /// spans a shape's width, the tallest column its height, so this is the
    /// share of the box filled: square 1, circle pi/4, triangle 1/2.
    pub fill: f32,
    /// Skewness of the light's vertical distribution: triangle (apex up)
    /// -0.57, circle and square 0. A symmetric blur leaves the third moment
    /// as it is and only adds variance, so blur weakens it a little.
    pub skew: f32,
    /// Soft IoU of the light with the rectangle of its centre and spread.
    pub square_iou: f32,
    /// Soft IoU of the light with the ellipse of its centre and spread.
    pub circle_iou: f32,
}

/// Features of `weights` ([h, w], row-major).
pub(crate) fn features(weights: &[f32], w: usize, h: usize) -> Features {
    // Relative to the brightest pixel, so a dim shape measures like a full one.
    let peak = weights.iter().copied().fold(0.0, f32::max).max(f32::MIN_POSITIVE);
    let weights: Vec<f32> = weights.iter().map(|v| v / peak).collect();
    let weights = &weights[..];
    let at = |x: usize, y: usize| weights[y * w + x];
    let mass: f32 = weights.iter().sum();
    let widest = (0..h)
        .map(|y| (0..w).map(|x| at(x, y)).sum::<f32>())
        .fold(0.0, f32::max);
    let tallest = (0..w)
        .map(|x| (0..h).map(|y| at(x, y)).sum::<f32>())
        .fold(0.0, f32::max);
    let safe = mass.max(f32::MIN_POSITIVE);
    let rows: Vec<f32> = (0..h).map(|y| (0..w).map(|x| at(x, y)).sum()).collect();
    let my = rows.iter().enumerate().map(|(y, r)| r * (y as f32 + 0.5)).sum::<f32>() / safe;
    let moment = |k: i32| {
        rows.iter()
            .enumerate()
            .map(|(y, r)| r * (y as f32 + 0.5 - my).powi(k))
            .sum::<f32>()
            / safe
    };
    let (m2, m3) = (moment(2), moment(3));
    let (square_iou, circle_iou) = template_ious(weights, w, h);
    Features {
        fill: mass / (widest * tallest).max(f32::MIN_POSITIVE),
        skew: m3 / m2.max(f32::MIN_POSITIVE).powf(1.5),
        square_iou,
        circle_iou,
    }
}

/// Sub-pixel samples per axis when covering pixels with a template.
const TEMPLATE_SAMPLES: usize = 8;

/// Soft IoUs (sum of minima over sum of maxima) of `light` ([h, w], peak 1)
/// with a rectangle and an ellipse of the light's centroid and standard
/// deviations: a uniform rectangle of half-width a has sigma a/sqrt(3), a
/// filled ellipse of semi-axis a has sigma a/2.
fn template_ious(light: &[f32], w: usize, h: usize) -> (f32, f32) {
    let mass: f32 = light.iter().sum();
    let centre = |axis: fn(usize, usize) -> f32| {
        let mean = (0..h * w).map(|p| light[p] * axis(p % w, p / w)).sum::<f32>() / mass;
        let var = (0..h * w)
            .map(|p| light[p] * (axis(p % w, p / w) - mean).powi(2))
            .sum::<f32>()
            / mass;
        (mean, var.sqrt().max(f32::MIN_POSITIVE))
    };
    let (cx, sx) = centre(|x, _| x as f32 + 0.5);
    let (cy, sy) = centre(|_, y| y as f32 + 0.5);
    let in_square = |x: f32, y: f32| (x - cx).abs() <= 3f32.sqrt() * sx && (y - cy).abs() <= 3f32.sqrt() * sy;
    let in_circle = |x: f32, y: f32| ((x - cx) / (2.0 * sx)).powi(2) + ((y - cy) / (2.0 * sy)).powi(2) <= 1.0;
    let iou = |inside: &dyn Fn(f32, f32) -> bool| {
        let (mut both, mut either) = (0.0f32, 0.0f32);
        for (p, &l) in light.iter().enumerate() {
            let (px, py) = ((p % w) as f32, (p / w) as f32);
            let mut hits = 0;
            for i in 0..TEMPLATE_SAMPLES {
                for j in 0..TEMPLATE_SAMPLES {
                    let step = 1.0 / TEMPLATE_SAMPLES as f32;
                    hits += inside(px + (j as f32 + 0.5) * step, py + (i as f32 + 0.5) * step) as usize;
                }
            }
            let t = hits as f32 / (TEMPLATE_SAMPLES * TEMPLATE_SAMPLES) as f32;
            both += l.min(t);
            either += l.max(t);
        }
        both / either.max(f32::MIN_POSITIVE)
    };
    (iou(&in_square), iou(&in_circle))
}

/// Apex-up triangles have skew -0.57 (crisp renders: below -0.49; 3x3 box
/// blur at 32x32: below -0.18); circles and squares about 0 (blurred: above
/// -0.11).
pub const TRIANGLE_SKEW: f32 = -0.15;
/// Below this fill a blob is a triangle whatever its skew (an upside-down
/// or rotated triangle a generator may draw fills half its box; circles fill
/// at least 0.70 even blurred).
pub const TRIANGLE_FILL: f32 = 0.64;
/// Squares fill their box (crisp: above 0.98; blurred at 32x32: 0.97 at the
/// 1st percentile); circles pi/4 (crisp: at most 0.84; blurred at 32x32,
/// where a 3x3 box filter rounds a 6-pixel square's corners: at most 0.90).
/// Above this a blob is a square whatever the template overlap says (blur
/// rounds a small square's corners, which misleads the overlap but not the
/// fill); below it, the better-overlapping template decides.
pub const SQUARE_FILL: f32 = 0.93;

/// How much better the rectangle must overlap than the ellipse for a blob
/// below [`SQUARE_FILL`] to be a square: a 3x3 blur leaves small circles
/// (diameter 6 to 9) with overlaps that swing by a few hundredths with the
/// sub-pixel position, the rectangle's ahead by up to 0.03 in 1 of 48;
/// generated squares with the flaws above lead by 0.03 to 0.10.
pub const SQUARE_IOU_MARGIN: f32 = 0.03;

/// Blobs narrower than this (pixels above half coverage) are told square
/// from circle by the fill alone: at 6 or 7 pixels a 3x3 blur makes a
/// circle's template overlaps those of a square.
pub const MIN_TEMPLATE_SIDE: usize = 8;

/// The shape with the given features, for a blob whose box's shorter side
/// is `side` pixels.
pub(crate) fn classify(f: &Features, side: usize) -> Shape {
    let overlap_says_square = side >= MIN_TEMPLATE_SIDE && f.square_iou > f.circle_iou + SQUARE_IOU_MARGIN;
    if f.skew < TRIANGLE_SKEW || f.fill < TRIANGLE_FILL {
        Shape::Triangle
    } else if f.fill > SQUARE_FILL || overlap_says_square {
        Shape::Square
    } else {
        Shape::Circle
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{render, Object, Scene, ShapesConfig, ShapesWorld};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    /// Blurs a [3, s, s] image with a 3x3 box filter (edges clamped).
    pub(crate) fn box_blur(image: &[f32], size: usize) -> Vec<f32> {
        let plane = size * size;
        let mut out = vec![0.0; image.len()];
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let mut sum = 0.0;
                    for dy in -1isize..=1 {
                        for dx in -1isize..=1 {
                            let xx = (x as isize + dx).clamp(0, size as isize - 1) as usize;
                            let yy = (y as isize + dy).clamp(0, size as isize - 1) as usize;
                            sum += image[c * plane + yy * size + xx];
                        }
                    }
                    out[c * plane + y * size + x] = sum / 9.0;
                }
            }
        }
        out
    }

    /// Whether detection `d` is object `o`: same shape and colour, boxes
    /// overlapping by at least half their union (a blurred triangle's box
    /// shrinks by up to 3 pixels a side at 32x32: its corners fade).
    fn same(d: &Detection, o: &Object) -> bool {
        let (a, b) = (d.bbox, o.bbox());
        let inter = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let area = |q: [f32; 4]| (q[2] - q[0]) * (q[3] - q[1]);
        d.shape == o.shape && d.colour == o.colour && inter >= 0.5 * (area(a) + area(b) - inter)
    }

    /// Over `scenes` world scenes at `size`: (objects found, objects,
    /// detections matching no object), printing the misses.
    fn find_rate(size: usize, scenes: u64, blur: bool) -> (usize, usize, usize) {
        let world = ShapesWorld::new(ShapesConfig { seed: 5, size }).unwrap();
        let (mut found, mut total, mut spurious) = (0, 0, 0);
        let mut shown = 0;
        for i in 0..scenes {
            let scene = world.draw_scene(i);
            let mut image = render(&scene, size);
            if blur {
                image = box_blur(&image, size);
            }
            let dets = detect(&image, size);
            for o in &scene.objects {
                total += 1;
                if dets.iter().any(|d| same(d, o)) {
                    found += 1;
                } else if shown < 5 {
                    shown += 1;
                    println!("  missed in scene {i} ('{}'): {o:?}; found {dets:?}", scene.caption);
                }
            }
            spurious += dets
                .iter()
                .filter(|d| !scene.objects.iter().any(|o| same(d, o)))
                .count();
        }
        let rate = found as f64 / total as f64;
        println!(
            "{size}x{size}{}: found {found} of {total} objects ({:.2}%), {spurious} detections matching no object",
            if blur { " blurred 3x3" } else { "" },
            100.0 * rate
        );
        (found, total, spurious)
    }

    #[test]
    fn finds_every_object_of_random_world_scenes() {
        for (size, scenes) in [(32, 1500), (64, 300), (16, 300)] {
            let (found, total, spurious) = find_rate(size, scenes, false);
            assert!(found as f64 >= 0.98 * total as f64, "{size}: {found} of {total}");
            assert!(spurious as f64 <= 0.02 * total as f64, "{size}: {spurious} spurious");
        }
    }

    #[test]
    fn blurred_renders_still_show_their_objects() {
        // A 3x3 box filter merges same-coloured objects the world keeps only
        // one pixel apart at 32x32, so a few objects are lost there.
        for (size, scenes, want) in [(32, 1500, 0.98), (64, 300, 0.99)] {
            let (found, total, _) = find_rate(size, scenes, true);
            assert!(found as f64 >= want * total as f64, "{size}: {found} of {total}");
        }
    }

    #[test]
    fn crisp_objects_are_measured_exactly() {
        // One object of each shape and colour, alone: one detection whose box
        // is the pixels more than half covered.
        for size in [32, 48] {
            for shape in Shape::ALL {
                for colour in Colour::ALL {
                    // Edges at 10.3 and 20.7 (x), 9.3 and 19.7 (y): pixels 10..=20 and 9..=19
                    // are more than half covered (a triangle's apex row is not).
                    let o = Object {
                        shape,
                        colour,
                        cx: 15.5,
                        cy: 14.5,
                        radius: 5.2,
                    };
                    let scene = Scene {
                        objects: vec![o],
                        tag: crate::data::Tag::SingleObject,
                        caption: String::new(),
                    };
                    let dets = detect(&render(&scene, size), size);
                    assert_eq!(dets.len(), 1, "{dets:?}");
                    let d = dets[0];
                    assert_eq!((d.shape, d.colour), (shape, colour));
                    // The triangle's thin apex and base corners are less than half covered.
                    let want = match shape {
                        Shape::Triangle => [11.0, 10.0, 20.0, 20.0],
                        _ => [10.0, 9.0, 21.0, 20.0],
                    };
                    assert_eq!(d.bbox, want, "{shape:?}");
                    if shape == Shape::Square {
                        assert_eq!(d.pixels, 121);
                    }
                }
            }
        }
    }

    /// A lone object's render with `flaw` applied to its light: the image
    /// is black plus `light x colour` per pixel, as the renderer makes it.
    fn flawed(shape: Shape, colour: Colour, radius: f32, flaw: &dyn Fn(&mut [f32], usize)) -> Vec<f32> {
        let size = 32;
        let o = Object {
            shape,
            colour,
            cx: 15.5,
            cy: 15.5,
            radius,
        };
        let scene = Scene {
            objects: vec![o],
            tag: crate::data::Tag::SingleObject,
            caption: String::new(),
        };
        let image = render(&scene, size);
        // Light from the channel where the colour is brightest.
        let rgb = colour.rgb();
        let c = (0..3).max_by_key(|&c| rgb[c]).unwrap_or(0);
        let full = rgb[c] as f32 / 127.5 - 1.0;
        let mut light: Vec<f32> = (0..size * size)
            .map(|p| ((image[c * size * size + p] + 1.0) / (full + 1.0)).clamp(0.0, 1.0))
            .collect();
        flaw(&mut light, size);
        (0..3)
            .flat_map(|c| {
                light
                    .iter()
                    .map(move |l| l * (rgb[c] as f32 / 127.5) - 1.0)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn flawed_squares_and_circles_keep_their_shape() {
        // Flaws seen in generated squares and circles: dim or uneven light, a
        // soft side, a one-pixel bump, a ragged edge, clipped corners.
        type Flaw = (&'static str, fn(&mut [f32], usize));
        let flaws: [Flaw; 6] = [
            ("dim", |l, _| l.iter_mut().for_each(|v| *v *= 0.7)),
            ("uneven", |l, s| {
                for (p, v) in l.iter_mut().enumerate() {
                    *v *= 0.75 + 0.25 * ((p % s + p / s) % 3) as f32 / 2.0;
                }
            }),
            ("soft left side", |l, s| {
                for y in 0..s {
                    if let Some(x) = (0..s).find(|&x| l[y * s + x] > 0.5) {
                        l[y * s + x] *= 0.6;
                    }
                }
            }),
            ("bump on the right", |l, s| {
                let y = s / 2;
                if let Some(x) = (0..s).rev().find(|&x| l[y * s + x] > 0.5) {
                    l[y * s + x + 1] = 1.0;
                    l[y * s + x + 2] = 0.8;
                }
            }),
            ("ragged top", |l, s| {
                if let Some(y) = (0..s).find(|&y| (0..s).any(|x| l[y * s + x] > 0.5)) {
                    for x in (0..s).step_by(3) {
                        l[y * s + x] *= 0.3;
                    }
                }
            }),
            ("clipped corners", |l, s| {
                let lit: Vec<usize> = (0..s * s).filter(|&p| l[p] > 0.5).collect();
                let (x0, x1) = (
                    lit.iter().map(|p| p % s).min().unwrap(),
                    lit.iter().map(|p| p % s).max().unwrap(),
                );
                let (y0, y1) = (
                    lit.iter().map(|p| p / s).min().unwrap(),
                    lit.iter().map(|p| p / s).max().unwrap(),
                );
                for (x, y) in [(x0, y0), (x1, y0), (x0, y1), (x1, y1)] {
                    l[y * s + x] = 0.0;
                }
            }),
        ];
        for shape in [Shape::Square, Shape::Circle] {
            // Sides of 9 to 14 pixels: smaller blobs are judged by the fill alone.
            for radius in [4.5, 5.5, 7.0] {
                for (name, flaw) in &flaws {
                    for colour in [Colour::Green, Colour::White, Colour::Purple] {
                        let dets = detect(&flawed(shape, colour, radius, flaw), 32);
                        assert_eq!(dets.len(), 1, "{shape:?} r {radius} {name}: {dets:?}");
                        assert_eq!(dets[0].shape, shape, "{shape:?} r {radius} {name}: {dets:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn noise_and_black_images_give_few_detections_and_never_panic() {
        let mut rng = StdRng::seed_from_u64(9);
        for size in [16, 32, 64] {
            let n = 3 * size * size;
            assert!(detect(&vec![-1.0; n], size).is_empty());
            assert!(detect(&vec![-3.0; n], size).is_empty());
            // Mid grey and white planes are one big white component; never a panic.
            assert!(detect(&vec![0.0; n], size).len() <= 1);
            let weird: Vec<f32> = (0..n)
                .map(|i| [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.3, -0.7][i % 5])
                .collect();
            let _ = detect(&weird, size);
            let mut total = [0; 3];
            let images = 60;
            for k in 0..images {
                let image: Vec<f32> = match k % 3 {
                    0 => (0..n).map(|_| rng.gen_range(-1.0..=1.0)).collect(),
                    1 => {
                        let normal = Normal::new(0.0f32, 1.0).unwrap();
                        (0..n).map(|_| normal.sample(&mut rng)).collect()
                    }
                    _ => {
                        // Dim noise around black, as an undertrained model's background.
                        let normal = Normal::new(-0.8f32, 0.3).unwrap();
                        (0..n).map(|_| normal.sample(&mut rng)).collect()
                    }
                };
                let dets = detect(&image, size);
                total[k % 3] += dets.len();
            }
            let mean = total.map(|t| t as f64 / (images / 3) as f64);
            println!("{size}x{size} noise (uniform, normal, dim): {mean:.2?} detections an image");
            assert!(
                mean.iter().all(|&m| m <= 0.25),
                "{size}: {mean:?} detections an image on noise"
            );
        }
    }

    #[test]
    fn min_pixels_scales_with_the_area() {
        assert_eq!(min_pixels(32), 6);
        assert_eq!(min_pixels(64), 24);
        assert_eq!(min_pixels(16), 5);
        assert_eq!(min_pixels(256), 384);
    }

    #[test]
    fn a_wrong_sized_image_has_no_detections() {
        assert!(detect(&[0.5; 5], 32).is_empty());
    }
}
