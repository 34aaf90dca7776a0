//! Finite-difference checks of every backward op: the loss is a random-weighted
//! sum of the op's outputs, `L = sum(w * y)`, so its analytic gradient is the
//! op's backward applied to `dout = w`; central differences of the f32 forward
//! (accumulated in f64) must agree with it.

mod common;

use common::*;
use ecdit_engine::{AttnDims, Backend, GemmDims, ModChunks, PatchDims, RowDims, Unary};
use proptest::prelude::*;

fn be() -> &'static dyn Backend {
    cpu2()
}

/// Gradients of `L = sum(w * (alpha * op(a) @ op(b)))` wrt the stored `a` and
/// `b`, computed with gemm calls the way a model's backward does it.
fn gemm_backward(w: &[f32], a: &[f32], b: &[f32], d: GemmDims, alpha: f32) -> (Vec<f32>, Vec<f32>) {
    let GemmDims {
        m,
        n,
        k,
        trans_a,
        trans_b,
    } = d;
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    if trans_a {
        // a: [k, m]; da = op(b) @ dout^T: [k, m]
        be().gemm_h(
            &mut da,
            b,
            w,
            None,
            GemmDims {
                m: k,
                n: m,
                k: n,
                trans_a: trans_b,
                trans_b: true,
            },
            alpha,
            0.0,
        )
        .unwrap();
    } else {
        // da = dout @ op(b)^T: [m, k]
        be().gemm_h(
            &mut da,
            w,
            b,
            None,
            GemmDims {
                m,
                n: k,
                k: n,
                trans_a: false,
                trans_b: !trans_b,
            },
            alpha,
            0.0,
        )
        .unwrap();
    }
    if trans_b {
        // b: [n, k]; db = dout^T @ op(a): [n, k]
        be().gemm_h(
            &mut db,
            w,
            a,
            None,
            GemmDims {
                m: n,
                n: k,
                k: m,
                trans_a: true,
                trans_b: trans_a,
            },
            alpha,
            0.0,
        )
        .unwrap();
    } else {
        // db = op(a)^T @ dout: [k, n]
        be().gemm_h(
            &mut db,
            a,
            w,
            None,
            GemmDims {
                m: k,
                n,
                k: m,
                trans_a: !trans_a,
                trans_b: false,
            },
            alpha,
            0.0,
        )
        .unwrap();
    }
    (da, db)
}

