//! The MoE feed-forward layer: router weights, a [`Router`], and E experts of
//! one [`Expert`] kind, with forward and backward side by side.
//!
//! Forward (T tokens of width d, E experts, S dispatched slots):
//! ```text
//! scores = x @ w_router                       // [T, E], f32
//! routing = router.route(scores)              // expert-major dispatch of S slots
//! xs[s] = x[token[s]]                         // gather, [S, d]
//! ys = experts(xs)                            // expert e runs rows offsets[e]..offsets[e+1]
//! out[token[s]] += gate[s] * ys[s]            // combine; a token no expert chose gets 0
//! ```
//! Backward runs the same lines in reverse; the discrete selection is not
//! differentiated (EC-DIT.md section 2, step 6).

use crate::backend::{Backend, GemmDims};
use crate::error::{check_len, EngineError, Result};
use crate::expert::{Expert, ExpertCache};
use crate::router::{RouteShape, Router, Routing};
use crate::tensor::HostTensor;
use rand::Rng;

/// One MoE FFN layer: router weights and the stacked parameters of its experts.
pub struct MoeLayer {
    /// The routing strategy.
    pub router: Box<dyn Router>,
    /// The expert network kind (all E experts share it).
    pub expert: Box<dyn Expert>,
    /// Model width d.
    pub d: usize,
    /// Experts E.
    pub experts: usize,
    /// Router weights, no bias: [d, E].
    pub w_router: HostTensor,
    /// Expert parameters in `expert.param_shapes(d, E)` order, each [E, ...].
    pub params: Vec<HostTensor>,
}

/// What [`MoeLayer::forward`] keeps for [`MoeLayer::backward`], plus the
/// routing statistics. Reuse one cache across calls of
/// [`MoeLayer::forward_into`] to avoid reallocating its buffers.
#[derive(Clone, Debug, Default)]
pub struct MoeCache {
    /// Shape of the last routed batch.
    pub shape: Option<RouteShape>,
    /// Router logits: [T, E].
    pub scores: Vec<f32>,
    /// Dispatch (S slots), router probabilities [T, E], aux loss, statistics.
    pub routing: Routing,
    /// Gathered expert inputs, expert-major: [S, d].
    pub xs: Vec<f32>,
    /// Expert outputs before gating: [S, d].
    pub ys: Vec<f32>,
    /// The experts' own cache.
    pub expert: ExpertCache,
}

/// Gradients of one MoE layer; parameter gradients mirror [`MoeLayer`].
#[derive(Clone, Debug)]
pub struct MoeGrads {
    /// Gradient of the layer input: [T, d].
    pub dx: Vec<f32>,
    /// Gradient of the router weights: [d, E].
    pub dw_router: Vec<f32>,
    /// Gradients of the expert parameters, in `params` order and shapes.
    pub dparams: Vec<HostTensor>,
}

impl MoeLayer {
    /// A layer from given weights; errors if a shape disagrees with `d`, `experts`
    /// and the expert's `param_shapes`.
    pub fn new(
        router: Box<dyn Router>,
        expert: Box<dyn Expert>,
        d: usize,
        experts: usize,
        w_router: HostTensor,
        params: Vec<HostTensor>,
    ) -> Result<Self> {
        if d == 0 || experts == 0 {
            return Err(EngineError::shape(
                "MoeLayer::new",
                "d >= 1 and experts >= 1",
                format!("d = {d}, experts = {experts}"),
            ));
        }
        if w_router.shape != [d, experts] {
            return Err(EngineError::shape(
                "MoeLayer::new (w_router)",
                format!("{:?}", [d, experts]),
                format!("{:?}", w_router.shape),
            ));
        }
        let shapes = expert.param_shapes(d, experts);
        if shapes.len() != params.len() {
            return Err(EngineError::shape(
                format!("MoeLayer::new ({} params)", expert.kind()),
                format!("{} tensors", shapes.len()),
                format!("{} tensors", params.len()),
            ));
        }
        for (want, got) in shapes.iter().zip(&params) {
            if want.shape != got.shape {
                return Err(EngineError::shape(
                    format!("MoeLayer::new ({} param '{}')", expert.kind(), want.name),
                    format!("{:?}", want.shape),
                    format!("{:?}", got.shape),
                ));
            }
        }
        Ok(Self {
            router,
            expert,
            d,
            experts,
            w_router,
            params,
        })
    }

