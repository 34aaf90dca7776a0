//! Resource limits: what may be read from a file and what a model may
//! allocate, checked before anything is read whole or allocated.
//!
//! - Memory: [`training_estimate`] and [`inference_estimate`] work out what a
//!   config needs from its shapes alone; [`check_memory`] refuses it when that
//!   is over the limit: `--max-memory` ([`parse_size`]), or by default
//!   [`default_limit`], a share of the memory the machine has available.
//! - Files: text files (configs, `run.json`, checkpoint `state.json`,
//!   vocabularies, prompt files, captions) are read whole only up to
//!   [`MAX_TEXT_FILE`] ([`read_text_file`]); a safetensors header is parsed
//!   only up to [`MAX_HEADER`] ([`check_safetensors_header`]).
//! - Shapes: a model config's sizes are bounded ([`MAX_SIZE`], [`MAX_DEPTH`],
//!   checked by `ModelConfig::validate`) so that no shape product overflows
//!   and listing a config's tensors stays cheap; the memory check does the rest.

use crate::config::{Conditioning, ModelConfig};
use crate::info;
use crate::text::{param_shapes as text_param_shapes, Tokenizer};
use crate::train::config::TrainConfig;
use ecdit_engine::{EngineError, Registry};
use std::fmt;
use std::io::Read;
use std::path::Path;

/// The largest text file read whole: 16 MiB. The biggest legitimate ones (a
/// vocabulary of a quarter million tokens, a prompt file of GenEval's size
/// many times over) are a few MiB; anything bigger is the wrong file.
pub const MAX_TEXT_FILE: u64 = 16 << 20;

/// The largest safetensors header parsed: 16 MiB. A checkpoint of the
/// paper's largest config (four tensors per parameter) has a header well
/// under 1 MiB; the safetensors crate's own bound is 100 MB.
pub const MAX_HEADER: u64 = 16 << 20;

/// The largest width-like size of a model config (`hidden`, `input_size`,
/// `heads`, `experts`, `text_dim`, `max_tokens`, `num_classes`, MLP widths):
/// 2^20. Products of a few of them stay within 64 bits.
pub const MAX_SIZE: usize = 1 << 20;

/// The most blocks of a model or its text encoder: 4096. Listing a config's
/// tensors (done before anything is allocated) costs a few entries a block.
pub const MAX_DEPTH: usize = 4096;

/// The share of the available memory a run may plan to use when no
/// `--max-memory` is given.
pub const DEFAULT_SHARE: f64 = 0.9;

/// Reads a text file whole, refusing one over [`MAX_TEXT_FILE`] before
/// reading it (and one that grows past it while read, such as a device).
pub fn read_text_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let too_big = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the file is {}, more than the {} a text file read whole may be",
                format_bytes(len),
                format_bytes(MAX_TEXT_FILE)
            ),
        )
    };
    let len = file.metadata()?.len();
    if len > MAX_TEXT_FILE {
        return Err(too_big(len));
    }
    let mut text = String::new();
    file.take(MAX_TEXT_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(too_big(text.len() as u64));
    }
    Ok(text)
}

/// Checks the 8-byte header length of safetensors `bytes` against the file
/// and [`MAX_HEADER`] before the header is parsed; the error says what is wrong.
pub fn check_safetensors_header(bytes: &[u8]) -> Result<(), String> {
    let Some(len) = bytes.get(..8) else {
        return Err(format!(
            "the file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        ));
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(len);
    let header = u64::from_le_bytes(le);
    let rest = bytes.len() as u64 - 8;
    if header > MAX_HEADER {
        return Err(format!(
            "the header claims {header} bytes, more than the limit of {} (not a safetensors file, or a damaged one)",
            format_bytes(MAX_HEADER)
        ));
    }
    if header > rest {
        return Err(format!(
            "the header claims {header} bytes but only {rest} follow the length: truncated?"
        ));
    }
    Ok(())
}

/// The memory a model needs, estimated from its config before anything is allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Parameters (model and text encoder), f32.
    pub weights: u64,
    /// Training only: gradients, optimiser state (two tensors) and the EMA, 4x the weights.
    pub training_state: u64,
    /// Activations (kept for the backward when training) and the backward's buffers.
    pub activations: u64,
}

impl MemoryEstimate {
    /// Everything.
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.training_state)
            .saturating_add(self.activations)
    }
}

/// Elements of all the tensors of a list (saturating: a config with absurd
/// sizes gets an absurd estimate, never an overflow).
fn numel(shapes: &[(String, Vec<usize>)]) -> u64 {
    shapes
        .iter()
        .map(|(_, s)| s.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64)))
        .fold(0u64, u64::saturating_add)
}

/// Every trained tensor of a model and its text encoder by upstream name and
/// shape (the fixed `pos_embed` left out; the encoder's vocabulary is read),
/// the config validated first: what a weights file or checkpoint must hold.
pub fn trainable_shapes(config: &ModelConfig, registry: &Registry) -> Result<Vec<(String, Vec<usize>)>, EngineError> {
    config.validate()?;
    let mut shapes = info::param_shapes_with(registry, config)?;
    shapes.retain(|(name, _)| !info::FIXED_PARAMS.contains(&name.as_str()));
    if let Conditioning::Text {
        text_dim, max_tokens, ..
    } = config.conditioning
    {
        let cfg = config.text_encoder.clone().unwrap_or_default();
        let vocab = Tokenizer::new(cfg.load_vocab()?, max_tokens)?.vocab().len();
        shapes.extend(text_param_shapes(&cfg, vocab, text_dim, max_tokens));
    }
    Ok(shapes)
}

