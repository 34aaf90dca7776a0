//! bf16 attention on oneDNN: the scores, `P V` and the four products of the
//! backward as bf16 matrix-engine products, softmax and its backward in f32
//! between them.
//!
//! Numerics are those of PyTorch's bf16 autocast: the scores and `dP`
//! accumulate in f32, the softmax runs in f32 and its probabilities are
//! rounded to bf16 before `P V` (they are stored in bf16 for the backward
//! anyway), `dS` is rounded to bf16 before `dS K` and `dS^T Q`; `dK` and `dV`
//! sum a kv head's query heads in f32 and are rounded once.
//!
//! One rayon task per (sample, kv head) does all of that head's work on one
//! thread, its products through [`OneDnn::matmul_in_task`]: a head's `[Tq,
//! Tk]` scores (256 KiB at 256 tokens) stay in cache from product to softmax
//! to product, and no thread waits for a team between the steps. oneDNN 2.6
//! runs its fast (`brg`) kernels only on dense operands, so a task first
//! copies its heads' `[T, Dh]` rows out of the `[B, T, H, Dh]` tensors and
//! its results back (small next to the products). Query head `h = hk * group
//! + j` reads kv head `hk`. A product's shape depends on the dims alone, so a
//! sample's bits do not depend on the samples beside it or the thread count,
//! and the training forward (which keeps `P`) computes the inference bits.

use super::matmul::{Data, DataMut, Outcome, Product, Spec};
use super::{OneDnn, DT_BF16, DT_F32};
use crate::ops::attention::{check_backward, check_forward};
use crate::ops::gemm::SharedMut;
use crate::ops::softmax::{softmax_row_backward_inplace, softmax_row_masked};
use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use ecdit_engine::error::{EngineError, Result};
use ecdit_engine::{AttnDims, GemmDims};
use rayon::prelude::*;
use rayon::ThreadPool;

/// The bf16 attention of one backend call.
pub(crate) struct Bf16Attention<'a> {
    pub lib: &'a OneDnn,
    /// The backend's pool: one task per (sample, kv head).
    pub pool: &'a ThreadPool,
    pub d: AttnDims,
}

/// A task's buffers, reused by the tasks a thread runs.
#[derive(Default)]
struct Scratch {
    /// One query head's rows `[Tq, Dh]` (q, then dout in the backward).
    q: Vec<bf16>,
    dout: Vec<bf16>,
    /// The kv head's rows `[Tk, Dh]`.
    k: Vec<bf16>,
    v: Vec<bf16>,
    /// The scores, or dP: `[Tq, Tk]`.
    scores: Vec<f32>,
    /// The probabilities at inference, or dS: `[Tq, Tk]`.
    p: Vec<bf16>,
    /// A query head's result `[Tq, Dh]`: out, or dq.
    out: Vec<bf16>,
    /// dK and dV summed over the kv head's query heads: `[Tk, Dh]`.
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// One softmax row widened.
    row: Vec<f32>,
    /// oneDNN's scratchpad.
    onednn: Vec<u8>,
}

/// One head's `[T, Dh]` rows inside a `[B, T, heads, Dh]` tensor.
#[derive(Clone, Copy)]
struct Head {
    /// The offset of its first element.
    first: usize,
    tokens: usize,
    /// Elements between consecutive rows: `heads * Dh`.
    stride: usize,
    dh: usize,
}

impl Head {
    /// Head `h` of sample `b` in a `[B, tokens, heads, dh]` tensor.
    fn of(b: usize, h: usize, tokens: usize, heads: usize, dh: usize) -> Self {
        Self {
            first: (b * tokens * heads + h) * dh,
            tokens,
            stride: heads * dh,
            dh,
        }
    }

    /// Copies the head's rows into `dst` `[T, Dh]`.
    fn pack(&self, dst: &mut Vec<bf16>, src: &[bf16]) {
        dst.resize(self.tokens * self.dh, bf16::ZERO);
        for (t, row) in dst.chunks_exact_mut(self.dh).enumerate() {
            row.copy_from_slice(&src[self.first + t * self.stride..][..self.dh]);
        }
    }

    /// Writes `put(src row)` into the head's rows of `dst`; `src` `[T, Dh]`.
    ///
    /// # Safety
    /// No other thread may touch this head's rows of `dst` meanwhile.
    unsafe fn unpack<S>(&self, dst: SharedMut<bf16>, src: &[S], put: impl Fn(&mut [bf16], &[S])) -> Result<()> {
        for (t, row) in src.chunks_exact(self.dh).enumerate() {
            put(dst.block(self.first + t * self.stride, self.dh)?, row);
        }
        Ok(())
    }
}