    /// A layer with random weights as DiT initialises its linears: router
    /// weights and every expert matrix (a parameter of rank 3, `[E, out, in]`)
    /// xavier-uniform per expert, vectors (biases, rank 2) zero.
    pub fn new_random<R: Rng + ?Sized>(
        router: Box<dyn Router>,
        expert: Box<dyn Expert>,
        d: usize,
        experts: usize,
        rng: &mut R,
    ) -> Result<Self> {
        let w_router = xavier_uniform(rng, &[d, experts], d, experts);
        let params = expert
            .param_shapes(d, experts)
            .iter()
            .map(|p| match p.shape.as_slice() {
                &[_, fan_out, fan_in] => xavier_uniform(rng, &p.shape, fan_in, fan_out),
                _ => HostTensor::zeros(&p.shape),
            })
            .collect();
        Self::new(router, expert, d, experts, w_router, params)
    }

    /// Expert parameters as slices, in `param_shapes` order.
    pub fn param_slices(&self) -> Vec<&[f32]> {
        self.params.iter().map(|p| p.data.as_slice()).collect()
    }

    /// Forward with fresh buffers. x: [T, d] with `T = shape.tokens()`.
    /// Returns out: [T, d] and the cache for backward.
    pub fn forward(&self, backend: &dyn Backend, x: &[f32], shape: RouteShape) -> Result<(Vec<f32>, MoeCache)> {
        let mut out = vec![0.0; x.len()];
        let mut cache = MoeCache::default();
        self.forward_into(backend, &mut out, &mut cache, x, shape)?;
        Ok((out, cache))
    }

    /// Forward into caller-owned buffers (reused across calls, so a steady
    /// state allocates only the routing tables).
    /// out: [T, d] (overwritten); cache: refilled; x: [T, d].
    pub fn forward_into(
        &self,
        backend: &dyn Backend,
        out: &mut [f32],
        cache: &mut MoeCache,
        x: &[f32],
        shape: RouteShape,
    ) -> Result<()> {
        const OP: &str = "MoeLayer::forward";
        let (d, e_count) = (self.d, self.experts);
        if shape.experts != e_count {
            return Err(EngineError::shape(
                format!("{OP} (route shape experts)"),
                e_count,
                shape.experts,
            ));
        }
        let t_count = shape.tokens();
        check_len(OP, "x", x.len(), t_count * d)?;
        check_len(OP, "out", out.len(), t_count * d)?;

        // scores = x @ w_router   ([T, d] @ [d, E])
        cache.scores.resize(t_count * e_count, 0.0);
        backend.gemm(
            &mut cache.scores,
            x,
            &self.w_router.data,
            GemmDims::nn(t_count, e_count, d),
            1.0,
            0.0,
        )?;
        // routing = router(scores)
        cache.routing = self.router.route(&cache.scores, shape)?;
        cache.shape = Some(shape);
        let dispatch = &cache.routing.dispatch;
        let who = format!("router '{}'", self.router.kind());
        if dispatch.experts != e_count || dispatch.tokens_total != t_count {
            return Err(EngineError::Other(format!(
                "{who}: dispatch is for {} experts and {} tokens, expected {e_count} and {t_count}",
                dispatch.experts, dispatch.tokens_total
            )));
        }
        dispatch.validate(&who)?;
        let slots = dispatch.slots();

        // xs[s] = x[token[s]]
        cache.xs.resize(slots * d, 0.0);
        backend.gather_rows(&mut cache.xs, x, &dispatch.tokens, d)?;
        // ys = experts(xs)
        cache.ys.resize(slots * d, 0.0);
        self.expert.forward(
            backend,
            &mut cache.ys,
            &mut cache.expert,
            &cache.xs,
            &self.param_slices(),
            &dispatch.offsets,
            d,
        )?;
        // out[token[s]] += gate[s] * ys[s]
        out.fill(0.0);
        backend.scatter_add_rows(out, &cache.ys, &dispatch.tokens, Some(&dispatch.gates), d)?;
        Ok(())
    }

