//! GEMM timing for `ecdit bench gemm`: GFLOP/s per shape and thread count.
//!
//! Each measurement warms up, then times `reps` repetitions and reports the
//! median. A repetition runs the product enough times to last at least
//! [`MIN_REP_SECONDS`], so tiny shapes are not lost in timer noise.

use crate::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// Shortest time one timed repetition may take.
pub const MIN_REP_SECONDS: f64 = 0.02;

/// One timed shape at one thread count.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GemmRecord {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Threads of the backend's pool.
    pub threads: usize,
    /// Achieved GFLOP/s (2 m n k flops per product) at the median time.
    pub gflops: f64,
    /// Median milliseconds per product.
    pub median_ms: f64,
}

/// The matrix products `(m, n, k)` of a DiT-S/2 forward at batch 8 (hidden
/// 384, 256 tokens per image, 6 heads of 64), plus a square 1024 reference:
/// qkv, attention projection, MLP fc1 and fc2, adaLN modulation, and the two
/// per-head attention products.
pub fn dit_s2_gemm_shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (2048, 1152, 384), // qkv projection
        (2048, 384, 384),  // attention output projection
        (2048, 1536, 384), // MLP fc1
        (2048, 384, 1536), // MLP fc2
        (8, 2304, 384),    // adaLN modulation (6 x 384 outputs per sample)
        (256, 256, 64),    // attention scores Q K^T, one head
        (256, 64, 256),    // attention P V, one head
        (1024, 1024, 1024),
    ]
}

/// Times `out = a @ b` (row-major, no transposes) for every shape at every
/// thread count, `reps` timed repetitions each (at least 1) after warm-up.
pub fn bench_gemm(shapes: &[(usize, usize, usize)], threads: &[usize], reps: usize) -> Result<Vec<GemmRecord>> {
    let mut rng = StdRng::seed_from_u64(0x9e37);
    let mut records = Vec::new();
    for &t in threads {
        let backend = CpuBackend::new(t)?;
        for &(m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let a = backend.upload_f32(&[m, k], &a, DType::F32)?;
            let b = backend.upload_f32(&[k, n], &b, DType::F32)?;
            let mut out = backend.zeros(&[m, n], DType::F32)?;
            let dims = GemmDims::nn(m, n, k);
            let mut run = || backend.gemm(out.view_mut(), a.view(), b.view(), None, dims, 1.0, 0.0);
            // Warm up (pool threads, caches) and size one repetition.
            run()?;
            let start = Instant::now();
            run()?;
            let once = start.elapsed().as_secs_f64().max(1e-7);
            let inner = ((MIN_REP_SECONDS / once).ceil() as usize).clamp(1, 100_000);
            let mut times = Vec::with_capacity(reps.max(1));
            for _ in 0..reps.max(1) {
                let start = Instant::now();
                for _ in 0..inner {
                    run()?;
                }
                times.push(start.elapsed().as_secs_f64() / inner as f64);
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            records.push(GemmRecord {
                m,
                n,
                k,
                threads: backend.threads(),
                gflops: dims.flops() / median / 1e9,
                median_ms: median * 1e3,
            });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_one_line_per_shape_and_thread_count() {
        let recs = bench_gemm(&[(8, 16, 4), (3, 5, 7)], &[1, 2], 1).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!((recs[1].m, recs[1].n, recs[1].k, recs[1].threads), (3, 5, 7, 1));
        assert_eq!(recs[3].threads, 2);
        assert!(recs.iter().all(|r| r.gflops > 0.0 && r.median_ms > 0.0));
    }

    #[test]
    fn dit_shapes_include_the_listed_products() {
        let s = dit_s2_gemm_shapes();
        assert_eq!(s.len(), 8);
        assert!(s.contains(&(2048, 1152, 384)) && s.contains(&(256, 64, 256)) && s.contains(&(1024, 1024, 1024)));
    }
}
