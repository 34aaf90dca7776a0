//! Properties of expert-race routing (Race-DiT).

use ecdit_engine::{RouteShape, Router, RoutingGroups};
use ecdit_routers::routers::{ExpertRaceRouter, ScoreFn};
use proptest::prelude::*;

fn case() -> impl Strategy<Value = (RouteShape, Vec<f32>)> {
    (1usize..=4, 1usize..=24, 1usize..=8).prop_flat_map(|(samples, tokens_per_sample, experts)| {
        let shape = RouteShape {
            samples,
            tokens_per_sample,
            experts,
        };
        (
            Just(shape),
            prop::collection::vec(-4.0f32..4.0, shape.tokens() * experts),
        )
    })
}

fn score_fn() -> impl Strategy<Value = ScoreFn> {
    prop_oneof![Just(ScoreFn::Sigmoid), Just(ScoreFn::Softmax)]
}

fn groups() -> impl Strategy<Value = RoutingGroups> {
    prop_oneof![Just(RoutingGroups::PerSample), Just(RoutingGroups::Batch)]
}

proptest! {
    // Exactly K = round(k S) (clamped to [1, S E]) pairs per group, and they
    // are the K largest scores of the group; gates are those scores.
    #[test]
    fn exactly_k_winners_per_group_and_they_are_the_best(
        (shape, scores) in case(),
        k in 0.05f64..10.0,
        score_fn in score_fn(),
        groups in groups(),
    ) {
        let router = ExpertRaceRouter::new(k, score_fn, groups).unwrap();
        let r = router.route(&scores, shape).unwrap();
        r.dispatch.validate("expert-race").unwrap();
        let e_count = shape.experts;
        let s = groups.group_size(shape).unwrap();
        let want_k = ((k * s as f64 + 0.5).floor() as usize).clamp(1, s * e_count);
        let value = |i: usize| match score_fn {
            ScoreFn::Sigmoid => 1.0 / (1.0 + (-(scores[i] as f64)).exp()),
            ScoreFn::Softmax => r.probs[i] as f64,
        };
        let mut won = vec![false; scores.len()];
        for e in 0..e_count {
            let (toks, gates) = r.dispatch.expert(e);
            prop_assert!(toks.windows(2).all(|w| w[0] < w[1]));
            for (&t, &g) in toks.iter().zip(gates) {
                let i = t as usize * e_count + e;
                won[i] = true;
                prop_assert!((g as f64 - value(i)).abs() < 1e-6, "gate {} want {}", g, value(i));
            }
        }
        for g in 0..shape.tokens() / s {
            let block = g * s * e_count..(g + 1) * s * e_count;
            prop_assert_eq!(won[block.clone()].iter().filter(|&&w| w).count(), want_k);
            let min_won = block.clone().filter(|&i| won[i]).map(value).fold(f64::INFINITY, f64::min);
            let max_lost = block.filter(|&i| !won[i]).map(value).fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(max_lost <= min_won + 1e-7, "lost {} > won {}", max_lost, min_won);
        }
    }
}

// Ties go to the lower token-major flat index: all-equal scores, K = 3.
#[test]
fn ties_go_to_the_lower_flat_index() {
    let shape = RouteShape {
        samples: 1,
        tokens_per_sample: 2,
        experts: 3,
    };
    let r = ExpertRaceRouter::new(1.5, ScoreFn::Sigmoid, RoutingGroups::PerSample)
        .unwrap()
        .route(&[0.0; 6], shape)
        .unwrap();
    // Winners: flat 0, 1, 2 = token 0 with experts 0, 1, 2.
    assert_eq!(r.dispatch.offsets, vec![0, 1, 2, 3]);
    assert_eq!(r.dispatch.tokens, vec![0, 0, 0]);
    assert!(r.dispatch.gates.iter().all(|&g| g == 0.5));
    assert_eq!(r.stats.max_experts_per_token, 3);
    assert_eq!(r.stats.unrouted_fraction, 0.5);
}
