//! The training config: the model, the data, the optimiser and its schedule,
//! checkpoints and logging, one JSON file (`configs/train/*.json`). A bare
//! model config trains with the defaults below. Flags override fields.

use crate::config::ModelConfig;
use crate::config_files::{config_dirs, list_configs, load_config, parse_error, resolve_config, ConfigError};
use ecdit_engine::{AdamW, DType, RmsProp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The optimiser and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// AdamW (DiT's choice: lr 1e-4, no weight decay).
    Adamw {
        /// Peak learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "beta2")]
        beta2: f32,
        /// Denominator epsilon.
        #[serde(default = "adam_eps")]
        eps: f32,
        /// Decoupled weight decay.
        #[serde(default)]
        weight_decay: f32,
    },
    /// RMSProp with momentum (the paper's choice).
    Rmsprop {
        /// Peak learning rate.
        lr: f32,
        /// Decay of the squared-gradient average.
        #[serde(default = "alpha")]
        alpha: f32,
        /// Denominator epsilon.
        #[serde(default = "rms_eps")]
        eps: f32,
        /// Momentum.
        #[serde(default = "momentum")]
        momentum: f32,
        /// Decoupled weight decay.
        #[serde(default)]
        weight_decay: f32,
    },
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn adam_eps() -> f32 {
    1e-8
}
fn alpha() -> f32 {
    0.99
}
fn rms_eps() -> f32 {
    1e-8
}
fn momentum() -> f32 {
    0.9
}

impl OptimizerConfig {
    /// The peak learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            OptimizerConfig::Adamw { lr, .. } | OptimizerConfig::Rmsprop { lr, .. } => lr,
        }
    }

    /// The same with another peak learning rate.
    pub fn with_lr(mut self, new: f32) -> Self {
        match &mut self {
            OptimizerConfig::Adamw { lr, .. } | OptimizerConfig::Rmsprop { lr, .. } => *lr = new,
        }
        self
    }

    /// The defaults of `kind` (`adamw` or `rmsprop`) at learning rate `lr`.
    pub fn defaults(kind: &str, lr: f32) -> Option<Self> {
        match kind {
            "adamw" => Some(OptimizerConfig::Adamw {
                lr,
                beta1: beta1(),
                beta2: beta2(),
                eps: adam_eps(),
                weight_decay: 0.0,
            }),
            "rmsprop" => Some(OptimizerConfig::Rmsprop {
                lr,
                alpha: alpha(),
                eps: rms_eps(),
                momentum: momentum(),
                weight_decay: 0.0,
            }),
            _ => None,
        }
    }

    /// One step's hyper-parameters at learning rate `lr`.
    pub fn at(&self, lr: f32) -> OptimizerStep {
        match *self {
            OptimizerConfig::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => OptimizerStep::Adamw(AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            }),
            OptimizerConfig::Rmsprop {
                alpha,
                eps,
                momentum,
                weight_decay,
                ..
            } => OptimizerStep::Rmsprop(RmsProp {
                lr,
                alpha,
                eps,
                momentum,
                weight_decay,
            }),
        }
    }
}

/// One optimiser step's hyper-parameters (the backend op's arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerStep {
    /// `Backend::adamw_step`.
    Adamw(AdamW),
    /// `Backend::rmsprop_step`.
    Rmsprop(RmsProp),
}

/// How the learning rate decays after the warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Constant after the warm-up.
    #[default]
    Constant,
    /// Cosine from the peak down to `min_lr_ratio * lr` at the last step.
    Cosine,
    /// Linear from the peak down to `min_lr_ratio * lr` at the last step.
    Linear,
}

/// The learning-rate schedule: linear warm-up, then the decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Steps of linear warm-up from 0 to the peak.
    #[serde(default)]
    pub warmup_steps: u64,
    /// The decay after the warm-up.
    #[serde(default)]
    pub decay: Decay,
    /// Where the decay ends, as a fraction of the peak.
    #[serde(default)]
    pub min_lr_ratio: f32,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            warmup_steps: 0,
            decay: Decay::Constant,
            min_lr_ratio: 0.0,
        }
    }
}

