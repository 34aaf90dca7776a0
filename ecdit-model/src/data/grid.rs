//! Image grids with captions, written as PNG: for looking at training data
//! and at generated samples.
//!
//! Captions are drawn beneath each image in the public-domain 8x8 bitmap font
//! of the `font8x8` crate, wrapped onto as many lines as they need.

use super::DataError;
use font8x8::UnicodeFonts;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Glyph side in pixels.
const GLYPH: usize = 8;
/// Text line height: a glyph and a gap.
const LINE: usize = GLYPH + 2;
/// Pixels between cells.
const GAP: usize = 2;
/// Pixels between a caption and its cell's sides.
const INSET: usize = 2;
/// Canvas (gaps, caption area) and text colours.
const DARK: [u8; 3] = [24, 24, 24];
const LIGHT: [u8; 3] = [230, 230, 230];
/// Largest canvas written, in pixels, against runaway sizes.
const MAX_PIXELS: usize = 1 << 28;

/// Converts one [3, H, W] image in [-1, 1] to interleaved 8-bit RGB
/// (values outside [-1, 1] are clipped).
pub fn image_to_rgb8(image: &[f32], width: usize, height: usize) -> Result<Vec<u8>, DataError> {
    let plane = width * height;
    if image.len() != 3 * plane {
        return Err(DataError::BadSample {
            dataset: "image".into(),
            index: 0,
            reason: format!("{} values, expected 3x{height}x{width} = {}", image.len(), 3 * plane),
        });
    }
    let to_u8 = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    Ok((0..plane)
        .flat_map(|p| (0..3).map(move |c| to_u8(image[c * plane + p])))
        .collect())
}

/// Writes images ([3, size, size] in [-1, 1]) as one PNG grid of `columns`
/// columns, each image upscaled by `scale` (nearest) with its caption
/// beneath; no captions (an empty slice, or all empty) means no text rows.
pub fn write_grid(
    path: &Path,
    images: &[Vec<f32>],
    size: usize,
    captions: &[String],
    columns: usize,
    scale: usize,
) -> Result<(), DataError> {
    let bad = |reason: String| DataError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if images.is_empty() || columns == 0 || scale == 0 || size == 0 {
        return Err(bad(format!(
            "a grid needs images, columns, scale and size above 0 (got {} images, {columns} columns, scale {scale}, size {size})",
            images.len()
        )));
    }
    if !captions.is_empty() && captions.len() != images.len() {
        return Err(bad(format!("{} captions for {} images", captions.len(), images.len())));
    }
    let cell_w = size * scale;
    // Text keeps an inset from the cell's sides so neighbouring captions do not run together.
    let per_line = (cell_w.saturating_sub(2 * INSET) / GLYPH).max(1);
    let wrapped: Vec<Vec<String>> = captions.iter().map(|c| wrap(c, per_line)).collect();
    let text_lines = wrapped.iter().map(Vec::len).max().unwrap_or(0);
    let text_h = if text_lines > 0 { GAP + text_lines * LINE } else { 0 };
    let cell_h = cell_w + text_h;
    let cols = columns.min(images.len());
    let rows = images.len().div_ceil(cols);
    let width = cols * cell_w + (cols - 1) * GAP;
    let height = rows * cell_h + (rows - 1) * GAP;
    if width.checked_mul(height).is_none_or(|p| p > MAX_PIXELS) {
        return Err(bad(format!("a {width}x{height} grid is too large")));
    }
    let mut canvas: Vec<u8> = DARK.repeat(width * height);
    for (i, image) in images.iter().enumerate() {
        let rgb = image_to_rgb8(image, size, size).map_err(|e| bad(format!("image {i}: {e}")))?;
        let (x0, y0) = ((i % cols) * (cell_w + GAP), (i / cols) * (cell_h + GAP));
        for y in 0..cell_w {
            for x in 0..cell_w {
                let src = ((y / scale) * size + x / scale) * 3;
                let dst = ((y0 + y) * width + x0 + x) * 3;
                canvas[dst..dst + 3].copy_from_slice(&rgb[src..src + 3]);
            }
        }
        for (l, line) in wrapped.get(i).into_iter().flatten().enumerate() {
            let ty = y0 + cell_w + GAP + l * LINE;
            for (k, ch) in line.chars().enumerate() {
                draw_glyph(&mut canvas, width, x0 + INSET + k * GLYPH, ty, x0 + cell_w, ch);
            }
        }
    }
    write_png(path, &canvas, width, height)
}

/// Greedy word wrap to lines of at most `per_line` characters; words longer
/// than a line are cut.
fn wrap(text: &str, per_line: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let chars: Vec<char> = word.chars().collect();
        for piece in chars.chunks(per_line) {
            let piece: String = piece.iter().collect();
            let len = line.chars().count();
            if len > 0 && len + 1 + piece.chars().count() > per_line {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&piece);
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Draws `ch` with its top-left at (x, y), clipped at column `right`; characters
/// the font lacks are drawn as '?'.
fn draw_glyph(canvas: &mut [u8], width: usize, x: usize, y: usize, right: usize, ch: char) {
    let glyph = font8x8::BASIC_FONTS
        .get(ch)
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8]);
    for (row, bits) in glyph.iter().enumerate() {
        for col in 0..GLYPH {
            // Bit 0 is the leftmost pixel.
            if bits & (1 << col) != 0 && x + col < right {
                let i = ((y + row) * width + x + col) * 3;
                if let Some(px) = canvas.get_mut(i..i + 3) {
                    px.copy_from_slice(&LIGHT);
                }
            }
        }
    }
}