    /// Backward of [`MoeLayer::forward`]. `grad_aux` is the loss weight of the
    /// router's auxiliary loss (`d loss / d aux`; 0 when it is not trained on).
    /// cache: from the forward of `x`; x: [T, d]; dout: [T, d].
    pub fn backward(
        &self,
        backend: &dyn Backend,
        cache: &MoeCache,
        x: &[f32],
        dout: &[f32],
        grad_aux: f32,
    ) -> Result<MoeGrads> {
        const OP: &str = "MoeLayer::backward";
        let (d, e_count) = (self.d, self.experts);
        let shape = cache
            .shape
            .ok_or_else(|| EngineError::Other(format!("{OP}: the cache holds no forward pass")))?;
        let t_count = shape.tokens();
        check_len(OP, "x", x.len(), t_count * d)?;
        check_len(OP, "dout", dout.len(), t_count * d)?;
        let dispatch = &cache.routing.dispatch;
        let slots = dispatch.slots();
        check_len(OP, "cache ys", cache.ys.len(), slots * d)?;

        // Backward of the combine `out[token[s]] += gate[s] * ys[s]`:
        // grad_gate[s] = <dout[token[s]], ys[s]>, dys[s] = gate[s] * dout[token[s]].
        let mut grad_gates = vec![0.0f32; slots];
        let mut dys = vec![0.0f32; slots * d];
        for (s, (&t, &gate)) in dispatch.tokens.iter().zip(&dispatch.gates).enumerate() {
            let t = t as usize;
            let dout_t = &dout[t * d..(t + 1) * d];
            let ys_s = &cache.ys[s * d..(s + 1) * d];
            grad_gates[s] = dout_t.iter().zip(ys_s).map(|(a, b)| a * b).sum();
            for (o, &g) in dys[s * d..(s + 1) * d].iter_mut().zip(dout_t) {
                *o = gate * g;
            }
        }
        // Backward of `ys = experts(xs)`.
        let mut dparams: Vec<HostTensor> = self.params.iter().map(|p| HostTensor::zeros(&p.shape)).collect();
        let mut dxs = vec![0.0f32; slots * d];
        {
            let mut dparam_slices: Vec<&mut [f32]> = dparams.iter_mut().map(|p| p.data.as_mut_slice()).collect();
            self.expert.backward(
                backend,
                &mut dxs,
                &mut dparam_slices,
                &dys,
                &cache.expert,
                &cache.xs,
                &self.param_slices(),
                &dispatch.offsets,
                d,
            )?;
        }
        drop(dys);
        // Backward of `routing = router(scores)`: gate (and aux) grads -> logit grads.
        let mut dscores = vec![0.0f32; t_count * e_count];
        self.router
            .backward(&cache.routing, &cache.scores, &grad_gates, grad_aux, &mut dscores)?;
        // Backward of `scores = x @ w_router`.
        // dw_router = x^T @ dscores   ([d, T] @ [T, E])
        let mut dw_router = vec![0.0f32; d * e_count];
        backend.gemm(&mut dw_router, x, &dscores, GemmDims::tn(d, e_count, t_count), 1.0, 0.0)?;
        // dx = dscores @ w_router^T   ([T, E] @ [E, d])
        let mut dx = vec![0.0f32; t_count * d];
        backend.gemm(
            &mut dx,
            &dscores,
            &self.w_router.data,
            GemmDims::nt(t_count, d, e_count),
            1.0,
            0.0,
        )?;
        // Backward of the gather `xs[s] = x[token[s]]`.
        backend.scatter_add_rows(&mut dx, &dxs, &dispatch.tokens, None, d)?;
        Ok(MoeGrads { dx, dw_router, dparams })
    }
}

/// Xavier-uniform `U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`.
fn xavier_uniform<R: Rng + ?Sized>(rng: &mut R, shape: &[usize], fan_in: usize, fan_out: usize) -> HostTensor {
    let a = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt() as f32;
    let n: usize = shape.iter().product();
    HostTensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.gen_range(-a..=a)).collect(),
    }
}
