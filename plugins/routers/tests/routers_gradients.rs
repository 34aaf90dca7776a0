//! Finite-difference checks of every router's backward.
//!
//! loss = sum over slots of gate * w[token, expert] + aux_loss * c, so
//! grad_gates = w at the slots and grad_aux = c. Central differences of
//! `route` on perturbed scores must match `backward` wherever the perturbation
//! leaves the discrete selection unchanged (the selection is not
//! differentiated); coordinates where it changes are skipped, and most must
//! remain.

use ecdit_engine::{RouteShape, Router, Routing, RoutingGroups};
use ecdit_routers::routers::{DenseRouter, ExpertChoiceRouter, ExpertRaceRouter, ScoreFn, TokenChoiceRouter};
use proptest::prelude::*;

const STEP: f32 = 1e-3;

fn loss(r: &Routing, w: &[f32], c: f32) -> f64 {
    let d = &r.dispatch;
    let mut l = r.aux_loss.unwrap_or(0.0) as f64 * c as f64;
    for e in 0..d.experts {
        let (toks, gates) = d.expert(e);
        for (&t, &g) in toks.iter().zip(gates) {
            l += g as f64 * w[t as usize * d.experts + e] as f64;
        }
    }
    l
}

/// Checks `router`'s backward against central differences; returns the
/// number of coordinates checked.
fn check_gradient(router: &dyn Router, shape: RouteShape, scores: &[f32], w: &[f32], c: f32) -> Result<usize, String> {
    let base = router.route(scores, shape).map_err(|e| e.to_string())?;
    let d = &base.dispatch;
    let grad_gates: Vec<f32> = (0..d.experts)
        .flat_map(|e| d.expert(e).0.iter().map(move |&t| w[t as usize * d.experts + e]))
        .collect();
    let mut grad = vec![f32::NAN; scores.len()];
    router
        .backward(&base, scores, &grad_gates, c, &mut grad)
        .map_err(|e| e.to_string())?;
    let l0 = loss(&base, w, c);
    let mut checked = 0;
    for i in 0..scores.len() {
        let at = |delta: f32| {
            let mut x = scores.to_vec();
            x[i] += delta;
            router.route(&x, shape).map_err(|e| e.to_string())
        };
        let (plus, minus) = (at(STEP)?, at(-STEP)?);
        let same = |r: &Routing| r.dispatch.offsets == d.offsets && r.dispatch.tokens == d.tokens;
        let (lp, lm) = (loss(&plus, w, c), loss(&minus, w, c));
        // A jump (e.g. a balance-loss count that changed) shows as curvature.
        if !same(&plus) || !same(&minus) || (lp + lm - 2.0 * l0).abs() > 1e-4 {
            continue;
        }
        let numeric = (lp - lm) / (2.0 * STEP as f64);
        let analytic = grad[i] as f64;
        let tol = 1e-2 * analytic.abs().max(numeric.abs()) + 1e-3;
        if (numeric - analytic).abs() > tol {
            return Err(format!(
                "{}: d loss / d score[{i}]: backward {analytic}, finite difference {numeric}",
                router.kind()
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

/// A shape with `experts` in the given range, scores in [-3, 3], weights w
/// in [-1, 1] and an aux weight c.
fn case(min_e: usize, max_e: usize) -> impl Strategy<Value = (RouteShape, Vec<f32>, Vec<f32>, f32)> {
    (1usize..=3, 2usize..=10, min_e..=max_e).prop_flat_map(|(samples, tokens_per_sample, experts)| {
        let shape = RouteShape {
            samples,
            tokens_per_sample,
            experts,
        };
        let n = shape.tokens() * experts;
        (
            Just(shape),
            prop::collection::vec(-3.0f32..3.0, n),
            prop::collection::vec(-1.0f32..1.0, n),
            -2.0f32..2.0,
        )
    })
}

fn groups() -> impl Strategy<Value = RoutingGroups> {
    prop_oneof![Just(RoutingGroups::PerSample), Just(RoutingGroups::Batch)]
}

fn assert_mostly_checked(checked: usize, total: usize) -> Result<(), TestCaseError> {
    prop_assert!(
        checked * 2 >= total,
        "only {checked} of {total} coordinates kept the selection"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn expert_choice_gradient((shape, scores, w, c) in case(1, 6), f_c in 0.5f64..3.0, groups in groups()) {
        let router = ExpertChoiceRouter::new(f_c, groups).unwrap();
        let checked = check_gradient(&router, shape, &scores, &w, c).map_err(TestCaseError::fail)?;
        assert_mostly_checked(checked, scores.len())?;
    }

    #[test]
    fn token_choice_gradient(
        (shape, scores, w, c, k) in case(1, 6).prop_flat_map(|(shape, s, w, c)| {
            let e = shape.experts;
            (Just(shape), Just(s), Just(w), Just(c), 1..=e)
        }),
        renormalize: bool,
        capacity in prop::option::of(0.5f64..2.0),
        coef in 0.0f64..1.0,
        groups in groups(),
    ) {
        let router = TokenChoiceRouter::new(k, renormalize, capacity, coef, groups).unwrap();
        let checked = check_gradient(&router, shape, &scores, &w, c).map_err(TestCaseError::fail)?;
        assert_mostly_checked(checked, scores.len())?;
    }

    #[test]
    fn expert_race_gradient(
        (shape, scores, w, c) in case(1, 6),
        k in 0.5f64..4.0,
        sigmoid: bool,
        groups in groups(),
    ) {
        let score_fn = if sigmoid { ScoreFn::Sigmoid } else { ScoreFn::Softmax };
        let router = ExpertRaceRouter::new(k, score_fn, groups).unwrap();
        let checked = check_gradient(&router, shape, &scores, &w, c).map_err(TestCaseError::fail)?;
        assert_mostly_checked(checked, scores.len())?;
    }

    #[test]
    fn dense_gradient_is_zero((shape, scores, w, c) in case(1, 1)) {
        let checked = check_gradient(&DenseRouter, shape, &scores, &w, c).map_err(TestCaseError::fail)?;
        prop_assert_eq!(checked, scores.len());
    }
}

// The balance-loss path alone: no gates in the loss, only c * aux_loss.
#[test]
fn token_choice_balance_loss_gradient_alone() {
    let shape = RouteShape {
        samples: 2,
        tokens_per_sample: 6,
        experts: 4,
    };
    let scores: Vec<f32> = (0..48).map(|i| ((i * 29 % 31) as f32) * 0.2 - 3.0).collect();
    let w = vec![0.0f32; 48];
    let router = TokenChoiceRouter::new(2, true, None, 1.0, RoutingGroups::PerSample).unwrap();
    let checked = check_gradient(&router, shape, &scores, &w, 1.0).unwrap();
    assert!(checked >= 40, "{checked}");
    // And it is not trivially zero.
    let r = router.route(&scores, shape).unwrap();
    let mut grad = vec![0.0f32; 48];
    router
        .backward(&r, &scores, &vec![0.0; r.dispatch.slots()], 1.0, &mut grad)
        .unwrap();
    assert!(grad.iter().any(|g| g.abs() > 1e-3), "{grad:?}");
}
