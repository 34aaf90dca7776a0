//! The CPU backend's contracts beyond plain numerics: tie rules, determinism
//! across thread counts, the AdamW step, errors instead of panics, registration.

mod common;

use common::*;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{
    AdamW, AttnDims, Backend, BackendExt, DType, EngineError, GemmDims, ModChunks, PatchDims, Registry, RowDims, Unary,
};
use proptest::prelude::*;
use serde_json::json;

#[test]
fn top_k_breaks_ties_by_lower_column() {
    let inp = [
        1.0,
        3.0,
        3.0,
        0.0,
        3.0,
        2.0,
        /* row 2 */ 5.0,
        5.0,
        5.0,
        5.0,
        -1.0,
        f32::NAN,
    ];
    let (mut idx, mut val) = ([0u32; 8], [0.0f32; 8]);
    cpu2().top_k_rows_h(&mut idx, &mut val, &inp, 2, 6, 4).unwrap();
    assert_eq!(idx, [1, 2, 4, 5, 0, 1, 2, 3]);
    assert_eq!(val, [3.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0]);
    // NaN ranks below every number.
    let (mut idx, mut val) = ([0u32; 2], [0.0f32; 2]);
    cpu1()
        .top_k_rows_h(&mut idx, &mut val, &[f32::NAN, -7.0, f32::NAN], 1, 3, 2)
        .unwrap();
    assert_eq!(idx, [1, 0]);
}

#[test]
fn scatter_add_is_deterministic_with_many_repeats() {
    // 20 000 sources onto 7 rows: every row gets thousands of adds, whose f32
    // sum depends on order; 1 and 2 threads and repeated runs give the same bits.
    let (n, rows, cols) = (20_000, 7, 33);
    let src = randv(5, n * cols, 1.0);
    let scale = randv(6, n, 1.0);
    let idx: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761).wrapping_mul(i + 1) % rows as u32)
        .collect();
    let run = |be: &dyn Backend| {
        let mut out = vec![0.0f32; rows * cols];
        be.scatter_add_rows_h(&mut out, &src, &idx, Some(&scale), cols).unwrap();
        out
    };
    let first = run(cpu2());
    assert_eq!(run(cpu2()), first);
    assert_eq!(run(cpu1()), first);
    let mut seq = vec![0.0f32; rows * cols];
    for (i, &r) in idx.iter().enumerate() {
        for c in 0..cols {
            seq[r as usize * cols + c] += scale[i] * src[i * cols + c];
        }
    }
    assert_eq!(first, seq, "not the sequential order of additions");
}

#[test]
fn adamw_matches_a_hand_computed_step() {
    let hp = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let (mut p, g) = (vec![1.0f32, -2.0], vec![0.5f32, 0.25]);
    let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
    cpu1().adamw_step_h(&mut p, &g, &mut m, &mut v, hp, 1).unwrap();
    // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2, so the update is
    // lr * g / (|g| + eps) = 0.1 * sign(g), after decay p *= 1 - lr * wd = 0.999.
    assert!(
        (m[0] - 0.05).abs() < 1e-6 && (v[0] / 0.00025 - 1.0).abs() < 1e-4,
        "m {} v {}",
        m[0],
        v[0]
    );
    assert!((p[0] - (0.999 - 0.1)).abs() < 1e-6, "{}", p[0]);
    assert!((p[1] - (-1.998 - 0.1)).abs() < 1e-6, "{}", p[1]);
    // Step 2 with the same gradient, by the PyTorch formula.
    let p1 = p.clone();
    cpu2().adamw_step_h(&mut p, &g, &mut m, &mut v, hp, 2).unwrap();
    for i in 0..2 {
        let gi = g[i] as f64;
        let mi = 0.9 * 0.1 * gi + 0.1 * gi;
        let vi = 0.999 * 0.001 * gi * gi + 0.001 * gi * gi;
        let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
        let want = p1[i] as f64 * (1.0 - 0.001) - 0.1 / bc1 * mi / (vi.sqrt() / bc2.sqrt() + 1e-8);
        assert!((p[i] as f64 - want).abs() < 1e-6, "param {i}: {} vs {want}", p[i]);
        assert!((m[i] as f64 / mi - 1.0).abs() < 1e-5 && (v[i] as f64 / vi - 1.0).abs() < 1e-4);
    }
    let err = cpu1().adamw_step_h(&mut p, &g, &mut m, &mut v, hp, 0).unwrap_err();
    assert!(err.to_string().contains("step"), "{err}");
}

