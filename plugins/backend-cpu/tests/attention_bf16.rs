//! The bf16 attention on oneDNN (`onednn/attention.rs`), which the CPU backend
//! runs when every tensor of an attention call is bf16 and oneDNN has bf16
//! kernels on this CPU:
//! - forward (out and the kept probabilities) and backward against an f64
//!   reference, each element within a bound derived from where it rounds:
//!   `2^-7` of the sum of absolute terms of its dot product (bf16 keeps 8
//!   bits; P or dS and the result are each rounded once, `2^-9` apiece);
//! - the same bits with and without kept probabilities, for a sample alone
//!   and inside a batch, and on 1 and 2 threads.
//!
//! Without oneDNN or its bf16 kernels (CPUs before AVX-512) these tests say so
//! and pass; `ECDIT_REQUIRE_ONEDNN=1` (CI, where the library is installed)
//! makes a missing library fail them. The f32 kernels' bf16 contract (the
//! f32 result rounded once) is tested in `bf16.rs` on a backend without
//! oneDNN.

mod common;

use common::{onednn_present, randv};
use ecdit_backend_cpu::onednn::OneDnnMode;
use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::dtype::bf16;
use ecdit_engine::{AttnDims, Backend, BackendExt, DType, GemmDims, Tensor};
use proptest::prelude::*;
use std::sync::OnceLock;

/// Backends with oneDNN on 1 and 2 threads, or `None` (after saying why)
/// when oneDNN or its bf16 kernels are missing here.
fn backends() -> Option<&'static [CpuBackend; 2]> {
    static B: OnceLock<Option<[CpuBackend; 2]>> = OnceLock::new();
    B.get_or_init(|| {
        if !onednn_present() {
            return None;
        }
        let make = |threads| CpuBackend::with_onednn(threads, OneDnnMode::Auto).expect("backend");
        let pair = [make(1), make(2)];
        let kernel = pair[1].gemm_kernel(GemmDims::nn(256, 384, 384), DType::BF16);
        if kernel == "gemm crate" {
            eprintln!("skipped, oneDNN has no bf16 kernel on this CPU");
            return None;
        }
        Some(pair)
    })
    .as_ref()
}

/// `n` values in `[-scale, scale)` that bf16 represents exactly.
fn exact(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    randv(seed, n, scale)
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect()
}

fn upload(be: &CpuBackend, data: &[f32]) -> Tensor {
    be.upload_f32(&[data.len()], data, DType::BF16).expect("upload")
}

fn read(be: &CpuBackend, t: &Tensor) -> Vec<f32> {
    be.read_f32(t.view()).expect("read")
}

/// One attention problem (bf16-exact inputs).
struct Case {
    d: AttnDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<u8>>,
    /// The backward's incoming gradient.
    dout: Vec<f32>,
}

impl Case {
    fn new(d: AttnDims, masked: bool, seed: u64) -> Self {
        let nq = d.batch * d.q_len * d.heads * d.head_dim;
        let nkv = d.batch * d.kv_len * d.kv_heads * d.head_dim;
        // Mask about a third of the keys; sometimes all of a sample's.
        let mask = masked.then(|| {
            randv(seed ^ 4, d.batch * d.kv_len, 1.0)
                .iter()
                .map(|&x| (x > -0.35) as u8)
                .collect()
        });
        Self {
            d,
            q: exact(seed, nq, 2.0),
            k: exact(seed ^ 1, nkv, 2.0),
            v: exact(seed ^ 2, nkv, 1.0),
            mask,
            dout: exact(seed ^ 3, nq, 1.0),
        }
    }
}

