//! Times the DiT-S/2 GEMM shapes and prints one JSON line per (library, shape, threads).
//!
//! ```text
//! cargo run --release -p ecdit-backend-cpu --example gemm_bench -- [--lib gemm|matrixmultiply] [--threads 1,2] [--reps 7]
//! ```
//! `gemm` goes through `CpuBackend` (what the engine uses). `matrixmultiply`
//! is the alternative we measured against; its thread count comes from the
//! `MATMUL_NUM_THREADS` environment variable, read once per process, so run it
//! once per thread count.

use ecdit_backend_cpu::bench::{bench_gemm, dit_s2_gemm_shapes, GemmRecord, MIN_REP_SECONDS};
use std::time::Instant;

fn parse_args() -> Result<(String, Vec<usize>, usize), String> {
    let (mut lib, mut threads, mut reps) = ("gemm".to_string(), vec![1, 2], 7);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--lib" => lib = value,
            "--threads" => {
                threads = value
                    .split(',')
                    .map(|t| t.trim().parse().map_err(|e| format!("--threads {value}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => reps = value.parse().map_err(|e| format!("--reps {value}: {e}"))?,
            _ => return Err(format!("unknown flag {flag} (known: --lib, --threads, --reps)")),
        }
    }
    Ok((lib, threads, reps))
}

/// The same protocol as `bench_gemm`, on `matrixmultiply::sgemm`.
fn bench_matrixmultiply(shapes: &[(usize, usize, usize)], reps: usize) -> Vec<GemmRecord> {
    let threads = std::env::var("MATMUL_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    shapes
        .iter()
        .map(|&(m, n, k)| {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
            let mut c = vec![0.0f32; m * n];
            let mut run = || unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            };
            run();
            let start = Instant::now();
            run();
            let inner = ((MIN_REP_SECONDS / start.elapsed().as_secs_f64().max(1e-7)).ceil() as usize).clamp(1, 100_000);
            let mut times: Vec<f64> = (0..reps.max(1))
                .map(|_| {
                    let start = Instant::now();
                    (0..inner).for_each(|_| run());
                    start.elapsed().as_secs_f64() / inner as f64
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            GemmRecord {
                m,
                n,
                k,
                threads,
                gflops: 2.0 * (m * n * k) as f64 / median / 1e9,
                median_ms: median * 1e3,
            }
        })
        .collect()
}

fn main() -> Result<(), String> {
    let (lib, threads, reps) = parse_args()?;
    let shapes = dit_s2_gemm_shapes();
    let records = match lib.as_str() {
        "gemm" => bench_gemm(&shapes, &threads, reps).map_err(|e| e.to_string())?,
        "matrixmultiply" => bench_matrixmultiply(&shapes, reps),
        _ => return Err(format!("unknown --lib {lib} (known: gemm, matrixmultiply)")),
    };
    for r in records {
        let mut line = serde_json::to_value(&r).map_err(|e| e.to_string())?;
        line["lib"] = lib.clone().into();
        println!("{line}");
    }
    Ok(())
}
