//! Backends out of a plugin: a `Box<dyn Backend>` behind a [`BackendVtable`].
//! Buffer handles are `Box<Buffer>`s of this side; a [`TensorDesc`] names one
//! and the view is rebuilt here, bounds-checked, before the op runs.
//!
//! The same table lends the host's backend to a plugin expert for one call
//! (`Lent`): the direction differs, the layout and the code do not.

use super::{create, destroy, guard, not_null, quiet, Header, Instance};
use crate::backend::{AdamW, AttnDims, Backend, GemmDims, ModChunks, PatchDims, RowDims, Unary};
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::plugin::abi::*;
use crate::tensor::{Tensor, TensorMut, TensorRef};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// What a backend handle points to.
pub(crate) struct BackendHandle {
    /// The backend: owned (`Box::into_raw`) for a plugin instance, borrowed
    /// for a lent one.
    backend: *const (dyn Backend + 'static),
    owned: bool,
    name: CString,
}

/// Buffers lent backends allocated and nobody freed or took yet: buffer
/// address -> address of the lending [`BackendHandle`]. The only buffers an
/// expert may hand to the host's cache, and the only ones the lent table's
/// `buffer_free` frees. Process-wide because `buffer_free` gets only the buffer.
fn lent_allocs() -> MutexGuard<'static, HashMap<usize, usize>> {
    static ALLOCS: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    ALLOCS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

impl BackendHandle {
    fn backend(&self) -> &dyn Backend {
        // SAFETY: owned: lives until drop; lent: the `Lent` borrow outlives every call.
        unsafe { &*self.backend }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: made by `Box::into_raw` in `into_handle`, dropped once here.
            drop(unsafe { Box::from_raw(self.backend as *mut (dyn Backend + 'static)) });
        }
    }
}

fn c_name(name: &str) -> CString {
    CString::new(name.replace('\0', "")).unwrap_or_default()
}

impl Instance for Box<dyn Backend> {
    fn into_handle(self) -> *mut c_void {
        let name = c_name(self.name());
        Box::into_raw(Box::new(BackendHandle {
            backend: Box::into_raw(self),
            owned: true,
            name,
        })) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut BackendHandle));
    }
}

/// The host's backend lent to a plugin for one call, as a [`BackendRef`].
pub(crate) struct Lent<'a> {
    handle: Box<BackendHandle>,
    _borrow: PhantomData<&'a dyn Backend>,
}

struct SyncTable(BackendVtable);
// SAFETY: the lent table holds only function pointers and nulls.
unsafe impl Send for SyncTable {}
unsafe impl Sync for SyncTable {}

impl<'a> Lent<'a> {
    /// Lends `backend` for as long as the result lives.
    pub(crate) fn new(backend: &'a dyn Backend) -> Self {
        let ptr: *const (dyn Backend + 'a) = backend;
        // SAFETY: only the lifetime is erased; `Lent` borrows `backend` for 'a
        // and every use of the pointer happens while it lives.
        let backend: *const (dyn Backend + 'static) = unsafe { std::mem::transmute(ptr) };
        Self {
            handle: Box::new(BackendHandle {
                backend,
                owned: false,
                name: c_name(unsafe { &*backend }.name()),
            }),
            _borrow: PhantomData,
        }
    }

    /// The table and handle for the plugin.
    pub(crate) fn as_ref(&self) -> BackendRef {
        static TABLE: OnceLock<SyncTable> = OnceLock::new();
        let table = &TABLE
            .get_or_init(|| {
                SyncTable(BackendVtable {
                    buffer_free: Some(lent_buffer_free),
                    ..ops(std::ptr::null())
                })
            })
            .0;
        BackendRef {
            vtable: table,
            handle: &*self.handle as *const BackendHandle as *mut c_void,
        }
    }

    /// Takes back, as a whole tensor, a buffer the plugin allocated through
    /// this lent backend during the call (an expert's cache); any other
    /// handle, or a view that does not fit, is an error and nothing is taken.
    pub(crate) fn take(&self, d: &TensorDesc) -> Result<Tensor> {
        let mut allocs = lent_allocs();
        if allocs.get(&(d.buffer as usize)) != Some(&self.id()) {
            return Err(EngineError::Other(
                "a cached tensor must be a live buffer allocated through the lent backend during this call \
                 (not freed, not pushed twice)"
                    .into(),
            ));
        }
        // SAFETY: registered, so `alloc` made it and neither `buffer_free` nor `take` consumed it.
        let (_, offset, dims, dtype) = unsafe { parts(d, "cached tensor")? };
        if offset != 0 {
            return Err(EngineError::Other("a cached tensor must start at offset 0".into()));
        }
        let dims = dims.to_vec();
        allocs.remove(&(d.buffer as usize));
        drop(allocs);
        // SAFETY: was registered, so `alloc` made it from a `Box<Buffer>` and nothing freed or took it since.
        let buffer = *unsafe { Box::from_raw(d.buffer as *mut Buffer) };
        Tensor::from_buffer(buffer, &dims, dtype)
    }

    /// The key of this lending in [`lent_allocs`].
    fn id(&self) -> usize {
        &*self.handle as *const BackendHandle as usize
    }
}

impl Drop for Lent<'_> {
    /// Forgets the buffers the plugin left behind: after the call nobody may
    /// take them, and a later lending at the same address must not match them.
    fn drop(&mut self) {
        let id = self.id();
        lent_allocs().retain(|_, h| *h != id);
    }
}

/// The lent table's `buffer_free`: frees only a buffer the lent backend
/// allocated and nobody freed or took yet; any other handle (a host tensor,
/// one freed before) is left alone.
unsafe extern "C" fn lent_buffer_free(buffer: *mut c_void) {
    if lent_allocs().remove(&(buffer as usize)).is_some() {
        // SAFETY: registered by `alloc` (a `Box<Buffer>`), unregistered just now: freed once.
        quiet((), || drop(Box::from_raw(buffer as *mut Buffer)));
    }
}

/// The byte range `(buffer, start, end)` a descriptor views, when it is
/// readable and sane (otherwise `parts` reports it when the op reads it).
unsafe fn span(p: *const TensorDesc) -> Option<(usize, usize, usize)> {
    let d = p.as_ref()?;
    if d.buffer.is_null() {
        return None;
    }
    let (dtype, _, end) = d.decode("tensor").ok()?;
    Some((d.buffer as usize, d.offset.checked_mul(dtype.size())?, end))
}

/// Refuses an op whose written views (`outs`) overlap any other view of the
/// call (`outs` and `ins`) in the same buffer: the op would get a `&mut` and
/// another reference to the same bytes. Views that only share the buffer are fine.
unsafe fn disjoint(outs: &[(*const TensorDesc, &str)], ins: &[(*const TensorDesc, &str)]) -> Result<()> {
    for (i, &(o, o_name)) in outs.iter().enumerate() {
        let Some((ob, os, oe)) = span(o).filter(|s| s.1 < s.2) else {
            continue;
        };
        for &(p, p_name) in outs[i + 1..].iter().chain(ins) {
            if let Some((pb, ps, pe)) = span(p) {
                if pb == ob && ps < pe && os < pe && ps < oe {
                    return Err(EngineError::Other(format!(
                        "in-place ops are not supported: {o_name} and {p_name} overlap"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Refuses host memory `[ptr, ptr + len)` that overlaps the view `d` (a
/// checked descriptor): `upload`/`download` would alias it.
unsafe fn host_apart(d: *const TensorDesc, ptr: *const c_void, len: usize, view: &str, host: &str) -> Result<()> {
    let (buffer, ..) = parts(d, view)?;
    let (Some(base), Some((_, s, e))) = (buffer.storage().host_ptr(), span(d)) else {
        return Ok(());
    };
    let (vs, ve, hs) = (base.as_ptr() as usize + s, base.as_ptr() as usize + e, ptr as usize);
    if len > 0 && s < e && hs < ve && vs < hs.saturating_add(len) {
        return Err(EngineError::Other(format!(
            "in-place ops are not supported: {view} and {host} overlap"
        )));
    }
    Ok(())
}

/// The descriptor of a view of this side's buffer (the handle is the `Buffer`).
pub(crate) fn desc_of(buffer: &Buffer, offset: usize, dims: &[usize], dtype: DType) -> TensorDesc {
    let mut d = TensorDesc {
        buffer: buffer as *const Buffer as *mut c_void,
        offset,
        dtype: dtype as u32,
        rank: dims.len() as u32,
        dims: [0; MAX_RANK],
    };
    d.dims[..dims.len()].copy_from_slice(dims);
    d
}

/// The descriptor of a view of this side's buffer.
pub(crate) fn desc_ref(t: TensorRef<'_>) -> TensorDesc {
    desc_of(t.buffer(), t.offset(), t.shape(), t.dtype())
}

/// Checks a descriptor of this side's buffer: a known dtype, a rank within
/// bounds, and a view inside the buffer.
unsafe fn parts<'a>(p: *const TensorDesc, what: &str) -> Result<(&'a Buffer, usize, &'a [usize], DType)> {
    not_null(p, what)?;
    let d = &*p;
    not_null(d.buffer, &format!("{what} buffer"))?;
    let (dtype, dims, end) = d.decode(what)?;
    let buffer = &*(d.buffer as *const Buffer);
    match end {
        end if end <= buffer.len_bytes() => Ok((buffer, d.offset, dims, dtype)),
        _ => Err(EngineError::shape(
            format!("{what} (view)"),
            format!("a view inside the buffer of {} bytes", buffer.len_bytes()),
            format!("{dims:?} {dtype} at element {}", d.offset),
        )),
    }
}

/// A shared view from a descriptor of this side's buffer.
pub(crate) unsafe fn tr<'a>(p: *const TensorDesc, what: &str) -> Result<TensorRef<'a>> {
    let (b, o, d, t) = parts(p, what)?;
    TensorRef::from_raw_parts(b, o, d, t)
}

/// An exclusive view (the caller's own borrow rules made it exclusive).
pub(crate) unsafe fn tm<'a>(p: *const TensorDesc, what: &str) -> Result<TensorMut<'a>> {
    let (b, o, d, t) = parts(p, what)?;
    TensorMut::from_raw_parts(b, o, d, t)
}

unsafe fn otr<'a>(p: *const TensorDesc, what: &str) -> Result<Option<TensorRef<'a>>> {
    if p.is_null() {
        Ok(None)
    } else {
        tr(p, what).map(Some)
    }
}

unsafe fn otm<'a>(p: *const TensorDesc, what: &str) -> Result<Option<TensorMut<'a>>> {
    if p.is_null() {
        Ok(None)
    } else {
        tm(p, what).map(Some)
    }
}

unsafe fn hd<'a>(h: *mut c_void) -> Result<&'a BackendHandle> {
    not_null(h, "handle")?;
    Ok(&*(h as *const BackendHandle))
}

unsafe fn be<'a>(h: *mut c_void) -> Result<&'a dyn Backend> {
    Ok(hd(h)?.backend())
}

pub(crate) fn gemm_dims(d: GemmDimsC) -> GemmDims {
    GemmDims {
        m: d.m,
        n: d.n,
        k: d.k,
        trans_a: d.trans_a != 0,
        trans_b: d.trans_b != 0,
    }
}

pub(crate) fn attn_dims(d: AttnDimsC) -> AttnDims {
    AttnDims {
        batch: d.batch,
        heads: d.heads,
        kv_heads: d.kv_heads,
        q_len: d.q_len,
        kv_len: d.kv_len,
        head_dim: d.head_dim,
    }
}

fn chunks(c: ModChunksC) -> ModChunks {
    ModChunks {
        chunks: c.chunks,
        first: c.first,
        second: c.second,
    }
}

fn rows(d: RowDimsC) -> RowDims {
    RowDims {
        batch: d.batch,
        tokens: d.tokens,
        d: d.d,
    }
}

fn patch(d: PatchDimsC) -> PatchDims {
    PatchDims {
        batch: d.batch,
        channels: d.channels,
        height: d.height,
        width: d.width,
        patch: d.patch,
        channels_fastest: d.channels_fastest != 0,
    }
}

fn unary_op(op: u32) -> Result<Unary> {
    match op {
        UNARY_GELU_TANH => Ok(Unary::GeluTanh),
        UNARY_SILU => Ok(Unary::Silu),
        _ => Err(EngineError::Other(format!(
            "unknown unary op code {op} (known: {UNARY_GELU_TANH} gelu_tanh, {UNARY_SILU} silu)"
        ))),
    }
}

/// The table of one backend kind.
pub(crate) fn table(h: Header) -> BackendVtable {
    BackendVtable {
        kind: h.kind,
        description: h.description,
        params_json: h.params_json,
        create: Some(create::<Box<dyn Backend>>),
        destroy: Some(destroy::<Box<dyn Backend>>),
        ..ops(h.ctx)
    }
}

type Hd = *mut c_void;
type Er = *mut ErrBuf;
type Td = *const TensorDesc;

/// [`guard`] for an op over descriptors: refuses overlapping views first (see [`disjoint`]).
unsafe fn checked(err: Er, outs: &[(Td, &str)], ins: &[(Td, &str)], f: impl FnOnce() -> Result<()>) -> i32 {
    guard(err, || {
        disjoint(outs, ins)?;
        f()
    })
}

/// Every slot but the header strings and `create`/`destroy`.
#[allow(clippy::too_many_arguments)]
fn ops(ctx: *const c_void) -> BackendVtable {
    unsafe extern "C" fn name(h: Hd) -> *const c_char {
        hd(h).map_or(std::ptr::null(), |h| h.name.as_ptr())
    }
    unsafe extern "C" fn threads(h: Hd) -> usize {
        quiet(0, || be(h).map_or(0, |b| b.threads()))
    }
    unsafe extern "C" fn supports(h: Hd, dtype: u32) -> u32 {
        quiet(0, || match (be(h), DType::from_code(dtype)) {
            (Ok(b), Some(d)) => b.supports(d) as u32,
            _ => 0,
        })
    }
    unsafe extern "C" fn alloc(h: Hd, bytes: usize, out: *mut *mut c_void, err: Er) -> i32 {
        guard(err, || {
            not_null(out, "out")?;
            let hd = hd(h)?;
            let buffer = Box::into_raw(Box::new(hd.backend().alloc(bytes)?)) as *mut c_void;
            if !hd.owned {
                lent_allocs().insert(buffer as usize, hd as *const BackendHandle as usize);
            }
            *out = buffer;
            Ok(())
        })
    }
    unsafe extern "C" fn buffer_free(buffer: *mut c_void) {
        if !buffer.is_null() {
            quiet((), || drop(Box::from_raw(buffer as *mut Buffer)));
        }
    }
    unsafe extern "C" fn buffer_host_ptr(buffer: *mut c_void) -> *mut c_void {
        if buffer.is_null() {
            return std::ptr::null_mut();
        }
        let b = &*(buffer as *const Buffer);
        quiet(std::ptr::null_mut(), || {
            b.storage()
                .host_ptr()
                .map_or(std::ptr::null_mut(), |p| p.as_ptr() as *mut c_void)
        })
    }
    unsafe extern "C" fn buffer_written(buffer: *mut c_void) {
        if !buffer.is_null() {
            quiet((), || (*(buffer as *const Buffer)).note_write());
        }
    }
    unsafe extern "C" fn upload(h: Hd, dst: Td, src: *const c_void, len: usize, err: Er) -> i32 {
        guard(err, || {
            let src = if len == 0 {
                &[][..]
            } else {
                not_null(src, "src")?;
                host_apart(dst, src, len, "dst", "src")?;
                std::slice::from_raw_parts(src as *const u8, len)
            };
            be(h)?.upload(tm(dst, "dst")?, src)
        })
    }
    unsafe extern "C" fn download(h: Hd, dst: *mut c_void, len: usize, src: Td, err: Er) -> i32 {
        guard(err, || {
            let dst = if len == 0 {
                &mut [][..]
            } else {
                not_null(dst, "dst")?;
                host_apart(src, dst, len, "src", "dst")?;
                std::slice::from_raw_parts_mut(dst as *mut u8, len)
            };
            be(h)?.download(dst, tr(src, "src")?)
        })
    }
    unsafe extern "C" fn copy(h: Hd, dst: Td, src: Td, err: Er) -> i32 {
        checked(err, &[(dst, "dst")], &[(src, "src")], || {
            be(h)?.copy(tm(dst, "dst")?, tr(src, "src")?)
        })
    }
    unsafe extern "C" fn fill(h: Hd, dst: Td, value: f32, err: Er) -> i32 {
        guard(err, || be(h)?.fill(tm(dst, "dst")?, value))
    }
    unsafe extern "C" fn gemm(
        h: Hd,
        out: Td,
        a: Td,
        b: Td,
        bias: Td,
        d: GemmDimsC,
        alpha: f32,
        beta: f32,
        err: Er,
    ) -> i32 {
        checked(err, &[(out, "out")], &[(a, "a"), (b, "b"), (bias, "bias")], || {
            be(h)?.gemm(
                tm(out, "out")?,
                tr(a, "a")?,
                tr(b, "b")?,
                otr(bias, "bias")?,
                gemm_dims(d),
                alpha,
                beta,
            )
        })
    }
    unsafe extern "C" fn gemm_batched(
        h: Hd,
        out: Td,
        a: Td,
        b: Td,
        batch: usize,
        d: GemmDimsC,
        alpha: f32,
        beta: f32,
        err: Er,
    ) -> i32 {
        checked(err, &[(out, "out")], &[(a, "a"), (b, "b")], || {
            be(h)?.gemm_batched(
                tm(out, "out")?,
                tr(a, "a")?,
                tr(b, "b")?,
                batch,
                gemm_dims(d),
                alpha,
                beta,
            )
        })
    }
    unsafe extern "C" fn gemm_grouped(
        h: Hd,
        out: Td,
        a: Td,
        b: Td,
        group_rows: *const usize,
        groups: usize,
        n: usize,
        k: usize,
        trans_b: u32,
        alpha: f32,
        beta: f32,
        err: Er,
    ) -> i32 {
        checked(err, &[(out, "out")], &[(a, "a"), (b, "b")], || {
            let rows = if groups == 0 {
                &[][..]
            } else {
                not_null(group_rows, "group_rows")?;
                crate::plugin::check_count(groups, isize::MAX as usize, size_of::<usize>(), "group_rows")?;
                std::slice::from_raw_parts(group_rows, groups)
            };
            be(h)?.gemm_grouped(
                tm(out, "out")?,
                tr(a, "a")?,
                tr(b, "b")?,
                rows,
                n,
                k,
                trans_b != 0,
                alpha,
                beta,
            )
        })
    }
    unsafe extern "C" fn add_broadcast(h: Hd, out: Td, inp: Td, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.add_broadcast(tm(out, "out")?, tr(inp, "inp")?)
        })
    }
    unsafe extern "C" fn axpby(h: Hd, y: Td, a: f32, x: Td, b: f32, err: Er) -> i32 {
        checked(err, &[(y, "y")], &[(x, "x")], || {
            be(h)?.axpby(tm(y, "y")?, a, tr(x, "x")?, b)
        })
    }
    unsafe extern "C" fn sum_rows(h: Hd, out: Td, inp: Td, rows: usize, cols: usize, acc: u32, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.sum_rows(tm(out, "out")?, tr(inp, "inp")?, rows, cols, acc != 0)
        })
    }
    unsafe extern "C" fn softmax_rows(h: Hd, out: Td, inp: Td, rows: usize, cols: usize, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.softmax_rows(tm(out, "out")?, tr(inp, "inp")?, rows, cols)
        })
    }
    unsafe extern "C" fn softmax_rows_backward(
        h: Hd,
        dinp: Td,
        dout: Td,
        out: Td,
        rows: usize,
        cols: usize,
        err: Er,
    ) -> i32 {
        checked(err, &[(dinp, "dinp")], &[(dout, "dout"), (out, "out")], || {
            be(h)?.softmax_rows_backward(tm(dinp, "dinp")?, tr(dout, "dout")?, tr(out, "out")?, rows, cols)
        })
    }
    unsafe extern "C" fn layer_norm(
        h: Hd,
        out: Td,
        mean: Td,
        rstd: Td,
        inp: Td,
        weight: Td,
        bias: Td,
        rows: usize,
        cols: usize,
        eps: f32,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(out, "out"), (mean, "mean"), (rstd, "rstd")],
            &[(inp, "inp"), (weight, "weight"), (bias, "bias")],
            || {
                be(h)?.layer_norm(
                    tm(out, "out")?,
                    tm(mean, "mean")?,
                    tm(rstd, "rstd")?,
                    tr(inp, "inp")?,
                    otr(weight, "weight")?,
                    otr(bias, "bias")?,
                    rows,
                    cols,
                    eps,
                )
            },
        )
    }
    unsafe extern "C" fn layer_norm_backward(
        h: Hd,
        dinp: Td,
        dweight: Td,
        dbias: Td,
        dout: Td,
        inp: Td,
        mean: Td,
        rstd: Td,
        weight: Td,
        rows: usize,
        cols: usize,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(dinp, "dinp"), (dweight, "dweight"), (dbias, "dbias")],
            &[
                (dout, "dout"),
                (inp, "inp"),
                (mean, "mean"),
                (rstd, "rstd"),
                (weight, "weight"),
            ],
            || {
                be(h)?.layer_norm_backward(
                    tm(dinp, "dinp")?,
                    otm(dweight, "dweight")?,
                    otm(dbias, "dbias")?,
                    tr(dout, "dout")?,
                    tr(inp, "inp")?,
                    tr(mean, "mean")?,
                    tr(rstd, "rstd")?,
                    otr(weight, "weight")?,
                    rows,
                    cols,
                )
            },
        )
    }
    unsafe extern "C" fn unary(h: Hd, op: u32, out: Td, inp: Td, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.unary(unary_op(op)?, tm(out, "out")?, tr(inp, "inp")?)
        })
    }
    unsafe extern "C" fn unary_backward(h: Hd, op: u32, dinp: Td, dout: Td, inp: Td, err: Er) -> i32 {
        checked(err, &[(dinp, "dinp")], &[(dout, "dout"), (inp, "inp")], || {
            be(h)?.unary_backward(unary_op(op)?, tm(dinp, "dinp")?, tr(dout, "dout")?, tr(inp, "inp")?)
        })
    }
    unsafe extern "C" fn modulate(h: Hd, out: Td, inp: Td, m: Td, w: ModChunksC, d: RowDimsC, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp"), (m, "modulation")], || {
            be(h)?.modulate(
                tm(out, "out")?,
                tr(inp, "inp")?,
                tr(m, "modulation")?,
                chunks(w),
                rows(d),
            )
        })
    }
    unsafe extern "C" fn modulate_backward(
        h: Hd,
        dinp: Td,
        dm: Td,
        dout: Td,
        inp: Td,
        m: Td,
        w: ModChunksC,
        d: RowDimsC,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(dinp, "dinp"), (dm, "dmodulation")],
            &[(dout, "dout"), (inp, "inp"), (m, "modulation")],
            || {
                be(h)?.modulate_backward(
                    tm(dinp, "dinp")?,
                    tm(dm, "dmodulation")?,
                    tr(dout, "dout")?,
                    tr(inp, "inp")?,
                    tr(m, "modulation")?,
                    chunks(w),
                    rows(d),
                )
            },
        )
    }
    unsafe extern "C" fn gated_residual(h: Hd, x: Td, y: Td, m: Td, w: ModChunksC, d: RowDimsC, err: Er) -> i32 {
        checked(err, &[(x, "x")], &[(y, "y"), (m, "modulation")], || {
            be(h)?.gated_residual(tm(x, "x")?, tr(y, "y")?, tr(m, "modulation")?, chunks(w), rows(d))
        })
    }
    unsafe extern "C" fn gated_residual_backward(
        h: Hd,
        dy: Td,
        dm: Td,
        dx: Td,
        y: Td,
        m: Td,
        w: ModChunksC,
        d: RowDimsC,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(dy, "dy"), (dm, "dmodulation")],
            &[(dx, "dx"), (y, "y"), (m, "modulation")],
            || {
                be(h)?.gated_residual_backward(
                    tm(dy, "dy")?,
                    tm(dm, "dmodulation")?,
                    tr(dx, "dx")?,
                    tr(y, "y")?,
                    tr(m, "modulation")?,
                    chunks(w),
                    rows(d),
                )
            },
        )
    }
    unsafe extern "C" fn patchify(h: Hd, out: Td, inp: Td, d: PatchDimsC, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.patchify(tm(out, "out")?, tr(inp, "inp")?, patch(d))
        })
    }
    unsafe extern "C" fn unpatchify(h: Hd, out: Td, inp: Td, d: PatchDimsC, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp")], || {
            be(h)?.unpatchify(tm(out, "out")?, tr(inp, "inp")?, patch(d))
        })
    }
    unsafe extern "C" fn timestep_features(h: Hd, out: Td, t: Td, dim: usize, max_period: f32, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(t, "t")], || {
            be(h)?.timestep_features(tm(out, "out")?, tr(t, "t")?, dim, max_period)
        })
    }
    unsafe extern "C" fn attention(
        h: Hd,
        out: Td,
        probs: Td,
        q: Td,
        k: Td,
        v: Td,
        mask: Td,
        d: AttnDimsC,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(out, "out"), (probs, "probs")],
            &[(q, "q"), (k, "k"), (v, "v"), (mask, "key_mask")],
            || {
                be(h)?.attention(
                    tm(out, "out")?,
                    otm(probs, "probs")?,
                    tr(q, "q")?,
                    tr(k, "k")?,
                    tr(v, "v")?,
                    otr(mask, "key_mask")?,
                    attn_dims(d),
                )
            },
        )
    }
    unsafe extern "C" fn attention_backward(
        h: Hd,
        dq: Td,
        dk: Td,
        dv: Td,
        dout: Td,
        probs: Td,
        q: Td,
        k: Td,
        v: Td,
        d: AttnDimsC,
        err: Er,
    ) -> i32 {
        checked(
            err,
            &[(dq, "dq"), (dk, "dk"), (dv, "dv")],
            &[(dout, "dout"), (probs, "probs"), (q, "q"), (k, "k"), (v, "v")],
            || {
                be(h)?.attention_backward(
                    tm(dq, "dq")?,
                    tm(dk, "dk")?,
                    tm(dv, "dv")?,
                    tr(dout, "dout")?,
                    tr(probs, "probs")?,
                    tr(q, "q")?,
                    tr(k, "k")?,
                    tr(v, "v")?,
                    attn_dims(d),
                )
            },
        )
    }
    unsafe extern "C" fn gather_rows(h: Hd, out: Td, inp: Td, idx: Td, cols: usize, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(inp, "inp"), (idx, "idx")], || {
            be(h)?.gather_rows(tm(out, "out")?, tr(inp, "inp")?, tr(idx, "idx")?, cols)
        })
    }
    unsafe extern "C" fn scatter_add_rows(h: Hd, out: Td, inp: Td, idx: Td, scale: Td, cols: usize, err: Er) -> i32 {
        checked(
            err,
            &[(out, "out")],
            &[(inp, "inp"), (idx, "idx"), (scale, "scale")],
            || {
                be(h)?.scatter_add_rows(
                    tm(out, "out")?,
                    tr(inp, "inp")?,
                    tr(idx, "idx")?,
                    otr(scale, "scale")?,
                    cols,
                )
            },
        )
    }
    unsafe extern "C" fn gather_dot(h: Hd, out: Td, a: Td, idx: Td, b: Td, cols: usize, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(a, "a"), (idx, "idx"), (b, "b")], || {
            be(h)?.gather_dot(tm(out, "out")?, tr(a, "a")?, tr(idx, "idx")?, tr(b, "b")?, cols)
        })
    }
    unsafe extern "C" fn top_k_rows(
        h: Hd,
        idx: Td,
        val: Td,
        inp: Td,
        rows: usize,
        cols: usize,
        k: usize,
        err: Er,
    ) -> i32 {
        checked(err, &[(idx, "idx"), (val, "val")], &[(inp, "inp")], || {
            be(h)?.top_k_rows(tm(idx, "idx")?, tm(val, "val")?, tr(inp, "inp")?, rows, cols, k)
        })
    }
    unsafe extern "C" fn router_softmax(h: Hd, out: Td, scores: Td, rows: usize, experts: usize, err: Er) -> i32 {
        checked(err, &[(out, "out")], &[(scores, "scores")], || {
            be(h)?.router_softmax(tm(out, "out")?, tr(scores, "scores")?, rows, experts)
        })
    }
    unsafe extern "C" fn top_k_tokens(
        h: Hd,
        idx: Td,
        val: Td,
        probs: Td,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
        err: Er,
    ) -> i32 {
        checked(err, &[(idx, "idx"), (val, "val")], &[(probs, "probs")], || {
            be(h)?.top_k_tokens(
                tm(idx, "idx")?,
                tm(val, "val")?,
                tr(probs, "probs")?,
                groups,
                group_rows,
                experts,
                k,
            )
        })
    }
    unsafe extern "C" fn adamw_step(h: Hd, param: Td, grad: Td, m: Td, v: Td, hp: AdamWC, step: u64, err: Er) -> i32 {
        checked(err, &[(param, "param"), (m, "m"), (v, "v")], &[(grad, "grad")], || {
            let hp = AdamW {
                lr: hp.lr,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                weight_decay: hp.weight_decay,
            };
            be(h)?.adamw_step(
                tm(param, "param")?,
                tr(grad, "grad")?,
                tm(m, "m")?,
                tm(v, "v")?,
                hp,
                step,
            )
        })
    }

    BackendVtable {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<BackendVtable>() as u32,
        kind: std::ptr::null(),
        description: std::ptr::null(),
        params_json: std::ptr::null(),
        ctx,
        create: None,
        destroy: None,
        name: Some(name),
        threads: Some(threads),
        supports: Some(supports),
        alloc: Some(alloc),
        buffer_free: Some(buffer_free),
        buffer_host_ptr: Some(buffer_host_ptr),
        upload: Some(upload),
        download: Some(download),
        copy: Some(copy),
        fill: Some(fill),
        gemm: Some(gemm),
        gemm_batched: Some(gemm_batched),
        gemm_grouped: Some(gemm_grouped),
        add_broadcast: Some(add_broadcast),
        axpby: Some(axpby),
        sum_rows: Some(sum_rows),
        softmax_rows: Some(softmax_rows),
        softmax_rows_backward: Some(softmax_rows_backward),
        layer_norm: Some(layer_norm),
        layer_norm_backward: Some(layer_norm_backward),
        unary: Some(unary),
        unary_backward: Some(unary_backward),
        modulate: Some(modulate),
        modulate_backward: Some(modulate_backward),
        gated_residual: Some(gated_residual),
        gated_residual_backward: Some(gated_residual_backward),
        patchify: Some(patchify),
        unpatchify: Some(unpatchify),
        timestep_features: Some(timestep_features),
        attention: Some(attention),
        attention_backward: Some(attention_backward),
        gather_rows: Some(gather_rows),
        scatter_add_rows: Some(scatter_add_rows),
        gather_dot: Some(gather_dot),
        top_k_rows: Some(top_k_rows),
        router_softmax: Some(router_softmax),
        top_k_tokens: Some(top_k_tokens),
        adamw_step: Some(adamw_step),
        buffer_written: Some(buffer_written),
    }
}
