//! `ecdit eval`: GenEval's protocol on the shapes world: generate images for
//! every prompt of a GenEval metadata file, find the objects with the
//! deterministic detector, apply GenEval's rules, and report the accuracy per
//! tag and overall (the mean of the six).

use super::generate::{load_generator, model_dir, SamplingArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use ecdit_model::data::Tag;
use ecdit_model::eval::{judge, read_prompts, write_marked_grid, Judgement, Report};
use ecdit_model::sample::SampleOptions;
use std::path::{Path, PathBuf};

/// The shipped prompts, relative to the repository root.
pub const PROMPTS: &str = "eval/prompts.jsonl";

/// Arguments of `ecdit eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Prompts in GenEval's metadata format; default eval/prompts.jsonl.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Images per prompt (line i's start at seed + i * samples-per-prompt).
    #[arg(long, default_value_t = 1)]
    pub samples_per_prompt: usize,
    /// Only the first N prompts (a quick look).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print JSON (`overall` and one field per tag) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the samples, marked pass or fail, one grid per tag, and every judgement, here.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

fn prompts_file(asked: Option<&Path>) -> PathBuf {
    if let Some(p) = asked {
        return p.to_path_buf();
    }
    let here = PathBuf::from(PROMPTS);
    if here.is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(PROMPTS)
}

/// Runs `ecdit eval`.
pub fn run(plugins: &[PathBuf], args: EvalArgs) -> Result<()> {
    if args.samples_per_prompt == 0 {
        bail!("--samples-per-prompt must be at least 1");
    }
    let path = prompts_file(args.prompts.as_deref());
    let mut specs = read_prompts(&path)?;
    if let Some(n) = args.limit {
        specs.truncate(n);
    }
    if specs.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    if let Some(dir) = &args.output {
        super::create_output_dir(dir, "--output")?;
    }
    let sampling = &args.sampling;
    let (generator, _) = load_generator(plugins, sampling, "cpu", args.samples_per_prompt)?;
    let size = generator.model.config().input_size;
    let opts = sampling.options();
    let bar = indicatif::ProgressBar::new(specs.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("prompt {pos}/{len} [{bar:30}] ETA {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut results: Vec<(usize, Vec<f32>, Judgement)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let prompts = vec![spec.prompt.as_str(); args.samples_per_prompt];
        // Each line its own seeds: the file repeats some prompts.
        let line_seed = opts.seed + (i * args.samples_per_prompt) as u64;
        let images = generator.generate(
            &prompts,
            SampleOptions {
                seed: line_seed,
                ..opts
            },
            false,
            |_| {},
        )?;
        for image in images {
            let judgement = judge(&image, size, spec);
            results.push((i, image, judgement));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let outcomes: Vec<(Tag, bool)> = results.iter().map(|(i, _, j)| (specs[*i].tag, j.pass)).collect();
    let report = Report::from_judgements(&outcomes);
    let mut json = report.to_json();
    json["model"] = model_dir(sampling.model.as_deref()).display().to_string().into();
    json["prompts"] = path.display().to_string().into();
    json["samples_per_prompt"] = args.samples_per_prompt.into();
    json["steps"] = opts.steps.into();
    json["cfg"] = (opts.cfg as f64).into();
    json["dtype"] = sampling.dtype.to_string().into();
    if args.json {
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(dir) = &args.output {
        for tag in Tag::ALL {
            let picked: Vec<&(usize, Vec<f32>, Judgement)> =
                results.iter().filter(|(i, _, _)| specs[*i].tag == tag).collect();
            if picked.is_empty() {
                continue;
            }
            let images: Vec<Vec<f32>> = picked.iter().map(|(_, img, _)| img.clone()).collect();
            let judgements: Vec<Judgement> = picked.iter().map(|(_, _, j)| j.clone()).collect();
            let prompts: Vec<String> = picked.iter().map(|(i, _, _)| specs[*i].prompt.clone()).collect();
            let columns = (images.len() as f64).sqrt().ceil() as usize;
            write_marked_grid(
                &dir.join(format!("{}.png", tag.name())),
                &images,
                size,
                &judgements,
                &prompts,
                columns,
                4,
            )?;
        }
        let per_prompt: Vec<serde_json::Value> = results
            .iter()
            .map(|(i, _, j)| serde_json::json!({"prompt": specs[*i].prompt, "tag": specs[*i].tag.name(), "pass": j.pass, "reason": j.reason}))
            .collect();
        json["results"] = per_prompt.into();
        let file = dir.join("results.json");
        std::fs::write(&file, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", file.display()))?;
        eprintln!("samples and judgements in {}", dir.display());
    }
    Ok(())
}
