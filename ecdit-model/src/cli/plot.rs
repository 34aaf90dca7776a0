//! `ecdit plot`: PNG plots of training runs' metrics.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `ecdit plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories, each holding a metrics.csv (one colour per run).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Where loss.png, grad_norm.png, lr.png and routing.png go (default: the first DIR).
    #[arg(short, long, value_name = "OUT_DIR")]
    pub out: Option<PathBuf>,
}

/// Writes the plots and prints their paths.
pub fn run(args: PlotArgs) -> Result<()> {
    let out = match (&args.out, args.dirs.first()) {
        (Some(out), _) => out.clone(),
        (None, Some(first)) => first.clone(),
        (None, None) => anyhow::bail!("name at least one run directory"),
    };
    for path in ecdit_model::plot::plot_runs(&args.dirs, &out)? {
        println!("{}", path.display());
    }
    Ok(())
}
