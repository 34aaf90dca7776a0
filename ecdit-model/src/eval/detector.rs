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
//!    [`min_pixels`] are dropped as specks.
//! 3. Shapes, from the component's pixels inside its bounding box: a triangle
//!    (apex up) holds about a quarter of its pixels in the top half of its
//!    box, a circle and a square half; a square fills its box, a circle
//!    pi/4 of it. See [`classify`] for the thresholds.

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
/// degrees from blue) or a red-white blend.
pub const MAX_HUE_ANGLE_DEG: f32 = 22.0;

/// Smallest component kept at 32x32 (scaled with the image area by
/// [`min_pixels`]). The world's smallest object (half-size 3 at 32x32) is a
/// triangle of about 15 pixels above half coverage, a circle of 28; specks
/// of up to 5 pixels, which noise and generated images produce, are dropped.
pub const MIN_PIXELS_32: f32 = 6.0;

/// The smallest component kept in a `size` x `size` image: [`MIN_PIXELS_32`]
/// scaled with the area, at least 3 pixels.
pub fn min_pixels(size: usize) -> usize {
    let scale = size as f32 / 32.0;
    ((MIN_PIXELS_32 * scale * scale).round() as usize).max(3)
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

/// Per pixel: the palette index and coverage, or `None` for background.
fn label_pixels(image: &[f32], size: usize) -> Vec<Option<(usize, f32)>> {
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
            if len == 0.0 {
                return None;
            }
            let (best, dot) = pal
                .iter()
                .enumerate()
                .map(|(i, (u, _, _))| (i, px[0] * u[0] + px[1] * u[1] + px[2] * u[2]))
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            let coverage = dot / pal[best].1;
            (dot >= min_cos * len && coverage > MIN_COVERAGE).then_some((best, coverage))
        })
        .collect()
}

/// Finds the objects of a [3, size, size] image with values in [-1, 1]
/// (values outside are clamped, NaN reads as black), largest first (ties in
/// raster order of their first pixel): the ordering stands in for a learned
/// detector's confidence.
///
/// # Panics
/// If `image` does not hold 3 x size x size values.
pub fn detect(image: &[f32], size: usize) -> Vec<Detection> {
    detect_with_features(image, size).into_iter().map(|(d, _)| d).collect()
}

