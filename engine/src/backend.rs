//! The `Backend` trait: buffers, transfers, and the op set the EC-DiT forward
//! and backward need (engine v2, DESIGN.md "Memory model").
//!
//! A backend allocates [`Buffer`]s, moves bytes between them and the host
//! (`upload`, `download`: the only transfers), and computes on tensor views of
//! its own buffers. Ops take views plus explicit dimensions, in the llm.c
//! argument order: outputs, cached values, inputs, weights, dimensions. Every
//! op checks its views' element counts and dtypes and returns an error, never
//! panics, on a mismatch.
//!
//! Dtypes: float tensors may be stored f32 or bf16 where a backend's
//! [`Backend::supports`] says so (mixed freely between inputs and outputs);
//! arithmetic accumulates in f32. Index tensors are u32, masks u8. Router
//! math ([`Backend::router_softmax`], [`Backend::top_k_tokens`]) is f32 only.
//!
//! Layouts used throughout:
//! - matrices are row-major; `trans_a` / `trans_b` read the stored matrix transposed;
//! - attention queries `[B, Tq, H, Dh]`, keys and values `[B, Tk, Hkv, Dh]`
//!   (heads interleaved within a token, as a fused qkv projection writes them),
//!   attention probabilities `[B, H, Tq, Tk]`; query head `h` reads kv head
//!   `h / (H / Hkv)` (grouped-query attention).

use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{check_len, numel, EngineError, Result};
use crate::tensor::{TensorMut, TensorRef};
use crate::transfer::BackendExt;

/// Dimensions of `out[m, n] = alpha * op(a)[m, k] @ op(b)[k, n] + beta * out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `a` is stored `[k, m]` and read transposed.
    pub trans_a: bool,
    /// `b` is stored `[n, k]` and read transposed (PyTorch Linear weights).
    pub trans_b: bool,
}

impl GemmDims {
    /// Plain `[m, k] @ [k, n]`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
        }
    }
    /// `[m, k] @ [n, k]^T`, the PyTorch `Linear` layout.
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
        }
    }
    /// `[k, m]^T @ [k, n]`, the weight-gradient layout.
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: true,
            trans_b: false,
        }
    }
    /// Floating-point operations of one product (2 m n k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Dimensions of a (grouped-query) attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Query tokens per sample.
    pub q_len: usize,
    /// Key/value tokens per sample.
    pub kv_len: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// Element-wise activations with a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// GELU, tanh approximation (as DiT's `approx_gelu`).
    GeluTanh,
    /// SiLU (`x * sigmoid(x)`).
    Silu,
}

/// AdamW hyper-parameters (PyTorch semantics, decoupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// Hyper-parameters of one RMSProp-with-momentum step (the paper's optimiser).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsProp {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the squared-gradient average.
    pub alpha: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Momentum of the update.
    pub momentum: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl RmsProp {
    /// One element's step (PyTorch `RMSprop` with momentum, decay decoupled):
    /// `p *= 1 - lr wd`; `v = alpha v + (1 - alpha) g^2`;
    /// `buf = momentum buf + g / (sqrt(v) + eps)`; `p -= lr buf`.
    #[inline]
    pub fn update(&self, p: &mut f32, g: f32, v: &mut f32, buf: &mut f32) {
        *p *= 1.0 - self.lr * self.weight_decay;
        *v = self.alpha * *v + (1.0 - self.alpha) * g * g;
        *buf = self.momentum * *buf + g / (v.sqrt() + self.eps);
        *p -= self.lr * *buf;
    }
}

/// Checks the arguments of [`Backend::top_k_rows`]: idx, val: [rows, k];
/// inp: [rows, cols]; `k <= cols`; column indices fit in u32.
pub fn check_top_k_rows(
    idx_len: usize,
    val_len: usize,
    inp_len: usize,
    rows: usize,
    cols: usize,
    k: usize,
) -> Result<()> {
    let op = "top_k_rows";
    check_len(op, "inp", inp_len, numel(op, &[rows, cols])?)?;
    check_len(op, "idx", idx_len, numel(op, &[rows, k])?)?;
    check_len(op, "val", val_len, numel(op, &[rows, k])?)?;
    if k > cols {
        return Err(EngineError::shape(
            op,
            format!("k <= cols = {cols}"),
            format!("k = {k}"),
        ));
    }
    if u32::try_from(cols).is_err() {
        return Err(EngineError::shape(op, "cols that fit in u32", cols));
    }
    Ok(())
}

