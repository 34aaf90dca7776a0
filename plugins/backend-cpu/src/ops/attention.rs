//! Grouped-query scaled dot-product attention, forward and backward, built
//! from strided GEMMs per (sample, head) plus a row softmax.
//!
//! Queries are `[B, Tq, H, Dh]` and keys/values `[B, Tk, Hkv, Dh]` with heads
//! interleaved inside a token, so one head of one sample is a strided
//! `[T, Dh]` matrix (row stride `H * Dh`) that the GEMM reads in place, with
//! no transposing copies. Query head `h` reads kv head `h / (H / Hkv)`.
//!
//! Inference ([`attention_inference`]) works per block of query rows with a
//! small scratch and keeps no probabilities; training ([`attention`]) writes
//! the probabilities its backward reads.

use super::gemm::{gemm_shared, gemm_strided, parallelism, SharedMut, Strided};
use super::numel;
use super::softmax::{softmax_row_backward_inplace, softmax_row_masked};
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::AttnDims;
use gemm::Parallelism;
use rayon::prelude::*;

/// Checked buffer lengths of one attention call.
pub(crate) struct Lens {
    q: usize,
    kv: usize,
    probs: usize,
    mask: usize,
}

fn lens(op: &str, d: &AttnDims) -> Result<Lens> {
    if d.kv_heads == 0 && d.heads > 0 || d.kv_heads > 0 && !d.heads.is_multiple_of(d.kv_heads) {
        return Err(EngineError::shape(
            op,
            format!("kv_heads dividing heads = {}", d.heads),
            format!("kv_heads = {}", d.kv_heads),
        ));
    }
    Ok(Lens {
        q: numel(op, &[d.batch, d.q_len, d.heads, d.head_dim])?,
        kv: numel(op, &[d.batch, d.kv_len, d.kv_heads, d.head_dim])?,
        probs: numel(op, &[d.batch, d.heads, d.q_len, d.kv_len])?,
        mask: numel(op, &[d.batch, d.kv_len])?,
    })
}

/// Checks a forward's buffers: out, the probabilities when kept, q, k, v and
/// the key mask; the lengths of [`lens`].
pub(crate) fn check_forward(
    op: &str,
    d: &AttnDims,
    out: usize,
    probs: Option<usize>,
    [q, k, v]: [usize; 3],
    mask: Option<usize>,
) -> Result<Lens> {
    let n = lens(op, d)?;
    check_len(op, "out", out, n.q)?;
    if let Some(p) = probs {
        check_len(op, "probs", p, n.probs)?;
    }
    check_len(op, "q", q, n.q)?;
    check_len(op, "k", k, n.kv)?;
    check_len(op, "v", v, n.kv)?;
    if let Some(m) = mask {
        check_len(op, "key_mask", m, n.mask)?;
    }
    Ok(n)
}

/// Checks a backward's buffers: `[dq, dk, dv, dout, probs, q, k, v]`.
pub(crate) fn check_backward(op: &str, d: &AttnDims, lengths: [usize; 8]) -> Result<Lens> {
    let n = lens(op, d)?;
    let names = ["dq", "dk", "dv", "dout", "probs", "q", "k", "v"];
    let want = [n.q, n.kv, n.kv, n.q, n.probs, n.q, n.kv, n.kv];
    for ((name, len), want) in names.into_iter().zip(lengths).zip(want) {
        check_len(op, name, len, want)?;
    }
    Ok(n)
}

/// The `[Tq, Dh]` view of query head `h` of sample `b` (also out, dout, dq).
fn q_view(d: &AttnDims, b: usize, h: usize) -> Strided {
    Strided {
        offset: (b * d.q_len * d.heads + h) * d.head_dim,
        rows: d.q_len,
        cols: d.head_dim,
        rs: d.heads * d.head_dim,
        cs: 1,
    }
}

/// The `[Tk, Dh]` view of kv head `hk` of sample `b` (also v, dk, dv).
fn kv_view(d: &AttnDims, b: usize, hk: usize) -> Strided {
    Strided {
        offset: (b * d.kv_len * d.kv_heads + hk) * d.head_dim,
        rows: d.kv_len,
        cols: d.head_dim,
        rs: d.kv_heads * d.head_dim,
        cs: 1,
    }
}

/// Softmax scale `1 / sqrt(Dh)`.
fn scale(d: &AttnDims) -> f32 {
    1.0 / (d.head_dim.max(1) as f32).sqrt()
}

/// Runs `task(i, par)` for `i in 0..n`: side by side with one-thread GEMMs
/// when there are enough tasks to fill the pool, else one after another with
/// GEMMs on all threads.
fn for_each_task(n: usize, threads: usize, task: impl Fn(usize, Parallelism) -> Result<()> + Sync) -> Result<()> {
    if threads > 1 && n >= threads {
        (0..n).into_par_iter().try_for_each(|i| task(i, Parallelism::None))
    } else {
        (0..n).try_for_each(|i| task(i, parallelism(threads)))
    }
}

