//! Routing statistics every MoE layer reports (EC-DIT.md section 2).

use crate::router::Dispatch;
use serde::Serialize;

/// Per-layer routing statistics of one `route` call.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoutingStats {
    /// `hist[n]` = tokens processed by exactly `n` experts (length E + 1).
    pub experts_per_token_hist: Vec<u64>,
    /// Most experts any token got.
    pub max_experts_per_token: usize,
    /// Mean experts per token.
    pub mean_experts_per_token: f32,
    /// Fraction of tokens chosen by no expert.
    pub unrouted_fraction: f32,
    /// Tokens each expert processed.
    pub tokens_per_expert: Vec<usize>,
    /// Mean gate of each expert over the tokens it processed (0 if none).
    pub mean_gate_per_expert: Vec<f32>,
    /// Mean entropy (nats) of the router distribution over experts per token.
    pub router_entropy: f32,
}

impl RoutingStats {
    /// Computes the statistics from a dispatch and the router probabilities
    /// `[tokens, experts]` (row-normalised).
    pub fn compute(dispatch: &Dispatch, probs: &[f32]) -> Self {
        let e_count = dispatch.experts;
        let tokens = dispatch.tokens_total;
        let mut per_token = vec![0usize; tokens];
        let mut tokens_per_expert = Vec::with_capacity(e_count);
        let mut mean_gate_per_expert = Vec::with_capacity(e_count);
        for e in 0..e_count {
            let (toks, gates) = dispatch.expert(e);
            for &t in toks {
                per_token[t as usize] += 1;
            }
            tokens_per_expert.push(toks.len());
            let sum: f64 = gates.iter().map(|&g| g as f64).sum();
            mean_gate_per_expert.push(if toks.is_empty() {
                0.0
            } else {
                (sum / toks.len() as f64) as f32
            });
        }
        let mut hist = vec![0u64; e_count + 1];
        for &n in &per_token {
            hist[n.min(e_count)] += 1;
        }
        let denom = tokens.max(1) as f64;
        let entropy: f64 = if e_count == 0 {
            0.0
        } else {
            probs
                .chunks(e_count)
                .map(|row| {
                    row.iter()
                        .filter(|&&p| p > 0.0)
                        .map(|&p| -(p as f64) * (p as f64).ln())
                        .sum::<f64>()
                })
                .sum::<f64>()
                / denom
        };
        RoutingStats {
            max_experts_per_token: per_token.iter().copied().max().unwrap_or(0),
            mean_experts_per_token: (per_token.iter().sum::<usize>() as f64 / denom) as f32,
            unrouted_fraction: (hist[0] as f64 / denom) as f32,
            experts_per_token_hist: hist,
            tokens_per_expert,
            mean_gate_per_expert,
            router_entropy: entropy as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_small_dispatch() {
        // 3 tokens, 2 experts: expert 0 takes tokens 0,1; expert 1 takes token 0.
        let d = Dispatch::from_lists(3, vec![vec![(0, 0.6), (1, 0.2)], vec![(0, 0.4)]]);
        let probs = [0.6, 0.4, 0.8, 0.2, 0.5, 0.5];
        let s = RoutingStats::compute(&d, &probs);
        assert_eq!(s.experts_per_token_hist, vec![1, 1, 1]);
        assert_eq!(s.max_experts_per_token, 2);
        assert!((s.mean_experts_per_token - 1.0).abs() < 1e-6);
        assert!((s.unrouted_fraction - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(s.tokens_per_expert, vec![2, 1]);
        assert!((s.mean_gate_per_expert[0] - 0.4).abs() < 1e-6);
        let h = |p: f64, q: f64| -(p * p.ln() + q * q.ln());
        let want = (h(0.6, 0.4) + h(0.8, 0.2) + h(0.5, 0.5)) / 3.0;
        assert!((s.router_entropy as f64 - want).abs() < 1e-5);
    }
}