proptest! {
    #[test]
    fn gemm_gradients(m in 1usize..7, n in 1usize..7, k in 1usize..7, trans_a: bool, trans_b: bool,
                      alpha in 0.2f32..2.0, seed: u64) {
        let d = GemmDims { m, n, k, trans_a, trans_b };
        let a = randv(seed, m * k, 1.0);
        let b = randv(seed ^ 1, k * n, 1.0);
        let w = randv(seed ^ 2, m * n, 1.0);
        let loss = |a: &[f32], b: &[f32]| {
            let mut out = vec![0.0; m * n];
            be().gemm_h(&mut out, a, b, None, d, alpha, 0.0).unwrap();
            weighted_sum(&w, &out)
        };
        let (da, db) = gemm_backward(&w, &a, &b, d, alpha);
        fd_check("gemm da", &a, &da, |a| loss(a, &b), 1e-2, 1e-3)?;
        fd_check("gemm db", &b, &db, |b| loss(&a, b), 1e-2, 1e-3)?;
    }

    #[test]
    fn softmax_gradient(rows in 1usize..4, cols in 1usize..9, seed: u64) {
        let x = randv(seed, rows * cols, 2.0);
        let w = randv(seed ^ 1, rows * cols, 1.0);
        let fwd = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            be().softmax_rows_h(&mut y, x, rows, cols).unwrap();
            y
        };
        let y = fwd(&x);
        let mut dx = vec![0.0; x.len()];
        be().softmax_rows_backward_h(&mut dx, &w, &y, rows, cols).unwrap();
        fd_check("softmax dinp", &x, &dx, |x| weighted_sum(&w, &fwd(x)), 1e-2, 2e-3)?;
    }

    #[test]
    fn layer_norm_gradients(rows in 1usize..4, cols in 3usize..10, affine: bool, seed: u64) {
        let x = randv(seed, rows * cols, 2.0);
        let wgt = randv(seed ^ 1, cols, 2.0);
        let bias = randv(seed ^ 2, cols, 1.0);
        let w = randv(seed ^ 3, rows * cols, 1.0);
        // cols >= 3 and eps 1e-3 keep the loss smooth enough for central
        // differences (with 2 columns the output is nearly a step function).
        let eps = 1e-3;
        let loss = |x: &[f32], wgt: &[f32], bias: &[f32]| {
            let (mut y, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
            let (wo, bo) = if affine { (Some(wgt), Some(bias)) } else { (None, None) };
            be().layer_norm_h(&mut y, &mut mean, &mut rstd, x, wo, bo, rows, cols, eps).unwrap();
            (weighted_sum(&w, &y), mean, rstd)
        };
        let (_, mean, rstd) = loss(&x, &wgt, &bias);
        let mut dx = vec![f32::NAN; x.len()];
        // Start from nonzero to check that dweight/dbias accumulate.
        let (mut dw, mut db) = (vec![0.5f32; cols], vec![-0.25f32; cols]);
        if affine {
            be().layer_norm_backward_h(&mut dx, Some(&mut dw), Some(&mut db), &w, &x, &mean, &rstd, Some(&wgt), rows, cols).unwrap();
        } else {
            be().layer_norm_backward_h(&mut dx, None, None, &w, &x, &mean, &rstd, None, rows, cols).unwrap();
        }
        fd_check("layer_norm dinp", &x, &dx, |x| loss(x, &wgt, &bias).0, 5e-3, 5e-3)?;
        if affine {
            let dw: Vec<f32> = dw.iter().map(|g| g - 0.5).collect();
            let db: Vec<f32> = db.iter().map(|g| g + 0.25).collect();
            fd_check("layer_norm dweight", &wgt, &dw, |wg| loss(&x, wg, &bias).0, 5e-3, 2e-3)?;
            fd_check("layer_norm dbias", &bias, &db, |bs| loss(&x, &wgt, bs).0, 5e-3, 2e-3)?;
        }
    }

    #[test]
    fn activation_gradients(n in 1usize..40, silu: bool, seed: u64) {
        let op = if silu { Unary::Silu } else { Unary::GeluTanh };
        let x = randv(seed, n, 4.0);
        let w = randv(seed ^ 1, n, 1.0);
        let mut dx = vec![0.0; n];
        be().unary_backward_h(op, &mut dx, &w, &x).unwrap();
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; n];
            be().unary_h(op, &mut y, x).unwrap();
            weighted_sum(&w, &y)
        };
        fd_check("unary dinp", &x, &dx, loss, 1e-2, 2e-3)?;
    }

    #[test]
    fn attention_gradients(b in 1usize..3, hkv in 1usize..3, group in 1usize..3, tq in 1usize..5, tk in 1usize..5,
                           dh in 1usize..5, masked: bool, seed: u64) {
        let h = hkv * group;
        let dims = AttnDims { batch: b, heads: h, kv_heads: hkv, q_len: tq, kv_len: tk, head_dim: dh };
        let q = randv(seed, b * tq * h * dh, 1.5);
        let k = randv(seed ^ 1, b * tk * hkv * dh, 1.5);
        let v = randv(seed ^ 2, b * tk * hkv * dh, 1.0);
        let w = randv(seed ^ 3, q.len(), 1.0);
        // Mask some keys; sometimes a whole sample, whose outputs are then zero.
        let mask: Vec<u8> = randv(seed ^ 4, b * tk, 1.0).iter().map(|&x| (x > -0.3) as u8).collect();
        let mask = masked.then_some(&mask[..]);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
            let (mut out, mut probs) = (vec![0.0; q.len()], vec![0.0; b * h * tq * tk]);
            be().attention_h(&mut out, Some(&mut probs), q, k, v, mask, dims).unwrap();
            (weighted_sum(&w, &out), probs)
        };
        let (_, probs) = fwd(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        be().attention_backward_h(&mut dq, &mut dk, &mut dv, &w, &probs, &q, &k, &v, dims).unwrap();
        fd_check("attention dq", &q, &dq, |q| fwd(q, &k, &v).0, 1e-2, 3e-3)?;
        fd_check("attention dk", &k, &dk, |k| fwd(&q, k, &v).0, 1e-2, 3e-3)?;
        fd_check("attention dv", &v, &dv, |v| fwd(&q, &k, v).0, 1e-2, 3e-3)?;
    }

    #[test]
    fn scatter_add_is_the_adjoint_of_gather(rows in 1usize..30, cols in 1usize..20, n in 0usize..60, seed: u64) {
        // <gather(x), y> == <x, scatter_add(y)> for any x, y and indices with repeats.
        let x = randv(seed, rows * cols, 1.0);
        let y = randv(seed ^ 1, n * cols, 1.0);
        let idx: Vec<u32> = randv(seed ^ 2, n, 1.0).iter().map(|&u| ((u + 1.0) * 0.5 * rows as f32) as u32 % rows as u32).collect();
        let mut gx = vec![0.0; n * cols];
        be().gather_rows_h(&mut gx, &x, &idx, cols).unwrap();
        let mut sy = vec![0.0; rows * cols];
        be().scatter_add_rows_h(&mut sy, &y, &idx, None, cols).unwrap();
        let (lhs, rhs) = (weighted_sum(&gx, &y), weighted_sum(&x, &sy));
        prop_assert!((lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()), "<Gx, y> = {lhs} but <x, G^T y> = {rhs}");
        // And the gather's gradient by finite differences is that scatter.
        fd_check("gather dinp", &x, &sy, |x| {
            let mut g = vec![0.0; n * cols];
            be().gather_rows_h(&mut g, x, &idx, cols).unwrap();
            weighted_sum(&y, &g)
        }, 1e-2, 1e-3)?;
    }

    #[test]
    fn bias_gradient_is_the_column_sum(rows in 1usize..6, cols in 1usize..8, seed: u64) {
        let out0 = randv(seed, rows * cols, 1.0);
        let bias = randv(seed ^ 1, cols, 1.0);
        let w = randv(seed ^ 2, rows * cols, 1.0);
        let mut db = vec![0.0; cols];
        be().sum_rows_h(&mut db, &w, rows, cols, false).unwrap();
        fd_check("add_broadcast dbias", &bias, &db, |bias| {
            let mut out = out0.clone();
            be().add_broadcast_h(&mut out, bias).unwrap();
            weighted_sum(&w, &out)
        }, 1e-2, 1e-3)?;
    }
}

