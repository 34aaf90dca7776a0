//! `ecdit train`: trains a model config (or a training config) into a run
//! directory, resumable from its checkpoints.

use anyhow::{bail, Context, Result};
use clap::Args;
use ecdit_model::train::config::{OptimizerConfig, TrainConfig};
use ecdit_model::train::run::{read_run_config, run as run_training, RunOptions};
use std::path::{Path, PathBuf};

/// Arguments of `ecdit train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training config or model config, by name or path (a model config trains
    /// with the defaults). With --resume it may be left out: the run's own.
    #[arg(long)]
    pub config: Option<String>,
    /// The run directory (checkpoints, metrics.csv, the final model).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its newest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start from this model directory's weights (a fine-tune of the same
    /// architecture, e.g. models/shapes-ec) instead of fresh ones.
    #[arg(long, value_name = "MODEL_DIR")]
    pub init_from: Option<PathBuf>,
    /// The DiT's weights and activations: f32, or bf16 (mixed precision: f32
    /// master weights, gradients, optimiser state and EMA).
    #[arg(long, value_parser = super::bench::parse_dtype)]
    pub dtype: Option<ecdit_engine::DType>,
    /// Optimiser steps in all.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Backend threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// `adamw` or `rmsprop` (with its default hyper-parameters).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Warm-up steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Fraction of image tokens dropped in training (the paper: 0.5).
    #[arg(long)]
    pub mask_ratio: Option<f32>,
    /// EMA decay of the weights.
    #[arg(long)]
    pub ema_decay: Option<f32>,
    /// Prompt dropout (the empty prompt), for classifier-free guidance.
    #[arg(long)]
    pub text_dropout: Option<f32>,
    /// Global gradient-norm clip (0: none).
    #[arg(long)]
    pub clip: Option<f32>,
    /// Seed of the weights and of every step's randomness.
    #[arg(long)]
    pub seed: Option<u64>,
    /// `shapes` or a directory of PNGs with captions.
    #[arg(long)]
    pub data: Option<String>,
    /// A checkpoint every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// A metrics row every N steps.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// The validation loss every N steps (0: never).
    #[arg(long)]
    pub val_every: Option<u64>,
    #[command(flatten)]
    pub memory: super::MemoryArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The config to train: the named one with the flags applied.
fn config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = match (&args.config, args.resume) {
        (Some(name), _) => TrainConfig::resolve(name)?,
        (None, true) => read_run_config(&args.out).context("--resume without --config")?,
        (None, false) => bail!("--config is required (a model or training config, by name or path)"),
    };
    if let Some(v) = args.steps {
        cfg.steps = v;
    }
    if let Some(v) = args.dtype {
        cfg.dtype = v;
    }
    if let Some(v) = args.batch {
        cfg.batch = v;
    }
    if let Some(kind) = &args.optimizer {
        cfg.optimizer = OptimizerConfig::defaults(kind, cfg.optimizer.lr())
            .with_context(|| format!("--optimizer {kind}: expected adamw or rmsprop"))?;
    }
    if let Some(v) = args.lr {
        cfg.optimizer = cfg.optimizer.with_lr(v);
    }
    if let Some(v) = args.warmup {
        cfg.schedule.warmup_steps = v;
    }
    if let Some(v) = args.mask_ratio {
        cfg.mask_ratio = v;
    }
    if let Some(v) = args.ema_decay {
        cfg.ema_decay = v;
    }
    if let Some(v) = args.text_dropout {
        cfg.text_dropout = Some(v);
    }
    if let Some(v) = args.clip {
        cfg.clip_grad_norm = (v > 0.0).then_some(v);
    }
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    if let Some(v) = &args.data {
        cfg.data.source = v.clone();
    }
    if let Some(v) = args.checkpoint_every {
        cfg.checkpoint_every = v;
    }
    if let Some(v) = args.keep_checkpoints {
        cfg.keep_checkpoints = v;
    }
    if let Some(v) = args.log_every {
        cfg.log_every = v;
    }
    if let Some(v) = args.val_every {
        cfg.val_every = v;
    }
    cfg.validate(None)?;
    Ok(cfg)
}

/// Runs `ecdit train`.
pub fn run(plugins: &[PathBuf], args: TrainArgs) -> Result<()> {
    let cfg = config(&args)?;
    let registry = super::registry(plugins)?;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let opts = RunOptions {
        out: args.out.clone(),
        resume: args.resume,
        max_memory: args.memory.max_memory,
        backend: serde_json::json!({"kind": "cpu", "threads": threads}),
        progress: !args.quiet,
        init_from: args.init_from.clone(),
    };
    eprintln!(
        "training '{}' ({}) for {} steps at batch {} on {} threads into {}",
        cfg.model.name,
        cfg.dtype,
        cfg.steps,
        cfg.batch,
        threads,
        display(&args.out)
    );
    let summary = run_training(cfg, &registry, &opts)?;
    println!(
        "done: step {}, last loss {:.5}, {} step(s) skipped; EMA model in {}",
        summary.steps,
        summary.last_loss,
        summary.skipped,
        summary.model_path.display()
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
