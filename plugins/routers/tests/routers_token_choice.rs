//! Properties of token-choice top-k routing (GShard / Switch).

use ecdit_engine::{expert_capacity, RouteShape, Router, RoutingGroups};
use ecdit_routers::routers::TokenChoiceRouter;
use proptest::prelude::*;

/// A shape with at least `min_e` experts, scores in [-4, 4], and a k in 1..=E.
fn case(min_e: usize) -> impl Strategy<Value = (RouteShape, Vec<f32>, usize)> {
    (1usize..=4, 1usize..=24, min_e..=8).prop_flat_map(|(samples, tokens_per_sample, experts)| {
        let shape = RouteShape {
            samples,
            tokens_per_sample,
            experts,
        };
        (
            Just(shape),
            prop::collection::vec(-4.0f32..4.0, shape.tokens() * experts),
            1..=experts,
        )
    })
}

fn groups() -> impl Strategy<Value = RoutingGroups> {
    prop_oneof![Just(RoutingGroups::PerSample), Just(RoutingGroups::Batch)]
}

/// Each token's k best experts by a full sort of the router's probs (ties:
/// lower expert first), independent of the router's partial selection.
fn picks_by_sorting(probs: &[f32], experts: usize, k: usize) -> Vec<Vec<usize>> {
    probs
        .chunks(experts)
        .map(|row| {
            let mut idx: Vec<usize> = (0..experts).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        })
        .collect()
}

proptest! {
    // No capacity: every token gets exactly its k best experts, gates are the
    // probs (or their renormalisation, which sums to 1 per token).
    #[test]
    fn every_token_gets_its_k_best((shape, scores, k) in case(1), renormalize: bool, groups in groups()) {
        let router = TokenChoiceRouter::new(k, renormalize, None, 0.01, groups).unwrap();
        let r = router.route(&scores, shape).unwrap();
        r.dispatch.validate("token-choice").unwrap();
        let e_count = shape.experts;
        let picks = picks_by_sorting(&r.probs, e_count, k);
        let mut gate_of = vec![None; shape.tokens() * e_count];
        for e in 0..e_count {
            let (toks, gates) = r.dispatch.expert(e);
            prop_assert!(toks.windows(2).all(|w| w[0] < w[1]), "tokens not ascending");
            for (&t, &g) in toks.iter().zip(gates) {
                gate_of[t as usize * e_count + e] = Some(g);
            }
        }
        for (t, want) in picks.iter().enumerate() {
            let got: Vec<usize> = (0..e_count).filter(|&e| gate_of[t * e_count + e].is_some()).collect();
            let mut want_sorted = want.clone();
            want_sorted.sort_unstable();
            prop_assert_eq!(got, want_sorted);
            let z: f32 = want.iter().map(|&e| r.probs[t * e_count + e]).sum();
            let mut sum = 0.0f32;
            for &e in want {
                let g = gate_of[t * e_count + e].unwrap_or(f32::NAN);
                let p = r.probs[t * e_count + e];
                let expect = if renormalize { p / z } else { p };
                prop_assert!((g - expect).abs() <= 1e-6, "token {} expert {}: gate {} want {}", t, e, g, expect);
                sum += g;
            }
            if renormalize {
                prop_assert!((sum - 1.0).abs() < 1e-5, "renormalised gates sum to {}", sum);
            }
        }
        prop_assert_eq!(r.stats.max_experts_per_token, k);
    }

    // With a capacity: no token above k experts, no expert above C per group,
    // and since picks fill first choices first, an expert keeps
    // min(C, picks it drew) of each group.
    #[test]
    fn capacity_is_never_exceeded((shape, scores, k) in case(1), f_c in 0.1f64..3.0, groups in groups()) {
        let router = TokenChoiceRouter::new(k, false, Some(f_c), 0.01, groups).unwrap();
        let r = router.route(&scores, shape).unwrap();
        r.dispatch.validate("token-choice").unwrap();
        let e_count = shape.experts;
        let s = groups.group_size(shape).unwrap();
        let cap = expert_capacity(f_c * k as f64, s, e_count);
        let picks = picks_by_sorting(&r.probs, e_count, k);
        let mut per_token = vec![0usize; shape.tokens()];
        for e in 0..e_count {
            let toks = r.dispatch.expert(e).0;
            for g in 0..shape.tokens() / s {
                let kept = toks.iter().filter(|&&t| (t as usize) / s == g).count();
                let drawn = (g * s..(g + 1) * s).filter(|&t| picks[t].contains(&e)).count();
                prop_assert!(kept <= cap, "expert {} keeps {} > C = {}", e, kept, cap);
                prop_assert_eq!(kept, drawn.min(cap));
            }
            for &t in toks {
                prop_assert!(picks[t as usize].contains(&e), "token {} sent to unpicked expert {}", t, e);
                per_token[t as usize] += 1;
            }
        }
        prop_assert!(per_token.iter().all(|&n| n <= k));
    }

    // The balance loss equals coef * mean over groups of sum_e P_e * E * f_e,
    // recomputed here from the probs and the picks before dropping.
    #[test]
    fn balance_loss_matches_its_formula(
        (shape, scores, k) in case(1),
        coef in 0.0f64..2.0,
        capped: bool,
        groups in groups(),
    ) {
        let router = TokenChoiceRouter::new(k, false, capped.then_some(1.0), coef, groups).unwrap();
        let r = router.route(&scores, shape).unwrap();
        let e_count = shape.experts;
        let s = groups.group_size(shape).unwrap();
        let n_groups = shape.tokens() / s;
        let picks = picks_by_sorting(&r.probs, e_count, k);
        let mut total = 0.0f64;
        for g in 0..n_groups {
            let mut aux = 0.0;
            for e in 0..e_count {
                let p_e: f64 = (g * s..(g + 1) * s).map(|t| r.probs[t * e_count + e] as f64).sum::<f64>() / s as f64;
                let f_e = (g * s..(g + 1) * s).filter(|&t| picks[t].contains(&e)).count() as f64 / (s * k) as f64;
                aux += p_e * e_count as f64 * f_e;
            }
            total += aux;
        }
        let want = coef * total / n_groups as f64;
        let got = r.aux_loss.unwrap() as f64;
        prop_assert!((got - want).abs() <= 1e-5 * want.abs().max(1e-3), "aux {} want {}", got, want);
    }
}

