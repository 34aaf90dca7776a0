//! The oneDNN path against the `gemm` crate path, both in this one process:
//! every product kind (plain with transposes, alpha, beta and bias; batched;
//! grouped), f32 and bf16 inputs, f32 and bf16 outputs, on 1 and 2 threads;
//! a row's bits whatever the row count; the same bits run to run; the
//! fallback inside a rayon pool; and the status line.
//!
//! Without `libdnnl.so.2` the tests that need it say so and pass, unless
//! `ECDIT_REQUIRE_ONEDNN=1` (set it where the library is installed, as in CI).

mod common;

use common::{onednn_present, randv};
use ecdit_backend_cpu::onednn::{self, OneDnnMode};
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Tensor};

/// Backends on `threads` threads: oneDNN for every product it takes, and the
/// `gemm` crate alone. `None` (after saying why) without the library.
fn pair(threads: usize) -> Option<(CpuBackend, CpuBackend)> {
    if !onednn_present() {
        return None;
    }
    Some((
        CpuBackend::with_onednn(threads, OneDnnMode::Always).expect("backend"),
        CpuBackend::with_onednn(threads, OneDnnMode::Off).expect("backend"),
    ))
}

fn upload(b: &CpuBackend, dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    b.upload_f32(dims, &randv(seed, n, 1.0), dtype).expect("upload")
}

/// One `gemm` case.
#[derive(Clone, Copy, Debug)]
struct Case {
    dims: GemmDims,
    alpha: f32,
    beta: f32,
    bias: bool,
    inputs: DType,
    out: DType,
}

fn run_gemm(b: &CpuBackend, c: Case, seed: u64) -> Vec<f32> {
    let GemmDims { m, n, k, .. } = c.dims;
    let a_dims = if c.dims.trans_a { [k, m] } else { [m, k] };
    let b_dims = if c.dims.trans_b { [n, k] } else { [k, n] };
    let (x, w) = (
        upload(b, &a_dims, seed, c.inputs),
        upload(b, &b_dims, seed + 1, c.inputs),
    );
    let bias = upload(b, &[n], seed + 2, DType::F32);
    let mut out = upload(b, &[m, n], seed + 3, c.out);
    b.gemm(
        out.view_mut(),
        x.view(),
        w.view(),
        c.bias.then(|| bias.view()),
        c.dims,
        c.alpha,
        c.beta,
    )
    .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    b.read_f32(out.view()).expect("read")
}

/// `|got - want| <= tol * (1 + |want|)` everywhere.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| ((g - w).abs() / (1.0 + w.abs()), g, w))
        .fold(
            (0.0f32, 0.0, 0.0),
            |m, (d, g, w)| if d > m.0 || d.is_nan() { (d, *g, *w) } else { m },
        );
    assert!(
        worst.0 <= tol,
        "{what}: {} against {} (relative {})",
        worst.1,
        worst.2,
        worst.0
    );
}

#[test]
fn status_names_the_path() {
    let off = CpuBackend::with_onednn(1, OneDnnMode::Off).expect("backend");
    assert!(
        off.matmul_library().starts_with("gemm crate (oneDNN disabled"),
        "{}",
        off.matmul_library()
    );
    let auto = CpuBackend::with_onednn(1, OneDnnMode::Auto).expect("backend");
    match onednn::library() {
        Ok(lib) => {
            assert!(
                auto.matmul_library().starts_with("onednn 2."),
                "{}",
                auto.matmul_library()
            );
            assert!(auto.matmul_library().contains(lib.version()));
            assert!(auto.matmul_library().contains("weights pre-packed once"));
            assert!(auto.matmul_library().contains("grouped (expert) products side by side"));
            assert_eq!(auto.onednn_mode(), OneDnnMode::Auto);
        }
        Err(reason) => {
            assert!(auto.matmul_library().starts_with("gemm crate ("));
            assert!(reason.contains("apt-get install libdnnl2"), "{reason}");
            assert_eq!(auto.onednn_mode(), OneDnnMode::Off);
        }
    }
}

#[test]
fn plain_products_match_the_gemm_crate() {
    let shapes = [
        GemmDims::nn(70, 48, 40),
        GemmDims::nt(33, 65, 96),
        GemmDims::tn(40, 24, 130),
        GemmDims {
            m: 17,
            n: 9,
            k: 35,
            trans_a: true,
            trans_b: true,
        },
        GemmDims::nn(300, 384, 384),
        // A weight gradient's long k (the batch's rows): one primitive, unchunked.
        GemmDims::tn(96, 64, 3000),
        GemmDims::nn(40, 64, 2000),
    ];
    for threads in [1, 2] {
        let Some((on, off)) = pair(threads) else { return };
        for dims in shapes {
            for (alpha, beta, bias) in [
                (1.0, 0.0, false),
                (1.0, 0.0, true),
                (0.5, 1.0, false),
                (1.0, 1.0, true),
                (-2.0, 0.25, true),
            ] {
                for (inputs, out) in [
                    (DType::F32, DType::F32),
                    (DType::BF16, DType::F32),
                    (DType::BF16, DType::BF16),
                    (DType::F32, DType::BF16),
                ] {
                    let c = Case {
                        dims,
                        alpha,
                        beta,
                        bias,
                        inputs,
                        out,
                    };
                    let kernel = on.gemm_kernel(dims, inputs);
                    assert!(kernel != "gemm crate" && kernel != "few rows", "{c:?} ran on {kernel}");
                    let (got, want) = (run_gemm(&on, c, 5), run_gemm(&off, c, 5));
                    // Exact products, f32 sums in another order; a bf16
                    // output may round the other way once.
                    let tol = if out == DType::BF16 {
                        1e-2
                    } else {
                        1e-5 * (dims.k as f32).sqrt()
                    };
                    assert_close(&format!("{threads} threads {c:?} on {kernel}"), &got, &want, tol);
                }
            }
        }
    }
}

