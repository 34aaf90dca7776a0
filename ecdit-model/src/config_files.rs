//! Finding and reading model config files.
//!
//! A config is named by a path (`configs/paper/ec-dit-xl-32e.json`, anything
//! containing a path separator or ending in `.json`, or an existing file) or
//! by a bare name (`ec-dit-xl-32e`) looked up as `NAME.json` anywhere under
//! the first config directory that has it. Config directories, in order:
//! `$ECDIT_CONFIG_DIR`, `./configs`, and the `configs/` of the source tree
//! this crate was built from.

use crate::config::ModelConfig;
use ecdit_engine::EngineError;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Environment variable naming a config directory searched first.
pub const CONFIG_DIR_ENV: &str = "ECDIT_CONFIG_DIR";

/// What can go wrong finding or reading a config.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON for a `ModelConfig` (syntax, unknown or missing field).
    #[error("bad config {path}{}: {message}", position(*line, *column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0: not known).
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// serde's message.
        message: String,
    },
    /// The config parses but describes no buildable model.
    #[error("invalid config {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What `ModelConfig::validate` found (boxed: keeps the error small).
        source: Box<EngineError>,
    },
    /// No config of that name in any config directory.
    #[error("no config named '{name}' (searched {searched}){hint}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The directories searched, comma-separated.
        searched: String,
        /// `; did you mean: a, b` or empty.
        hint: String,
    },
    /// Several files of that name in one config directory.
    #[error("config name '{name}' is ambiguous: {paths}; give the path instead")]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The matching files, comma-separated.
        paths: String,
    },
}

/// ` at line L, column C`, or nothing for line 0 (no position known).
fn position(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(" at line {line}, column {column}")
    }
}

/// The config directories that exist, in search order.
pub fn config_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV) {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("configs"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("configs"));
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().ok();
        let keep = d.is_dir() && !seen.contains(&key);
        seen.push(key);
        keep
    });
    dirs
}

/// Every `*.json` under `dir` (recursively), sorted, as (name, path).
pub fn list_configs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    out.push((stem.to_string(), path));
                }
            }
        }
    }
    out.sort();
    out
}

/// Reads, parses and validates one config file.
pub fn load_config(path: &Path) -> Result<ModelConfig, ConfigError> {
    let text = crate::limits::read_text_file(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(&text, path)
}

/// Parses and validates the text of a config file; `path` names it in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig, ConfigError> {
    let cfg: ModelConfig = serde_json::from_str(text).map_err(|e| parse_error(path, text, e))?;
    cfg.validate().map_err(|source| ConfigError::Invalid {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(cfg)
}

/// A JSON error in the config file `path` of text `text`, quoting the line
/// it is on (serde names an unknown or missing field, not a mistyped one).
pub fn parse_error(path: &Path, text: &str, e: serde_json::Error) -> ConfigError {
    let quoted = match text.lines().nth(e.line().saturating_sub(1)).map(str::trim) {
        Some(line) if !line.is_empty() && e.line() > 0 => {
            let short: String = line.chars().take(80).collect();
            format!(" (the line reads `{short}`)")
        }
        _ => String::new(),
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: format!("{e}{quoted}"),
    }
}

/// Whether `s` reads as a path rather than a bare config name.
fn looks_like_path(s: &str) -> bool {
    s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) || s.ends_with(".json") || Path::new(s).is_file()
}

/// Finds a config by path or bare name and loads it.
pub fn resolve_config(name_or_path: &str) -> Result<(PathBuf, ModelConfig), ConfigError> {
    resolve_config_in(name_or_path, &config_dirs())
}

/// [`resolve_config`] over the given directories.
pub fn resolve_config_in(name_or_path: &str, dirs: &[PathBuf]) -> Result<(PathBuf, ModelConfig), ConfigError> {
    if looks_like_path(name_or_path) {
        let path = PathBuf::from(name_or_path);
        let cfg = load_config(&path)?;
        return Ok((path, cfg));
    }
    let mut known = Vec::new();
    for dir in dirs {
        let all = list_configs(dir);
        let hits: Vec<&PathBuf> = all.iter().filter(|(n, _)| n == name_or_path).map(|(_, p)| p).collect();
        match hits.as_slice() {
            [] => known.extend(all.into_iter().map(|(n, _)| n)),
            [path] => {
                let path = (*path).clone();
                let cfg = load_config(&path)?;
                return Ok((path, cfg));
            }
            many => {
                return Err(ConfigError::Ambiguous {
                    name: name_or_path.to_string(),
                    paths: many
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        }
    }
    Err(ConfigError::NotFound {
        name: name_or_path.to_string(),
        searched: if dirs.is_empty() {
            "no config directory exists".into()
        } else {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        hint: close_names(name_or_path, &known),
    })
}

/// `; did you mean: a, b` for up to five names within a small edit distance
/// of `name` (or containing it), closest first; empty when none is close.
fn close_names(name: &str, known: &[String]) -> String {
    let mut scored: Vec<(usize, &String)> = known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(dist, k)| *dist <= 3.max(name.len() / 3) || k.contains(name))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    if scored.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = scored.iter().take(5).map(|(_, k)| k.as_str()).collect();
    format!("; did you mean: {}", names.join(", "))
}