/// Checks the arguments of [`Backend::top_k_tokens`] and returns the output
/// length `E * groups * k`. idx, val: [E, groups, k]; probs: [groups * group_rows, E];
/// `k <= group_rows`; row indices fit in u32.
pub fn check_top_k_tokens(
    idx_len: usize,
    val_len: usize,
    probs_len: usize,
    (groups, group_rows, experts, k): (usize, usize, usize, usize),
) -> Result<usize> {
    let op = "top_k_tokens";
    let rows = numel(op, &[groups, group_rows])?;
    check_len(op, "probs", probs_len, numel(op, &[rows, experts])?)?;
    let out_len = numel(op, &[experts, groups, k])?;
    check_len(op, "idx", idx_len, out_len)?;
    check_len(op, "val", val_len, out_len)?;
    if k > group_rows {
        return Err(EngineError::shape(
            op,
            format!("k <= group_rows = {group_rows}"),
            format!("k = {k}"),
        ));
    }
    if u32::try_from(rows).is_err() {
        return Err(EngineError::shape(op, "rows that fit in u32", rows));
    }
    Ok(out_len)
}

/// Checks the buffer lengths of [`Backend::gemm_grouped`] and returns the
/// total row count `R = sum(group_rows)`. out: [R, n]; a: [R, k]; b: [G, n, k].
pub fn check_grouped(
    op: &str,
    out_len: usize,
    a_len: usize,
    b_len: usize,
    group_rows: &[usize],
    n: usize,
    k: usize,
) -> Result<usize> {
    let overflow = || {
        EngineError::shape(
            op,
            "sizes that fit in memory",
            format!("groups {group_rows:?}, n {n}, k {k}"),
        )
    };
    let rows = group_rows
        .iter()
        .try_fold(0usize, |acc, &m| acc.checked_add(m))
        .ok_or_else(overflow)?;
    let out_want = rows.checked_mul(n).ok_or_else(overflow)?;
    let a_want = rows.checked_mul(k).ok_or_else(overflow)?;
    let b_want = group_rows
        .len()
        .checked_mul(n)
        .and_then(|gn| gn.checked_mul(k))
        .ok_or_else(overflow)?;
    check_len(op, "out", out_len, out_want)?;
    check_len(op, "a", a_len, a_want)?;
    check_len(op, "b", b_len, b_want)?;
    Ok(rows)
}

/// The body of [`Backend::gemm_grouped`]'s default: one [`Backend::gemm`] per
/// non-empty group. Public so an implementation that overrides the method
/// (a plugin table without the slot) can still fall back to it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped_by_gemm<B: Backend + ?Sized>(
    be: &B,
    out: TensorMut<'_>,
    a: TensorRef<'_>,
    b: TensorRef<'_>,
    group_rows: &[usize],
    n: usize,
    k: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_grouped("gemm_grouped", out.numel(), a.numel(), b.numel(), group_rows, n, k)?;
    let out_len = out.numel();
    let (mut out, a, b) = (
        out.reshape(&[out_len])?,
        a.reshape(&[a.numel()])?,
        b.reshape(&[b.numel()])?,
    );
    let mut r0 = 0;
    for (g, &m) in group_rows.iter().enumerate() {
        if m > 0 {
            let dims = GemmDims {
                m,
                n,
                k,
                trans_a: false,
                trans_b,
            };
            be.gemm(
                out.reborrow().flat(r0 * n, m * n)?,
                a.flat(r0 * k, m * k)?,
                b.flat(g * n * k, n * k)?,
                None,
                dims,
                alpha,
                beta,
            )?;
            r0 += m;
        }
    }
    Ok(())
}

/// The body of [`Backend::gemm_grouped_bias_gathered`]'s default: the rows
/// gathered into a scratch, then [`Backend::gemm_grouped_bias`]. Public so
/// an override can fall back to it for what it does not take.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped_bias_after_gather<B: Backend + ?Sized>(
    be: &B,
    out: TensorMut<'_>,
    (x, rows): (TensorRef<'_>, TensorRef<'_>),
    b: TensorRef<'_>,
    bias: TensorRef<'_>,
    group_rows: &[usize],
    (n, k, trans_b): (usize, usize, bool),
    act: Option<Unary>,
) -> Result<()> {
    let mut a = be.zeros(&[rows.numel(), k], x.dtype())?;
    be.gather_rows(a.view_mut(), x, rows, k)?;
    be.gemm_grouped_bias(out, a.view(), b, bias, group_rows, n, k, trans_b, act)
}

