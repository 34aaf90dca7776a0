//! Forward ops of the CPU backend against naive reference loops.

mod common;

use common::*;
use ecdit_engine::dtype::bf16;
use ecdit_engine::{AttnDims, Backend, BackendExt, DType, GemmDims, ModChunks, PatchDims, RowDims, Unary};
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
            be.gemm_h(&mut out, &a, &b, None, GemmDims { m, n, k, trans_a: ta, trans_b: tb }, alpha, beta).unwrap();
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
            be.gemm_batched_h(&mut out, &a, &b, batch, GemmDims { m, n, k, trans_a: ta, trans_b: tb }, 0.5, 1.0).unwrap();
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
            be.add_broadcast_h(&mut out, &bias).unwrap();
            prop_assert_eq!(&out, &with_bias);
            let mut s = start.clone();
            be.sum_rows_h(&mut s, &x, rows, cols, acc).unwrap();
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
            be.softmax_rows_h(&mut out, &x, rows, cols).unwrap();
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
            be.layer_norm_h(&mut out, &mut mean, &mut rstd, &x, wo, bo, rows, cols, eps).unwrap();
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
            be.unary_h(Unary::GeluTanh, &mut out, &x).unwrap();
            check_close("gelu", &out, &gelu, 1e-6, 1e-5)?;
            be.unary_h(Unary::Silu, &mut out, &x).unwrap();
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
            be.attention_h(&mut out, Some(&mut probs), &q, &k, &v, mask, dims).unwrap();
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
            be.gather_rows_h(&mut out, &inp, &idx, cols).unwrap();
            for (i, &r) in idx.iter().enumerate() {
                prop_assert_eq!(&out[i * cols..][..cols], &inp[r as usize * cols..][..cols]);
            }
            let mut acc = inp.clone();
            be.scatter_add_rows_h(&mut acc, &src, &idx, scaled.then_some(&scale[..]), cols).unwrap();
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
            be.top_k_rows_h(&mut idx, &mut val, &inp, rows, cols, k).unwrap();
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

/// The model's (pre-v2) patchify loop, square images: patches [B, T, C p p].
fn ref_patchify(x: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (gh, gw, patch) = (h / p, w / p, c * p * p);
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for row in 0..gh {
            for col in 0..gw {
                for ch in 0..c {
                    for pi in 0..p {
                        for qi in 0..p {
                            out[((bi * gh + row) * gw + col) * patch + (ch * p + pi) * p + qi] =
                                x[((bi * c + ch) * h + row * p + pi) * w + col * p + qi];
                        }
                    }
                }
            }
        }
    }
    out
}

/// The model's unpatchify loop: patches [B, T, p p C] (channel fastest) to images.
fn ref_unpatchify(t: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (gh, gw, patch) = (h / p, w / p, c * p * p);
    let mut img = vec![0.0; t.len()];
    for bi in 0..b {
        for row in 0..gh {
            for col in 0..gw {
                for pi in 0..p {
                    for qi in 0..p {
                        for ch in 0..c {
                            img[((bi * c + ch) * h + row * p + pi) * w + col * p + qi] =
                                t[((bi * gh + row) * gw + col) * patch + (pi * p + qi) * c + ch];
                        }
                    }
                }
            }
        }
    }
    img
}

#[test]
fn patchify_reads_channel_major_patches_in_row_major_order() {
    // The model's unit test: 1 image, 2 channels, 4x4, p = 2; pixel = ch*100 + y*10 + x.
    let (c, s, p) = (2, 4, 2);
    let x: Vec<f32> = (0..c * s * s)
        .map(|i| ((i / 16) * 100 + (i % 16 / 4) * 10 + i % 4) as f32)
        .collect();
    let mut patches = vec![0.0; 4 * c * p * p];
    let dims = PatchDims {
        batch: 1,
        channels: c,
        height: s,
        width: s,
        patch: p,
        channels_fastest: false,
    };
    cpu2().patchify_h(&mut patches, &x, dims).unwrap();
    assert_eq!(&patches[8..16], &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]);
    assert_eq!(&patches[16..20], &[20.0, 21.0, 30.0, 31.0]);
}

#[test]
fn timestep_features_match_the_models_formula_bit_for_bit() {
    // The model's `timestep_frequencies` (f32, upstream's operation order).
    let t = [0.0f32, 1.0, 999.0, 500.0, 17.25];
    for dim in [8usize, 256, 7, 1] {
        let half = dim / 2;
        let scale = -(10000f64.ln()) as f32;
        let mut want = vec![0.0f32; t.len() * dim];
        for (row, &tb) in want.chunks_mut(dim).zip(&t) {
            for i in 0..half {
                let f = (scale * i as f32 / half as f32).exp();
                row[i] = (tb * f).cos();
                row[half + i] = (tb * f).sin();
            }
        }
        for be in both() {
            let mut out = vec![f32::NAN; t.len() * dim];
            be.timestep_features_h(&mut out, &t, dim, 10000.0).unwrap();
            assert!(
                out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "dim {dim}"
            );
        }
    }
    // Half 4 of [cos | sin]: frequencies 1, 0.1, 0.01, 0.001.
    let mut f = vec![0.0; 8];
    cpu1().timestep_features_h(&mut f, &[2.0], 8, 10000.0).unwrap();
    for (i, w) in [1.0f64, 0.1, 0.01, 0.001].iter().enumerate() {
        assert!((f[i] as f64 - (2.0 * w).cos()).abs() < 1e-6);
        assert!((f[4 + i] as f64 - (2.0 * w).sin()).abs() < 1e-6);
    }
}

