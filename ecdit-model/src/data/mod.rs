//! Training data: the `Dataset` trait and the built-in world of shapes.
//!
//! No images can be downloaded, so the project draws its own: [`ShapesWorld`]
//! renders coloured circles, squares and triangles with captions in GenEval's
//! phrasing, unlimited and reproducible from (seed, index). [`ImageFolder`]
//! reads a directory of PNGs with `.txt` captions instead. [`write_grid`]
//! draws images with their captions into one PNG for inspection.

mod folder;
mod grid;
mod shapes;

pub use folder::ImageFolder;
pub use grid::{image_to_rgb8, write_grid, write_png};
pub use shapes::{render, Colour, Object, Relation, Scene, Shape, ShapesConfig, ShapesWorld, Tag, BACKGROUND};

use rayon::prelude::*;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// One training example: an image and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// [C, H, W], values in [-1, 1].
    pub image: Vec<f32>,
    /// What the image shows.
    pub caption: String,
}

/// Consecutive samples, images concatenated.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// [n, C, H, W], values in [-1, 1].
    pub images: Vec<f32>,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Images n.
    pub n: usize,
    /// Channels C.
    pub channels: usize,
    /// Image side H = W.
    pub size: usize,
}

/// A source of (image, caption) pairs, addressed by index.
pub trait Dataset: Send + Sync {
    /// One line for logs, e.g. "shapes (seed 0, 32x32)".
    fn describe(&self) -> String;
    /// Image channels (3).
    fn channels(&self) -> usize;
    /// Side of the square images.
    fn size(&self) -> usize;
    /// Number of distinct samples; `None` = unlimited.
    fn len(&self) -> Option<usize>;
    /// Whether the dataset has no samples at all.
    fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
    /// Sample `index` (deterministic; finite datasets wrap around at `len`).
    fn sample(&self, index: u64) -> Result<Sample, DataError>;

    /// Samples `start..start + n`, drawn in parallel so data is never the
    /// bottleneck of a training step.
    fn batch(&self, start: u64, n: usize) -> Result<Batch, DataError> {
        let (channels, size) = (self.channels(), self.size());
        let per_image = channels * size * size;
        let samples = (0..n as u64)
            .into_par_iter()
            .map(|i| self.sample(start.wrapping_add(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut images = Vec::with_capacity(n * per_image);
        let mut captions = Vec::with_capacity(n);
        for (i, s) in samples.into_iter().enumerate() {
            // A dataset that breaks its own shape would corrupt the whole batch.
            if s.image.len() != per_image {
                return Err(DataError::BadSample {
                    dataset: self.describe(),
                    index: start.wrapping_add(i as u64),
                    reason: format!(
                        "image has {} values, expected {channels}x{size}x{size} = {per_image}",
                        s.image.len()
                    ),
                });
            }
            images.extend_from_slice(&s.image);
            captions.push(s.caption);
        }
        Ok(Batch {
            images,
            captions,
            n,
            channels,
            size,
        })
    }
}

/// Builds a dataset by name: `"shapes"` (or empty) is the built-in world with
/// `seed`; anything else is a directory of PNGs with `.txt` captions.
pub fn open(spec: &str, seed: u64, size: usize) -> Result<Box<dyn Dataset>, DataError> {
    if spec.is_empty() || spec == "shapes" {
        return Ok(Box::new(ShapesWorld::new(ShapesConfig { seed, size })?));
    }
    let dir = Path::new(spec);
    if dir.is_dir() {
        return Ok(Box::new(ImageFolder::open(dir, size)?));
    }
    Err(DataError::UnknownDataset { spec: spec.to_string() })
}

/// What can go wrong reading, drawing or writing data.
#[derive(Debug, Error)]
pub enum DataError {
    /// A dataset setting is out of range.
    #[error("bad data setting {field} = {value}: {reason}")]
    Config {
        /// The setting.
        field: String,
        /// Its value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// `open` got neither "shapes" nor a directory.
    #[error("unknown dataset '{spec}': expected 'shapes' or a directory of PNG images with .txt captions")]
    UnknownDataset {
        /// What was asked for.
        spec: String,
    },
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PNG could not be decoded, or is not an image this dataset can use.
    #[error("image {path}: {reason}")]
    Image {
        /// The PNG.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A caption file is missing or malformed.
    #[error("caption for {image}: {reason}")]
    Caption {
        /// The image the caption belongs to.
        image: PathBuf,
        /// What is wrong (names the caption file, and the line where it helps).
        reason: String,
    },
    /// A dataset directory holds no PNG images.
    #[error("dataset directory {dir} holds no .png images")]
    Empty {
        /// The directory.
        dir: PathBuf,
    },
    /// A dataset returned a sample of the wrong shape.
    #[error("dataset {dataset}, sample {index}: {reason}")]
    BadSample {
        /// The dataset's description.
        dataset: String,
        /// The sample index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// Images or captions handed to the grid or PNG writer do not fit together.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finite dataset whose sample i is a constant image of value i (for wrap-around and batching).
    struct Counter(usize);

    impl Dataset for Counter {
        fn describe(&self) -> String {
            "counter".into()
        }
        fn channels(&self) -> usize {
            3
        }
        fn size(&self) -> usize {
            2
        }
        fn len(&self) -> Option<usize> {
            Some(self.0)
        }
        fn sample(&self, index: u64) -> Result<Sample, DataError> {
            let i = index % self.0 as u64;
            Ok(Sample {
                image: vec![i as f32; 12],
                caption: format!("{i}"),
            })
        }
    }

    #[test]
    fn batch_concatenates_samples_in_order() {
        let b = Counter(5).batch(3, 4).unwrap();
        assert_eq!((b.n, b.channels, b.size), (4, 3, 2));
        assert_eq!(b.captions, ["3", "4", "0", "1"]);
        assert_eq!(b.images.len(), 4 * 12);
        assert!(b.images[12..24].iter().all(|&v| v == 4.0));
        assert!(b.images[24..36].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn batch_rejects_a_sample_of_the_wrong_shape() {
        struct Broken;
        impl Dataset for Broken {
            fn describe(&self) -> String {
                "broken".into()
            }
            fn channels(&self) -> usize {
                3
            }
            fn size(&self) -> usize {
                4
            }
            fn len(&self) -> Option<usize> {
                None
            }
            fn sample(&self, _: u64) -> Result<Sample, DataError> {
                Ok(Sample {
                    image: vec![0.0; 5],
                    caption: String::new(),
                })
            }
        }
        let e = Broken.batch(7, 2).unwrap_err().to_string();
        assert!(
            e.contains("broken") && e.contains("sample 7") && e.contains("48"),
            "{e}"
        );
    }

    #[test]
    fn open_builds_shapes_or_a_folder_and_rejects_anything_else() {
        let d = open("shapes", 3, 32).unwrap();
        assert_eq!(d.describe(), "shapes (seed 3, 32x32)");
        assert_eq!(d.len(), None);
        assert!(open("", 0, 32).is_ok());
        let e = open("/no/such/dir", 0, 32).err().unwrap().to_string();
        assert!(e.contains("/no/such/dir"), "{e}");
        // An empty directory is a folder dataset with nothing in it: an error naming it.
        let dir = tempfile::tempdir().unwrap();
        let e = open(dir.path().to_str().unwrap(), 0, 32).err().unwrap().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }
}
