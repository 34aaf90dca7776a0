//! `ecdit export RUN_DIR -o DIR`: a training run's EMA weights (its newest
//! complete checkpoint) as a model directory that `generate`, `eval` and
//! `inspect` read, optionally stored in bf16 (half the size; sampling widens
//! them back to f32).

use anyhow::{Context, Result};
use clap::Args;
use ecdit_engine::DType;
use ecdit_model::sample::{MODEL_FILE, TEXT_ENCODER_FILE};
use ecdit_model::train::run::load_checkpoint_weights;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `ecdit export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The training run directory.
    pub run: PathBuf,
    /// The model directory to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The live weights instead of their EMA (to see what training has reached).
    #[arg(long)]
    pub live: bool,
    /// Storage dtype of the weights: f32 or bf16.
    #[arg(long, default_value = "f32", value_parser = super::bench::parse_dtype)]
    pub dtype: DType,
}

/// Runs `ecdit export`.
pub fn run(plugins: &[PathBuf], args: ExportArgs) -> Result<()> {
    let registry = super::registry(plugins)?;
    let backend: Arc<dyn ecdit_engine::Backend> =
        Arc::from(registry.backend(&serde_json::json!({"kind": "cpu", "threads": 1}))?);
    let which = if args.live { "param" } else { "ema" };
    let (mut model, encoder, step) = load_checkpoint_weights(&args.run, &registry, backend, which)?;
    model.to_dtype(args.dtype)?;
    super::create_output_dir(&args.output, "--output")?;
    model.save(args.output.join(MODEL_FILE))?;
    if let Some(enc) = encoder {
        enc.save(args.output.join(TEXT_ENCODER_FILE))?;
    }
    let train = args.run.join("run.json");
    std::fs::copy(&train, args.output.join("train.json"))
        .with_context(|| format!("cannot copy {}", train.display()))?;
    println!(
        "{}: the {} weights of step {step} of {} ({})",
        args.output.display(),
        if args.live { "live" } else { "EMA" },
        args.run.display(),
        args.dtype
    );
    Ok(())
}
