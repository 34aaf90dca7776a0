//! Backends from a plugin: a [`BackendVtable`] and an instance handle as a
//! `dyn Backend`. Buffers are the plugin's handles inside a [`TableStorage`];
//! each op turns its views into [`TensorDesc`]s of those handles.
//!
//! The same adapter serves the other direction: a plugin expert sees the
//! host's lent backend ([`BackendRef`]) through it.
//!
//! Slots are optional except the memory ones: a NULL op (or one beyond the
//! table's `struct_size`) runs the trait's default body where there is one
//! (`threads`, `supports`, `gemm_grouped`) and otherwise fails naming the
//! plugin and the op.

use super::{intern, Call};
use crate::backend::{gemm_grouped_by_gemm, AdamW, AttnDims, Backend, GemmDims, ModChunks, PatchDims, RowDims, Unary};
use crate::buffer::{Buffer, BufferStorage, HOST_ALIGN};
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::plugin::abi::*;
use crate::plugin::{cstr, read_table};
use crate::tensor::{Tensor, TensorMut, TensorRef};
use std::any::Any;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One buffer of a table backend: the plugin's handle, freed through the
/// table when owned.
pub(crate) struct TableStorage {
    handle: *mut c_void,
    len: usize,
    host: Option<NonNull<u8>>,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
    /// The table's `buffer_written`, told of host writes through `host`.
    written: Option<unsafe extern "C" fn(*mut c_void)>,
    owned: AtomicBool,
    /// Which handle space the handle belongs to (see [`TableBackend::id`]).
    table: (usize, usize),
}

// SAFETY: the ABI requires buffer handles to be usable from any thread.
unsafe impl Send for TableStorage {}
unsafe impl Sync for TableStorage {}

impl Drop for TableStorage {
    fn drop(&mut self) {
        if let (true, Some(free)) = (self.owned.load(Ordering::Acquire), self.free) {
            // SAFETY: the handle came from this table's `alloc` and is freed once.
            unsafe { free(self.handle) }
        }
    }
}

impl BufferStorage for TableStorage {
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        self.host
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn written(&self) {
        if let Some(f) = self.written {
            // SAFETY: an optional slot over a live handle of its table.
            unsafe { f(self.handle) }
        }
    }
}

/// A backend behind a table.
pub(crate) struct TableBackend {
    vt: BackendVtable,
    handle: *mut c_void,
    /// Destroy the instance on drop (a registered plugin backend; not a lent one).
    owned: bool,
    plugin: Arc<str>,
    name: &'static str,
}

// SAFETY: the ABI requires instance handles to be usable from any thread.
unsafe impl Send for TableBackend {}
unsafe impl Sync for TableBackend {}

impl Drop for TableBackend {
    fn drop(&mut self) {
        if let (true, Some(destroy)) = (self.owned, self.vt.destroy) {
            // SAFETY: the handle came from this table's `create`, dropped once.
            unsafe { destroy(self.handle) }
        }
    }
}

/// The slots a backend table must fill (checked at load).
pub(crate) fn missing_slots(vt: &BackendVtable, with_create: bool) -> Vec<String> {
    let mut slots = vec![
        ("name", vt.name.is_some()),
        ("alloc", vt.alloc.is_some()),
        ("buffer_free", vt.buffer_free.is_some()),
        ("upload", vt.upload.is_some()),
        ("download", vt.download.is_some()),
    ];
    if with_create {
        slots.splice(
            0..0,
            [("create", vt.create.is_some()), ("destroy", vt.destroy.is_some())],
        );
    }
    slots.iter().filter(|(_, ok)| !ok).map(|(n, _)| n.to_string()).collect()
}

