//! The MoE feed-forward layer: router weights, a [`Router`], and E experts of
//! one [`Expert`] kind, with forward and backward side by side, on tensors of
//! a backend.
//!
//! Forward (T tokens of width d, E experts, S dispatched slots):
//! ```text
//! scores = x @ w_router                       // [T, E], f32
//! routing = router.route_on(scores)           // expert-major dispatch of S slots
//! xs[s] = x[token[s]]                         // gather, [S, d]
//! ys = experts(xs)                            // expert e runs rows offsets[e]..offsets[e+1]
//! out[token[s]] += gate[s] * ys[s]            // combine; a token no expert chose gets 0
//! ```
//! Backward runs the same lines in reverse; the discrete selection is not
//! differentiated (EC-DIT.md section 2, step 6). Every line is a backend op:
//! the host sees only the E + 1 slot offsets (static under expert choice).

use crate::backend::{Backend, GemmDims, ModChunks, RowDims};
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::expert::{Expert, ExpertCache};
use crate::param::{Init, Layout, Param, Params};
use crate::router::{DeviceRouting, RouteShape, Router};
use crate::tensor::{Tensor, TensorMut, TensorRef};
use crate::transfer::BackendExt;
use rand::Rng;
use std::sync::Arc;

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
    /// Router weights, no bias: `router.weight` `[E, d]` on disk (PyTorch
    /// `Linear`), held input-major `[d, E]` so `scores = x @ w` reads it as stored.
    pub w_router: Param,
    /// Expert parameters in `expert.param_shapes(d, E)` order, each `[E, ...]`,
    /// named `experts.<name>`.
    pub params: Vec<Param>,
}

/// The tensors of [`MoeLayer::forward`]: what [`MoeLayer::backward`] reads
/// after a forward with `keep`, and scratch otherwise. Reuse one cache across
/// calls: tensors of an unchanged shape are not reallocated.
#[derive(Debug, Default)]
pub struct MoeCache {
    /// Shape of the last routed batch.
    pub shape: Option<RouteShape>,
    /// Router logits: [T, E] f32.
    pub scores: Option<Tensor>,
    /// The routing of the last forward (also returned by it).
    pub routing: Option<Arc<DeviceRouting>>,
    /// Gathered expert inputs, expert-major: [S, d] (not written by an
    /// inference forward whose experts gather inside their first product).
    pub xs: Option<Tensor>,
    /// Expert outputs before gating: [S, d].
    pub ys: Option<Tensor>,
    /// The experts' own cache.
    pub expert: ExpertCache,
}

/// Parameter gradients of one MoE layer, f32 in the parameters' memory shapes;
/// [`MoeLayer::backward`] accumulates into them.
#[derive(Debug)]
pub struct MoeGrads {
    /// Gradient of the router weights: [d, E].
    pub dw_router: Tensor,
    /// Gradients of the expert parameters, in `params` order and memory shapes.
    pub dparams: Vec<Tensor>,
}

