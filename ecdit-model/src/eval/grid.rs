//! Judged samples as a PNG grid: each image framed green (pass) or red
//! (fail), its prompt beneath (drawn by `crate::data::write_grid`).

use super::score::Judgement;
use super::EvalError;
use crate::data::write_grid;
use std::path::Path;

/// Frame colours in [-1, 1] RGB.
const PASS: [f32; 3] = [-1.0, 1.0, -1.0];
const FAIL: [f32; 3] = [1.0, -1.0, -1.0];

/// Frame width in image pixels for images of side `size` (before scaling).
fn frame(size: usize) -> usize {
    (size / 16).max(1)
}

/// Writes `images` ([3, size, size] in [-1, 1]) as a grid of `columns`
/// columns, each upscaled by `scale`, framed green where its judgement passed
/// and red where it failed, with its prompt beneath (`prompts` may be empty
/// for no text).
pub fn write_marked_grid(
    path: &Path,
    images: &[Vec<f32>],
    size: usize,
    judgements: &[Judgement],
    prompts: &[String],
    columns: usize,
    scale: usize,
) -> Result<(), EvalError> {
    let bad = |reason: String| EvalError::Grid {
        path: path.to_path_buf(),
        reason,
    };
    if judgements.len() != images.len() {
        return Err(bad(format!(
            "{} judgements for {} images",
            judgements.len(),
            images.len()
        )));
    }
    if !prompts.is_empty() && prompts.len() != images.len() {
        return Err(bad(format!("{} prompts for {} images", prompts.len(), images.len())));
    }
    let b = frame(size);
    let side = size + 2 * b;
    let framed = images
        .iter()
        .zip(judgements)
        .enumerate()
        .map(|(i, (image, j))| {
            if image.len() != 3 * size * size {
                return Err(bad(format!(
                    "image {i}: {} values, expected 3x{size}x{size} = {}",
                    image.len(),
                    3 * size * size
                )));
            }
            let colour = if j.pass { PASS } else { FAIL };
            let mut out = vec![0.0; 3 * side * side];
            for c in 0..3 {
                let dst = &mut out[c * side * side..(c + 1) * side * side];
                dst.fill(colour[c]);
                for y in 0..size {
                    let src = &image[c * size * size + y * size..][..size];
                    dst[(y + b) * side + b..][..size].copy_from_slice(src);
                }
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()?;
    write_grid(path, &framed, side, prompts, columns, scale)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judgement(pass: bool) -> Judgement {
        Judgement {
            pass,
            reason: String::new(),
            detections: Vec::new(),
        }
    }

    fn read_png(path: &Path) -> (usize, usize, Vec<u8>) {
        let file = std::fs::File::open(path).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width as usize, info.height as usize, buf)
    }

    #[test]
    fn frames_are_green_for_pass_and_red_for_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marked.png");
        let size = 16;
        // A grey image, so frame and image differ.
        let images = vec![vec![0.0; 3 * size * size]; 2];
        write_marked_grid(&path, &images, size, &[judgement(true), judgement(false)], &[], 2, 2).unwrap();
        let (w, h, px) = read_png(&path);
        let side = (size + 2) * 2;
        assert_eq!(h, side);
        assert!(w > 2 * side);
        let at = |x: usize, y: usize| [px[(y * w + x) * 3], px[(y * w + x) * 3 + 1], px[(y * w + x) * 3 + 2]];
        assert_eq!(at(0, 0), [0, 255, 0]);
        assert_eq!(at(side - 1, side / 2), [0, 255, 0]);
        assert_eq!(at(side / 2, side / 2), [128, 128, 128]);
        let x1 = w - side;
        assert_eq!(at(x1, 0), [255, 0, 0]);
        assert_eq!(at(x1 + side / 2, side - 1), [255, 0, 0]);
        assert_eq!(at(x1 + side / 2, side / 2), [128, 128, 128]);
        // With prompts: taller (text rows).
        let prompts = vec!["a photo of a circle".to_string(), "a photo of a square".to_string()];
        write_marked_grid(
            &path,
            &images,
            size,
            &[judgement(true), judgement(false)],
            &prompts,
            2,
            2,
        )
        .unwrap();
        assert!(read_png(&path).1 > side);
    }

    #[test]
    fn mismatched_inputs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let images = vec![vec![0.0; 3 * 16 * 16]];
        let e = write_marked_grid(&path, &images, 16, &[], &[], 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.png") && e.contains("0 judgements for 1 images"), "{e}");
        let two = vec!["a".to_string(), "b".to_string()];
        let e = write_marked_grid(&path, &images, 16, &[judgement(true)], &two, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 prompts for 1 images"), "{e}");
        let e = write_marked_grid(&path, &[vec![0.0; 5]], 16, &[judgement(true)], &[], 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.png") && e.contains("image 0"), "{e}");
        assert!(!path.exists());
    }
}