impl TableBackend {
    /// Wraps an instance made by the table's `create`; destroyed on drop.
    pub(crate) fn owned(vt: BackendVtable, handle: *mut c_void, plugin: Arc<str>, kind: &str) -> Self {
        // SAFETY: `name` is a required slot, checked at load.
        let name = vt
            .name
            .and_then(|f| unsafe { cstr(f(handle)) })
            .unwrap_or_else(|| kind.to_string());
        Self {
            vt,
            handle,
            owned: true,
            plugin,
            name: intern(&name),
        }
    }

    /// Wraps a backend lent by the host for one call (never destroyed here).
    ///
    /// # Safety
    /// `r` is null or points to a [`BackendRef`] whose table and handle stay
    /// valid while the result lives.
    pub(crate) unsafe fn lent(r: *const BackendRef, plugin: &str) -> Result<Self> {
        let bad = |reason: String| EngineError::Plugin {
            plugin: plugin.to_string(),
            reason,
        };
        let r = r
            .as_ref()
            .ok_or_else(|| bad("the lent backend is a null pointer".into()))?;
        if r.vtable.is_null() {
            return Err(bad("the lent backend has a null table".into()));
        }
        let (version, size) = super::header_of(r.vtable as *const c_void);
        if version != ABI_VERSION {
            return Err(bad(format!(
                "the lent backend speaks ABI version {version}, this engine speaks version {ABI_VERSION}"
            )));
        }
        super::check_header(
            "the lent backend's table",
            version,
            ABI_VERSION,
            size,
            std::mem::offset_of!(BackendVtable, copy),
        )
        .map_err(bad)?;
        let vt: BackendVtable = read_table(r.vtable as *const c_void, size as usize);
        let missing = missing_slots(&vt, false);
        if !missing.is_empty() {
            return Err(bad(format!(
                "the lent backend leaves required slots null: {}",
                missing.join(", ")
            )));
        }
        let name = vt.name.and_then(|f| cstr(f(r.handle))).unwrap_or_else(|| "host".into());
        Ok(Self {
            vt,
            handle: r.handle,
            owned: false,
            plugin: Arc::from(plugin),
            name: intern(&name),
        })
    }

    /// The handle space of this backend's buffers: the address of its
    /// table's `alloc` and the instance handle. Buffers of another instance
    /// of the same table (another device, another context) do not pass.
    fn id(&self) -> (usize, usize) {
        (self.vt.alloc.map_or(0, |f| f as usize), self.handle as usize)
    }

    fn fail(&self, reason: String) -> EngineError {
        EngineError::Plugin {
            plugin: self.plugin.to_string(),
            reason,
        }
    }

    /// A slot, or the "does not implement" error.
    fn slot<F>(&self, op: &str, f: Option<F>) -> Result<F> {
        f.ok_or_else(|| self.fail(format!("does not implement op {op} (backend '{}')", self.name)))
    }

    /// Runs one call with a fresh error buffer and checks its status.
    fn run(&self, op: &str, body: impl FnOnce(*mut ErrBuf) -> i32) -> Result<()> {
        let mut call = Call::new();
        let mut err = call.err();
        let status = body(&mut err);
        call.check(status, &self.plugin, format_args!("backend '{}' {op}", self.name))
    }

