//! Host slices of the backend's own tensor views, for the f32 kernels.
//!
//! The kernels in `ops/` work on f32 slices. An f32 view is borrowed in
//! place; a bf16 view is widened into an f32 scratch (exact), and an output
//! scratch is rounded back to bf16 (nearest even) by [`Output::finish`]. This
//! is the simple, correct bf16 path; arithmetic always happens in f32.

use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use ecdit_engine::{DType, EngineError, Result, TensorMut, TensorRef};
use rayon::prelude::*;
use std::ops::{Deref, DerefMut};

/// Elements per parallel conversion task.
const CONVERT_CHUNK: usize = 1 << 14;

fn not_float(op: &str, what: &str, dtype: DType) -> EngineError {
    EngineError::shape(format!("{op} ({what} dtype)"), "f32 or bf16", dtype)
}

/// A float input as f32: borrowed when stored f32, widened when bf16.
pub(crate) enum Input<'a> {
    Borrowed(&'a [f32]),
    Widened(Vec<f32>),
}

impl Deref for Input<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Input::Borrowed(s) => s,
            Input::Widened(v) => v,
        }
    }
}

fn widen(src: &[bf16]) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
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
    Narrowed { dst: &'a mut [bf16], scratch: Vec<f32> },
}

impl Deref for Output<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Output::Direct(s) => s,
            Output::Narrowed { scratch, .. } => scratch,
        }
    }
}

impl DerefMut for Output<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Output::Direct(s) => s,
            Output::Narrowed { scratch, .. } => scratch,
        }
    }
}

impl Output<'_> {
    /// Writes a bf16 output's scratch back, rounded to nearest even.
    pub(crate) fn finish(self) {
        if let Output::Narrowed { dst, scratch } = self {
            dst.par_chunks_mut(CONVERT_CHUNK)
                .zip(scratch.par_chunks(CONVERT_CHUNK))
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
            let scratch = if read { widen(dst) } else { vec![0.0f32; dst.len()] };
            Ok(Output::Narrowed { dst, scratch })
        }
        other => Err(not_float(op, what, other)),
    }
}

/// [`output`] of an optional view.
pub(crate) fn output_opt<'a>(op: &str, what: &str, v: Option<TensorMut<'a>>, read: bool) -> Result<Option<Output<'a>>> {
    v.map(|v| output(op, what, v, read)).transpose()
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
