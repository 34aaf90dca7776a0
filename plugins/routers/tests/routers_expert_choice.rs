//! Properties of expert-choice routing (EC-DIT.md section 2).

use ecdit_engine::{expert_capacity, RouteShape, Router, Routing, RoutingGroups};
use ecdit_routers::routers::ExpertChoiceRouter;
use proptest::prelude::*;

/// Row softmax in f64, written independently of the router's.
fn softmax_f64(scores: &[f32], experts: usize) -> Vec<f64> {
    scores
        .chunks(experts)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let exps: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(move |v| v / sum)
        })
        .collect()
}

/// A batch shape plus scores in [-4, 4].
fn batch(max_samples: usize, max_tps: usize, max_e: usize) -> impl Strategy<Value = (RouteShape, Vec<f32>)> {
    (1..=max_samples, 1..=max_tps, 1..=max_e).prop_flat_map(|(samples, tokens_per_sample, experts)| {
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

fn groups() -> impl Strategy<Value = RoutingGroups> {
    prop_oneof![Just(RoutingGroups::PerSample), Just(RoutingGroups::Batch)]
}

/// Slots of expert `e` that belong to group `g` (each group holds `c` slots).
fn group_slots(r: &Routing, e: usize, g: usize, c: usize) -> (Vec<u32>, Vec<f32>) {
    let (toks, gates) = r.dispatch.expert(e);
    (toks[g * c..(g + 1) * c].to_vec(), gates[g * c..(g + 1) * c].to_vec())
}

proptest! {
    // Every expert takes exactly C distinct tokens of each group, C follows the
    // rounding rule, the gates are the softmax probabilities of the chosen
    // pairs, chosen tokens are the real top-C, ordered by descending prob.
    #[test]
    fn each_expert_takes_its_top_c_of_every_group(
        (shape, scores) in batch(4, 24, 8),
        f_c in 0.05f64..6.0,
        groups in groups(),
    ) {
        let router = ExpertChoiceRouter::new(f_c, groups).unwrap();
        let r = router.route(&scores, shape).unwrap();
        r.dispatch.validate("expert-choice").unwrap();
        let e_count = shape.experts;
        let s = groups.group_size(shape).unwrap();
        let n_groups = shape.tokens() / s;
        let c = expert_capacity(f_c, s, e_count);
        // C * E against f_c * S after rounding: within E / 2 unless clamped to [1, S].
        let ideal = f_c * s as f64;
        if c > 1 && c < s {
            prop_assert!(((c * e_count) as f64 - ideal).abs() <= e_count as f64 / 2.0 + 1e-9);
        }
        prop_assert!(c >= 1 && c <= s);
        prop_assert_eq!(r.group_size, s);

        let want_probs = softmax_f64(&scores, e_count);
        for (p, w) in r.probs.iter().zip(&want_probs) {
            prop_assert!((*p as f64 - w).abs() < 1e-6);
        }
        for e in 0..e_count {
            prop_assert_eq!(r.dispatch.expert(e).0.len(), n_groups * c);
            for g in 0..n_groups {
                let (toks, gates) = group_slots(&r, e, g, c);
                let mut chosen = vec![false; s];
                for (&t, &gate) in toks.iter().zip(&gates) {
                    let t = t as usize;
                    prop_assert!(t >= g * s && t < (g + 1) * s, "token {} outside group {}", t, g);
                    prop_assert!(!chosen[t - g * s], "token {} twice", t);
                    chosen[t - g * s] = true;
                    prop_assert!((gate as f64 - want_probs[t * e_count + e]).abs() < 1e-6);
                    prop_assert_eq!(gate, r.probs[t * e_count + e]);
                }
                prop_assert!(gates.windows(2).all(|w| w[0] >= w[1]), "not descending: {:?}", gates);
                let min_chosen = gates.iter().copied().fold(f32::INFINITY, f32::min);
                for (i, &was) in chosen.iter().enumerate() {
                    if !was {
                        prop_assert!(r.probs[(g * s + i) * e_count + e] <= min_chosen);
                    }
                }
            }
        }
    }

    // The rounding rule for any S, E and f_c, read off the dispatch.
    #[test]
    fn capacity_follows_the_rounding_rule(s in 1usize..600, e_count in 1usize..65, f_c in 0.01f64..8.0) {
        let shape = RouteShape { samples: 1, tokens_per_sample: s, experts: e_count };
        let r = ExpertChoiceRouter::new(f_c, RoutingGroups::PerSample)
            .unwrap()
            .route(&vec![0.0; s * e_count], shape)
            .unwrap();
        let c = r.dispatch.expert(0).0.len();
        let raw = (f_c * s as f64 / e_count as f64 + 0.5).floor() as usize;
        prop_assert_eq!(c, raw.clamp(1, s));
        if raw >= 1 && raw <= s {
            prop_assert!(((c * e_count) as f64 - f_c * s as f64).abs() <= e_count as f64 / 2.0 + 1e-9);
        }
        prop_assert_eq!(r.dispatch.slots(), c * e_count);
    }

    // Shuffling the tokens inside each sample shuffles the dispatch the same way.
    #[test]
    fn permuting_tokens_permutes_the_dispatch(
        (shape, scores, perm) in batch(3, 20, 6).prop_flat_map(|(shape, scores)| {
            let perm = Just((0..shape.tokens_per_sample).collect::<Vec<_>>()).prop_shuffle();
            (Just(shape), Just(scores), perm)
        }),
        f_c in 0.2f64..4.0,
    ) {
        let router = ExpertChoiceRouter::new(f_c, RoutingGroups::PerSample).unwrap();
        let base = router.route(&scores, shape).unwrap();
        let (tps, e_count) = (shape.tokens_per_sample, shape.experts);
        // Exact ties break by index, which a permutation changes; skip those.
        for e in 0..e_count {
            for smp in 0..shape.samples {
                let mut col: Vec<f32> = (0..tps).map(|i| base.probs[(smp * tps + i) * e_count + e]).collect();
                col.sort_by(f32::total_cmp);
                prop_assume!(col.windows(2).all(|w| w[0] != w[1]));
            }
        }
        // Token i of sample smp moves to position perm[i].
        let mut shuffled = vec![0.0f32; scores.len()];
        let mut new_of_old = vec![0u32; shape.tokens()];
        for smp in 0..shape.samples {
            for (i, &p) in perm.iter().enumerate() {
                let (old, new) = (smp * tps + i, smp * tps + p);
                new_of_old[old] = new as u32;
                shuffled[new * e_count..(new + 1) * e_count].copy_from_slice(&scores[old * e_count..(old + 1) * e_count]);
            }
        }
        let moved = router.route(&shuffled, shape).unwrap();
        prop_assert_eq!(&moved.dispatch.offsets, &base.dispatch.offsets);
        for e in 0..e_count {
            let (bt, bg) = base.dispatch.expert(e);
            let (mt, mg) = moved.dispatch.expert(e);
            let want: Vec<(u32, u32)> = bt.iter().zip(bg).map(|(&t, g)| (new_of_old[t as usize], g.to_bits())).collect();
            let got: Vec<(u32, u32)> = mt.iter().zip(mg).map(|(&t, g)| (t, g.to_bits())).collect();
            prop_assert_eq!(got, want);
        }
    }

    // per_sample routing of a batch equals routing each sample alone.
    #[test]
    fn per_sample_batch_equals_samples_alone((shape, scores) in batch(5, 20, 8), f_c in 0.2f64..4.0) {
        let router = ExpertChoiceRouter::new(f_c, RoutingGroups::PerSample).unwrap();
        let whole = router.route(&scores, shape).unwrap();
        let (tps, e_count) = (shape.tokens_per_sample, shape.experts);
        let one = RouteShape { samples: 1, ..shape };
        let alone: Vec<Routing> = scores
            .chunks(tps * e_count)
            .map(|s| router.route(s, one).unwrap())
            .collect();
        for e in 0..e_count {
            let mut want_t = Vec::new();
            let mut want_g = Vec::new();
            for (smp, r) in alone.iter().enumerate() {
                let (t, g) = r.dispatch.expert(e);
                want_t.extend(t.iter().map(|&t| t + (smp * tps) as u32));
                want_g.extend_from_slice(g);
            }
            let (t, g) = whole.dispatch.expert(e);
            prop_assert_eq!(t, &want_t[..]);
            prop_assert_eq!(g, &want_g[..]);
        }
    }
}

// Groups of whole samples: a group of 2 samples routes like a batch of those 2.
#[test]
fn token_groups_route_like_their_samples_batched() {
    let shape = RouteShape {
        samples: 4,
        tokens_per_sample: 5,
        experts: 3,
    };
    let scores: Vec<f32> = (0..shape.tokens() * 3)
        .map(|i| ((i * 37 % 23) as f32) * 0.3 - 3.0)
        .collect();
    let grouped = ExpertChoiceRouter::new(2.0, RoutingGroups::Tokens(10))
        .unwrap()
        .route(&scores, shape)
        .unwrap();
    let pair = RouteShape { samples: 2, ..shape };
    let batched = ExpertChoiceRouter::new(2.0, RoutingGroups::Batch).unwrap();
    let halves: Vec<Routing> = scores.chunks(30).map(|s| batched.route(s, pair).unwrap()).collect();
    for e in 0..3 {
        let mut want = Vec::new();
        for (h, r) in halves.iter().enumerate() {
            want.extend(r.dispatch.expert(e).0.iter().map(|&t| t + 10 * h as u32));
        }
        assert_eq!(grouped.dispatch.expert(e).0, &want[..]);
    }
    // C = round(2 * 10 / 3) = 7 per group, two groups.
    assert_eq!(grouped.dispatch.expert(0).0.len(), 14);
}

proptest! {
    // On the CPU backend, `route_on` (router softmax + top_k_tokens, the
    // dispatch never leaving the device) gives the host routing bit for bit,
    // ties included (scores on a coarse grid tie often).
    #[test]
    fn route_on_the_cpu_backend_equals_route_bit_for_bit(
        (shape, scores) in batch(4, 24, 8),
        coarse in any::<bool>(),
        f_c in 0.05f64..6.0,
        groups in groups(),
    ) {
        use ecdit_backend_cpu::CpuBackend;
        use ecdit_engine::{BackendExt, DType};
        let scores: Vec<f32> = if coarse { scores.iter().map(|s| s.round()).collect() } else { scores };
        let be = CpuBackend::new(1).unwrap();
        let router = ExpertChoiceRouter::new(f_c, groups).unwrap();
        let host = router.route(&scores, shape).unwrap();
        let t = be.upload_f32(&[scores.len()], &scores, DType::F32).unwrap();
        let device = router.route_on(&be, t.view(), shape).unwrap();
        prop_assert!(device.host.is_none(), "routed on the host");
        let back = device.to_host(&be).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(&back.dispatch.offsets, &host.dispatch.offsets);
        prop_assert_eq!(&back.dispatch.tokens, &host.dispatch.tokens);
        prop_assert_eq!(bits(&back.dispatch.gates), bits(&host.dispatch.gates));
        prop_assert_eq!(bits(&back.probs), bits(&host.probs));
        prop_assert_eq!(back.group_size, host.group_size);
        prop_assert_eq!(back.stats, host.stats);
    }
}
