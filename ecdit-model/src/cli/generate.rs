//! `ecdit generate "PROMPT"`: images from a trained model (the bundled one by
//! default), as one PNG (a grid for n > 1).

use anyhow::{bail, Context, Result};
use clap::Args;
use ecdit_model::data::write_grid;
use ecdit_model::sample::{Generator, LoadOptions, SampleOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The bundled model's directory, relative to the repository root.
pub const BUNDLED_MODEL: &str = "models/shapes-ec";

/// How to sample, shared by `generate`, `eval` and `inspect`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampler steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1: none); 2 scores best on the bundled model.
    #[arg(long, default_value_t = 2.0)]
    pub cfg: f32,
    /// Seed: image i starts from the noise of seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model directory (model.safetensors, text_encoder.safetensors, or a
    /// training run); default the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Backend threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Storage dtype of weights and activations while sampling: f32 or bf16
    /// (router logits, softmaxes and norms compute in f32 either way).
    #[arg(long, default_value = "f32", value_parser = super::bench::parse_dtype)]
    pub dtype: ecdit_engine::DType,
    #[command(flatten)]
    pub memory: super::MemoryArgs,
}

impl SamplingArgs {
    /// The sampler options.
    pub fn options(&self) -> SampleOptions {
        SampleOptions {
            steps: self.steps,
            cfg: self.cfg,
            seed: self.seed,
        }
    }
}

/// Arguments of `ecdit generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw, e.g. "a photo of a red circle left of a blue square" (empty: unconditional).
    pub prompt: String,
    /// Images (different noise, same prompt); a grid when more than one.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// `euler` (rectified-flow models) or `ddim` (DDPM models).
    #[arg(long)]
    pub sampler: Option<String>,
    /// SD3 timestep shift of the Euler sampler (1: none).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Backend: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Pixels per image pixel in the PNG.
    #[arg(long, default_value_t = 8)]
    pub scale: usize,
    /// Output PNG.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
}

/// The model directory asked for, or the bundled one (searched from the
/// working directory and from the source tree).
pub fn model_dir(asked: Option<&Path>) -> PathBuf {
    if let Some(dir) = asked {
        return dir.to_path_buf();
    }
    let here = PathBuf::from(BUNDLED_MODEL);
    if here.is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(BUNDLED_MODEL)
}

/// Loads a generator on the backend asked for, to sample `images` at once
/// (refused before anything is allocated if that does not fit --max-memory).
/// The sampling options are checked first: a bad flag costs no model load.
pub fn load_generator(
    plugins: &[PathBuf],
    sampling: &SamplingArgs,
    backend: &str,
    images: usize,
) -> Result<(Generator, ecdit_engine::Registry)> {
    sampling.options().check()?;
    let registry = super::registry(plugins)?;
    let backend = registry
        .backend(&serde_json::json!({"kind": backend, "threads": sampling.threads}))
        .with_context(|| format!("--backend {backend}"))?;
    let dir = model_dir(sampling.model.as_deref());
    let opts = LoadOptions {
        max_memory: sampling.memory.max_memory,
        images,
        dtype: sampling.dtype,
    };
    let generator = Generator::load_with(&dir, &registry, Arc::from(backend), opts)?;
    Ok((generator, registry))
}

/// Says what the prompt will be read as: unconditional, or with unknown words.
pub fn explain_prompt(generator: &Generator, prompt: &str) {
    if prompt.trim().is_empty() {
        eprintln!("empty prompt: drawing an unconditional sample");
        return;
    }
    let unknown = generator.unknown_words(prompt);
    if !unknown.is_empty() {
        eprintln!(
            "warning: not in the model's vocabulary, read as <unk>: {}\nknown words: {}",
            unknown.join(", "),
            generator.known_words().join(" ")
        );
    }
}

/// Runs `ecdit generate`.
pub fn run(plugins: &[PathBuf], args: GenerateArgs) -> Result<()> {
    if args.n == 0 {
        bail!("-n must be at least 1");
    }
    if args.scale == 0 {
        bail!("--scale must be at least 1");
    }
    super::check_output_file(&args.output, "--output", false)?;
    let sampling = &args.sampling;
    let (mut generator, registry) = load_generator(plugins, sampling, &args.backend, args.n)?;
    if args.sampler.is_some() || args.shift.is_some() {
        let default = match generator.model.config().scheduler["kind"].as_str() {
            Some("ddpm") => "ddim",
            _ => "euler",
        };
        generator.set_sampler(&registry, args.sampler.as_deref().unwrap_or(default), args.shift)?;
    }
    explain_prompt(&generator, &args.prompt);
    let opts = sampling.options();
    let prompts = vec![args.prompt.as_str(); args.n];
    let bar = indicatif::ProgressBar::new(opts.steps as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let images = generator.generate(&prompts, opts, false, |_| bar.inc(1))?;
    bar.finish_and_clear();
    let size = generator.model.config().input_size;
    let columns = (args.n as f64).sqrt().ceil() as usize;
    write_grid(&args.output, &images, size, &[], columns, args.scale)?;
    println!("{}", args.output.display());
    Ok(())
}
