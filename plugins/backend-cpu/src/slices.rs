//! Host slices of the backend's own tensor views, for the f32 kernels.
//!
//! The kernels in `ops/` work on f32 slices. An f32 view is borrowed in
//! place; a bf16 view is widened into an f32 scratch (exact), and an output
//! scratch is rounded back to bf16 (nearest even) by [`Output::finish`]. This
//! is the simple, correct bf16 path; arithmetic always happens in f32.

use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use ecdit_engine::error::check_len;
use ecdit_engine::{DType, EngineError, Result, RowDims, TensorMut, TensorRef};
use rayon::prelude::*;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Elements per parallel conversion task.
const CONVERT_CHUNK: usize = 1 << 14;

fn not_float(op: &str, what: &str, dtype: DType) -> EngineError {
    EngineError::shape(format!("{op} ({what} dtype)"), "f32 or bf16", dtype)
}

/// Widening scratch kept for reuse, at most this many bytes: a fresh
/// tensor-sized buffer costs a page fault per 4 KiB on first touch, more
/// than the conversion that fills it.
const SCRATCH_KEEP_BYTES: usize = 256 << 20;

static SCRATCH: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// An f32 buffer of `len` zeros, reusing a kept one where one is large enough.
fn scratch(len: usize) -> Scratch {
    let mut kept = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let best = (0..kept.len())
        .filter(|&i| kept[i].capacity() >= len)
        .min_by_key(|&i| kept[i].capacity());
    let mut v = best.map(|i| kept.swap_remove(i)).unwrap_or_default();
    drop(kept);
    v.clear();
    v.resize(len, 0.0);
    Scratch(v)
}

/// A widening buffer that goes back to the kept ones when dropped.
pub(crate) struct Scratch(Vec<f32>);

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let mut kept = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: usize = kept.iter().map(|k| k.capacity() * 4).sum();
        if bytes + v.capacity() * 4 <= SCRATCH_KEEP_BYTES {
            kept.push(v);
        }
    }
}

/// A float input as f32: borrowed when stored f32, widened when bf16.
pub(crate) enum Input<'a> {
    Borrowed(&'a [f32]),
    Widened(Scratch),
}

impl Deref for Input<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Input::Borrowed(s) => s,
            Input::Widened(v) => &v.0,
        }
    }
}

fn widen(src: &[bf16]) -> Scratch {
    let mut out = scratch(src.len());
    out.0
        .par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| bf16_to_f32(d, s));
    out
}

/// A float view (f32 or bf16) as f32 values.
pub(crate) fn input<'a>(op: &str, what: &str, v: TensorRef<'a>) -> Result<Input<'a>> {
    match v.dtype() {
        DType::F32 => Ok(Input::Borrowed(v.host::<f32>()?)),
        DType::BF16 => Ok(Input::Widened(widen(v.host::<bf16>()?))),
        other => Err(not_float(op, what, other)),
    }
}

/// [`input`] of an optional view.
pub(crate) fn input_opt<'a>(op: &str, what: &str, v: Option<TensorRef<'a>>) -> Result<Option<Input<'a>>> {
    v.map(|v| input(op, what, v)).transpose()
}

/// A float output as an f32 slice. A bf16 output computes in an f32 scratch
/// (holding the old values when the op reads them, `read`) and is rounded
/// back by [`Output::finish`], which every op calls after its kernel.
pub(crate) enum Output<'a> {
    Direct(&'a mut [f32]),
    Narrowed { dst: &'a mut [bf16], scratch: Scratch },
}

impl Deref for Output<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Output::Direct(s) => s,
            Output::Narrowed { scratch, .. } => &scratch.0,
        }
    }
}

impl DerefMut for Output<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Output::Direct(s) => s,
            Output::Narrowed { scratch, .. } => &mut scratch.0,
        }
    }
}

impl Output<'_> {
    /// Writes a bf16 output's scratch back, rounded to nearest even.
    pub(crate) fn finish(self) {
        if let Output::Narrowed { dst, scratch } = self {
            dst.par_chunks_mut(CONVERT_CHUNK)
                .zip(scratch.0.par_chunks(CONVERT_CHUNK))
                .for_each(|(d, s)| f32_to_bf16(d, s));
        }
    }
}

/// A float view (f32 or bf16) to write; `read` when the op reads the old
/// values (accumulating outputs, `beta != 0`).
pub(crate) fn output<'a>(op: &str, what: &str, v: TensorMut<'a>, read: bool) -> Result<Output<'a>> {
    match v.dtype() {
        DType::F32 => Ok(Output::Direct(v.host_mut::<f32>()?)),
        DType::BF16 => {
            let dst = v.host_mut::<bf16>()?;
            let scratch = if read { widen(dst) } else { scratch(dst.len()) };
            Ok(Output::Narrowed { dst, scratch })
        }
        other => Err(not_float(op, what, other)),
    }
}

