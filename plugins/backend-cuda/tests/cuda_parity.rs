//! GPU parity: every op of the `Backend` trait on the CUDA backend against the
//! CPU backend over the same inputs, with f32 and with bf16 storage, plus the
//! engine's op-conformance suite. Outputs that an op overwrites start as NaN
//! (poisoned), so an element the device never wrote shows up as NaN.
//!
//! Needs a CUDA driver, cuBLAS and NVRTC, so every test is `#[ignore]`d;
//! scripts/gpu-check.sh runs them with `--ignored --nocapture`. Each compared
//! output prints one line for its table:
//! `PARITY <op>/<output> <dtype> <max rel err> <tolerance> <elements whose bits differ>/<elements>`
//! with the error `|cuda - cpu| / max(|cpu|, 1)`. Tolerances: f32 1e-4, bf16 1e-2;
//! no NaN where the CPU has none.

use ecdit_backend_cuda::{register, CudaBackend};
use ecdit_engine::backend_kit::{check_backend_ops, check_backward_ops};
use ecdit_engine::{
    AdamW, AttnDims, Backend, BackendExt, DType, GemmDims, ModChunks, PatchDims, Registry, Result, RmsProp, RowDims,
    Tensor, Unary,
};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn cuda() -> Box<dyn Backend> {
    let mut reg = Registry::new();
    register(&mut reg).unwrap();
    reg.backend(&json!({"kind": "cuda"}))
        .expect("a CUDA backend on this machine")
}

fn cpu() -> ecdit_backend_cpu::CpuBackend {
    ecdit_backend_cpu::CpuBackend::new(2).unwrap()
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Named outputs of one case, read back as f32 (indices as f32).
type Outs = Vec<(String, Vec<f32>)>;

/// Builds a case's tensors on one backend with one storage dtype.
struct Io<'a> {
    b: &'a dyn Backend,
    dt: DType,
    outs: Outs,
}

impl<'a> Io<'a> {
    fn new(b: &'a dyn Backend, dt: DType) -> Self {
        Self {
            b,
            dt,
            outs: Vec::new(),
        }
    }
    /// Random values in [-scale, scale), stored in the case's dtype.
    fn inp(&self, dims: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
        self.inp_as(dims, seed, scale, self.dt)
    }
    fn inp_as(&self, dims: &[usize], seed: u64, scale: f32, dt: DType) -> Result<Tensor> {
        self.b.upload_f32(dims, &random(dims.iter().product(), seed, scale), dt)
    }
    /// An output the op overwrites: NaN everywhere first.
    fn poison(&self, dims: &[usize]) -> Result<Tensor> {
        self.poison_as(dims, self.dt)
    }
    fn poison_as(&self, dims: &[usize], dt: DType) -> Result<Tensor> {
        let mut t = self.b.zeros(dims, dt)?;
        self.b.fill(t.view_mut(), f32::NAN)?;
        Ok(t)
    }
    /// u32 indices poisoned with u32::MAX.
    fn poison_idx(&self, dims: &[usize]) -> Result<Tensor> {
        self.b.upload_u32(dims, &vec![u32::MAX; dims.iter().product()])
    }
    fn out(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let v = match t.dtype() {
            DType::U32 => self.b.read_u32(t.view())?.into_iter().map(|i| i as f32).collect(),
            _ => self.b.read_f32(t.view())?,
        };
        self.outs.push((name.to_string(), v));
        Ok(())
    }
}

struct Case {
    name: &'static str,
    /// Router math and optimiser state: f32 only (run once).
    f32_only: bool,
    run: fn(&mut Io<'_>) -> Result<()>,
}

fn tolerance(dt: DType) -> f32 {
    if dt == DType::BF16 {
        1e-2
    } else {
        1e-4
    }
}

/// Compares one case's outputs; returns the failures.
fn compare(case: &str, dt: DType, got: &Outs, want: &Outs) -> Vec<String> {
    let tol = tolerance(dt);
    let mut failures = Vec::new();
    if got.len() != want.len() {
        return vec![format!("{case} {dt}: {} outputs vs {}", got.len(), want.len())];
    }
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let op = format!("{case}/{name}");
        if g.len() != w.len() {
            failures.push(format!("{op} {dt}: {} values vs {}", g.len(), w.len()));
            continue;
        }
        let (mut worst, mut at, mut differ, mut nan_at) = (0.0f32, 0, 0usize, None);
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            if a.to_bits() != b.to_bits() {
                differ += 1;
            }
            if a.is_nan() != b.is_nan() {
                nan_at.get_or_insert(i);
                continue;
            }
            let err = if a.is_nan() {
                0.0
            } else {
                (a - b).abs() / b.abs().max(1.0)
            };
            if err > worst {
                (worst, at) = (err, i);
            }
        }
        println!("PARITY {op} {dt} {worst:.2e} {tol:.0e} {differ}/{}", g.len());
        if let Some(i) = nan_at {
            failures.push(format!("{op} {dt}: NaN mismatch at {i}: cuda {} cpu {}", g[i], w[i]));
        }
        if worst > tol || worst.is_nan() {
            failures.push(format!(
                "{op} {dt}: error {worst:.3e} > {tol:.0e} at {at}: cuda {} cpu {}",
                g[at], w[at]
            ));
        }
    }
    failures
}

