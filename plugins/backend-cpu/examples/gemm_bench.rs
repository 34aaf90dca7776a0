//! Times the DiT-S/2 GEMM shapes and prints one JSON line per (library, shape, threads, dtype).
//!
//! ```text
//! cargo run --release -p ecdit-backend-cpu --example gemm_bench -- [--lib gemm|matrixmultiply] [--threads 1,2] [--reps 7] [--dtype f32,bf16] [--shapes 2048x384x384,...]
//! ```
//! `gemm` goes through `CpuBackend` (what the engine uses: the `gemm` crate,
//! and oneDNN side by side when it is found; `--dtype` picks the input
//! dtypes, `--shapes` replaces the DiT-S/2 list). `matrixmultiply`
//! is the alternative we measured against; its thread count comes from the
//! `MATMUL_NUM_THREADS` environment variable, read once per process, so run it
//! once per thread count.

use ecdit_backend_cpu::bench::{bench_gemm_paths, dit_s2_gemm_shapes, matmul_library, GemmRecord, MIN_REP_SECONDS};
use ecdit_engine::DType;
use std::time::Instant;

/// Parsed flags.
struct Args {
    lib: String,
    threads: Vec<usize>,
    reps: usize,
    dtypes: Vec<DType>,
    shapes: Vec<(usize, usize, usize)>,
}

fn parse_args() -> Result<Args, String> {
    let (mut lib, mut threads, mut reps) = ("gemm".to_string(), vec![1, 2], 7);
    let (mut dtypes, mut shapes) = (vec![DType::F32], dit_s2_gemm_shapes());
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
            "--dtype" => {
                dtypes = value
                    .split(',')
                    .map(|d| match d.trim() {
                        "f32" => Ok(DType::F32),
                        "bf16" => Ok(DType::BF16),
                        other => Err(format!("--dtype {other}: f32 or bf16")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--shapes" => {
                shapes = value
                    .split(',')
                    .map(|s| {
                        let d: Vec<usize> = s.split('x').filter_map(|v| v.trim().parse().ok()).collect();
                        match d[..] {
                            [m, n, k] => Ok((m, n, k)),
                            _ => Err(format!("--shapes {s}: MxNxK")),
                        }
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(format!(
                    "unknown flag {flag} (known: --lib, --threads, --reps, --dtype, --shapes)"
                ))
            }
        }
    }
    Ok(Args {
        lib,
        threads,
        reps,
        dtypes,
        shapes,
    })
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
                dtype: "f32".into(),
                library: "matrixmultiply".into(),
                kernel: "matrixmultiply".into(),
                default: false,
                gflops: 2.0 * (m * n * k) as f64 / median / 1e9,
                median_ms: median * 1e3,
            }
        })
        .collect()
}

fn main() -> Result<(), String> {
    let Args {
        lib,
        threads,
        reps,
        dtypes,
        shapes,
    } = parse_args()?;
    eprintln!("matrix library: {}", matmul_library());
    let records = match lib.as_str() {
        "gemm" => bench_gemm_paths(&shapes, &threads, reps, &dtypes).map_err(|e| e.to_string())?,
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