impl Schedule {
    /// The learning rate of step `step` (1-based) of `total`, peak `lr`.
    pub fn lr(&self, lr: f32, step: u64, total: u64) -> f32 {
        if step <= self.warmup_steps {
            return lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.min_lr_ratio as f64;
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - (1.0 - floor) * progress,
            Decay::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        (lr as f64 * factor) as f32
    }
}

/// Where the images come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `shapes` (the built-in world) or a directory of captioned PNGs.
    #[serde(default = "shapes")]
    pub source: String,
    /// Seed of the built-in world.
    #[serde(default)]
    pub seed: u64,
}

fn shapes() -> String {
    "shapes".into()
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: shapes(),
            seed: 0,
        }
    }
}

/// Everything a training run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model (a name or path of a model config in the file; resolved here).
    pub model: ModelConfig,
    /// The data.
    #[serde(default)]
    pub data: DataConfig,
    /// Optimiser steps in all.
    #[serde(default = "steps")]
    pub steps: u64,
    /// Images per step.
    #[serde(default = "batch")]
    pub batch: usize,
    /// Seed of the weights, the noise, the timesteps, the dropout and the masking.
    #[serde(default)]
    pub seed: u64,
    /// The optimiser.
    #[serde(default = "optimizer")]
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// Gradients whose global norm exceeds this are scaled down to it (None: never).
    #[serde(default = "clip")]
    pub clip_grad_norm: Option<f32>,
    /// Decay of the EMA of the weights.
    #[serde(default = "ema_decay")]
    pub ema_decay: f32,
    /// Fraction of prompts replaced by the empty prompt (labels by the null
    /// class); None: the model config's conditioning dropout.
    #[serde(default)]
    pub text_dropout: Option<f32>,
    /// Fraction of image tokens dropped before the first block (the paper: 0.5).
    #[serde(default)]
    pub mask_ratio: f32,
    /// A checkpoint every this many steps (and at the end).
    #[serde(default = "checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    #[serde(default = "keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// A metrics row every this many steps.
    #[serde(default = "log_every")]
    pub log_every: u64,
    /// The validation loss (a fixed held-out batch) every this many steps (0: never).
    #[serde(default = "val_every")]
    pub val_every: u64,
    /// Training stops after this many non-finite steps in a row.
    #[serde(default = "max_bad_steps")]
    pub max_bad_steps: u64,
    /// The DiT's weights and activations in the forward and backward: `f32`,
    /// or `bf16` (mixed precision: f32 master weights, gradients, optimiser
    /// state and EMA; the text encoder stays f32).
    #[serde(default = "f32_dtype", with = "dtype_name")]
    pub dtype: DType,
}

fn f32_dtype() -> DType {
    DType::F32
}

/// A float dtype in a config file, by name (`"f32"`, `"bf16"`).
mod dtype_name {
    use ecdit_engine::DType;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dtype: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dtype.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::parse_float(&name).ok_or_else(|| D::Error::custom(format!("'{name}' is not a dtype: f32 or bf16")))
    }
}

fn steps() -> u64 {
    1000
}
fn batch() -> usize {
    32
}
fn optimizer() -> OptimizerConfig {
    OptimizerConfig::defaults("adamw", 1e-4).expect("adamw")
}
fn clip() -> Option<f32> {
    Some(1.0)
}
fn ema_decay() -> f32 {
    0.9999
}
fn checkpoint_every() -> u64 {
    500
}
fn keep_checkpoints() -> usize {
    3
}
fn log_every() -> u64 {
    10
}
fn val_every() -> u64 {
    100
}
fn max_bad_steps() -> u64 {
    5
}

