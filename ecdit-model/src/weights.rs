//! Weights on disk: memory-mapped safetensors read through a candle
//! `VarBuilder`-style loader, and atomic safetensors writing.
//!
//! [`Weights::get`] checks every tensor's dtype (only F32 is accepted) and
//! shape and names the full dotted name and the file in every error; it
//! records what was read so [`Weights::check_all_used`] can refuse files with
//! tensors the model does not know (a wrong architecture or a typo in a
//! converter). Non-finite weights load with a warning naming the tensor.

use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorView};
use safetensors::SafeTensorError;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;

/// Everything that can go wrong reading or writing a weights file.
#[derive(Debug, Error)]
pub enum WeightsError {
    /// The file could not be opened, mapped or written.
    #[error("weights file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors (truncated, or a header that lies
    /// about tensor sizes or offsets).
    #[error("weights file {path} is not a valid safetensors file ({hint}): {source:?}")]
    Format {
        /// The file.
        path: PathBuf,
        /// A plain-words reading of the error.
        hint: &'static str,
        /// The parser's error.
        source: SafeTensorError,
    },
    /// A tensor the model needs is not in the file.
    #[error("weights file {path}: tensor '{name}' is missing (expected shape {expected:?})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The shape the model wanted.
        expected: Vec<usize>,
    },
    /// A tensor has another shape than the model's.
    #[error("weights file {path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// A tensor is not f32.
    #[error("weights file {path}: tensor '{name}' has dtype {found}; only F32 is accepted (convert the checkpoint to float32)")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The file's dtype.
        found: String,
    },
    /// The file holds tensors the model did not read.
    #[error("weights file {path}: {} tensor(s) not used by the model: {}", names.len(), names.join(", "))]
    Unused {
        /// The file.
        path: PathBuf,
        /// Names of the unused tensors (sorted).
        names: Vec<String>,
    },
    /// The file's metadata is missing a key or holds a bad value.
    #[error("weights file {path}: metadata '{key}': {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result with a [`WeightsError`].
pub type WeightsResult<T> = std::result::Result<T, WeightsError>;

fn format_hint(e: &SafeTensorError) -> &'static str {
    match e {
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            "the file is shorter than its header says: truncated?"
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor data does not fill the file exactly: truncated, or a header that lies about sizes"
        }
        SafeTensorError::TensorInvalidInfo
        | SafeTensorError::InvalidOffset(_)
        | SafeTensorError::ValidationOverflow => "a tensor's offsets disagree with its shape and dtype",
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization
        | SafeTensorError::HeaderTooLarge => "the header is not valid safetensors JSON",
        _ => "unreadable",
    }
}

/// A memory-mapped safetensors file.
pub struct Weights {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
    used: Mutex<BTreeSet<String>>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Weights {
    /// Maps `path` and parses its header (which safetensors checks against the
    /// file size, so truncated files and lying headers fail here).
    pub fn open(path: impl AsRef<Path>) -> WeightsResult<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightsError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us while
        // mapped is outside what any safetensors reader can guard against.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(io)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|source| WeightsError::Format {
            path: path.clone(),
            hint: format_hint(&source),
            source,
        })?;
        Ok(Self {
            path,
            mmap,
            header_len,
            metadata,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// A string from the file's `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.metadata().as_ref()?.get(key).map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Reads tensor `name` as f32, checking that its shape is `expected`.
    /// Marks it used. Non-finite values load with a warning.
    pub fn get(&self, name: &str, expected: &[usize]) -> WeightsResult<Vec<f32>> {
        let info = self.metadata.info(name).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
        })?;
        if info.dtype != Dtype::F32 {
            return Err(WeightsError::Dtype {
                path: self.path.clone(),
                name: name.to_string(),
                found: format!("{:?}", info.dtype),
            });
        }
        if info.shape != expected {
            return Err(WeightsError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        // read_metadata validated the offsets against the file size.
        let bytes = &self.mmap[base + start..base + end];
        let data: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let bad = data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            tracing::warn!(
                tensor = name,
                path = %self.path.display(),
                non_finite = bad,
                "weight tensor '{name}' holds {bad} NaN or infinite value(s)"
            );
        }
        self.mark_used(name);
        Ok(data)
    }

    /// Marks `name` as read without reading it.
    pub fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
    }

    /// A prefixed view: `weights.pp("blocks").pp(3).get(&[d], "attn.proj.bias")`.
    pub fn pp(&self, prefix: impl fmt::Display) -> VarBuilder<'_> {
        VarBuilder {
            weights: self,
            prefix: prefix.to_string(),
        }
    }

    /// Names not read yet, minus those starting with one of `allowed_prefixes`.
    pub fn unused(&self, allowed_prefixes: &[&str]) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        self.names()
            .into_iter()
            .filter(|n| !used.contains(n) && !allowed_prefixes.iter().any(|p| n.starts_with(p)))
            .collect()
    }

    /// Errors listing every tensor that was never read (except those under
    /// `allowed_prefixes`).
    pub fn check_all_used(&self, allowed_prefixes: &[&str]) -> WeightsResult<()> {
        let names = self.unused(allowed_prefixes);
        if names.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Unused {
                path: self.path.clone(),
                names,
            })
        }
    }
}

/// A [`Weights`] view under a dotted prefix (candle's `VarBuilder`).
#[derive(Clone, Debug)]
pub struct VarBuilder<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> VarBuilder<'a> {
    /// One level deeper: `prefix.name`.
    pub fn pp(&self, name: impl fmt::Display) -> VarBuilder<'a> {
        VarBuilder {
            weights: self.weights,
            prefix: self.path(&name.to_string()),
        }
    }

    /// Reads `prefix.name`, checking its shape.
    pub fn get(&self, shape: &[usize], name: &str) -> WeightsResult<Vec<f32>> {
        self.weights.get(&self.path(name), shape)
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}

/// Writes f32 tensors `(name, shape, data)` and string metadata to `path`
/// atomically: a temporary file in the same directory, synced, then renamed.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> WeightsResult<()> {
    let path = path.as_ref();
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.clone(), b).map_err(|source| WeightsError::Format {
            path: path.to_path_buf(),
            hint: "a tensor's data length disagrees with its shape",
            source,
        })?;
        views.push((name.clone(), view));
    }
    let buffer = safetensors::serialize(views, &Some(metadata)).map_err(|source| WeightsError::Format {
        path: path.to_path_buf(),
        hint: "serialising",
        source,
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&buffer)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