/// [`output`] of an optional view.
pub(crate) fn output_opt<'a>(op: &str, what: &str, v: Option<TensorMut<'a>>, read: bool) -> Result<Option<Output<'a>>> {
    v.map(|v| output(op, what, v, read)).transpose()
}

/// Elements per chunk of a bf16 element-wise op: two inputs and the output
/// as f32 (96 KiB) stay in a core's L2 while they are converted and used.
const ELEMENTWISE_CHUNK: usize = 1 << 13;

/// A float view as stored, not widened.
enum Stored<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

fn stored<'a>(op: &str, what: &str, v: TensorRef<'a>) -> Result<Stored<'a>> {
    match v.dtype() {
        DType::F32 => Ok(Stored::F32(v.host::<f32>()?)),
        DType::BF16 => Ok(Stored::Bf16(v.host::<bf16>()?)),
        other => Err(not_float(op, what, other)),
    }
}

/// Runs the element-wise `kernel(out, inputs)` over views of one length.
/// All f32: one call on the whole slices (the kernel splits the work). Any
/// bf16: in parallel chunks, each input widened into a chunk-sized buffer
/// and the output narrowed back while they are in cache, so no tensor-sized
/// scratch is allocated (its first touch costs more than the arithmetic).
/// `read_out`: the kernel reads the output's old values. Element-wise, the
/// chunking cannot change a bit.
pub(crate) fn elementwise<const N: usize>(
    op: &str,
    out: TensorMut<'_>,
    read_out: bool,
    inputs: [(&str, TensorRef<'_>); N],
    kernel: impl Fn(&mut [f32], [&[f32]; N]) -> Result<()> + Sync,
) -> Result<()> {
    let n = out.numel();
    let all_f32 = out.dtype() == DType::F32 && inputs.iter().all(|(_, v)| v.dtype() == DType::F32);
    // All f32, or lengths the kernel will refuse (naming them its own way): whole slices.
    if all_f32 || inputs.iter().any(|(_, v)| v.numel() != n) {
        let mut o = output(op, "out", out, read_out)?;
        let mut whole = Vec::with_capacity(N);
        for (what, v) in inputs {
            whole.push(input(op, what, v)?);
        }
        kernel(&mut o, std::array::from_fn(|j| &whole[j][..]))?;
        o.finish();
        return Ok(());
    }
    let mut ins = Vec::with_capacity(N);
    for (what, v) in inputs {
        ins.push(stored(op, what, v)?);
    }
    let run_chunk = |c: usize, o: &mut [f32]| -> Result<()> {
        let range = c * ELEMENTWISE_CHUNK..c * ELEMENTWISE_CHUNK + o.len();
        let mut bufs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        kernel(o, widened(&ins, range, &mut bufs))
    };
    match out.dtype() {
        DType::F32 => out
            .host_mut::<f32>()?
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .enumerate()
            .try_for_each(|(c, o)| run_chunk(c, o)),
        DType::BF16 => out
            .host_mut::<bf16>()?
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .enumerate()
            .try_for_each(|(c, dst)| {
                let mut o = vec![0.0f32; dst.len()];
                if read_out {
                    bf16_to_f32(&mut o, dst);
                }
                run_chunk(c, &mut o)?;
                f32_to_bf16(dst, &o);
                Ok(())
            }),
        other => Err(not_float(op, "out", other)),
    }
}

/// The f32 values of `range` of each input: borrowed, or widened into `bufs`.
fn widened<'b, const N: usize>(
    ins: &'b [Stored<'b>],
    range: std::ops::Range<usize>,
    bufs: &'b mut [Vec<f32>; N],
) -> [&'b [f32]; N] {
    for (buf, s) in bufs.iter_mut().zip(ins) {
        if let Stored::Bf16(s) = s {
            buf.resize(range.len(), 0.0);
            bf16_to_f32(buf, &s[range.clone()]);
        }
    }
    let bufs = &*bufs;
    std::array::from_fn(|j| match ins[j] {
        Stored::F32(s) => &s[range.clone()],
        Stored::Bf16(_) => &bufs[j][..],
    })
}