/// Runs `cases` on the CUDA and the CPU backend with both storage dtypes.
fn run_cases(cases: &[Case]) {
    let (gpu, host) = (cuda(), cpu());
    let mut failures = Vec::new();
    for case in cases {
        let dts: &[DType] = if case.f32_only {
            &[DType::F32]
        } else {
            &[DType::F32, DType::BF16]
        };
        for &dt in dts {
            let mut a = Io::new(gpu.as_ref(), dt);
            let mut b = Io::new(&host, dt);
            match ((case.run)(&mut a), (case.run)(&mut b)) {
                (Ok(()), Ok(())) => failures.extend(compare(case.name, dt, &a.outs, &b.outs)),
                (Err(e), _) => failures.push(format!("{} {dt} on cuda: {e}", case.name)),
                (_, Err(e)) => failures.push(format!("{} {dt} on cpu: {e}", case.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const MOD6: ModChunks = ModChunks {
    chunks: 6,
    first: 0,
    second: 1,
};
const GATE6: ModChunks = ModChunks {
    chunks: 6,
    first: 2,
    second: 2,
};
const ROWS: RowDims = RowDims {
    batch: 3,
    tokens: 37,
    d: 72,
};

fn products() -> Vec<Case> {
    vec![
        Case {
            name: "gemm",
            f32_only: false,
            run: |io| {
                let (m, n, k) = (67, 133, 91);
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let dims = GemmDims {
                        m,
                        n,
                        k,
                        trans_a: ta,
                        trans_b: tb,
                    };
                    let (a, w, bias) = (
                        io.inp(&[m * k], 1, 1.0)?,
                        io.inp(&[k * n], 2, 1.0)?,
                        io.inp(&[n], 3, 1.0)?,
                    );
                    let mut out = io.poison(&[m, n])?;
                    io.b.gemm(out.view_mut(), a.view(), w.view(), Some(bias.view()), dims, 0.75, 0.0)?;
                    io.out(
                        &format!("{}{}+bias", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' }),
                        &out,
                    )?;
                    let mut acc = io.inp(&[m, n], 4, 1.0)?;
                    io.b.gemm(acc.view_mut(), a.view(), w.view(), None, dims, -1.25, 0.5)?;
                    io.out(
                        &format!("{}{}_beta", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' }),
                        &acc,
                    )?;
                }
                // Mixed storage: bf16 activations with f32 weights (f32 out), and f32 x f32 into bf16.
                let a16 = io.inp_as(&[m, k], 5, 1.0, DType::BF16)?;
                let w32 = io.inp_as(&[n, k], 6, 1.0, DType::F32)?;
                let mut o32 = io.poison_as(&[m, n], DType::F32)?;
                io.b.gemm(
                    o32.view_mut(),
                    a16.view(),
                    w32.view(),
                    None,
                    GemmDims::nt(m, n, k),
                    1.0,
                    0.0,
                )?;
                io.out("mixed_bf16xf32", &o32)?;
                let a32 = io.inp_as(&[m, k], 7, 1.0, DType::F32)?;
                let mut o16 = io.inp_as(&[m, n], 8, 1.0, DType::BF16)?;
                io.b.gemm(
                    o16.view_mut(),
                    a32.view(),
                    w32.view(),
                    None,
                    GemmDims::nt(m, n, k),
                    1.0,
                    1.0,
                )?;
                io.out("mixed_f32_into_bf16", &o16)?;
                // An empty contraction: beta = 0 overwrites the poison.
                let (e1, e2) = (io.inp(&[0], 9, 1.0)?, io.inp(&[0], 9, 1.0)?);
                let mut z = io.poison(&[5, 4])?;
                io.b.gemm(
                    z.view_mut(),
                    e1.view(),
                    e2.view(),
                    None,
                    GemmDims::nn(5, 4, 0),
                    1.0,
                    0.0,
                )?;
                io.out("k0", &z)
            },
        },
        Case {
            name: "gemm_batched",
            f32_only: false,
            run: |io| {
                let (batch, m, n, k) = (3, 33, 40, 29);
                let (a, w) = (io.inp(&[batch * m * k], 1, 1.0)?, io.inp(&[batch * n * k], 2, 1.0)?);
                let mut out = io.poison(&[batch * m * n])?;
                io.b.gemm_batched(
                    out.view_mut(),
                    a.view(),
                    w.view(),
                    batch,
                    GemmDims::nt(m, n, k),
                    1.0,
                    0.0,
                )?;
                io.out("out", &out)
            },
        },
        Case {
            name: "gemm_grouped",
            f32_only: false,
            run: |io| {
                let rows = [5, 0, 17, 3];
                let (n, k) = (24, 19);
                let a = io.inp(&[25, k], 1, 1.0)?;
                for tb in [true, false] {
                    let w = io.inp(&[4, n, k], 2, 1.0)?;
                    let mut out = io.poison(&[25, n])?;
                    io.b.gemm_grouped(out.view_mut(), a.view(), w.view(), &rows, n, k, tb, 1.0, 0.0)?;
                    io.out(if tb { "trans_b" } else { "plain" }, &out)?;
                }
                Ok(())
            },
        },
    ]
}

fn elementwise() -> Vec<Case> {
    vec![
        Case {
            name: "memory",
            f32_only: false,
            run: |io| {
                let x = io.inp(&[1001], 1, 3.0)?;
                let mut c = io.poison(&[1001])?;
                io.b.copy(c.view_mut(), x.view())?;
                io.out("copy", &c)?;
                // Conversions both ways.
                let mut other = io.poison_as(&[1001], if io.dt == DType::F32 { DType::BF16 } else { DType::F32 })?;
                io.b.copy(other.view_mut(), x.view())?;
                io.out("copy_convert", &other)?;
                io.b.fill(c.view_mut().flat(100, 300)?, -2.5)?;
                io.out("fill", &c)
            },
        },
        Case {
            name: "add_broadcast, axpby",
            f32_only: false,
            run: |io| {
                let (mut x, row) = (io.inp(&[37, 129], 1, 1.0)?, io.inp(&[129], 2, 1.0)?);
                io.b.add_broadcast(x.view_mut(), row.view())?;
                io.out("add_broadcast", &x)?;
                let y = io.inp(&[37, 129], 3, 1.0)?;
                io.b.axpby(x.view_mut(), 0.123_456_79, y.view(), -1.987_654_3)?;
                io.out("axpby", &x)
            },
        },
        Case {
            name: "unary",
            f32_only: false,
            run: |io| {
                let (x, dout) = (io.inp(&[3001], 1, 8.0)?, io.inp(&[3001], 2, 1.0)?);
                for (op, name) in [(Unary::GeluTanh, "gelu"), (Unary::Silu, "silu")] {
                    let (mut y, mut dx) = (io.poison(&[3001])?, io.poison(&[3001])?);
                    io.b.unary(op, y.view_mut(), x.view())?;
                    io.b.unary_backward(op, dx.view_mut(), dout.view(), x.view())?;
                    io.out(name, &y)?;
                    io.out(&format!("{name}_backward"), &dx)?;
                }
                Ok(())
            },
        },
        Case {
            name: "adamw_step",
            f32_only: true,
            run: |io| {
                let hp = AdamW {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                };
                let (mut p, g) = (io.inp(&[5003], 1, 1.0)?, io.inp(&[5003], 2, 1.0)?);
                let (mut m, mut v) = (io.b.zeros(&[5003], DType::F32)?, io.b.zeros(&[5003], DType::F32)?);
                for step in 1..=3 {
                    io.b.adamw_step(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), hp, step)?;
                }
                io.out("param", &p)?;
                io.out("m", &m)?;
                io.out("v", &v)
            },
        },
        Case {
            name: "rmsprop_step",
            f32_only: true,
            run: |io| {
                let hp = RmsProp {
                    lr: 1e-2,
                    alpha: 0.99,
                    eps: 1e-8,
                    momentum: 0.9,
                    weight_decay: 0.1,
                };
                let mut p = io.inp(&[5003], 1, 1.0)?;
                let (mut v, mut buf) = (io.b.zeros(&[5003], DType::F32)?, io.b.zeros(&[5003], DType::F32)?);
                for s in 0..3 {
                    let g = io.inp(&[5003], 2 + s, 1.0)?;
                    io.b.rmsprop_step(p.view_mut(), g.view(), v.view_mut(), buf.view_mut(), hp)?;
                }
                io.out("param", &p)?;
                io.out("v", &v)?;
                io.out("buf", &buf)
            },
        },
    ]
}

fn rows() -> Vec<Case> {
    vec![
        Case {
            name: "sum_rows",
            f32_only: false,
            run: |io| {
                let x = io.inp(&[301, 77], 1, 1.0)?;
                let mut fresh = io.poison(&[77])?;
                io.b.sum_rows(fresh.view_mut(), x.view(), 301, 77, false)?;
                io.out("overwrite", &fresh)?;
                let mut acc = io.inp(&[77], 2, 1.0)?;
                io.b.sum_rows(acc.view_mut(), x.view(), 301, 77, true)?;
                io.out("accumulate", &acc)
            },
        },
        Case {
            name: "softmax_rows",
            f32_only: false,
            run: |io| {
                for cols in [7usize, 33, 1155] {
                    let (x, dout) = (io.inp(&[45, cols], 1, 6.0)?, io.inp(&[45, cols], 2, 1.0)?);
                    let (mut p, mut dx) = (io.poison(&[45, cols])?, io.poison(&[45, cols])?);
                    io.b.softmax_rows(p.view_mut(), x.view(), 45, cols)?;
                    io.b.softmax_rows_backward(dx.view_mut(), dout.view(), p.view(), 45, cols)?;
                    io.out(&format!("probs{cols}"), &p)?;
                    io.out(&format!("backward{cols}"), &dx)?;
                }
                Ok(())
            },
        },
        Case {
            name: "layer_norm",
            f32_only: false,
            run: |io| {
                let (rows, cols) = (203, 1152 + 5);
                let (x, w, bias, dout) = (
                    io.inp(&[rows, cols], 1, 3.0)?,
                    io.inp(&[cols], 2, 1.0)?,
                    io.inp(&[cols], 3, 1.0)?,
                    io.inp(&[rows, cols], 4, 1.0)?,
                );
                let mut out = io.poison(&[rows, cols])?;
                let (mut mean, mut rstd) = (io.poison(&[rows])?, io.poison(&[rows])?);
                io.b.layer_norm(
                    out.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x.view(),
                    Some(w.view()),
                    Some(bias.view()),
                    rows,
                    cols,
                    1e-6,
                )?;
                io.out("out", &out)?;
                io.out("mean", &mean)?;
                io.out("rstd", &rstd)?;
                let mut plain = io.poison(&[rows, cols])?;
                io.b.layer_norm(
                    plain.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x.view(),
                    None,
                    None,
                    rows,
                    cols,
                    1e-6,
                )?;
                io.out("no_affine", &plain)?;
                let mut dx = io.poison(&[rows, cols])?;
                let (mut dw, mut db) = (io.inp(&[cols], 5, 1.0)?, io.inp(&[cols], 6, 1.0)?);
                io.b.layer_norm_backward(
                    dx.view_mut(),
                    Some(dw.view_mut()),
                    Some(db.view_mut()),
                    dout.view(),
                    x.view(),
                    mean.view(),
                    rstd.view(),
                    Some(w.view()),
                    rows,
                    cols,
                )?;
                io.out("dinp", &dx)?;
                io.out("dweight", &dw)?;
                io.out("dbias", &db)
            },
        },
        Case {
            name: "routing",
            f32_only: true,
            run: |io| {
                // Two routing groups of 64 tokens, 8 experts, capacity 16.
                let (rows, e) = (128, 8);
                let scores = io.inp(&[rows, e], 1, 4.0)?;
                let mut probs = io.poison(&[rows, e])?;
                io.b.router_softmax(probs.view_mut(), scores.view(), rows, e)?;
                io.out("router_softmax", &probs)?;
                let (mut ti, mut tv) = (io.poison_idx(&[e, 2, 16])?, io.poison(&[e, 2, 16])?);
                io.b.top_k_tokens(ti.view_mut(), tv.view_mut(), probs.view(), 2, 64, e, 16)?;
                io.out("top_k_tokens_idx", &ti)?;
                io.out("top_k_tokens_val", &tv)
            },
        },
        Case {
            name: "top_k_rows",
            f32_only: false,
            run: |io| {
                let x = io.inp(&[77, 40], 1, 1.0)?;
                let (mut idx, mut val) = (io.poison_idx(&[77, 5])?, io.poison(&[77, 5])?);
                io.b.top_k_rows(idx.view_mut(), val.view_mut(), x.view(), 77, 40, 5)?;
                io.out("idx", &idx)?;
                io.out("val", &val)
            },
        },
    ]
}

fn adaln_embed() -> Vec<Case> {
    vec![
        Case {
            name: "adaln",
            f32_only: false,
            run: |io| {
                let RowDims { batch, tokens, d } = ROWS;
                let act = [batch, tokens, d];
                let (x, m, y, dout) = (
                    io.inp(&act, 1, 1.0)?,
                    io.inp(&[batch, 6 * d], 2, 1.0)?,
                    io.inp(&act, 3, 1.0)?,
                    io.inp(&act, 4, 1.0)?,
                );
                let mut out = io.poison(&act)?;
                io.b.modulate(out.view_mut(), x.view(), m.view(), MOD6, ROWS)?;
                io.out("modulate", &out)?;
                let (mut dx, mut dm) = (io.poison(&act)?, io.inp(&[batch, 6 * d], 5, 1.0)?);
                io.b.modulate_backward(
                    dx.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    x.view(),
                    m.view(),
                    MOD6,
                    ROWS,
                )?;
                io.out("modulate_dinp", &dx)?;
                let mut res = io.inp(&act, 6, 1.0)?;
                io.b.gated_residual(res.view_mut(), y.view(), m.view(), GATE6, ROWS)?;
                io.out("gated_residual", &res)?;
                let mut dy = io.poison(&act)?;
                io.b.gated_residual_backward(
                    dy.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    y.view(),
                    m.view(),
                    GATE6,
                    ROWS,
                )?;
                io.out("gated_residual_dy", &dy)?;
                io.out("dmodulation", &dm)
            },
        },
        Case {
            name: "patch",
            f32_only: false,
            run: |io| {
                for cf in [false, true] {
                    let p = PatchDims {
                        batch: 2,
                        channels: 3,
                        height: 12,
                        width: 8,
                        patch: 2,
                        channels_fastest: cf,
                    };
                    let img = io.inp(&[2, 3, 12, 8], 1, 1.0)?;
                    let mut rows = io.poison(&[2, 24, 12])?;
                    io.b.patchify(rows.view_mut(), img.view(), p)?;
                    let mut back = io.poison(&[2, 3, 12, 8])?;
                    io.b.unpatchify(back.view_mut(), rows.view(), p)?;
                    io.out(&format!("patchify_cf{cf}"), &rows)?;
                    io.out(&format!("unpatchify_cf{cf}"), &back)?;
                }
                Ok(())
            },
        },
        Case {
            name: "timestep_features",
            f32_only: false,
            run: |io| {
                let t = io.b.upload_f32(&[4], &[0.0, 17.0, 999.0, 0.37], io.dt)?;
                for dim in [256usize, 33] {
                    let mut out = io.poison(&[4, dim])?;
                    io.b.timestep_features(out.view_mut(), t.view(), dim, 10000.0)?;
                    io.out(&format!("dim{dim}"), &out)?;
                }
                Ok(())
            },
        },
    ]
}

fn attention_case(io: &mut Io<'_>, a: AttnDims, tag: &str) -> Result<()> {
    let qd = [a.batch, a.q_len, a.heads, a.head_dim];
    let kd = [a.batch, a.kv_len, a.kv_heads, a.head_dim];
    let (q, k, v, dout) = (
        io.inp(&qd, 1, 1.0)?,
        io.inp(&kd, 2, 1.0)?,
        io.inp(&kd, 3, 1.0)?,
        io.inp(&qd, 4, 1.0)?,
    );
    // Sample 0 attends to every key but its last three; sample 1 to none.
    let mut mask = vec![1u8; a.batch * a.kv_len];
    mask[a.kv_len - 3..a.kv_len].fill(0);
    if a.batch > 1 {
        mask[a.kv_len..2 * a.kv_len].fill(0);
    }
    let mask = io.b.upload_u8(&[a.batch, a.kv_len], &mask)?;
    let (mut out, mut lean, mut plain) = (io.poison(&qd)?, io.poison(&qd)?, io.poison(&qd)?);
    let mut probs = io.poison(&[a.batch, a.heads, a.q_len, a.kv_len])?;
    io.b.attention(
        out.view_mut(),
        Some(probs.view_mut()),
        q.view(),
        k.view(),
        v.view(),
        Some(mask.view()),
        a,
    )?;
    io.b.attention(
        lean.view_mut(),
        None,
        q.view(),
        k.view(),
        v.view(),
        Some(mask.view()),
        a,
    )?;
    io.b.attention(plain.view_mut(), None, q.view(), k.view(), v.view(), None, a)?;
    let (mut dq, mut dk, mut dv) = (io.poison(&qd)?, io.poison(&kd)?, io.poison(&kd)?);
    io.b.attention_backward(
        dq.view_mut(),
        dk.view_mut(),
        dv.view_mut(),
        dout.view(),
        probs.view(),
        q.view(),
        k.view(),
        v.view(),
        a,
    )?;
    for (name, t) in [
        ("out", &out),
        ("probs", &probs),
        ("inference", &lean),
        ("inference_nomask", &plain),
        ("dq", &dq),
        ("dk", &dk),
        ("dv", &dv),
    ] {
        io.out(&format!("{tag}_{name}"), t)?;
    }
    Ok(())
}

fn attention() -> Vec<Case> {
    vec![Case {
        name: "attention",
        f32_only: false,
        run: |io| {
            let gqa = AttnDims {
                batch: 2,
                heads: 6,
                kv_heads: 2,
                q_len: 37,
                kv_len: 45,
                head_dim: 40,
            };
            attention_case(io, gqa, "gqa")?;
            // DiT-XL's head dim (72: lanes with 3 channels, the last partly idle).
            let xl = AttnDims {
                batch: 1,
                heads: 4,
                kv_heads: 4,
                q_len: 70,
                kv_len: 70,
                head_dim: 72,
            };
            attention_case(io, xl, "dh72")?;
            // Beyond the fused kernel's head dim: inference through scratch probabilities.
            let wide = AttnDims {
                batch: 1,
                heads: 2,
                kv_heads: 1,
                q_len: 5,
                kv_len: 9,
                head_dim: 300,
            };
            attention_case(io, wide, "dh300")
        },
    }]
}

fn gather() -> Vec<Case> {
    vec![Case {
        name: "gather_scatter",
        f32_only: false,
        run: |io| {
            let (rows, cols, n) = (40, 67, 300);
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            // Repeated indices, some rows never hit.
            let idx: Vec<u32> = (0..n).map(|_| rng.gen_range(0..rows as u32 - 5)).collect();
            let idx_t = io.b.upload_u32(&[n], &idx)?;
            let x = io.inp(&[rows, cols], 1, 1.0)?;
            let mut g = io.poison(&[n, cols])?;
            io.b.gather_rows(g.view_mut(), x.view(), idx_t.view(), cols)?;
            io.out("gather_rows", &g)?;
            let (ys, gates) = (io.inp(&[n, cols], 2, 1.0)?, io.inp(&[n], 3, 1.0)?);
            let mut sc = io.inp(&[rows, cols], 4, 1.0)?;
            io.b.scatter_add_rows(sc.view_mut(), ys.view(), idx_t.view(), Some(gates.view()), cols)?;
            io.out("scatter_add_scaled", &sc)?;
            io.b.scatter_add_rows(sc.view_mut(), ys.view(), idx_t.view(), None, cols)?;
            io.out("scatter_add", &sc)?;
            let mut dots = io.poison(&[n])?;
            io.b.gather_dot(dots.view_mut(), x.view(), idx_t.view(), ys.view(), cols)?;
            io.out("gather_dot", &dots)
        },
    }]
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn products_match_the_cpu() {
    run_cases(&products());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn elementwise_and_optimiser_ops_match_the_cpu() {
    run_cases(&elementwise());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn row_and_routing_ops_match_the_cpu() {
    run_cases(&rows());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn adaln_and_embedding_ops_match_the_cpu() {
    run_cases(&adaln_embed());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn attention_matches_the_cpu() {
    run_cases(&attention());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn gather_and_scatter_match_the_cpu() {
    run_cases(&gather());
}

/// What the engine relies on to the bit: routing (so device and host routers
/// agree), axpby (the schedulers' step_on), the element-wise and adaLN ops,
/// layer norm, softmax, the optimisers, gather/scatter.
#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn ops_promised_bit_exact_are() {
    let (gpu, host) = (cuda(), cpu());
    let exact: Vec<Case> = [rows(), elementwise(), gather()]
        .into_iter()
        .flatten()
        .chain(adaln_embed().into_iter().filter(|c| c.name != "timestep_features"))
        .collect();
    let mut failures = Vec::new();
    for case in &exact {
        let (mut a, mut b) = (Io::new(gpu.as_ref(), DType::F32), Io::new(&host, DType::F32));
        (case.run)(&mut a).unwrap();
        (case.run)(&mut b).unwrap();
        for ((name, g), (_, w)) in a.outs.iter().zip(&b.outs) {
            let differ = g.iter().zip(w).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            if differ > 0 {
                failures.push(format!("{}/{name}: {differ} of {} elements differ", case.name, g.len()));
            }
        }
    }
    println!("PARITY bit_exact_ops f32 {} 0 -", failures.len());
    assert!(failures.is_empty(), "not bit-exact:\n{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn conformance_suite_against_the_cpu_backend() {
    let b = cuda();
    let cpu = cpu();
    let failures: Vec<String> = check_backend_ops(b.as_ref(), &cpu)
        .into_iter()
        .chain(check_backward_ops(b.as_ref()))
        .collect();
    for f in &failures {
        println!("FAILED {f}");
    }
    println!("PARITY conformance_suite - {} 0 -", failures.len());
    assert!(failures.is_empty(), "{} conformance failures", failures.len());
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn buffers_are_device_memory_and_bf16_is_supported() {
    let b = cuda();
    let b = b.as_ref();
    assert!(b.supports(DType::BF16) && b.supports(DType::F32));
    let data = random(1000, 0, 2.0);
    let t = b.upload_f32(&[10, 100], &data, DType::F32).unwrap();
    assert!(!t.buffer().is_host(), "cuda buffers must not be host memory");
    assert!(t.view().host::<f32>().is_err());
    assert_eq!(b.read_f32(t.view().rows(3, 2).unwrap()).unwrap(), data[300..500]);
    // The factory takes dtype bf16 now.
    let mut reg = Registry::new();
    register(&mut reg).unwrap();
    reg.backend(&json!({"kind": "cuda", "dtype": "bf16", "tf32": true}))
        .expect("bf16 + tf32 backend");
    println!("PARITY device_memory - 0 0 -");
}

/// A bad row index is skipped on the device (nothing read or written through
/// it), and the next download says which op met it; later downloads are clean.
#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn a_bad_index_is_reported_at_the_next_download() {
    let b = CudaBackend::new(0, false).unwrap();
    let inp = b.upload_f32(&[10, 4], &random(40, 1, 1.0), DType::F32).unwrap();
    let bad = b.upload_u32(&[3], &[2, 10, 7]).unwrap();
    let mut out = b.zeros(&[3, 4], DType::F32).unwrap();
    b.gather_rows(out.view_mut(), inp.view(), bad.view(), 4).unwrap();
    let e = b.read_f32(out.view()).unwrap_err().to_string();
    assert!(e.contains("gather_rows") && e.contains("largest: 10"), "{e}");
    let got = b.read_f32(out.view()).expect("the flag is cleared");
    assert_eq!(&got[4..8], &[0.0; 4], "the bad row reads as zeros");
    let mut sc = b.zeros(&[10, 4], DType::F32).unwrap();
    b.scatter_add_rows(sc.view_mut(), out.view(), bad.view(), None, 4)
        .unwrap();
    let e = b.synchronize().unwrap_err().to_string();
    assert!(e.contains("scatter_add_rows"), "{e}");
    b.synchronize().unwrap();
    println!("PARITY bad_index_status - 0 0 -");
}

// The engine's conformance tests, stamped out for this backend: with
// `--features gpu-tests` they run as ordinary tests (a GPU machine's CI).
#[cfg(feature = "gpu-tests")]
ecdit_engine::backend_conformance!(
    cuda_conformance,
    std::sync::Arc::new(ecdit_backend_cuda::CudaBackend::new(0, false).unwrap()),
    std::sync::Arc::new(ecdit_backend_cpu::CpuBackend::new(1).unwrap())
);