proptest! {
    #[test]
    fn gemm_with_bias_is_gemm_then_bias(m in 0usize..40, n in 0usize..40, k in 0usize..40, ta: bool, tb: bool,
                                        beta_kind in 0usize..3, seed: u64) {
        let beta = [0.0, 1.0, -0.5][beta_kind];
        let d = GemmDims { m, n, k, trans_a: ta, trans_b: tb };
        let a = randv(seed, m * k, 1.0);
        let b = randv(seed ^ 1, k * n, 1.0);
        let bias = randv(seed ^ 3, n, 1.0);
        let mut out0 = randv(seed ^ 2, m * n, 1.0);
        if beta == 0.0 {
            out0.iter_mut().for_each(|x| *x = f32::NAN);
        }
        for be in both() {
            let mut want = out0.clone();
            be.gemm_h(&mut want, &a, &b, None, d, 0.7, beta).unwrap();
            if n > 0 {
                be.add_broadcast_h(&mut want, &bias).unwrap();
            }
            let mut got = out0.clone();
            be.gemm_h(&mut got, &a, &b, Some(&bias), d, 0.7, beta).unwrap();
            check_close("gemm + bias", &got, &want, 1e-6, 1e-6)?;
        }
    }

    #[test]
    fn add_broadcast_and_axpby_match_reference(n in 0usize..5, len in 1usize..3000, a in -2.0f32..2.0,
                                               b in -2.0f32..2.0, seed: u64) {
        let x = randv(seed, n * len, 1.0);
        let table = randv(seed ^ 1, len, 1.0);
        let y0 = randv(seed ^ 2, n * len, 1.0);
        let with_table: Vec<f32> = (0..n * len).map(|i| x[i] + table[i % len]).collect();
        let mixed: Vec<f32> = (0..n * len).map(|i| a * x[i] + b * y0[i]).collect();
        for be in both() {
            let mut out = x.clone();
            be.add_broadcast_h(&mut out, &table).unwrap();
            prop_assert_eq!(&out, &with_table);
            let mut y = y0.clone();
            be.axpby_h(&mut y, a, &x, b).unwrap();
            prop_assert_eq!(&y, &mixed);
        }
    }

    #[test]
    fn modulate_and_gated_residual_match_the_models_loops(batch in 0usize..4, tokens in 0usize..300, d in 1usize..80,
                                                          chunks in 1usize..7, seed: u64) {
        let which = ModChunks { chunks, first: seed as usize % chunks, second: (seed >> 8) as usize % chunks };
        let dims = RowDims { batch, tokens, d };
        let x = randv(seed, batch * tokens * d, 2.0);
        let y = randv(seed ^ 1, batch * tokens * d, 2.0);
        let m = randv(seed ^ 2, batch * chunks * d, 1.0);
        let ch = |j: usize, b: usize| &m[(b * chunks + j) * d..][..d];
        let (mut want_mod, mut want_res) = (x.clone(), x.clone());
        for b in 0..batch {
            for t in 0..tokens {
                for c in 0..d {
                    let i = (b * tokens + t) * d + c;
                    want_mod[i] = x[i] * (1.0 + ch(which.second, b)[c]) + ch(which.first, b)[c];
                    want_res[i] += ch(which.first, b)[c] * y[i];
                }
            }
        }
        for be in both() {
            let mut out = vec![f32::NAN; x.len()];
            be.modulate_h(&mut out, &x, &m, which, dims).unwrap();
            prop_assert_eq!(&out, &want_mod);
            let mut res = x.clone();
            be.gated_residual_h(&mut res, &y, &m, which, dims).unwrap();
            prop_assert_eq!(&res, &want_res);
            // bf16 storage (widened and narrowed block by block): the f32
            // arithmetic on the stored values, rounded once.
            let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect::<Vec<_>>();
            let (xb, yb, mb) = (round(&x), round(&y), round(&m));
            let want: Vec<f32> = (0..xb.len())
                .map(|i| {
                    let (b, c) = (i / (tokens * d), i % d);
                    xb[i] + mb[(b * chunks + which.first) * d + c] * yb[i]
                })
                .collect();
            let up = |v: &[f32]| be.upload_f32(&[v.len()], v, DType::BF16).unwrap();
            let (mut xt, yt, mt) = (up(&xb), up(&yb), up(&mb));
            be.gated_residual(xt.view_mut(), yt.view(), mt.view(), which, dims).unwrap();
            prop_assert_eq!(be.read_f32(xt.view()).unwrap(), round(&want));
        }
    }

    #[test]
    fn patchify_and_unpatchify_match_the_models_loops(batch in 0usize..3, c in 1usize..5, gh in 1usize..5,
                                                      gw in 1usize..5, p in 1usize..4, seed: u64) {
        let (h, w) = (gh * p, gw * p);
        let dims = PatchDims { batch, channels: c, height: h, width: w, patch: p, channels_fastest: false };
        let last = PatchDims { channels_fastest: true, ..dims };
        let x = randv(seed, batch * c * h * w, 1.0);
        for be in both() {
            // Channel-major rows: the model's patchify; channel-fastest rows: its unpatchify.
            let mut patches = vec![f32::NAN; x.len()];
            be.patchify_h(&mut patches, &x, dims).unwrap();
            prop_assert_eq!(&patches, &ref_patchify(&x, batch, c, h, w, p));
            let mut img = vec![f32::NAN; x.len()];
            be.unpatchify_h(&mut img, &x, last).unwrap();
            prop_assert_eq!(&img, &ref_unpatchify(&x, batch, c, h, w, p));
            // Same dims: inverse permutations, both ways.
            for dd in [dims, last] {
                let (mut t, mut back) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
                be.patchify_h(&mut t, &x, dd).unwrap();
                be.unpatchify_h(&mut back, &t, dd).unwrap();
                prop_assert_eq!(&back, &x);
                be.unpatchify_h(&mut t, &x, dd).unwrap();
                be.patchify_h(&mut back, &t, dd).unwrap();
                prop_assert_eq!(&back, &x);
            }
        }
    }

    #[test]
    fn gather_dot_matches_reference(rows in 1usize..50, cols in 0usize..40, n in 0usize..80, seed: u64) {
        let a = randv(seed, rows * cols, 1.0);
        let b = randv(seed ^ 1, n * cols, 1.0);
        let idx: Vec<u32> = randv(seed ^ 2, n, 1.0).iter().map(|&x| ((x + 1.0) * 0.5 * rows as f32) as u32 % rows as u32).collect();
        let want: Vec<f32> = (0..n)
            .map(|i| (0..cols).map(|c| a[idx[i] as usize * cols + c] * b[i * cols + c]).sum())
            .collect();
        for be in both() {
            let mut out = vec![f32::NAN; n];
            be.gather_dot_h(&mut out, &a, &idx, &b, cols).unwrap();
            prop_assert_eq!(&out, &want);
        }
    }

    #[test]
    fn attention_without_probs_matches_reference(b in 1usize..3, hkv in 1usize..3, group in 1usize..3, tq in 0usize..200,
                                                 tk in 0usize..40, dh in 1usize..9, masked: bool, seed: u64) {
        // tq up to 200 crosses the 128-row query blocks of the inference path.
        let h = hkv * group;
        let q = randv(seed, b * tq * h * dh, 2.0);
        let k = randv(seed ^ 1, b * tk * hkv * dh, 2.0);
        let v = randv(seed ^ 2, b * tk * hkv * dh, 1.0);
        let mask: Vec<u8> = randv(seed ^ 3, b * tk, 1.0).iter().map(|&x| (x > -0.4) as u8).collect();
        let mask = masked.then_some(&mask[..]);
        let (want_out, _) = ref_attention(&q, &k, &v, mask, b, h, hkv, tq, tk, dh);
        let dims = AttnDims { batch: b, heads: h, kv_heads: hkv, q_len: tq, kv_len: tk, head_dim: dh };
        for be in both() {
            let mut out = vec![f32::NAN; q.len()];
            be.attention_h(&mut out, None, &q, &k, &v, mask, dims).unwrap();
            check_close("attention (no probs) out", &out, &want_out, 1e-5, 1e-4)?;
        }
    }
}