    fn storage<'b>(&self, buffer: &'b Buffer, op: &str) -> Result<&'b TableStorage> {
        let s = buffer.downcast::<TableStorage>(op, self.name)?;
        if s.table != self.id() {
            return Err(EngineError::Backend {
                backend: self.name.into(),
                reason: format!("{op}: a tensor lives in a buffer of backend '{}'", buffer.backend()),
            });
        }
        Ok(s)
    }

    fn desc(&self, buffer: &Buffer, offset: usize, shape: &[usize], dtype: DType, op: &str) -> Result<TensorDesc> {
        let s = self.storage(buffer, op)?;
        let mut d = TensorDesc {
            buffer: s.handle,
            offset,
            dtype: dtype as u32,
            rank: shape.len() as u32,
            dims: [0; MAX_RANK],
        };
        d.dims[..shape.len()].copy_from_slice(shape);
        Ok(d)
    }

    fn r(&self, t: &TensorRef<'_>, op: &str) -> Result<TensorDesc> {
        self.desc(t.buffer(), t.offset(), t.shape(), t.dtype(), op)
    }

    fn m(&self, t: &TensorMut<'_>, op: &str) -> Result<TensorDesc> {
        self.desc(t.buffer(), t.offset(), t.shape(), t.dtype(), op)
    }

    fn or(&self, t: &Option<TensorRef<'_>>, op: &str) -> Result<Option<TensorDesc>> {
        t.as_ref().map(|t| self.r(t, op)).transpose()
    }

    fn om(&self, t: &Option<TensorMut<'_>>, op: &str) -> Result<Option<TensorDesc>> {
        t.as_ref().map(|t| self.m(t, op)).transpose()
    }

    /// The buffer's host memory, if the plugin announces one: a pointer not
    /// aligned to [`HOST_ALIGN`] is taken as "not host memory" (host code
    /// reads host buffers as any element type).
    /// Checks the host side of `upload`/`download` against the view before
    /// the plugin sees the pointer and length.
    fn byte_len(&self, op: &str, len: usize, view: usize) -> Result<()> {
        if len == view {
            Ok(())
        } else {
            Err(self.fail(format!(
                "{op}: length {len} bytes, but the view holds {view} bytes (checked by the host before \
                 calling backend '{}')",
                self.name
            )))
        }
    }

    fn host_ptr(&self, handle: *mut c_void) -> Option<NonNull<u8>> {
        // SAFETY: an optional slot over a handle of this table.
        self.vt
            .buffer_host_ptr
            .and_then(|f| NonNull::new(unsafe { f(handle) } as *mut u8))
            .filter(|p| (p.as_ptr() as usize).is_multiple_of(HOST_ALIGN))
    }

    /// A buffer over a handle of this table that the caller keeps owning
    /// (a lent backend's tensors during one expert call). Its length is what
    /// the view needs, the only part anyone may touch.
    pub(crate) fn borrow(&self, d: &TensorDesc, what: &str) -> Result<Buffer> {
        let (_, _, len) = d.decode(what)?;
        if d.buffer.is_null() {
            return Err(EngineError::Other(format!("{what}: null buffer handle")));
        }
        Ok(Buffer::new(
            Box::new(TableStorage {
                handle: d.buffer,
                len,
                host: self.host_ptr(d.buffer),
                free: None,
                written: self.vt.buffer_written,
                owned: AtomicBool::new(false),
                table: self.id(),
            }),
            self.name,
        ))
    }

    /// Hands a tensor this backend allocated to whoever `push` gives it to:
    /// on success the buffer is no longer freed here.
    pub(crate) fn hand_over(&self, t: Tensor, push: impl FnOnce(&TensorDesc) -> Result<()>) -> Result<()> {
        let s = self.storage(t.buffer(), "hand over")?;
        if t.numel() * t.dtype().size() > s.len || !s.owned.load(Ordering::Acquire) {
            return Err(EngineError::Other(format!(
                "only a whole tensor this backend allocated can be handed over (backend '{}')",
                self.name
            )));
        }
        let d = self.desc(t.buffer(), 0, t.shape(), t.dtype(), "hand over")?;
        push(&d)?;
        s.owned.store(false, Ordering::Release);
        Ok(())
    }
}

fn opt(d: &Option<TensorDesc>) -> *const TensorDesc {
    d.as_ref().map_or(std::ptr::null(), |d| d as *const TensorDesc)
}

fn gemm_c(d: GemmDims) -> GemmDimsC {
    GemmDimsC {
        m: d.m,
        n: d.n,
        k: d.k,
        trans_a: d.trans_a as u32,
        trans_b: d.trans_b as u32,
    }
}

