//! bf16 storage: transfers and conversions round to nearest even, and every
//! float op accepts bf16 tensors, computing in f32: on inputs that bf16
//! represents exactly, a bf16 output is the f32 op's output rounded once.

mod common;

use common::*;
use ecdit_backend_cpu::onednn::OneDnnMode;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::dtype::bf16;
use ecdit_engine::{
    AdamW, AttnDims, Backend, BackendExt, DType, GemmDims, ModChunks, PatchDims, Result, RowDims, Tensor, Unary,
};
use std::sync::OnceLock;

fn be() -> &'static dyn Backend {
    cpu2()
}

/// `n` values in `[-scale, scale)` that bf16 represents exactly.
fn bf16_exact(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    randv(seed, n, scale)
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect()
}

fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// A float tensor of `dtype` holding `data` (exact in bf16).
fn t(dtype: DType, data: &[f32]) -> Tensor {
    be().upload_f32(&[data.len()], data, dtype).unwrap()
}

fn read(x: &Tensor) -> Vec<f32> {
    be().read_f32(x.view()).unwrap()
}

/// Runs `op` with every float tensor stored f32, then bf16, and checks that
/// each bf16 output is its f32 output rounded to bf16, bit for bit.
fn check(name: &str, op: impl Fn(DType) -> Result<Vec<Vec<f32>>>) {
    let wide = op(DType::F32).unwrap_or_else(|e| panic!("{name} f32: {e}"));
    let narrow = op(DType::BF16).unwrap_or_else(|e| panic!("{name} bf16: {e}"));
    assert_eq!(wide.len(), narrow.len());
    for (i, (w, n)) in wide.iter().zip(&narrow).enumerate() {
        let want = round(w);
        assert!(
            n.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
            "{name} output {i}: bf16 result is not the rounded f32 result"
        );
    }
}

#[test]
fn supports_bf16_and_transfers_round_to_nearest_even() {
    assert!(be().supports(DType::BF16) && be().supports(DType::F32));
    // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even, 1. 1 + 3 * 2^-8 rounds up.
    let vals = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 0.0, 1e30, f32::INFINITY];
    let x = t(DType::BF16, &vals);
    assert_eq!(x.buffer().len_bytes(), 12);
    assert_eq!(read(&x), round(&vals));
    assert_eq!(read(&x)[..2], [1.0, 1.0 + 4.0 / 256.0]);
    // Raw bytes round trip unchanged.
    let mut raw = vec![0u8; 12];
    be().download(&mut raw, x.view()).unwrap();
    let mut y = be().zeros(&[6], DType::BF16).unwrap();
    be().upload(y.view_mut(), &raw).unwrap();
    assert_eq!(read(&y), read(&x));
    assert!(be().upload(y.view_mut(), &raw[..10]).is_err());
    assert!(be().download(&mut raw[..11], x.view()).is_err());
}

#[test]
fn copy_converts_between_f32_and_bf16_and_fill_rounds() {
    let vals = randv(3, 1000, 100.0);
    let wide = t(DType::F32, &vals);
    let mut narrow = be().zeros(&[1000], DType::BF16).unwrap();
    be().copy(narrow.view_mut(), wide.view()).unwrap();
    assert_eq!(read(&narrow), round(&vals));
    let mut back = be().zeros(&[1000], DType::F32).unwrap();
    be().copy(back.view_mut(), narrow.view()).unwrap();
    assert_eq!(read(&back), round(&vals));
    // Same dtype: exact copies, also of index tensors; a sub-view copies in place.
    let mut same = be().zeros(&[1000], DType::F32).unwrap();
    be().copy(same.view_mut(), wide.view()).unwrap();
    assert_eq!(read(&same), vals);
    let idx = be().upload_u32(&[3], &[7, 8, 9]).unwrap();
    let mut idx2 = be().zeros(&[3], DType::U32).unwrap();
    be().copy(idx2.view_mut(), idx.view()).unwrap();
    assert_eq!(be().read_u32(idx2.view()).unwrap(), [7, 8, 9]);
    be().copy(same.view_mut().flat(10, 3).unwrap(), back.view().flat(0, 3).unwrap())
        .unwrap();
    assert_eq!(read(&same)[10..13], round(&vals[..3]));
    // Mismatched counts or index <-> float are errors.
    assert!(be().copy(same.view_mut(), wide.view().flat(0, 999).unwrap()).is_err());
    assert!(be().copy(idx2.view_mut(), wide.view().flat(0, 3).unwrap()).is_err());
    // fill
    be().fill(narrow.view_mut(), 1.0 + 1.0 / 256.0).unwrap();
    assert!(read(&narrow).iter().all(|&v| v == 1.0));
    be().fill(back.view_mut().flat(5, 2).unwrap(), -3.0).unwrap();
    assert_eq!(
        read(&back)[4..8],
        [round(&vals[4..5])[0], -3.0, -3.0, round(&vals[7..8])[0]]
    );
    assert!(be().fill(idx2.view_mut(), 1.0).is_err());
}