/// A field of the training config is out of range.
#[derive(Debug, thiserror::Error)]
pub enum TrainConfigError {
    /// Reading or parsing the file, or its model config.
    #[error(transparent)]
    File(#[from] ConfigError),
    /// A field is out of range.
    #[error("training config{}: {field} = {value}: {reason}", origin.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Field {
        /// The file, when there is one.
        origin: Option<PathBuf>,
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

impl TrainConfig {
    /// The defaults around `model`.
    pub fn for_model(model: ModelConfig) -> Self {
        let json = serde_json::json!({ "model": model });
        serde_json::from_value(json).expect("defaults deserialize")
    }

    /// A training config by path or name (searched like model configs): a
    /// file with a `model` field (a model config inline, or its name or
    /// path), or a model config, trained with the defaults.
    pub fn resolve(name_or_path: &str) -> Result<Self, TrainConfigError> {
        let path = find(name_or_path)?;
        let text = crate::limits::read_text_file(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let mut value: Value = serde_json::from_str(&text).map_err(|e| parse_error(&path, &text, e))?;
        let Some(model) = value.get("model").cloned() else {
            // A model config: the default training around it.
            return Ok(Self::for_model(load_config(&path)?));
        };
        let config: Self = if let Value::String(name) = model {
            let (_, config) = resolve_config(&name)?;
            value["model"] = serde_json::to_value(config).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                line: 0,
                column: 0,
                message: format!("model '{name}': {e}"),
            })?;
            // serde's errors from a Value have no position: name the field
            // that fails on its own beside the model.
            serde_json::from_value(value.clone()).map_err(|e| {
                let field = value.as_object().and_then(|map| {
                    map.iter().filter(|(k, _)| k.as_str() != "model").find_map(|(k, v)| {
                        let one = serde_json::json!({ "model": value["model"], k.as_str(): v });
                        serde_json::from_value::<Self>(one).is_err().then(|| k.clone())
                    })
                });
                ConfigError::Parse {
                    path: path.clone(),
                    line: 0,
                    column: 0,
                    message: match field {
                        Some(field) => format!("field '{field}': {e}"),
                        None => e.to_string(),
                    },
                }
            })?
        } else {
            serde_json::from_str(&text).map_err(|e| parse_error(&path, &text, e))?
        };
        config.model.validate().map_err(|source| ConfigError::Invalid {
            path: path.clone(),
            source: Box::new(source),
        })?;
        config.validate(Some(&path))?;
        Ok(config)
    }

    /// Checks every field's range; the error names the field and the file.
    pub fn validate(&self, origin: Option<&Path>) -> Result<(), TrainConfigError> {
        let bad = |field: &'static str, value: String, reason: &str| TrainConfigError::Field {
            origin: origin.map(Path::to_path_buf),
            field,
            value,
            reason: reason.into(),
        };
        let lr = self.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return Err(bad("optimizer.lr", lr.to_string(), "must be a positive number"));
        }
        if self.steps == 0 {
            return Err(bad("steps", "0".into(), "must be at least 1"));
        }
        if self.batch == 0 {
            return Err(bad("batch", "0".into(), "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.mask_ratio) {
            return Err(bad("mask_ratio", self.mask_ratio.to_string(), "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return Err(bad("ema_decay", self.ema_decay.to_string(), "must be in [0, 1]"));
        }
        if let Some(p) = self.text_dropout {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad("text_dropout", p.to_string(), "must be in [0, 1]"));
            }
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(bad(
                    "clip_grad_norm",
                    c.to_string(),
                    "must be positive (or null: no clipping)",
                ));
            }
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            return Err(bad("checkpoint_every / log_every", "0".into(), "must be at least 1"));
        }
        if self.keep_checkpoints == 0 {
            return Err(bad("keep_checkpoints", "0".into(), "must keep at least one"));
        }
        if self.max_bad_steps == 0 {
            return Err(bad("max_bad_steps", "0".into(), "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            let value = self.schedule.min_lr_ratio.to_string();
            return Err(bad("schedule.min_lr_ratio", value, "must be in [0, 1]"));
        }
        Ok(())
    }

    /// The prompt (label) dropout in effect.
    pub fn dropout(&self) -> f32 {
        use crate::config::Conditioning;
        self.text_dropout.unwrap_or(match self.model.conditioning {
            Conditioning::Class { dropout, .. } | Conditioning::Text { dropout, .. } => dropout,
        })
    }

    /// Why a run of `self` cannot continue a run of `saved` (None: it can).
    /// The model, the data, the batch, the seed and the masking must agree
    /// (they decide the weights' shapes and which data each step sees).
    pub fn incompatible_with(&self, saved: &TrainConfig) -> Option<String> {
        let differs = |what: &str, a: String, b: String| Some(format!("{what} differs: run has {b}, asked for {a}"));
        if self.model != saved.model {
            return differs("the model config", self.model.name.clone(), saved.model.name.clone());
        }
        if self.data != saved.data {
            return differs("the data", format!("{:?}", self.data), format!("{:?}", saved.data));
        }
        if self.batch != saved.batch {
            return differs("the batch", self.batch.to_string(), saved.batch.to_string());
        }
        if self.seed != saved.seed {
            return differs("the seed", self.seed.to_string(), saved.seed.to_string());
        }
        if self.mask_ratio != saved.mask_ratio {
            return differs("mask_ratio", self.mask_ratio.to_string(), saved.mask_ratio.to_string());
        }
        None
    }
}

/// The file of a config given by path or bare name.
fn find(name_or_path: &str) -> Result<PathBuf, ConfigError> {
    let path = Path::new(name_or_path);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let mut found = Vec::new();
    for dir in config_dirs() {
        found.extend(
            list_configs(&dir)
                .into_iter()
                .filter(|(name, _)| name == name_or_path)
                .map(|(_, p)| p),
        );
    }
    match found.len() {
        0 => resolve_config(name_or_path).map(|(p, _)| p),
        1 => Ok(found.remove(0)),
        _ => Err(ConfigError::Ambiguous {
            name: name_or_path.into(),
            paths: found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            warmup_steps: 10,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
        };
        assert_eq!(s.lr(1.0, 5, 110), 0.5);
        assert_eq!(s.lr(1.0, 10, 110), 1.0);
        assert!(
            (s.lr(1.0, 60, 110) - 0.55).abs() < 1e-6,
            "half-way is the mean of peak and floor"
        );
        assert!((s.lr(1.0, 110, 110) - 0.1).abs() < 1e-6);
        let linear = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((linear.lr(2.0, 60, 110) - 1.1).abs() < 1e-6);
        assert_eq!(Schedule::default().lr(3.0, 50, 100), 3.0);
    }

    #[test]
    fn a_model_config_trains_with_defaults_and_bad_fields_are_named() {
        let cfg = TrainConfig::resolve("tiny-ec").expect("tiny-ec");
        assert_eq!(cfg.model.name, "tiny-ec");
        assert_eq!((cfg.batch, cfg.optimizer.lr()), (32, 1e-4));
        assert_eq!(cfg.dropout(), 0.1, "the model's conditioning dropout");
        let mut bad = cfg.clone();
        bad.mask_ratio = 1.0;
        let e = bad.validate(Some(Path::new("x.json"))).unwrap_err().to_string();
        assert!(e.contains("mask_ratio") && e.contains("x.json"), "{e}");
        let mut other = cfg.clone();
        other.batch = 8;
        assert!(other.incompatible_with(&cfg).unwrap().contains("batch"));
        assert!(cfg.incompatible_with(&cfg).is_none());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"model": "tiny-ec", "stpes": 3}"#).unwrap();
        let e = TrainConfig::resolve(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("stpes") && e.contains("t.json"), "{e}");
    }
}
