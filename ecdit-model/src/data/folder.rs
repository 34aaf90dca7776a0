//! A dataset from a directory: `NAME.png` images, each captioned by `NAME.txt`.
//!
//! Opening reads every caption and every PNG header, so a missing caption, a
//! wrong size or a file that is no PNG fails at once, naming the file, rather
//! than mid-training. Pixels are decoded when a sample is asked for.

use super::{DataError, Dataset, Sample};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Images `size` x `size` (RGB, RGBA with alpha dropped, or grayscale), sorted
/// by file name.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    dir: PathBuf,
    size: usize,
    /// (image path, caption), sorted by file name.
    items: Vec<(PathBuf, String)>,
}

impl ImageFolder {
    /// Indexes `dir`: every `*.png` (any case) must have a one-line caption in
    /// the `.txt` file of the same stem and be `size` x `size`.
    pub fn open(dir: impl AsRef<Path>, size: usize) -> Result<Self, DataError> {
        let dir = dir.as_ref().to_path_buf();
        if size == 0 {
            return Err(DataError::Config {
                field: "size".into(),
                value: "0".into(),
                reason: "images need at least one pixel".into(),
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DataError::Io { path, source }
        };
        let mut images = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
            if is_png && path.is_file() {
                images.push(path);
            }
        }
        if images.is_empty() {
            return Err(DataError::Empty { dir });
        }
        images.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        let items = images
            .into_iter()
            .map(|path| {
                check_header(&path, size)?;
                let caption = read_caption(&path)?;
                Ok((path, caption))
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(Self { dir, size, items })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image files, in sample order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.items.iter().map(|(p, _)| p.as_path())
    }
}

impl Dataset for ImageFolder {
    fn describe(&self) -> String {
        let n = self.items.len();
        format!(
            "folder {} ({n} images, {}x{})",
            self.dir.display(),
            self.size,
            self.size
        )
    }

    fn channels(&self) -> usize {
        3
    }

    fn size(&self) -> usize {
        self.size
    }

    fn len(&self) -> Option<usize> {
        Some(self.items.len())
    }

    fn sample(&self, index: u64) -> Result<Sample, DataError> {
        let (path, caption) = &self.items[(index % self.items.len() as u64) as usize];
        Ok(Sample {
            image: read_image(path, self.size)?,
            caption: caption.clone(),
        })
    }
}

/// The caption of `image`: the one non-empty line of its `.txt` file.
fn read_caption(image: &Path) -> Result<String, DataError> {
    let file = image.with_extension("txt");
    let bad = |reason: String| DataError::Caption {
        image: image.to_path_buf(),
        reason,
    };
    if !file.is_file() {
        return Err(bad(format!("no caption file {}", file.display())));
    }
    let text = crate::limits::read_text_file(&file).map_err(|e| bad(format!("cannot read {}: {e}", file.display())))?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, caption)) = lines.next() else {
        return Err(bad(format!("caption file {} is empty", file.display())));
    };
    // Several captions per file is a convention of some datasets; refuse it
    // rather than silently train on the first.
    if let Some((i, _)) = lines.next() {
        return Err(bad(format!(
            "{} line {}: a second caption (one caption per file, on one line)",
            file.display(),
            i + 1
        )));
    }
    Ok(caption.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn image_error(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Image {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Opens a PNG for 8-bit output (palettes expanded, 16 bits stripped).
fn open_png(path: &Path) -> Result<png::Reader<BufReader<File>>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    decoder
        .read_info()
        .map_err(|e| image_error(path, format!("not a readable PNG: {e}")))
}

/// Reads only the header: the size must match.
fn check_header(path: &Path, size: usize) -> Result<(), DataError> {
    let reader = open_png(path)?;
    let (w, h) = reader.info().size();
    if (w as usize, h as usize) != (size, size) {
        return Err(image_error(path, format!("is {w}x{h}, expected {size}x{size}")));
    }
    Ok(())
}

/// Decodes a PNG to [3, size, size] in [-1, 1].
fn read_image(path: &Path, size: usize) -> Result<Vec<f32>, DataError> {
    let mut reader = open_png(path)?;
    let (w, h) = reader.info().size();
    if (w as usize, h as usize) != (size, size) {
        return Err(image_error(path, format!("is {w}x{h}, expected {size}x{size}")));
    }
    let (colour, _) = reader.output_color_type();
    let channels = match colour {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(image_error(path, format!("unsupported colour type {other:?}"))),
    };
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| image_error(path, "too large to decode"))?;
    let mut buf = vec![0u8; len];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| image_error(path, format!("corrupt PNG data: {e}")))?;
    let line = frame.line_size;
    if line < size * channels || buf.len() < line * size {
        return Err(image_error(path, "decoded rows are shorter than the image"));
    }
    let plane = size * size;
    let mut image = vec![0f32; 3 * plane];
    for y in 0..size {
        for x in 0..size {
            let px = &buf[y * line + x * channels..];
            // Grayscale fills all three channels; alpha is dropped.
            let rgb = if channels < 3 {
                [px[0]; 3]
            } else {
                [px[0], px[1], px[2]]
            };
            for (c, v) in rgb.into_iter().enumerate() {
                image[c * plane + y * size + x] = f32::from(v) / 127.5 - 1.0;
            }
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes an 8-bit PNG of `colour` type with `channels` samples a pixel; pixel
    /// (x, y) sample k is `(x + 2y + 40k) * 3`.
    fn write_test_png(path: &Path, w: u32, h: u32, colour: png::ColorType, channels: usize) {
        let data: Vec<u8> = (0..h as usize)
            .flat_map(|y| {
                (0..w as usize).flat_map(move |x| (0..channels).map(move |k| ((x + 2 * y + 40 * k) * 3) as u8))
            })
            .collect();
        let mut enc = png::Encoder::new(File::create(path).unwrap(), w, h);
        enc.set_color(colour);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
    }

    fn caption(dir: &Path, stem: &str, text: &str) {
        std::fs::write(dir.join(format!("{stem}.txt")), text).unwrap();
    }

    fn value(byte: usize) -> f32 {
        (byte * 3) as f32 / 127.5 - 1.0
    }

    #[test]
    fn reads_sorted_captioned_images_of_every_colour_type() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_test_png(&d.join("b.png"), 4, 4, png::ColorType::Rgb, 3);
        caption(d, "b", "a photo of  a red circle\n");
        write_test_png(&d.join("a.png"), 4, 4, png::ColorType::Grayscale, 1);
        caption(d, "a", "\n  one square \n\n");
        write_test_png(&d.join("c.PNG"), 4, 4, png::ColorType::Rgba, 4);
        caption(d, "c", "two triangles");
        std::fs::write(d.join("notes.md"), "ignored").unwrap();

        let f = ImageFolder::open(d, 4).unwrap();
        assert_eq!(f.len(), Some(3));
        let names: Vec<_> = f
            .files()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.png", "b.png", "c.PNG"]);
        let s: Vec<Sample> = (0..4).map(|i| f.sample(i).unwrap()).collect();
        assert_eq!(s[0].caption, "one square");
        assert_eq!(s[1].caption, "a photo of a red circle");
        assert_eq!(s[3], s[0], "index 3 wraps to 0");
        // Pixel (x=1, y=2): grayscale in all channels; RGB and RGBA (alpha dropped) per channel.
        let at = |img: &[f32], c: usize| img[c * 16 + 2 * 4 + 1];
        for c in 0..3 {
            assert_eq!(at(&s[0].image, c), value(5));
            assert_eq!(at(&s[1].image, c), value(5 + 40 * c));
            assert_eq!(at(&s[2].image, c), value(5 + 40 * c));
        }
        assert!(f.describe().contains("3 images, 4x4"));
        assert_eq!(
            f.batch(1, 2).unwrap().captions,
            ["a photo of a red circle", "two triangles"]
        );
    }

    fn open_err(dir: &Path, size: usize) -> String {
        ImageFolder::open(dir, size).unwrap_err().to_string()
    }

    #[test]
    fn rejects_a_wrong_size_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_test_png(&dir.path().join("ok.png"), 4, 4, png::ColorType::Rgb, 3);
        caption(dir.path(), "ok", "a circle");
        write_test_png(&dir.path().join("wide.png"), 5, 4, png::ColorType::Rgb, 3);
        caption(dir.path(), "wide", "a square");
        let e = open_err(dir.path(), 4);
        assert!(
            e.contains("wide.png") && e.contains("5x4") && e.contains("expected 4x4"),
            "{e}"
        );
    }

    #[test]
    fn rejects_a_missing_or_malformed_caption_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_test_png(&dir.path().join("lonely.png"), 4, 4, png::ColorType::Rgb, 3);
        let e = open_err(dir.path(), 4);
        assert!(
            e.contains("lonely.png") && e.contains("no caption file") && e.contains("lonely.txt"),
            "{e}"
        );
        caption(dir.path(), "lonely", " \n");
        let e = open_err(dir.path(), 4);
        assert!(e.contains("lonely.txt") && e.contains("empty"), "{e}");
        caption(dir.path(), "lonely", "a circle\n\na square\n");
        let e = open_err(dir.path(), 4);
        assert!(e.contains("lonely.txt line 3"), "{e}");
    }

    #[test]
    fn rejects_a_corrupt_png_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.png"), b"this is not a png").unwrap();
        caption(dir.path(), "junk", "a circle");
        let e = open_err(dir.path(), 4);
        assert!(e.contains("junk.png") && e.contains("not a readable PNG"), "{e}");

        // A valid header with the pixel data cut off fails when the sample is read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.png");
        write_test_png(&path, 4, 4, png::ColorType::Rgb, 3);
        let bytes = std::fs::read(&path).unwrap();
        let mut file = File::create(&path).unwrap();
        let idat = bytes.windows(4).position(|w| w == b"IDAT").unwrap();
        file.write_all(&bytes[..idat + 6]).unwrap();
        drop(file);
        caption(dir.path(), "cut", "a circle");
        let f = ImageFolder::open(dir.path(), 4).unwrap();
        let e = f.sample(0).unwrap_err().to_string();
        assert!(e.contains("cut.png"), "{e}");
    }

    #[test]
    fn rejects_an_empty_or_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_err(dir.path(), 4);
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("no .png"),
            "{e}"
        );
        let gone = dir.path().join("gone");
        let e = open_err(&gone, 4);
        assert!(e.contains("gone"), "{e}");
        assert!(open_err(dir.path(), 0).contains("size"));
    }
}
