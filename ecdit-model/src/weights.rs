//! Weights on disk: memory-mapped safetensors read through a candle
//! `VarBuilder`-style loader, and atomic safetensors writing.
//!
//! [`Weights::get`] checks every tensor's dtype (F32, F16 and BF16 are
//! accepted and widened to f32) and shape and names the full dotted name and
//! the file in every error; it records what was read so
//! [`Weights::check_all_used`] can refuse files with tensors the model does
//! not know (a wrong architecture or a typo in a converter). Non-finite
//! weights load with a warning naming the tensor.
//!
//! Parameters load and save through [`Param::load`] and
//! [`Param::to_upstream_f32`] ([`Weights::load_param`], [`save_params`]), so
//! files keep upstream names and layouts while memory may be input-major and
//! bf16; a parameter is saved in its own dtype.

use ecdit_engine::{bf16, Backend, DType, EngineError, Param};
use half::f16;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorView};
use safetensors::SafeTensorError;
use std::borrow::Cow;
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
    /// A tensor is not F32, F16 or BF16.
    #[error("weights file {path}: tensor '{name}' has dtype {found}; only F32, F16 and BF16 are accepted (convert the checkpoint)")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The file's dtype.
        found: String,
    },
    /// A parameter could not take a tensor's values, or give them (the
    /// backend refused the transfer or the dtype).
    #[error("weights file {path}: tensor '{name}': {source}")]
    Param {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The backend's error (boxed: keeps the error small).
        source: Box<EngineError>,
    },
    /// The file holds tensors the model did not read.
    #[error("weights file {path}: {} tensor(s) not used by the model: {}", names.len(), names.join(", "))]
    Unused {
        /// The file.
        path: PathBuf,
        /// Names of the unused tensors (sorted).
        names: Vec<String>,
    },
    /// The header's length is over the file's or [`crate::limits::MAX_HEADER`].
    #[error("weights file {path} is not a valid safetensors file: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

/// The bytes of a weights file: mapped from disk, or held in memory.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A memory-mapped (or in-memory) safetensors file.
pub struct Weights {
    path: PathBuf,
    mmap: Bytes,
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
        Self::from_storage(path, Bytes::Mapped(mmap))
    }

    /// A safetensors file already in memory; `path` names it in errors.
    /// Checked exactly as [`Weights::open`] checks a file.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> WeightsResult<Self> {
        Self::from_storage(path.into(), Bytes::Owned(bytes))
    }

    fn from_storage(path: PathBuf, mmap: Bytes) -> WeightsResult<Self> {
        // The header's length is bounded before the header is parsed.
        crate::limits::check_safetensors_header(&mmap).map_err(|reason| WeightsError::Header {
            path: path.clone(),
            reason,
        })?;
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

    /// The dtype of a tensor as the file stores it (`F32`, `BF16`, ...), if present.
    pub fn dtype(&self, name: &str) -> Option<String> {
        self.metadata.info(name).map(|i| format!("{:?}", i.dtype))
    }

    /// Reads tensor `name` as f32 (F16 and BF16 widen exactly), checking that
    /// its shape is `expected`. Marks it used. Non-finite values load with a warning.
    pub fn get(&self, name: &str, expected: &[usize]) -> WeightsResult<Vec<f32>> {
        let info = self.metadata.info(name).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
        })?;
        let widen: fn(&[u8]) -> Vec<f32> = match info.dtype {
            Dtype::F32 => |b| {
                b.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            },
            Dtype::F16 => |b| {
                b.chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            },
            Dtype::BF16 => |b| {
                b.chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            },
            other => {
                return Err(WeightsError::Dtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    found: format!("{other:?}"),
                })
            }
        };
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
        let data = widen(&self.mmap[base + start..base + end]);
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

    /// Sets `param` from the tensor of its name and upstream shape, converted
    /// to the parameter's dtype and memory layout (one upload).
    pub fn load_param(&self, backend: &dyn Backend, param: &mut Param) -> WeightsResult<()> {
        let data = self.get(&param.name, &param.shape)?;
        param.load(backend, &data).map_err(|source| WeightsError::Param {
            path: self.path.clone(),
            name: param.name.clone(),
            source: Box::new(source),
        })
    }

    /// [`Weights::load_param`] for every parameter, in order.
    pub fn load_params<'p>(
        &self,
        backend: &dyn Backend,
        params: impl IntoIterator<Item = &'p mut Param>,
    ) -> WeightsResult<()> {
        params.into_iter().try_for_each(|p| self.load_param(backend, p))
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

    /// The file this view reads.
    pub fn weights(&self) -> &'a Weights {
        self.weights
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}