/// Writes interleaved 8-bit RGB as a PNG, atomically: a temporary file in the
/// same directory, then a rename, so a reader never sees half a file.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<(), DataError> {
    let bad = |reason: String| DataError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if width == 0 || height == 0 || width > u32::MAX as usize || height > u32::MAX as usize {
        return Err(bad(format!("cannot encode a {width}x{height} image")));
    }
    if width.checked_mul(height).and_then(|p| p.checked_mul(3)) != Some(rgb.len()) {
        return Err(bad(format!("{} bytes for a {width}x{height} RGB image", rgb.len())));
    }
    let name = path
        .file_name()
        .ok_or_else(|| bad("the path names no file".into()))?
        .to_string_lossy();
    // Unique per process and call, so concurrent writers never share a temporary file.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = encode(&tmp, rgb, width as u32, height as u32)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", tmp.display())));
    result.map_err(|reason| {
        // Best effort: the temporary file may not even exist.
        let _ = std::fs::remove_file(&tmp);
        bad(reason)
    })
}

/// Encodes into `tmp`; errors say which step failed.
fn encode(tmp: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), String> {
    let step = |what: &'static str| move |e: &dyn std::fmt::Display| format!("{what} {}: {e}", tmp.display());
    let file = File::create(tmp).map_err(|e| step("creating")(&e))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| step("writing")(&e))?;
    writer.write_image_data(rgb).map_err(|e| step("writing")(&e))?;
    writer.finish().map_err(|e| step("writing")(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_png(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::BufReader::new(File::open(path).unwrap()))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    /// A 4x4 image: channel c of pixel (x, y) is -1 + (x + 4y) / 8 + c / 4 (clipped to 1).
    fn ramp() -> Vec<f32> {
        (0..3)
            .flat_map(|c| (0..16).map(move |p| (-1.0 + p as f32 / 8.0 + c as f32 / 4.0).min(1.0)))
            .collect()
    }

    #[test]
    fn grid_has_the_expected_size_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let images = vec![ramp(); 5];
        let captions: Vec<String> = (0..5)
            .map(|i| format!("a photo of {i} red circles and a blue square"))
            .collect();
        // Cells 16 px wide less the insets: 1 character a line, so captions need many lines.
        write_grid(&path, &images, 4, &captions, 3, 4).unwrap();
        let lines = wrap(&captions[0], 1).len();
        assert!(lines >= 30, "{lines}");
        let cell_h = 16 + GAP + lines * LINE;
        let (w, h, colour, px) = read_png(&path);
        assert_eq!(colour, png::ColorType::Rgb);
        assert_eq!((w as usize, h as usize), (3 * 16 + 2 * GAP, 2 * cell_h + GAP));
        // Image 4 sits in row 1, column 1; its pixel (x=1, y=2) spans 4x4 output pixels.
        let at = |x: usize, y: usize| &px[(y * w as usize + x) * 3..][..3];
        let (x0, y0) = (16 + GAP, cell_h + GAP);
        let want = [0, 1, 2].map(|c| ((-1.0 + 9.0 / 8.0 + c as f32 / 4.0 + 1.0f32) * 127.5).round() as u8);
        for dy in 0..4 {
            for dx in 0..4 {
                assert_eq!(at(x0 + 4 + dx, y0 + 8 + dy), want);
            }
        }
        // The caption area under image 0 has text pixels, and only text or background colours.
        let text: Vec<&[u8]> = (16 + GAP..cell_h)
            .flat_map(|y| (0..16).map(move |x| (x, y)))
            .map(|(x, y)| at(x, y))
            .collect();
        assert!(text.iter().any(|p| *p == LIGHT) && text.iter().all(|p| *p == LIGHT || *p == DARK));
        // Nothing is drawn in the inset.
        assert!((16 + GAP..cell_h).all(|y| (0..INSET).all(|x| at(x, y) == DARK)));
        assert!(!dir
            .path()
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    }

    #[test]
    fn without_captions_a_single_image_is_written_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        write_grid(&path, &[ramp()], 4, &[], 8, 1).unwrap();
        let (w, h, _, px) = read_png(&path);
        assert_eq!((w, h), (4, 4));
        assert_eq!(px, image_to_rgb8(&ramp(), 4, 4).unwrap());
        // Empty captions draw no text rows either.
        write_grid(&path, &[ramp(), ramp()], 4, &[String::new(), String::new()], 2, 2).unwrap();
        assert_eq!(read_png(&path).1, 8);
    }

    #[test]
    fn wrap_keeps_words_whole_and_lines_short() {
        assert_eq!(wrap("a photo of a red circle", 10), ["a photo of", "a red", "circle"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert!(wrap("  ", 4).is_empty());
    }

    #[test]
    fn bad_input_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let fails = |images: &[Vec<f32>], captions: &[String], columns: usize, scale: usize, why: &str| {
            let e = write_grid(&path, images, 4, captions, columns, scale)
                .unwrap_err()
                .to_string();
            assert!(e.contains("bad.png") && e.contains(why), "{e}");
        };
        let one = [vec![0.0; 48]];
        fails(&[], &[], 1, 1, "0 images");
        fails(&one, &[], 0, 1, "0 columns");
        fails(&one, &[String::new(), String::new()], 1, 1, "2 captions for 1 images");
        fails(&[vec![0.0; 47]], &[], 1, 1, "image 0: ");
        fails(&one, &[], 1, 1 << 20, "too large");
        assert!(!path.exists());
        let e = write_png(&path, &[0; 11], 2, 2).unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("11 bytes"), "{e}");
        let e = write_png(&dir.path().join("no/such/dir.png"), &[0; 12], 2, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dir.png"), "{e}");
    }
}
