//! Timestep embedding: 256 sinusoidal frequencies `[cos | sin]`, then
//! `Linear(256, d) -> SiLU -> Linear(d, d)` (DiT's `TimestepEmbedder`).

use super::buffer::resize;
use super::linear::Linear;
use super::param::{Init, Param, Params};
use ecdit_engine::{Backend, Result, Unary};

/// Frequencies of the sinusoidal table.
pub const FREQ_DIM: usize = 256;

/// freq: [B, dim] = `[cos(t f_i) | sin(t f_i)]`, `f_i = exp(-ln(10000) i / (dim/2))`;
/// t: [B]. Computed in f32 in upstream's operation order so whole-number
/// timesteps near 1000 round as PyTorch does.
pub fn timestep_frequencies(freq: &mut [f32], t: &[f32], dim: usize) {
    let half = dim / 2;
    let scale = -(10000f64.ln()) as f32;
    for (row, &tb) in freq.chunks_mut(dim).zip(t) {
        for i in 0..half {
            let f = (scale * i as f32 / half as f32).exp();
            let arg = tb * f;
            row[i] = arg.cos();
            row[half + i] = arg.sin();
        }
    }
}

/// `t_embedder.mlp.{0,2}`.
#[derive(Clone, Debug, PartialEq)]
pub struct TimestepEmbedder {
    /// `t_embedder.mlp.0`: [d, 256].
    pub fc1: Linear,
    /// `t_embedder.mlp.2`: [d, d].
    pub fc2: Linear,
}

/// What the timestep embedding computes, kept for backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimestepActs {
    /// [B, 256] sinusoidal features.
    pub freq: Vec<f32>,
    /// [B, d] first linear output, before SiLU.
    pub hidden: Vec<f32>,
    /// [B, d] after SiLU.
    pub hidden_act: Vec<f32>,
    /// [B, d] the embedding.
    pub emb: Vec<f32>,
}

impl TimestepEmbedder {
    /// Weights `N(0, 0.02^2)`, biases zero (DiT).
    pub fn new(d: usize) -> Self {
        Self {
            fc1: Linear::new("t_embedder.mlp.0", d, FREQ_DIM, Init::Normal(0.02)),
            fc2: Linear::new("t_embedder.mlp.2", d, d, Init::Normal(0.02)),
        }
    }

    /// acts: filled; t: [B].
    pub fn forward(&self, backend: &dyn Backend, acts: &mut TimestepActs, t: &[f32]) -> Result<()> {
        let (b, d) = (t.len(), self.fc2.out_dim);
        resize(&mut acts.freq, b * FREQ_DIM);
        resize(&mut acts.hidden, b * d);
        resize(&mut acts.hidden_act, b * d);
        resize(&mut acts.emb, b * d);
        timestep_frequencies(&mut acts.freq, t, FREQ_DIM);
        self.fc1
            .forward_per_sample(backend, &mut acts.hidden, &acts.freq, b, 1)?;
        backend.unary(Unary::Silu, &mut acts.hidden_act, &acts.hidden)?;
        self.fc2
            .forward_per_sample(backend, &mut acts.emb, &acts.hidden_act, b, 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cos_half_then_sin_half() {
        let mut f = vec![0.0; 8];
        timestep_frequencies(&mut f, &[2.0], 8);
        // half 4: frequencies 10000^(-i/4) = 1, 0.1, 0.01, 0.001.
        for (i, w) in [1.0f64, 0.1, 0.01, 0.001].iter().enumerate() {
            assert!((f[i] as f64 - (2.0 * w).cos()).abs() < 1e-6);
            assert!((f[4 + i] as f64 - (2.0 * w).sin()).abs() < 1e-6);
        }
    }
}