/// Parameters of a model (`pos_embed` included) and its text encoder.
fn params(config: &ModelConfig, registry: &Registry) -> Result<u64, EngineError> {
    let trained = numel(&trainable_shapes(config, registry)?); // validates first
    let fixed = (config.tokens() as u64).saturating_mul(config.hidden as u64);
    Ok(trained.saturating_add(fixed))
}

/// What training `config` needs (f32 storage).
pub fn training_estimate(config: &TrainConfig, registry: &Registry) -> Result<MemoryEstimate, EngineError> {
    let params = params(&config.model, registry)?;
    let kept = 1.0 - config.mask_ratio as f64;
    let acts = info::activation_memory(registry, &config.model, config.batch)?;
    // The backward's shared buffers and what the backend's buffer pool keeps
    // between calls add about a fifth (measured on ec-s-8e at batch 32).
    let activations = (acts.training_bytes as f64 * kept * 1.2) as u64;
    Ok(MemoryEstimate {
        weights: params.saturating_mul(4),
        training_state: params.saturating_mul(16),
        activations,
    })
}

/// What sampling `config` needs for `batch` model inputs at once (classifier-free
/// guidance runs two per image), weights widened to f32.
pub fn inference_estimate(
    config: &ModelConfig,
    registry: &Registry,
    batch: usize,
) -> Result<MemoryEstimate, EngineError> {
    let params = params(config, registry)?;
    let acts = info::activation_memory(registry, config, batch)?;
    Ok(MemoryEstimate {
        weights: params.saturating_mul(4),
        training_state: 0,
        activations: acts.inference_bytes,
    })
}

/// The default memory limit: [`DEFAULT_SHARE`] of `MemAvailable` in
/// /proc/meminfo; None where that cannot be read (not Linux): no limit.
///
/// `MemAvailable` rather than `MemTotal`: it is the kernel's estimate of what
/// can be allocated now without swapping (free memory plus reclaimable
/// caches), so it leaves out what other processes (another training run)
/// already hold. A limit from `MemTotal` would admit a run that then gets
/// itself, or another process, killed for memory. The margin covers the
/// estimate's error and the allocator's overhead.
pub fn default_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib as f64 * 1024.0 * DEFAULT_SHARE) as u64)
}

/// A config refused for memory: what needs how much, and the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverLimit {
    /// What was estimated, e.g. "model 'x' at batch 8".
    pub what: String,
    /// The estimate.
    pub estimate: MemoryEstimate,
    /// The limit in bytes.
    pub limit: u64,
    /// Whether the limit was the default (not `--max-memory`).
    pub default_limit: bool,
    /// What to change, e.g. "lower --batch or raise --max-memory".
    pub advice: String,
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.estimate;
        write!(
            f,
            "{} needs about {} (weights {}",
            self.what,
            format_bytes(e.total()),
            format_bytes(e.weights)
        )?;
        if e.training_state > 0 {
            write!(f, ", gradients + optimiser + EMA {}", format_bytes(e.training_state))?;
        }
        write!(
            f,
            ", activations {}), more than the limit of {}{}; {}",
            format_bytes(e.activations),
            format_bytes(self.limit),
            if self.default_limit {
                format!(" ({:.0}% of the memory available now)", DEFAULT_SHARE * 100.0)
            } else {
                " (--max-memory)".to_string()
            },
            self.advice
        )
    }
}

impl std::error::Error for OverLimit {}

/// Refuses `estimate` when it is over `max_memory` (bytes), or with None over
/// [`default_limit`] (no check where the machine's memory is unknown).
pub fn check_memory(
    what: impl Into<String>,
    estimate: MemoryEstimate,
    max_memory: Option<u64>,
    advice: &str,
) -> Result<(), OverLimit> {
    let (limit, default_limit) = match max_memory {
        Some(limit) => (limit, false),
        None => match default_limit() {
            Some(limit) => (limit, true),
            None => return Ok(()),
        },
    };
    if estimate.total() <= limit {
        return Ok(());
    }
    Err(OverLimit {
        what: what.into(),
        estimate,
        limit,
        default_limit,
        advice: advice.to_string(),
    })
}

/// A size as `--max-memory` takes it: `8G`, `512M`, `1.5GiB`, `100K` or plain
/// bytes; positive, finite and below 16 EiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let value: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 8G, 512M)"))?;
    let scale = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}' (K, M, G, T)")),
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("'{s}' is not a positive size"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(format!("'{s}' is too large"));
    }
    Ok(bytes as u64)
}

/// Bytes for people: `512 B`, `1.50 KiB`, `3.20 MiB`, `12.00 GiB`, ... `16.00 EiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("8Q").unwrap_err().contains("8Q"));
        assert!(parse_size("12XB").unwrap_err().contains("'X'"));
        assert!(parse_size("lots").is_err());
        for bad in ["-1G", "0", "0.1", "NaN", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn bytes_read_in_the_unit_that_fits() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.00 EiB");
    }

    #[test]
    fn headers_over_the_limit_or_the_file_are_refused() {
        let mut bytes = 10u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(check_safetensors_header(&bytes).unwrap_err().contains("truncated"));
        let huge = (MAX_HEADER + 1).to_le_bytes();
        assert!(check_safetensors_header(&huge).unwrap_err().contains("limit"));
        assert!(check_safetensors_header(b"abc").unwrap_err().contains("8-byte"));
        let mut ok = 2u64.to_le_bytes().to_vec();
        ok.extend_from_slice(b"{}");
        assert!(check_safetensors_header(&ok).is_ok());
    }

    #[test]
    fn text_files_over_the_cap_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_TEXT_FILE + 1).unwrap(); // sparse: costs no disk
        let e = read_text_file(&path).unwrap_err().to_string();
        assert!(e.contains("16.00 MiB"), "{e}");
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(read_text_file(&path).unwrap(), "{}");
    }
}
