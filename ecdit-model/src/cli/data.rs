//! `ecdit data`: look at the training data (a preview grid, or captions with their tags).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ecdit_model::data::{self, ShapesConfig, ShapesWorld};
use std::path::PathBuf;

/// Arguments of `ecdit data`.
#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// What to show.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write a grid of samples with their captions to a PNG and print its path.
    Preview(PreviewArgs),
    /// Print captions with their GenEval tags (shapes world; "-" for a folder).
    Captions(CaptionsArgs),
}

/// Which samples.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// "shapes" (the built-in world) or a directory of PNGs with .txt captions.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the shapes world.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Index of the first sample.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
}

/// Arguments of `ecdit data preview`.
#[derive(Args, Debug)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Number of samples.
    #[arg(short = 'n', long = "count", default_value_t = 16)]
    pub n: usize,
    /// Output PNG.
    #[arg(short, long, default_value = "grid.png")]
    pub output: PathBuf,
    /// Upscaling of each image (nearest neighbour).
    #[arg(long, default_value_t = 4)]
    pub scale: usize,
    /// Images a row (default: a square-ish grid).
    #[arg(long)]
    pub columns: Option<usize>,
}

/// Arguments of `ecdit data captions`.
#[derive(Args, Debug)]
pub struct CaptionsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Number of samples.
    #[arg(short = 'n', long = "count", default_value_t = 20)]
    pub n: usize,
}

/// Runs `ecdit data`.
pub fn run(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Preview(a) => preview(a),
        DataCommand::Captions(a) => captions(a),
    }
}

fn preview(args: PreviewArgs) -> Result<()> {
    let s = &args.source;
    if args.n == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    let dataset = data::open(&s.data, s.seed, s.size).with_context(|| format!("--data {}", s.data))?;
    super::check_output_file(&args.output, "--output", true)?;
    let batch = dataset.batch(s.start, args.n)?;
    let per_image = batch.channels * batch.size * batch.size;
    let images: Vec<Vec<f32>> = batch.images.chunks(per_image.max(1)).map(<[f32]>::to_vec).collect();
    let columns = args
        .columns
        .unwrap_or_else(|| (1..=args.n.max(1)).find(|c| c * c >= args.n).unwrap_or(1));
    data::write_grid(&args.output, &images, batch.size, &batch.captions, columns, args.scale)?;
    tracing::info!(data = %dataset.describe(), n = args.n, "wrote preview");
    println!("{}", args.output.display());
    Ok(())
}

fn captions(args: CaptionsArgs) -> Result<()> {
    let s = &args.source;
    // The shapes world knows each sample's tag; a folder only has captions.
    if s.data.is_empty() || s.data == "shapes" {
        let world = ShapesWorld::new(ShapesConfig {
            seed: s.seed,
            size: s.size,
        })?;
        for i in s.start..s.start.saturating_add(args.n as u64) {
            let scene = world.draw_scene(i);
            println!("{i}\t{}\t{}", scene.tag.name(), scene.caption);
        }
    } else {
        let dataset = data::open(&s.data, s.seed, s.size).with_context(|| format!("--data {}", s.data))?;
        let batch = dataset.batch(s.start, args.n)?;
        for (i, caption) in (s.start..).zip(&batch.captions) {
            println!("{i}\t-\t{caption}");
        }
    }
    Ok(())
}