#[test]
fn mixed_inputs_and_few_rows_keep_their_semantics() {
    let Some((on, off)) = pair(2) else { return };
    // bf16 activations times f32 weights: read as f32 (no rounding of the weights).
    let (m, n, k) = (40, 32, 64);
    let x16 = upload(&on, &[m, k], 1, DType::BF16);
    let w = upload(&on, &[k, n], 2, DType::F32);
    let mut got = on.zeros(&[m, n], DType::F32).expect("zeros");
    on.gemm(
        got.view_mut(),
        x16.view(),
        w.view(),
        None,
        GemmDims::nn(m, n, k),
        1.0,
        0.0,
    )
    .expect("gemm");
    let x16 = upload(&off, &[m, k], 1, DType::BF16);
    let w = upload(&off, &[k, n], 2, DType::F32);
    let mut want = off.zeros(&[m, n], DType::F32).expect("zeros");
    off.gemm(
        want.view_mut(),
        x16.view(),
        w.view(),
        None,
        GemmDims::nn(m, n, k),
        1.0,
        0.0,
    )
    .expect("gemm");
    let (got, want) = (
        on.read_f32(got.view()).expect("read"),
        off.read_f32(want.view()).expect("read"),
    );
    assert_close("bf16 x f32", &got, &want, 1e-5 * 8.0);
    // Up to 8 rows keep the backend's own kernel on every path: same bits.
    let c = Case {
        dims: GemmDims::nn(8, 96, 384),
        alpha: 1.0,
        beta: 0.0,
        bias: true,
        inputs: DType::BF16,
        out: DType::F32,
    };
    assert_eq!(on.gemm_kernel(c.dims, DType::BF16), "few rows");
    assert!(run_gemm(&on, c, 9) == run_gemm(&off, c, 9));
}

#[test]
fn batched_and_grouped_products_match_the_gemm_crate() {
    for threads in [1, 2] {
        let Some((on, off)) = pair(threads) else { return };
        for dtype in [DType::F32, DType::BF16] {
            let tol = 1e-5 * 16.0;
            // Batched, plain and transposed.
            for dims in [
                GemmDims::nn(20, 24, 64),
                GemmDims::nt(33, 16, 40),
                GemmDims::tn(12, 16, 40),
            ] {
                let GemmDims { m, n, k, .. } = dims;
                let run = |b: &CpuBackend| {
                    let a_dims = if dims.trans_a { [3, k, m] } else { [3, m, k] };
                    let b_dims = if dims.trans_b { [3, n, k] } else { [3, k, n] };
                    let (x, w) = (upload(b, &a_dims, 3, dtype), upload(b, &b_dims, 4, dtype));
                    let mut out = upload(b, &[3, m, n], 5, DType::F32);
                    b.gemm_batched(out.view_mut(), x.view(), w.view(), 3, dims, 0.5, 1.0)
                        .expect("gemm_batched");
                    b.read_f32(out.view()).expect("read")
                };
                assert_close(&format!("batched {dims:?} {dtype}"), &run(&on), &run(&off), tol);
            }
            // Grouped experts: uneven, empty and few-row groups.
            let rows = [130usize, 0, 5, 64, 300];
            let total: usize = rows.iter().sum();
            for trans_b in [false, true] {
                let (n, k) = (48, 64);
                let run = |b: &CpuBackend| {
                    let x = upload(b, &[total, k], 6, dtype);
                    let w_dims = if trans_b {
                        [rows.len(), n, k]
                    } else {
                        [rows.len(), k, n]
                    };
                    let w = upload(b, &w_dims, 7, dtype);
                    let mut out = upload(b, &[total, n], 8, DType::F32);
                    b.gemm_grouped(out.view_mut(), x.view(), w.view(), &rows, n, k, trans_b, 1.0, 1.0)
                        .expect("gemm_grouped");
                    b.read_f32(out.view()).expect("read")
                };
                assert_close(
                    &format!("grouped trans_b {trans_b} {dtype}"),
                    &run(&on),
                    &run(&off),
                    tol,
                );
            }
        }
    }
}