fn attn_c(d: AttnDims) -> AttnDimsC {
    AttnDimsC {
        batch: d.batch,
        heads: d.heads,
        kv_heads: d.kv_heads,
        q_len: d.q_len,
        kv_len: d.kv_len,
        head_dim: d.head_dim,
    }
}

fn chunks_c(c: ModChunks) -> ModChunksC {
    ModChunksC {
        chunks: c.chunks,
        first: c.first,
        second: c.second,
    }
}

fn rows_c(d: RowDims) -> RowDimsC {
    RowDimsC {
        batch: d.batch,
        tokens: d.tokens,
        d: d.d,
    }
}

fn patch_c(d: PatchDims) -> PatchDimsC {
    PatchDimsC {
        batch: d.batch,
        channels: d.channels,
        height: d.height,
        width: d.width,
        patch: d.patch,
        channels_fastest: d.channels_fastest as u32,
    }
}

fn unary_c(op: Unary) -> u32 {
    match op {
        Unary::GeluTanh => UNARY_GELU_TANH,
        Unary::Silu => UNARY_SILU,
    }
}

// Every op: fetch the slot (or fail naming it), turn views into descriptors
// (checking they are this backend's), call, check the status.
impl Backend for TableBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn threads(&self) -> usize {
        // SAFETY: an optional slot over this table's handle.
        self.vt.threads.map_or(1, |f| unsafe { f(self.handle) })
    }

    fn supports(&self, dtype: DType) -> bool {
        match self.vt.supports {
            // SAFETY: an optional slot over this table's handle.
            Some(f) => unsafe { f(self.handle, dtype as u32) != 0 },
            None => matches!(dtype, DType::F32 | DType::U32 | DType::U8),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let f = self.slot("alloc", self.vt.alloc)?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        self.run("alloc", |e| unsafe { f(self.handle, bytes, &mut handle, e) })?;
        if handle.is_null() {
            return Err(self.fail(format!("backend '{}' alloc returned a null buffer", self.name)));
        }
        Ok(Buffer::new(
            Box::new(TableStorage {
                handle,
                len: bytes,
                host: self.host_ptr(handle),
                free: self.vt.buffer_free,
                written: self.vt.buffer_written,
                owned: AtomicBool::new(true),
                table: self.id(),
            }),
            self.name,
        ))
    }

    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        let f = self.slot("upload", self.vt.upload)?;
        self.byte_len("upload", src.len(), dst.byte_len())?;
        let dst = self.m(&dst, "upload")?;
        self.run("upload", |e| unsafe {
            f(self.handle, &dst, src.as_ptr() as *const c_void, src.len(), e)
        })
    }

    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        let f = self.slot("download", self.vt.download)?;
        self.byte_len("download", dst.len(), src.byte_len())?;
        let src = self.r(&src, "download")?;
        self.run("download", |e| unsafe {
            f(self.handle, dst.as_mut_ptr() as *mut c_void, dst.len(), &src, e)
        })
    }

    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        let f = self.slot("copy", self.vt.copy)?;
        let (dst, src) = (self.m(&dst, "copy")?, self.r(&src, "copy")?);
        self.run("copy", |e| unsafe { f(self.handle, &dst, &src, e) })
    }

    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        let f = self.slot("fill", self.vt.fill)?;
        let dst = self.m(&dst, "fill")?;
        self.run("fill", |e| unsafe { f(self.handle, &dst, value, e) })
    }

    fn gemm(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let op = "gemm";
        let f = self.slot(op, self.vt.gemm)?;
        let (out, a, b, bias) = (self.m(&out, op)?, self.r(&a, op)?, self.r(&b, op)?, self.or(&bias, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &out, &a, &b, opt(&bias), gemm_c(dims), alpha, beta, e)
        })
    }

    fn gemm_batched(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        batch: usize,
        dims: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let op = "gemm_batched";
        let f = self.slot(op, self.vt.gemm_batched)?;
        let (out, a, b) = (self.m(&out, op)?, self.r(&a, op)?, self.r(&b, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &out, &a, &b, batch, gemm_c(dims), alpha, beta, e)
        })
    }

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
        let op = "gemm_grouped";
        let Some(f) = self.vt.gemm_grouped else {
            return gemm_grouped_by_gemm(self, out, a, b, group_rows, n, k, trans_b, alpha, beta);
        };
        let (out, a, b) = (self.m(&out, op)?, self.r(&a, op)?, self.r(&b, op)?);
        self.run(op, |e| unsafe {
            f(
                self.handle,
                &out,
                &a,
                &b,
                group_rows.as_ptr(),
                group_rows.len(),
                n,
                k,
                trans_b as u32,
                alpha,
                beta,
                e,
            )
        })
    }

    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        let op = "add_broadcast";
        let f = self.slot(op, self.vt.add_broadcast)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &inp, e) })
    }

    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        let op = "axpby";
        let f = self.slot(op, self.vt.axpby)?;
        let (y, x) = (self.m(&y, op)?, self.r(&x, op)?);
        self.run(op, |e| unsafe { f(self.handle, &y, a, &x, b, e) })
    }

    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let op = "sum_rows";
        let f = self.slot(op, self.vt.sum_rows)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &out, &inp, rows, cols, accumulate as u32, e)
        })
    }

    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
        let op = "softmax_rows";
        let f = self.slot(op, self.vt.softmax_rows)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &inp, rows, cols, e) })
    }

    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "softmax_rows_backward";
        let f = self.slot(op, self.vt.softmax_rows_backward)?;
        let (dinp, dout, out) = (self.m(&dinp, op)?, self.r(&dout, op)?, self.r(&out, op)?);
        self.run(op, |e| unsafe { f(self.handle, &dinp, &dout, &out, rows, cols, e) })
    }

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
    ) -> Result<()> {
        let op = "layer_norm";
        let f = self.slot(op, self.vt.layer_norm)?;
        let (out, mean, rstd) = (self.m(&out, op)?, self.m(&mean, op)?, self.m(&rstd, op)?);
        let (inp, weight, bias) = (self.r(&inp, op)?, self.or(&weight, op)?, self.or(&bias, op)?);
        self.run(op, |e| unsafe {
            f(
                self.handle,
                &out,
                &mean,
                &rstd,
                &inp,
                opt(&weight),
                opt(&bias),
                rows,
                cols,
                eps,
                e,
            )
        })
    }

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
    ) -> Result<()> {
        let op = "layer_norm_backward";
        let f = self.slot(op, self.vt.layer_norm_backward)?;
        let (dinp, dweight, dbias) = (self.m(&dinp, op)?, self.om(&dweight, op)?, self.om(&dbias, op)?);
        let (dout, inp, mean, rstd) = (
            self.r(&dout, op)?,
            self.r(&inp, op)?,
            self.r(&mean, op)?,
            self.r(&rstd, op)?,
        );
        let weight = self.or(&weight, op)?;
        self.run(op, |e| unsafe {
            f(
                self.handle,
                &dinp,
                opt(&dweight),
                opt(&dbias),
                &dout,
                &inp,
                &mean,
                &rstd,
                opt(&weight),
                rows,
                cols,
                e,
            )
        })
    }

    fn unary(&self, un: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        let op = "unary";
        let f = self.slot(op, self.vt.unary)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, unary_c(un), &out, &inp, e) })
    }

    fn unary_backward(&self, un: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()> {
        let op = "unary_backward";
        let f = self.slot(op, self.vt.unary_backward)?;
        let (dinp, dout, inp) = (self.m(&dinp, op)?, self.r(&dout, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, unary_c(un), &dinp, &dout, &inp, e) })
    }

    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "modulate";
        let f = self.slot(op, self.vt.modulate)?;
        let (out, inp, m) = (self.m(&out, op)?, self.r(&inp, op)?, self.r(&modulation, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &out, &inp, &m, chunks_c(which), rows_c(dims), e)
        })
    }

    fn modulate_backward(
        &self,
        dinp: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "modulate_backward";
        let f = self.slot(op, self.vt.modulate_backward)?;
        let (dinp, dm) = (self.m(&dinp, op)?, self.m(&dmodulation, op)?);
        let (dout, inp, m) = (self.r(&dout, op)?, self.r(&inp, op)?, self.r(&modulation, op)?);
        self.run(op, |e| unsafe {
            f(
                self.handle,
                &dinp,
                &dm,
                &dout,
                &inp,
                &m,
                chunks_c(which),
                rows_c(dims),
                e,
            )
        })
    }

    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "gated_residual";
        let f = self.slot(op, self.vt.gated_residual)?;
        let (x, y, m) = (self.m(&x, op)?, self.r(&y, op)?, self.r(&modulation, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &x, &y, &m, chunks_c(which), rows_c(dims), e)
        })
    }

    fn gated_residual_backward(
        &self,
        dy: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dx: TensorRef<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "gated_residual_backward";
        let f = self.slot(op, self.vt.gated_residual_backward)?;
        let (dy, dm) = (self.m(&dy, op)?, self.m(&dmodulation, op)?);
        let (dx, y, m) = (self.r(&dx, op)?, self.r(&y, op)?, self.r(&modulation, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &dy, &dm, &dx, &y, &m, chunks_c(which), rows_c(dims), e)
        })
    }

    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        let op = "patchify";
        let f = self.slot(op, self.vt.patchify)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &inp, patch_c(dims), e) })
    }

    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        let op = "unpatchify";
        let f = self.slot(op, self.vt.unpatchify)?;
        let (out, inp) = (self.m(&out, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &inp, patch_c(dims), e) })
    }

    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()> {
        let op = "timestep_features";
        let f = self.slot(op, self.vt.timestep_features)?;
        let (out, t) = (self.m(&out, op)?, self.r(&t, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &t, dim, max_period, e) })
    }

    fn attention(
        &self,
        out: TensorMut<'_>,
        probs: Option<TensorMut<'_>>,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
        key_mask: Option<TensorRef<'_>>,
        dims: AttnDims,
    ) -> Result<()> {
        let op = "attention";
        let f = self.slot(op, self.vt.attention)?;
        let (out, probs) = (self.m(&out, op)?, self.om(&probs, op)?);
        let (q, k, v, mask) = (
            self.r(&q, op)?,
            self.r(&k, op)?,
            self.r(&v, op)?,
            self.or(&key_mask, op)?,
        );
        self.run(op, |e| unsafe {
            f(self.handle, &out, opt(&probs), &q, &k, &v, opt(&mask), attn_c(dims), e)
        })
    }

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
    ) -> Result<()> {
        let op = "attention_backward";
        let f = self.slot(op, self.vt.attention_backward)?;
        let (dq, dk, dv) = (self.m(&dq, op)?, self.m(&dk, op)?, self.m(&dv, op)?);
        let (dout, probs) = (self.r(&dout, op)?, self.r(&probs, op)?);
        let (q, k, v) = (self.r(&q, op)?, self.r(&k, op)?, self.r(&v, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &dq, &dk, &dv, &dout, &probs, &q, &k, &v, attn_c(dims), e)
        })
    }

    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()> {
        let op = "gather_rows";
        let f = self.slot(op, self.vt.gather_rows)?;
        let (out, inp, idx) = (self.m(&out, op)?, self.r(&inp, op)?, self.r(&idx, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &inp, &idx, cols, e) })
    }

    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        let f = self.slot(op, self.vt.scatter_add_rows)?;
        let (out, inp, idx, scale) = (
            self.m(&out, op)?,
            self.r(&inp, op)?,
            self.r(&idx, op)?,
            self.or(&scale, op)?,
        );
        self.run(op, |e| unsafe {
            f(self.handle, &out, &inp, &idx, opt(&scale), cols, e)
        })
    }

    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        let op = "gather_dot";
        let f = self.slot(op, self.vt.gather_dot)?;
        let (out, a, idx, b) = (self.m(&out, op)?, self.r(&a, op)?, self.r(&idx, op)?, self.r(&b, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &a, &idx, &b, cols, e) })
    }

    fn top_k_rows(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        let op = "top_k_rows";
        let f = self.slot(op, self.vt.top_k_rows)?;
        let (idx, val, inp) = (self.m(&idx, op)?, self.m(&val, op)?, self.r(&inp, op)?);
        self.run(op, |e| unsafe { f(self.handle, &idx, &val, &inp, rows, cols, k, e) })
    }

    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()> {
        let op = "router_softmax";
        let f = self.slot(op, self.vt.router_softmax)?;
        let (out, scores) = (self.m(&out, op)?, self.r(&scores, op)?);
        self.run(op, |e| unsafe { f(self.handle, &out, &scores, rows, experts, e) })
    }

    fn top_k_tokens(
        &self,
        idx: TensorMut<'_>,
        val: TensorMut<'_>,
        probs: TensorRef<'_>,
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()> {
        let op = "top_k_tokens";
        let f = self.slot(op, self.vt.top_k_tokens)?;
        let (idx, val, probs) = (self.m(&idx, op)?, self.m(&val, op)?, self.r(&probs, op)?);
        self.run(op, |e| unsafe {
            f(self.handle, &idx, &val, &probs, groups, group_rows, experts, k, e)
        })
    }

    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        let op = "adamw_step";
        let f = self.slot(op, self.vt.adamw_step)?;
        let (param, grad, m, v) = (
            self.m(&param, op)?,
            self.r(&grad, op)?,
            self.m(&m, op)?,
            self.m(&v, op)?,
        );
        let hp = AdamWC {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
        };
        self.run(op, |e| unsafe { f(self.handle, &param, &grad, &m, &v, hp, step, e) })
    }
}

