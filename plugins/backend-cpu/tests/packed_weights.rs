//! oneDNN's pre-packed weights: a weight is packed once and its copy reused
//! while its buffer is unchanged, and every way of writing the weight (an
//! op, an upload, a zero-copy host view) is seen by the next product, for f32
//! and bf16, plain and transposed weights, one k chunk and two, and the
//! grouped products of stacked experts.
//!
//! One test in this file: it counts the process's packings, which other tests
//! running beside it would move.

mod common;

use common::{onednn_present, randv, ref_gemm};
use ecdit_backend_cpu::onednn::{self, OneDnnMode};
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::dtype::{bf16, f32_to_bf16};
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Tensor};

/// `out = x @ op(w)` on the backend, and within f32 accumulation of the f64
/// product of the stored values (each element within 2^-16 of the sum of
/// its terms' magnitudes, which bounds both dtypes' accumulation error).
fn product_checked(be: &CpuBackend, x: &Tensor, w: &Tensor, dims: GemmDims, what: &str) -> Vec<f32> {
    let GemmDims { m, n, k, .. } = dims;
    let mut out = be.zeros(&[m, n], DType::F32).expect("zeros");
    be.gemm(out.view_mut(), x.view(), w.view(), None, dims, 1.0, 0.0)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = be.read_f32(out.view()).expect("read");
    let (xs, ws) = (be.read_f32(x.view()).expect("x"), be.read_f32(w.view()).expect("w"));
    let abs = |v: &[f32]| v.iter().map(|e| e.abs()).collect::<Vec<_>>();
    let want = ref_gemm(&[], &xs, &ws, m, n, k, false, dims.trans_b, 1.0, 0.0);
    let bound = ref_gemm(&[], &abs(&xs), &abs(&ws), m, n, k, false, dims.trans_b, 1.0, 0.0);
    for (i, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
        assert!(
            (g - w).abs() <= b * 2f32.powi(-16) + 1e-6,
            "{what}: element {i} is {g}, the f64 product {w}"
        );
    }
    got
}

/// Overwrites `w` through a mutable host view (no op, no upload).
fn write_through_host_view(w: &mut Tensor, values: &[f32]) {
    match w.dtype() {
        DType::BF16 => f32_to_bf16(w.view_mut().host_mut::<bf16>().expect("view"), values),
        _ => w.view_mut().host_mut::<f32>().expect("view").copy_from_slice(values),
    }
}

#[test]
fn weights_are_packed_once_and_every_write_is_seen() {
    if !onednn_present() {
        return;
    }
    let lib = onednn::library().expect("library");
    let be = CpuBackend::with_onednn(2, OneDnnMode::Always).expect("backend");
    let m = 48;
    for dtype in [DType::F32, DType::BF16] {
        if dtype == DType::BF16 && !be.supports(DType::BF16) {
            continue;
        }
        // k = 1000: two k chunks, each packed on its own.
        for (n, k, trans_b) in [(384, 384, false), (96, 1000, false), (384, 384, true), (96, 1000, true)] {
            let what = format!("{dtype:?} n {n} k {k} trans_b {trans_b}");
            let dims = GemmDims {
                m,
                n,
                k,
                trans_a: false,
                trans_b,
            };
            let x = be.upload_f32(&[m, k], &randv(1, m * k, 1.0), dtype).expect("x");
            let w_dims = if trans_b { [n, k] } else { [k, n] };
            let mut w = be.upload_f32(&w_dims, &randv(2, n * k, 1.0), dtype).expect("w");

            let before = lib.weights_packed();
            let first = product_checked(&be, &x, &w, dims, &what);
            let packed = lib.weights_packed() - before;
            assert!(packed >= 1, "{what}: oneDNN read the weights unpacked");
            let again = product_checked(&be, &x, &w, dims, &what);
            assert_eq!(lib.weights_packed() - before, packed, "{what}: packed again, unchanged");
            assert!(first == again, "{what}: the kept copy gave other bits");

            // Each way of writing the weight is seen by the next product.
            be.fill(w.view_mut(), 0.25).expect("fill");
            let by_op = product_checked(&be, &x, &w, dims, &format!("{what}, after an op"));
            assert!(by_op != first, "{what}: the op's write was not seen");
            let values = randv(3, n * k, 1.0);
            let bytes = match dtype {
                DType::BF16 => {
                    let mut v = vec![bf16::default(); values.len()];
                    f32_to_bf16(&mut v, &values);
                    bytemuck::cast_slice(&v).to_vec()
                }
                _ => bytemuck::cast_slice(&values).to_vec(),
            };
            be.upload(w.view_mut(), &bytes).expect("upload");
            let uploaded = product_checked(&be, &x, &w, dims, &format!("{what}, after an upload"));
            write_through_host_view(&mut w, &randv(4, n * k, 1.0));
            let viewed = product_checked(&be, &x, &w, dims, &format!("{what}, after a host write"));
            assert!(uploaded != viewed, "{what}: the host view's write was not seen");
            assert_eq!(lib.weights_packed() - before, 4 * packed, "{what}: once per write");
        }

        // A dropped weight's copy goes when the next weight is packed.
        let (n, k) = (384, 384);
        let dims = GemmDims::nn(m, n, k);
        let x = be.upload_f32(&[m, k], &randv(7, m * k, 1.0), dtype).expect("x");
        // (Packing a first weight sweeps the earlier cases' dropped ones.)
        let first = be.upload_f32(&[k, n], &randv(10, n * k, 1.0), dtype).expect("w");
        product_checked(&be, &x, &first, dims, "a first weight");
        let kept = lib.packed_bytes();
        let w = be.upload_f32(&[k, n], &randv(8, n * k, 1.0), dtype).expect("w");
        product_checked(&be, &x, &w, dims, "a weight to drop");
        let one = lib.packed_bytes() - kept;
        assert!(
            one >= n * k * dtype.size(),
            "{dtype:?}: {one} bytes packed for a {k}x{n} weight"
        );
        drop(w);
        let w = be.upload_f32(&[k, n], &randv(9, n * k, 1.0), dtype).expect("w");
        product_checked(&be, &x, &w, dims, "the next weight");
        assert_eq!(
            lib.packed_bytes(),
            kept + one,
            "{dtype:?}: the dropped weight's copy stayed"
        );

        // Stacked experts: writing one expert's weights is seen by its
        // group's product (the whole buffer counts as written).
        let (groups, n, k) = (3, 384, 384);
        let rows = [16, 0, 32];
        let total: usize = rows.iter().sum();
        let x = be.upload_f32(&[total, k], &randv(5, total * k, 1.0), dtype).expect("x");
        let mut w = be
            .upload_f32(&[groups, k, n], &randv(6, groups * k * n, 1.0), dtype)
            .expect("w");
        let grouped = |w: &Tensor| {
            let mut out = be.zeros(&[total, n], DType::F32).expect("zeros");
            be.gemm_grouped(out.view_mut(), x.view(), w.view(), &rows, n, k, false, 1.0, 0.0)
                .expect("grouped");
            be.read_f32(out.view()).expect("read")
        };
        let first = grouped(&w);
        let mut values = be.read_f32(w.view()).expect("w");
        values[2 * k * n..].iter_mut().for_each(|v| *v = -*v);
        write_through_host_view(&mut w, &values);
        let second = grouped(&w);
        let split = rows[0] * n;
        assert!(
            first[..split] == second[..split],
            "{dtype:?}: an unwritten expert changed"
        );
        let flipped: Vec<f32> = first[split..].iter().map(|v| -v).collect();
        assert!(flipped == second[split..], "{dtype:?}: the written expert's rows");
    }
}