/// `out = softmax(q k^T / sqrt(Dh) + mask) v` per (sample, head).
/// out: [B, Tq, H, Dh]; probs: [B, H, Tq, Tk]; q: [B, Tq, H, Dh];
/// k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk], nonzero = attend.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[u8]>,
    d: AttnDims,
    threads: usize,
) -> Result<()> {
    let op = "attention";
    let inputs = [q.len(), k.len(), v.len()];
    let n = check_forward(op, &d, out.len(), Some(probs.len()), inputs, key_mask.map(<[u8]>::len))?;
    if n.probs == 0 {
        // No queries or no keys: nothing to attend to.
        out.fill(0.0);
        return Ok(());
    }
    let (tq, tk, group) = (d.q_len, d.kv_len, d.heads / d.kv_heads);
    let att = Strided::row_major(0, tq, tk);
    let out_shared = SharedMut::new(out);
    let probs_shared = SharedMut::new(probs);
    for_each_task(d.batch * d.heads, threads, |bh, par| {
        let (b, h) = (bh / d.heads, bh % d.heads);
        let (qv, kv) = (q_view(&d, b, h), kv_view(&d, b, h / group));
        // SAFETY: task `bh` alone touches probs block `bh` and the out columns
        // of head `h` in sample `b`; the buffers outlive the loop.
        let p = unsafe { probs_shared.block(bh * tq * tk, tq * tk)? };
        // S = scale * Q K^T: [Tq, Tk]
        gemm_strided(op, p, att, q, qv, k, kv.t(), scale(&d), 0.0, par)?;
        let mask = key_mask.map(|m| &m[b * tk..(b + 1) * tk]);
        for row in p.chunks_exact_mut(tk) {
            softmax_row_masked(row, mask);
        }
        // out = P V: [Tq, Dh]
        unsafe { gemm_shared(op, out_shared, qv, p, att, v, kv, 1.0, 0.0, par) }
    })
}

/// Query rows per inference block, at least: the `gemm` crate takes other
/// kernel paths (with other bits) for products of fewer than 64 rows, so
/// every block keeps at least 128 rows (or all of them), and each row gets the
/// bits of the one-product `[Tq, Tk]` scores the caching forward computes.
const MIN_BLOCK_ROWS: usize = 128;

/// Query blocks per (sample, head): `Tq / 128` even blocks of 128 to 255
/// rows (one block when `Tq < 256`). A function of the dims only (never the
/// thread count), so the results are the same bits on any pool.
fn query_blocks(tq: usize) -> usize {
    (tq / MIN_BLOCK_ROWS).max(1)
}

/// Rows `r0..r0 + rows` of block `blk` of `blocks` over `tq` query rows.
fn block_rows(tq: usize, blocks: usize, blk: usize) -> (usize, usize) {
    let (r0, r1) = (blk * tq / blocks, (blk + 1) * tq / blocks);
    (r0, r1 - r0)
}

/// [`attention`] without probabilities (inference): one task per (sample,
/// head, block of query rows) computes the block's scores into a per-thread
/// scratch (`[<256, Tk]`), softmaxes them and multiplies by V; the
/// `[B, H, Tq, Tk]` probability matrix never exists.
/// out, q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh]; key_mask: [B, Tk].
#[allow(clippy::too_many_arguments)]
pub fn attention_inference(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[u8]>,
    d: AttnDims,
    threads: usize,
) -> Result<()> {
    let op = "attention";
    let inputs = [q.len(), k.len(), v.len()];
    let n = check_forward(op, &d, out.len(), None, inputs, key_mask.map(<[u8]>::len))?;
    if n.probs == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (tq, tk, group) = (d.q_len, d.kv_len, d.heads / d.kv_heads);
    let blocks = query_blocks(tq);
    let out_shared = SharedMut::new(out);
    let task = |i: usize, par: Parallelism, scratch: &mut Vec<f32>| -> Result<()> {
        let (bh, blk) = (i / blocks, i % blocks);
        let (b, h) = (bh / d.heads, bh % d.heads);
        let (r0, rows) = block_rows(tq, blocks, blk);
        let full = q_view(&d, b, h);
        let qv = Strided {
            offset: full.offset + r0 * full.rs,
            rows,
            ..full
        };
        let kv = kv_view(&d, b, h / group);
        scratch.resize(rows * tk, 0.0);
        let att = Strided::row_major(0, rows, tk);
        // S = scale * Q K^T: [rows, Tk]
        gemm_strided(op, scratch, att, q, qv, k, kv.t(), scale(&d), 0.0, par)?;
        let mask = key_mask.map(|m| &m[b * tk..(b + 1) * tk]);
        for row in scratch.chunks_exact_mut(tk) {
            softmax_row_masked(row, mask);
        }
        // SAFETY: task `i` alone writes these query rows of head `h` in
        // sample `b`; `out` outlives the loop.
        unsafe { gemm_shared(op, out_shared, qv, scratch, att, v, kv, 1.0, 0.0, par) }
    };
    let tasks = d.batch * d.heads * blocks;
    if threads > 1 && tasks >= threads {
        (0..tasks)
            .into_par_iter()
            .try_for_each_init(Vec::new, |scratch, i| task(i, Parallelism::None, scratch))
    } else {
        let mut scratch = Vec::new();
        (0..tasks).try_for_each(|i| task(i, parallelism(threads), &mut scratch))
    }
}

