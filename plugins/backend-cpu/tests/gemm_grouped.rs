//! `gemm_grouped`: the CPU override (groups and row tiles side by side on the
//! pool) against the trait's default loop of one `gemm` per group, bit for bit,
//! and against a naive f64 product.

mod common;

use common::*;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{AdamW, AttnDims, Backend, EngineError, GemmDims, Result, Unary};
use proptest::prelude::*;
use std::sync::OnceLock;

/// A CPU backend that keeps the trait's default `gemm_grouped` (one `gemm`
/// per group) and forwards every other op.
struct DefaultGrouped<'a>(&'a CpuBackend);

impl Backend for DefaultGrouped<'_> {
    fn name(&self) -> &str {
        "cpu-default-grouped"
    }
    fn threads(&self) -> usize {
        self.0.threads()
    }
    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], dims: GemmDims, alpha: f32, beta: f32) -> Result<()> {
        self.0.gemm(out, a, b, dims, alpha, beta)
    }
    fn gemm_batched(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.0.gemm_batched(out, a, b, batch, dims, alpha, beta)
    }
    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.0.add_bias(out, bias, rows, cols)
    }
    fn sum_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        self.0.sum_rows(out, inp, rows, cols, accumulate)
    }
    fn softmax_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
        self.0.softmax_rows(out, inp, rows, cols)
    }
    fn softmax_rows_backward(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.0.softmax_rows_backward(dinp, dout, out, rows, cols)
    }
    fn layer_norm(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: Option<&[f32]>,
        bias: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        self.0.layer_norm(out, mean, rstd, inp, weight, bias, rows, cols, eps)
    }
    fn layer_norm_backward(
        &self,
        dinp: &mut [f32],
        dweight: Option<&mut [f32]>,
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        weight: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.0
            .layer_norm_backward(dinp, dweight, dbias, dout, inp, mean, rstd, weight, rows, cols)
    }
    fn unary(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.0.unary(op, out, inp)
    }
    fn unary_backward(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        self.0.unary_backward(op, dinp, dout, inp)
    }
    fn attention(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&[u8]>,
        dims: AttnDims,
    ) -> Result<()> {
        self.0.attention(out, probs, q, k, v, key_mask, dims)
    }
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttnDims,
    ) -> Result<()> {
        self.0.attention_backward(dq, dk, dv, dout, probs, q, k, v, dims)
    }
    fn gather_rows(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()> {
        self.0.gather_rows(out, inp, idx, cols)
    }
    fn scatter_add_rows(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()> {
        self.0.scatter_add_rows(out, inp, idx, scale, cols)
    }
    fn top_k_rows(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        self.0.top_k_rows(idx, val, inp, rows, cols, k)
    }
    fn adamw_step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        self.0.adamw_step(param, grad, m, v, hp, step)
    }
}

fn cpu3() -> &'static CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    B.get_or_init(|| CpuBackend::new(3).expect("3-thread pool"))
}

/// One grouped product on `be` from a copy of `out0`.
#[allow(clippy::too_many_arguments)]
fn grouped(
    be: &dyn Backend,
    out0: &[f32],
    a: &[f32],
    b: &[f32],
    groups: &[usize],
    n: usize,
    k: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut out = out0.to_vec();
    be.gemm_grouped(&mut out, a, b, groups, n, k, trans_b, alpha, beta)
        .expect("gemm_grouped");
    out
}

/// Checks the override on 1, 2 and 3 threads against the default loop (bits)
/// and against a naive f64 product per group (values).
#[allow(clippy::too_many_arguments)]
fn check_case(groups: &[usize], n: usize, k: usize, trans_b: bool, alpha: f32, beta: f32, seed: u64, naive: bool) {
    let rows: usize = groups.iter().sum();
    let a = randv(seed, rows * k, 1.0);
    let b = randv(seed ^ 0x5a5a, groups.len() * n * k, 1.0);
    let out0 = randv(seed ^ 0xa5a5, rows * n, 1.0);
    let want = grouped(
        &DefaultGrouped(cpu2()),
        &out0,
        &a,
        &b,
        groups,
        n,
        k,
        trans_b,
        alpha,
        beta,
    );
    for be in [cpu1(), cpu2(), cpu3()] {
        let got = grouped(be, &out0, &a, &b, groups, n, k, trans_b, alpha, beta);
        assert!(
            got == want,
            "groups {groups:?} n {n} k {k} trans_b {trans_b} beta {beta}, {} threads: override != default loop",
            be.threads()
        );
    }
    if naive {
        let mut r0 = 0;
        for (g, &m) in groups.iter().enumerate() {
            let (rows_out, rows_a) = (r0 * n..(r0 + m) * n, r0 * k..(r0 + m) * k);
            let b_g = &b[g * n * k..(g + 1) * n * k];
            let r = ref_gemm(
                &out0[rows_out.clone()],
                &a[rows_a],
                b_g,
                m,
                n,
                k,
                false,
                trans_b,
                alpha,
                beta,
            );
            check_close(&format!("group {g} of {groups:?}"), &want[rows_out], &r, 1e-4, 1e-4).unwrap();
            r0 += m;
        }
    }
}

