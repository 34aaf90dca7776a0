//! Helpers shared by the CPU backend's integration tests.
#![allow(dead_code)]

pub mod host_ops;
#[allow(unused_imports)]
pub use host_ops::*;

use ecdit_backend_cpu::CpuBackend;
use proptest::test_runner::TestCaseError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

/// A shared backend with one thread.
pub fn cpu1() -> &'static CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    B.get_or_init(|| CpuBackend::new(1).expect("1-thread pool"))
}

/// A shared backend with two threads.
pub fn cpu2() -> &'static CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    B.get_or_init(|| CpuBackend::new(2).expect("2-thread pool"))
}

/// Whether oneDNN loaded here; when not, says why and returns false, unless
/// `ECDIT_REQUIRE_ONEDNN=1` (set where the library is installed, as in CI),
/// which makes a missing library fail the test.
pub fn onednn_present() -> bool {
    match ecdit_backend_cpu::onednn::library() {
        Ok(_) => true,
        Err(reason) => {
            assert!(
                std::env::var("ECDIT_REQUIRE_ONEDNN").map_or(true, |v| v != "1"),
                "ECDIT_REQUIRE_ONEDNN=1 but {reason}"
            );
            eprintln!("skipped, oneDNN missing: {reason}");
            false
        }
    }
}

/// `n` uniform values in `[-scale, scale)` from `seed`.
pub fn randv(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// `sum_i w[i] * y[i]` in f64: the scalar loss of the gradient checks.
pub fn weighted_sum(w: &[f32], y: &[f32]) -> f64 {
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Checks `got` against `want` element-wise with `|g - w| <= atol + rtol * |w|`,
/// reporting the worst element and the first mismatches (llm.c's check_tensor).
pub fn check_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<(), TestCaseError> {
    if got.len() != want.len() {
        return Err(TestCaseError::fail(format!(
            "{name}: length {} != expected {}",
            got.len(),
            want.len()
        )));
    }
    let mut bad = Vec::new();
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        worst = worst.max(diff);
        if diff.is_nan() || diff > atol + rtol * w.abs() {
            bad.push(format!("[{i}] got {g} want {w}"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{name}: {} of {} mismatch (max |diff| {worst}); first: {}",
            bad.len(),
            got.len(),
            bad[..bad.len().min(5)].join(", ")
        )))
    }
}

/// Central-difference gradient check of `loss` at `x` against `analytic`.
/// Tolerance scales with the largest analytic entry, so f32 rounding in the
/// loss does not fail tiny gradients.
pub fn fd_check(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    mut loss: impl FnMut(&[f32]) -> f64,
    h: f32,
    tol: f64,
) -> Result<(), TestCaseError> {
    let scale = analytic.iter().fold(1.0f64, |m, &g| m.max(g.abs() as f64));
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let diff = (numeric - analytic[i] as f64).abs();
        if diff > tol * scale {
            return Err(TestCaseError::fail(format!(
                "{name}[{i}]: analytic {} vs numeric {numeric} (|diff| {diff}, allowed {})",
                analytic[i],
                tol * scale
            )));
        }
    }
    Ok(())
}

/// Naive `alpha * op(a) @ op(b) + beta * out` in f64 (beta == 0 ignores `out`).
#[allow(clippy::too_many_arguments)]
pub fn ref_gemm(
    out: &[f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut res = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                acc += av as f64 * bv as f64;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * out[i * n + j] as f64
            };
            res[i * n + j] = (alpha as f64 * acc + old) as f32;
        }
    }
    res
}

/// Naive grouped-query attention in f64: returns (out [B,Tq,H,Dh], probs [B,H,Tq,Tk]).
#[allow(clippy::too_many_arguments)]
pub fn ref_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[u8]>,
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    dh: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0f32; b * tq * h * dh];
    let mut probs = vec![0.0f32; b * h * tq * tk];
    let scale = 1.0 / (dh as f64).sqrt();
    for bi in 0..b {
        for hi in 0..h {
            let hk = hi / (h / hkv);
            for i in 0..tq {
                let qrow = &q[((bi * tq + i) * h + hi) * dh..][..dh];
                let keep = |j: usize| mask.is_none_or(|m| m[bi * tk + j] != 0);
                let s: Vec<f64> = (0..tk)
                    .map(|j| {
                        let krow = &k[((bi * tk + j) * hkv + hk) * dh..][..dh];
                        scale * qrow.iter().zip(krow).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>()
                    })
                    .collect();
                let max = (0..tk)
                    .filter(|&j| keep(j))
                    .map(|j| s[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = (0..tk)
                    .map(|j| if keep(j) { (s[j] - max).exp() } else { 0.0 })
                    .collect();
                let z: f64 = e.iter().sum();
                for j in 0..tk {
                    let p = e[j] / z;
                    probs[((bi * h + hi) * tq + i) * tk + j] = p as f32;
                    let vrow = &v[((bi * tk + j) * hkv + hk) * dh..][..dh];
                    for d in 0..dh {
                        out[((bi * tq + i) * h + hi) * dh + d] += (p * vrow[d] as f64) as f32;
                    }
                }
            }
        }
    }
    (out, probs)
}
