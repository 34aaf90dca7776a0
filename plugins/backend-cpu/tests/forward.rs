//! Forward ops of the CPU backend against naive reference loops.

mod common;

use common::*;
use ecdit_engine::{AttnDims, Backend, GemmDims, Unary};
use proptest::prelude::*;

fn both() -> [&'static dyn Backend; 2] {
    [cpu1(), cpu2()]
}

proptest! {
    #[test]
    fn gemm_matches_reference(m in 0usize..40, n in 0usize..40, k in 0usize..40, ta: bool, tb: bool,
                              alpha in -2.0f32..2.0, beta_kind in 0usize..3, seed: u64) {
        let beta = [0.0, 1.0, -0.5][beta_kind];
        let a = randv(seed, m * k, 1.0);
        let b = randv(seed ^ 1, k * n, 1.0);
        let mut out0 = randv(seed ^ 2, m * n, 1.0);
        if beta == 0.0 {
            // beta == 0 must not read out (BLAS semantics).
            out0.iter_mut().for_each(|x| *x = f32::NAN);
        }
        let want = ref_gemm(&out0, &a, &b, m, n, k, ta, tb, alpha, beta);
        for be in both() {
            let mut out = out0.clone();
            be.gemm(&mut out, &a, &b, GemmDims { m, n, k, trans_a: ta, trans_b: tb }, alpha, beta).unwrap();
            check_close("gemm", &out, &want, 1e-4 * (k as f32 + 1.0), 1e-4)?;
        }
    }

    #[test]
    fn gemm_batched_is_independent_gemms(batch in 1usize..6, m in 1usize..20, n in 1usize..20, k in 1usize..20,
                                         ta: bool, tb: bool, seed: u64) {
        let a = randv(seed, batch * m * k, 1.0);
        let b = randv(seed ^ 1, batch * k * n, 1.0);
        let out0 = randv(seed ^ 2, batch * m * n, 1.0);
        let mut want = Vec::new();
        for i in 0..batch {
            want.extend(ref_gemm(&out0[i * m * n..][..m * n], &a[i * m * k..][..m * k], &b[i * k * n..][..k * n],
                                 m, n, k, ta, tb, 0.5, 1.0));
        }
        for be in both() {
            let mut out = out0.clone();
            be.gemm_batched(&mut out, &a, &b, batch, GemmDims { m, n, k, trans_a: ta, trans_b: tb }, 0.5, 1.0).unwrap();
            check_close("gemm_batched", &out, &want, 1e-4 * k as f32, 1e-4)?;
        }
    }

    #[test]
    fn bias_and_column_sums_match_reference(rows in 0usize..300, cols in 0usize..200, acc: bool, seed: u64) {
        let x = randv(seed, rows * cols, 1.0);
        let bias = randv(seed ^ 1, cols, 1.0);
        let start = randv(seed ^ 2, cols, 1.0);
        let with_bias: Vec<f32> = (0..rows * cols).map(|i| x[i] + bias[i % cols]).collect();
        let sums: Vec<f32> = (0..cols)
            .map(|c| (0..rows).map(|r| x[r * cols + c] as f64).sum::<f64>() as f32 + if acc { start[c] } else { 0.0 })
            .collect();
        for be in both() {
            let mut out = x.clone();
            be.add_bias(&mut out, &bias, rows, cols).unwrap();
            prop_assert_eq!(&out, &with_bias);
            let mut s = start.clone();
            be.sum_rows(&mut s, &x, rows, cols, acc).unwrap();
            check_close("sum_rows", &s, &sums, 1e-5 * rows as f32, 1e-5)?;
        }
    }

    #[test]
    fn softmax_matches_reference(rows in 0usize..200, cols in 1usize..300, seed: u64) {
        let x = randv(seed, rows * cols, 30.0);
        let mut want = vec![0.0f32; rows * cols];
        for r in 0..rows {
            let row = &x[r * cols..][..cols];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for c in 0..cols {
                want[r * cols + c] = ((row[c] as f64 - max).exp() / z) as f32;
            }
        }
        for be in both() {
            let mut out = vec![0.0; rows * cols];
            be.softmax_rows(&mut out, &x, rows, cols).unwrap();
            check_close("softmax", &out, &want, 1e-6, 1e-4)?;
        }
    }

    #[test]
    fn layer_norm_matches_reference(rows in 0usize..200, cols in 1usize..300, affine: bool, seed: u64) {
        let x = randv(seed, rows * cols, 3.0);
        let w = randv(seed ^ 1, cols, 2.0);
        let bias = randv(seed ^ 2, cols, 1.0);
        let eps = 1e-5f32;
        let mut want = vec![0.0f32; rows * cols];
        let (mut want_mean, mut want_rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        for r in 0..rows {
            let row = &x[r * cols..][..cols];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            want_mean[r] = mean as f32;
            want_rstd[r] = rstd as f32;
            for c in 0..cols {
                let norm = (row[c] as f64 - mean) * rstd;
                want[r * cols + c] = if affine { (norm * w[c] as f64 + bias[c] as f64) as f32 } else { norm as f32 };
            }
        }
        for be in both() {
            let (mut out, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
            let (wo, bo) = if affine { (Some(&w[..]), Some(&bias[..])) } else { (None, None) };
            be.layer_norm(&mut out, &mut mean, &mut rstd, &x, wo, bo, rows, cols, eps).unwrap();
            check_close("layer_norm out", &out, &want, 1e-4, 1e-4)?;
            check_close("layer_norm mean", &mean, &want_mean, 1e-5, 1e-5)?;
            check_close("layer_norm rstd", &rstd, &want_rstd, 1e-5, 1e-4)?;
        }
    }

    #[test]
    fn activations_match_formulas(n in 0usize..70_000, seed: u64) {
        let x = randv(seed, n, 6.0);
        let gelu: Vec<f32> = x.iter().map(|&v| {
            let v = v as f64;
            (0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())) as f32
        }).collect();
        let silu: Vec<f32> = x.iter().map(|&v| (v as f64 / (1.0 + (-(v as f64)).exp())) as f32).collect();
        for be in both() {
            let mut out = vec![0.0; n];
            be.unary(Unary::GeluTanh, &mut out, &x).unwrap();
            check_close("gelu", &out, &gelu, 1e-6, 1e-5)?;
            be.unary(Unary::Silu, &mut out, &x).unwrap();
            check_close("silu", &out, &silu, 1e-6, 1e-5)?;
        }
    }

    #[test]
    fn attention_matches_reference(b in 1usize..3, hkv in 1usize..3, group in 1usize..3, tq in 0usize..9, tk in 0usize..9,
                                   dh in 1usize..9, masked: bool, seed: u64) {
        let h = hkv * group;
        let q = randv(seed, b * tq * h * dh, 2.0);
        let k = randv(seed ^ 1, b * tk * hkv * dh, 2.0);
        let v = randv(seed ^ 2, b * tk * hkv * dh, 1.0);
        let mask: Vec<u8> = randv(seed ^ 3, b * tk, 1.0).iter().map(|&x| (x > -0.4) as u8).collect();
        let mask = masked.then_some(&mask[..]);
        let (want_out, want_probs) = ref_attention(&q, &k, &v, mask, b, h, hkv, tq, tk, dh);
        let dims = AttnDims { batch: b, heads: h, kv_heads: hkv, q_len: tq, kv_len: tk, head_dim: dh };
        for be in both() {
            let mut out = vec![f32::NAN; q.len()];
            let mut probs = vec![f32::NAN; b * h * tq * tk];
            be.attention(&mut out, &mut probs, &q, &k, &v, mask, dims).unwrap();
            check_close("attention out", &out, &want_out, 1e-5, 1e-4)?;
            check_close("attention probs", &probs, &want_probs, 1e-6, 1e-4)?;
        }
    }

    #[test]
    fn gather_and_scatter_match_reference(rows in 1usize..50, cols in 1usize..40, n in 0usize..80, scaled: bool, seed: u64) {
        let inp = randv(seed, rows * cols, 1.0);
        let idx: Vec<u32> = randv(seed ^ 1, n, 1.0).iter().map(|&x| ((x + 1.0) * 0.5 * rows as f32) as u32 % rows as u32).collect();
        let src = randv(seed ^ 2, n * cols, 1.0);
        let scale = randv(seed ^ 3, n, 2.0);
        let mut want_scatter = inp.clone();
        for (i, &r) in idx.iter().enumerate() {
            let s = if scaled { scale[i] } else { 1.0 };
            for c in 0..cols {
                want_scatter[r as usize * cols + c] += s * src[i * cols + c];
            }
        }
        for be in both() {
            let mut out = vec![0.0; n * cols];
            be.gather_rows(&mut out, &inp, &idx, cols).unwrap();
            for (i, &r) in idx.iter().enumerate() {
                prop_assert_eq!(&out[i * cols..][..cols], &inp[r as usize * cols..][..cols]);
            }
            let mut acc = inp.clone();
            be.scatter_add_rows(&mut acc, &src, &idx, scaled.then_some(&scale[..]), cols).unwrap();
            // Same order of additions as the sequential loop: the same bits.
            prop_assert_eq!(&acc, &want_scatter);
        }
    }

    #[test]
    fn top_k_matches_a_full_sort(rows in 0usize..20, cols in 1usize..60, kfrac in 0.0f64..1.0, seed: u64) {
        let k = ((cols as f64 * kfrac) as usize).min(cols);
        // Few distinct values, so ties are common.
        let inp: Vec<f32> = randv(seed, rows * cols, 3.0).iter().map(|x| x.round()).collect();
        for be in both() {
            let (mut idx, mut val) = (vec![0u32; rows * k], vec![0.0f32; rows * k]);
            be.top_k_rows(&mut idx, &mut val, &inp, rows, cols, k).unwrap();
            for r in 0..rows {
                let row = &inp[r * cols..][..cols];
                let mut order: Vec<u32> = (0..cols as u32).collect();
                // partial_cmp: -0.0 and 0.0 tie, as IEEE equality says.
                order.sort_by(|&a, &b| row[b as usize].partial_cmp(&row[a as usize]).unwrap().then(a.cmp(&b)));
                prop_assert_eq!(&idx[r * k..][..k], &order[..k]);
                let vals: Vec<f32> = order[..k].iter().map(|&i| row[i as usize]).collect();
                prop_assert_eq!(&val[r * k..][..k], &vals[..]);
            }
        }
    }
}