#[test]
fn matrix_products_accept_bf16() {
    let (m, n, k) = (37, 29, 41);
    let a = bf16_exact(1, m * k, 1.0);
    let b = bf16_exact(2, k * n, 1.0);
    let bias = bf16_exact(3, n, 1.0);
    let out0 = bf16_exact(4, m * n, 1.0);
    for beta in [0.0, 0.5] {
        check("gemm", |dt| {
            let mut o = t(dt, &out0);
            let bias = t(dt, &bias);
            be().gemm(
                o.view_mut(),
                t(dt, &a).view(),
                t(dt, &b).view(),
                Some(bias.view()),
                GemmDims::nn(m, n, k),
                0.5,
                beta,
            )?;
            Ok(vec![read(&o)])
        });
    }
    check("gemm_batched", |dt| {
        let mut o = t(dt, &out0[..2 * 10 * 8]);
        let d = GemmDims::nt(10, 8, 20);
        be().gemm_batched(
            o.view_mut(),
            t(dt, &a[..2 * 10 * 20]).view(),
            t(dt, &b[..2 * 8 * 20]).view(),
            2,
            d,
            1.0,
            1.0,
        )?;
        Ok(vec![read(&o)])
    });
    check("gemm_grouped", |dt| {
        let mut o = t(dt, &out0[..30 * 8]);
        let (ta, tb) = (t(dt, &a[..30 * 16]), t(dt, &b[..3 * 8 * 16]));
        be().gemm_grouped(o.view_mut(), ta.view(), tb.view(), &[10, 0, 20], 8, 16, true, 1.0, 0.0)?;
        Ok(vec![read(&o)])
    });
}

#[test]
fn row_and_element_ops_accept_bf16() {
    let (rows, cols) = (13, 24);
    let x = bf16_exact(5, rows * cols, 3.0);
    let y0 = bf16_exact(6, rows * cols, 1.0);
    let w = bf16_exact(7, cols, 1.0);
    check("add_broadcast + axpby + sum_rows", |dt| {
        let mut o = t(dt, &x);
        be().add_broadcast(o.view_mut(), t(dt, &w).view())?;
        let mut y = t(dt, &y0);
        be().axpby(y.view_mut(), 0.75, t(dt, &x).view(), -1.5)?;
        let mut s = t(dt, &w);
        be().sum_rows(s.view_mut(), t(dt, &x).view(), rows, cols, true)?;
        Ok(vec![read(&o), read(&y), read(&s)])
    });
    check("softmax", |dt| {
        let mut p = be().zeros(&[rows * cols], dt)?;
        be().softmax_rows(p.view_mut(), t(dt, &x).view(), rows, cols)?;
        // Backward from the rounded probabilities (both runs read the same values).
        let pr = t(dt, &round(&read(&p)));
        let mut d = be().zeros(&[rows * cols], dt)?;
        be().softmax_rows_backward(d.view_mut(), t(dt, &y0).view(), pr.view(), rows, cols)?;
        Ok(vec![read(&p), read(&d)])
    });
    check("layer_norm", |dt| {
        let (mut o, mut mu, mut rs) = (
            be().zeros(&[rows * cols], dt)?,
            be().zeros(&[rows], dt)?,
            be().zeros(&[rows], dt)?,
        );
        let (wt, bt) = (t(dt, &w), t(dt, &w));
        be().layer_norm(
            o.view_mut(),
            mu.view_mut(),
            rs.view_mut(),
            t(dt, &x).view(),
            Some(wt.view()),
            Some(bt.view()),
            rows,
            cols,
            1e-5,
        )?;
        Ok(vec![read(&o), read(&mu), read(&rs)])
    });
    let mean = bf16_exact(8, rows, 0.5);
    let rstd = round(
        &bf16_exact(9, rows, 0.5)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect::<Vec<_>>(),
    );
    check("layer_norm_backward", |dt| {
        let mut di = be().zeros(&[rows * cols], dt)?;
        let (mut dw, mut db) = (t(dt, &w), t(dt, &w));
        let wt = t(dt, &w);
        be().layer_norm_backward(
            di.view_mut(),
            Some(dw.view_mut()),
            Some(db.view_mut()),
            t(dt, &y0).view(),
            t(dt, &x).view(),
            t(dt, &mean).view(),
            t(dt, &rstd).view(),
            Some(wt.view()),
            rows,
            cols,
        )?;
        Ok(vec![read(&di), read(&dw), read(&db)])
    });
    check("unary", |dt| {
        let (mut o, mut d) = (be().zeros(&[x.len()], dt)?, be().zeros(&[x.len()], dt)?);
        be().unary(Unary::GeluTanh, o.view_mut(), t(dt, &x).view())?;
        be().unary_backward(Unary::Silu, d.view_mut(), t(dt, &y0).view(), t(dt, &x).view())?;
        Ok(vec![read(&o), read(&d)])
    });
}