fn assert_shape_err(r: ecdit_engine::Result<()>, needle: &str) {
    match r {
        Err(EngineError::Shape { op, .. }) => assert!(op.contains(needle), "error names '{op}', wanted '{needle}'"),
        other => panic!("expected a shape error naming {needle}, got {other:?}"),
    }
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let be = cpu2();
    let (x, mut y) = (vec![0.0f32; 12], vec![0.0f32; 12]);
    assert_shape_err(
        be.gemm_h(&mut y, &x, &x, None, GemmDims::nn(3, 4, 5), 1.0, 0.0),
        "gemm (a)",
    );
    assert_shape_err(
        be.gemm_h(&mut y[..11], &x, &x, None, GemmDims::nn(3, 4, 3), 1.0, 0.0),
        "gemm (out)",
    );
    assert_shape_err(
        be.gemm_h(&mut y, &x, &x, None, GemmDims::nn(usize::MAX, 4, 3), 1.0, 0.0),
        "gemm",
    );
    assert_shape_err(
        be.gemm_batched_h(&mut y, &x, &x, 2, GemmDims::nn(2, 3, 2), 1.0, 0.0),
        "gemm_batched (a)",
    );
    assert_shape_err(be.add_broadcast_h(&mut y, &x[..5]), "add_broadcast (out)");
    assert_shape_err(be.sum_rows_h(&mut y[..4], &x, 4, 4, false), "sum_rows (inp)");
    assert_shape_err(be.softmax_rows_h(&mut y, &x[..10], 3, 4), "softmax_rows (inp)");
    assert_shape_err(
        be.softmax_rows_backward_h(&mut y, &x, &x[..1], 3, 4),
        "softmax_rows_backward (out)",
    );
    let (mut mean, mut rstd) = (vec![0.0; 3], vec![0.0; 2]);
    assert_shape_err(
        be.layer_norm_h(&mut y, &mut mean, &mut rstd, &x, None, None, 3, 4, 1e-5),
        "layer_norm (rstd)",
    );
    let mut rstd = vec![0.0; 3];
    assert_shape_err(
        be.layer_norm_h(&mut y, &mut mean, &mut rstd, &x, Some(&x[..3]), None, 3, 4, 1e-5),
        "layer_norm (weight)",
    );
    let mut dw = vec![0.0; 5];
    assert_shape_err(
        be.layer_norm_backward_h(&mut y, Some(&mut dw), None, &x, &x, &mean, &rstd, None, 3, 4),
        "layer_norm_backward (dweight)",
    );
    assert_shape_err(be.unary_h(Unary::Silu, &mut y[..5], &x), "unary (out)");
    assert_shape_err(
        be.unary_backward_h(Unary::GeluTanh, &mut y, &x[..2], &x),
        "unary_backward (dout)",
    );
    let d = AttnDims {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        q_len: 3,
        kv_len: 2,
        head_dim: 2,
    };
    let (q, kv) = (vec![0.0f32; 12], vec![0.0f32; 4]);
    let mut probs = vec![0.0f32; 12];
    assert_shape_err(
        be.attention_h(&mut y, Some(&mut probs), &q, &kv, &kv, Some(&[1u8; 3]), d),
        "attention (key_mask)",
    );
    assert_shape_err(
        be.attention_h(&mut y, Some(&mut probs[..11]), &q, &kv, &kv, None, d),
        "attention (probs)",
    );
    let bad_heads = AttnDims { kv_heads: 3, ..d };
    assert_shape_err(
        be.attention_h(&mut y, Some(&mut probs), &q, &kv, &kv, None, bad_heads),
        "attention",
    );
    let (mut dk, mut dv) = (vec![0.0f32; 4], vec![0.0f32; 3]);
    assert_shape_err(
        be.attention_backward_h(&mut y, &mut dk, &mut dv, &q, &probs, &q, &kv, &kv, d),
        "attention_backward (dv)",
    );
    assert_shape_err(be.gather_rows_h(&mut y[..5], &x, &[0, 3], 2), "gather_rows (out)");
    assert_shape_err(be.gather_rows_h(&mut y[..4], &x[..7], &[0, 1], 2), "gather_rows (inp)");
    assert_shape_err(be.gather_rows_h(&mut y[..4], &x, &[0, 6], 2), "gather_rows (idx[1])");
    assert_shape_err(
        be.scatter_add_rows_h(&mut y, &x[..4], &[0, 6], None, 2),
        "scatter_add_rows (idx[1])",
    );
    assert_shape_err(
        be.scatter_add_rows_h(&mut y, &x[..4], &[0, 1], Some(&[1.0]), 2),
        "scatter_add_rows (scale)",
    );
    let (mut idx, mut val) = (vec![0u32; 6], vec![0.0f32; 6]);
    assert_shape_err(
        be.top_k_rows_h(&mut idx, &mut val[..5], &x, 2, 6, 3),
        "top_k_rows (val)",
    );
    assert_shape_err(
        be.top_k_rows_h(&mut idx[..4], &mut val[..4], &x, 2, 6, 3),
        "top_k_rows (idx)",
    );
    assert_shape_err(be.top_k_rows_h(&mut idx, &mut val, &x[..2], 1, 2, 6), "top_k_rows");
    let (mut p, mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 3]);
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    assert_shape_err(
        be.adamw_step_h(&mut p, &x[..4], &mut m, &mut v, hp, 1),
        "adamw_step (v)",
    );
}