proptest! {
    #[test]
    fn modulate_gradients(batch in 1usize..3, tokens in 1usize..4, d in 1usize..5, chunks in 1usize..4,
                          first in 0usize..3, second in 0usize..3, seed: u64) {
        // first == second (shift and scale in one chunk) is allowed and accumulates both.
        let which = ModChunks { chunks, first: first % chunks, second: second % chunks };
        let dims = RowDims { batch, tokens, d };
        let x = randv(seed, batch * tokens * d, 2.0);
        let m = randv(seed ^ 1, batch * chunks * d, 1.0);
        let w = randv(seed ^ 2, x.len(), 1.0);
        let loss = |x: &[f32], m: &[f32]| {
            let mut y = vec![0.0; x.len()];
            be().modulate_h(&mut y, x, m, which, dims).unwrap();
            weighted_sum(&w, &y)
        };
        let mut dx = vec![f32::NAN; x.len()];
        // Start from nonzero to check that dmodulation accumulates.
        let mut dm = vec![0.5f32; m.len()];
        be().modulate_backward_h(&mut dx, &mut dm, &w, &x, &m, which, dims).unwrap();
        let dm: Vec<f32> = dm.iter().map(|g| g - 0.5).collect();
        fd_check("modulate dinp", &x, &dx, |x| loss(x, &m), 1e-2, 1e-3)?;
        fd_check("modulate dmodulation", &m, &dm, |m| loss(&x, m), 1e-2, 1e-3)?;
    }

    #[test]
    fn gated_residual_gradients(batch in 1usize..3, tokens in 1usize..4, d in 1usize..5, chunks in 1usize..4,
                                first in 0usize..3, seed: u64) {
        let which = ModChunks { chunks, first: first % chunks, second: 0 };
        let dims = RowDims { batch, tokens, d };
        let x0 = randv(seed, batch * tokens * d, 2.0);
        let y = randv(seed ^ 1, x0.len(), 2.0);
        let m = randv(seed ^ 2, batch * chunks * d, 1.0);
        let w = randv(seed ^ 3, x0.len(), 1.0);
        let loss = |y: &[f32], m: &[f32]| {
            let mut x = x0.clone();
            be().gated_residual_h(&mut x, y, m, which, dims).unwrap();
            weighted_sum(&w, &x)
        };
        // dL/dx (the residual stream's gradient) is w itself.
        let mut dy = vec![f32::NAN; y.len()];
        let mut dm = vec![-0.25f32; m.len()];
        be().gated_residual_backward_h(&mut dy, &mut dm, &w, &y, &m, which, dims).unwrap();
        let dm: Vec<f32> = dm.iter().map(|g| g + 0.25).collect();
        fd_check("gated_residual dy", &y, &dy, |y| loss(y, &m), 1e-2, 1e-3)?;
        fd_check("gated_residual dmodulation", &m, &dm, |m| loss(&y, m), 1e-2, 1e-3)?;
    }

    #[test]
    fn patchify_and_unpatchify_are_each_others_backward(batch in 1usize..3, c in 1usize..4, gh in 1usize..3,
                                                        gw in 1usize..3, p in 1usize..3, last: bool, seed: u64) {
        let (h, w) = (gh * p, gw * p);
        let dims = PatchDims { batch, channels: c, height: h, width: w, patch: p, channels_fastest: last };
        let x = randv(seed, batch * c * h * w, 1.0);
        let wt = randv(seed ^ 1, x.len(), 1.0);
        // d/dx <w, patchify(x)> = unpatchify(w), and the other way round.
        let (mut dpatch, mut dunpatch) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        be().unpatchify_h(&mut dpatch, &wt, dims).unwrap();
        be().patchify_h(&mut dunpatch, &wt, dims).unwrap();
        fd_check("patchify dinp", &x, &dpatch, |x| {
            let mut y = vec![0.0; x.len()];
            be().patchify_h(&mut y, x, dims).unwrap();
            weighted_sum(&wt, &y)
        }, 1e-2, 1e-4)?;
        fd_check("unpatchify dinp", &x, &dunpatch, |x| {
            let mut y = vec![0.0; x.len()];
            be().unpatchify_h(&mut y, x, dims).unwrap();
            weighted_sum(&wt, &y)
        }, 1e-2, 1e-4)?;
    }

    #[test]
    fn gather_dot_is_the_gate_gradient_of_the_combine(rows in 1usize..12, cols in 1usize..10, n in 0usize..20, seed: u64) {
        // The MoE combine out[idx[i]] += gate[i] * ys[i]: dL/dgate[i] = <dout[idx[i]], ys[i]>.
        let ys = randv(seed, n * cols, 1.0);
        let gate = randv(seed ^ 1, n, 1.0);
        let w = randv(seed ^ 2, rows * cols, 1.0);
        let idx: Vec<u32> = randv(seed ^ 3, n, 1.0).iter().map(|&u| ((u + 1.0) * 0.5 * rows as f32) as u32 % rows as u32).collect();
        let mut dgate = vec![f32::NAN; n];
        be().gather_dot_h(&mut dgate, &w, &idx, &ys, cols).unwrap();
        fd_check("combine dgate", &gate, &dgate, |g| {
            let mut out = vec![0.0; rows * cols];
            be().scatter_add_rows_h(&mut out, &ys, &idx, Some(g), cols).unwrap();
            weighted_sum(&w, &out)
        }, 1e-2, 1e-3)?;
    }
}