/// Registers one checked backend kind.
pub(crate) fn register(
    registry: &mut crate::registry::Registry,
    info: crate::registry::ComponentInfo,
    vt: super::Table<BackendVtable>,
    plugin: Arc<str>,
) -> Result<()> {
    let kind = info.kind.clone();
    registry.register_backend(
        info,
        Arc::new(move |params| {
            let vt = vt.get();
            let handle = super::create_instance(&plugin, "backend", &kind, vt.create, vt.ctx, params)?;
            Ok(Box::new(TableBackend::owned(vt, handle, plugin.clone(), &kind)) as Box<dyn Backend>)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lent table of `struct_size` (all slots NULL), as a buggy plugin might hand back.
    fn lent_with_size(struct_size: u32) -> String {
        // SAFETY: all-zero is a valid table (NULL pointers).
        let mut vt: BackendVtable = unsafe { std::mem::zeroed() };
        vt.abi_version = ABI_VERSION;
        vt.struct_size = struct_size;
        let r = BackendRef {
            vtable: &vt,
            handle: std::ptr::null_mut(),
        };
        // SAFETY: `r` and its table outlive the call; the size is what is tested.
        match unsafe { TableBackend::lent(&r, "bad-plugin") } {
            Ok(_) => "accepted".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_lent_table_of_a_wrong_size_is_refused_naming_the_plugin() {
        let copy = std::mem::offset_of!(BackendVtable, copy) as u32;
        let short = lent_with_size(copy - 8);
        assert!(
            short.contains("bad-plugin") && short.contains("needs at least"),
            "{short}"
        );
        let ragged = lent_with_size(copy + 3);
        assert!(ragged.contains("not a multiple of 8"), "{ragged}");
    }
}