#[test]
fn gemm_is_bit_identical_on_one_and_two_threads() {
    // Shapes large enough that the 2-thread run really splits the work, with
    // every transpose combination and beta != 0.
    for (i, &(m, n, k)) in [(512, 384, 384), (300, 257, 131), (2048, 96, 64), (64, 1536, 200)]
        .iter()
        .enumerate()
    {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = randv(i as u64, m * k, 1.0);
            let b = randv(i as u64 + 100, k * n, 1.0);
            let out0 = randv(i as u64 + 200, m * n, 1.0);
            let d = GemmDims {
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
            };
            let run = |be: &dyn Backend| {
                let mut out = out0.clone();
                be.gemm_h(&mut out, &a, &b, None, d, 0.7, 0.3).unwrap();
                out
            };
            assert!(
                run(cpu1()) == run(cpu2()),
                "gemm {m}x{n}x{k} ta={ta} tb={tb}: 1 and 2 threads differ"
            );
        }
    }
}

#[test]
fn attention_and_norm_are_bit_identical_on_one_and_two_threads() {
    let d = AttnDims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 64,
        kv_len: 48,
        head_dim: 32,
    };
    let q = randv(1, 2 * 64 * 4 * 32, 1.0);
    let k = randv(2, 2 * 48 * 2 * 32, 1.0);
    let v = randv(3, 2 * 48 * 2 * 32, 1.0);
    let dout = randv(4, q.len(), 1.0);
    let mask: Vec<u8> = (0..2 * 48).map(|i| (i % 5 != 0) as u8).collect();
    let run = |be: &dyn Backend| {
        let (mut out, mut probs) = (vec![0.0; q.len()], vec![0.0; 2 * 4 * 64 * 48]);
        be.attention_h(&mut out, Some(&mut probs), &q, &k, &v, Some(&mask), d)
            .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        be.attention_backward_h(&mut dq, &mut dk, &mut dv, &dout, &probs, &q, &k, &v, d)
            .unwrap();
        let (rows, cols) = (700, 96);
        let x = randv(5, rows * cols, 2.0);
        let (mut y, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
        let (w, bias) = (randv(6, cols, 1.0), randv(7, cols, 1.0));
        be.layer_norm_h(
            &mut y,
            &mut mean,
            &mut rstd,
            &x,
            Some(&w),
            Some(&bias),
            rows,
            cols,
            1e-6,
        )
        .unwrap();
        let (mut dx, mut dw, mut db) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
        be.layer_norm_backward_h(
            &mut dx,
            Some(&mut dw),
            Some(&mut db),
            &x,
            &x,
            &mean,
            &rstd,
            Some(&w),
            rows,
            cols,
        )
        .unwrap();
        let mut s = vec![0.0; cols];
        be.sum_rows_h(&mut s, &x, rows, cols, false).unwrap();
        [out, probs, dq, dk, dv, y, dx, dw, db, s]
    };
    let (one, two) = (run(cpu1()), run(cpu2()));
    let names = [
        "out",
        "probs",
        "dq",
        "dk",
        "dv",
        "ln out",
        "ln dinp",
        "ln dweight",
        "ln dbias",
        "sum_rows",
    ];
    for ((a, b), name) in one.iter().zip(&two).zip(names) {
        assert!(a == b, "{name} differs between 1 and 2 threads");
    }
}