/// [`detect`], with each detection's shape features.
pub(crate) fn detect_with_features(image: &[f32], size: usize) -> Vec<(Detection, Features)> {
    assert_eq!(
        image.len(),
        3 * size * size,
        "detect: {} values for a 3x{size}x{size} image",
        image.len()
    );
    let labels = label_pixels(image, size);
    let min = min_pixels(size);
    let mut seen = vec![false; labels.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    let mut pixels = Vec::new();
    for start in 0..labels.len() {
        let Some((colour, _)) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        pixels.clear();
        while let Some(p) = stack.pop() {
            pixels.push(p);
            let (x, y) = ((p % size) as isize, (p / size) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= size as isize || ny >= size as isize {
                        continue;
                    }
                    let q = ny as usize * size + nx as usize;
                    if !seen[q] && labels[q].is_some_and(|l| l.0 == colour) {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        if pixels.len() < min {
            continue;
        }
        let xy: Vec<(usize, usize)> = pixels.iter().map(|&p| (p % size, p / size)).collect();
        let x0 = xy.iter().map(|p| p.0).min().unwrap_or(0);
        let x1 = xy.iter().map(|p| p.0).max().unwrap_or(0) + 1;
        let y0 = xy.iter().map(|p| p.1).min().unwrap_or(0);
        let y1 = xy.iter().map(|p| p.1).max().unwrap_or(0) + 1;
        let bbox = [x0 as f32, y0 as f32, x1 as f32, y1 as f32];
        let f = features(&xy, bbox);
        out.push((
            Detection {
                shape: classify(&f),
                colour: Colour::ALL[colour],
                bbox,
                pixels: pixels.len(),
            },
            f,
        ));
    }
    // Stable: equal sizes keep raster order.
    out.sort_by(|a, b| b.0.pixels.cmp(&a.0.pixels));
    out
}

/// What the shape classifier looks at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Features {
    /// Pixels / box area: square 1, circle pi/4, triangle 1/2.
    pub fill: f32,
    /// Share of the pixels in the top half of the box (a pixel on the middle
    /// line counts half): triangle (apex up) 1/4, circle and square 1/2.
    pub top: f32,
    /// Share of the box's four corner regions (outside the inscribed ellipse
    /// by more than a quarter of the half-sides) that is filled: square 1,
    /// circle 0, triangle about 1/2 (its bottom corners).
    pub corners: f32,
}

pub(crate) fn features(xy: &[(usize, usize)], bbox: [f32; 4]) -> Features {
    let [x0, y0, x1, y1] = bbox;
    let (w, h) = (x1 - x0, y1 - y0);
    let (mx, my) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let n = xy.len() as f32;
    let mut top = 0.0;
    let mut in_corners = 0usize;
    for &(x, y) in xy {
        let yc = y as f32 + 0.5;
        top += if yc < my {
            1.0
        } else if yc == my {
            0.5
        } else {
            0.0
        };
        if corner(x, y, mx, my, w, h) {
            in_corners += 1;
        }
    }
    let mut corner_area = 0usize;
    for y in y0 as usize..y1 as usize {
        for x in x0 as usize..x1 as usize {
            corner_area += usize::from(corner(x, y, mx, my, w, h));
        }
    }
    Features {
        fill: n / (w * h),
        top: top / n,
        corners: if corner_area == 0 {
            0.5
        } else {
            in_corners as f32 / corner_area as f32
        },
    }
}

/// Whether pixel (x, y) lies in a corner region of the box centred at
/// (mx, my) with sides w, h: outside the inscribed ellipse scaled by 1.25.
fn corner(x: usize, y: usize, mx: f32, my: f32, w: f32, h: f32) -> bool {
    let u = (x as f32 + 0.5 - mx) / (w / 2.0);
    let v = (y as f32 + 0.5 - my) / (h / 2.0);
    u * u + v * v > 1.25 * 1.25
}

/// The shape with the given features.
pub(crate) fn classify(f: &Features) -> Shape {
    if f.top < 0.38 {
        Shape::Triangle
    } else if f.fill > 0.88 {
        Shape::Square
    } else {
        Shape::Circle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{render, Scene, ShapesConfig, ShapesWorld};

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

    /// For each detection whose centre lies in an object's box of its colour: (true shape, features).
    fn matched_features(scene: &Scene, image: &[f32], size: usize) -> Vec<(Shape, Features, f32)> {
        detect_with_features(image, size)
            .into_iter()
            .filter_map(|(d, f)| {
                let (cx, cy) = d.centre();
                scene
                    .objects
                    .iter()
                    .find(|o| {
                        let b = o.bbox();
                        cx > b[0] && cx < b[2] && cy > b[1] && cy < b[3] && o.colour == d.colour
                    })
                    .map(|o| (o.shape, f, o.radius))
            })
            .collect()
    }

    #[test]
    #[ignore]
    fn print_feature_distributions() {
        for size in [32, 64] {
            for blur in [false, true] {
                let world = ShapesWorld::new(ShapesConfig { seed: 1, size }).unwrap();
                let mut rows = Vec::new();
                let mut objects = 0;
                for i in 0..1000 {
                    let scene = world.draw_scene(i);
                    objects += scene.objects.len();
                    let mut image = render(&scene, size);
                    if blur {
                        image = box_blur(&image, size);
                    }
                    rows.extend(matched_features(&scene, &image, size));
                }
                println!("size {size} blur {blur}: {} matched of {objects} objects", rows.len());
                for shape in Shape::ALL {
                    let pct = |get: &dyn Fn(&Features) -> f32| {
                        let mut v: Vec<f32> = rows.iter().filter(|r| r.0 == shape).map(|r| get(&r.1)).collect();
                        v.sort_by(f32::total_cmp);
                        let q = |p: f32| v[((v.len() - 1) as f32 * p) as usize];
                        format!("{:.3} {:.3} {:.3} {:.3} {:.3}", q(0.0), q(0.01), q(0.5), q(0.99), q(1.0))
                    };
                    let wrong = rows.iter().filter(|r| r.0 == shape && classify(&r.1) != shape).count();
                    println!(
                        "  {:8} fill [{}] top [{}] corners [{}] wrong {wrong}",
                        shape.name(),
                        pct(&|f| f.fill),
                        pct(&|f| f.top),
                        pct(&|f| f.corners)
                    );
                }
            }
        }
    }
}
