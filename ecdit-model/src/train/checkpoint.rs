//! Atomic training checkpoints.
//!
//! A checkpoint is a directory `RUN/checkpoints/step-00000100/` holding
//! `tensors.safetensors` (weights, EMA weights, optimiser moments: any named tensors) and
//! `state.json` (the caller's JSON state inside a small envelope that records the step and
//! the byte length and CRC-32 of the tensors file, so truncation or corruption is caught on
//! load).
//!
//! Writing never exposes a half-written checkpoint under a final name: everything goes into
//! `step-XXXXXXXX.tmp-<pid>`, each file and the directory are fsynced, and only then is it
//! renamed into place (and the parent fsynced). Old checkpoints are pruned only after that.
//! Loading takes the newest checkpoint that reads back whole and reports the ones skipped.

use ecdit_engine::DType;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use safetensors::SafeTensorError;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const TENSORS_FILE: &str = "tensors.safetensors";
const STATE_FILE: &str = "state.json";
const FORMAT: &str = "ecdit-checkpoint";
const VERSION: u64 = 1;

/// What went wrong with a checkpoint, and where.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed (disk full, permissions, a missing file...).
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("write", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A checkpoint on disk does not read back whole.
    #[error("checkpoint {} is damaged: {reason}", .path.display())]
    Corrupt {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor handed to `save` is malformed.
    #[error("cannot save tensor {name:?} into {}: {reason}", .path.display())]
    BadTensor {
        /// The checkpoint being written.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something that is not a checkpoint directory occupies the checkpoint's path.
    #[error("{} exists and is not a checkpoint directory; move it away", .path.display())]
    Blocked {
        /// The occupied path.
        path: PathBuf,
    },
    /// Checkpoints exist but none reads back whole. Starting afresh would prune them, so
    /// this is an error rather than "no checkpoint".
    #[error("no checkpoint under {} reads back whole: {}", .dir.display(), describe(.skipped))]
    NoneReadable {
        /// The checkpoints directory.
        dir: PathBuf,
        /// Each checkpoint tried, with why it was rejected.
        skipped: Vec<(PathBuf, String)>,
    },
}

fn describe(skipped: &[(PathBuf, String)]) -> String {
    let parts: Vec<String> = skipped
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect();
    parts.join("; ")
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { op, path, source }
}

/// One tensor's raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Element type (training state is F32 or BF16; U32 and U8 are accepted too).
    pub dtype: DType,
    /// `shape.product() * dtype.size()` bytes, little-endian.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// An f32 tensor from values.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData {
            shape,
            dtype: DType::F32,
            bytes,
        }
    }

    /// The values as f32 (BF16 widened exactly); `None` for integer dtypes.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self.dtype {
            DType::F32 => Some(
                self.bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::BF16 => Some(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// A checkpoint read back whole.
#[derive(Debug)]
pub struct Loaded {
    /// The training step it was saved at.
    pub step: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Every tensor by name.
    pub tensors: HashMap<String, TensorData>,
    /// The caller's state, as given to `save`.
    pub state: Value,
    /// Newer checkpoints that did not read back whole, with the reason (newest first).
    pub skipped: Vec<(PathBuf, String)>,
}

/// The checkpoints of one run: `RUN/checkpoints/`.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointStore {
    /// The store under `run_dir/checkpoints`, keeping the newest `keep` checkpoints
    /// (0 keeps all). Nothing is touched until the first call.
    pub fn new(run_dir: &Path, keep: usize) -> Self {
        CheckpointStore {
            dir: run_dir.join("checkpoints"),
            keep,
        }
    }

    /// The checkpoints directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The final directory of `step`'s checkpoint.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:08}"))
    }

    /// Writes `step`'s checkpoint atomically and returns its directory; then prunes
    /// checkpoints beyond the newest `keep` (never the one just written). On any error the
    /// earlier checkpoints are untouched and the temporary directory is removed (best effort).
    /// An existing checkpoint of the same step (say, a damaged one) is replaced.
    pub fn save(&self, step: u64, tensors: &[(String, TensorData)], state: &Value) -> Result<PathBuf, CheckpointError> {
        let final_dir = self.step_dir(step);
        if final_dir.exists() && !final_dir.is_dir() {
            return Err(CheckpointError::Blocked { path: final_dir });
        }
        // Check the tensors before touching the disk: bad input must leave nothing behind.
        let views = tensor_views(&final_dir, tensors)?;
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir).map_err(io_err("create directory", &self.dir))?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let tmp = self.dir.join(format!("step-{step:08}.tmp-{}", std::process::id()));
        let result = self.write_and_publish(step, &tmp, &final_dir, views, state);
        if result.is_err() && tmp.exists() {
            if let Err(e) = fs::remove_dir_all(&tmp) {
                tracing::warn!(path = %tmp.display(), "could not remove temporary checkpoint: {e}");
            }
        }
        result?;
        tracing::info!(step, path = %final_dir.display(), "saved checkpoint");
        // The checkpoint is safe on disk; a pruning failure is worth a warning, not an error.
        if let Err(e) = self.prune(&final_dir) {
            tracing::warn!(dir = %self.dir.display(), "could not prune old checkpoints: {e}");
        }
        Ok(final_dir)
    }

    fn write_and_publish(
        &self,
        step: u64,
        tmp: &Path,
        final_dir: &Path,
        views: Vec<(&str, TensorView<'_>)>,
        state: &Value,
    ) -> Result<(), CheckpointError> {
        // A leftover from an earlier failed save of this process (or a dead one with our pid).
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(io_err("remove stale temporary", tmp))?;
        }
        fs::create_dir(tmp).map_err(io_err("create directory", tmp))?;
        // Streamed to the file (no second copy of every tensor in memory), then read back
        // for the checksum: that also proves the bytes on their way to disk are whole.
        let tensors_path = tmp.join(TENSORS_FILE);
        safetensors::serialize_to_file(views, &None, &tensors_path).map_err(|e| match e {
            SafeTensorError::IoError(source) => CheckpointError::Io {
                op: "write",
                path: tensors_path.clone(),
                source,
            },
            other => CheckpointError::BadTensor {
                path: final_dir.to_path_buf(),
                name: "(all)".into(),
                reason: other.to_string(),
            },
        })?;
        let file = File::open(&tensors_path).map_err(io_err("open", &tensors_path))?;
        file.sync_all().map_err(io_err("fsync", &tensors_path))?;
        let (len, crc) = length_and_crc(&file).map_err(io_err("read back", &tensors_path))?;
        let envelope = json!({
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "tensors_file": { "name": TENSORS_FILE, "bytes": len, "crc32": crc },
            "state": state,
        });
        let text = serde_json::to_vec_pretty(&envelope).map_err(|e| CheckpointError::Corrupt {
            path: tmp.to_path_buf(),
            reason: format!("state does not serialise: {e}"),
        })?;
        write_synced(&tmp.join(STATE_FILE), &text)?;
        sync_dir(tmp)?;

        // Replacing a checkpoint of the same step: move the old one aside first (rename onto
        // a non-empty directory fails), and delete it only once the new one is in place.
        // clean_temp puts an `.old-` directory back if we die in between.
        let aside = self.dir.join(format!("step-{step:08}.old-{}", std::process::id()));
        let replacing = final_dir.is_dir();
        if replacing {
            if aside.exists() {
                fs::remove_dir_all(&aside).map_err(io_err("remove stale", &aside))?;
            }
            fs::rename(final_dir, &aside).map_err(io_err("move aside", final_dir))?;
        }
        if let Err(source) = fs::rename(tmp, final_dir) {
            if replacing {
                let _ = fs::rename(&aside, final_dir);
            }
            return Err(CheckpointError::Io {
                op: "rename into place",
                path: final_dir.to_path_buf(),
                source,
            });
        }
        sync_dir(&self.dir)?;
        if replacing {
            if let Err(e) = fs::remove_dir_all(&aside) {
                tracing::warn!(path = %aside.display(), "could not remove replaced checkpoint: {e}");
            }
        }
        Ok(())
    }

    /// Removes checkpoints beyond the newest `keep`, never `just_saved`.
    fn prune(&self, just_saved: &Path) -> Result<(), CheckpointError> {
        if self.keep == 0 {
            return Ok(());
        }
        for (step, path) in self.list()?.into_iter().skip(self.keep) {
            if path != just_saved {
                // Renamed out of the list first: a writer killed while deleting
                // must not leave a half-empty directory that looks complete
                // (clean_temp removes the rest).
                let doomed = self.dir.join(format!("step-{step:08}.tmp-{}", std::process::id()));
                fs::rename(&path, &doomed).map_err(io_err("move old checkpoint out", &path))?;
                sync_dir(&self.dir)?;
                fs::remove_dir_all(&doomed).map_err(io_err("remove old checkpoint", &doomed))?;
                tracing::debug!(path = %path.display(), "pruned checkpoint");
            }
        }
        Ok(())
    }

    /// Complete (renamed into place) checkpoint directories, newest first. Temporary
    /// directories and stray files are ignored; a missing checkpoints directory is empty.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "list",
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let Some(step) = entry.file_name().to_str().and_then(parse_step_name) else {
                continue;
            };
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
        found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
        Ok(found)
    }

    /// The newest checkpoint that reads back whole; newer damaged ones are skipped with a
    /// warning and listed in `Loaded::skipped`. `Ok(None)` when there are no checkpoints;
    /// an error when there are some but none is readable.
    pub fn load_latest(&self) -> Result<Option<Loaded>, CheckpointError> {
        let mut skipped = Vec::new();
        for (_, path) in self.list()? {
            match Self::load(&path) {
                Ok(mut loaded) => {
                    loaded.skipped = skipped;
                    return Ok(Some(loaded));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "skipping unreadable checkpoint: {e}");
                    skipped.push((path, e.to_string()));
                }
            }
        }
        if skipped.is_empty() {
            Ok(None)
        } else {
            Err(CheckpointError::NoneReadable {
                dir: self.dir.clone(),
                skipped,
            })
        }
    }

    /// Reads one checkpoint directory, checking the tensors file's length and checksum.
    pub fn load(path: &Path) -> Result<Loaded, CheckpointError> {
        let state_path = path.join(STATE_FILE);
        let text = crate::limits::read_text_file(&state_path).map_err(io_err("read", &state_path))?;
        let tensors_path = path.join(TENSORS_FILE);
        // Mapped rather than read: a big checkpoint is not held twice while tensors are copied out.
        let file = File::open(&tensors_path).map_err(io_err("open", &tensors_path))?;
        // SAFETY: checkpoint files are never modified after they are renamed into place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("map", &tensors_path))?;
        Self::load_from_bytes(path, text.as_bytes(), &map)
    }

    /// [`CheckpointStore::load`] of a checkpoint whose two files are already
    /// in memory: `state` is `state.json`, `tensors` the tensors file, and
    /// `path` the checkpoint directory (named in errors; a `step-N` name must
    /// agree with the step `state` records).
    pub fn load_from_bytes(path: &Path, state: &[u8], tensors: &[u8]) -> Result<Loaded, CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let envelope: Value =
            serde_json::from_slice(state).map_err(|e| corrupt(format!("{STATE_FILE} is not valid JSON: {e}")))?;
        if envelope.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(corrupt(format!("{STATE_FILE} is not an {FORMAT} file")));
        }
        let version = envelope.get("version").and_then(Value::as_u64);
        if version != Some(VERSION) {
            return Err(corrupt(format!(
                "{STATE_FILE} has format version {version:?}; this build reads {VERSION}"
            )));
        }
        let field = |name: &str| {
            envelope
                .get("tensors_file")
                .and_then(|t| t.get(name))
                .and_then(Value::as_u64)
        };
        let (Some(step), Some(want_len), Some(want_crc)) = (
            envelope.get("step").and_then(Value::as_u64),
            field("bytes"),
            field("crc32"),
        ) else {
            return Err(corrupt(format!(
                "{STATE_FILE} lacks step, tensors_file.bytes or tensors_file.crc32"
            )));
        };
        if let Some(named) = path.file_name().and_then(|n| n.to_str()).and_then(parse_step_name) {
            if named != step {
                return Err(corrupt(format!(
                    "{STATE_FILE} says step {step}, the directory name says {named}"
                )));
            }
        }
        let state = envelope.get("state").cloned().unwrap_or(Value::Null);

        let bytes = tensors;
        if bytes.len() as u64 != want_len {
            return Err(corrupt(format!(
                "{TENSORS_FILE} is {} bytes, {STATE_FILE} says {want_len} (truncated?)",
                bytes.len()
            )));
        }
        let crc = crc32fast::hash(bytes);
        if u64::from(crc) != want_crc {
            return Err(corrupt(format!(
                "{TENSORS_FILE} checksum is {crc:#010x}, {STATE_FILE} says {want_crc:#010x}"
            )));
        }
        crate::limits::check_safetensors_header(bytes).map_err(|e| corrupt(format!("{TENSORS_FILE}: {e}")))?;
        let parsed = SafeTensors::deserialize(bytes).map_err(|e| corrupt(format!("{TENSORS_FILE}: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, view) in parsed.iter() {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::BF16 => DType::BF16,
                Dtype::U32 => DType::U32,
                Dtype::U8 => DType::U8,
                other => return Err(corrupt(format!("tensor {name:?} has unsupported dtype {other:?}"))),
            };
            let data = TensorData {
                shape: view.shape().to_vec(),
                dtype,
                bytes: view.data().to_vec(),
            };
            tensors.insert(name.to_string(), data);
        }
        Ok(Loaded {
            step,
            path: path.to_path_buf(),
            tensors,
            state,
            skipped: Vec::new(),
        })
    }

    /// Removes temporary directories left by dead writers (call at start). A directory a
    /// live process is still writing is left alone; a checkpoint that a dead writer had
    /// moved aside to replace it is put back if its replacement never arrived.
    pub fn clean_temp(&self) -> Result<(), CheckpointError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "list",
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let Some((step_name, kind, pid)) = name.to_str().and_then(parse_temp_name) else {
                continue;
            };
            if writer_alive(pid) {
                continue;
            }
            let path = entry.path();
            let final_dir = self.dir.join(step_name);
            if kind == "old" && !final_dir.exists() {
                tracing::warn!(path = %path.display(), "restoring a checkpoint whose replacement never arrived");
                fs::rename(&path, &final_dir).map_err(io_err("restore", &path))?;
            } else {
                tracing::info!(path = %path.display(), "removing leftover temporary checkpoint");
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        }
        sync_dir(&self.dir)
    }
}

