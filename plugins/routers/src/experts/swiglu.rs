//! `swiglu`: DiT-MoE's expert, `w2(silu(w1 x) * w3 x)` without biases, for
//! all E experts of a layer at once.

use super::{
    check_cache, check_dispatch, check_grads, check_ratio, expert_count, expert_rows, experts_with_rows,
    forward_slices, hidden_width, stacked_shapes, Hidden,
};
use ecdit_engine::{
    Backend, BackendExt, Expert, ExpertCache, GemmDims, ModChunks, ParamShape, Result, RowDims, TensorMut, TensorRef,
    Unary,
};
use serde_json::json;

/// The element-wise product `g = s * b` of two [rows, h] tensors is the
/// backend's `gated_residual` with one token per row and `b` as a
/// one-chunk modulation: `g[r, :] += b[r, :] * s[r, :]` on a zeroed `g`
/// (exact: `0 + b s` rounds once, like `s * b`). Its backward gives both
/// factors' gradients in one op.
const PRODUCT: ModChunks = ModChunks {
    chunks: 1,
    first: 0,
    second: 0,
};

/// [`PRODUCT`]'s dimensions for `rows` rows of width `h`.
fn product_dims(rows: usize, h: usize) -> RowDims {
    RowDims {
        batch: rows,
        tokens: 1,
        d: h,
    }
}

/// DiT-MoE's `MoeMLP`: `w2(silu(w1 x) * w3 x)`, no biases.
///
/// Hidden width `h = floor(mlp_ratio * d)` with `mlp_ratio` 4 by default, as
/// DiT-MoE's `SparseMoeBlock` (`intermediate_size = mlp_ratio * embed_dim`;
/// no LLaMA-style 2/3 shrink, so a SwiGLU expert has 1.5x the parameters and
/// FLOPs of a GELU MLP of the same ratio).
///
/// Parameters, stacked over the E experts, input-major (`[in, out]`, the
/// transpose of PyTorch's `Linear`; see [`super::GeluMlp`] for why):
/// - `w1` (DiT-MoE `gate_proj`): [E, d, h]
/// - `w3` (`up_proj`): [E, d, h]
/// - `w2` (`down_proj`): [E, h, d]
///
/// Training cache (per dispatched row, each [N, h]): `tensors[0]` = w1 x,
/// `tensors[1]` = w3 x, `tensors[2]` = silu(w1 x), `tensors[3]` = the
/// product. Inference keeps nothing (the product reuses w1 x's scratch).
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGlu {
    mlp_ratio: f64,
}

impl SwiGlu {
    /// Registry kind.
    pub const KIND: &'static str = "swiglu";

    /// An expert with hidden width `floor(mlp_ratio * d)`; errors unless
    /// `mlp_ratio` is finite and positive.
    pub fn new(mlp_ratio: f64) -> Result<Self> {
        check_ratio(Self::KIND, mlp_ratio)?;
        Ok(Self { mlp_ratio })
    }

    fn shapes(d: usize, h: usize, experts: usize) -> Vec<Vec<usize>> {
        vec![vec![experts, d, h], vec![experts, d, h], vec![experts, h, d]]
    }
}

impl Expert for SwiGlu {
    fn kind(&self) -> &str {
        Self::KIND
    }

    fn spec(&self) -> serde_json::Value {
        json!({"kind": Self::KIND, "mlp_ratio": self.mlp_ratio})
    }

    fn hidden(&self, d: usize) -> usize {
        hidden_width(self.mlp_ratio, d)
    }

    fn param_shapes(&self, d: usize, experts: usize) -> Vec<ParamShape> {
        stacked_shapes(&["w1", "w3", "w2"], Self::shapes(d, self.hidden(d), experts))
    }

    fn flops_per_token(&self, d: usize) -> f64 {
        // Three matmuls of d x h.
        6.0 * d as f64 * self.hidden(d) as f64
    }

