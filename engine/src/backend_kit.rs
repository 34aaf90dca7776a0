//! The op-conformance suite for backends (ggml's `test-backend-ops`): every op
//! of the [`Backend`] trait runs on the backend under test and on a reference
//! backend over the same random inputs, and must agree within the op's
//! tolerance; every backward op must also agree with central finite
//! differences of its forward on the backend under test.
//!
//! Exported (feature `backend-kit`) so that third-party backends run the same
//! suite: `check_backend_ops(&mine, &ecdit_backend_cpu::CpuBackend::new(1)?)`.

use crate::backend::{AdamW, AttnDims, Backend, GemmDims, ModChunks, PatchDims, RowDims, Unary};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;
use crate::transfer::BackendExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every output of an op case, read back to the host as f32 (indices as f32).
type Outputs = Result<Vec<Vec<f32>>>;

/// One op case: builds its inputs from a seed, runs on a backend, returns
/// every output as host f32 (indices as f32).
struct OpCase {
    name: &'static str,
    /// Allowed `|got - want| <= tol * (1 + |want|)` against the reference.
    tol: f32,
    run: fn(&dyn Backend, u64) -> Outputs,
}

fn randv(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn up(b: &dyn Backend, dims: &[usize], seed: u64) -> Result<Tensor> {
    let n = dims.iter().product();
    b.upload_f32(dims, &randv(seed, n, 1.0), DType::F32)
}

fn read(b: &dyn Backend, t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::U32 => Ok(b.read_u32(t.view())?.into_iter().map(|v| v as f32).collect()),
        _ => b.read_f32(t.view()),
    }
}

const BLOCK: ModChunks = ModChunks {
    chunks: 6,
    first: 3,
    second: 4,
};
const GATE: ModChunks = ModChunks {
    chunks: 6,
    first: 5,
    second: 5,
};
const ROWS: RowDims = RowDims {
    batch: 2,
    tokens: 5,
    d: 8,
};
const PATCH: PatchDims = PatchDims {
    batch: 2,
    channels: 3,
    height: 4,
    width: 6,
    patch: 2,
    channels_fastest: false,
};
const TINY_PATCH: PatchDims = PatchDims {
    batch: 1,
    channels: 2,
    height: 4,
    width: 4,
    patch: 2,
    channels_fastest: true,
};
const ATTN: AttnDims = AttnDims {
    batch: 2,
    heads: 4,
    kv_heads: 2,
    q_len: 5,
    kv_len: 7,
    head_dim: 8,
};

fn attn_inputs(b: &dyn Backend, s: u64) -> Result<(Tensor, Tensor, Tensor)> {
    let a = ATTN;
    Ok((
        up(b, &[a.batch, a.q_len, a.heads, a.head_dim], s)?,
        up(b, &[a.batch, a.kv_len, a.kv_heads, a.head_dim], s + 1)?,
        up(b, &[a.batch, a.kv_len, a.kv_heads, a.head_dim], s + 2)?,
    ))
}