#[test]
fn element_ops_over_many_chunks_and_mixed_dtypes_round_once() {
    // Several of the backend's conversion chunks and a ragged end, each
    // operand stored f32 or bf16 on its own: every output is the all-f32
    // output rounded where it is stored bf16.
    let n = 3 * 8192 + 77;
    let x = bf16_exact(21, n, 4.0);
    let d = bf16_exact(22, n, 1.0);
    let y0 = bf16_exact(23, n, 1.0);
    let run = |out: DType, a: DType, b: DType| -> Vec<Vec<f32>> {
        let mut gelu = be().zeros(&[n], out).unwrap();
        be().unary(Unary::GeluTanh, gelu.view_mut(), t(a, &x).view()).unwrap();
        let mut back = be().zeros(&[n], out).unwrap();
        be().unary_backward(Unary::GeluTanh, back.view_mut(), t(a, &d).view(), t(b, &x).view())
            .unwrap();
        let mut y = t(out, &y0);
        be().axpby(y.view_mut(), 0.75, t(a, &x).view(), -1.5).unwrap();
        vec![read(&gelu), read(&back), read(&y)]
    };
    let wide = run(DType::F32, DType::F32, DType::F32);
    for out in [DType::F32, DType::BF16] {
        for a in [DType::F32, DType::BF16] {
            for b in [DType::F32, DType::BF16] {
                for (i, (got, w)) in run(out, a, b).iter().zip(&wide).enumerate() {
                    let want = if out == DType::BF16 { round(w) } else { w.clone() };
                    let same = got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "output {i} with out {out}, inputs {a} and {b}");
                }
            }
        }
    }
}

#[test]
fn adaln_embedding_and_gather_ops_accept_bf16() {
    let dims = RowDims {
        batch: 2,
        tokens: 5,
        d: 8,
    };
    let which = ModChunks {
        chunks: 6,
        first: 3,
        second: 4,
    };
    let x = bf16_exact(10, 80, 2.0);
    let y = bf16_exact(11, 80, 2.0);
    let m = bf16_exact(12, 2 * 6 * 8, 1.0);
    check("modulate", |dt| {
        let mut o = be().zeros(&[80], dt)?;
        be().modulate(o.view_mut(), t(dt, &x).view(), t(dt, &m).view(), which, dims)?;
        let (mut di, mut dm) = (be().zeros(&[80], dt)?, t(dt, &m));
        be().modulate_backward(
            di.view_mut(),
            dm.view_mut(),
            t(dt, &y).view(),
            t(dt, &x).view(),
            t(dt, &m).view(),
            which,
            dims,
        )?;
        Ok(vec![read(&o), read(&di), read(&dm)])
    });
    check("gated_residual", |dt| {
        let mut xo = t(dt, &x);
        be().gated_residual(xo.view_mut(), t(dt, &y).view(), t(dt, &m).view(), which, dims)?;
        let (mut dy, mut dm) = (be().zeros(&[80], dt)?, t(dt, &m));
        be().gated_residual_backward(
            dy.view_mut(),
            dm.view_mut(),
            t(dt, &x).view(),
            t(dt, &y).view(),
            t(dt, &m).view(),
            which,
            dims,
        )?;
        Ok(vec![read(&xo), read(&dy), read(&dm)])
    });
    let pd = PatchDims {
        batch: 2,
        channels: 3,
        height: 4,
        width: 6,
        patch: 2,
        channels_fastest: true,
    };
    let img = bf16_exact(13, 2 * 3 * 4 * 6, 1.0);
    check("patchify + unpatchify", |dt| {
        let (mut p, mut u) = (be().zeros(&[img.len()], dt)?, be().zeros(&[img.len()], dt)?);
        be().patchify(p.view_mut(), t(dt, &img).view(), pd)?;
        be().unpatchify(u.view_mut(), t(dt, &img).view(), pd)?;
        Ok(vec![read(&p), read(&u)])
    });
    check("timestep_features", |dt| {
        let mut o = be().zeros(&[3 * 16], dt)?;
        be().timestep_features(o.view_mut(), t(dt, &[0.0, 10.0, 992.0]).view(), 16, 10000.0)?;
        Ok(vec![read(&o)])
    });
    let idx = be().upload_u32(&[6], &[3, 0, 3, 9, 1, 2]).unwrap();
    check("gather, scatter_add, gather_dot, top_k_rows", |dt| {
        let src = t(dt, &x); // [10, 8]
        let mut g = be().zeros(&[6 * 8], dt)?;
        be().gather_rows(g.view_mut(), src.view(), idx.view(), 8)?;
        let mut s = t(dt, &y);
        let scale = t(dt, &m[..6]);
        be().scatter_add_rows(s.view_mut(), t(dt, &m[..48]).view(), idx.view(), Some(scale.view()), 8)?;
        let mut dot = be().zeros(&[6], dt)?;
        be().gather_dot(dot.view_mut(), src.view(), idx.view(), t(dt, &m[..48]).view(), 8)?;
        let (mut ti, mut tv) = (be().zeros(&[10 * 3], DType::U32)?, be().zeros(&[10 * 3], dt)?);
        be().top_k_rows(ti.view_mut(), tv.view_mut(), src.view(), 10, 8, 3)?;
        let ti: Vec<f32> = be().read_u32(ti.view())?.into_iter().map(|i| i as f32).collect();
        Ok(vec![read(&g), read(&s), read(&dot), ti, read(&tv)])
    });
}

