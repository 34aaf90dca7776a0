//! The `Router` trait and the data it produces: an expert-major dispatch.
//!
//! A router turns scores `[tokens, experts]` into a [`Dispatch`]: for each expert
//! the token rows it processes and their gates, stored expert-major in CSR form
//! (`offsets[e]..offsets[e + 1]` index into `tokens` and `gates`). One token may
//! appear under many experts (expert choice), so token-major top-k tables do not
//! fit. The dispatch is plain data, so it can be split by expert ranges later
//! (expert parallelism).

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::routing_stats::RoutingStats;
use crate::tensor::{Tensor, TensorMut, TensorRef};
use crate::transfer::BackendExt;
use crate::DType;
use serde::{Deserialize, Serialize};

/// Which tokens compete with each other for experts.
///
/// JSON: `"per_sample"`, `"batch"` or `{"tokens": N}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingGroups {
    /// Each sample's tokens form one group (results independent of batch).
    #[default]
    PerSample,
    /// Consecutive whole samples grouped into groups of N tokens.
    Tokens(usize),
    /// One group over the whole batch.
    Batch,
}

impl RoutingGroups {
    /// Checks that these groups can split batches of samples of
    /// `tokens_per_sample` tokens (a `{"tokens": N}` group must hold whole
    /// samples), before any batch is routed.
    pub fn check_fits(&self, tokens_per_sample: usize) -> Result<()> {
        match *self {
            RoutingGroups::Tokens(n) => self
                .group_size(RouteShape {
                    samples: n / tokens_per_sample.max(1),
                    tokens_per_sample,
                    experts: 1,
                })
                .map(|_| ()),
            RoutingGroups::PerSample | RoutingGroups::Batch => Ok(()),
        }
    }

    /// Tokens per group for a batch of `samples` x `tokens_per_sample`.
    /// Errors when `Tokens(n)` is not a whole number of samples or does not
    /// divide the batch.
    pub fn group_size(&self, shape: RouteShape) -> Result<usize> {
        let total = shape.tokens();
        match *self {
            RoutingGroups::PerSample => Ok(shape.tokens_per_sample),
            RoutingGroups::Batch => Ok(total),
            RoutingGroups::Tokens(n) => {
                let bad = |reason: String| EngineError::param("routing groups", "groups.tokens", n, reason);
                if n == 0 || shape.tokens_per_sample == 0 || n % shape.tokens_per_sample != 0 {
                    return Err(bad(format!(
                        "a group must be a whole number of samples of {} tokens",
                        shape.tokens_per_sample
                    )));
                }
                if !total.is_multiple_of(n) {
                    return Err(bad(format!(
                        "the batch of {total} tokens is not a whole number of groups"
                    )));
                }
                Ok(n)
            }
        }
    }
}

/// The shape of the scores handed to a router: `samples * tokens_per_sample`
/// rows of `experts` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteShape {
    /// Samples (images) in the batch.
    pub samples: usize,
    /// Tokens per sample.
    pub tokens_per_sample: usize,
    /// Experts of the layer.
    pub experts: usize,
}

impl RouteShape {
    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.samples * self.tokens_per_sample
    }
}

/// Expert-major routing decision in CSR form.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Dispatch {
    /// Experts of the layer (E).
    pub experts: usize,
    /// Tokens routed (rows of the scores).
    pub tokens_total: usize,
    /// `E + 1` offsets into `tokens` and `gates`.
    pub offsets: Vec<usize>,
    /// Token row of each slot.
    pub tokens: Vec<u32>,
    /// Gate (combine weight) of each slot.
    pub gates: Vec<f32>,
}

impl Dispatch {
    /// Slots in all.
    pub fn slots(&self) -> usize {
        self.tokens.len()
    }

    /// Token rows and gates of expert `e`.
    pub fn expert(&self, e: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[e]..self.offsets[e + 1];
        (&self.tokens[r.clone()], &self.gates[r])
    }

    /// Builds a dispatch from per-expert (token, gate) lists.
    pub fn from_lists(tokens_total: usize, lists: Vec<Vec<(u32, f32)>>) -> Self {
        let mut d = Dispatch {
            experts: lists.len(),
            tokens_total,
            offsets: Vec::with_capacity(lists.len() + 1),
            ..Default::default()
        };
        d.offsets.push(0);
        for list in lists {
            for (t, g) in list {
                d.tokens.push(t);
                d.gates.push(g);
            }
            d.offsets.push(d.tokens.len());
        }
        d
    }