/// `prefix.name`, or `name` for an empty prefix.
fn dotted(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl MoeLayer {
    /// A layer with zero weights on `backend`, stored as `dtype`; parameter
    /// names start with `name_prefix` (e.g. `blocks.1.moe`, or empty).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        router: Box<dyn Router>,
        expert: Box<dyn Expert>,
        d: usize,
        experts: usize,
        backend: &dyn Backend,
        dtype: DType,
        name_prefix: &str,
    ) -> Result<Self> {
        if d == 0 || experts == 0 {
            return Err(EngineError::shape(
                "MoeLayer::new",
                "d >= 1 and experts >= 1",
                format!("d = {d}, experts = {experts}"),
            ));
        }
        if !dtype.is_float() {
            return Err(EngineError::shape("MoeLayer::new (dtype)", "f32 or bf16", dtype));
        }
        // Router math stays f32 whatever the experts' dtype (EC-DIT.md section 6).
        let w_router = Param::new(
            backend,
            dotted(name_prefix, "router.weight"),
            &[experts, d],
            DType::F32,
            Layout::InputMajor,
            Init::XavierUniform {
                fan_in: d,
                fan_out: experts,
            },
        )?;
        let experts_prefix = dotted(name_prefix, "experts");
        let params = expert
            .param_shapes(d, experts)
            .into_iter()
            .map(|p| {
                Param::new(
                    backend,
                    dotted(&experts_prefix, &p.name),
                    &p.shape,
                    dtype,
                    p.layout,
                    p.init,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            router,
            expert,
            d,
            experts,
            w_router,
            params,
        })
    }

    /// A layer with random weights as DiT initialises its linears
    /// ([`MoeLayer::initialise`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new_random<R: Rng + ?Sized>(
        router: Box<dyn Router>,
        expert: Box<dyn Expert>,
        d: usize,
        experts: usize,
        backend: &dyn Backend,
        dtype: DType,
        name_prefix: &str,
        rng: &mut R,
    ) -> Result<Self> {
        let mut layer = Self::new(router, expert, d, experts, backend, dtype, name_prefix)?;
        layer.initialise(backend, rng)?;
        Ok(layer)
    }

    /// Draws every weight: the router xavier-uniform, then each expert
    /// parameter by its `init` (matrices xavier-uniform per expert, biases zero).
    ///
    /// The router is drawn in its memory order `[d, E]`, not the on-disk order
    /// `Param::initialise` uses, because that is the order layers were always
    /// drawn in: seeded models keep their values.
    pub fn initialise<R: Rng + ?Sized>(&mut self, backend: &dyn Backend, rng: &mut R) -> Result<()> {
        let (d, e) = (self.d, self.experts);
        let a = (6.0 / (d + e) as f64).sqrt() as f32;
        let w: Vec<f32> = (0..d * e).map(|_| rng.gen_range(-a..=a)).collect();
        backend.write_f32(self.w_router.tensor.view_mut(), &w)?;
        for p in &mut self.params {
            p.initialise(backend, &mut &mut *rng)?;
        }
        Ok(())
    }

    /// Zeroed gradients for [`MoeLayer::backward`] to accumulate into.
    pub fn zero_grads(&self, backend: &dyn Backend) -> Result<MoeGrads> {
        Ok(MoeGrads {
            dw_router: self.w_router.zeros_like(backend)?,
            dparams: self
                .params
                .iter()
                .map(|p| p.zeros_like(backend))
                .collect::<Result<_>>()?,
        })
    }

    /// Expert parameters as views in their memory layout, in `param_shapes` order.
    pub fn param_views(&self) -> Vec<TensorRef<'_>> {
        self.params.iter().map(|p| p.tensor.view()).collect()
    }

    /// Forward. out: [T, d] (overwritten); cache: its tensors are reused from
    /// call to call (a forward allocates only its routing tables); keep: the
    /// cache is valid for [`MoeLayer::backward`] afterwards, and the experts
    /// keep their hidden activations; without it (inference) the experts keep
    /// nothing and backward refuses the cache; x: [T, d] with `T = shape.tokens()`.
    ///
    /// Returns the routing, on the backend: its statistics cost a download
    /// only when asked for ([`DeviceRouting::stats`]).
    pub fn forward(
        &self,
        backend: &dyn Backend,
        mut out: TensorMut<'_>,
        cache: &mut MoeCache,
        keep: bool,
        x: TensorRef<'_>,
        shape: RouteShape,
    ) -> Result<Arc<DeviceRouting>> {
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
        x.expect_len(OP, "x [tokens, d]", t_count * d)?;
        out.expect_len(OP, "out [tokens, d]", t_count * d)?;
        let act_dtype = x.dtype();
        // A forward that fails half-way must not leave a cache that looks whole.
        cache.shape = None;
        cache.routing = None;

        // scores = x @ w_router   ([T, d] @ [d, E])
        let mut scores = reuse(backend, cache.scores.take(), &[t_count, e_count], DType::F32)?;
        backend.gemm(
            scores.view_mut(),
            x,
            self.w_router.tensor.view(),
            None,
            GemmDims::nn(t_count, e_count, d),
            1.0,
            0.0,
        )?;
        // routing = router(scores)
        let routing = self.router.route_on(backend, scores.view(), shape)?;
        self.check_routing(&routing, t_count)?;
        let slots = routing.slots();

        // ys = experts(xs), xs[s] = x[token[s]]: at inference the experts
        // may gather where their first product runs; else xs is gathered
        // here (and kept for the backward).
        let mut ys = reuse(backend, cache.ys.take(), &[slots, d], act_dtype)?;
        let (params, tokens) = (self.param_views(), routing.tokens.view());
        let fused = !keep
            && self.expert.forward_gathered(
                backend,
                ys.view_mut(),
                &mut cache.expert,
                x,
                tokens,
                &params,
                &routing.offsets,
                d,
            )?;
        if !fused {
            let mut xs = reuse(backend, cache.xs.take(), &[slots, d], act_dtype)?;
            backend.gather_rows(xs.view_mut(), x, tokens, d)?;
            self.expert.forward(
                backend,
                ys.view_mut(),
                &mut cache.expert,
                keep,
                xs.view(),
                &params,
                &routing.offsets,
                d,
            )?;
            cache.xs = Some(xs);
        }
        // out[token[s]] += gate[s] * ys[s]
        backend.fill(out.reborrow(), 0.0)?;
        backend.scatter_add_rows(out, ys.view(), routing.tokens.view(), Some(routing.gates.view()), d)?;

        let routing = Arc::new(routing);
        if keep {
            cache.shape = Some(shape);
            cache.routing = Some(routing.clone());
        }
        cache.scores = Some(scores);
        cache.ys = Some(ys);
        Ok(routing)
    }

    /// Checks a router's output against the layer; a host routing (a router
    /// without a device path, e.g. a plugin) is validated in full.
    fn check_routing(&self, routing: &DeviceRouting, t_count: usize) -> Result<()> {
        let who = format!("router '{}'", self.router.kind());
        let e_count = self.experts;
        if routing.experts != e_count || routing.tokens_total != t_count {
            return Err(EngineError::Other(format!(
                "{who}: dispatch is for {} experts and {} tokens, expected {e_count} and {t_count}",
                routing.experts, routing.tokens_total
            )));
        }
        let offsets = &routing.offsets;
        if offsets.len() != e_count + 1 || offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(EngineError::Other(format!(
                "{who}: invalid dispatch: expected {} monotone offsets from 0, got {offsets:?}",
                e_count + 1
            )));
        }
        let slots = routing.slots();
        routing
            .tokens
            .view()
            .expect_dtype(&who, "dispatch tokens", DType::U32)?;
        routing.tokens.view().expect_len(&who, "dispatch tokens", slots)?;
        routing.gates.view().expect_dtype(&who, "dispatch gates", DType::F32)?;
        routing.gates.view().expect_len(&who, "dispatch gates", slots)?;
        if let Some(host) = &routing.host {
            host.dispatch.validate(&who)?;
        }
        Ok(())
    }

    /// Backward of [`MoeLayer::forward`]. dx: [T, d] (overwritten); grads:
    /// accumulated into; cache: from the forward of `x`; x, dout: [T, d].
    /// `grad_aux` is the loss weight of the router's auxiliary loss
    /// (`d loss / d aux`; 0 when it is not trained on).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        mut dx: TensorMut<'_>,
        grads: &mut MoeGrads,
        cache: &MoeCache,
        x: TensorRef<'_>,
        dout: TensorRef<'_>,
        grad_aux: f32,
    ) -> Result<()> {
        const OP: &str = "MoeLayer::backward";
        let (d, e_count) = (self.d, self.experts);
        let no_forward = || EngineError::Other(format!("{OP}: the cache holds no forward pass"));
        let shape = cache.shape.ok_or_else(no_forward)?;
        let (Some(scores), Some(routing), Some(xs), Some(ys)) = (&cache.scores, &cache.routing, &cache.xs, &cache.ys)
        else {
            return Err(no_forward());
        };
        let t_count = shape.tokens();
        x.expect_len(OP, "x [tokens, d]", t_count * d)?;
        dout.expect_len(OP, "dout [tokens, d]", t_count * d)?;
        dx.expect_len(OP, "dx [tokens, d]", t_count * d)?;
        grads
            .dw_router
            .view()
            .expect_len(OP, "grads.dw_router [d, E]", d * e_count)?;
        if grads.dparams.len() != self.params.len() {
            return Err(EngineError::shape(
                format!("{OP} (grads.dparams)"),
                format!("{} tensors", self.params.len()),
                format!("{} tensors", grads.dparams.len()),
            ));
        }
        let slots = routing.slots();
        ys.view().expect_len(OP, "cache ys", slots * d)?;
        let (tokens, gates) = (routing.tokens.view(), routing.gates.view());

        // Backward of the combine `out[token[s]] += gate[s] * ys[s]`:
        // grad_gate[s] = <dout[token[s]], ys[s]>, dys[s] = gate[s] * dout[token[s]].
        let mut grad_gates = backend.zeros(&[slots], DType::F32)?;
        backend.gather_dot(grad_gates.view_mut(), dout, tokens, ys.view(), d)?;
        // dxs first holds dout[token[s]]; the expert backward overwrites it.
        let mut dxs = backend.zeros(&[slots, d], ys.dtype())?;
        backend.gather_rows(dxs.view_mut(), dout, tokens, d)?;
        let mut dys = backend.zeros(&[slots, d], ys.dtype())?;
        // Rows scaled by their gate: `gated_residual` with one channel, the d
        // columns as its tokens and the gates as a [S, 1] modulation, is
        // exactly `dys[s, c] += gates[s] * dxs[s, c]` (dys starts at 0).
        backend.gated_residual(
            dys.view_mut(),
            dxs.view(),
            gates.reshape(&[slots, 1])?,
            ModChunks {
                chunks: 1,
                first: 0,
                second: 0,
            },
            RowDims {
                batch: slots,
                tokens: d,
                d: 1,
            },
        )?;
        // Backward of `ys = experts(xs)`.
        {
            let mut dparams: Vec<TensorMut<'_>> = grads.dparams.iter_mut().map(|t| t.view_mut()).collect();
            self.expert.backward(
                backend,
                dxs.view_mut(),
                &mut dparams,
                dys.view(),
                &cache.expert,
                xs.view(),
                &self.param_views(),
                &routing.offsets,
                d,
            )?;
        }
        drop(dys);
        // Backward of `routing = router(scores)`: gate (and aux) grads -> logit grads.
        let mut dscores = backend.zeros(&[t_count, e_count], DType::F32)?;
        self.router.backward_on(
            backend,
            routing,
            scores.view(),
            grad_gates.view(),
            grad_aux,
            dscores.view_mut(),
        )?;
        // Backward of `scores = x @ w_router`.
        // dw_router += x^T @ dscores   ([d, T] @ [T, E])
        backend.gemm(
            grads.dw_router.view_mut(),
            x,
            dscores.view(),
            None,
            GemmDims::tn(d, e_count, t_count),
            1.0,
            1.0,
        )?;
        // dx = dscores @ w_router^T   ([T, E] @ [E, d])
        backend.gemm(
            dx.reborrow(),
            dscores.view(),
            self.w_router.tensor.view(),
            None,
            GemmDims::nt(t_count, d, e_count),
            1.0,
            0.0,
        )?;
        // Backward of the gather `xs[s] = x[token[s]]`.
        backend.scatter_add_rows(dx, dxs.view(), tokens, None, d)
    }
}

impl Params for MoeLayer {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.w_router);
        out.extend(self.params.iter());
    }

    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.w_router);
        out.extend(self.params.iter_mut());
    }
}

/// `old` when it already has `dims` and `dtype` (a cache reused across
/// steps), else a fresh zeroed tensor. Callers overwrite every element.
fn reuse(backend: &dyn Backend, old: Option<Tensor>, dims: &[usize], dtype: DType) -> Result<Tensor> {
    match old {
        Some(t) if t.shape() == dims && t.dtype() == dtype => Ok(t),
        _ => backend.zeros(dims, dtype),
    }
}
