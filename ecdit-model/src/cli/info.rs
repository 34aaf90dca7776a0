//! `ecdit info`: parameters, FLOPs and memory of a model config.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `ecdit info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A config file, or a bare name found under configs/ (e.g. ec-dit-xl-32e).
    #[arg(long)]
    pub config: String,
    /// Batch size for the activation-memory estimate.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// One JSON object, for machines.
    #[arg(long)]
    pub json: bool,
}

/// Prints the report.
pub fn run(plugins: &[PathBuf], args: InfoArgs) -> Result<()> {
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let registry = super::registry(plugins)?;
    let (path, cfg) = ecdit_model::config_files::resolve_config(&args.config)?;
    let report =
        ecdit_model::info::report(&registry, &cfg, args.batch).with_context(|| format!("config {}", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
