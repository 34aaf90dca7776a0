//! Grouped products on oneDNN run as tasks, each group on one thread
//! (`onednn/grouped.rs`), and must give every group the bits of its own
//! product on all threads: with and without bias and activation, bf16 and
//! f32, plain and transposed weights, one k chunk and several (the bf16
//! output then summed in f32 and rounded per group), beta reading the old
//! output, uneven and empty groups.

mod common;

use common::{onednn_present, randv};
use ecdit_backend_cpu::onednn::OneDnnMode;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Tensor, Unary};

/// One grouped product: `out[rows of g] = alpha * a[rows of g] @ op(w[g]) + bias[g] + beta * out`.
struct Case {
    groups: &'static [usize],
    n: usize,
    k: usize,
    trans_b: bool,
    dtype: DType,
    out: DType,
    /// `Some((bias, act))`: `gemm_grouped_bias`; `None`: `gemm_grouped` with alpha and beta.
    fused: Option<Option<Unary>>,
    alpha: f32,
    beta: f32,
}

const CASES: [Case; 5] = [
    // The experts' first layer: bias and GELU fused, bf16 written by oneDNN.
    Case {
        groups: &[96, 0, 200, 64],
        n: 192,
        k: 384,
        trans_b: false,
        dtype: DType::BF16,
        out: DType::BF16,
        fused: Some(Some(Unary::GeluTanh)),
        alpha: 1.0,
        beta: 0.0,
    },
    // Their second layer: k = 1536 in two chunks, summed in f32, rounded per group.
    Case {
        groups: &[100, 37, 0, 90],
        n: 96,
        k: 1536,
        trans_b: false,
        dtype: DType::BF16,
        out: DType::BF16,
        fused: Some(None),
        alpha: 1.0,
        beta: 0.0,
    },
    // The backward's input gradient: transposed weights, beta reading a bf16 output.
    Case {
        groups: &[40, 70, 33],
        n: 64,
        k: 1536,
        trans_b: true,
        dtype: DType::BF16,
        out: DType::BF16,
        fused: None,
        alpha: 1.0,
        beta: 1.0,
    },
    // f32, alpha and beta, three k chunks.
    Case {
        groups: &[50, 0, 120],
        n: 48,
        k: 2000,
        trans_b: true,
        dtype: DType::F32,
        out: DType::F32,
        fused: None,
        alpha: 0.5,
        beta: 1.0,
    },
    // bf16 inputs, f32 output.
    Case {
        groups: &[64, 64, 64, 64, 64, 64, 64, 64],
        n: 128,
        k: 256,
        trans_b: false,
        dtype: DType::BF16,
        out: DType::F32,
        fused: None,
        alpha: 1.0,
        beta: 0.0,
    },
];

fn upload(b: &CpuBackend, dims: &[usize], values: &[f32], dtype: DType) -> Tensor {
    b.upload_f32(dims, values, dtype).expect("upload")
}

