//! `gelu-mlp`: DiT's feed-forward block, `fc2(gelu_tanh(fc1(x)))` with biases,
//! for all E experts of a layer at once.

use super::{
    add_group_bias, check_cache, check_dispatch, check_grads, check_ratio, expert_count, expert_rows,
    experts_with_rows, forward_slices, hidden_width, reuse,
};
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, Expert, ExpertCache, GemmDims, ParamShape, Result, Unary};
use serde_json::json;

/// DiT's MLP `d -> h -> d` (timm `Mlp` with `approx_gelu`), `h = floor(mlp_ratio * d)`.
///
/// Parameters, stacked over the E experts, weights input-major (`[in, out]`,
/// the transpose of PyTorch's `Linear`, so `y = x W + b`):
/// - `fc1.weight`: [E, d, h], `fc1.bias`: [E, h]
/// - `fc2.weight`: [E, h, d], `fc2.bias`: [E, d]
///
/// Input-major because the GEMM then reads each expert's weight as stored
/// instead of repacking a transposed view on every call; at equal FLOPs the
/// experts hold E/k times the weights of a dense FFN, so that packing was the
/// MoE layer's main overhead over dense (docs/PERFORMANCE.md).
///
/// Cache (per dispatched row): `buffers[0]` = fc1 output before GELU [N, h],
/// `buffers[1]` = after GELU [N, h].
#[derive(Clone, Debug, PartialEq)]
pub struct GeluMlp {
    mlp_ratio: f64,
}

impl GeluMlp {
    /// Registry kind.
    pub const KIND: &'static str = "gelu-mlp";

    /// An expert with hidden width `floor(mlp_ratio * d)`; errors unless
    /// `mlp_ratio` is finite and positive.
    pub fn new(mlp_ratio: f64) -> Result<Self> {
        check_ratio(Self::KIND, mlp_ratio)?;
        Ok(Self { mlp_ratio })
    }

    fn shapes(d: usize, h: usize, experts: usize) -> Vec<Vec<usize>> {
        vec![
            vec![experts, d, h],
            vec![experts, h],
            vec![experts, h, d],
            vec![experts, d],
        ]
    }
}

impl Expert for GeluMlp {
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
        let names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
        names
            .iter()
            .zip(Self::shapes(d, self.hidden(d), experts))
            .map(|(name, shape)| ParamShape {
                name: name.to_string(),
                shape,
            })
            .collect()
    }

    fn flops_per_token(&self, d: usize) -> f64 {
        // Two matmuls of d x h; biases and GELU are lower order.
        4.0 * d as f64 * self.hidden(d) as f64
    }

    // out: [N, d]; cache: pre, act [N, h]; x: [N, d]; params: fc1.w, fc1.b, fc2.w, fc2.b
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
        const OP: &str = "gelu-mlp forward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let (_, n) = check_dispatch(OP, x, params, &Self::shapes(d, h, experts), offsets, d)?;
        check_len(OP, "out", out.len(), n * d)?;
        let &[w1, b1, w2, b2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        cache.buffers.resize_with(2, Vec::new);
        let (pre_buf, act_buf) = cache.buffers.split_at_mut(1);
        let pre = reuse(&mut pre_buf[0], n * h);
        let act = reuse(&mut act_buf[0], n * h);

        // Per slice of whole experts, run the whole MLP while the slice's
        // hidden activations are still in cache; each projection is one
        // grouped GEMM over the slice's experts.
        for (e0, e1, r0, r1, groups) in forward_slices(offsets) {
            let (pre_s, act_s) = (&mut pre[r0 * h..r1 * h], &mut act[r0 * h..r1 * h]);
            // pre = x @ fc1.weight[e] + fc1.bias[e]   ([m_e, d] @ [d, h] per expert)
            let w1_s = &w1[e0 * h * d..e1 * h * d];
            backend.gemm_grouped(pre_s, &x[r0 * d..r1 * d], w1_s, &groups, h, d, false, 1.0, 0.0)?;
            add_group_bias(backend, pre_s, &b1[e0 * h..e1 * h], &groups, h)?;
            // act = gelu(pre)
            backend.unary(Unary::GeluTanh, act_s, pre_s)?;
            // out = act @ fc2.weight[e] + fc2.bias[e]   ([m_e, h] @ [h, d] per expert)
            let out_s = &mut out[r0 * d..r1 * d];
            let w2_s = &w2[e0 * d * h..e1 * d * h];
            backend.gemm_grouped(out_s, act_s, w2_s, &groups, d, h, false, 1.0, 0.0)?;
            add_group_bias(backend, out_s, &b2[e0 * d..e1 * d], &groups, d)?;
        }
        Ok(())
    }

    // dx: [N, d]; dparams: += like params; dout: [N, d]; cache: pre, act [N, h]; x: [N, d]
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
        const OP: &str = "gelu-mlp backward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let shapes = Self::shapes(d, h, experts);
        let (_, n) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        check_len(OP, "dx", dx.len(), n * d)?;
        check_len(OP, "dout", dout.len(), n * d)?;
        let [pre, act] = check_cache(OP, cache, ["pre-activation", "activation"], n * h)?;
        let &[w1, _b1, w2, _b2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        let [dw1, db1, dw2, db2] = check_grads(OP, dparams, &shapes)?;

        let groups = expert_rows(offsets);
        // Backward of `out = act @ fc2.weight + fc2.bias`.
        // dact = dout @ fc2.weight[e]^T   ([m_e, d] @ [d, h] per expert)
        let mut dact = vec![0.0f32; n * h];
        backend.gemm_grouped(&mut dact, dout, w2, &groups, h, d, true, 1.0, 0.0)?;
        for (e, r0, r1) in experts_with_rows(offsets) {
            let m = r1 - r0;
            let dout_e = &dout[r0 * d..r1 * d];
            // dfc2.weight += act^T @ dout   ([h, m] @ [m, d])
            backend.gemm(
                &mut dw2[e * d * h..(e + 1) * d * h],
                &act[r0 * h..r1 * h],
                dout_e,
                GemmDims::tn(h, d, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(&mut db2[e * d..(e + 1) * d], dout_e, m, d, true)?;
        }
        // Backward of `act = gelu(pre)`.
        let mut dpre = vec![0.0f32; n * h];
        backend.unary_backward(Unary::GeluTanh, &mut dpre, &dact, pre)?;
        drop(dact);
        // Backward of `pre = x @ fc1.weight + fc1.bias`.
        for (e, r0, r1) in experts_with_rows(offsets) {
            let m = r1 - r0;
            let dpre_e = &dpre[r0 * h..r1 * h];
            // dfc1.weight += x^T @ dpre   ([d, m] @ [m, h])
            backend.gemm(
                &mut dw1[e * h * d..(e + 1) * h * d],
                &x[r0 * d..r1 * d],
                dpre_e,
                GemmDims::tn(d, h, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(&mut db1[e * h..(e + 1) * h], dpre_e, m, h, true)?;
        }
        // dx = dpre @ fc1.weight[e]^T   ([m_e, h] @ [h, d] per expert)
        backend.gemm_grouped(dx, &dpre, w1, &groups, d, h, true, 1.0, 0.0)?;
        Ok(())
    }
}
