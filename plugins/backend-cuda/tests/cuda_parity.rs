//! GPU parity: every implemented op against a plain host reference (and, through
//! the engine's conformance suite, against the CPU backend), and the
//! unimplemented ones must say so. Needs a CUDA driver, cuBLAS and NVRTC, so every
//! test is `#[ignore]`d; scripts/gpu-check.sh runs them with `--ignored --nocapture`.
//! Each check prints one `PARITY <op> <max abs error> <tolerance>` line for its table.

use ecdit_backend_cuda::register;
use ecdit_engine::backend_kit::{check_backend_ops, check_backward_ops};
use ecdit_engine::{AdamW, AttnDims, Backend, BackendExt, DType, GemmDims, Registry, Tensor, TensorRef, Unary};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn cuda() -> Box<dyn Backend> {
    let mut reg = Registry::new();
    register(&mut reg).unwrap();
    reg.backend(&json!({"kind": "cuda"}))
        .expect("a CUDA backend on this machine")
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

fn up(b: &dyn Backend, dims: &[usize], data: &[f32]) -> Tensor {
    b.upload_f32(dims, data, DType::F32).unwrap()
}

fn down(b: &dyn Backend, v: TensorRef<'_>) -> Vec<f32> {
    b.read_f32(v).unwrap()
}

fn check(op: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{op}: lengths");
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        if err > worst || err.is_nan() {
            (worst, at) = (err, i);
        }
    }
    println!("PARITY {op} {worst:.3e} {tol:.0e}");
    assert!(
        worst <= tol,
        "{op}: error {worst} at {at}: got {} want {}",
        got[at],
        want[at]
    );
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn buffers_are_device_memory_and_transfers_round_trip() {
    let b = cuda();
    let data = random(1000, 0);
    let mut t = up(b.as_ref(), &[10, 100], &data);
    assert!(!t.buffer().is_host(), "cuda buffers must not be host memory");
    assert!(t.view().host::<f32>().is_err());
    check("upload_download", &down(b.as_ref(), t.view()), &data, 0.0);
    // A view at an offset: device address plus byte offset.
    check(
        "download_rows",
        &down(b.as_ref(), t.view().rows(3, 2).unwrap()),
        &data[300..500],
        0.0,
    );
    b.fill(t.view_mut().rows(1, 1).unwrap(), 2.5).unwrap();
    let mut want = data.clone();
    want[100..200].fill(2.5);
    check("fill", &down(b.as_ref(), t.view()), &want, 0.0);
    // f32 -> bf16 -> f32 rounds to nearest even, as the host conversion.
    let mut h = b.zeros(&[10, 100], DType::BF16).unwrap();
    b.copy(h.view_mut(), t.view()).unwrap();
    let mut back = b.zeros(&[10, 100], DType::F32).unwrap();
    b.copy(back.view_mut(), h.view()).unwrap();
    let rounded: Vec<f32> = want.iter().map(|&x| ecdit_engine::bf16::from_f32(x).to_f32()).collect();
    check("copy_bf16", &down(b.as_ref(), back.view()), &rounded, 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gemm_matches_the_host_for_every_layout() {
    let b = cuda();
    let b = b.as_ref();
    let (m, n, k) = (37, 53, 29);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let dims = GemmDims {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
        };
        let (a, bm, c0) = (random(m * k, 1), random(k * n, 2), random(m * n, 3));
        let mut want = c0.clone();
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for l in 0..k {
                    let av = if ta { a[l * m + i] } else { a[i * k + l] };
                    let bv = if tb { bm[j * k + l] } else { bm[l * n + j] };
                    acc += av as f64 * bv as f64;
                }
                want[i * n + j] = (0.7 * acc + 0.3 * c0[i * n + j] as f64) as f32;
            }
        }
        let (ad, bd) = (up(b, &[m * k], &a), up(b, &[k * n], &bm));
        let mut got = up(b, &[m, n], &c0);
        b.gemm(got.view_mut(), ad.view(), bd.view(), None, dims, 0.7, 0.3)
            .unwrap();
        check(
            &format!("gemm_{}{}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' }),
            &down(b, got.view()),
            &want,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gemm_batched_is_gemm_per_block() {
    let b = cuda();
    let b = b.as_ref();
    let (batch, m, n, k) = (3, 8, 6, 5);
    let dims = GemmDims::nt(m, n, k);
    let (a, bm) = (random(batch * m * k, 4), random(batch * n * k, 5));
    let (ad, bd) = (up(b, &[batch * m * k], &a), up(b, &[batch * n * k], &bm));
    let mut want = b.zeros(&[batch * m * n], DType::F32).unwrap();
    for p in 0..batch {
        b.gemm(
            want.view_mut().flat(p * m * n, m * n).unwrap(),
            ad.view().flat(p * m * k, m * k).unwrap(),
            bd.view().flat(p * n * k, n * k).unwrap(),
            None,
            dims,
            1.0,
            0.0,
        )
        .unwrap();
    }
    // beta = 0 must overwrite, NaN or not.
    let mut got = up(b, &[batch * m * n], &vec![f32::NAN; batch * m * n]);
    b.gemm_batched(got.view_mut(), ad.view(), bd.view(), batch, dims, 1.0, 0.0)
        .unwrap();
    check("gemm_batched", &down(b, got.view()), &down(b, want.view()), 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn bias_and_column_sums() {
    let b = cuda();
    let b = b.as_ref();
    let (rows, cols) = (300, 70);
    let (inp, bias) = (random(rows * cols, 6), random(cols, 7));
    let mut got = up(b, &[rows, cols], &inp);
    let bias_d = up(b, &[cols], &bias);
    b.add_broadcast(got.view_mut(), bias_d.view()).unwrap();
    let want: Vec<f32> = inp.iter().enumerate().map(|(i, x)| x + bias[i % cols]).collect();
    check("add_broadcast", &down(b, got.view()), &want, 0.0);

    let inp_d = up(b, &[rows, cols], &inp);
    let mut sums = up(b, &[cols], &vec![1.0; cols]);
    b.sum_rows(sums.view_mut(), inp_d.view(), rows, cols, true).unwrap();
    let want: Vec<f32> = (0..cols)
        .map(|c| 1.0 + (0..rows).map(|r| inp[r * cols + c] as f64).sum::<f64>() as f32)
        .collect();
    check("sum_rows", &down(b, sums.view()), &want, 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn softmax_and_its_backward() {
    let b = cuda();
    let b = b.as_ref();
    let (rows, cols) = (129, 33);
    let inp: Vec<f32> = random(rows * cols, 8).iter().map(|x| 5.0 * x).collect();
    let inp_d = up(b, &[rows, cols], &inp);
    let mut out = b.zeros(&[rows, cols], DType::F32).unwrap();
    b.softmax_rows(out.view_mut(), inp_d.view(), rows, cols).unwrap();
    let mut want = vec![0.0; rows * cols];
    for r in 0..rows {
        let row = &inp[r * cols..(r + 1) * cols];
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - mx).exp()).sum();
        for c in 0..cols {
            want[r * cols + c] = ((row[c] as f64 - mx).exp() / z) as f32;
        }
    }
    check("softmax_rows", &down(b, out.view()), &want, 1e-6);

    let dout = random(rows * cols, 9);
    let (dout_d, want_d) = (up(b, &[rows, cols], &dout), up(b, &[rows, cols], &want));
    let mut dinp = b.zeros(&[rows, cols], DType::F32).unwrap();
    b.softmax_rows_backward(dinp.view_mut(), dout_d.view(), want_d.view(), rows, cols)
        .unwrap();
    let mut want_g = vec![0.0; rows * cols];
    for r in 0..rows {
        let s = r * cols;
        let dot: f64 = (0..cols).map(|c| dout[s + c] as f64 * want[s + c] as f64).sum();
        for c in 0..cols {
            want_g[s + c] = (want[s + c] as f64 * (dout[s + c] as f64 - dot)) as f32;
        }
    }
    check("softmax_rows_backward", &down(b, dinp.view()), &want_g, 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn activations_and_their_derivatives() {
    let b = cuda();
    let b = b.as_ref();
    let inp: Vec<f32> = random(1000, 10).iter().map(|x| 3.0 * x).collect();
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let dout = random(1000, 11);
    let (inp_d, dout_d) = (up(b, &[1000], &inp), up(b, &[1000], &dout));
    for (op, f, name) in [
        (Unary::GeluTanh, &gelu as &dyn Fn(f64) -> f64, "gelu_tanh"),
        (Unary::Silu, &silu, "silu"),
    ] {
        let mut out = b.zeros(&[1000], DType::F32).unwrap();
        b.unary(op, out.view_mut(), inp_d.view()).unwrap();
        let want: Vec<f32> = inp.iter().map(|&x| f(x as f64) as f32).collect();
        check(name, &down(b, out.view()), &want, 1e-5);
        // Backward against a central difference of the f64 forward.
        let mut dinp = b.zeros(&[1000], DType::F32).unwrap();
        b.unary_backward(op, dinp.view_mut(), dout_d.view(), inp_d.view())
            .unwrap();
        let h = 1e-5;
        let want: Vec<f32> = inp
            .iter()
            .zip(&dout)
            .map(|(&x, &d)| (d as f64 * (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h)) as f32)
            .collect();
        check(&format!("{name}_backward"), &down(b, dinp.view()), &want, 1e-4);
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gather_and_scatter_add_with_repeats() {
    let b = cuda();
    let b = b.as_ref();
    let (rows, cols) = (10, 7);
    let inp = random(rows * cols, 12);
    let idx: Vec<u32> = vec![3, 3, 0, 9, 5, 3];
    let (inp_d, idx_d) = (up(b, &[rows, cols], &inp), b.upload_u32(&[idx.len()], &idx).unwrap());
    let mut got = b.zeros(&[idx.len(), cols], DType::F32).unwrap();
    b.gather_rows(got.view_mut(), inp_d.view(), idx_d.view(), cols).unwrap();
    let gathered = down(b, got.view());
    let want: Vec<f32> = idx
        .iter()
        .flat_map(|&i| inp[i as usize * cols..(i as usize + 1) * cols].to_vec())
        .collect();
    check("gather_rows", &gathered, &want, 0.0);

    let scale = random(idx.len(), 13);
    let out0 = random(rows * cols, 14);
    let mut want = out0.clone();
    for (i, &r) in idx.iter().enumerate() {
        for c in 0..cols {
            want[r as usize * cols + c] += scale[i] * gathered[i * cols + c];
        }
    }
    let (scale_d, mut out) = (up(b, &[idx.len()], &scale), up(b, &[rows, cols], &out0));
    b.scatter_add_rows(out.view_mut(), got.view(), idx_d.view(), Some(scale_d.view()), cols)
        .unwrap();
    check("scatter_add_rows", &down(b, out.view()), &want, 1e-6);

    // gather_dot: <inp[idx[i]], gathered[i]> = |inp[idx[i]]|^2.
    let mut dots = b.zeros(&[idx.len()], DType::F32).unwrap();
    b.gather_dot(dots.view_mut(), inp_d.view(), idx_d.view(), got.view(), cols)
        .unwrap();
    let want: Vec<f32> = (0..idx.len())
        .map(|i| gathered[i * cols..(i + 1) * cols].iter().map(|x| x * x).sum())
        .collect();
    check("gather_dot", &down(b, dots.view()), &want, 1e-6);

    let bad = b.upload_u32(&[6], &[10, 0, 0, 0, 0, 0]).unwrap();
    let e = b
        .gather_rows(got.view_mut(), inp_d.view(), bad.view(), cols)
        .unwrap_err()
        .to_string();
    assert!(e.contains("idx[0]") && e.contains("< 10"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn adamw_matches_pytorch_semantics() {
    let b = cuda();
    let b = b.as_ref();
    let hp = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (p0, g) = (random(500, 15), random(500, 16));
    let (mut p, gd) = (up(b, &[500], &p0), up(b, &[500], &g));
    let (mut m, mut v) = (
        b.zeros(&[500], DType::F32).unwrap(),
        b.zeros(&[500], DType::F32).unwrap(),
    );
    let (mut wp, mut wm, mut wv) = (p0.clone(), vec![0.0f32; 500], vec![0.0f32; 500]);
    for step in 1..=3u64 {
        b.adamw_step(p.view_mut(), gd.view(), m.view_mut(), v.view_mut(), hp, step)
            .unwrap();
        let (bc1, bc2) = (1.0 - 0.9f64.powi(step as i32), 1.0 - 0.999f64.powi(step as i32));
        for i in 0..500 {
            let gi = g[i] as f64;
            let mut pi = wp[i] as f64 * (1.0 - 1e-2 * 0.1);
            let mi = 0.9 * wm[i] as f64 + 0.1 * gi;
            let vi = 0.999 * wv[i] as f64 + 0.001 * gi * gi;
            pi -= 1e-2 * (mi / bc1) / ((vi / bc2).sqrt() + 1e-8);
            (wp[i], wm[i], wv[i]) = (pi as f32, mi as f32, vi as f32);
        }
    }
    check("adamw_step", &down(b, p.view()), &wp, 1e-5);
    check("adamw_m", &down(b, m.view()), &wm, 1e-6);
    check("adamw_v", &down(b, v.view()), &wv, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn axpby_is_the_cpu_arithmetic_to_the_bit() {
    // y = a x + b y as two products and one sum (no FMA): the schedulers' step_on
    // relies on it to match their host step.
    let b = cuda();
    let b = b.as_ref();
    let (x, y) = (random(4097, 17), random(4097, 18));
    let (a, c) = (0.123_456_79f32, -1.987_654_3f32);
    let xd = up(b, &[4097], &x);
    let mut yd = up(b, &[4097], &y);
    b.axpby(yd.view_mut(), a, xd.view(), c).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(&x, &y)| a * x + c * y).collect();
    let got = down(b, yd.view());
    assert!(
        got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
        "axpby bits"
    );
    println!("PARITY axpby 0 0");
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn conformance_suite_against_the_cpu_backend() {
    let b = cuda();
    let cpu = ecdit_backend_cpu::CpuBackend::new(1).unwrap();
    // Only the ops not yet on the GPU may fail, and only by saying so.
    let unexpected: Vec<String> = check_backend_ops(b.as_ref(), &cpu)
        .into_iter()
        .chain(check_backward_ops(b.as_ref()))
        .filter(|f| !f.contains("is not implemented on the CUDA backend yet"))
        .collect();
    for f in &unexpected {
        println!("FAILED {f}");
    }
    assert!(unexpected.is_empty(), "{} conformance failures", unexpected.len());
    println!("PARITY conformance_suite 0 -");
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn attention_with_and_without_probs_agree() {
    // Inference keeps no probabilities and must give the training path's output.
    let b = cuda();
    let b = b.as_ref();
    let dims = AttnDims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 9,
        kv_len: 11,
        head_dim: 8,
    };
    let (nq, nkv) = (2 * 9 * 4 * 8, 2 * 11 * 2 * 8);
    let (q, k, v) = (
        up(b, &[nq], &random(nq, 19)),
        up(b, &[nkv], &random(nkv, 20)),
        up(b, &[nkv], &random(nkv, 21)),
    );
    let mut mask = vec![1u8; 2 * 11];
    mask[3] = 0;
    let mask = b.upload_u8(&[2, 11], &mask).unwrap();
    let (mut out, mut probs, mut infer) = (
        b.zeros(&[nq], DType::F32).unwrap(),
        b.zeros(&[2 * 4 * 9 * 11], DType::F32).unwrap(),
        b.zeros(&[nq], DType::F32).unwrap(),
    );
    b.attention(
        out.view_mut(),
        Some(probs.view_mut()),
        q.view(),
        k.view(),
        v.view(),
        Some(mask.view()),
        dims,
    )
    .unwrap();
    b.attention(
        infer.view_mut(),
        None,
        q.view(),
        k.view(),
        v.view(),
        Some(mask.view()),
        dims,
    )
    .unwrap();
    check(
        "attention_inference",
        &down(b, infer.view()),
        &down(b, out.view()),
        1e-6,
    );
    // Masked key 3 of sample 0 gets no probability.
    let p = down(b, probs.view());
    assert!((0..4 * 9).all(|row| p[row * 11 + 3] == 0.0));
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn unimplemented_ops_say_so() {
    let b = cuda();
    let b = b.as_ref();
    let (mut o, x) = (b.zeros(&[1], DType::F32).unwrap(), b.zeros(&[1], DType::F32).unwrap());
    let e = b.router_softmax(o.view_mut(), x.view(), 1, 1).unwrap_err().to_string();
    assert!(
        e.contains("router_softmax is not implemented on the CUDA backend yet"),
        "{e}"
    );
    println!("PARITY not_implemented(router_softmax) - -");
}