/// `step-00000100` -> 100 (digits only: temporary directories do not match).
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `step-00000100.tmp-42` -> ("step-00000100", "tmp", 42); likewise `.old-`.
fn parse_temp_name(name: &str) -> Option<(&str, &str, u32)> {
    let (step_name, rest) = name.split_once('.')?;
    parse_step_name(step_name)?;
    let (kind, pid) = rest.split_once('-')?;
    if kind != "tmp" && kind != "old" {
        return None;
    }
    Some((step_name, kind, pid.parse().ok()?))
}

/// Whether another live process with this pid may still be writing. Our own pid counts as
/// dead: in a container a restarted trainer often gets the same pid as the killed one.
pub(crate) fn writer_alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc/self").exists() && Path::new(&format!("/proc/{pid}")).exists()
}

/// Safetensors views of the tensors, checked (sizes fit shapes, names unique).
fn tensor_views<'t>(
    final_dir: &Path,
    tensors: &'t [(String, TensorData)],
) -> Result<Vec<(&'t str, TensorView<'t>)>, CheckpointError> {
    let bad = |name: &str, reason: String| CheckpointError::BadTensor {
        path: final_dir.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let mut seen = HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(bad(name, "the name appears twice".into()));
        }
        let dtype = match t.dtype {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::U32 => Dtype::U32,
            DType::U8 => Dtype::U8,
        };
        let view = TensorView::new(dtype, t.shape.clone(), &t.bytes).map_err(|e| {
            bad(
                name,
                format!(
                    "{} bytes do not fit shape {:?} of {:?} ({e})",
                    t.bytes.len(),
                    t.shape,
                    t.dtype
                ),
            )
        })?;
        views.push((name.as_str(), view));
    }
    Ok(views)
}