impl Bf16Attention<'_> {
    fn group(&self) -> usize {
        self.d.heads / self.d.kv_heads
    }

    /// Softmax scale `1 / sqrt(Dh)`.
    fn scale(&self) -> f32 {
        1.0 / (self.d.head_dim.max(1) as f32).sqrt()
    }

    /// Query head `h` of sample `b` in q-shaped tensors (q, out, dout, dq).
    fn q_head(&self, b: usize, h: usize) -> Head {
        Head::of(b, h, self.d.q_len, self.d.heads, self.d.head_dim)
    }

    /// Kv head `hk` of sample `b` in k-shaped tensors (k, v, dk, dv).
    fn kv_head(&self, b: usize, hk: usize) -> Head {
        Head::of(b, hk, self.d.kv_len, self.d.kv_heads, self.d.head_dim)
    }

    /// `out = alpha * op(a) @ op(b) + beta * out` on this thread, all dense:
    /// out `[m, n]`, a `[m, k]` (`[k, m]` when `trans_a`), b `[k, n]` (`[n, k]`
    /// when `trans_b`).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        what: &str,
        dims: GemmDims,
        (alpha, beta): (f32, f32),
        out: DataMut<'_>,
        a: &[bf16],
        b: &[bf16],
        scratchpad: &mut Vec<u8>,
    ) -> Result<()> {
        let dst = match out {
            DataMut::F32(_) => DT_F32,
            DataMut::Bf16(_) => DT_BF16,
        };
        let spec = Spec {
            batch: 1,
            dims,
            src: DT_BF16,
            dst,
            bias: false,
            alpha,
            beta,
            act: None,
            whole_k: true,
        };
        let product = Product {
            out,
            a: Data::Bf16(a),
            b: Data::Bf16(b),
            bias: None,
            spec,
            b_id: None,
        };
        match self.lib.matmul_in_task(product, scratchpad) {
            Ok(Outcome::Done) => Ok(()),
            Ok(Outcome::Unsupported(e)) | Err(e) => Err(EngineError::Backend {
                backend: "cpu".into(),
                reason: format!("bf16 attention ({what}) on oneDNN: {e}"),
            }),
        }
    }

    /// Runs `task(b, hk, scratch)` for every (sample, kv head) on the pool.
    fn for_each_head(&self, task: impl Fn(usize, usize, &mut Scratch) -> Result<()> + Sync) -> Result<()> {
        let hkv = self.d.kv_heads;
        self.pool.install(|| {
            (0..self.d.batch * hkv)
                .into_par_iter()
                .try_for_each_init(Scratch::default, |s, i| task(i / hkv, i % hkv, s))
        })
    }

    /// `out = softmax(q k^T / sqrt(Dh) + mask) v`; `probs` (training) keeps
    /// the bf16 probabilities `[B, H, Tq, Tk]`.
    /// out, q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk].
    pub fn forward(
        &self,
        out: &mut [bf16],
        probs: Option<&mut [bf16]>,
        q: &[bf16],
        k: &[bf16],
        v: &[bf16],
        key_mask: Option<&[u8]>,
    ) -> Result<()> {
        let d = self.d;
        let (kept, inputs) = (probs.as_deref().map(<[bf16]>::len), [q.len(), k.len(), v.len()]);
        check_forward("attention", &d, out.len(), kept, inputs, key_mask.map(<[u8]>::len))?;
        let (tq, tk, dh, group) = (d.q_len, d.kv_len, d.head_dim, self.group());
        let block = tq * tk;
        let out = SharedMut::new(out);
        let probs = probs.map(SharedMut::new);
        self.for_each_head(|b, hk, s| {
            let mask = key_mask.map(|m| &m[b * tk..(b + 1) * tk]);
            self.kv_head(b, hk).pack(&mut s.k, k);
            self.kv_head(b, hk).pack(&mut s.v, v);
            s.scores.resize(block, 0.0);
            s.p.resize(block, bf16::ZERO);
            s.out.resize(tq * dh, bf16::ZERO);
            for h in hk * group..(hk + 1) * group {
                self.q_head(b, h).pack(&mut s.q, q);
                // S = scale * Q K^T: [Tq, Tk]
                let qk = dims(tq, tk, dh, false, true);
                let scores = DataMut::F32(&mut s.scores);
                self.product("Q K^T", qk, (self.scale(), 0.0), scores, &s.q, &s.k, &mut s.onednn)?;
                // SAFETY: task (b, hk) alone writes the probabilities of its
                // query heads; the buffer outlives the loop.
                let p = match probs {
                    Some(all) => unsafe { all.block((b * d.heads + h) * block, block)? },
                    None => &mut s.p,
                };
                for (s_row, p_row) in s.scores.chunks_exact_mut(tk).zip(p.chunks_exact_mut(tk)) {
                    softmax_row_masked(s_row, mask);
                    f32_to_bf16(p_row, s_row);
                }
                // out = P V: [Tq, Dh]
                let pv = dims(tq, dh, tk, false, false);
                let o = DataMut::Bf16(&mut s.out);
                self.product("P V", pv, (1.0, 0.0), o, p, &s.v, &mut s.onednn)?;
                // SAFETY: task (b, hk) alone writes its query heads' columns.
                unsafe { self.q_head(b, h).unpack(out, &s.out, <[bf16]>::copy_from_slice)? };
            }
            Ok(())
        })
    }

    /// Backward of [`Bf16Attention::forward`] (which kept `probs`);
    /// overwrites dq, dk, dv.
    /// dq, dout, q: [B, Tq, H, Dh]; dk, dv, k, v: [B, Tk, Hkv, Dh]; probs: [B, H, Tq, Tk].
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dq: &mut [bf16],
        dk: &mut [bf16],
        dv: &mut [bf16],
        dout: &[bf16],
        probs: &[bf16],
        q: &[bf16],
        k: &[bf16],
        v: &[bf16],
    ) -> Result<()> {
        let d = self.d;
        let lengths = [
            dq.len(),
            dk.len(),
            dv.len(),
            dout.len(),
            probs.len(),
            q.len(),
            k.len(),
            v.len(),
        ];
        check_backward("attention_backward", &d, lengths)?;
        let (tq, tk, dh, group) = (d.q_len, d.kv_len, d.head_dim, self.group());
        let block = tq * tk;
        let (dq, dk, dv) = (SharedMut::new(dq), SharedMut::new(dk), SharedMut::new(dv));
        self.for_each_head(|b, hk, s| {
            self.kv_head(b, hk).pack(&mut s.k, k);
            self.kv_head(b, hk).pack(&mut s.v, v);
            s.scores.resize(block, 0.0);
            s.p.resize(block, bf16::ZERO);
            s.out.resize(tq * dh, bf16::ZERO);
            s.dk.resize(tk * dh, 0.0);
            s.dv.resize(tk * dh, 0.0);
            s.row.resize(tk, 0.0);
            for (j, h) in (hk * group..(hk + 1) * group).enumerate() {
                let sum = if j == 0 { 0.0 } else { 1.0 };
                self.q_head(b, h).pack(&mut s.q, q);
                self.q_head(b, h).pack(&mut s.dout, dout);
                let p = &probs[(b * d.heads + h) * block..][..block];
                // out = P V  =>  dV (+)= P^T dout: [Tk, Dh]
                let dv_dims = dims(tk, dh, tq, true, false);
                let dv_sum = DataMut::F32(&mut s.dv);
                self.product("P^T dout", dv_dims, (1.0, sum), dv_sum, p, &s.dout, &mut s.onednn)?;
                // dP = dout V^T: [Tq, Tk]
                let dp_dims = dims(tq, tk, dh, false, true);
                let dp = DataMut::F32(&mut s.scores);
                self.product("dout V^T", dp_dims, (1.0, 0.0), dp, &s.dout, &s.v, &mut s.onednn)?;
                // P = softmax(S)  =>  dS = P * (dP - rowsum(dP * P)), in bf16.
                let rows = s.scores.chunks_exact_mut(tk).zip(s.p.chunks_exact_mut(tk));
                for ((dp, ds), p) in rows.zip(p.chunks_exact(tk)) {
                    bf16_to_f32(&mut s.row, p);
                    softmax_row_backward_inplace(dp, &s.row);
                    f32_to_bf16(ds, dp);
                }
                // S = scale Q K^T  =>  dQ = scale dS K ...
                let dq_dims = dims(tq, dh, tk, false, false);
                let dq_head = DataMut::Bf16(&mut s.out);
                self.product("dS K", dq_dims, (self.scale(), 0.0), dq_head, &s.p, &s.k, &mut s.onednn)?;
                // SAFETY: task (b, hk) alone writes its query heads' columns.
                unsafe { self.q_head(b, h).unpack(dq, &s.out, <[bf16]>::copy_from_slice)? };
                // ... and dK (+)= scale dS^T Q
                let dk_dims = dims(tk, dh, tq, true, false);
                let dk_sum = DataMut::F32(&mut s.dk);
                self.product(
                    "dS^T Q",
                    dk_dims,
                    (self.scale(), sum),
                    dk_sum,
                    &s.p,
                    &s.q,
                    &mut s.onednn,
                )?;
            }
            // SAFETY: task (b, hk) alone writes kv head hk of sample b.
            unsafe {
                self.kv_head(b, hk).unpack(dk, &s.dk, f32_to_bf16)?;
                self.kv_head(b, hk).unpack(dv, &s.dv, f32_to_bf16)
            }
        })
    }
}

/// The dims of one head's product.
fn dims(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> GemmDims {
    GemmDims {
        m,
        n,
        k,
        trans_a,
        trans_b,
    }
}