/// `out[rows of g] += bias[g]`, one [`Backend::add_broadcast`] per non-empty
/// group: the bias step of [`Backend::gemm_grouped_bias`]'s default.
/// out: [R, n]; bias: [G, n]; `R = sum(group_rows)`, `G = group_rows.len()`.
pub fn add_group_bias<B: Backend + ?Sized>(
    be: &B,
    mut out: TensorMut<'_>,
    bias: TensorRef<'_>,
    group_rows: &[usize],
    n: usize,
) -> Result<()> {
    const OP: &str = "gemm_grouped_bias";
    bias.expect_len(OP, "bias", group_rows.len() * n)?;
    out.expect_len(OP, "out", group_rows.iter().sum::<usize>() * n)?;
    let bias = bias.flat(0, bias.numel())?;
    let mut r0 = 0;
    for (g, &m) in group_rows.iter().enumerate() {
        if m > 0 {
            be.add_broadcast(out.reborrow().flat(r0 * n, m * n)?, bias.flat(g * n, n)?)?;
        }
        r0 += m;
    }
    Ok(())
}

/// Which chunks of an adaLN modulation `[B, chunks * d]` an op reads
/// (upstream order: `shift, scale, gate, ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModChunks {
    /// Chunks in the modulation row (6 in a block, 2 in the final layer).
    pub chunks: usize,
    /// Index of the shift chunk (`modulate`) or the gate chunk (`gated_residual`).
    pub first: usize,
    /// Index of the scale chunk (`modulate`; unused by `gated_residual`).
    pub second: usize,
}

/// Dimensions of a `[batch, tokens, d]` activation modulated per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowDims {
    /// Samples.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
    /// Channels.
    pub d: usize,
}

/// Dimensions of patchify: images `[B, C, H, W]` to patch rows `[B, T, C p p]`,
/// `T = (H/p)(W/p)` in row-major patch order. Within a row the elements go
/// channel-major `(c, pi, qi)` as a stride-p convolution reads them (the patch
/// embedding), or channel-fastest `(pi, qi, c)` when `channels_fastest` (DiT's
/// final layer). Patchify and unpatchify with the same dims are inverse
/// permutations, so each is the other's backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchDims {
    /// Samples.
    pub batch: usize,
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Patch size p (divides height and width).
    pub patch: usize,
    /// Row element order: `(pi, qi, c)` when true, `(c, pi, qi)` when false.
    pub channels_fastest: bool,
}

/// The op set of a compute backend over tensor views of its own buffers.
///
/// Optional ops have a default body built from other ops; a backend overrides
/// them only to go faster, and must then give the same bits as the default
/// where the default is documented as the reference.
pub trait Backend: Send + Sync {
    /// Short name (`cpu`, `cuda`).
    fn name(&self) -> &str;

    /// Threads this backend computes with.
    fn threads(&self) -> usize;