/// Runs the row kernel `kernel(row0, out, inputs)` over blocks of whole
/// rows of one sample of `[B, T, d]` views (`row0`: the block's first row
/// in `[B*T]`, its sample `row0 / T`) (ops with a per-sample operand,
/// such as the adaLN gate), in parallel. Like [`elementwise`]: all f32, the
/// blocks as stored; any bf16, each block's inputs widened into block-sized
/// buffers and its output narrowed back while they are in cache, so no
/// tensor-sized scratch is made. The blocks depend on the dims alone, and
/// the kernel sees whole rows, so row ops keep their bits.
/// `read_out`: the kernel reads the output's old values.
pub(crate) fn sample_rows<const N: usize>(
    op: &str,
    out: TensorMut<'_>,
    read_out: bool,
    inputs: [(&str, TensorRef<'_>); N],
    dims: RowDims,
    kernel: impl Fn(usize, &mut [f32], [&[f32]; N]) -> Result<()> + Sync,
) -> Result<()> {
    let (t, d) = (dims.tokens, dims.d);
    if d == 0 {
        return Ok(()); // no elements (a kernel with per-row outputs handles d = 0 itself)
    }
    let n = (dims.batch.checked_mul(t).and_then(|r| r.checked_mul(d)))
        .ok_or_else(|| EngineError::shape(op, "dims whose product fits in memory", format!("{dims:?}")))?;
    check_len(op, "out", out.numel(), n)?;
    let mut ins = Vec::with_capacity(N);
    for (what, v) in inputs {
        check_len(op, what, v.numel(), n)?;
        ins.push(stored(op, what, v)?);
    }
    if n == 0 {
        return Ok(());
    }
    let block = (ELEMENTWISE_CHUNK / d).clamp(1, t) * d;
    // Block `j` of sample `b`: its inputs from the element where it starts.
    let run_block = |b: usize, j: usize, o: &mut [f32]| -> Result<()> {
        let start = b * t * d + j * block;
        let mut bufs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        kernel(start / d, o, widened(&ins, start..start + o.len(), &mut bufs))
    };
    match out.dtype() {
        DType::F32 => out
            .host_mut::<f32>()?
            .par_chunks_mut(t * d)
            .enumerate()
            .try_for_each(|(b, s)| {
                s.par_chunks_mut(block)
                    .enumerate()
                    .try_for_each(|(j, o)| run_block(b, j, o))
            }),
        DType::BF16 => out
            .host_mut::<bf16>()?
            .par_chunks_mut(t * d)
            .enumerate()
            .try_for_each(|(b, s)| {
                s.par_chunks_mut(block).enumerate().try_for_each(|(j, dst)| {
                    let mut o = vec![0.0f32; dst.len()];
                    if read_out {
                        bf16_to_f32(&mut o, dst);
                    }
                    run_block(b, j, &mut o)?;
                    f32_to_bf16(dst, &o);
                    Ok(())
                })
            }),
        other => Err(not_float(op, "out", other)),
    }
}

/// An f32-only input (router math, optimiser state).
pub(crate) fn f32_input<'a>(op: &str, what: &str, v: TensorRef<'a>) -> Result<&'a [f32]> {
    v.expect_dtype(op, what, DType::F32)?;
    v.host::<f32>()
}

/// An f32-only output.
pub(crate) fn f32_output<'a>(op: &str, what: &str, v: TensorMut<'a>) -> Result<&'a mut [f32]> {
    v.expect_dtype(op, what, DType::F32)?;
    v.host_mut::<f32>()
}

/// A u32 index view.
pub(crate) fn indices<'a>(op: &str, what: &str, v: TensorRef<'a>) -> Result<&'a [u32]> {
    v.expect_dtype(op, what, DType::U32)?;
    v.host::<u32>()
}

/// A u32 index view to write.
pub(crate) fn indices_mut<'a>(op: &str, what: &str, v: TensorMut<'a>) -> Result<&'a mut [u32]> {
    v.expect_dtype(op, what, DType::U32)?;
    v.host_mut::<u32>()
}

/// A u8 mask view.
pub(crate) fn mask<'a>(op: &str, what: &str, v: TensorRef<'a>) -> Result<&'a [u8]> {
    v.expect_dtype(op, what, DType::U8)?;
    v.host::<u8>()
}

/// The bytes of any view (transfers and same-dtype copies).
pub(crate) fn bytes(v: TensorRef<'_>) -> Result<&[u8]> {
    Ok(match v.dtype() {
        DType::F32 => bytemuck::cast_slice(v.host::<f32>()?),
        DType::BF16 => bytemuck::cast_slice(v.host::<bf16>()?),
        DType::U32 => bytemuck::cast_slice(v.host::<u32>()?),
        DType::U8 => v.host::<u8>()?,
    })
}

/// The bytes of any view, to write.
pub(crate) fn bytes_mut(v: TensorMut<'_>) -> Result<&mut [u8]> {
    Ok(match v.dtype() {
        DType::F32 => bytemuck::cast_slice_mut(v.host_mut::<f32>()?),
        DType::BF16 => bytemuck::cast_slice_mut(v.host_mut::<bf16>()?),
        DType::U32 => bytemuck::cast_slice_mut(v.host_mut::<u32>()?),
        DType::U8 => v.host_mut::<u8>()?,
    })
}
