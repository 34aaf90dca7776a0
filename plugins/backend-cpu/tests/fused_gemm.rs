//! The fused products (`gemm_act`: an MLP's first layer at inference;
//! `gemm_grouped_bias`: a MoE layer's experts) on every path (oneDNN with
//! its post-ops, the `gemm` crate), f32 and bf16, 1 and 2 threads:
//! - against an f64 reference written here (GELU through `tanh`, SiLU through
//!   `exp`, not the kernels' forms), including empty and few-row groups;
//! - in f32, bit for bit the separate ops they replace (the trait's default);
//! - a row's bits whatever the row count (a sample's output must not depend
//!   on its batch), and the same bits run to run.

mod common;

use common::randv;
use ecdit_backend_cpu::onednn::{self, OneDnnMode};
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::backend::add_group_bias;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Tensor, Unary};

/// Every path this machine has: oneDNN for every product it takes (when the
/// library is here), the shape rule, and the `gemm` crate alone.
fn backends(threads: usize) -> Vec<(String, CpuBackend)> {
    let mut modes = vec![OneDnnMode::Auto, OneDnnMode::Off];
    if onednn::library().is_ok() {
        modes.push(OneDnnMode::Always);
    }
    modes
        .into_iter()
        .map(|m| {
            let b = CpuBackend::with_onednn(threads, m).expect("backend");
            (format!("{m:?}, {threads} threads"), b)
        })
        .collect()
}

fn upload(b: &CpuBackend, dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    b.upload_f32(dims, &randv(seed, n, 1.0), dtype).expect("upload")
}

fn read(b: &CpuBackend, t: &Tensor) -> Vec<f32> {
    b.read_f32(t.view()).expect("read")
}

fn act64(act: Option<Unary>, x: f64) -> f64 {
    match act {
        None => x,
        Some(Unary::GeluTanh) => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Some(Unary::Silu) => x / (1.0 + (-x).exp()),
    }
}

/// `act(a @ op(w_g) + bias_g)` in f64 for rows of groups `group_rows`.
/// a: [R, k]; w: [G, k, n] or [G, n, k]; bias: [G, n].
#[allow(clippy::too_many_arguments)]
fn reference(
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    group_rows: &[usize],
    n: usize,
    k: usize,
    trans_b: bool,
    act: Option<Unary>,
) -> Vec<f32> {
    let mut out = Vec::new();
    let mut r = 0;
    for (g, &m) in group_rows.iter().enumerate() {
        let wg = &w[g * n * k..][..n * k];
        for row in r..r + m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| {
                        let wij = if trans_b { wg[j * k + i] } else { wg[i * n + j] };
                        a[row * k + i] as f64 * wij as f64
                    })
                    .sum();
                out.push(act64(act, dot + bias[g * n + j] as f64) as f32);
            }
        }
        r += m;
    }
    out
}

/// `|got - want| <= tol * (1 + |want|)` everywhere.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: {g} against {w}"
        );
    }
}

/// Tolerance against the f64 reference: f32 sums, or bf16 inputs read as
/// stored and an output rounded to bf16 once or (on the separate steps) up
/// to three times.
fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1.5e-2
    } else {
        2e-5
    }
}

const ACTS: [Option<Unary>; 3] = [None, Some(Unary::GeluTanh), Some(Unary::Silu)];

/// One grouped case: `(group_rows, n, k, trans_b)`, with an empty group, a
/// group of a few rows (its own kernel) and k long enough to be chunked.
const GROUPED: [(&[usize], usize, usize, bool); 4] = [
    (&[40, 0, 72, 5], 96, 64, false),
    (&[130, 64], 64, 384, false),
    (&[33, 20, 0], 48, 40, true),
    (&[70], 64, 900, false),
];