    /// Checks the structural contract every router must keep: offsets
    /// monotone and complete, token indices in range, no token twice under one
    /// expert, gates finite and in [0, 1]. Used on plugin output.
    pub fn validate(&self, who: &str) -> Result<()> {
        let bad = |reason: String| EngineError::Other(format!("{who}: invalid dispatch: {reason}"));
        if self.offsets.len() != self.experts + 1 || self.offsets.first() != Some(&0) {
            return Err(bad(format!("expected {} offsets starting at 0", self.experts + 1)));
        }
        if self.offsets.windows(2).any(|w| w[0] > w[1]) || self.offsets[self.experts] != self.tokens.len() {
            return Err(bad("offsets are not monotone or do not end at the slot count".into()));
        }
        if self.gates.len() != self.tokens.len() {
            return Err(bad(format!(
                "{} gates for {} slots",
                self.gates.len(),
                self.tokens.len()
            )));
        }
        let mut seen = vec![usize::MAX; self.tokens_total];
        for e in 0..self.experts {
            let (toks, gates) = self.expert(e);
            for (&t, &g) in toks.iter().zip(gates) {
                let t = t as usize;
                if t >= self.tokens_total {
                    return Err(bad(format!(
                        "expert {e} took token {t}, out of range 0..{}",
                        self.tokens_total
                    )));
                }
                if seen[t] == e {
                    return Err(bad(format!("expert {e} took token {t} twice")));
                }
                seen[t] = e;
                if !g.is_finite() || !(0.0..=1.0).contains(&g) {
                    return Err(bad(format!(
                        "expert {e} token {t} has gate {g}, not a finite value in [0, 1]"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Everything one `route` call produces.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// Who goes where, with which gate.
    pub dispatch: Dispatch,
    /// Router probabilities `[tokens, experts]` (cached for backward and stats).
    pub probs: Vec<f32>,
    /// Auxiliary loss, if the router has one (token choice balance loss).
    pub aux_loss: Option<f32>,
    /// The statistics of EC-DIT.md section 2.
    pub stats: RoutingStats,
    /// Tokens per routing group this call used (0 for an empty batch); backward
    /// needs it for per-group terms such as the token-choice balance loss.
    pub group_size: usize,
}

/// A routing decision held on a backend: what the MoE layer's gather, experts,
/// combine and backward read, without a trip to the host.
#[derive(Debug)]
pub struct DeviceRouting {
    /// Experts of the layer (E).
    pub experts: usize,
    /// Tokens routed.
    pub tokens_total: usize,
    /// `E + 1` slot offsets, on the host: under expert choice they follow from
    /// the shape alone (static), so reading them costs no transfer.
    pub offsets: Vec<usize>,
    /// Token row of each slot: [S] u32.
    pub tokens: Tensor,
    /// Gate of each slot: [S] f32.
    pub gates: Tensor,
    /// Router probabilities: [T, E] f32.
    pub probs: Tensor,
    /// Auxiliary loss, if the router has one.
    pub aux_loss: Option<f32>,
    /// Tokens per routing group this call used.
    pub group_size: usize,
    /// The host routing, when the router ran on the host (third-party routers):
    /// its backward reads it.
    pub host: Option<Routing>,
}

impl DeviceRouting {
    /// Slots in all.
    pub fn slots(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Uploads a host routing (one upload each for tokens, gates and probs).
    pub fn upload(backend: &dyn Backend, routing: Routing) -> Result<Self> {
        let d = &routing.dispatch;
        let slots = d.slots();
        Ok(Self {
            experts: d.experts,
            tokens_total: d.tokens_total,
            offsets: d.offsets.clone(),
            tokens: backend.upload_u32(&[slots], &d.tokens)?,
            gates: backend.upload_f32(&[slots], &d.gates, DType::F32)?,
            probs: backend.upload_f32(&[d.tokens_total, d.experts], &routing.probs, DType::F32)?,
            aux_loss: routing.aux_loss,
            group_size: routing.group_size,
            host: Some(routing),
        })
    }

    /// The routing on the host (downloads the dispatch and probabilities
    /// unless the router ran on the host), with its statistics.
    pub fn to_host(&self, backend: &dyn Backend) -> Result<Routing> {
        if let Some(r) = &self.host {
            return Ok(r.clone());
        }
        let dispatch = Dispatch {
            experts: self.experts,
            tokens_total: self.tokens_total,
            offsets: self.offsets.clone(),
            tokens: backend.read_u32(self.tokens.view())?,
            gates: backend.read_f32(self.gates.view())?,
        };
        let probs = backend.read_f32(self.probs.view())?;
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: self.aux_loss,
            stats,
            group_size: self.group_size,
        })
    }

    /// The statistics of EC-DIT.md section 2 (a download when routed on the device).
    pub fn stats(&self, backend: &dyn Backend) -> Result<RoutingStats> {
        match &self.host {
            Some(r) => Ok(r.stats.clone()),
            None => Ok(self.to_host(backend)?.stats),
        }
    }
}

/// A routing strategy: scores in, expert-major dispatch out.
///
/// [`Router::route`] and [`Router::backward`] are the host reference (and all
/// a third-party router behind the plugin ABI provides). [`Router::route_on`]
/// and [`Router::backward_on`] run on a backend; their defaults make one
/// download (the scores) and one upload of the result (tokens, gates and
/// probabilities) per layer around the host methods, and a router
/// that can route in device memory overrides them, giving the same bits.
pub trait Router: Send + Sync {
    /// Registry kind, e.g. `expert-choice`.
    fn kind(&self) -> &str;

    /// The full spec (kind plus every parameter) that rebuilds this router.
    fn spec(&self) -> serde_json::Value;

    /// True when one sample's routing can depend on the other samples of its
    /// batch (routing groups wider than a sample). Guidance then routes the
    /// conditional and unconditional passes separately. Unknown routers are
    /// assumed to couple samples.
    fn couples_samples(&self) -> bool {
        true
    }

    /// Checks that this router can route batches of `tokens_per_sample` tokens
    /// (e.g. a `{"tokens": N}` group must hold whole samples); called when a
    /// model config is validated, before any forward.
    fn check_tokens_per_sample(&self, tokens_per_sample: usize) -> Result<()> {
        let _ = tokens_per_sample;
        Ok(())
    }

    /// Routes `scores` (router logits `[shape.tokens(), shape.experts]`, f32) on the host.
    /// Errors on non-finite scores or a shape the router's groups cannot split.
    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing>;

    /// Host backward from gate gradients (aligned with `routing.dispatch.gates`)
    /// and the gradient of the auxiliary loss to score gradients `[tokens, experts]`
    /// (overwritten). The discrete selection is not differentiated.
    fn backward(
        &self,
        routing: &Routing,
        scores: &[f32],
        grad_gates: &[f32],
        grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()>;

    /// Routes scores held on `backend`. Default: downloads the scores, runs
    /// [`Router::route`], uploads its tokens, gates and probabilities.
    fn route_on(&self, backend: &dyn Backend, scores: TensorRef<'_>, shape: RouteShape) -> Result<DeviceRouting> {
        let host_scores = backend.read_f32(scores)?;
        let routing = self.route(&host_scores, shape)?;
        DeviceRouting::upload(backend, routing)
    }

    /// Backward on `backend` into `grad_scores` [T, E] (overwritten). Default:
    /// downloads the scores and gate gradients, runs [`Router::backward`] on
    /// the host routing, uploads the result.
    fn backward_on(
        &self,
        backend: &dyn Backend,
        routing: &DeviceRouting,
        scores: TensorRef<'_>,
        grad_gates: TensorRef<'_>,
        grad_aux: f32,
        grad_scores: TensorMut<'_>,
    ) -> Result<()> {
        let host = routing.to_host(backend)?;
        let scores = backend.read_f32(scores)?;
        let grad_gates = backend.read_f32(grad_gates)?;
        let mut out = vec![0.0f32; scores.len()];
        self.backward(&host, &scores, &grad_gates, grad_aux, &mut out)?;
        backend.write_f32(grad_scores, &out)
    }
}

/// Expert capacity per group: `C = floor(f_c * S / E + 0.5)` clamped to `[1, S]`
/// (EC-DIT.md section 2, step 3).
pub fn expert_capacity(capacity_factor: f64, group_tokens: usize, experts: usize) -> usize {
    let c = (capacity_factor * group_tokens as f64 / experts as f64 + 0.5).floor();
    (c.max(1.0) as usize).min(group_tokens.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rounds_half_up_and_clamps() {
        assert_eq!(expert_capacity(2.0, 256, 8), 64);
        assert_eq!(expert_capacity(1.0, 12, 8), 2); // 1.5 -> 2
        assert_eq!(expert_capacity(1.0, 10, 8), 1); // 1.25 -> 1
        assert_eq!(expert_capacity(0.01, 10, 8), 1); // clamped up
        assert_eq!(expert_capacity(64.0, 10, 2), 10); // clamped down
    }

    #[test]
    fn groups_parse_from_json() {
        let g: RoutingGroups = serde_json::from_str("\"per_sample\"").unwrap();
        assert_eq!(g, RoutingGroups::PerSample);
        let g: RoutingGroups = serde_json::from_str("{\"tokens\": 512}").unwrap();
        assert_eq!(g, RoutingGroups::Tokens(512));
        let shape = RouteShape {
            samples: 4,
            tokens_per_sample: 256,
            experts: 8,
        };
        assert_eq!(g.group_size(shape).unwrap(), 512);
        assert!(RoutingGroups::Tokens(300).group_size(shape).is_err());
    }

    #[test]
    fn validate_catches_duplicates_and_range() {
        let d = Dispatch::from_lists(3, vec![vec![(0, 0.5), (0, 0.5)]]);
        assert!(d.validate("t").unwrap_err().to_string().contains("twice"));
        let d = Dispatch::from_lists(3, vec![vec![(3, 0.5)]]);
        assert!(d.validate("t").unwrap_err().to_string().contains("out of range"));
        let d = Dispatch::from_lists(3, vec![vec![(1, f32::NAN)]]);
        assert!(d.validate("t").is_err());
    }
}