// Perfect balance gives aux = 1 (times the coefficient): 4 tokens, 2 experts,
// k = 1, two tokens prefer each expert with mirrored probs.
#[test]
fn balanced_routing_has_unit_balance_loss() {
    let scores = [1.0f32, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0];
    let shape = RouteShape {
        samples: 1,
        tokens_per_sample: 4,
        experts: 2,
    };
    let r = TokenChoiceRouter::new(1, false, None, 0.5, RoutingGroups::PerSample)
        .unwrap()
        .route(&scores, shape)
        .unwrap();
    // P = [0.5, 0.5], f = [0.5, 0.5]: aux = 2 * (0.5 * 2 * 0.5) = 1.
    assert!((r.aux_loss.unwrap() - 0.5).abs() < 1e-6, "{:?}", r.aux_loss);
    assert_eq!(r.dispatch.tokens, vec![0, 2, 1, 3]);
}

// GShard order: with C = 1, token 1's first choice beats token 0's second.
#[test]
fn first_choices_fill_capacity_before_second_choices() {
    // token 0 prefers e0 then e1; token 1 prefers e1 then e0.
    let scores = [2.0f32, 1.0, 0.0, 3.0];
    let shape = RouteShape {
        samples: 1,
        tokens_per_sample: 2,
        experts: 2,
    };
    // C = round(0.5 * 2 * 2 / 2) = 1.
    let r = TokenChoiceRouter::new(2, false, Some(0.5), 0.0, RoutingGroups::PerSample)
        .unwrap()
        .route(&scores, shape)
        .unwrap();
    assert_eq!(r.dispatch.offsets, vec![0, 1, 2]);
    assert_eq!(r.dispatch.tokens, vec![0, 1]);
}
