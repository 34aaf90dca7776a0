//! GPU parity: every implemented op against a plain host reference, and the
//! unimplemented ones must say so. Needs a CUDA driver, cuBLAS and NVRTC, so every
//! test is `#[ignore]`d; scripts/gpu-check.sh runs them with `--ignored --nocapture`.
//! Each check prints one `PARITY <op> <max abs error> <tolerance>` line for its table.

use ecdit_backend_cuda::register;
use ecdit_engine::{AdamW, AttnDims, Backend, GemmDims, Registry, Unary};
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
fn gemm_matches_the_host_for_every_layout() {
    let b = cuda();
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
        let mut got = c0.clone();
        b.gemm(&mut got, &a, &bm, dims, 0.7, 0.3).unwrap();
        check(
            &format!("gemm_{}{}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' }),
            &got,
            &want,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gemm_batched_is_gemm_per_block() {
    let b = cuda();
    let (batch, m, n, k) = (3, 8, 6, 5);
    let dims = GemmDims::nt(m, n, k);
    let (a, bm) = (random(batch * m * k, 4), random(batch * n * k, 5));
    let mut want = vec![0.0; batch * m * n];
    for p in 0..batch {
        b.gemm(
            &mut want[p * m * n..(p + 1) * m * n],
            &a[p * m * k..(p + 1) * m * k],
            &bm[p * n * k..(p + 1) * n * k],
            dims,
            1.0,
            0.0,
        )
        .unwrap();
    }
    let mut got = vec![f32::NAN; batch * m * n]; // beta = 0 must overwrite, NaN or not
    b.gemm_batched(&mut got, &a, &bm, batch, dims, 1.0, 0.0).unwrap();
    check("gemm_batched", &got, &want, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn bias_and_column_sums() {
    let b = cuda();
    let (rows, cols) = (300, 70);
    let (inp, bias) = (random(rows * cols, 6), random(cols, 7));
    let mut got = inp.clone();
    b.add_bias(&mut got, &bias, rows, cols).unwrap();
    let want: Vec<f32> = inp.iter().enumerate().map(|(i, x)| x + bias[i % cols]).collect();
    check("add_bias", &got, &want, 0.0);

    let mut sums: Vec<f32> = vec![1.0; cols];
    b.sum_rows(&mut sums, &inp, rows, cols, true).unwrap();
    let want: Vec<f32> = (0..cols)
        .map(|c| 1.0 + (0..rows).map(|r| inp[r * cols + c] as f64).sum::<f64>() as f32)
        .collect();
    check("sum_rows", &sums, &want, 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn softmax_and_its_backward() {
    let b = cuda();
    let (rows, cols) = (129, 33);
    let inp: Vec<f32> = random(rows * cols, 8).iter().map(|x| 5.0 * x).collect();
    let mut out = vec![0.0; rows * cols];
    b.softmax_rows(&mut out, &inp, rows, cols).unwrap();
    let mut want = vec![0.0; rows * cols];
    for r in 0..rows {
        let row = &inp[r * cols..(r + 1) * cols];
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - mx).exp()).sum();
        for c in 0..cols {
            want[r * cols + c] = ((row[c] as f64 - mx).exp() / z) as f32;
        }
    }
    check("softmax_rows", &out, &want, 1e-6);

    let dout = random(rows * cols, 9);
    let mut dinp = vec![0.0; rows * cols];
    b.softmax_rows_backward(&mut dinp, &dout, &want, rows, cols).unwrap();
    let mut want_d = vec![0.0; rows * cols];
    for r in 0..rows {
        let s = r * cols;
        let dot: f64 = (0..cols).map(|c| dout[s + c] as f64 * want[s + c] as f64).sum();
        for c in 0..cols {
            want_d[s + c] = (want[s + c] as f64 * (dout[s + c] as f64 - dot)) as f32;
        }
    }
    check("softmax_rows_backward", &dinp, &want_d, 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn activations_and_their_derivatives() {
    let b = cuda();
    let inp: Vec<f32> = random(1000, 10).iter().map(|x| 3.0 * x).collect();
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let dout = random(1000, 11);
    for (op, f, name) in [
        (Unary::GeluTanh, &gelu as &dyn Fn(f64) -> f64, "gelu_tanh"),
        (Unary::Silu, &silu, "silu"),
    ] {
        let mut out = vec![0.0; inp.len()];
        b.unary(op, &mut out, &inp).unwrap();
        let want: Vec<f32> = inp.iter().map(|&x| f(x as f64) as f32).collect();
        check(name, &out, &want, 1e-5);
        // Backward against a central difference of the f64 forward.
        let mut dinp = vec![0.0; inp.len()];
        b.unary_backward(op, &mut dinp, &dout, &inp).unwrap();
        let h = 1e-5;
        let want: Vec<f32> = inp
            .iter()
            .zip(&dout)
            .map(|(&x, &d)| (d as f64 * (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h)) as f32)
            .collect();
        check(&format!("{name}_backward"), &dinp, &want, 1e-4);
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gather_and_scatter_add_with_repeats() {
    let b = cuda();
    let (rows, cols) = (10, 7);
    let inp = random(rows * cols, 12);
    let idx: Vec<u32> = vec![3, 3, 0, 9, 5, 3];
    let mut got = vec![0.0; idx.len() * cols];
    b.gather_rows(&mut got, &inp, &idx, cols).unwrap();
    let want: Vec<f32> = idx
        .iter()
        .flat_map(|&i| inp[i as usize * cols..(i as usize + 1) * cols].to_vec())
        .collect();
    check("gather_rows", &got, &want, 0.0);

    let scale = random(idx.len(), 13);
    let mut out = random(rows * cols, 14);
    let mut want = out.clone();
    for (i, &r) in idx.iter().enumerate() {
        for c in 0..cols {
            want[r as usize * cols + c] += scale[i] * got[i * cols + c];
        }
    }
    b.scatter_add_rows(&mut out, &got, &idx, Some(&scale), cols).unwrap();
    check("scatter_add_rows", &out, &want, 1e-6);
    let e = b
        .gather_rows(&mut got, &inp, &[10, 0, 0, 0, 0, 0], cols)
        .unwrap_err()
        .to_string();
    assert!(e.contains("idx[0]") && e.contains("< 10"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn adamw_matches_pytorch_semantics() {
    let b = cuda();
    let hp = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (mut p, g) = (random(500, 15), random(500, 16));
    let (mut m, mut v) = (vec![0.0f32; 500], vec![0.0f32; 500]);
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    for step in 1..=3u64 {
        b.adamw_step(&mut p, &g, &mut m, &mut v, hp, step).unwrap();
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
    check("adamw_step", &p, &wp, 1e-5);
    check("adamw_m", &m, &wm, 1e-6);
    check("adamw_v", &v, &wv, 1e-6);
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn unimplemented_ops_say_so() {
    let b = cuda();
    let (mut o, mut m, mut r) = (vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
    let e = b
        .layer_norm(&mut o, &mut m, &mut r, &[0.0; 4], None, None, 2, 2, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer_norm not yet implemented on cuda"), "{e}");
    let dims = AttnDims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        q_len: 1,
        kv_len: 1,
        head_dim: 1,
    };
    let e = b
        .attention(&mut [0.0], &mut [0.0], &[0.0], &[0.0], &[0.0], None, dims)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention not yet implemented on cuda"), "{e}");
    let e = b
        .top_k_rows(&mut [0], &mut [0.0], &[0.0], 1, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_k_rows not yet implemented on cuda"), "{e}");
    println!("PARITY not_implemented(layer_norm,attention,top_k_rows) - -");
}
