//! `swiglu`: DiT-MoE's expert, `w2(silu(w1 x) * w3 x)` without biases, for
//! all E experts of a layer at once.

use super::{
    check_cache, check_dispatch, check_grads, check_ratio, expert_count, expert_rows, experts_with_rows,
    forward_slices, hidden_width, reuse,
};
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, Expert, ExpertCache, GemmDims, ParamShape, Result, Unary};
use serde_json::json;

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
/// Cache (per dispatched row, each [N, h]): `buffers[0]` = w1 x,
/// `buffers[1]` = w3 x, `buffers[2]` = silu(w1 x), `buffers[3]` = the product.
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
        ["w1", "w3", "w2"]
            .iter()
            .zip(Self::shapes(d, self.hidden(d), experts))
            .map(|(name, shape)| ParamShape {
                name: name.to_string(),
                shape,
            })
            .collect()
    }

    fn flops_per_token(&self, d: usize) -> f64 {
        // Three matmuls of d x h.
        6.0 * d as f64 * self.hidden(d) as f64
    }

    // out: [N, d]; cache: a, b, s, g [N, h]; x: [N, d]; params: w1, w3, w2
    fn forward(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        cache: &mut ExpertCache,
        x: &[f32],
        params: &[&[f32]],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu forward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let (_, n) = check_dispatch(OP, x, params, &Self::shapes(d, h, experts), offsets, d)?;
        check_len(OP, "out", out.len(), n * d)?;
        let &[w1, w3, w2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        cache.buffers.resize_with(4, Vec::new);
        let [a, b, s, g] = cache.buffers.as_mut_slice() else {
            unreachable!("resized to 4 just above")
        };
        let (a, b, s, g) = (reuse(a, n * h), reuse(b, n * h), reuse(s, n * h), reuse(g, n * h));

        // Per slice of whole experts, run the whole network while the
        // slice's hidden activations are still in cache; each projection is
        // one grouped GEMM over the slice's experts.
        for (e0, e1, r0, r1, groups) in forward_slices(offsets) {
            let (x_s, hid, w) = (&x[r0 * d..r1 * d], r0 * h..r1 * h, e0 * h * d..e1 * h * d);
            let (a_s, b_s) = (&mut a[hid.clone()], &mut b[hid.clone()]);
            let (s_s, g_s) = (&mut s[hid.clone()], &mut g[hid]);
            // a = x @ w1[e], b = x @ w3[e]   ([m_e, d] @ [d, h] per expert)
            backend.gemm_grouped(a_s, x_s, &w1[w.clone()], &groups, h, d, false, 1.0, 0.0)?;
            backend.gemm_grouped(b_s, x_s, &w3[w.clone()], &groups, h, d, false, 1.0, 0.0)?;
            // s = silu(a); g = s * b
            backend.unary(Unary::Silu, s_s, a_s)?;
            for ((g, &s), &b) in g_s.iter_mut().zip(s_s.iter()).zip(b_s.iter()) {
                *g = s * b;
            }
            // out = g @ w2[e]   ([m_e, h] @ [h, d] per expert)
            backend.gemm_grouped(&mut out[r0 * d..r1 * d], g_s, &w2[w], &groups, d, h, false, 1.0, 0.0)?;
        }
        Ok(())
    }

    // dx: [N, d]; dparams: += like params; dout: [N, d]; cache: a, b, s, g [N, h]; x: [N, d]
    fn backward(
        &self,
        backend: &dyn Backend,
        dx: &mut [f32],
        dparams: &mut [&mut [f32]],
        dout: &[f32],
        cache: &ExpertCache,
        x: &[f32],
        params: &[&[f32]],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu backward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let shapes = Self::shapes(d, h, experts);
        let (_, n) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        check_len(OP, "dx", dx.len(), n * d)?;
        check_len(OP, "dout", dout.len(), n * d)?;
        let [a, b, s, g] = check_cache(OP, cache, ["w1 x", "w3 x", "silu", "product"], n * h)?;
        let &[w1, w3, w2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        let [dw1, dw3, dw2] = check_grads(OP, dparams, &shapes)?;

        let groups = expert_rows(offsets);
        // Backward of `out = g @ w2`.
        // dg = dout @ w2[e]^T   ([m_e, d] @ [d, h] per expert)
        let mut dg = vec![0.0f32; n * h];
        backend.gemm_grouped(&mut dg, dout, w2, &groups, h, d, true, 1.0, 0.0)?;
        for (e, r0, r1) in experts_with_rows(offsets) {
            let m = r1 - r0;
            // dw2 += g^T @ dout   ([h, m] @ [m, d])
            let w = e * d * h..(e + 1) * d * h;
            backend.gemm(
                &mut dw2[w],
                &g[r0 * h..r1 * h],
                &dout[r0 * d..r1 * d],
                GemmDims::tn(h, d, m),
                1.0,
                1.0,
            )?;
        }
        // Backward of `g = s * b`: ds = dg * b, db = dg * s.
        let mut ds = vec![0.0f32; n * h];
        let mut db = vec![0.0f32; n * h];
        for i in 0..n * h {
            ds[i] = dg[i] * b[i];
            db[i] = dg[i] * s[i];
        }
        // Backward of `s = silu(a)`; dg is free, reuse it as da.
        let da = &mut dg;
        backend.unary_backward(Unary::Silu, da, &ds, a)?;
        drop(ds);
        // Backward of `a = x @ w1` and `b = x @ w3`.
        for (e, r0, r1) in experts_with_rows(offsets) {
            let m = r1 - r0;
            let x_e = &x[r0 * d..r1 * d];
            let (da_e, db_e) = (&da[r0 * h..r1 * h], &db[r0 * h..r1 * h]);
            let w = e * h * d..(e + 1) * h * d;
            // dw1 += x^T @ da, dw3 += x^T @ db   ([d, m] @ [m, h])
            backend.gemm(&mut dw1[w.clone()], x_e, da_e, GemmDims::tn(d, h, m), 1.0, 1.0)?;
            backend.gemm(&mut dw3[w], x_e, db_e, GemmDims::tn(d, h, m), 1.0, 1.0)?;
        }
        // dx = da @ w1[e]^T + db @ w3[e]^T   ([m_e, h] @ [h, d] per expert)
        backend.gemm_grouped(dx, da, w1, &groups, d, h, true, 1.0, 0.0)?;
        backend.gemm_grouped(dx, &db, w3, &groups, d, h, true, 1.0, 1.0)?;
        Ok(())
    }
}
