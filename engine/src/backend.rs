//! The `Backend` trait: the op set the EC-DiT forward and backward need.
//!
//! Ops take plain row-major f32 slices plus explicit dimensions, in the llm.c
//! argument order: outputs, cached values, inputs, weights, dimensions. Slices
//! map one-to-one onto the plugin ABI (pointer plus length). Every op checks its
//! buffer lengths and returns an error, never panics, on a mismatch.
//!
//! Layouts used throughout:
//! - matrices are row-major; `trans_a` / `trans_b` read the stored matrix transposed;
//! - attention queries `[B, Tq, H, Dh]`, keys and values `[B, Tk, Hkv, Dh]`
//!   (heads interleaved within a token, as a fused qkv projection writes them),
//!   attention probabilities `[B, H, Tq, Tk]`; query head `h` reads kv head
//!   `h / (H / Hkv)` (grouped-query attention).

use crate::error::{check_len, EngineError, Result};

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

/// The op set of a compute backend. All tensors are f32, row-major.
pub trait Backend: Send + Sync {
    /// Short name (`cpu`, `cuda`).
    fn name(&self) -> &str;

    /// Threads this backend computes with.
    fn threads(&self) -> usize;

    /// `out = alpha * op(a) @ op(b) + beta * out`.
    /// out: [m, n]; a: [m, k] or [k, m]; b: [k, n] or [n, k].
    fn gemm(&self, out: &mut [f32], a: &[f32], b: &[f32], dims: GemmDims, alpha: f32, beta: f32) -> Result<()>;

    /// `batch` independent gemms over contiguous blocks of `out`, `a`, `b`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;

    /// Grouped products with one weight matrix per group (stacked MoE experts):
    /// rows `r0..r1` of group `g` (consecutive, in group order) compute
    /// `out[r0..r1] = alpha * a[r0..r1] @ op(b[g]) + beta * out[r0..r1]`.
    /// out: [R, n]; a: [R, k]; b: [G, n, k] (trans_b, PyTorch `Linear`) or
    /// [G, k, n]; `R = sum(group_rows)`, `G = group_rows.len()`; empty groups cost nothing.
    ///
    /// The default runs one [`Backend::gemm`] per group; a backend may run
    /// groups side by side but must give the same bits as this loop.
    #[allow(clippy::too_many_arguments)]
    fn gemm_grouped(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        check_grouped("gemm_grouped", out.len(), a.len(), b.len(), group_rows, n, k)?;
        let dims = |m| GemmDims {
            m,
            n,
            k,
            trans_a: false,
            trans_b,
        };
        let mut r0 = 0;
        for (g, &m) in group_rows.iter().enumerate() {
            if m > 0 {
                let r1 = r0 + m;
                self.gemm(
                    &mut out[r0 * n..r1 * n],
                    &a[r0 * k..r1 * k],
                    &b[g * n * k..(g + 1) * n * k],
                    dims(m),
                    alpha,
                    beta,
                )?;
                r0 = r1;
            }
        }
        Ok(())
    }

    /// `out[r, c] += bias[c]`. out: [rows, cols]; bias: [cols].
    fn add_bias(&self, out: &mut [f32], bias: &[f32], rows: usize, cols: usize) -> Result<()>;

    /// Column sums: `out[c] (+)= sum_r inp[r, c]` (bias gradients).
    /// out: [cols]; inp: [rows, cols]. Accumulates into `out` when `accumulate`.
    fn sum_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, accumulate: bool) -> Result<()>;

    /// Row softmax. out, inp: [rows, cols].
    fn softmax_rows(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()>;

    /// Backward of [`Backend::softmax_rows`] given its output:
    /// `dinp = out * (dout - sum(dout * out))`. All [rows, cols].
    fn softmax_rows_backward(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// Layer norm over the last axis with optional affine weight and bias.
    /// out, inp: [rows, cols]; mean, rstd (cached for backward): [rows].
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: Option<&[f32]>,
        bias: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;

    /// Backward of [`Backend::layer_norm`]. Writes `dinp` (overwrites) and
    /// accumulates into `dweight`/`dbias` when given.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        dinp: &mut [f32],
        dweight: Option<&mut [f32]>,
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        weight: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// Element-wise activation. out, inp: same length.
    fn unary(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()>;

    /// Backward of [`Backend::unary`]: `dinp = dout * op'(inp)` (overwrites).
    fn unary_backward(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()>;

    /// Scaled dot-product attention, softmax scale `1/sqrt(head_dim)`.
    /// out: [B, Tq, H, Dh]; probs (cached): [B, H, Tq, Tk]; q: [B, Tq, H, Dh];
    /// k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk], nonzero = attend. A query
    /// whose keys are all masked gets zero output and zero probabilities.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: Option<&[u8]>,
        dims: AttnDims,
    ) -> Result<()>;

    /// Backward of [`Backend::attention`]; overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttnDims,
    ) -> Result<()>;

    /// `out[i, :] = inp[idx[i], :]`. out: [idx.len(), cols]; inp: [rows, cols].
    fn gather_rows(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()>;

    /// `out[idx[i], :] += scale[i] * inp[i, :]` (scale 1 when absent); the
    /// backward of gather and the MoE combine. Deterministic for repeated indices.
    fn scatter_add_rows(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()>;

    /// Per row, the `k` largest values in descending order (ties: lower
    /// column first). idx, val: [rows, k]; inp: [rows, cols].
    fn top_k_rows(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()>;

    /// One AdamW step on a parameter buffer; `step` counts from 1.
    fn adamw_step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamW,
        step: u64,
    ) -> Result<()>;
}