/// What the backend computes for a case: out and probs (training forward),
/// out without probs (inference), and dq, dk, dv from the kept probs.
struct Results {
    out: Vec<f32>,
    probs: Vec<f32>,
    lean: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn run(be: &CpuBackend, c: &Case) -> Results {
    let d = c.d;
    let (q, k, v) = (upload(be, &c.q), upload(be, &c.k), upload(be, &c.v));
    let mask = c.mask.as_ref().map(|m| be.upload_u8(&[m.len()], m).expect("mask"));
    let zeros = |n: usize| be.zeros(&[n], DType::BF16).expect("zeros");
    let (mut out, mut probs) = (zeros(c.q.len()), zeros(d.batch * d.heads * d.q_len * d.kv_len));
    let mut lean = zeros(c.q.len());
    let m = mask.as_ref().map(|m| m.view());
    be.attention(
        out.view_mut(),
        Some(probs.view_mut()),
        q.view(),
        k.view(),
        v.view(),
        m,
        d,
    )
    .expect("attention");
    let m = mask.as_ref().map(|m| m.view());
    be.attention(lean.view_mut(), None, q.view(), k.view(), v.view(), m, d)
        .expect("attention (no probs)");
    let dout = upload(be, &c.dout);
    let (mut dq, mut dk, mut dv) = (zeros(c.q.len()), zeros(c.k.len()), zeros(c.v.len()));
    be.attention_backward(
        dq.view_mut(),
        dk.view_mut(),
        dv.view_mut(),
        dout.view(),
        probs.view(),
        q.view(),
        k.view(),
        v.view(),
        d,
    )
    .expect("attention_backward");
    Results {
        out: read(be, &out),
        probs: read(be, &probs),
        lean: read(be, &lean),
        dq: read(be, &dq),
        dk: read(be, &dk),
        dv: read(be, &dv),
    }
}

/// An f64 value and the sum of absolute terms it was summed from.
#[derive(Clone, Copy, Default)]
struct Bounded {
    value: f64,
    terms: f64,
}

impl Bounded {
    fn add(&mut self, term: f64) {
        self.value += term;
        self.terms += term.abs();
    }
}

/// The f64 reference forward: probabilities `[B, H, Tq, Tk]` and out.
fn reference_forward(c: &Case) -> (Vec<f64>, Vec<Bounded>) {
    let d = c.d;
    let (tq, tk, dh, group) = (d.q_len, d.kv_len, d.head_dim, d.heads / d.kv_heads);
    let scale = 1.0 / (dh as f64).sqrt();
    let mut probs = vec![0.0f64; d.batch * d.heads * tq * tk];
    let mut out = vec![Bounded::default(); c.q.len()];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let hk = h / group;
            for t in 0..tq {
                let qi = |i: usize| c.q[((b * tq + t) * d.heads + h) * dh + i] as f64;
                let kv = |x: &[f32], s: usize, i: usize| x[((b * tk + s) * d.kv_heads + hk) * dh + i] as f64;
                let kept = |s: usize| c.mask.as_ref().is_none_or(|m| m[b * tk + s] != 0);
                let scores: Vec<f64> = (0..tk)
                    .map(|s| scale * (0..dh).map(|i| qi(i) * kv(&c.k, s, i)).sum::<f64>())
                    .collect();
                let max = (0..tk)
                    .filter(|&s| kept(s))
                    .map(|s| scores[s])
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..tk)
                    .map(|s| if kept(s) { (scores[s] - max).exp() } else { 0.0 })
                    .collect();
                let total: f64 = e.iter().sum();
                let p = &mut probs[((b * d.heads + h) * tq + t) * tk..][..tk];
                for s in 0..tk {
                    p[s] = if total > 0.0 { e[s] / total } else { 0.0 };
                }
                for i in 0..dh {
                    let o = &mut out[((b * tq + t) * d.heads + h) * dh + i];
                    (0..tk).for_each(|s| o.add(p[s] * kv(&c.v, s, i)));
                }
            }
        }
    }
    (probs, out)
}

