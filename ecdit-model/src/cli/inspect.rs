//! `ecdit inspect "PROMPT" -o DIR`: the paper's interpretability figures for
//! one prompt: per MoE layer and sampling step a heat map of the experts
//! per patch beside the generated image, and per prompt word the expert
//! compute it attracts; PNGs and `inspect.json`.

use super::generate::{explain_prompt, load_generator, SamplingArgs};
use anyhow::{Context, Result};
use clap::Args;
use ecdit_model::data::{image_to_rgb8, write_png};
use ecdit_model::eval::detect;
use ecdit_model::inspect::{heat_map, object_concentration, object_patches, record_step, StepRecord};
use ecdit_model::model::ModelActs;
use std::path::{Path, PathBuf};

/// Arguments of `ecdit inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The prompt.
    pub prompt: String,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Pixels per patch in the heat maps.
const CELL: usize = 16;

/// Runs `ecdit inspect`.
pub fn run(plugins: &[PathBuf], args: InspectArgs) -> Result<()> {
    super::check_output_dir(&args.output, "--output")?;
    let sampling = &args.sampling;
    let (generator, _) = load_generator(plugins, sampling, "cpu", 1)?;
    explain_prompt(&generator, &args.prompt);
    let c = generator.model.config().clone();
    if c.moe.is_none() {
        anyhow::bail!("model '{}' has no MoE layers to inspect", c.name);
    }
    super::create_output_dir(&args.output, "--output")?;
    let tokens: Vec<String> = match &generator.encoder {
        Some(enc) => {
            let vocab: Vec<&str> = enc.tokenizer().vocab().tokens().collect();
            let ids = enc.tokenizer().tokenize_quiet(&args.prompt).ids;
            ids.iter()
                .map(|&i| vocab.get(i as usize).unwrap_or(&"?").to_string())
                .collect()
        }
        None => Vec::new(),
    };
    let opts = sampling.options();
    let cond = generator.conditions(&[args.prompt.as_str()])?;
    let mut acts = ModelActs::default();
    let mut records: Vec<StepRecord> = Vec::new();
    let mut failure = None;
    let images = generator.generate(&[args.prompt.as_str()], opts, false, |info| {
        if failure.is_none() {
            match record_step(&generator.model, &mut acts, &info, cond.condition(), &tokens) {
                Ok(r) => records.push(r),
                Err(e) => failure = Some(e),
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }

    let size = c.input_size;
    let grid = size / c.patch_size;
    let image = image_to_rgb8(&images[0], size, size)?;
    let scale = grid * CELL / size; // the image drawn at the heat maps' size
    let big = upscale(&image, size, scale.max(1));
    let side = size * scale.max(1);
    write_png(&args.output.join("image.png"), &big, side, side)?;
    let mut written = 1;
    for r in &records {
        for layer in &r.layers {
            let map = heat_map(&layer.experts_per_patch, grid, layer.experts as u32, CELL);
            let pair = side_by_side(&big, side, &map, grid * CELL);
            let path = args
                .output
                .join(format!("experts_block{}_step{:02}.png", layer.block, r.step));
            write_png(&path, &pair, side + 4 + grid * CELL, side.max(grid * CELL))?;
            written += 1;
        }
    }
    if let Some(overview) = overview(&records, &big, side, grid) {
        write_png(&args.output.join("overview.png"), &overview.0, overview.1, overview.2)?;
        written += 1;
    }
    // Where the objects ended up (the detector's boxes), and per step and
    // layer how much more compute their patches got than an even spread.
    let boxes: Vec<[f32; 4]> = detect(&images[0], size).iter().map(|d| d.bbox).collect();
    let objects = object_patches(&boxes, size, grid);
    let concentration: Vec<Vec<Option<f64>>> = records
        .iter()
        .map(|r| {
            r.layers
                .iter()
                .map(|l| object_concentration(&l.experts_per_patch, &objects))
                .collect()
        })
        .collect();
    let json = serde_json::json!({
        "prompt": args.prompt,
        "object_boxes": boxes,
        "object_patches": objects,
        "object_concentration": concentration,
        "tokens": tokens,
        "model": c.name,
        "steps": opts.steps,
        "cfg": opts.cfg,
        "seed": opts.seed,
        "grid": grid,
        "records": records,
    });
    let path = args.output.join("inspect.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("{} files in {}", written + 1, display(&args.output));
    let ratio = |step: Option<&Vec<Option<f64>>>, layer: usize| match step.and_then(|s| s.get(layer).copied().flatten())
    {
        Some(r) => format!("{r:.2}x"),
        None => "-".to_string(),
    };
    if let Some(last) = records.last() {
        for (l, layer) in last.layers.iter().enumerate() {
            let top = layer
                .word_compute
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(w, s)| format!(", most compute on '{w}' ({:.0}%)", 100.0 * s))
                .unwrap_or_default();
            println!(
                "block {}: up to {:.0}% of the experts on one patch, {:.0}% of patches unchosen{top}; \
                 object patches get {} an even share of the compute (first step {})",
                layer.block,
                100.0 * layer.max_fraction,
                100.0 * layer.unchosen_fraction,
                ratio(concentration.last(), l),
                ratio(concentration.first(), l),
            );
        }
    }
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Sampling steps shown in the overview (evenly spread, first and last included).
const OVERVIEW_STEPS: usize = 5;

/// One picture of it all: a row per MoE layer, the image first and then the
/// heat maps of [`OVERVIEW_STEPS`] steps from noise to the end; RGB8 with
/// its width and height. None without records.
fn overview(records: &[StepRecord], image: &[u8], side: usize, grid: usize) -> Option<(Vec<u8>, usize, usize)> {
    let layers = records.first()?.layers.len();
    let cell = side.max(grid * CELL);
    let gap = 4;
    let picks: Vec<usize> = (0..OVERVIEW_STEPS.min(records.len()))
        .map(|i| i * (records.len() - 1) / (OVERVIEW_STEPS.min(records.len()) - 1).max(1))
        .collect();
    let (w, h) = ((picks.len() + 1) * (cell + gap), layers.max(1) * (cell + gap));
    let mut out = vec![32u8; w * h * 3];
    let mut paste = |tile: &[u8], tile_side: usize, col: usize, row: usize| {
        let (x0, y0) = (col * (cell + gap), row * (cell + gap));
        for y in 0..tile_side {
            let dst = ((y0 + y) * w + x0) * 3;
            out[dst..dst + tile_side * 3].copy_from_slice(&tile[y * tile_side * 3..(y + 1) * tile_side * 3]);
        }
    };
    for row in 0..layers {
        paste(image, side, 0, row);
        for (col, &k) in picks.iter().enumerate() {
            let layer = records[k].layers.get(row)?;
            let map = heat_map(&layer.experts_per_patch, grid, layer.experts as u32, CELL);
            paste(&map, grid * CELL, col + 1, row);
        }
    }
    Some((out, w, h))
}

/// Nearest-neighbour upscale of an RGB8 image.
fn upscale(rgb: &[u8], side: usize, scale: usize) -> Vec<u8> {
    let big = side * scale;
    let mut out = vec![0u8; big * big * 3];
    for y in 0..big {
        for x in 0..big {
            let src = ((y / scale) * side + x / scale) * 3;
            out[(y * big + x) * 3..(y * big + x) * 3 + 3].copy_from_slice(&rgb[src..src + 3]);
        }
    }
    out
}

/// Two square RGB8 images side by side with a 4-pixel gap.
fn side_by_side(a: &[u8], a_side: usize, b: &[u8], b_side: usize) -> Vec<u8> {
    let (w, h) = (a_side + 4 + b_side, a_side.max(b_side));
    let mut out = vec![32u8; w * h * 3];
    for y in 0..a_side {
        out[y * w * 3..(y * w + a_side) * 3].copy_from_slice(&a[y * a_side * 3..(y + 1) * a_side * 3]);
    }
    for y in 0..b_side {
        let x0 = a_side + 4;
        out[(y * w + x0) * 3..(y * w + x0 + b_side) * 3].copy_from_slice(&b[y * b_side * 3..(y + 1) * b_side * 3]);
    }
    out
}