#[test]
fn fully_masked_queries_get_zero_output_and_gradients() {
    let d = AttnDims {
        batch: 2,
        heads: 2,
        kv_heads: 2,
        q_len: 3,
        kv_len: 4,
        head_dim: 2,
    };
    let q = randv(1, 2 * 3 * 2 * 2, 1.0);
    let k = randv(2, 2 * 4 * 2 * 2, 1.0);
    let mask = [1, 0, 1, 1, /* sample 1: nothing */ 0, 0, 0, 0];
    let (mut out, mut probs) = (vec![f32::NAN; q.len()], vec![f32::NAN; 2 * 2 * 3 * 4]);
    cpu2()
        .attention_h(&mut out, Some(&mut probs), &q, &k, &k, Some(&mask), d)
        .unwrap();
    assert!(out[12..].iter().all(|&x| x == 0.0) && probs[24..].iter().all(|&x| x == 0.0));
    assert!(probs[..24]
        .chunks(4)
        .all(|p| p[1] == 0.0 && (p.iter().sum::<f32>() - 1.0).abs() < 1e-6));
    let (mut dq, mut dk, mut dv) = (
        vec![f32::NAN; q.len()],
        vec![f32::NAN; k.len()],
        vec![f32::NAN; k.len()],
    );
    cpu2()
        .attention_backward_h(
            &mut dq,
            &mut dk,
            &mut dv,
            &randv(3, q.len(), 1.0),
            &probs,
            &q,
            &k,
            &k,
            d,
        )
        .unwrap();
    assert!(dq[12..].iter().chain(&dk[16..]).chain(&dv[16..]).all(|&x| x == 0.0));
}