/// Backward of [`attention`]; overwrites dq, dk, dv.
/// dq, dout, q: [B, Tq, H, Dh]; dk, dv, k, v: [B, Tk, Hkv, Dh]; probs: [B, H, Tq, Tk].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    threads: usize,
) -> Result<()> {
    let op = "attention_backward";
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
    let n = check_backward(op, &d, lengths)?;
    if n.probs == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return Ok(());
    }
    let (tq, tk, group) = (d.q_len, d.kv_len, d.heads / d.kv_heads);
    let att = Strided::row_major(0, tq, tk);
    let (dq_s, dk_s, dv_s) = (SharedMut::new(dq), SharedMut::new(dk), SharedMut::new(dv));
    // One task per (sample, kv head): it owns dk and dv of that kv head and
    // sums its query heads into them in a fixed order.
    for_each_task(d.batch * d.kv_heads, threads, |bhk, par| {
        let (b, hk) = (bhk / d.kv_heads, bhk % d.kv_heads);
        let kv = kv_view(&d, b, hk);
        let mut ds = vec![0.0f32; tq * tk];
        for g in 0..group {
            let h = hk * group + g;
            let qv = q_view(&d, b, h);
            let p = &probs[(b * d.heads + h) * tq * tk..][..tq * tk];
            let acc = if g == 0 { 0.0 } else { 1.0 };
            // SAFETY: task `bhk` alone touches dk/dv of kv head `hk` and dq of
            // its query heads in sample `b`; the buffers outlive the loop.
            unsafe {
                // out = P V  =>  dV (+)= P^T dout: [Tk, Dh]
                gemm_shared(op, dv_s, kv, p, att.t(), dout, qv, 1.0, acc, par)?;
            }
            // dP = dout V^T: [Tq, Tk]
            gemm_strided(op, &mut ds, att, dout, qv, v, kv.t(), 1.0, 0.0, par)?;
            // P = softmax(S)  =>  dS = P * (dP - rowsum(dP * P)), in place.
            for (ds, p) in ds.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
                softmax_row_backward_inplace(ds, p);
            }
            unsafe {
                // S = scale Q K^T  =>  dQ = scale dS K: [Tq, Dh]
                gemm_shared(op, dq_s, qv, &ds, att, k, kv, scale(&d), 0.0, par)?;
                // ... and dK (+)= scale dS^T Q: [Tk, Dh]
                gemm_shared(op, dk_s, kv, &ds, att.t(), q, qv, scale(&d), acc, par)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn blocks_cover_the_rows_and_never_run_short() {
        for tq in [1, 63, 127, 128, 255, 256, 300, 1000, 4097] {
            let blocks = query_blocks(tq);
            let mut next = 0;
            for blk in 0..blocks {
                let (r0, rows) = block_rows(tq, blocks, blk);
                assert_eq!(r0, next, "tq {tq}");
                assert!(
                    rows >= MIN_BLOCK_ROWS.min(tq) && rows < 2 * MIN_BLOCK_ROWS,
                    "tq {tq}: {rows}"
                );
                next += rows;
            }
            assert_eq!(next, tq);
        }
    }

    /// Long sequences, where blocks are a fraction of the queries: the
    /// inference path keeps the bits of the caching one.
    #[test]
    fn inference_has_the_bits_of_the_caching_attention_on_long_sequences() {
        let d = AttnDims {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            q_len: 300,
            kv_len: 1100,
            head_dim: 16,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let q = rand(d.batch * d.q_len * d.heads * d.head_dim);
        let k = rand(d.batch * d.kv_len * d.kv_heads * d.head_dim);
        let v = rand(k.len());
        let mut keep = vec![0.0; q.len()];
        let mut probs = vec![0.0; d.batch * d.heads * d.q_len * d.kv_len];
        attention(&mut keep, &mut probs, &q, &k, &v, None, d, 1).unwrap();
        let mut lean = vec![0.0; q.len()];
        attention_inference(&mut lean, &q, &k, &v, None, d, 1).unwrap();
        assert!(keep == lean, "inference attention differs from the caching one");
    }
}