    /// True when float tensors may be stored in `dtype` on this backend.
    fn supports(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::U32 | DType::U8)
    }

    /// Rows up to which a plain (nn) [`Backend::gemm`] gives every row the bits
    /// it gets in a product of its own (1: no such promise). A model batches
    /// per-sample products (conditioning vectors) up to this many samples per
    /// call, so a sample's output does not depend on its batch.
    fn gemm_rows_alone(&self) -> usize {
        1
    }

    // ---- memory ----

    /// Allocates `bytes` zeroed bytes.
    fn alloc(&self, bytes: usize) -> Result<Buffer>;

    /// Copies host bytes into a view (`src.len() == dst.byte_len()`). A transfer.
    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()>;

    /// Copies a view's bytes to the host (`dst.len() == src.byte_len()`). A transfer.
    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()>;

    /// Copies one view into another on the device, converting between f32
    /// and bf16 when their dtypes differ (round to nearest even). Same counts.
    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()>;

    /// Sets every element of a float view to `value`.
    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()>;

    // ---- matrix products ----

    /// `out = alpha * op(a) @ op(b) + beta * out (+ bias)`; the bias `[n]` is
    /// added to every row after the product (fused, not scaled by alpha).
    /// out: [m, n]; a: [m, k] or [k, m]; b: [k, n] or [n, k].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;

    /// `batch` independent gemms over contiguous blocks of `out`, `a`, `b`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;

    /// Grouped products with one weight matrix per group (stacked MoE experts):
    /// rows `r0..r1` of group `g` (consecutive, in group order) compute
    /// `out[r0..r1] = alpha * a[r0..r1] @ op(b[g]) + beta * out[r0..r1]`.
    /// out: [R, n]; a: [R, k]; b: [G, n, k] (trans_b) or [G, k, n];
    /// `R = sum(group_rows)`, `G = group_rows.len()`; empty groups cost nothing.
    ///
    /// The default runs one [`Backend::gemm`] per group; a backend may run
    /// groups side by side but must give the same bits as this loop.
    #[allow(clippy::too_many_arguments)]
    fn gemm_grouped(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        gemm_grouped_by_gemm(self, out, a, b, group_rows, n, k, trans_b, alpha, beta)
    }

    /// [`Backend::gemm`] (alpha 1, beta 0) with an activation after the bias:
    /// `out = act(op(a) @ op(b) + bias)`, the first layer of an MLP at
    /// inference. The default runs `gemm` into a scratch, then
    /// [`Backend::unary`]; a backend may fuse the activation into the product
    /// (in bf16 rounding once instead of twice), within the activation's
    /// accuracy of the default. out: [m, n]; a, b, bias as in `gemm`.
    fn gemm_act(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        act: Unary,
    ) -> Result<()> {
        let mut pre = self.zeros(out.shape(), out.dtype())?;
        self.gemm(pre.view_mut(), a, b, bias, dims, 1.0, 0.0)?;
        self.unary(act, out, pre.view())
    }

    /// [`Backend::gemm_grouped`] (alpha 1, beta 0) with one bias row per
    /// group and an optional activation: `out[rows of g] = act(a[rows of g]
    /// @ op(b[g]) + bias[g])`, a MoE layer's experts. The default runs
    /// `gemm_grouped`, one [`Backend::add_broadcast`] per group and `unary`
    /// through a scratch; a backend may fuse bias and activation into the
    /// products (in bf16 rounding once instead of up to three times), but in
    /// f32 without an activation it must keep the default's bits.
    /// out: [R, n]; a: [R, k]; b: as in `gemm_grouped`; bias: [G, n].
    #[allow(clippy::too_many_arguments)]
    fn gemm_grouped_bias(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        act: Option<Unary>,
    ) -> Result<()> {
        let mut scratch = None;
        let (mut pre, out) = match act {
            None => (out, None),
            Some(_) => (
                scratch.insert(self.zeros(out.shape(), out.dtype())?).view_mut(),
                Some(out),
            ),
        };
        self.gemm_grouped(pre.reborrow(), a, b, group_rows, n, k, trans_b, 1.0, 0.0)?;
        add_group_bias(self, pre.reborrow(), bias, group_rows, n)?;
        match (act, out) {
            (Some(act), Some(out)) => self.unary(act, out, pre.as_ref()),
            _ => Ok(()),
        }
    }

    /// [`Backend::gemm_grouped_bias`] over gathered rows: row r of the
    /// product reads `x[rows[r]]` (a MoE layer's dispatch into its experts'
    /// first product). The default gathers into a scratch
    /// ([`Backend::gather_rows`]) and runs `gemm_grouped_bias`; a backend
    /// may gather where the product runs instead, with the default's bits.
    /// out: [R, n]; x: [T, k]; rows: [R] (u32, each below T); b, bias:
    /// as in `gemm_grouped_bias`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_grouped_bias_gathered(
        &self,
        out: TensorMut<'_>,
        x: TensorRef<'_>,
        rows: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        act: Option<Unary>,
    ) -> Result<()> {
        gemm_grouped_bias_after_gather(self, out, (x, rows), b, bias, group_rows, (n, k, trans_b), act)
    }

    // ---- element-wise and row ops ----

    /// `out[i] += inp[i % inp.len()]`: a bias over rows, or a position table
    /// over samples. out: [n * len]; inp: [len].
    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()>;

    /// `y = a * x + b * y` element-wise, in place (BLAS axpby: guidance mixes,
    /// sampler steps, noising). y, x: the same count.
    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()>;

    /// Column sums: `out[c] (+)= sum_r inp[r, c]` (bias gradients).
    /// out: [cols]; inp: [rows, cols]. Accumulates into `out` when `accumulate`.
    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()>;

    /// Row softmax. out, inp: [rows, cols].
    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()>;

    /// Backward of [`Backend::softmax_rows`] given its output:
    /// `dinp = out * (dout - sum(dout * out))`. All [rows, cols].
    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// Layer norm over the last axis with optional affine weight and bias.
    /// out, inp: [rows, cols]; mean, rstd (cached for backward, f32): [rows].
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        out: TensorMut<'_>,
        mean: TensorMut<'_>,
        rstd: TensorMut<'_>,
        inp: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        bias: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;

    /// Backward of [`Backend::layer_norm`]. Writes `dinp` (overwrites) and
    /// accumulates into `dweight`/`dbias` when given.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        dinp: TensorMut<'_>,
        dweight: Option<TensorMut<'_>>,
        dbias: Option<TensorMut<'_>>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        mean: TensorRef<'_>,
        rstd: TensorRef<'_>,
        weight: Option<TensorRef<'_>>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// Element-wise activation. out, inp: same count.
    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()>;

    /// Backward of [`Backend::unary`]: `dinp = dout * op'(inp)` (overwrites).
    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()>;

    // ---- adaLN ----

    /// `out[b, t, :] = inp[b, t, :] * (1 + scale[b, :]) + shift[b, :]` with
    /// shift and scale the chunks `which.first` and `which.second` of
    /// `modulation` [B, chunks * d]. out, inp: [B, T, d].
    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;

    /// `out = LN(inp) * (1 + scale) + shift`: a layer norm without affine
    /// over the last axis fused with [`Backend::modulate`] of the chunks
    /// `which`. Writes `mean` and `rstd` (f32, [B*T]) and, when given, LN(inp)
    /// into `ln` (a training forward keeps it for the backward; inference
    /// passes `None`, and nothing [B, T, d] is written but `out`). Within
    /// f32, the bits of [`Backend::layer_norm`] then [`Backend::modulate`],
    /// which is what this default runs (through a scratch for a missing `ln`).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_modulate(
        &self,
        out: TensorMut<'_>,
        ln: Option<TensorMut<'_>>,
        mean: TensorMut<'_>,
        rstd: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
        eps: f32,
    ) -> Result<()> {
        let rows = dims.batch * dims.tokens;
        let mut scratch = None;
        let mut ln = match ln {
            Some(ln) => ln,
            None => scratch.insert(self.zeros(inp.shape(), out.dtype())?).view_mut(),
        };
        self.layer_norm(ln.reborrow(), mean, rstd, inp, None, None, rows, dims.d, eps)?;
        self.modulate(out, ln.as_ref(), modulation, which, dims)
    }

    /// Backward of [`Backend::modulate`]: overwrites `dinp`, accumulates the
    /// shift and scale gradients into their chunks of `dmodulation`.
    #[allow(clippy::too_many_arguments)]
    fn modulate_backward(
        &self,
        dinp: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;

    /// The gated residual `x[b, t, :] += gate[b, :] * y[b, t, :]`, gate the chunk
    /// `which.first` of `modulation` [B, chunks * d]. x, y: [B, T, d].
    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;

    /// Backward of [`Backend::gated_residual`] given `dx` (the gradient flowing
    /// into the residual stream, which passes through unchanged): overwrites
    /// `dy = gate * dx` and accumulates `sum_t dx * y` into the gate chunk of
    /// `dmodulation`.
    #[allow(clippy::too_many_arguments)]
    fn gated_residual_backward(
        &self,
        dy: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dx: TensorRef<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;

    // ---- embeddings ----

    /// Images to patch rows: out: [B, T, C p p]; inp: [B, C, H, W]. Its
    /// backward is [`Backend::unpatchify`] with the same dims, and vice versa.
    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()>;

    /// Patch rows back to images (the inverse of [`Backend::patchify`]):
    /// out: [B, C, H, W]; inp: [B, T, C p p].
    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()>;

    /// DiT's timestep features: `out[b] = [cos(t_b f_i) | sin(t_b f_i)]`,
    /// `f_i = exp(-ln(max_period) i / half)`, `half = dim / 2` (odd dims pad a 0).
    /// out: [B, dim]; t: [B] (f32).
    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()>;

    // ---- attention ----

    /// Scaled dot-product attention, softmax scale `1/sqrt(head_dim)`.
    /// out: [B, Tq, H, Dh]; probs (cached for backward when given): [B, H, Tq, Tk];
    /// q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk] (u8),
    /// nonzero = attend. A query whose keys are all masked gets zero output
    /// (and zero probabilities). Without `probs` no probability matrix is kept.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        dims: AttnDims,
    ) -> Result<()>;

    /// Backward of [`Backend::attention`] from its cached `probs`; overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: TensorMut<'_>,
        dk: TensorMut<'_>,
        dv: TensorMut<'_>,
        dout: TensorRef<'_>,
        probs: TensorRef<'_>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        dims: AttnDims,
    ) -> Result<()>;

    // ---- gather, scatter, routing ----

    /// `out[i, :] = inp[idx[i], :]`. out: [idx.len(), cols]; inp: [rows, cols]; idx: u32.
    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()>;

    /// `out[idx[i], :] += scale[i] * inp[i, :]` (scale 1 when absent); the
    /// backward of gather and the MoE combine. Deterministic for repeated indices.
    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()>;

    /// `out[i] = <a[idx[i], :], b[i, :]>` (the MoE gate gradient).
    /// out: [n] (f32); a: [rows, cols]; idx: [n] (u32); b: [n, cols].
    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()>;

    /// Per row, the `k` largest values in descending order (ties: lower
    /// column first). idx (u32), val: [rows, k]; inp: [rows, cols].
    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()>;

    /// The router softmax: row softmax over experts in f32 with an exact
    /// `exp`, bit-identical to [`crate::routing_math::softmax_row`] (the host
    /// routers' softmax), so device and host routing agree to the bit.
    /// out, scores: [rows, experts], f32.
    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()>;

    /// Expert choice's selection: for each group g of `group_rows` consecutive
    /// rows of `probs` [groups * group_rows, E] and each expert e, the `k` rows
    /// with the largest `probs[r, e]`, in descending order (ties: lower row
    /// first), written expert-major: `idx[e, g, j]` (the global row, u32) and
    /// `val[e, g, j]` (the value). idx, val: [E, groups, k]; f32 only.
    #[allow(clippy::too_many_arguments)]
    fn top_k_tokens(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        probs: TensorRef<'_>,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()>;

    // ---- optimiser ----

    /// One AdamW step on a parameter; `step` counts from 1. param may be bf16
    /// only when the backend keeps an f32 master elsewhere; m, v, grad: f32.
    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()>;

    /// One RMSProp-with-momentum step on an f32 parameter ([`RmsProp::update`]
    /// per element); v, buf, grad: f32 of the same count. The default runs
    /// on the host through transfers (any backend, e.g. a plugin's, has it);
    /// a backend overrides it with its own kernel.
    fn rmsprop_step(
        &self,
        mut param: TensorMut<'_>,
        grad: TensorRef<'_>,
        mut v: TensorMut<'_>,
        mut buf: TensorMut<'_>,
        hp: RmsProp,
    ) -> Result<()> {
        use crate::transfer::BackendExt;
        let n = param.numel();
        grad.expect_len("rmsprop_step", "grad", n)?;
        v.expect_len("rmsprop_step", "v", n)?;
        buf.expect_len("rmsprop_step", "buf", n)?;
        let mut p_h = self.read_f32(param.as_ref())?;
        let g_h = self.read_f32(grad)?;
        let mut v_h = self.read_f32(v.as_ref())?;
        let mut b_h = self.read_f32(buf.as_ref())?;
        for i in 0..n {
            hp.update(&mut p_h[i], g_h[i], &mut v_h[i], &mut b_h[i]);
        }
        self.write_f32(param.reborrow(), &p_h)?;
        self.write_f32(v.reborrow(), &v_h)?;
        self.write_f32(buf.reborrow(), &b_h)
    }
}
