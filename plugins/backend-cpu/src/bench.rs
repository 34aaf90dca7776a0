//! GEMM timing for `ecdit bench gemm`: GFLOP/s per shape, thread count,
//! dtype and matrix library.
//!
//! Each measurement warms up, then times `reps` repetitions and reports the
//! median. A repetition runs the product enough times to last at least
//! [`MIN_REP_SECONDS`], so tiny shapes are not lost in timer noise. When
//! oneDNN is found, every shape is timed on both paths (the `gemm` crate and
//! oneDNN), their repetitions interleaved so that both see the same load on a
//! shared machine; `default` marks the path a plain `CpuBackend::new` takes.

use crate::onednn::{self, OneDnnMode};
use crate::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// Shortest time one timed repetition may take.
pub const MIN_REP_SECONDS: f64 = 0.02;

/// One timed shape at one thread count, dtype and library.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GemmRecord {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Threads of the backend's pool (and of oneDNN's OpenMP team).
    pub threads: usize,
    /// Storage dtype of both inputs (the output is f32).
    pub dtype: String,
    /// The matrix library: "onednn" or "gemm crate".
    pub library: String,
    /// The kernel that ran: oneDNN's implementation name
    /// ("brg:avx512_core_amx"), "gemm crate", or "few rows" (the backend's
    /// own kernel for products of at most 8 rows, on either path).
    pub kernel: String,
    /// Whether `CpuBackend::new` (oneDNN where it is faster) runs this
    /// product on this path.
    pub default: bool,
    /// Achieved GFLOP/s (2 m n k flops per product) at the median time.
    pub gflops: f64,
    /// Median milliseconds per product.
    pub median_ms: f64,
}

/// What the CPU backend's matrix products run on here, in one line (as
/// `ECDIT_ONEDNN` leaves it): "onednn 2.6.3 (...)" or "gemm crate (why not
/// oneDNN, and how to get it)".
pub fn matmul_library() -> String {
    onednn::status(OneDnnMode::from_env())
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

/// Times `out = a @ b` (row-major, no transposes, f32) for every shape at
/// every thread count, `reps` timed repetitions each (at least 1) after
/// warm-up, on the backend as `CpuBackend::new` makes it (oneDNN where it is
/// faster, as `ECDIT_ONEDNN` allows): one record per shape and thread count,
/// all marked `default`. The model benchmarks take their matmul peak from it.
pub fn bench_gemm(
    shapes: &[(usize, usize, usize)],
    threads: &[usize],
    reps: usize,
    dtype: DType,
) -> Result<Vec<GemmRecord>> {
    let mut records = Vec::new();
    for &t in threads {
        let backend = CpuBackend::new(t)?;
        records.extend(bench_backends(&[(&backend, true)], shapes, reps, &[dtype])?);
    }
    Ok(records)
}

/// Both matrix paths side by side, for each input dtype of `dtypes` (f32 or
/// bf16; the output is f32): the `gemm` crate alone, and, when oneDNN is
/// found and not switched off by `ECDIT_ONEDNN=0`, oneDNN for every product
/// it takes. Their repetitions alternate, so both see the same load;
/// `default` marks the path `CpuBackend::new` takes for the product.
pub fn bench_gemm_paths(
    shapes: &[(usize, usize, usize)],
    threads: &[usize],
    reps: usize,
    dtypes: &[DType],
) -> Result<Vec<GemmRecord>> {
    let with_onednn = OneDnnMode::from_env() != OneDnnMode::Off && onednn::library().is_ok();
    let mut records = Vec::new();
    for &t in threads {
        let off = CpuBackend::with_onednn(t, OneDnnMode::Off)?;
        let mut paths = vec![(&off, false)];
        let always = if with_onednn {
            Some(CpuBackend::with_onednn(t, OneDnnMode::Always)?)
        } else {
            None
        };
        paths.extend(always.as_ref().map(|b| (b, false)));
        records.extend(bench_backends(&paths, shapes, reps, dtypes)?);
    }
    let auto = if with_onednn { OneDnnMode::Auto } else { OneDnnMode::Off };
    for r in &mut records {
        let dtype = if r.dtype == "bf16" { DType::BF16 } else { DType::F32 };
        let takes = crate::ops::gemm::onednn_takes(auto, GemmDims::nn(r.m, r.n, r.k), (dtype, dtype));
        r.default = takes == (r.library == "onednn");
    }
    Ok(records)
}

/// Times every shape and dtype on each backend (`true`: mark its records
/// `default`), the backends' repetitions interleaved.
fn bench_backends(
    backends: &[(&CpuBackend, bool)],
    shapes: &[(usize, usize, usize)],
    reps: usize,
    dtypes: &[DType],
) -> Result<Vec<GemmRecord>> {
    let mut rng = StdRng::seed_from_u64(0x9e37);
    let mut records = Vec::new();
    for &(m, n, k) in shapes {
        for &dtype in dtypes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let dims = GemmDims::nn(m, n, k);
            let mut cases = backends
                .iter()
                .map(|&(backend, _)| Case::new(backend, &a, &b, dims, dtype))
                .collect::<Result<Vec<_>>>()?;
            // Warm up (pool threads, caches, oneDNN's JIT) and size one repetition.
            let mut inner = Vec::new();
            for case in &mut cases {
                case.run()?;
                let start = Instant::now();
                case.run()?;
                let once = start.elapsed().as_secs_f64().max(1e-7);
                inner.push(((MIN_REP_SECONDS / once).ceil() as usize).clamp(1, 100_000));
            }
            let mut times = vec![Vec::with_capacity(reps.max(1)); cases.len()];
            for _ in 0..reps.max(1) {
                for ((case, &inner), times) in cases.iter_mut().zip(&inner).zip(&mut times) {
                    let start = Instant::now();
                    for _ in 0..inner {
                        case.run()?;
                    }
                    times.push(start.elapsed().as_secs_f64() / inner as f64);
                }
            }
            for ((case, mut times), &(_, default)) in cases.into_iter().zip(times).zip(backends) {
                times.sort_by(f64::total_cmp);
                let median = times[times.len() / 2];
                let kernel = case.backend.gemm_kernel(dims, dtype);
                let on_onednn = kernel != "gemm crate" && kernel != "few rows";
                let library = if on_onednn || case.backend.onednn_mode() == OneDnnMode::Always {
                    "onednn"
                } else {
                    "gemm crate"
                };
                records.push(GemmRecord {
                    m,
                    n,
                    k,
                    threads: case.backend.threads(),
                    dtype: dtype.to_string(),
                    library: library.into(),
                    kernel,
                    default,
                    gflops: dims.flops() / median / 1e9,
                    median_ms: median * 1e3,
                });
            }
        }
    }
    Ok(records)
}

