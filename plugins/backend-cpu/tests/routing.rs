//! The router ops: `router_softmax` gives the host routers' bits
//! (`routing_math`), `top_k_tokens` is expert choice's selection exactly, and
//! both are f32 only.

mod common;

use common::*;
use ecdit_engine::{routing_math, Backend, BackendExt, DType, EngineError};
use proptest::prelude::*;

fn both() -> [&'static dyn Backend; 2] {
    [cpu1(), cpu2()]
}

/// Expert choice by a plain stable sort: per (group, expert), rows by value
/// descending, ties to the lower row; expert-major [E, groups, k].
fn ref_top_k_tokens(probs: &[f32], groups: usize, s: usize, e_count: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    for e in 0..e_count {
        for g in 0..groups {
            let mut rows: Vec<usize> = (g * s..(g + 1) * s).collect();
            // A stable sort keeps lower rows first among equal values.
            rows.sort_by(|&a, &b| probs[b * e_count + e].partial_cmp(&probs[a * e_count + e]).unwrap());
            for &r in &rows[..k] {
                idx.push(r as u32);
                val.push(probs[r * e_count + e]);
            }
        }
    }
    (idx, val)
}

proptest! {
    #[test]
    fn router_softmax_is_bit_identical_to_routing_math(rows in 0usize..300, experts in 1usize..70, scale in 0.1f32..40.0,
                                                       seed: u64) {
        let scores = randv(seed, rows * experts, scale);
        let mut want = vec![0.0f32; scores.len()];
        routing_math::softmax_rows(&mut want, &scores, experts);
        for be in both() {
            let mut out = vec![f32::NAN; scores.len()];
            be.router_softmax_h(&mut out, &scores, rows, experts).unwrap();
            prop_assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn top_k_tokens_equals_a_plain_sort(groups in 0usize..4, s in 1usize..40, e_count in 1usize..9, kfrac in 0.0f64..1.0,
                                        seed: u64) {
        let k = ((s as f64 * kfrac) as usize).min(s);
        // Few distinct non-negative values (0 and -0 among them), so ties are common.
        let probs: Vec<f32> = randv(seed, groups * s * e_count, 1.0)
            .iter()
            .map(|x| if *x < -0.9 { -0.0 } else { ((x + 1.0) * 2.0).round() * 0.25 })
            .collect();
        let (want_idx, want_val) = ref_top_k_tokens(&probs, groups, s, e_count, k);
        for be in both() {
            let n = e_count * groups * k;
            let (mut idx, mut val) = (vec![u32::MAX; n], vec![f32::NAN; n]);
            be.top_k_tokens_h(&mut idx, &mut val, &probs, groups, s, e_count, k).unwrap();
            prop_assert_eq!(&idx, &want_idx);
            prop_assert_eq!(&val, &want_val);
        }
    }
}

#[test]
fn top_k_tokens_on_softmax_probs_is_bit_identical_across_thread_counts() {
    // Big enough that two threads split the experts.
    let (groups, s, e_count, k) = (4, 512, 16, 64);
    let scores = randv(9, groups * s * e_count, 3.0);
    let mut probs = vec![0.0f32; scores.len()];
    routing_math::softmax_rows(&mut probs, &scores, e_count);
    let run = |be: &dyn Backend| {
        let n = e_count * groups * k;
        let (mut idx, mut val) = (vec![0u32; n], vec![0.0f32; n]);
        be.top_k_tokens_h(&mut idx, &mut val, &probs, groups, s, e_count, k)
            .unwrap();
        (idx, val)
    };
    let one = run(cpu1());
    assert!(one == run(cpu2()));
    assert_eq!(one, ref_top_k_tokens(&probs, groups, s, e_count, k));
}

#[test]
fn router_ops_are_f32_only_and_check_their_sizes() {
    let be = cpu2();
    let scores = be.upload_f32(&[2, 3], &[0.0; 6], DType::BF16).unwrap();
    let mut out = be.zeros(&[2, 3], DType::F32).unwrap();
    let err = be.router_softmax(out.view_mut(), scores.view(), 2, 3).unwrap_err();
    assert!(
        matches!(&err, EngineError::Shape { op, .. } if op.contains("router_softmax (scores dtype)")),
        "{err}"
    );
    let mut out16 = be.zeros(&[2, 3], DType::BF16).unwrap();
    let probs = be.zeros(&[2, 3], DType::F32).unwrap();
    assert!(be.router_softmax(out16.view_mut(), probs.view(), 2, 3).is_err());
    let (mut idx, mut val) = (
        be.zeros(&[3, 1, 1], DType::U32).unwrap(),
        be.zeros(&[3, 1, 1], DType::BF16).unwrap(),
    );
    let err = be
        .top_k_tokens(idx.view_mut(), val.view_mut(), probs.view(), 1, 2, 3, 1)
        .unwrap_err();
    assert!(err.to_string().contains("top_k_tokens (val dtype)"), "{err}");
    let mut val = be.zeros(&[3, 1, 1], DType::F32).unwrap();
    let err = be
        .top_k_tokens(idx.view_mut(), val.view_mut(), scores.view(), 1, 2, 3, 1)
        .unwrap_err();
    assert!(err.to_string().contains("top_k_tokens (probs dtype)"), "{err}");
    // k above the group size, and wrong lengths.
    let (mut i, mut v) = (vec![0u32; 9], vec![0.0f32; 9]);
    let err = be.top_k_tokens_h(&mut i, &mut v, &[0.0; 6], 1, 2, 3, 3).unwrap_err();
    assert!(err.to_string().contains("k <= group_rows"), "{err}");
    let err = be
        .top_k_tokens_h(&mut i[..8], &mut v, &[0.0; 6], 1, 2, 3, 3)
        .unwrap_err();
    assert!(err.to_string().contains("top_k_tokens (idx)"), "{err}");
    let err = be.router_softmax_h(&mut v[..5], &[0.0; 6], 2, 3).unwrap_err();
    assert!(err.to_string().contains("router_softmax (out)"), "{err}");
}
