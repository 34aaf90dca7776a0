//! Command-line parsing and dispatch for `ecdit`.

mod bench;
mod components;
mod data;
mod eval;
mod export;
mod generate;
mod info;
mod inspect;
mod plot;
mod train;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ecdit_engine::Registry;
use std::path::{Path, PathBuf};

/// ecdit: a Mixture-of-Experts diffusion transformer engine with expert-choice routing.
#[derive(Parser, Debug)]
#[command(name = "ecdit", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Load a plugin library (repeatable). ECDIT_PLUGIN_PATH names directories scanned too.
    #[arg(long, global = true, value_name = "PATH")]
    pub plugin: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every registered component with its parameters and defaults.
    Components(components::ComponentsArgs),
    /// Benchmarks: gemm, moe, forward, train.
    Bench(bench::BenchArgs),
    /// Parameters, FLOPs and memory of a model config.
    Info(info::InfoArgs),
    /// The training data: preview samples.
    Data(data::DataArgs),
    /// Plot training runs: loss and routing statistics.
    Plot(plot::PlotArgs),
    /// Train a model on the built-in data world (or a folder of captioned PNGs).
    Train(train::TrainArgs),
    /// Draw images from a prompt with a trained model (the bundled one by default).
    Generate(generate::GenerateArgs),
    /// Where the experts spend their compute for a prompt: heat maps per layer and step.
    Inspect(inspect::InspectArgs),
    /// GenEval on the shapes world: accuracy per tag and overall.
    Eval(eval::EvalArgs),
    /// A training run's EMA weights as a model directory.
    Export(export::ExportArgs),
}

/// The memory limit of the commands that build a model (train, generate,
/// eval, inspect).
#[derive(Args, Debug, Clone, Copy)]
pub struct MemoryArgs {
    /// Refuse a model whose estimated memory (weights, activations and, in
    /// training, optimiser state) exceeds this, e.g. 8G or 512M; checked
    /// before anything is allocated. Default: 90% of the memory available now.
    #[arg(long, value_name = "SIZE", value_parser = ecdit_model::limits::parse_size)]
    pub max_memory: Option<u64>,
}

/// Refuses an output directory `dir` (named by `flag` in errors) that a file
/// is in the way of, saying which; checked before any work is spent.
pub fn check_output_dir(dir: &Path, flag: &str) -> Result<()> {
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        bail!(
            "{flag} {}: {} is a file, not a directory",
            dir.display(),
            file.display()
        );
    }
    Ok(())
}

/// Creates the output directory `dir` (see [`check_output_dir`]).
pub fn create_output_dir(dir: &Path, flag: &str) -> Result<()> {
    check_output_dir(dir, flag)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{flag} {}: cannot create the directory", dir.display()))
}

/// Refuses an output file `path` that is a directory, or whose directory a
/// file is in the way of, or (without `create`) does not exist; with
/// `create`, makes its directory.
pub fn check_output_file(path: &Path, flag: &str, create: bool) -> Result<()> {
    if path.is_dir() {
        bail!("{flag} {}: is a directory, not a file", path.display());
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if create => create_output_dir(dir, flag),
        Some(dir) => {
            check_output_dir(dir, flag)?;
            if !dir.is_dir() {
                bail!(
                    "{flag} {}: the directory {} does not exist",
                    path.display(),
                    dir.display()
                );
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// Sets up tracing to stderr.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The shipped registry plus every plugin asked for.
pub fn registry(plugins: &[PathBuf]) -> Result<Registry> {
    let mut registry = ecdit_model::registry()?;
    // Directories in ECDIT_PLUGIN_PATH: a bad library there is reported, not fatal.
    for (path, result) in ecdit_engine::plugin::load_env_path(&mut registry) {
        match result {
            Ok(info) => tracing::info!(plugin = %info.name, path = %path.display(), "loaded plugin"),
            Err(e) => tracing::warn!(path = %path.display(), "skipped plugin: {e}"),
        }
    }
    // Libraries named on the command line must load.
    for path in plugins {
        let info = registry
            .load_plugin(path)
            .with_context(|| format!("--plugin {}", path.display()))?;
        tracing::info!(plugin = %info.name, version = %info.version, "loaded plugin");
    }
    Ok(registry)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Components(args) => components::run(&cli.plugin, args),
        Command::Bench(args) => bench::run(&cli.plugin, args),
        Command::Info(args) => info::run(&cli.plugin, args),
        Command::Data(args) => data::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Train(args) => train::run(&cli.plugin, args),
        Command::Generate(args) => generate::run(&cli.plugin, args),
        Command::Inspect(args) => inspect::run(&cli.plugin, args),
        Command::Eval(args) => eval::run(&cli.plugin, args),
        Command::Export(args) => export::run(&cli.plugin, args),
    }
}
