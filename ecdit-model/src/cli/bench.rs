//! `ecdit bench`: benchmarks users run on their own machine (a table, or JSON
//! lines with `--json`), in the spirit of llama-bench.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Arguments of `ecdit bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// The matmul shapes of a DiT-S/2 forward at batch 8 and 1024^3, at 1 and 2 threads.
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
        /// One JSON object per line.
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
            let records = ecdit_backend_cpu::bench::bench_gemm(&shapes, &threads, reps)?;
            if json {
                for r in &records {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "{:>6} {:>6} {:>6} {:>8} {:>10} {:>10}",
                    "m", "n", "k", "threads", "ms", "GFLOP/s"
                );
                for r in &records {
                    println!(
                        "{:>6} {:>6} {:>6} {:>8} {:>10.4} {:>10.1}",
                        r.m, r.n, r.k, r.threads, r.median_ms, r.gflops
                    );
                }
            }
        }
        BenchWhat::Moe {
            threads,
            reps,
            router,
            json,
        } => {
            let registry = super::registry(plugins)?;
            let backend = registry.backend(&serde_json::json!({"kind": "cpu", "threads": threads}))?;
            let routers = if router.is_empty() {
                ecdit_model::bench_moe::default_routers()
            } else {
                router
                    .iter()
                    .map(|s| serde_json::from_str(s).map_err(|e| anyhow::anyhow!("--router {s:?}: {e}")))
                    .collect::<Result<Vec<_>>>()?
            };
            let records = ecdit_model::bench_moe::bench_moe(&registry, backend.as_ref(), &routers, reps)?;
            if json {
                for r in &records {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "MoE layer forward: d 384, 8 x 256 tokens, 8 GELU experts of width 4d, {} threads",
                    backend.threads()
                );
                println!("{:<14} {:>10} {:>10} {:>8}", "router", "ms", "dense ms", "ratio");
                for r in &records {
                    println!("{:<14} {:>10.2} {:>10.2} {:>8.3}", r.router, r.ms, r.dense_ms, r.ratio);
                }
            }
        }
    }
    Ok(())
}