/// On the f32 kernels (a backend without oneDNN): bf16 attention with oneDNN
/// rounds its probabilities before `P V`, like PyTorch's autocast, and is
/// tested against an f64 reference in `attention_bf16.rs`.
#[test]
fn attention_accepts_bf16_with_and_without_probs() {
    static OFF: OnceLock<CpuBackend> = OnceLock::new();
    let be = || OFF.get_or_init(|| CpuBackend::with_onednn(2, OneDnnMode::Off).expect("backend"));
    let t = |dtype: DType, data: &[f32]| be().upload_f32(&[data.len()], data, dtype).unwrap();
    let read = |x: &Tensor| be().read_f32(x.view()).unwrap();
    let d = AttnDims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 9,
        kv_len: 7,
        head_dim: 8,
    };
    let q = bf16_exact(20, 2 * 9 * 4 * 8, 1.0);
    let k = bf16_exact(21, 2 * 7 * 2 * 8, 1.0);
    let v = bf16_exact(22, 2 * 7 * 2 * 8, 1.0);
    let mask = be()
        .upload_u8(&[2, 7], &[1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0])
        .unwrap();
    check("attention", |dt| {
        let (mut o, mut p) = (be().zeros(&[q.len()], dt)?, be().zeros(&[2 * 4 * 9 * 7], dt)?);
        let (qt, kt, vt) = (t(dt, &q), t(dt, &k), t(dt, &v));
        be().attention(
            o.view_mut(),
            Some(p.view_mut()),
            qt.view(),
            kt.view(),
            vt.view(),
            Some(mask.view()),
            d,
        )?;
        let mut o2 = be().zeros(&[q.len()], dt)?;
        be().attention(
            o2.view_mut(),
            None,
            qt.view(),
            kt.view(),
            vt.view(),
            Some(mask.view()),
            d,
        )?;
        let pr = t(dt, &round(&read(&p)));
        let (mut dq, mut dk, mut dv) = (
            be().zeros(&[q.len()], dt)?,
            be().zeros(&[k.len()], dt)?,
            be().zeros(&[v.len()], dt)?,
        );
        be().attention_backward(
            dq.view_mut(),
            dk.view_mut(),
            dv.view_mut(),
            qt.view(),
            pr.view(),
            qt.view(),
            kt.view(),
            vt.view(),
            d,
        )?;
        Ok(vec![read(&o), read(&p), read(&o2), read(&dq), read(&dk), read(&dv)])
    });
}

#[test]
fn index_dtypes_and_the_optimiser_state_are_checked() {
    let x = t(DType::F32, &[1.0; 8]);
    let bad_idx = t(DType::F32, &[0.0; 2]);
    let mut out = be().zeros(&[4], DType::F32).unwrap();
    let err = be()
        .gather_rows(out.view_mut(), x.view(), bad_idx.view(), 2)
        .unwrap_err();
    assert!(err.to_string().contains("gather_rows (idx dtype)"), "{err}");
    let idx = be().upload_u32(&[2], &[0, 1]).unwrap();
    let err = be().gather_rows(out.view_mut(), idx.view(), idx.view(), 1).unwrap_err();
    assert!(err.to_string().contains("gather_rows (inp dtype)"), "{err}");
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let (mut p, g) = (t(DType::BF16, &[1.0; 4]), t(DType::F32, &[1.0; 4]));
    let (mut m, mut v) = (t(DType::F32, &[0.0; 4]), t(DType::F32, &[0.0; 4]));
    let err = be()
        .adamw_step(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), hp, 1)
        .unwrap_err();
    assert!(err.to_string().contains("adamw_step (param dtype)"), "{err}");
}