/// One tensor to write: upstream name and shape, f32 values in upstream
/// layout, and the dtype to store them in (F32 or BF16).
#[derive(Clone, Debug)]
pub struct SaveTensor<'a> {
    /// Full dotted name.
    pub name: String,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Cow<'a, [f32]>,
    /// Storage dtype on disk: F32, or BF16 (rounded to nearest even).
    pub dtype: DType,
}

impl SaveTensor<'_> {
    /// A parameter's values in upstream layout, to be stored in its own dtype
    /// (one download).
    pub fn from_param(backend: &dyn Backend, param: &Param) -> Result<SaveTensor<'static>, EngineError> {
        Ok(SaveTensor {
            name: param.name.clone(),
            shape: param.shape.clone(),
            data: Cow::Owned(param.to_upstream_f32(backend)?),
            dtype: param.dtype(),
        })
    }
}

/// Writes every parameter under its upstream name and shape, each in its own
/// dtype (so a bf16 model saves bf16), plus `extra` tensors and string
/// metadata; atomically, as [`save_tensors`].
pub fn save_params(
    path: impl AsRef<Path>,
    backend: &dyn Backend,
    params: &[&Param],
    extra: Vec<SaveTensor<'_>>,
    metadata: HashMap<String, String>,
) -> WeightsResult<()> {
    let path = path.as_ref();
    let mut tensors = Vec::with_capacity(params.len() + extra.len());
    for p in params {
        tensors.push(
            SaveTensor::from_param(backend, p).map_err(|source| WeightsError::Param {
                path: path.to_path_buf(),
                name: p.name.clone(),
                source: Box::new(source),
            })?,
        );
    }
    tensors.extend(extra);
    save_tensors(path, &tensors, metadata)
}

/// Writes f32 tensors `(name, shape, data)` and string metadata to `path`
/// atomically, all as F32 (see [`save_tensors`]).
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> WeightsResult<()> {
    let tensors: Vec<SaveTensor<'_>> = tensors
        .iter()
        .map(|(name, shape, data)| SaveTensor {
            name: name.clone(),
            shape: shape.clone(),
            data: Cow::Borrowed(*data),
            dtype: DType::F32,
        })
        .collect();
    save_tensors(path, &tensors, metadata)
}