#[test]
fn grouped_gemm_equals_the_default_loop_on_uneven_and_empty_groups() {
    // Groups tall enough to be split into row tiles, empty groups, groups of
    // one row, k above the gemm crate's 512 block, thin products (its gemv
    // and small-k paths), both weight layouts, beta 0 and not.
    let cases: &[(&[usize], usize, usize)] = &[
        (&[512, 512, 512, 512], 96, 64),
        (&[0, 700, 3, 0, 129, 256, 257, 1], 40, 33),
        (&[1100], 24, 700),
        (&[300, 0, 0, 900], 1, 50),
        (&[600, 300], 2, 40),
        (&[600, 300], 3, 2),
        (&[600, 300], 8, 8),
        (&[0, 0], 16, 8),
        (&[], 16, 8),
        (&[1, 2, 64, 65], 64, 64),
    ];
    for (i, &(groups, n, k)) in cases.iter().enumerate() {
        for trans_b in [true, false] {
            for (alpha, beta) in [(1.0, 0.0), (0.7, 0.3)] {
                check_case(groups, n, k, trans_b, alpha, beta, i as u64, i != 2);
            }
        }
    }
}

#[test]
fn grouped_gemm_with_beta_zero_ignores_nan_in_out() {
    let (groups, n, k) = ([300usize, 0, 260], 8, 16);
    let rows: usize = groups.iter().sum();
    let a = randv(1, rows * k, 1.0);
    let b = randv(2, groups.len() * n * k, 1.0);
    let out0 = vec![f32::NAN; rows * n];
    let got = grouped(cpu2(), &out0, &a, &b, &groups, n, k, true, 1.0, 0.0);
    assert!(got.iter().all(|v| v.is_finite()));
}

#[test]
fn grouped_gemm_wrong_lengths_are_errors_naming_the_buffer() {
    let be = cpu2();
    let (a, b) = (vec![0.0f32; 6 * 4], vec![0.0f32; 2 * 3 * 4]);
    let mut out = vec![0.0f32; 6 * 3];
    let err = |r: Result<()>, needle: &str| match r {
        Err(EngineError::Shape { op, .. }) => assert!(op.contains(needle), "error names '{op}', wanted '{needle}'"),
        other => panic!("expected a shape error naming {needle}, got {other:?}"),
    };
    assert!(be.gemm_grouped(&mut out, &a, &b, &[2, 4], 3, 4, true, 1.0, 0.0).is_ok());
    err(
        be.gemm_grouped(&mut out, &a, &b, &[2, 3], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (out)",
    );
    err(
        be.gemm_grouped(&mut out, &a[..20], &b, &[2, 4], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (a)",
    );
    err(
        be.gemm_grouped(&mut out, &a, &b, &[2, 4, 0], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (b)",
    );
    err(
        be.gemm_grouped(&mut out, &a, &b, &[usize::MAX, 4], 3, 4, true, 1.0, 0.0),
        "gemm_grouped",
    );
    // The default loop checks the same way.
    err(
        DefaultGrouped(be).gemm_grouped(&mut out, &a, &b, &[2, 4, 0], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (b)",
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn grouped_gemm_is_bit_identical_to_the_default_loop(
        groups in prop::collection::vec(prop_oneof![Just(0usize), 1usize..40, 120usize..700], 1..7),
        n in 1usize..80,
        k in 1usize..90,
        trans_b: bool,
        seed: u64,
    ) {
        check_case(&groups, n, k, trans_b, 1.0, 0.0, seed, false);
    }
}