#[test]
fn registers_as_cpu_with_a_threads_param() {
    let mut reg = Registry::new();
    ecdit_backend_cpu::register(&mut reg).unwrap();
    let be = reg.backend(&json!({"kind": "cpu", "threads": 2})).unwrap();
    assert_eq!((be.name(), be.threads()), ("cpu", 2));
    let all = reg.backend(&json!("cpu")).unwrap();
    assert_eq!(
        all.threads(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let err = reg
        .backend(&json!({"kind": "cpu", "threads": -1}))
        .err()
        .expect("threads -1 refused")
        .to_string();
    assert!(err.contains("threads") && err.contains("-1"), "{err}");
    let err = reg
        .backend(&json!({"kind": "cpu", "thread": 1}))
        .err()
        .expect("unknown param refused")
        .to_string();
    assert!(err.contains("thread") && err.contains("unknown"), "{err}");
    assert!(
        ecdit_backend_cpu::register(&mut reg).is_err(),
        "registering twice must clash"
    );
    assert_eq!(CpuBackend::new(3).unwrap().threads(), 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn batched_gemm_is_bit_identical_on_one_and_two_threads(batch in 1usize..12, m in 1usize..200, n in 1usize..200,
                                                           k in 1usize..200, seed: u64) {
        let d = GemmDims::nt(m, n, k);
        let a = randv(seed, batch * m * k, 1.0);
        let b = randv(seed ^ 1, batch * n * k, 1.0);
        let run = |be: &dyn Backend| {
            let mut out = vec![0.0; batch * m * n];
            be.gemm_batched_h(&mut out, &a, &b, batch, d, 1.0, 0.0).unwrap();
            out
        };
        prop_assert!(run(cpu1()) == run(cpu2()));
    }
}

#[test]
fn new_ops_check_their_sizes_and_dims() {
    let be = cpu2();
    let x = vec![0.0f32; 24];
    let mut y = vec![0.0f32; 24];
    let dims = RowDims {
        batch: 2,
        tokens: 3,
        d: 4,
    };
    let which = ModChunks {
        chunks: 2,
        first: 0,
        second: 1,
    };
    let m = vec![0.0f32; 16];
    assert_shape_err(be.add_broadcast_h(&mut y, &[]), "add_broadcast (out)");
    assert_shape_err(be.axpby_h(&mut y, 1.0, &x[..23], 1.0), "axpby (x)");
    assert_shape_err(
        be.gemm_h(&mut y, &x, &[0.0; 36], Some(&x[..5]), GemmDims::nn(4, 6, 6), 1.0, 0.0),
        "gemm (bias)",
    );
    assert_shape_err(
        be.modulate_h(&mut y, &x, &m[..15], which, dims),
        "modulate (modulation)",
    );
    assert_shape_err(
        be.modulate_h(&mut y, &x, &m, ModChunks { second: 2, ..which }, dims),
        "modulate (second chunk)",
    );
    let mut dm = vec![0.0f32; 16];
    assert_shape_err(
        be.modulate_backward_h(&mut y, &mut dm[..12], &x, &x, &m, which, dims),
        "modulate_backward (dmodulation)",
    );
    assert_shape_err(
        be.gated_residual_h(&mut y, &x, &m, ModChunks { first: 2, ..which }, dims),
        "gated_residual (first chunk)",
    );
    assert_shape_err(
        be.gated_residual_backward_h(&mut y, &mut dm, &x[..20], &x, &m, which, dims),
        "gated_residual_backward (dx)",
    );
    let pd = PatchDims {
        batch: 1,
        channels: 2,
        height: 4,
        width: 3,
        patch: 2,
        channels_fastest: false,
    };
    assert_shape_err(be.patchify_h(&mut y, &x, pd), "patchify (patch)");
    let pd = PatchDims { width: 4, ..pd };
    assert_shape_err(be.unpatchify_h(&mut y[..20], &x[..20], pd), "unpatchify (out)");
    assert_shape_err(
        be.timestep_features_h(&mut y, &x[..5], 4, 1e4),
        "timestep_features (out)",
    );
    let err = be.timestep_features_h(&mut y, &x[..6], 4, 0.0).unwrap_err();
    assert!(err.to_string().contains("max_period"), "{err}");
    let mut dots = vec![0.0f32; 2];
    assert_shape_err(
        be.gather_dot_h(&mut dots, &x, &[0, 9], &x[..8], 4),
        "gather_dot (idx[1])",
    );
    assert_shape_err(be.gather_dot_h(&mut dots, &x, &[0, 1], &x[..7], 4), "gather_dot (b)");
    assert_shape_err(
        be.gather_dot_h(&mut dots[..1], &x, &[0, 1], &x[..8], 4),
        "gather_dot (idx)",
    );
    let d = AttnDims {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        q_len: 3,
        kv_len: 2,
        head_dim: 4,
    };
    assert_shape_err(
        be.attention_h(&mut y, None, &x, &x[..7], &x[..8], None, d),
        "attention (k)",
    );
    assert_shape_err(
        be.attention_h(&mut y, None, &x, &x[..8], &x[..8], Some(&[1]), d),
        "attention (key_mask)",
    );
}

#[test]
fn buffers_are_zeroed_host_memory_of_the_cpu_backend() {
    let be = cpu1();
    let buf = be.alloc(40).unwrap();
    assert!(buf.is_host() && buf.backend() == "cpu" && buf.len_bytes() == 40);
    let t = be.zeros(&[2, 5], DType::F32).unwrap();
    assert_eq!(t.view().host::<f32>().unwrap(), &[0.0; 10]);
    assert!(be.alloc(usize::MAX).is_err(), "an impossible allocation is an error");
    let mut t = be
        .upload_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32)
        .unwrap();
    be.write_f32(t.view_mut().rows(1, 1).unwrap(), &[7.0, 8.0, 9.0])
        .unwrap();
    assert_eq!(be.read_f32(t.view()).unwrap(), [1.0, 2.0, 3.0, 7.0, 8.0, 9.0]);
}

#[test]
fn attention_without_probs_agrees_with_the_cached_path_and_zeroes_masked_queries() {
    // Several 128-row query blocks, a masked-out sample, grouped heads.
    let d = AttnDims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 300,
        kv_len: 70,
        head_dim: 16,
    };
    let q = randv(1, 2 * 300 * 4 * 16, 1.0);
    let k = randv(2, 2 * 70 * 2 * 16, 1.0);
    let v = randv(3, 2 * 70 * 2 * 16, 1.0);
    let mask: Vec<u8> = (0..2 * 70).map(|i| (i < 70 && i % 3 != 0) as u8).collect();
    let (mut with, mut probs) = (vec![0.0; q.len()], vec![0.0; 2 * 4 * 300 * 70]);
    cpu2()
        .attention_h(&mut with, Some(&mut probs), &q, &k, &v, Some(&mask), d)
        .unwrap();
    for be in [cpu1(), cpu2()] {
        let mut without = vec![f32::NAN; q.len()];
        be.attention_h(&mut without, None, &q, &k, &v, Some(&mask), d).unwrap();
        check_close("attention without probs", &without, &with, 1e-6, 1e-5).unwrap();
        assert!(without[q.len() / 2..].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn new_ops_are_bit_identical_on_one_and_two_threads() {
    // Sizes above the single-task threshold, so two threads really split.
    let dims = RowDims {
        batch: 3,
        tokens: 256,
        d: 96,
    };
    let which = ModChunks {
        chunks: 6,
        first: 3,
        second: 4,
    };
    let n = 3 * 256 * 96;
    let x = randv(1, n, 1.0);
    let y = randv(2, n, 1.0);
    let m = randv(3, 3 * 6 * 96, 1.0);
    let pd = PatchDims {
        batch: 3,
        channels: 12,
        height: 64,
        width: 32,
        patch: 2,
        channels_fastest: true,
    };
    let d = AttnDims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 200,
        kv_len: 150,
        head_dim: 32,
    };
    let (q, kv) = (randv(4, 2 * 200 * 4 * 32, 1.0), randv(5, 2 * 150 * 2 * 32, 1.0));
    let idx: Vec<u32> = (0..700u32).map(|i| i.wrapping_mul(2_654_435_761) % 768).collect();
    let run = |be: &dyn Backend| {
        let mut outs = Vec::new();
        let mut o = vec![0.0; n];
        be.modulate_h(&mut o, &x, &m, which, dims).unwrap();
        outs.push(o.clone());
        let mut dm = m.clone();
        be.modulate_backward_h(&mut o, &mut dm, &y, &x, &m, which, dims)
            .unwrap();
        outs.extend([o.clone(), dm.clone()]);
        let mut r = x.clone();
        be.gated_residual_h(&mut r, &y, &m, which, dims).unwrap();
        be.gated_residual_backward_h(&mut o, &mut dm, &y, &x, &m, which, dims)
            .unwrap();
        outs.extend([r.clone(), o.clone(), dm]);
        be.patchify_h(&mut o, &x, pd).unwrap();
        be.unpatchify_h(&mut r, &x, pd).unwrap();
        outs.extend([o.clone(), r.clone()]);
        be.axpby_h(&mut r, 0.3, &x, -0.7).unwrap();
        be.add_broadcast_h(&mut r, &y[..256 * 96]).unwrap();
        outs.push(r);
        let mut feats = vec![0.0; 512 * 256];
        be.timestep_features_h(&mut feats, &x[..512], 256, 1e4).unwrap();
        outs.push(feats);
        let mut dots = vec![0.0; 700];
        be.gather_dot_h(&mut dots, &x, &idx, &y[..700 * 96], 96).unwrap();
        outs.push(dots);
        let mut probs = vec![0.0; 768 * 96];
        be.router_softmax_h(&mut probs, &x[..768 * 96], 768, 96).unwrap();
        outs.push(probs);
        let mut att = vec![0.0; q.len()];
        be.attention_h(&mut att, None, &q, &kv, &kv, None, d).unwrap();
        outs.push(att);
        let mut lin = y[..768 * 96].to_vec();
        be.gemm_h(
            &mut lin,
            &x[..768 * 64],
            &y[..96 * 64],
            Some(&m[..96]),
            GemmDims::nt(768, 96, 64),
            1.0,
            0.0,
        )
        .unwrap();
        outs.push(lin);
        outs
    };
    let (one, two) = (run(cpu1()), run(cpu2()));
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!(a == b, "output {i} differs between 1 and 2 threads");
    }
}
