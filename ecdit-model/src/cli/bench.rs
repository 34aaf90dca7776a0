//! `ecdit bench`: benchmarks users run on their own machine (a table, or JSON
//! lines with `--json`), in the spirit of llama-bench.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ecdit_engine::{Backend, DType};
use ecdit_model::bench_forward::ProfiledBackend;
use std::path::PathBuf;
use std::sync::Arc;

/// `f32` or `bf16` (also `float32`, `bfloat16`).
pub(crate) fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    DType::parse_float(s).ok_or_else(|| format!("unknown dtype '{s}' (expected f32 or bf16)"))
}

/// Arguments of `ecdit bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// The matmul shapes of a DiT-S/2 forward at batch 8 and 1024^3, at 1 and 2 threads,
    /// f32 and bf16 inputs, on the gemm crate and on oneDNN side by side (when found).
    Gemm {
        /// Thread counts to time (default: 1 and 2).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        /// Timed repetitions per measurement (median reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One MoE layer forward per router beside a dense FFN of equal FLOPs.
    Moe {
        /// Backend threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed repetitions per router (median reported).
        #[arg(long, default_value_t = 15)]
        reps: usize,
        /// Router specs as JSON (repeatable); default: every shipped router.
        #[arg(long)]
        router: Vec<String>,
        /// Storage dtype of weights and activations (router weights stay f32): f32 or bf16.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: DType,
        /// Also print the time spent in each backend op, per MoE and dense pair
        /// (both sides' ops in one table, warm-up runs included).
        #[arg(long)]
        profile: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The whole model forward (random weights): images/s and MFU against the GEMM peak of the same run.
    Forward {
        /// A config file, or a bare name found under configs/ (e.g. ec-s-8e).
        #[arg(long)]
        config: String,
        /// Images per forward.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Backend threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed forwards (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Text tokens per prompt (random tokens, as benches/reference/forward_torch.py).
        #[arg(long, default_value_t = 16)]
        text_len: usize,
        /// Storage dtype of weights and activations (router weights stay f32): f32 or bf16.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: DType,
        /// Also print the time spent in each backend op.
        #[arg(long)]
        profile: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One training step (forward, backward, clipping, AdamW, EMA) of a model config.
    Train {
        /// A model or training config file, or a bare name found under configs/ (e.g. ec-s-8e).
        #[arg(long)]
        config: String,
        /// Images per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Backend threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// The DiT's weights and activations: f32, or bf16 (mixed precision, f32 masters).
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: DType,
        /// Also print the time spent in each backend op.
        #[arg(long)]
        profile: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a benchmark.
pub fn run(plugins: &[PathBuf], args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Gemm { threads, reps, json } => {
            let threads = if threads.is_empty() { vec![1, 2] } else { threads };
            let shapes = ecdit_backend_cpu::bench::dit_s2_gemm_shapes();
            let dtypes = [DType::F32, DType::BF16];
            let records = ecdit_backend_cpu::bench::bench_gemm_paths(&shapes, &threads, reps, &dtypes)?;
            if json {
                for r in &records {
                    println!("{}", with_library(r)?);
                }
            } else {
                println!("matrix library: {}", ecdit_backend_cpu::bench::matmul_library());
                println!(
                    "{:>6} {:>6} {:>6} {:>8} {:>5} {:>10} {:>10}  {:<11} {:<24} default",
                    "m", "n", "k", "threads", "dtype", "ms", "GFLOP/s", "library", "kernel"
                );
                for r in &records {
                    println!(
                        "{:>6} {:>6} {:>6} {:>8} {:>5} {:>10.4} {:>10.1}  {:<11} {:<24} {}",
                        r.m,
                        r.n,
                        r.k,
                        r.threads,
                        r.dtype,
                        r.median_ms,
                        r.gflops,
                        r.library,
                        r.kernel,
                        if r.default { "*" } else { "" }
                    );
                }
            }
        }
        BenchWhat::Moe {
            threads,
            reps,
            router,
            dtype,
            profile,
            json,
        } => {
            let registry = super::registry(plugins)?;
            let backend: Arc<dyn Backend> = registry
                .backend(&serde_json::json!({"kind": "cpu", "threads": threads}))?
                .into();
            let profiled = profile.then(|| Arc::new(ProfiledBackend::new(backend.clone())));
            let backend = match &profiled {
                Some(p) => p.clone() as Arc<dyn Backend>,
                None => backend,
            };
            let routers = if router.is_empty() {
                ecdit_model::bench_moe::default_routers()
            } else {
                router
                    .iter()
                    .map(|s| serde_json::from_str(s).map_err(|e| anyhow::anyhow!("--router {s:?}: {e}")))
                    .collect::<Result<Vec<_>>>()?
            };
            let cfg = ecdit_model::bench_moe::MoeBenchConfig {
                dtype,
                ..Default::default()
            };
            let records = ecdit_model::bench_moe::bench_moe_with(&registry, backend.as_ref(), &routers, reps, &cfg)?;
            if json {
                for r in &records {
                    println!("{}", with_library(r)?);
                }
            } else {
                println!("matrix library: {}", ecdit_backend_cpu::bench::matmul_library());
                println!(
                    "MoE layer forward: d {}, {} x {} tokens, {} GELU experts of width {}d, {dtype}, {} threads",
                    cfg.d,
                    cfg.samples,
                    cfg.tokens_per_sample,
                    cfg.experts,
                    cfg.mlp_ratio,
                    backend.threads()
                );
                println!("{:<14} {:>10} {:>10} {:>8}", "router", "ms", "dense ms", "ratio");
                for r in &records {
                    println!("{:<14} {:>10.2} {:>10.2} {:>8.3}", r.router, r.ms, r.dense_ms, r.ratio);
                }
                if let Some(p) = profiled {
                    let pairs = records.len() * (reps.max(1) + cfg.warmup);
                    let pair_ms = records.iter().map(|r| r.ms + r.dense_ms).sum::<f64>() / records.len().max(1) as f64;
                    print_profile(&p.times(), pairs, pair_ms, "ms/pair");
                }
            }
        }
        BenchWhat::Forward {
            config,
            batch,
            threads,
            reps,
            text_len,
            dtype,
            profile,
            json,
        } => {
            let registry = super::registry(plugins)?;
            let (path, cfg) = ecdit_model::config_files::resolve_config(&config)?;
            let backend = registry.backend(&serde_json::json!({"kind": "cpu", "threads": threads}))?;
            let opts = ecdit_model::bench_forward::ForwardBenchOptions {
                batch,
                text_len,
                reps,
                dtype,
                profile,
                ..Default::default()
            };
            let r = ecdit_model::bench_forward::bench_forward(&registry, &cfg, backend.into(), &opts)
                .with_context(|| format!("bench forward of {}", path.display()))?;
            if json {
                println!("{}", with_library(&r)?);
            } else {
                println!("matrix library: {}", ecdit_backend_cpu::bench::matmul_library());
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                println!(
                    "forward {}: batch {}, {} threads, {} text tokens, {} weights",
                    r.config, r.batch, r.threads, r.text_len, r.dtype
                );
                print_speed(r.ms, r.min_ms, r.images_per_s, r.achieved_gflops, r.peak_gflops, r.mfu);
                print_profile(&r.profile, reps, r.ms, "ms/fwd");
                if let Some(rss) = r.peak_rss_bytes {
                    println!(
                        "peak RSS {:.1} MiB; budget: weights {} {:.1} MiB + 2 x activation estimate {:.1} MiB = {:.1} MiB",
                        mib(rss),
                        r.dtype,
                        mib(r.weight_bytes),
                        mib(r.activation_bytes),
                        mib(r.weight_bytes + 2 * r.activation_bytes)
                    );
                }
            }
        }
        BenchWhat::Train {
            config,
            batch,
            threads,
            reps,
            dtype,
            profile,
            json,
        } => {
            let registry = super::registry(plugins)?;
            // A model config, or a training config's model.
            let cfg = ecdit_model::train::config::TrainConfig::resolve(&config)?.model;
            let backend = registry.backend(&serde_json::json!({"kind": "cpu", "threads": threads}))?;
            let r = ecdit_model::bench_train::bench_train(&registry, &cfg, backend.into(), batch, dtype, reps, profile)
                .with_context(|| format!("bench train of {config}"))?;
            if json {
                println!("{}", with_library(&r)?);
                return Ok(());
            }
            println!("matrix library: {}", ecdit_backend_cpu::bench::matmul_library());
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "training step {}: batch {}, {}, {} threads",
                r.config, r.batch, r.dtype, r.threads
            );
            print_speed(
                r.ms,
                r.min_ms,
                r.images_per_sec,
                r.achieved_gflops,
                r.peak_gflops,
                r.mfu,
            );
            print_profile(&r.profile, reps, r.ms, "ms/step");
            if let Some(rss) = r.peak_rss_bytes {
                println!(
                    "peak RSS {:.1} MiB; ecdit train's estimate {:.1} MiB",
                    mib(rss),
                    mib(r.estimate_bytes)
                );
            }
        }
    }
    Ok(())
}

/// A benchmark record as one JSON line, with what the CPU backend's matrix
/// products ran on (`matrix_library`: "onednn 2.6.3 (...)" or "gemm crate (...)").
fn with_library<T: serde::Serialize>(record: &T) -> Result<String> {
    let mut value = serde_json::to_value(record)?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert(
            "matrix_library".into(),
            ecdit_backend_cpu::bench::matmul_library().into(),
        );
    }
    Ok(serde_json::to_string(&value)?)
}

/// The per-op table of a profiled benchmark: calls and milliseconds per
/// timed repetition (`unit` names it), GFLOP/s where the op counts FLOPs,
/// and the time outside backend ops. Prints nothing without a profile.
fn print_profile(profile: &[ecdit_model::bench_forward::OpTime], reps: usize, total_ms: f64, unit: &str) {
    if profile.is_empty() {
        return;
    }
    let per_rep = 1.0 / reps.max(1) as f64;
    println!("{:<22} {:>8} {:>10} {:>10}", "backend op", "calls", unit, "GFLOP/s");
    for t in profile {
        let gflops = if t.flops > 0.0 { t.flops / t.ms / 1e6 } else { 0.0 };
        let calls = (t.calls as f64 * per_rep).round();
        println!("{:<22} {:>8} {:>10.1} {:>10.1}", t.op, calls, t.ms * per_rep, gflops);
    }
    let in_ops: f64 = profile.iter().map(|t| t.ms).sum::<f64>() * per_rep;
    println!("{:<22} {:>8} {:>10.1}", "outside backend ops", "", total_ms - in_ops);
}

/// The speed table of a model benchmark: median and fastest ms, images per
/// second, achieved and peak GFLOP/s, MFU.
fn print_speed(ms: f64, min_ms: f64, images_per_sec: f64, gflops: f64, peak: f64, mfu: f64) {
    println!(
        "{:>10} {:>10} {:>10} {:>12} {:>10} {:>8}",
        "ms", "min ms", "images/s", "GFLOP/s", "peak", "MFU"
    );
    println!(
        "{ms:>10.1} {min_ms:>10.1} {images_per_sec:>10.2} {gflops:>12.1} {peak:>10.1} {:>7.1}%",
        100.0 * mfu
    );
}