fn cases() -> Vec<OpCase> {
    vec![
        OpCase {
            name: "gemm nn + bias",
            tol: 1e-5,
            run: |b, s| {
                let (a, w, bias) = (up(b, &[7, 9], s)?, up(b, &[9, 5], s + 1)?, up(b, &[5], s + 2)?);
                let mut out = up(b, &[7, 5], s + 3)?;
                b.gemm(
                    out.view_mut(),
                    a.view(),
                    w.view(),
                    Some(bias.view()),
                    GemmDims::nn(7, 5, 9),
                    1.0,
                    0.0,
                )?;
                Ok(vec![read(b, &out)?])
            },
        },
        OpCase {
            name: "gemm nt/tn alpha beta",
            tol: 1e-5,
            run: |b, s| {
                let (a, w) = (up(b, &[7, 9], s)?, up(b, &[5, 9], s + 1)?);
                let mut out = up(b, &[7, 5], s + 3)?;
                b.gemm(
                    out.view_mut(),
                    a.view(),
                    w.view(),
                    None,
                    GemmDims::nt(7, 5, 9),
                    0.5,
                    2.0,
                )?;
                let mut g = up(b, &[9, 5], s + 4)?;
                b.gemm(
                    g.view_mut(),
                    a.view(),
                    out.view(),
                    None,
                    GemmDims::tn(9, 5, 7),
                    1.0,
                    1.0,
                )?;
                Ok(vec![read(b, &out)?, read(b, &g)?])
            },
        },
        OpCase {
            name: "gemm_batched",
            tol: 1e-5,
            run: |b, s| {
                let (a, w) = (up(b, &[3, 4, 6], s)?, up(b, &[3, 6, 5], s + 1)?);
                let mut out = b.zeros(&[3, 4, 5], DType::F32)?;
                b.gemm_batched(out.view_mut(), a.view(), w.view(), 3, GemmDims::nn(4, 5, 6), 1.0, 0.0)?;
                Ok(vec![read(b, &out)?])
            },
        },
        OpCase {
            name: "gemm_grouped",
            tol: 1e-5,
            run: |b, s| {
                let rows = [3, 0, 5];
                let (a, w) = (up(b, &[8, 6], s)?, up(b, &[3, 4, 6], s + 1)?);
                let mut out = b.zeros(&[8, 4], DType::F32)?;
                b.gemm_grouped(out.view_mut(), a.view(), w.view(), &rows, 4, 6, true, 1.0, 0.0)?;
                Ok(vec![read(b, &out)?])
            },
        },
        OpCase {
            name: "gemm_grouped_bias (+ GELU, + gathered rows)",
            tol: 1e-5,
            run: |b, s| {
                let rows = [3, 0, 5];
                let (a, w, bias) = (up(b, &[8, 6], s)?, up(b, &[3, 6, 4], s + 1)?, up(b, &[3, 4], s + 2)?);
                let mut plain = b.zeros(&[8, 4], DType::F32)?;
                b.gemm_grouped_bias(
                    plain.view_mut(),
                    a.view(),
                    w.view(),
                    bias.view(),
                    &rows,
                    4,
                    6,
                    false,
                    None,
                )?;
                let idx = b.upload_u32(&[8], &[7, 0, 7, 2, 5, 1, 1, 6])?;
                let mut gathered = b.zeros(&[8, 4], DType::F32)?;
                let act = Some(Unary::GeluTanh);
                let (a, idx, w, bias) = (a.view(), idx.view(), w.view(), bias.view());
                b.gemm_grouped_bias_gathered(gathered.view_mut(), a, idx, w, bias, &rows, 4, 6, false, act)?;
                Ok(vec![read(b, &plain)?, read(b, &gathered)?])
            },
        },
        OpCase {
            name: "add_broadcast, axpby, fill, copy",
            tol: 1e-6,
            run: |b, s| {
                let (mut x, pos, y) = (up(b, &[3, 4, 5], s)?, up(b, &[4, 5], s + 1)?, up(b, &[3, 4, 5], s + 2)?);
                b.add_broadcast(x.view_mut(), pos.view())?;
                b.axpby(x.view_mut(), 0.75, y.view(), -1.5)?;
                let mut c = b.zeros(&[3, 4, 5], DType::F32)?;
                b.copy(c.view_mut(), x.view())?;
                b.fill(c.view_mut().rows(1, 1)?, 2.5)?;
                Ok(vec![read(b, &x)?, read(b, &c)?])
            },
        },
        OpCase {
            name: "bf16 storage round trip and mixed gemm",
            tol: 1e-2,
            run: |b, s| {
                if !b.supports(DType::BF16) {
                    return Ok(vec![]);
                }
                let a = up(b, &[6, 8], s)?;
                let mut a16 = b.zeros(&[6, 8], DType::BF16)?;
                b.copy(a16.view_mut(), a.view())?;
                let w = up(b, &[8, 3], s + 1)?;
                let mut out = b.zeros(&[6, 3], DType::F32)?;
                b.gemm(
                    out.view_mut(),
                    a16.view(),
                    w.view(),
                    None,
                    GemmDims::nn(6, 3, 8),
                    1.0,
                    0.0,
                )?;
                Ok(vec![read(b, &a16)?, read(b, &out)?])
            },
        },
        OpCase {
            name: "sum_rows",
            tol: 1e-5,
            run: |b, s| {
                let (x, mut out) = (up(b, &[9, 4], s)?, up(b, &[4], s + 1)?);
                b.sum_rows(out.view_mut(), x.view(), 9, 4, true)?;
                Ok(vec![read(b, &out)?])
            },
        },
        OpCase {
            name: "softmax_rows (+backward)",
            tol: 1e-5,
            run: |b, s| {
                let (x, dout) = (up(b, &[6, 7], s)?, up(b, &[6, 7], s + 1)?);
                let (mut p, mut dx) = (b.zeros(&[6, 7], DType::F32)?, b.zeros(&[6, 7], DType::F32)?);
                b.softmax_rows(p.view_mut(), x.view(), 6, 7)?;
                b.softmax_rows_backward(dx.view_mut(), dout.view(), p.view(), 6, 7)?;
                Ok(vec![read(b, &p)?, read(b, &dx)?])
            },
        },
        OpCase {
            name: "layer_norm (+backward)",
            tol: 1e-4,
            run: |b, s| {
                let (x, w, bias, dout) = (
                    up(b, &[5, 8], s)?,
                    up(b, &[8], s + 1)?,
                    up(b, &[8], s + 2)?,
                    up(b, &[5, 8], s + 3)?,
                );
                let mut out = b.zeros(&[5, 8], DType::F32)?;
                let (mut mean, mut rstd) = (b.zeros(&[5], DType::F32)?, b.zeros(&[5], DType::F32)?);
                b.layer_norm(
                    out.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x.view(),
                    Some(w.view()),
                    Some(bias.view()),
                    5,
                    8,
                    1e-6,
                )?;
                let (mut dx, mut dw, mut db) = (
                    b.zeros(&[5, 8], DType::F32)?,
                    b.zeros(&[8], DType::F32)?,
                    b.zeros(&[8], DType::F32)?,
                );
                b.layer_norm_backward(
                    dx.view_mut(),
                    Some(dw.view_mut()),
                    Some(db.view_mut()),
                    dout.view(),
                    x.view(),
                    mean.view(),
                    rstd.view(),
                    Some(w.view()),
                    5,
                    8,
                )?;
                Ok(vec![read(b, &out)?, read(b, &dx)?, read(b, &dw)?, read(b, &db)?])
            },
        },
        OpCase {
            name: "unary gelu/silu (+backward)",
            tol: 1e-5,
            run: |b, s| {
                let (x, dout) = (up(b, &[40], s)?, up(b, &[40], s + 1)?);
                let mut outs = Vec::new();
                for op in [Unary::GeluTanh, Unary::Silu] {
                    let (mut y, mut dx) = (b.zeros(&[40], DType::F32)?, b.zeros(&[40], DType::F32)?);
                    b.unary(op, y.view_mut(), x.view())?;
                    b.unary_backward(op, dx.view_mut(), dout.view(), x.view())?;
                    outs.push(read(b, &y)?);
                    outs.push(read(b, &dx)?);
                }
                Ok(outs)
            },
        },
        OpCase {
            name: "modulate, gated_residual (+backward)",
            tol: 1e-5,
            run: |b, s| {
                let RowDims { batch, tokens, d } = ROWS;
                let (x, m, y, dout) = (
                    up(b, &[batch, tokens, d], s)?,
                    up(b, &[batch, 6 * d], s + 1)?,
                    up(b, &[batch, tokens, d], s + 2)?,
                    up(b, &[batch, tokens, d], s + 3)?,
                );
                let mut out = b.zeros(&[batch, tokens, d], DType::F32)?;
                b.modulate(out.view_mut(), x.view(), m.view(), BLOCK, ROWS)?;
                let (mut dx, mut dm) = (
                    b.zeros(&[batch, tokens, d], DType::F32)?,
                    b.zeros(&[batch, 6 * d], DType::F32)?,
                );
                b.modulate_backward(
                    dx.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    x.view(),
                    m.view(),
                    BLOCK,
                    ROWS,
                )?;
                let mut res = up(b, &[batch, tokens, d], s + 4)?;
                b.gated_residual(res.view_mut(), y.view(), m.view(), GATE, ROWS)?;
                let mut dy = b.zeros(&[batch, tokens, d], DType::F32)?;
                b.gated_residual_backward(
                    dy.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    y.view(),
                    m.view(),
                    GATE,
                    ROWS,
                )?;
                Ok(vec![
                    read(b, &out)?,
                    read(b, &dx)?,
                    read(b, &dm)?,
                    read(b, &res)?,
                    read(b, &dy)?,
                ])
            },
        },
        OpCase {
            name: "patchify, unpatchify",
            tol: 0.0,
            run: |b, s| {
                let mut outs = Vec::new();
                for p in [
                    PATCH,
                    PatchDims {
                        channels_fastest: true,
                        ..PATCH
                    },
                ] {
                    let t = (p.height / p.patch) * (p.width / p.patch);
                    let img = up(b, &[p.batch, p.channels, p.height, p.width], s)?;
                    let mut rows = b.zeros(&[p.batch, t, p.channels * p.patch * p.patch], DType::F32)?;
                    b.patchify(rows.view_mut(), img.view(), p)?;
                    let mut back = b.zeros(&[p.batch, p.channels, p.height, p.width], DType::F32)?;
                    b.unpatchify(back.view_mut(), rows.view(), p)?;
                    outs.push(read(b, &rows)?);
                    outs.push(read(b, &back)?);
                }
                Ok(outs)
            },
        },
        OpCase {
            name: "timestep_features",
            tol: 1e-5,
            run: |b, _| {
                let t = b.upload_f32(&[3], &[0.0, 17.0, 999.0], DType::F32)?;
                let mut out = b.zeros(&[3, 16], DType::F32)?;
                b.timestep_features(out.view_mut(), t.view(), 16, 10000.0)?;
                Ok(vec![read(b, &out)?])
            },
        },
        OpCase {
            name: "attention with and without probs (+backward, key mask)",
            tol: 1e-5,
            run: |b, s| {
                let a = ATTN;
                let (q, k, v) = attn_inputs(b, s)?;
                let mut mask = vec![1u8; a.batch * a.kv_len];
                mask[a.kv_len..].iter_mut().skip(4).for_each(|m| *m = 0);
                let mask = b.upload_u8(&[a.batch, a.kv_len], &mask)?;
                let qd = [a.batch, a.q_len, a.heads, a.head_dim];
                let (mut out, mut lean) = (b.zeros(&qd, DType::F32)?, b.zeros(&qd, DType::F32)?);
                let mut probs = b.zeros(&[a.batch, a.heads, a.q_len, a.kv_len], DType::F32)?;
                b.attention(
                    out.view_mut(),
                    Some(probs.view_mut()),
                    q.view(),
                    k.view(),
                    v.view(),
                    Some(mask.view()),
                    a,
                )?;
                b.attention(
                    lean.view_mut(),
                    None,
                    q.view(),
                    k.view(),
                    v.view(),
                    Some(mask.view()),
                    a,
                )?;
                let dout = up(b, &qd, s + 9)?;
                let (mut dq, mut dk, mut dv) = (
                    b.zeros(&qd, DType::F32)?,
                    b.zeros(k.shape(), DType::F32)?,
                    b.zeros(v.shape(), DType::F32)?,
                );
                b.attention_backward(
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
                Ok(vec![
                    read(b, &out)?,
                    read(b, &lean)?,
                    read(b, &probs)?,
                    read(b, &dq)?,
                    read(b, &dk)?,
                    read(b, &dv)?,
                ])
            },
        },
        OpCase {
            name: "gather, scatter_add, gather_dot",
            tol: 1e-5,
            run: |b, s| {
                let (x, ys, gates) = (up(b, &[6, 4], s)?, up(b, &[5, 4], s + 1)?, up(b, &[5], s + 2)?);
                let idx = b.upload_u32(&[5], &[4, 0, 4, 2, 5])?;
                let mut g = b.zeros(&[5, 4], DType::F32)?;
                b.gather_rows(g.view_mut(), x.view(), idx.view(), 4)?;
                let mut sc = up(b, &[6, 4], s + 3)?;
                b.scatter_add_rows(sc.view_mut(), ys.view(), idx.view(), Some(gates.view()), 4)?;
                let mut dots = b.zeros(&[5], DType::F32)?;
                b.gather_dot(dots.view_mut(), x.view(), idx.view(), ys.view(), 4)?;
                Ok(vec![read(b, &g)?, read(b, &sc)?, read(b, &dots)?])
            },
        },
        OpCase {
            name: "adamw_step (three steps)",
            tol: 1e-6,
            run: |b, s| {
                let (mut p, g) = (up(b, &[37], s)?, up(b, &[37], s + 1)?);
                let (mut m, mut v) = (b.zeros(&[37], DType::F32)?, b.zeros(&[37], DType::F32)?);
                let hp = AdamW {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                };
                for step in 1..=3 {
                    b.adamw_step(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), hp, step)?;
                }
                Ok(vec![read(b, &p)?, read(b, &m)?, read(b, &v)?])
            },
        },
        OpCase {
            name: "top_k_rows, router_softmax, top_k_tokens",
            tol: 0.0,
            run: |b, s| {
                let scores = up(b, &[12, 4], s)?;
                let (mut idx, mut val) = (b.zeros(&[12, 2], DType::U32)?, b.zeros(&[12, 2], DType::F32)?);
                b.top_k_rows(idx.view_mut(), val.view_mut(), scores.view(), 12, 4, 2)?;
                let mut probs = b.zeros(&[12, 4], DType::F32)?;
                b.router_softmax(probs.view_mut(), scores.view(), 12, 4)?;
                let (mut ti, mut tv) = (b.zeros(&[4, 2, 3], DType::U32)?, b.zeros(&[4, 2, 3], DType::F32)?);
                b.top_k_tokens(ti.view_mut(), tv.view_mut(), probs.view(), 2, 6, 4, 3)?;
                Ok(vec![
                    read(b, &idx)?,
                    read(b, &val)?,
                    read(b, &probs)?,
                    read(b, &ti)?,
                    read(b, &tv)?,
                ])
            },
        },
    ]
}