#[test]
fn grouped_bias_matches_an_f64_reference() {
    for threads in [1, 2] {
        for (path, be) in backends(threads) {
            for dtype in [DType::F32, DType::BF16] {
                for (c, &(groups, n, k, trans_b)) in GROUPED.iter().enumerate() {
                    let (rows, g) = (groups.iter().sum::<usize>(), groups.len());
                    let seed = 10 * c as u64;
                    let a = upload(&be, &[rows, k], seed, dtype);
                    let w = upload(&be, &[g, k, n], seed + 1, dtype);
                    let bias = upload(&be, &[g, n], seed + 2, dtype);
                    for act in ACTS {
                        let mut out = upload(&be, &[rows, n], seed + 3, dtype);
                        be.gemm_grouped_bias(
                            out.view_mut(),
                            a.view(),
                            w.view(),
                            bias.view(),
                            groups,
                            n,
                            k,
                            trans_b,
                            act,
                        )
                        .unwrap_or_else(|e| panic!("{path}: {e}"));
                        let want = reference(
                            &read(&be, &a),
                            &read(&be, &w),
                            &read(&be, &bias),
                            groups,
                            n,
                            k,
                            trans_b,
                            act,
                        );
                        let what = format!("{path}, {dtype:?}, case {c}, {act:?}");
                        assert_close(&what, &read(&be, &out), &want, tolerance(dtype));
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_act_matches_an_f64_reference() {
    for threads in [1, 2] {
        for (path, be) in backends(threads) {
            for dtype in [DType::F32, DType::BF16] {
                for (m, n, k, with_bias) in [(96, 128, 384, true), (5, 64, 64, true), (70, 40, 900, false)] {
                    let a = upload(&be, &[m, k], 1, dtype);
                    let w = upload(&be, &[k, n], 2, dtype);
                    let bias = upload(&be, &[n], 3, dtype);
                    for act in [Unary::GeluTanh, Unary::Silu] {
                        let mut out = upload(&be, &[m, n], 4, dtype);
                        let b = with_bias.then(|| bias.view());
                        be.gemm_act(out.view_mut(), a.view(), w.view(), b, GemmDims::nn(m, n, k), act)
                            .unwrap_or_else(|e| panic!("{path}: {e}"));
                        let zero = vec![0.0; n];
                        let bias_host = if with_bias { read(&be, &bias) } else { zero };
                        let want = reference(&read(&be, &a), &read(&be, &w), &bias_host, &[m], n, k, false, Some(act));
                        let what = format!("{path}, {dtype:?}, {m}x{n}x{k}, {act:?}");
                        assert_close(&what, &read(&be, &out), &want, tolerance(dtype));
                    }
                }
            }
        }
    }
}

#[test]
fn in_f32_the_fused_ops_keep_the_bits_of_the_separate_ones() {
    for (path, be) in backends(2) {
        let dtype = DType::F32;
        for &(groups, n, k, trans_b) in &GROUPED {
            let (rows, g) = (groups.iter().sum::<usize>(), groups.len());
            let a = upload(&be, &[rows, k], 5, dtype);
            let w = upload(&be, &[g, k, n], 6, dtype);
            let bias = upload(&be, &[g, n], 7, dtype);
            for act in ACTS {
                let mut fused = be.zeros(&[rows, n], dtype).unwrap();
                be.gemm_grouped_bias(
                    fused.view_mut(),
                    a.view(),
                    w.view(),
                    bias.view(),
                    groups,
                    n,
                    k,
                    trans_b,
                    act,
                )
                .unwrap();
                let mut pre = be.zeros(&[rows, n], dtype).unwrap();
                be.gemm_grouped(pre.view_mut(), a.view(), w.view(), groups, n, k, trans_b, 1.0, 0.0)
                    .unwrap();
                add_group_bias(&be, pre.view_mut(), bias.view(), groups, n).unwrap();
                let mut separate = be.zeros(&[rows, n], dtype).unwrap();
                match act {
                    Some(act) => be.unary(act, separate.view_mut(), pre.view()).unwrap(),
                    None => separate = pre,
                }
                let bits = |t: &Tensor| read(&be, t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(bits(&fused) == bits(&separate), "{path}: {groups:?} {act:?}");
            }
        }
        let (m, n, k) = (96, 128, 384);
        let (a, w, bias) = (
            upload(&be, &[m, k], 1, dtype),
            upload(&be, &[k, n], 2, dtype),
            upload(&be, &[n], 3, dtype),
        );
        let dims = GemmDims::nn(m, n, k);
        let mut fused = be.zeros(&[m, n], dtype).unwrap();
        be.gemm_act(
            fused.view_mut(),
            a.view(),
            w.view(),
            Some(bias.view()),
            dims,
            Unary::GeluTanh,
        )
        .unwrap();
        let mut pre = be.zeros(&[m, n], dtype).unwrap();
        be.gemm(pre.view_mut(), a.view(), w.view(), Some(bias.view()), dims, 1.0, 0.0)
            .unwrap();
        let mut separate = be.zeros(&[m, n], dtype).unwrap();
        be.unary(Unary::GeluTanh, separate.view_mut(), pre.view()).unwrap();
        assert!(read(&be, &fused) == read(&be, &separate), "{path}: gemm_act");
    }
}

#[test]
fn rows_keep_their_bits_whatever_the_row_count_and_run() {
    for (path, be) in backends(2) {
        for dtype in [DType::F32, DType::BF16] {
            let (n, k) = (192, 384);
            let a = upload(&be, &[300, k], 8, dtype);
            let w = upload(&be, &[2, k, n], 9, dtype);
            let bias = upload(&be, &[2, n], 10, dtype);
            // Group 0 holds the first `m` rows, group 1 the next 40.
            let run = |m: usize| {
                let mut out = be.zeros(&[m + 40, n], dtype).unwrap();
                let a = a.view().rows(0, m + 40).unwrap();
                let gelu = Some(Unary::GeluTanh);
                be.gemm_grouped_bias(out.view_mut(), a, w.view(), bias.view(), &[m, 40], n, k, false, gelu)
                    .unwrap();
                read(&be, &out)
            };
            let (short, tall) = (run(16), run(260));
            assert!(
                short[..16 * n] == tall[..16 * n],
                "{path}, {dtype:?}: group 0's first rows"
            );
            assert!(run(260) == tall, "{path}, {dtype:?}: run to run");
        }
    }
}