fn bits(b: &CpuBackend, t: &Tensor) -> Vec<u32> {
    b.read_f32(t.view())
        .expect("read")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The whole grouped product on `be`.
fn grouped(be: &CpuBackend, c: &Case, (a, w, bias, out0): (&[f32], &[f32], &[f32], &[f32])) -> Vec<u32> {
    let (rows, g) = (c.groups.iter().sum::<usize>(), c.groups.len());
    let a = upload(be, &[rows, c.k], a, c.dtype);
    let w = upload(be, &[g, c.k * c.n], w, c.dtype);
    let bias = upload(be, &[g, c.n], bias, c.dtype);
    let mut out = upload(be, &[rows, c.n], out0, c.out);
    let (n, k, trans_b) = (c.n, c.k, c.trans_b);
    match c.fused {
        Some(act) => be.gemm_grouped_bias(
            out.view_mut(),
            a.view(),
            w.view(),
            bias.view(),
            c.groups,
            n,
            k,
            trans_b,
            act,
        ),
        None => be.gemm_grouped(
            out.view_mut(),
            a.view(),
            w.view(),
            c.groups,
            n,
            k,
            trans_b,
            c.alpha,
            c.beta,
        ),
    }
    .expect("grouped product");
    bits(be, &out)
}

/// Each group as a product of its own (on all threads), in group order.
fn one_by_one(be: &CpuBackend, c: &Case, (a, w, bias, out0): (&[f32], &[f32], &[f32], &[f32])) -> Vec<u32> {
    let (n, k) = (c.n, c.k);
    let mut all = Vec::new();
    let mut r0 = 0;
    for (g, &m) in c.groups.iter().enumerate() {
        if m == 0 {
            continue;
        }
        let a_g = upload(be, &[m, k], &a[r0 * k..][..m * k], c.dtype);
        let w_g = upload(be, &[k * n], &w[g * k * n..][..k * n], c.dtype);
        let bias_g = upload(be, &[n], &bias[g * n..][..n], c.dtype);
        let mut out = upload(be, &[m, n], &out0[r0 * n..][..m * n], c.out);
        let dims = GemmDims {
            m,
            n,
            k,
            trans_a: false,
            trans_b: c.trans_b,
        };
        let (o, a_g, w_g) = (out.view_mut(), a_g.view(), w_g.view());
        match c.fused {
            Some(Some(act)) => be.gemm_act(o, a_g, w_g, Some(bias_g.view()), dims, act),
            Some(None) => be.gemm(o, a_g, w_g, Some(bias_g.view()), dims, 1.0, 0.0),
            None => be.gemm(o, a_g, w_g, None, dims, c.alpha, c.beta),
        }
        .expect("group product");
        all.extend(bits(be, &out));
        r0 += m;
    }
    all
}

#[test]
fn groups_in_tasks_keep_the_bits_of_one_product_per_group() {
    if !onednn_present() {
        return;
    }
    for mode in [OneDnnMode::Auto, OneDnnMode::Always] {
        let be = CpuBackend::with_onednn(2, mode).expect("backend");
        for (i, c) in CASES.iter().enumerate() {
            if c.dtype == DType::BF16 && be.gemm_kernel(GemmDims::nn(64, c.n, c.k), DType::BF16) == "gemm crate" {
                continue; // no bf16 kernels in this oneDNN on this CPU
            }
            let (rows, g) = (c.groups.iter().sum::<usize>(), c.groups.len());
            let seed = 100 * i as u64;
            let a = randv(seed, rows * c.k, 1.0);
            let w = randv(seed + 1, g * c.k * c.n, 0.2);
            let bias = randv(seed + 2, g * c.n, 1.0);
            let out0 = randv(seed + 3, rows * c.n, 1.0);
            let data = (&a[..], &w[..], &bias[..], &out0[..]);
            let got = grouped(&be, c, data);
            assert!(
                got == one_by_one(&be, c, data),
                "{mode:?}, case {i}: a group's bits differ from its own product's"
            );
            assert!(
                got == grouped(&be, c, data),
                "{mode:?}, case {i}: bits differ run to run"
            );
        }
    }
}

/// `gemm_grouped_bias_gathered` (each task gathers its rows) against the
/// gather and the product run apart, bit for bit: repeated and unordered
/// row indices, an empty group; and an index past the tokens is an error
/// that names it, on every path.
#[test]
fn gathered_rows_give_the_bits_of_gather_then_product() {
    let (tokens, d, h, groups) = (300usize, 64usize, 96usize, [120usize, 0, 200, 80]);
    let (rows_total, g) = (groups.iter().sum::<usize>(), groups.len());
    let rows: Vec<u32> = (0..rows_total).map(|i| ((i * 7919 + i / 3) % tokens) as u32).collect();
    let x = randv(1, tokens * d, 1.0);
    let w = randv(2, g * d * h, 0.2);
    let bias = randv(3, g * h, 1.0);
    let mut modes = vec![(1, OneDnnMode::Off), (2, OneDnnMode::Off)];
    if onednn_present() {
        modes.extend([(1, OneDnnMode::Auto), (2, OneDnnMode::Auto), (2, OneDnnMode::Always)]);
    }
    for (threads, mode) in modes {
        let be = CpuBackend::with_onednn(threads, mode).expect("backend");
        for dtype in [DType::F32, DType::BF16] {
            let what = format!("{mode:?}, {threads} threads, {dtype}");
            let xt = upload(&be, &[tokens, d], &x, dtype);
            let wt = upload(&be, &[g, d, h], &w, dtype);
            let bt = upload(&be, &[g, h], &bias, dtype);
            let idx = be.upload_u32(&[rows_total], &rows).expect("rows");
            let act = Some(Unary::GeluTanh);
            let mut fused = be.zeros(&[rows_total, h], dtype).expect("zeros");
            be.gemm_grouped_bias_gathered(
                fused.view_mut(),
                xt.view(),
                idx.view(),
                wt.view(),
                bt.view(),
                &groups,
                h,
                d,
                false,
                act,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut xs = be.zeros(&[rows_total, d], dtype).expect("zeros");
            be.gather_rows(xs.view_mut(), xt.view(), idx.view(), d).expect("gather");
            let mut apart = be.zeros(&[rows_total, h], dtype).expect("zeros");
            be.gemm_grouped_bias(
                apart.view_mut(),
                xs.view(),
                wt.view(),
                bt.view(),
                &groups,
                h,
                d,
                false,
                act,
            )
            .expect("grouped");
            assert!(bits(&be, &fused) == bits(&be, &apart), "{what}: gathered bits differ");

            let mut bad_rows = rows.clone();
            bad_rows[150] = tokens as u32;
            let bad = be.upload_u32(&[rows_total], &bad_rows).expect("rows");
            let e = be
                .gemm_grouped_bias_gathered(
                    fused.view_mut(),
                    xt.view(),
                    bad.view(),
                    wt.view(),
                    bt.view(),
                    &groups,
                    h,
                    d,
                    false,
                    act,
                )
                .expect_err("an index past the tokens");
            assert!(e.to_string().contains(&tokens.to_string()), "{what}: {e}");
        }
    }
}