/// A whole tensor as one row (the trainer's gradient norm): rows of 2^15
/// columns or more are summed in fixed blocks, in parallel; within f32
/// rounding of the f64 sum, and the same bits on 1 and 2 threads.
#[test]
fn gather_dot_of_long_rows_matches_reference_on_any_pool() {
    for cols in [(1 << 15) - 1, 1 << 15, 100_003] {
        let a = randv(5, 2 * cols, 1.0);
        let b = randv(6, 2 * cols, 1.0);
        let idx = [1u32, 0];
        let mut outs = Vec::new();
        for be in both() {
            let mut out = vec![f32::NAN; 2];
            be.gather_dot_h(&mut out, &a, &idx, &b, cols).unwrap();
            for (i, &r) in idx.iter().enumerate() {
                let (row_a, row_b) = (&a[r as usize * cols..][..cols], &b[i * cols..][..cols]);
                let want: f64 = row_a.iter().zip(row_b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let scale: f64 = row_a
                    .iter()
                    .zip(row_b)
                    .map(|(&x, &y)| (x as f64 * y as f64).abs())
                    .sum();
                assert!(
                    (out[i] as f64 - want).abs() <= 1e-5 * scale,
                    "cols {cols} row {i}: {} vs {want}",
                    out[i]
                );
            }
            outs.push(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        assert_eq!(outs[0], outs[1], "cols {cols}: 1 and 2 threads differ");
    }
}