/// Writes tensors, each in its dtype (F32 or BF16), and string metadata to
/// `path` atomically: a temporary file in the same directory, synced, then renamed.
pub fn save_tensors(
    path: impl AsRef<Path>,
    tensors: &[SaveTensor<'_>],
    metadata: HashMap<String, String>,
) -> WeightsResult<()> {
    let path = path.as_ref();
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes: Vec<(Dtype, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        bytes.push(match t.dtype {
            DType::F32 => (Dtype::F32, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::BF16 => (
                Dtype::BF16,
                t.data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            ),
            other => {
                return Err(WeightsError::Dtype {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    found: format!("{other} (to save)"),
                })
            }
        });
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (t, (dtype, b)) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(*dtype, t.shape.clone(), b).map_err(|source| WeightsError::Format {
            path: path.to_path_buf(),
            hint: "a tensor's data length disagrees with its shape",
            source,
        })?;
        views.push((t.name.clone(), view));
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

#[cfg(test)]
mod tests {
    use super::*;
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_engine::{Init, Layout};

    fn write(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dt, shape, b)| (n.to_string(), TensorView::new(*dt, shape.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    fn param(be: &CpuBackend, name: &str, dtype: DType) -> Param {
        Param::new(be, name, &[2, 3], dtype, Layout::InputMajor, Init::Zeros).unwrap()
    }

    const VALUES: [f32; 6] = [0.5, -1.25, 3.25, 1000.3, 0.1, -65504.0];

    #[test]
    fn f16_and_bf16_files_load_widened_and_converted_to_the_param_dtype() {
        let be = CpuBackend::new(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("half.safetensors");
        let f16_bytes: Vec<u8> = VALUES.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = VALUES.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        write(
            &path,
            vec![
                ("a.weight", Dtype::F16, vec![2, 3], f16_bytes),
                ("b.weight", Dtype::BF16, vec![2, 3], bf16_bytes),
            ],
        );
        let w = Weights::open(&path).unwrap();
        assert_eq!(w.dtype("a.weight").as_deref(), Some("F16"));
        let want_f16: Vec<f32> = VALUES.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let want_bf16: Vec<f32> = VALUES.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(w.get("a.weight", &[2, 3]).unwrap(), want_f16);
        assert_eq!(w.get("b.weight", &[2, 3]).unwrap(), want_bf16);

        // Into an f32 input-major parameter: exact, upstream layout preserved.
        let mut a = param(&be, "a.weight", DType::F32);
        w.load_param(&be, &mut a).unwrap();
        assert_eq!(a.to_upstream_f32(&be).unwrap(), want_f16);
        // Into a bf16 parameter: the f16 values round to bf16; bf16 stays exact.
        let mut a16 = param(&be, "a.weight", DType::BF16);
        let mut b16 = param(&be, "b.weight", DType::BF16);
        w.load_params(&be, [&mut a16, &mut b16]).unwrap();
        let rounded: Vec<f32> = want_f16.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(a16.to_upstream_f32(&be).unwrap(), rounded);
        assert_eq!(b16.to_upstream_f32(&be).unwrap(), want_bf16);
        assert!(w.check_all_used(&[]).is_ok());
    }

    #[test]
    fn bf16_params_save_as_bf16_and_reload_bit_exact() {
        let be = CpuBackend::new(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut p = param(&be, "w", DType::BF16);
        p.load(&be, &VALUES).unwrap();
        let mut q = Param::new(&be, "q", &[3], DType::F32, Layout::AsStored, Init::Zeros).unwrap();
        q.load(&be, &VALUES[..3]).unwrap();
        let meta = HashMap::from([("format".to_string(), "test".to_string())]);
        save_params(&path, &be, &[&p, &q], Vec::new(), meta).unwrap();

        let w = Weights::open(&path).unwrap();
        assert_eq!(w.dtype("w").as_deref(), Some("BF16"));
        assert_eq!(w.dtype("q").as_deref(), Some("F32"));
        assert_eq!(w.shape("w"), Some(vec![2, 3]));
        assert_eq!(w.metadata("format"), Some("test"));
        let mut back = param(&be, "w", DType::BF16);
        w.load_param(&be, &mut back).unwrap();
        assert_eq!(back.to_upstream_f32(&be).unwrap(), p.to_upstream_f32(&be).unwrap());
        assert_eq!(w.get("q", &[3]).unwrap(), VALUES[..3]);
        // No temporary file is left beside the result.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m.safetensors")]);
    }

    #[test]
    fn other_dtypes_and_shapes_are_refused_naming_the_tensor() {
        let be = CpuBackend::new(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        write(
            &path,
            vec![
                ("ints", Dtype::I64, vec![2], vec![0; 16]),
                ("w", Dtype::F32, vec![3, 2], vec![0; 24]),
            ],
        );
        let w = Weights::open(&path).unwrap();
        let err = w.get("ints", &[2]).unwrap_err().to_string();
        assert!(
            err.contains("'ints' has dtype I64") && err.contains("F32, F16 and BF16"),
            "{err}"
        );
        let mut p = param(&be, "w", DType::F32);
        let err = w.load_param(&be, &mut p).unwrap_err().to_string();
        assert!(err.contains("'w' has shape [3, 2], expected [2, 3]"), "{err}");
    }
}
