//! Timestep embedding: 256 sinusoidal features `[cos | sin]` (the backend's
//! `timestep_features`), then `Linear(256, d) -> SiLU -> Linear(d, d)` (DiT's
//! `TimestepEmbedder`).

use super::act::Act;
use super::grads::Grads;
use super::linear::Linear;
use ecdit_engine::{Backend, DType, Init, Param, Params, Result, TensorRef, Unary};

/// Frequencies of the sinusoidal table.
pub const FREQ_DIM: usize = 256;

/// The period of the slowest frequency (DiT's `max_period`).
pub const MAX_PERIOD: f32 = 10000.0;

/// `t_embedder.mlp.{0,2}`.
#[derive(Debug)]
pub struct TimestepEmbedder {
    /// `t_embedder.mlp.0`: [d, 256].
    pub fc1: Linear,
    /// `t_embedder.mlp.2`: [d, d].
    pub fc2: Linear,
}

/// What the timestep embedding computes, kept for backward.
#[derive(Debug, Default)]
pub struct TimestepActs {
    /// [B, 256] sinusoidal features.
    pub freq: Act,
    /// [B, d] first linear output, before SiLU.
    pub hidden: Act,
    /// [B, d] after SiLU.
    pub hidden_act: Act,
    /// [B, d] the embedding.
    pub emb: Act,
}

impl TimestepActs {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        [&self.freq, &self.hidden, &self.hidden_act, &self.emb]
            .iter()
            .map(|a| a.bytes())
            .sum()
    }
}

impl TimestepEmbedder {
    /// Weights `N(0, 0.02^2)`, biases zero (DiT).
    pub fn new(backend: &dyn Backend, d: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(backend, "t_embedder.mlp.0", d, FREQ_DIM, Init::Normal(0.02), dtype)?,
            fc2: Linear::new(backend, "t_embedder.mlp.2", d, d, Init::Normal(0.02), dtype)?,
        })
    }

    /// acts: filled; t: [B] f32 on the backend. The linears run one sample at
    /// a time (see [`Linear::forward_per_sample`]).
    pub fn forward(
        &self,
        backend: &dyn Backend,
        acts: &mut TimestepActs,
        t: TensorRef<'_>,
        dtype: DType,
    ) -> Result<()> {
        let (b, d) = (t.numel(), self.fc2.out_dim);
        acts.freq.ensure(backend, &[b, FREQ_DIM], dtype)?;
        for a in [&mut acts.hidden, &mut acts.hidden_act, &mut acts.emb] {
            a.ensure(backend, &[b, d], dtype)?;
        }
        backend.timestep_features(acts.freq.view_mut()?, t, FREQ_DIM, MAX_PERIOD)?;
        self.fc1
            .forward_per_sample(backend, acts.hidden.view_mut()?, acts.freq.view()?, b, 1, None)?;
        backend.unary(Unary::Silu, acts.hidden_act.view_mut()?, acts.hidden.view()?)?;
        self.fc2
            .forward_per_sample(backend, acts.emb.view_mut()?, acts.hidden_act.view()?, b, 1, None)
    }
}

impl TimestepEmbedder {
    /// Backward of [`TimestepEmbedder::forward`] for the parameters (the
    /// timesteps are data): demb [B, d] in; scratch [B, d] twice.
    pub fn backward(
        &self,
        backend: &dyn Backend,
        acts: &TimestepActs,
        scratch: &mut [Act; 2],
        grads: &mut Grads,
        demb: TensorRef<'_>,
    ) -> Result<()> {
        let b = demb.numel() / self.fc2.out_dim.max(1);
        let [d_act, d_hidden] = scratch;
        for a in [&mut *d_act, &mut *d_hidden] {
            a.ensure(backend, &[b, self.fc2.out_dim], demb.dtype())?;
        }
        // emb = fc2(SiLU(hidden)), hidden = fc1(freq)
        self.fc2.backward(
            backend,
            grads,
            Some(d_act.view_mut()?),
            false,
            demb,
            acts.hidden_act.view()?,
            b,
        )?;
        backend.unary_backward(Unary::Silu, d_hidden.view_mut()?, d_act.view()?, acts.hidden.view()?)?;
        self.fc1
            .backward(backend, grads, None, false, d_hidden.view()?, acts.freq.view()?, b)
    }
}

impl Params for TimestepEmbedder {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.fc1.collect(out);
        self.fc2.collect(out);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.fc1.collect_mut(out);
        self.fc2.collect_mut(out);
    }
}