/// A backward op's check against central differences of its forward:
/// `loss(x) = sum(w * f(x))`, compared at a few coordinates of each input.
struct GradCase {
    name: &'static str,
    /// Input shapes.
    inputs: &'static [&'static [usize]],
    /// Forward: inputs -> output (host f32), on the backend.
    forward: fn(&dyn Backend, &[Tensor]) -> Result<Vec<f32>>,
    /// Backward: inputs, dout -> one gradient per input (host f32).
    backward: fn(&dyn Backend, &[Tensor], &Tensor) -> Outputs,
}

fn grad_cases() -> Vec<GradCase> {
    vec![
        GradCase {
            name: "add_broadcast (backward: sum_rows)",
            inputs: &[&[4, 6], &[6]],
            forward: |b, x| {
                let mut out = b.zeros(&[4, 6], DType::F32)?;
                b.copy(out.view_mut(), x[0].view())?;
                b.add_broadcast(out.view_mut(), x[1].view())?;
                b.read_f32(out.view())
            },
            backward: |b, _, dout| {
                let mut db = b.zeros(&[6], DType::F32)?;
                b.sum_rows(db.view_mut(), dout.view(), 4, 6, false)?;
                Ok(vec![b.read_f32(dout.view())?, b.read_f32(db.view())?])
            },
        },
        GradCase {
            name: "softmax_rows",
            inputs: &[&[3, 5]],
            forward: |b, x| {
                let mut p = b.zeros(&[3, 5], DType::F32)?;
                b.softmax_rows(p.view_mut(), x[0].view(), 3, 5)?;
                b.read_f32(p.view())
            },
            backward: |b, x, dout| {
                let mut p = b.zeros(&[3, 5], DType::F32)?;
                b.softmax_rows(p.view_mut(), x[0].view(), 3, 5)?;
                let mut dx = b.zeros(&[3, 5], DType::F32)?;
                b.softmax_rows_backward(dx.view_mut(), dout.view(), p.view(), 3, 5)?;
                Ok(vec![b.read_f32(dx.view())?])
            },
        },
        GradCase {
            name: "layer_norm",
            inputs: &[&[3, 6], &[6], &[6]],
            forward: |b, x| {
                let mut out = b.zeros(&[3, 6], DType::F32)?;
                let (mut mean, mut rstd) = (b.zeros(&[3], DType::F32)?, b.zeros(&[3], DType::F32)?);
                b.layer_norm(
                    out.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x[0].view(),
                    Some(x[1].view()),
                    Some(x[2].view()),
                    3,
                    6,
                    1e-6,
                )?;
                b.read_f32(out.view())
            },
            backward: |b, x, dout| {
                let mut out = b.zeros(&[3, 6], DType::F32)?;
                let (mut mean, mut rstd) = (b.zeros(&[3], DType::F32)?, b.zeros(&[3], DType::F32)?);
                b.layer_norm(
                    out.view_mut(),
                    mean.view_mut(),
                    rstd.view_mut(),
                    x[0].view(),
                    Some(x[1].view()),
                    Some(x[2].view()),
                    3,
                    6,
                    1e-6,
                )?;
                let (mut dx, mut dw, mut db) = (
                    b.zeros(&[3, 6], DType::F32)?,
                    b.zeros(&[6], DType::F32)?,
                    b.zeros(&[6], DType::F32)?,
                );
                b.layer_norm_backward(
                    dx.view_mut(),
                    Some(dw.view_mut()),
                    Some(db.view_mut()),
                    dout.view(),
                    x[0].view(),
                    mean.view(),
                    rstd.view(),
                    Some(x[1].view()),
                    3,
                    6,
                )?;
                Ok(vec![
                    b.read_f32(dx.view())?,
                    b.read_f32(dw.view())?,
                    b.read_f32(db.view())?,
                ])
            },
        },
        GradCase {
            name: "unary gelu",
            inputs: &[&[12]],
            forward: |b, x| {
                let mut y = b.zeros(&[12], DType::F32)?;
                b.unary(Unary::GeluTanh, y.view_mut(), x[0].view())?;
                b.read_f32(y.view())
            },
            backward: |b, x, dout| {
                let mut dx = b.zeros(&[12], DType::F32)?;
                b.unary_backward(Unary::GeluTanh, dx.view_mut(), dout.view(), x[0].view())?;
                Ok(vec![b.read_f32(dx.view())?])
            },
        },
        GradCase {
            name: "unary silu",
            inputs: &[&[12]],
            forward: |b, x| {
                let mut y = b.zeros(&[12], DType::F32)?;
                b.unary(Unary::Silu, y.view_mut(), x[0].view())?;
                b.read_f32(y.view())
            },
            backward: |b, x, dout| {
                let mut dx = b.zeros(&[12], DType::F32)?;
                b.unary_backward(Unary::Silu, dx.view_mut(), dout.view(), x[0].view())?;
                Ok(vec![b.read_f32(dx.view())?])
            },
        },
        GradCase {
            name: "modulate",
            inputs: &[&[2, 5, 8], &[2, 48]],
            forward: |b, x| {
                let mut out = b.zeros(&[2, 5, 8], DType::F32)?;
                b.modulate(out.view_mut(), x[0].view(), x[1].view(), BLOCK, ROWS)?;
                b.read_f32(out.view())
            },
            backward: |b, x, dout| {
                let (mut dx, mut dm) = (b.zeros(&[2, 5, 8], DType::F32)?, b.zeros(&[2, 48], DType::F32)?);
                b.modulate_backward(
                    dx.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    x[0].view(),
                    x[1].view(),
                    BLOCK,
                    ROWS,
                )?;
                Ok(vec![b.read_f32(dx.view())?, b.read_f32(dm.view())?])
            },
        },
        GradCase {
            name: "gated_residual",
            inputs: &[&[2, 5, 8], &[2, 5, 8], &[2, 48]],
            forward: |b, x| {
                let mut res = b.zeros(&[2, 5, 8], DType::F32)?;
                b.copy(res.view_mut(), x[0].view())?;
                b.gated_residual(res.view_mut(), x[1].view(), x[2].view(), GATE, ROWS)?;
                b.read_f32(res.view())
            },
            backward: |b, x, dout| {
                let (mut dy, mut dm) = (b.zeros(&[2, 5, 8], DType::F32)?, b.zeros(&[2, 48], DType::F32)?);
                b.gated_residual_backward(
                    dy.view_mut(),
                    dm.view_mut(),
                    dout.view(),
                    x[1].view(),
                    x[2].view(),
                    GATE,
                    ROWS,
                )?;
                // The residual stream passes its gradient through unchanged.
                Ok(vec![
                    b.read_f32(dout.view())?,
                    b.read_f32(dy.view())?,
                    b.read_f32(dm.view())?,
                ])
            },
        },
        GradCase {
            name: "patchify (backward: unpatchify)",
            inputs: &[&[1, 2, 4, 4]],
            forward: |b, x| {
                let mut rows = b.zeros(&[1, 4, 8], DType::F32)?;
                b.patchify(rows.view_mut(), x[0].view(), TINY_PATCH)?;
                b.read_f32(rows.view())
            },
            backward: |b, _, dout| {
                let mut dx = b.zeros(&[1, 2, 4, 4], DType::F32)?;
                b.unpatchify(dx.view_mut(), dout.view().reshape(&[1, 4, 8])?, TINY_PATCH)?;
                Ok(vec![b.read_f32(dx.view())?])
            },
        },
        GradCase {
            name: "unpatchify (backward: patchify)",
            inputs: &[&[1, 4, 8]],
            forward: |b, x| {
                let mut img = b.zeros(&[1, 2, 4, 4], DType::F32)?;
                b.unpatchify(
                    img.view_mut(),
                    x[0].view(),
                    PatchDims {
                        channels_fastest: false,
                        ..TINY_PATCH
                    },
                )?;
                b.read_f32(img.view())
            },
            backward: |b, _, dout| {
                let mut dx = b.zeros(&[1, 4, 8], DType::F32)?;
                let p = PatchDims {
                    channels_fastest: false,
                    ..TINY_PATCH
                };
                b.patchify(dx.view_mut(), dout.view().reshape(&[1, 2, 4, 4])?, p)?;
                Ok(vec![b.read_f32(dx.view())?])
            },
        },
        GradCase {
            name: "attention",
            inputs: &[&[1, 3, 2, 4], &[1, 5, 1, 4], &[1, 5, 1, 4]],
            forward: |b, x| {
                let dims = AttnDims {
                    batch: 1,
                    heads: 2,
                    kv_heads: 1,
                    q_len: 3,
                    kv_len: 5,
                    head_dim: 4,
                };
                let mut out = b.zeros(&[1, 3, 2, 4], DType::F32)?;
                b.attention(out.view_mut(), None, x[0].view(), x[1].view(), x[2].view(), None, dims)?;
                b.read_f32(out.view())
            },
            backward: |b, x, dout| {
                let dims = AttnDims {
                    batch: 1,
                    heads: 2,
                    kv_heads: 1,
                    q_len: 3,
                    kv_len: 5,
                    head_dim: 4,
                };
                let mut out = b.zeros(&[1, 3, 2, 4], DType::F32)?;
                let mut probs = b.zeros(&[1, 2, 3, 5], DType::F32)?;
                b.attention(
                    out.view_mut(),
                    Some(probs.view_mut()),
                    x[0].view(),
                    x[1].view(),
                    x[2].view(),
                    None,
                    dims,
                )?;
                let (mut dq, mut dk, mut dv) = (
                    b.zeros(&[1, 3, 2, 4], DType::F32)?,
                    b.zeros(&[1, 5, 1, 4], DType::F32)?,
                    b.zeros(&[1, 5, 1, 4], DType::F32)?,
                );
                b.attention_backward(
                    dq.view_mut(),
                    dk.view_mut(),
                    dv.view_mut(),
                    dout.view(),
                    probs.view(),
                    x[0].view(),
                    x[1].view(),
                    x[2].view(),
                    dims,
                )?;
                Ok(vec![
                    b.read_f32(dq.view())?,
                    b.read_f32(dk.view())?,
                    b.read_f32(dv.view())?,
                ])
            },
        },
        GradCase {
            name: "scatter_add_rows with scale (backward: gather_rows, gather_dot)",
            inputs: &[&[4, 3], &[4]],
            forward: |b, x| {
                let idx = b.upload_u32(&[4], &[1, 0, 1, 2])?;
                let mut out = b.zeros(&[3, 3], DType::F32)?;
                b.scatter_add_rows(out.view_mut(), x[0].view(), idx.view(), Some(x[1].view()), 3)?;
                b.read_f32(out.view())
            },
            backward: |b, x, dout| {
                let idx = b.upload_u32(&[4], &[1, 0, 1, 2])?;
                // d ys[s] = gate[s] * dout[idx[s]]; d gate[s] = <dout[idx[s]], ys[s]>.
                let mut g = b.zeros(&[4, 3], DType::F32)?;
                b.gather_rows(g.view_mut(), dout.view(), idx.view(), 3)?;
                let gates = b.read_f32(x[1].view())?;
                let mut dys = b.read_f32(g.view())?;
                dys.chunks_mut(3)
                    .zip(&gates)
                    .for_each(|(row, &gate)| row.iter_mut().for_each(|v| *v *= gate));
                let mut dg = b.zeros(&[4], DType::F32)?;
                b.gather_dot(dg.view_mut(), dout.view(), idx.view(), x[0].view(), 3)?;
                Ok(vec![dys, b.read_f32(dg.view())?])
            },
        },
    ]
}