/// The f64 reference backward from the given (bf16) probabilities: dq, dk, dv.
fn reference_backward(c: &Case, probs: &[f32]) -> [Vec<Bounded>; 3] {
    let d = c.d;
    let (tq, tk, dh, group) = (d.q_len, d.kv_len, d.head_dim, d.heads / d.kv_heads);
    let scale = 1.0 / (dh as f64).sqrt();
    let mut dq = vec![Bounded::default(); c.q.len()];
    let mut dk = vec![Bounded::default(); c.k.len()];
    let mut dv = vec![Bounded::default(); c.v.len()];
    let qi = |x: &[f32], b: usize, t: usize, h: usize, i: usize| x[((b * tq + t) * d.heads + h) * dh + i] as f64;
    let ki = |b: usize, s: usize, hk: usize, i: usize| ((b * tk + s) * d.kv_heads + hk) * dh + i;
    for b in 0..d.batch {
        for h in 0..d.heads {
            let hk = h / group;
            for t in 0..tq {
                let p = |s: usize| probs[((b * d.heads + h) * tq + t) * tk + s] as f64;
                let dp: Vec<f64> = (0..tk)
                    .map(|s| {
                        (0..dh)
                            .map(|i| qi(&c.dout, b, t, h, i) * c.v[ki(b, s, hk, i)] as f64)
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..tk).map(|s| dp[s] * p(s)).sum();
                for s in 0..tk {
                    let ds = p(s) * (dp[s] - dot);
                    for i in 0..dh {
                        dv[ki(b, s, hk, i)].add(p(s) * qi(&c.dout, b, t, h, i));
                        dq[((b * tq + t) * d.heads + h) * dh + i].add(scale * ds * c.k[ki(b, s, hk, i)] as f64);
                        dk[ki(b, s, hk, i)].add(scale * ds * qi(&c.q, b, t, h, i));
                    }
                }
            }
        }
    }
    [dq, dk, dv]
}

/// Each element within `2^-7` of its sum of absolute terms (plus `1e-4` for
/// the f32 accumulation of terms that cancel).
fn check_bounded(name: &str, got: &[f32], want: &[Bounded]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: length", name);
    for (i, (&g, w)) in got.iter().zip(want).enumerate() {
        let tol = w.terms / 128.0 + 1e-4;
        prop_assert!(
            (g as f64 - w.value).abs() <= tol,
            "{}[{}]: got {} want {} (tolerance {})",
            name,
            i,
            g,
            w.value,
            tol
        );
    }
    Ok(())
}

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let Some([one, two]) = backends() else {
        return Ok(());
    };
    let got = run(two, c);
    let (probs, out) = reference_forward(c);
    check_bounded("out", &got.out, &out)?;
    for (i, (&g, &w)) in got.probs.iter().zip(&probs).enumerate() {
        prop_assert!(
            (g as f64 - w).abs() <= w / 256.0 + 1e-6,
            "probs[{}]: got {} want {}",
            i,
            g,
            w
        );
    }
    let [dq, dk, dv] = reference_backward(c, &got.probs);
    check_bounded("dq", &got.dq, &dq)?;
    check_bounded("dk", &got.dk, &dk)?;
    check_bounded("dv", &got.dv, &dv)?;
    // The same bits without kept probabilities, and on one thread.
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    prop_assert!(bits(&got.lean) == bits(&got.out), "inference bits differ from training");
    let alone = run(one, c);
    for (name, a, b) in [
        ("out", &alone.out, &got.out),
        ("probs", &alone.probs, &got.probs),
        ("dq", &alone.dq, &got.dq),
        ("dk", &alone.dk, &got.dk),
        ("dv", &alone.dv, &got.dv),
    ] {
        prop_assert!(bits(a) == bits(b), "{} differs between 1 and 2 threads", name);
    }
    Ok(())
}

proptest! {
    #[test]
    fn matches_the_f64_reference_within_bf16_rounding(
        b in 1usize..3, hkv in 1usize..3, group in 1usize..3, tq in 1usize..40, tk in 1usize..40,
        dh in 1usize..20, masked: bool, seed: u64,
    ) {
        let d = AttnDims { batch: b, heads: hkv * group, kv_heads: hkv, q_len: tq, kv_len: tk, head_dim: dh };
        check_case(&Case::new(d, masked, seed))?;
    }
}

/// The DiT-S shape (6 heads of 64 over 256 tokens), where oneDNN runs its
/// matrix-engine kernels, and cross-attention over a masked text.
#[test]
fn dit_shapes_match_the_reference() {
    let self_attention = AttnDims {
        batch: 2,
        heads: 6,
        kv_heads: 6,
        q_len: 256,
        kv_len: 256,
        head_dim: 64,
    };
    check_case(&Case::new(self_attention, false, 7)).unwrap();
    let cross = AttnDims {
        kv_len: 24,
        ..self_attention
    };
    check_case(&Case::new(cross, true, 8)).unwrap();
}

/// A sample's results are the same bits alone and inside a batch.
#[test]
fn a_sample_has_the_same_bits_alone_and_in_a_batch() {
    let Some([_, be]) = backends() else {
        return;
    };
    let d = AttnDims {
        batch: 3,
        heads: 4,
        kv_heads: 2,
        q_len: 70,
        kv_len: 50,
        head_dim: 32,
    };
    let batch = Case::new(d, true, 11);
    let all = run(be, &batch);
    // Sample 1 of the batch on its own.
    let slice = |v: &[f32], per: usize| v[per..2 * per].to_vec();
    let (nq, nkv) = (d.q_len * d.heads * d.head_dim, d.kv_len * d.kv_heads * d.head_dim);
    let one = Case {
        d: AttnDims { batch: 1, ..d },
        q: slice(&batch.q, nq),
        k: slice(&batch.k, nkv),
        v: slice(&batch.v, nkv),
        mask: batch.mask.as_ref().map(|m| m[d.kv_len..2 * d.kv_len].to_vec()),
        dout: slice(&batch.dout, nq),
    };
    let alone = run(be, &one);
    let np = d.heads * d.q_len * d.kv_len;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&alone.out) == bits(&slice(&all.out, nq)), "out");
    assert!(bits(&alone.probs) == bits(&slice(&all.probs, np)), "probs");
    assert!(bits(&alone.dq) == bits(&slice(&all.dq, nq)), "dq");
    assert!(bits(&alone.dk) == bits(&slice(&all.dk, nkv)), "dk");
    assert!(bits(&alone.dv) == bits(&slice(&all.dv, nkv)), "dv");
}