    // out: [N, d]; cache: a, b, s, g [N, h]; x: [N, d]; params: w1, w3, w2
    fn forward(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        keep: bool,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu forward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let (n, x, params) = check_dispatch(OP, x, params, &Self::shapes(d, h, experts), offsets, d)?;
        out.expect_len(OP, "out", n * d)?;
        let mut out = out.reshape(&[n, d])?;
        let &[w1, w3, w2] = params.as_slice() else {
            unreachable!("check_dispatch checked the parameter count")
        };
        // Training keeps a, b, s and g; inference writes g over a (dead by then).
        let regions = if keep { 4 } else { 3 };
        let mut hidden = Hidden::new(backend, cache, keep, regions, n, h, offsets, x.dtype())?;

        // Per slice of whole experts, run the whole network while the
        // slice's hidden activations are still in cache; each projection is
        // one grouped GEMM over the slice's experts.
        for (e0, e1, r0, r1, groups) in forward_slices(offsets) {
            let (m, experts_s) = (r1 - r0, e1 - e0);
            let x_s = x.rows(r0, m)?;
            let mut views = hidden.slice(r0, m)?.into_iter();
            let (Some(mut a), Some(mut b), Some(mut s)) = (views.next(), views.next(), views.next()) else {
                unreachable!("at least three hidden regions")
            };
            // a = x @ w1[e], b = x @ w3[e]   ([m_e, d] @ [d, h] per expert)
            backend.gemm_grouped(
                a.reborrow(),
                x_s,
                w1.rows(e0, experts_s)?,
                &groups,
                h,
                d,
                false,
                1.0,
                0.0,
            )?;
            backend.gemm_grouped(
                b.reborrow(),
                x_s,
                w3.rows(e0, experts_s)?,
                &groups,
                h,
                d,
                false,
                1.0,
                0.0,
            )?;
            // s = silu(a); g = s * b
            backend.unary(Unary::Silu, s.reborrow(), a.as_ref())?;
            let mut g = match views.next() {
                Some(g) => g,
                None => a,
            };
            backend.fill(g.reborrow(), 0.0)?;
            backend.gated_residual(g.reborrow(), s.as_ref(), b.as_ref(), PRODUCT, product_dims(m, h))?;
            // out = g @ w2[e]   ([m_e, h] @ [h, d] per expert)
            let out_s = out.reborrow().rows(r0, m)?;
            backend.gemm_grouped(
                out_s,
                g.as_ref(),
                w2.rows(e0, experts_s)?,
                &groups,
                d,
                h,
                false,
                1.0,
                0.0,
            )?;
        }
        Ok(())
    }

    // dx: [N, d]; dparams: += like params; dout: [N, d]; cache: a, b, s, g [N, h]; x: [N, d]
    fn backward(
        &self,
        backend: &dyn Backend,
        dx: TensorMut<'_>,
        dparams: &mut [TensorMut<'_>],
        dout: TensorRef<'_>,
        cache: &ExpertCache,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu backward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let shapes = Self::shapes(d, h, experts);
        let (n, x, params) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        dx.expect_len(OP, "dx", n * d)?;
        dout.expect_len(OP, "dout", n * d)?;
        let (mut dx, dout) = (dx.reshape(&[n, d])?, dout.reshape(&[n, d])?);
        let [a, b, s, g] = check_cache(OP, cache, ["w1 x", "w3 x", "silu", "product"], n, h)?;
        let &[w1, w3, w2] = params.as_slice() else {
            unreachable!("check_dispatch checked the parameter count")
        };
        let [mut dw1, mut dw3, mut dw2] = check_grads(OP, dparams, &shapes)?;

        let groups = expert_rows(offsets);
        // Backward of `out = g @ w2`.
        // dg = dout @ w2[e]^T   ([m_e, d] @ [d, h] per expert)
        let mut dg = backend.zeros(&[n, h], dout.dtype())?;
        backend.gemm_grouped(dg.view_mut(), dout, w2, &groups, h, d, true, 1.0, 0.0)?;
        for (e, r0, m) in experts_with_rows(offsets) {
            // dw2 += g^T @ dout   ([h, m] @ [m, d])
            backend.gemm(
                dw2.reborrow().rows(e, 1)?.reshape(&[h, d])?,
                g.rows(r0, m)?,
                dout.rows(r0, m)?,
                None,
                GemmDims::tn(h, d, m),
                1.0,
                1.0,
            )?;
        }
        // Backward of `g = s * b`: ds = dg * b, db = dg * s.
        let mut ds = backend.zeros(&[n, h], dout.dtype())?;
        let mut db = backend.zeros(&[n, h], dout.dtype())?;
        backend.gated_residual_backward(
            ds.view_mut(),
            db.view_mut(),
            dg.view(),
            s,
            b,
            PRODUCT,
            product_dims(n, h),
        )?;
        // Backward of `s = silu(a)`; dg is free, reuse it as da.
        let mut da = dg;
        backend.unary_backward(Unary::Silu, da.view_mut(), ds.view(), a)?;
        drop(ds);
        // Backward of `a = x @ w1` and `b = x @ w3`.
        for (e, r0, m) in experts_with_rows(offsets) {
            let x_e = x.rows(r0, m)?;
            // dw1 += x^T @ da, dw3 += x^T @ db   ([d, m] @ [m, h])
            let dims = GemmDims::tn(d, h, m);
            let dw1_e = dw1.reborrow().rows(e, 1)?.reshape(&[d, h])?;
            backend.gemm(dw1_e, x_e, da.view().rows(r0, m)?, None, dims, 1.0, 1.0)?;
            let dw3_e = dw3.reborrow().rows(e, 1)?.reshape(&[d, h])?;
            backend.gemm(dw3_e, x_e, db.view().rows(r0, m)?, None, dims, 1.0, 1.0)?;
        }
        // dx = da @ w1[e]^T + db @ w3[e]^T   ([m_e, h] @ [h, d] per expert)
        backend.gemm_grouped(dx.reborrow(), da.view(), w1, &groups, d, h, true, 1.0, 0.0)?;
        backend.gemm_grouped(dx, db.view(), w3, &groups, d, h, true, 1.0, 1.0)
    }
}