/// What went wrong in a conformance run: one line per failed case.
pub type Failures = Vec<String>;

fn compare(name: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, out: &mut Failures) {
    if got.len() != want.len() {
        out.push(format!("{name}: {} outputs, reference gave {}", got.len(), want.len()));
        return;
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            out.push(format!(
                "{name} output {i}: {} values, reference gave {}",
                g.len(),
                w.len()
            ));
            continue;
        }
        if let Some((j, (a, b))) = g
            .iter()
            .zip(w)
            .enumerate()
            .find(|(_, (a, b))| a.is_nan() || (*a - *b).abs() > tol * (1.0 + b.abs()))
        {
            out.push(format!("{name} output {i}[{j}]: {a}, reference {b} (tolerance {tol})"));
        }
    }
}

/// Runs every op case on `under_test` and on `reference` and compares them.
pub fn check_backend_ops(under_test: &dyn Backend, reference: &dyn Backend) -> Failures {
    let mut failures = Vec::new();
    for case in cases() {
        for seed in [1u64, 2] {
            let got = (case.run)(under_test, seed);
            let want = (case.run)(reference, seed);
            match (got, want) {
                (Ok(g), Ok(w)) => compare(case.name, &g, &w, case.tol, &mut failures),
                (Err(e), _) => failures.push(format!("{} on {}: {e}", case.name, under_test.name())),
                (_, Err(e)) => failures.push(format!("{} on reference {}: {e}", case.name, reference.name())),
            }
        }
    }
    failures
}