/// Length and CRC-32 of a file, read in chunks.
fn length_and_crc(mut file: &File) -> io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Makes a directory's entries (creations, renames) durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(seed: f32) -> Vec<(String, TensorData)> {
        let w: Vec<f32> = (0..12).map(|i| seed + i as f32 * 0.37 - 1.0e-7).collect();
        let ema = [f32::NAN, -0.0, f32::INFINITY, 1.0e-40, seed];
        let bf: Vec<u8> = [1.5f32, -2.25, seed]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        vec![
            ("blocks.0.w".to_string(), TensorData::from_f32(vec![3, 4], &w)),
            ("ema.blocks.0.w".to_string(), TensorData::from_f32(vec![5], &ema)),
            (
                "adam.m".to_string(),
                TensorData {
                    shape: vec![3],
                    dtype: DType::BF16,
                    bytes: bf,
                },
            ),
            ("scalar".to_string(), TensorData::from_f32(vec![], &[seed])),
        ]
    }

    fn state(step: u64) -> Value {
        json!({"step": step, "seed": 7, "data": {"epoch": 1, "index": 42}, "lr": 1.0e-4})
    }

    fn save_steps(store: &CheckpointStore, steps: &[u64]) {
        for &s in steps {
            store.save(s, &tensors(s as f32), &state(s)).unwrap();
        }
    }

    #[test]
    fn round_trip_keeps_every_bit() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 3);
        let path = store.save(100, &tensors(1.0), &state(100)).unwrap();
        assert_eq!(path, run.path().join("checkpoints/step-00000100"));
        let loaded = store.load_latest().unwrap().unwrap();
        assert_eq!(loaded.step, 100);
        assert_eq!(loaded.path, path);
        assert_eq!(loaded.state, state(100));
        assert!(loaded.skipped.is_empty());
        let want: HashMap<String, TensorData> = tensors(1.0).into_iter().collect();
        assert_eq!(loaded.tensors, want); // byte vectors: NaN and -0.0 compare bitwise
        assert_eq!(loaded.tensors["adam.m"].to_f32_vec().unwrap(), vec![1.5, -2.25, 1.0]);
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["step-00000100"], "no temporary directory left behind");
    }

    #[test]
    fn keeps_only_the_newest_k() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 2);
        save_steps(&store, &[100, 200, 300, 400]);
        let steps: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![400, 300]);
        // Saving an older step (a resume from an older checkpoint) never prunes itself.
        save_steps(&store, &[50]);
        assert!(store.step_dir(50).is_dir());
        // keep = 0 keeps everything.
        let all = CheckpointStore::new(run.path(), 0);
        save_steps(&all, &[500, 600, 700]);
        assert_eq!(all.list().unwrap().len(), 6, "400, 300, 50 and the three new ones");
    }

    #[test]
    fn list_ignores_temp_dirs_and_stray_files() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 0);
        assert!(store.list().unwrap().is_empty(), "no directory yet");
        assert!(store.load_latest().unwrap().is_none());
        save_steps(&store, &[100, 900]);
        fs::create_dir(store.dir().join("step-00001000.tmp-12345")).unwrap();
        fs::create_dir(store.dir().join("step-00001100.old-12345")).unwrap();
        fs::write(store.dir().join("step-00002000"), b"a stray file").unwrap();
        fs::write(store.dir().join("notes.txt"), b"hello").unwrap();
        fs::create_dir(store.dir().join("step-")).unwrap();
        let steps: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![900, 100], "numeric order");
    }

    /// Each kind of damage to the newest checkpoint: load_latest falls back to the previous
    /// complete one and names the damaged one and why.
    #[test]
    fn damaged_newest_checkpoint_falls_back_to_the_previous() {
        type Damage = fn(&Path);
        let cases: [(&str, Damage, &str); 6] = [
            (
                "truncated tensors",
                |d| {
                    let p = d.join(TENSORS_FILE);
                    let bytes = fs::read(&p).unwrap();
                    fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
                },
                "truncated",
            ),
            (
                "flipped byte",
                |d| {
                    let p = d.join(TENSORS_FILE);
                    let mut bytes = fs::read(&p).unwrap();
                    let i = bytes.len() - 3;
                    bytes[i] ^= 0x10;
                    fs::write(&p, &bytes).unwrap();
                },
                "checksum",
            ),
            (
                "empty tensors",
                |d| fs::write(d.join(TENSORS_FILE), b"").unwrap(),
                "is 0 bytes",
            ),
            (
                "missing state.json",
                |d| fs::remove_file(d.join(STATE_FILE)).unwrap(),
                "state.json",
            ),
            (
                "garbled state.json",
                |d| fs::write(d.join(STATE_FILE), b"{\"format\": \"ecdit-chec").unwrap(),
                "JSON",
            ),
            (
                "missing tensors",
                |d| fs::remove_file(d.join(TENSORS_FILE)).unwrap(),
                "tensors.safetensors",
            ),
        ];
        for (what, damage, reason) in cases {
            let run = tempfile::tempdir().unwrap();
            let store = CheckpointStore::new(run.path(), 5);
            save_steps(&store, &[100, 200]);
            damage(&store.step_dir(200));
            let loaded = store
                .load_latest()
                .unwrap()
                .unwrap_or_else(|| panic!("{what}: nothing loaded"));
            assert_eq!(loaded.step, 100, "{what}");
            assert_eq!(loaded.tensors["blocks.0.w"], tensors(100.0)[0].1, "{what}");
            assert_eq!(loaded.skipped.len(), 1, "{what}");
            assert_eq!(loaded.skipped[0].0, store.step_dir(200), "{what}");
            assert!(loaded.skipped[0].1.contains(reason), "{what}: {}", loaded.skipped[0].1);
        }
    }

    #[test]
    fn half_written_temp_dir_is_ignored_and_cleaned() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 5);
        save_steps(&store, &[100]);
        // A writer killed mid-save: a temp dir with a partial tensors file and no state.json.
        let dead = store.dir().join(format!("step-00000200.tmp-{}", std::process::id()));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(TENSORS_FILE), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
        let loaded = store.load_latest().unwrap().unwrap();
        assert_eq!(loaded.step, 100);
        assert!(loaded.skipped.is_empty(), "a temp dir is not a checkpoint");
        store.clean_temp().unwrap();
        assert!(!dead.exists());
        assert!(store.step_dir(100).is_dir());
    }

    #[test]
    fn clean_temp_restores_a_checkpoint_moved_aside_by_a_dead_writer() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 5);
        save_steps(&store, &[100, 200]);
        // Killed between moving step 200 aside and renaming its replacement into place.
        let aside = store.dir().join(format!("step-00000200.old-{}", std::process::id()));
        fs::rename(store.step_dir(200), &aside).unwrap();
        store.clean_temp().unwrap();
        assert_eq!(store.load_latest().unwrap().unwrap().step, 200);
        assert!(!aside.exists());
    }

    #[test]
    fn saving_the_same_step_again_replaces_a_damaged_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 5);
        save_steps(&store, &[100, 200]);
        fs::write(store.step_dir(200).join(TENSORS_FILE), b"garbage").unwrap();
        store.save(200, &tensors(2.0), &state(200)).unwrap();
        let loaded = store.load_latest().unwrap().unwrap();
        assert_eq!((loaded.step, loaded.skipped.len()), (200, 0));
        assert_eq!(loaded.tensors["scalar"], TensorData::from_f32(vec![], &[2.0]));
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 2, "nothing left aside");
    }

    #[test]
    fn failed_save_keeps_earlier_checkpoints_readable() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 1);
        save_steps(&store, &[100]);
        // A plain file where step 200's directory must go (root ignores permissions, so
        // a read-only directory would not fail here).
        fs::write(store.step_dir(200), b"in the way").unwrap();
        let err = store.save(200, &tensors(2.0), &state(200)).unwrap_err();
        assert!(matches!(err, CheckpointError::Blocked { .. }), "{err}");
        assert!(err.to_string().contains("step-00000200"), "{err}");
        // Bad tensors fail before anything is written.
        let bad = vec![(
            "w".to_string(),
            TensorData {
                shape: vec![3],
                dtype: DType::F32,
                bytes: vec![0; 8],
            },
        )];
        let err = store.save(300, &bad, &state(300)).unwrap_err();
        assert!(err.to_string().contains("\"w\""), "{err}");
        let twice = vec![tensors(1.0)[0].clone(), tensors(1.0)[0].clone()];
        assert!(matches!(
            store.save(300, &twice, &state(300)),
            Err(CheckpointError::BadTensor { .. })
        ));
        // The checkpoints directory itself unusable: the error names it.
        let blocked_run = tempfile::tempdir().unwrap();
        fs::write(blocked_run.path().join("checkpoints"), b"").unwrap();
        let err = CheckpointStore::new(blocked_run.path(), 1)
            .save(1, &tensors(1.0), &state(1))
            .unwrap_err();
        assert!(err.to_string().contains("checkpoints"), "{err}");

        let loaded = store.load_latest().unwrap().unwrap();
        assert_eq!(loaded.step, 100);
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "only step 100 and the blocking file: {names:?}");
    }

    #[test]
    fn all_damaged_is_an_error_not_a_fresh_start() {
        let run = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(run.path(), 5);
        save_steps(&store, &[100]);
        fs::remove_file(store.step_dir(100).join(STATE_FILE)).unwrap();
        let err = store.load_latest().unwrap_err();
        assert!(
            matches!(&err, CheckpointError::NoneReadable { skipped, .. } if skipped.len() == 1),
            "{err}"
        );
        assert!(err.to_string().contains("step-00000100"), "{err}");
    }
}
