//! `gelu-mlp`: DiT's feed-forward block, `fc2(gelu_tanh(fc1(x)))` with biases,
//! for all E experts of a layer at once.

use super::{
    check_cache, check_dispatch, check_gathered, check_grads, check_ratio, expert_count, expert_rows,
    experts_with_rows, forward_slices, hidden_width, stacked_shapes, Hidden, Rows,
};
use ecdit_engine::{
    Backend, BackendExt, Expert, ExpertCache, GemmDims, ParamShape, Result, TensorMut, TensorRef, Unary,
};
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
/// Training cache (per dispatched row): `tensors[0]` = fc1 output before
/// GELU [N, h], `tensors[1]` = after GELU [N, h]. Inference keeps nothing.
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

    /// The forward over checked inputs: `n` dispatched rows (read as
    /// `rows` says), params shaped as [`GeluMlp::shapes`].
    #[allow(clippy::too_many_arguments)]
    fn run_forward(
        &self,
        op: &str,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        keep: bool,
        rows: Rows<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        (n, d): (usize, usize),
    ) -> Result<()> {
        let h = self.hidden(d);
        out.expect_len(op, "out", n * d)?;
        let mut out = out.reshape(&[n, d])?;
        let &[w1, b1, w2, b2] = params else {
            unreachable!("the caller checked the parameter count")
        };
        let mut hidden = Hidden::new(backend, cache, keep, 2, n, h, offsets, rows.dtype())?;

        // Per slice of whole experts, run the whole MLP while the slice's
        // hidden activations are still in cache; each projection is one
        // grouped GEMM over the slice's experts.
        for (e0, e1, r0, r1, groups) in forward_slices(offsets) {
            let (m, experts_s) = (r1 - r0, e1 - e0);
            let mut views = hidden.slice(r0, m)?.into_iter();
            let (Some(mut pre), Some(mut act)) = (views.next(), views.next()) else {
                unreachable!("two hidden regions")
            };
            // act = gelu(x @ fc1.weight[e] + fc1.bias[e])   ([m_e, d] @ [d, h] per expert)
            let (w1_s, b1_s) = (w1.rows(e0, experts_s)?, b1.rows(e0, experts_s)?);
            let gelu = Some(Unary::GeluTanh);
            match rows.slice(r0, m)? {
                // The backward needs the pre-activation.
                Rows::Dispatched(x_s) if keep => {
                    backend.gemm_grouped_bias(pre.reborrow(), x_s, w1_s, b1_s, &groups, h, d, false, None)?;
                    backend.unary(Unary::GeluTanh, act.reborrow(), pre.as_ref())?;
                }
                Rows::Dispatched(x_s) => {
                    backend.gemm_grouped_bias(act.reborrow(), x_s, w1_s, b1_s, &groups, h, d, false, gelu)?
                }
                // Only at inference (`forward_gathered`: nothing kept).
                Rows::Gathered { x, rows } => backend.gemm_grouped_bias_gathered(
                    act.reborrow(),
                    x,
                    rows,
                    w1_s,
                    b1_s,
                    &groups,
                    h,
                    d,
                    false,
                    gelu,
                )?,
            }
            // out = act @ fc2.weight[e] + fc2.bias[e]   ([m_e, h] @ [h, d] per expert)
            let out_s = out.reborrow().rows(r0, m)?;
            let (w2_s, b2_s) = (w2.rows(e0, experts_s)?, b2.rows(e0, experts_s)?);
            backend.gemm_grouped_bias(out_s, act.as_ref(), w2_s, b2_s, &groups, d, h, false, None)?;
        }
        Ok(())
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
        stacked_shapes(&names, Self::shapes(d, self.hidden(d), experts))
    }

    fn flops_per_token(&self, d: usize) -> f64 {
        // Two matmuls of d x h; biases and GELU are lower order.
        4.0 * d as f64 * self.hidden(d) as f64
    }

    // out: [N, d]; cache: pre, act [N, h]; x: [N, d]; params: fc1.w, fc1.b, fc2.w, fc2.b
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
        const OP: &str = "gelu-mlp forward";
        let h = self.hidden(d);
        let shapes = Self::shapes(d, h, expert_count(offsets));
        let (n, x, params) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        self.run_forward(
            OP,
            backend,
            out,
            cache,
            keep,
            Rows::Dispatched(x),
            &params,
            offsets,
            (n, d),
        )
    }

    // The same at inference, its first product reading x[rows[i]].
    fn forward_gathered(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        x: TensorRef<'_>,
        rows: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<bool> {
        const OP: &str = "gelu-mlp forward (gathered rows)";
        let h = self.hidden(d);
        let shapes = Self::shapes(d, h, expert_count(offsets));
        let (n, x, rows, params) = check_gathered(OP, (x, rows), params, &shapes, offsets, d)?;
        let input = Rows::Gathered { x, rows };
        self.run_forward(OP, backend, out, cache, false, input, &params, offsets, (n, d))?;
        Ok(true)
    }

    // dx: [N, d]; dparams: += like params; dout: [N, d]; cache: pre, act [N, h]; x: [N, d]
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
        const OP: &str = "gelu-mlp backward";
        let h = self.hidden(d);
        let experts = expert_count(offsets);
        let shapes = Self::shapes(d, h, experts);
        let (n, x, params) = check_dispatch(OP, x, params, &shapes, offsets, d)?;
        dx.expect_len(OP, "dx", n * d)?;
        dout.expect_len(OP, "dout", n * d)?;
        let (dx, dout) = (dx.reshape(&[n, d])?, dout.reshape(&[n, d])?);
        let [pre, act] = check_cache(OP, cache, ["pre-activation", "activation"], n, h)?;
        let &[w1, _b1, w2, _b2] = params.as_slice() else {
            unreachable!("check_dispatch checked the parameter count")
        };
        let [mut dw1, mut db1, mut dw2, mut db2] = check_grads(OP, dparams, &shapes)?;

        let groups = expert_rows(offsets);
        // Backward of `out = act @ fc2.weight + fc2.bias`.
        // dact = dout @ fc2.weight[e]^T   ([m_e, d] @ [d, h] per expert)
        let mut dact = backend.zeros(&[n, h], dout.dtype())?;
        backend.gemm_grouped(dact.view_mut(), dout, w2, &groups, h, d, true, 1.0, 0.0)?;
        for (e, r0, m) in experts_with_rows(offsets) {
            let dout_e = dout.rows(r0, m)?;
            // dfc2.weight += act^T @ dout   ([h, m] @ [m, d])
            backend.gemm(
                dw2.reborrow().rows(e, 1)?.reshape(&[h, d])?,
                act.rows(r0, m)?,
                dout_e,
                None,
                GemmDims::tn(h, d, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(db2.reborrow().rows(e, 1)?.reshape(&[d])?, dout_e, m, d, true)?;
        }
        // Backward of `act = gelu(pre)`.
        let mut dpre = backend.zeros(&[n, h], dout.dtype())?;
        backend.unary_backward(Unary::GeluTanh, dpre.view_mut(), dact.view(), pre)?;
        drop(dact);
        // Backward of `pre = x @ fc1.weight + fc1.bias`.
        for (e, r0, m) in experts_with_rows(offsets) {
            let dpre_e = dpre.view().rows(r0, m)?;
            // dfc1.weight += x^T @ dpre   ([d, m] @ [m, h])
            backend.gemm(
                dw1.reborrow().rows(e, 1)?.reshape(&[d, h])?,
                x.rows(r0, m)?,
                dpre_e,
                None,
                GemmDims::tn(d, h, m),
                1.0,
                1.0,
            )?;
            backend.sum_rows(db1.reborrow().rows(e, 1)?.reshape(&[h])?, dpre_e, m, h, true)?;
        }
        // dx = dpre @ fc1.weight[e]^T   ([m_e, h] @ [h, d] per expert)
        backend.gemm_grouped(dx, dpre.view(), w1, &groups, d, h, true, 1.0, 0.0)
    }
}