/// Checks every backward op of `backend` against central differences of its
/// forward (f32, step 1e-2, at about 6 evenly spaced coordinates per input).
pub fn check_backward_ops(backend: &dyn Backend) -> Failures {
    let mut failures = Vec::new();
    for case in grad_cases() {
        if let Err(e) = check_grad_case(backend, &case, &mut failures) {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    failures
}

fn check_grad_case(b: &dyn Backend, case: &GradCase, failures: &mut Failures) -> Result<()> {
    let host: Vec<Vec<f32>> = case
        .inputs
        .iter()
        .enumerate()
        .map(|(i, dims)| randv(10 + i as u64, dims.iter().product(), 1.0))
        .collect();
    let upload = |vals: &[Vec<f32>]| -> Result<Vec<Tensor>> {
        vals.iter()
            .zip(case.inputs)
            .map(|(v, dims)| b.upload_f32(dims, v, DType::F32))
            .collect()
    };
    let inputs = upload(&host)?;
    let y = (case.forward)(b, &inputs)?;
    let w = randv(99, y.len(), 1.0);
    let out_dims = [y.len()];
    let dout = b.upload_f32(&out_dims, &w, DType::F32)?;
    let grads = (case.backward)(b, &inputs, &dout)?;
    if grads.len() != host.len() {
        failures.push(format!(
            "{}: {} gradients for {} inputs",
            case.name,
            grads.len(),
            host.len()
        ));
        return Ok(());
    }
    let loss = |vals: &[Vec<f32>]| -> Result<f64> {
        let y = (case.forward)(b, &upload(vals)?)?;
        Ok(y.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum())
    };
    let h = 1e-2f32;
    for (i, x) in host.iter().enumerate() {
        let step = x.len().div_ceil(6).max(1);
        for j in (0..x.len()).step_by(step) {
            let mut plus = host.clone();
            plus[i][j] += h;
            let mut minus = host.clone();
            minus[i][j] -= h;
            let fd = (loss(&plus)? - loss(&minus)?) / (2.0 * h as f64);
            let an = grads[i][j] as f64;
            if (fd - an).abs() > 2e-2 * (1.0 + fd.abs()) {
                failures.push(format!(
                    "{} input {i}[{j}]: backward {an:.5}, finite difference {fd:.5}",
                    case.name
                ));
            }
        }
    }
    Ok(())
}

/// Stamps out the conformance tests for one backend:
/// `backend_conformance!(name, make, reference)` where `make` and `reference`
/// are expressions giving a smart pointer to a backend (`Box`, `Arc`), e.g.
/// `backend_conformance!(cpu, Arc::new(CpuBackend::new(2)?), Arc::new(CpuBackend::new(1)?))`.
#[macro_export]
macro_rules! backend_conformance {
    ($name:ident, $make:expr, $reference:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn ops_match_the_reference() {
                let (b, r) = ($make, $reference);
                let failures = $crate::backend_kit::check_backend_ops(&*b, &*r);
                assert!(failures.is_empty(), "{}", failures.join("\n"));
            }
            #[test]
            fn backward_ops_match_finite_differences() {
                let b = $make;
                let failures = $crate::backend_kit::check_backward_ops(&*b);
                assert!(failures.is_empty(), "{}", failures.join("\n"));
            }
        }
    };
}