/// One product's inputs and output on one backend.
struct Case<'a> {
    backend: &'a CpuBackend,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    dims: GemmDims,
}

impl<'a> Case<'a> {
    fn new(backend: &'a CpuBackend, a: &[f32], b: &[f32], dims: GemmDims, dtype: DType) -> Result<Self> {
        let GemmDims { m, n, k, .. } = dims;
        Ok(Self {
            backend,
            a: backend.upload_f32(&[m, k], a, dtype)?,
            b: backend.upload_f32(&[k, n], b, dtype)?,
            out: backend.zeros(&[m, n], DType::F32)?,
            dims,
        })
    }

    fn run(&mut self) -> Result<()> {
        let (a, b) = (self.a.view(), self.b.view());
        self.backend.gemm(self.out.view_mut(), a, b, None, self.dims, 1.0, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_one_line_per_shape_thread_count_and_path() {
        let recs = bench_gemm_paths(&[(8, 16, 4), (30, 40, 64)], &[1, 2], 1, &[DType::F32, DType::BF16]).unwrap();
        let paths = recs.len() / 8;
        assert!(paths == 1 || paths == 2, "{} records", recs.len());
        assert_eq!(
            paths == 2,
            onednn::library().is_ok() && OneDnnMode::from_env() != OneDnnMode::Off
        );
        let r = &recs[2 * paths];
        assert_eq!((r.m, r.n, r.k, r.threads, r.dtype.as_str()), (30, 40, 64, 1, "f32"));
        assert_eq!(r.library, "gemm crate");
        assert_eq!(recs[4 * paths].threads, 2);
        assert!(recs.iter().all(|r| r.gflops > 0.0 && r.median_ms > 0.0));
        // The 8-row product keeps the backend's own kernel on both paths.
        assert!(recs[..2 * paths].iter().all(|r| r.kernel == "few rows"));
        // Exactly one path of each measurement is the default.
        for chunk in recs.chunks(paths) {
            assert_eq!(chunk.iter().filter(|r| r.default).count(), 1, "{chunk:?}");
        }
        // Blocks of `paths` records: (shape, dtype) in order, then the next thread count.
        assert!(recs[2 * paths].default, "f32 30x40x64 stays on the gemm crate");
        if paths == 2 {
            let bf16 = &recs[3 * paths + 1];
            assert_eq!((bf16.dtype.as_str(), bf16.library.as_str()), ("bf16", "onednn"));
            assert!(bf16.default, "bf16 30x40x64 goes to oneDNN: {bf16:?}");
        }
        let plain = bench_gemm(&[(30, 40, 64)], &[2], 1, DType::F32).unwrap();
        assert_eq!(plain.len(), 1);
        assert!(plain[0].default && plain[0].dtype == "f32");
    }

    #[test]
    fn dit_shapes_include_the_listed_products() {
        let s = dit_s2_gemm_shapes();
        assert_eq!(s.len(), 8);
        assert!(s.contains(&(2048, 1152, 384)) && s.contains(&(256, 64, 256)) && s.contains(&(1024, 1024, 1024)));
    }
}
