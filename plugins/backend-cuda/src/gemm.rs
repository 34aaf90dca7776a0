//! Row-major gemm on column-major cuBLAS.
//!
//! A row-major `[r, c]` buffer read column-major is its transpose `[c, r]`. So the
//! row-major product `C = op(A) op(B)` ([m, n]) is computed as the column-major product
//! `C^T = op(B)^T op(A)^T` ([n, m], ldc = n): cuBLAS's first operand is our `b`, its
//! second our `a`, and each is transposed exactly when the engine's flag says so.
//!
//! Precision: f32 products run in f32 (`CUBLAS_COMPUTE_32F`); with the
//! backend's `tf32` parameter, products whose every dimension exceeds
//! [`TF32_MIN_DIM`] may use TF32 tensor cores. A router's products always have
//! one dimension equal to the expert count (logits `[tokens, E]`, their weight
//! gradient `[E, d]`, the input gradient's contraction over E), so router
//! logits never see TF32. bf16 x bf16 products run on tensor cores with f32
//! accumulation (`CUDA_R_16BF` operands, `CUBLAS_COMPUTE_32F`).

use crate::probe::cuda_error;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::GemmConfig;
use ecdit_engine::{GemmDims, Result};
use std::ffi::c_int;

/// Products with a dimension at or below this stay full f32 even with TF32 on.
pub const TF32_MIN_DIM: usize = 256;

/// Whether a TF32 backend may run `dims` on TF32 tensor cores.
pub fn tf32_allowed(dims: GemmDims) -> bool {
    dims.m > TF32_MIN_DIM && dims.n > TF32_MIN_DIM && dims.k > TF32_MIN_DIM
}

fn to_c_int(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| cuda_error(format!("gemm: {what} = {v} exceeds cuBLAS's 32-bit int")))
}

/// The cuBLAS (column-major) call that computes the engine's row-major
/// `out[m, n] = alpha * op(a) @ op(b) + beta * out`.
pub fn cublas_config(dims: GemmDims, alpha: f32, beta: f32) -> Result<GemmConfig<f32>> {
    let (m, n, k) = (to_c_int("m", dims.m)?, to_c_int("n", dims.n)?, to_c_int("k", dims.k)?);
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    Ok(GemmConfig {
        // First operand op(B)^T [n, k]: b is [k, n] (ld n) or, transposed, [n, k] (ld k).
        transa: op(dims.trans_b),
        // Second operand op(A)^T [k, m]: a is [m, k] (ld k) or, transposed, [k, m] (ld m).
        transb: op(dims.trans_a),
        m: n,
        n: m,
        k,
        alpha,
        lda: if dims.trans_b { k } else { n },
        ldb: if dims.trans_a { m } else { k },
        beta,
        ldc: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS's sgemm computes, column-major, straight from its documentation.
    fn reference_sgemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let t = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        for j in 0..cfg.n as usize {
            for i in 0..cfg.m as usize {
                let mut acc = 0.0;
                for l in 0..cfg.k as usize {
                    // op(A)[i, l], op(B)[l, j], column-major with leading dimensions.
                    let av = if t(cfg.transa) {
                        a[l + i * cfg.lda as usize]
                    } else {
                        a[i + l * cfg.lda as usize]
                    };
                    let bv = if t(cfg.transb) {
                        b[j + l * cfg.ldb as usize]
                    } else {
                        b[l + j * cfg.ldb as usize]
                    };
                    acc += av * bv;
                }
                let ci = i + j * cfg.ldc as usize;
                c[ci] = cfg.alpha * acc + cfg.beta * c[ci];
            }
        }
    }

    #[test]
    fn mapping_reproduces_row_major_products_for_all_transposes() {
        let (m, n, k) = (3, 5, 4);
        let val = |i: usize, s: f32| ((i * 7 + 3) % 11) as f32 * s - 2.0;
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let dims = GemmDims {
                m,
                n,
                k,
                trans_a,
                trans_b,
            };
            let a: Vec<f32> = (0..m * k).map(|i| val(i, 0.5)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i, 0.25)).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| val(i, 0.1)).collect();
            // Row-major truth.
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for l in 0..k {
                        let av = if trans_a { a[l * m + i] } else { a[i * k + l] };
                        let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                        acc += av * bv;
                    }
                    want[i * n + j] = 1.5 * acc + 0.5 * c0[i * n + j];
                }
            }
            let cfg = cublas_config(dims, 1.5, 0.5).unwrap();
            let mut got = c0.clone();
            // cuBLAS's A is our b, its B our a.
            reference_sgemm(&cfg, &b, &a, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "trans_a {trans_a} trans_b {trans_b}: {got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn router_sized_products_never_get_tf32() {
        let (tokens, d, experts) = (8192, 1152, 64);
        assert!(tf32_allowed(GemmDims::nt(tokens, 4 * d, d)));
        // logits, their weight gradient, the input gradient through the router.
        assert!(!tf32_allowed(GemmDims::nt(tokens, experts, d)));
        assert!(!tf32_allowed(GemmDims::tn(experts, d, tokens)));
        assert!(!tf32_allowed(GemmDims::nn(tokens, d, experts)));
        assert!(!tf32_allowed(GemmDims::nn(TF32_MIN_DIM, 4096, 4096)));
    }

    #[test]
    fn dims_beyond_c_int_are_errors() {
        let e = cublas_config(GemmDims::nn(1 << 31, 1, 1), 1.0, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m = 2147483648") && e.contains("cuda"), "{e}");
    }
}
