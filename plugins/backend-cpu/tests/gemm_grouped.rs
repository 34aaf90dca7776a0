//! `gemm_grouped`: the CPU override (groups and row tiles side by side on the
//! pool) against the trait's default loop of one `gemm` per group, bit for bit,
//! and against a naive f64 product.

mod common;

use common::*;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{
    AdamW, AttnDims, Backend, Buffer, DType, EngineError, GemmDims, ModChunks, PatchDims, Result, RowDims, TensorMut,
    TensorRef, Unary,
};
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
    fn supports(&self, dtype: DType) -> bool {
        self.0.supports(dtype)
    }
    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        self.0.alloc(bytes)
    }
    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        self.0.upload(dst, src)
    }
    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        self.0.download(dst, src)
    }
    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        self.0.copy(dst, src)
    }
    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        self.0.fill(dst, value)
    }
    fn gemm(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.0.gemm(out, a, b, bias, dims, alpha, beta)
    }
    fn gemm_batched(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.0.gemm_batched(out, a, b, batch, dims, alpha, beta)
    }
    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.0.add_broadcast(out, inp)
    }
    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        self.0.axpby(y, a, x, b)
    }
    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.0.sum_rows(out, inp, rows, cols, accumulate)
    }
    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
        self.0.softmax_rows(out, inp, rows, cols)
    }
    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.0.softmax_rows_backward(dinp, dout, out, rows, cols)
    }
    fn layer_norm(
        &self,
        out: TensorMut<'_>,
        mean: TensorMut<'_>,
        rstd: TensorMut<'_>,
        inp: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        bias: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        self.0.layer_norm(out, mean, rstd, inp, weight, bias, rows, cols, eps)
    }
    fn layer_norm_backward(
        &self,
        dinp: TensorMut<'_>,
        dweight: Option<TensorMut<'_>>,
        dbias: Option<TensorMut<'_>>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        mean: TensorRef<'_>,
        rstd: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.0
            .layer_norm_backward(dinp, dweight, dbias, dout, inp, mean, rstd, weight, rows, cols)
    }
    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.0.unary(op, out, inp)
    }
    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.0.unary_backward(op, dinp, dout, inp)
    }
    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.0.modulate(out, inp, modulation, which, dims)
    }
    fn modulate_backward(
        &self,
        dinp: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.0
            .modulate_backward(dinp, dmodulation, dout, inp, modulation, which, dims)
    }
    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.0.gated_residual(x, y, modulation, which, dims)
    }
    fn gated_residual_backward(
        &self,
        dy: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dx: TensorRef<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.0
            .gated_residual_backward(dy, dmodulation, dx, y, modulation, which, dims)
    }
    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.0.patchify(out, inp, dims)
    }
    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.0.unpatchify(out, inp, dims)
    }
    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()> {
        self.0.timestep_features(out, t, dim, max_period)
    }
    fn attention(
        &self,
        out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        dims: AttnDims,
    ) -> Result<()> {
        self.0.attention(out, probs, q, k, v, key_mask, dims)
    }
    fn attention_backward(
        &self,
        dq: TensorMut<'_>,
        dk: TensorMut<'_>,
        dv: TensorMut<'_>,
        dout: TensorRef<'_>,
        probs: TensorRef<'_>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        dims: AttnDims,
    ) -> Result<()> {
        self.0.attention_backward(dq, dk, dv, dout, probs, q, k, v, dims)
    }
    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()> {
        self.0.gather_rows(out, inp, idx, cols)
    }
    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        self.0.scatter_add_rows(out, inp, idx, scale, cols)
    }
    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        self.0.gather_dot(out, a, idx, b, cols)
    }
    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        self.0.top_k_rows(idx, val, inp, rows, cols, k)
    }
    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()> {
        self.0.router_softmax(out, scores, rows, experts)
    }
    fn top_k_tokens(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        probs: TensorRef<'_>,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()> {
        self.0.top_k_tokens(idx, val, probs, groups, group_rows, experts, k)
    }
    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
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
    be.gemm_grouped_h(&mut out, a, b, groups, n, k, trans_b, alpha, beta)
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
    assert!(be
        .gemm_grouped_h(&mut out, &a, &b, &[2, 4], 3, 4, true, 1.0, 0.0)
        .is_ok());
    err(
        be.gemm_grouped_h(&mut out, &a, &b, &[2, 3], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (out)",
    );
    err(
        be.gemm_grouped_h(&mut out, &a[..20], &b, &[2, 4], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (a)",
    );
    err(
        be.gemm_grouped_h(&mut out, &a, &b, &[2, 4, 0], 3, 4, true, 1.0, 0.0),
        "gemm_grouped (b)",
    );
    err(
        be.gemm_grouped_h(&mut out, &a, &b, &[usize::MAX, 4], 3, 4, true, 1.0, 0.0),
        "gemm_grouped",
    );
    // The default loop checks the same way.
    err(
        DefaultGrouped(be).gemm_grouped_h(&mut out, &a, &b, &[2, 4, 0], 3, 4, true, 1.0, 0.0),
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