/// What `Auto` sends to oneDNN (bf16 products) must give a row the same bits
/// whatever the number of rows beside it, or a sample's output would depend
/// on its batch; checked for f32 on oneDNN too (`Always`). oneDNN 2.6's AMX
/// kernel needs the k chunks for this (k = 1536 and 3072 here).
#[test]
fn rows_keep_their_bits_whatever_the_row_count() {
    for threads in [1, 2] {
        let Some((always, _)) = pair(threads) else { return };
        let auto = CpuBackend::with_onednn(threads, OneDnnMode::Auto).expect("backend");
        for (b, dtype) in [(&auto, DType::BF16), (&always, DType::F32)] {
            for (n, k) in [
                (384, 384),
                (1536, 384),
                (384, 1536),
                (32, 384),
                (64, 32),
                (1152, 384),
                (384, 3072),
                (96, 1000),
            ] {
                let big = 2048;
                let x = upload(b, &[big, k], 11, dtype);
                let w = upload(b, &[k, n], 12, dtype);
                let bias = upload(b, &[n], 13, DType::F32);
                let product = |m: usize| {
                    let mut out = b.zeros(&[m, n], DType::F32).expect("zeros");
                    b.gemm(
                        out.view_mut(),
                        x.view().rows(0, m).expect("rows"),
                        w.view(),
                        Some(bias.view()),
                        GemmDims::nn(m, n, k),
                        1.0,
                        0.0,
                    )
                    .expect("gemm");
                    b.read_f32(out.view()).expect("read")
                };
                let all = product(big);
                let kernel = b.gemm_kernel(GemmDims::nn(big, n, k), dtype);
                for m in [9, 16, 32, 64, 100, 128, 256, 257, 768, 1024] {
                    let part = product(m);
                    if let Some(i) = (0..m * n).find(|&i| part[i].to_bits() != all[i].to_bits()) {
                        panic!(
                            "{threads} threads, {dtype} on {kernel}, n {n} k {k}: row {} of {m} rows differs from the {big}-row product: {} vs {}",
                            i / n,
                            part[i],
                            all[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_same_bits_run_to_run() {
    let Some((on, _)) = pair(2) else { return };
    for inputs in [DType::F32, DType::BF16] {
        let c = Case {
            dims: GemmDims::nn(512, 1536, 384),
            alpha: 1.0,
            beta: 0.0,
            bias: true,
            inputs,
            out: DType::F32,
        };
        let first = run_gemm(&on, c, 21);
        for _ in 0..3 {
            assert!(run_gemm(&on, c, 21) == first, "{inputs}");
        }
    }
}

/// Inside the backend's own pool (a rayon task) oneDNN is never called: its
/// OpenMP team would nest inside our pool. The product takes the `gemm`
/// crate, bit for bit what the oneDNN-free backend gives.
#[test]
fn products_inside_a_rayon_pool_take_the_gemm_crate() {
    let Some((on, off)) = pair(2) else { return };
    let c = Case {
        dims: GemmDims::nn(256, 384, 384),
        alpha: 1.0,
        beta: 0.0,
        bias: true,
        inputs: DType::BF16,
        out: DType::F32,
    };
    let inside = on.install(|| run_gemm(&on, c, 31));
    assert!(inside == run_gemm(&off, c, 31));
    assert!(
        run_gemm(&on, c, 31) != inside,
        "outside the pool oneDNN sums in its own order"
    );
}

/// Several threads calling one backend at once: the calls are serialised on
/// oneDNN's lock, and every result is right.
#[test]
fn concurrent_callers_are_serialised() {
    let Some((on, off)) = pair(2) else { return };
    let c = Case {
        dims: GemmDims::nn(200, 128, 96),
        alpha: 1.0,
        beta: 0.0,
        bias: false,
        inputs: DType::BF16,
        out: DType::F32,
    };
    let want = run_gemm(&off, c, 41);
    let first = run_gemm(&on, c, 41);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| run_gemm(&on, c, 41))).collect();
        for h in handles {
            let got = h.join().expect("thread");
            assert!(got == first, "same bits from every thread");
        }
    });
    assert_close("concurrent", &first, &want, 1e-4);
}

/// A bf16 output is the f32 result rounded once, also when k runs in chunks
/// (each chunk's partial sums stay f32).
#[test]
fn a_bf16_output_is_rounded_once() {
    let Some((on, _)) = pair(2) else { return };
    for k in [384, 1600] {
        for beta in [0.0, 1.0] {
            let c = |out| Case {
                dims: GemmDims::nn(64, 96, k),
                alpha: 1.0,
                beta,
                bias: true,
                inputs: DType::BF16,
                out,
            };
            let wide = run_gemm(&on, c(DType::F32), 51);
            let narrow = run_gemm(&on, c(DType::BF16), 51);
            if beta == 0.0 {
                let rounded: Vec<f32> = wide
                    .iter()
                    .map(|&v| ecdit_engine::dtype::bf16::from_f32(v).to_f32())
                    .collect();
                assert!(
                    narrow == rounded,
                    "k {k}: bf16 output is not the f32 result rounded once"
                );
            } else {
                // The old output is read from bf16 storage: the same up to its rounding.
                assert_close(&format!("k {k} beta 1"), &narrow, &wide, 1e-2);
            }
        }
    }
}
