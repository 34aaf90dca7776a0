//! `balanced-random`: an example third-party router shipped as a plugin.
//!
//! Each sample's tokens are shuffled with a seeded generator and dealt to the
//! experts in turn, so every expert gets the same number of tokens (up to one)
//! whatever the scores say; a token's gate is its router probability for the
//! expert it was dealt to, so the router weights still learn through the gates.
//!
//! The router is an ordinary `Router` impl; the last line of this file makes
//! the crate an ecdit plugin.
#![warn(missing_docs)]

use ecdit_engine::error::{check_finite, check_len};
use ecdit_engine::{
    ComponentInfo, Dispatch, Family, ParamInfo, ParamType, Registry, Result, RouteShape, Router, Routing, RoutingStats,
};
use serde_json::{json, Value};
use std::sync::Arc;

/// Balanced random routing with a seed.
pub struct BalancedRandom {
    seed: u64,
}

/// splitmix64: a tiny seeded generator, so the plugin needs no rand crate.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Router for BalancedRandom {
    fn kind(&self) -> &str {
        "balanced-random"
    }

    fn spec(&self) -> Value {
        json!({"kind": "balanced-random", "seed": self.seed})
    }

    fn route(&self, scores: &[f32], shape: RouteShape) -> Result<Routing> {
        let e_count = shape.experts;
        check_len("balanced-random", "scores", scores.len(), shape.tokens() * e_count)?;
        check_finite("balanced-random scores", scores)?;
        // probs: [T, E], row softmax
        let mut probs = vec![0.0f32; scores.len()];
        for (row, p) in scores.chunks(e_count).zip(probs.chunks_mut(e_count)) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0;
            for (o, &x) in p.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            p.iter_mut().for_each(|o| *o /= sum);
        }
        let mut lists = vec![Vec::new(); e_count];
        for s in 0..shape.samples {
            // Fisher-Yates over the sample's tokens, seeded by (seed, sample).
            let mut state = self.seed ^ (s as u64).wrapping_mul(0xA24B_AED4_963E_E407);
            let base = s * shape.tokens_per_sample;
            let mut order: Vec<usize> = (base..base + shape.tokens_per_sample).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (splitmix(&mut state) % (i as u64 + 1)) as usize);
            }
            for (k, &t) in order.iter().enumerate() {
                let e = k % e_count;
                lists[e].push((t as u32, probs[t * e_count + e]));
            }
        }
        lists.iter_mut().for_each(|l| l.sort_by_key(|&(t, _)| t));
        let dispatch = Dispatch::from_lists(shape.tokens(), lists);
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: None,
            stats,
            group_size: shape.tokens_per_sample,
        })
    }

    fn backward(
        &self,
        routing: &Routing,
        _scores: &[f32],
        grad_gates: &[f32],
        _grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> Result<()> {
        // gate = p_e with p = softmax(row): d gate / d s_j = p_e (delta_ej - p_j)
        let d = &routing.dispatch;
        let e_count = d.experts;
        check_len("balanced-random backward", "grad_gates", grad_gates.len(), d.slots())?;
        check_len(
            "balanced-random backward",
            "grad_scores",
            grad_scores.len(),
            routing.probs.len(),
        )?;
        grad_scores.iter_mut().for_each(|g| *g = 0.0);
        for e in 0..e_count {
            let range = d.offsets[e]..d.offsets[e + 1];
            for (&t, &gg) in d.tokens[range.clone()].iter().zip(&grad_gates[range]) {
                let t = t as usize;
                let p = &routing.probs[t * e_count..(t + 1) * e_count];
                for j in 0..e_count {
                    let delta = if j == e { 1.0 } else { 0.0 };
                    grad_scores[t * e_count + j] += gg * p[e] * (delta - p[j]);
                }
            }
        }
        Ok(())
    }
}

/// Registers `balanced-random`; the export macro exports what this registers.
pub fn register(registry: &mut Registry) -> Result<()> {
    let info = ComponentInfo {
        family: Family::Router,
        kind: "balanced-random".into(),
        description: "Deals each sample's shuffled tokens to the experts in turn; gate = router probability".into(),
        params: vec![ParamInfo::new("seed", ParamType::Int, Some(json!(0)), "shuffle seed")],
        origin: "builtin".into(),
    };
    registry.register_router(
        info,
        Arc::new(|params| {
            let seed: u64 = ecdit_engine::spec::get("router 'balanced-random'", params, "seed")?;
            Ok(Box::new(BalancedRandom { seed }) as Box<dyn Router>)
        }),
    )
}

ecdit_engine::export_plugin!(register);
