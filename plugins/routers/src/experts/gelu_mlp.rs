//! `gelu-mlp`: DiT's feed-forward block, `fc2(gelu_tanh(fc1(x)))` with biases,
//! for all E experts of a layer at once.

use super::{check_dispatch, check_ratio, hidden_width, reuse, row_blocks};
use ecdit_engine::error::check_len;
use ecdit_engine::{Backend, EngineError, Expert, ExpertCache, GemmDims, ParamShape, Result, Unary};
use serde_json::json;

/// DiT's MLP `d -> h -> d` (timm `Mlp` with `approx_gelu`), `h = floor(mlp_ratio * d)`.
///
/// Parameters, stacked over the E experts, PyTorch `Linear` layout:
/// - `fc1.weight`: [E, h, d], `fc1.bias`: [E, h]
/// - `fc2.weight`: [E, d, h], `fc2.bias`: [E, d]
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
            vec![experts, h, d],
            vec![experts, h],
            vec![experts, d, h],
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
        let experts = offsets.len().saturating_sub(1);
        let (experts, n) = check_dispatch(OP, x, params, &Self::shapes(d, h, experts), offsets, d)?;
        check_len(OP, "out", out.len(), n * d)?;
        let &[w1, b1, w2, b2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        cache.buffers.resize_with(2, Vec::new);
        let (pre_buf, act_buf) = cache.buffers.split_at_mut(1);
        let pre = reuse(&mut pre_buf[0], n * h);
        let act = reuse(&mut act_buf[0], n * h);

        // Per expert, per block of rows, run the whole MLP while the block's
        // hidden activations are still in cache.
        for e in 0..experts {
            let (w1_e, b1_e) = (&w1[e * h * d..(e + 1) * h * d], &b1[e * h..(e + 1) * h]);
            let (w2_e, b2_e) = (&w2[e * d * h..(e + 1) * d * h], &b2[e * d..(e + 1) * d]);
            for (r0, r1) in row_blocks(offsets[e], offsets[e + 1]) {
                let m = r1 - r0;
                let (pre_b, act_b) = (&mut pre[r0 * h..r1 * h], &mut act[r0 * h..r1 * h]);
                // pre = x @ fc1.weight[e]^T + fc1.bias[e]
                backend.gemm(pre_b, &x[r0 * d..r1 * d], w1_e, GemmDims::nt(m, h, d), 1.0, 0.0)?;
                backend.add_bias(pre_b, b1_e, m, h)?;
                // act = gelu(pre)
                backend.unary(Unary::GeluTanh, act_b, pre_b)?;
                // out = act @ fc2.weight[e]^T + fc2.bias[e]
                let out_b = &mut out[r0 * d..r1 * d];
                backend.gemm(out_b, act_b, w2_e, GemmDims::nt(m, d, h), 1.0, 0.0)?;
                backend.add_bias(out_b, b2_e, m, d)?;
            }
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
        let experts = offsets.len().saturating_sub(1);
        let shapes = Self::shapes(d, h, experts);
        let (experts, n) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        check_len(OP, "dx", dx.len(), n * d)?;
        check_len(OP, "dout", dout.len(), n * d)?;
        let [pre, act] = cache.buffers.as_slice() else {
            return Err(EngineError::shape(
                format!("{OP} (cache)"),
                "2 buffers from forward",
                format!("{} buffers", cache.buffers.len()),
            ));
        };
        check_len(OP, "cache pre-activation", pre.len(), n * h)?;
        check_len(OP, "cache activation", act.len(), n * h)?;
        let &[w1, _b1, w2, _b2] = params else {
            unreachable!("check_dispatch checked the parameter count")
        };
        let [dw1, db1, dw2, db2] = dparams else {
            return Err(EngineError::shape(
                format!("{OP} (dparams)"),
                "4 tensors",
                format!("{} tensors", dparams.len()),
            ));
        };
        for (i, (g, s)) in [&**dw1, &**db1, &**dw2, &**db2].iter().zip(&shapes).enumerate() {
            check_len(OP, &format!("dparams[{i}] {s:?}"), g.len(), s.iter().product())?;
        }

        // Backward of `out = act @ fc2.weight^T + fc2.bias`.
        let mut dact = vec![0.0f32; n * h];
        for e in 0..experts {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            let m = r1 - r0;
            if m == 0 {
                continue;
            }
            let dout_e = &dout[r0 * d..r1 * d];
            // dact = dout @ fc2.weight   ([m, d] @ [d, h])
            backend.gemm(
                &mut dact[r0 * h..r1 * h],
                dout_e,
                &w2[e * d * h..(e + 1) * d * h],
                GemmDims::nn(m, h, d),
                1.0,
                0.0,
            )?;
            // dfc2.weight += dout^T @ act   ([d, m] @ [m, h])
            backend.gemm(
                &mut dw2[e * d * h..(e + 1) * d * h],
                dout_e,
                &act[r0 * h..r1 * h],
                GemmDims::tn(d, h, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(&mut db2[e * d..(e + 1) * d], dout_e, m, d, true)?;
        }
        // Backward of `act = gelu(pre)`.
        let mut dpre = vec![0.0f32; n * h];
        backend.unary_backward(Unary::GeluTanh, &mut dpre, &dact, pre)?;
        drop(dact);
        // Backward of `pre = x @ fc1.weight^T + fc1.bias`.
        for e in 0..experts {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            let m = r1 - r0;
            if m == 0 {
                continue;
            }
            let dpre_e = &dpre[r0 * h..r1 * h];
            let w1_e = &w1[e * h * d..(e + 1) * h * d];
            // dfc1.weight += dpre^T @ x   ([h, m] @ [m, d])
            backend.gemm(
                &mut dw1[e * h * d..(e + 1) * h * d],
                dpre_e,
                &x[r0 * d..r1 * d],
                GemmDims::tn(h, d, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(&mut db1[e * h..(e + 1) * h], dpre_e, m, h, true)?;
            // dx = dpre @ fc1.weight   ([m, h] @ [h, d])
            backend.gemm(&mut dx[r0 * d..r1 * d], dpre_e, w1_e, GemmDims::nn(m, d, h), 1.0, 0.0)?;
        }
        Ok(())
    }
}
