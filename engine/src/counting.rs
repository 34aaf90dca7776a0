//! A transfer-counting backend for tests: it computes with any host-memory
//! backend it wraps, but its buffers refuse host views, so the only way for
//! host code to reach their data is an explicit `upload` or `download`, and
//! it counts the bytes each moves. A test wraps the CPU backend in it and
//! shows that a whole forward moves only its inputs and outputs.

use crate::backend::{AdamW, AttnDims, Backend, GemmDims, ModChunks, PatchDims, RmsProp, RowDims, Unary};
use crate::buffer::{Buffer, BufferStorage};
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::tensor::{TensorMut, TensorRef};
use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes and calls moved by explicit transfers so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Bytes copied host to device.
    pub uploaded_bytes: u64,
    /// Upload calls.
    pub uploads: u64,
    /// Bytes copied device to host.
    pub downloaded_bytes: u64,
    /// Download calls.
    pub downloads: u64,
}

/// The counting wrapper around an inner backend.
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    uploaded_bytes: AtomicU64,
    uploads: AtomicU64,
    downloaded_bytes: AtomicU64,
    downloads: AtomicU64,
}

/// A buffer of the inner backend, hidden from the host.
struct CountingStorage {
    inner: Buffer,
}

impl BufferStorage for CountingStorage {
    fn len_bytes(&self) -> usize {
        self.inner.len_bytes()
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        None // the point of this backend: no host views
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

const NAME: &str = "counting";

impl CountingBackend {
    /// Wraps `inner` (whose ops must accept its own buffers).
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            uploaded_bytes: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            downloaded_bytes: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
        }
    }

    /// The counts so far.
    pub fn transfers(&self) -> Transfers {
        Transfers {
            uploaded_bytes: self.uploaded_bytes.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            downloaded_bytes: self.downloaded_bytes.load(Ordering::Relaxed),
            downloads: self.downloads.load(Ordering::Relaxed),
        }
    }

    /// Sets every count back to zero.
    pub fn reset(&self) {
        for c in [
            &self.uploaded_bytes,
            &self.uploads,
            &self.downloaded_bytes,
            &self.downloads,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

fn inner_buffer<'a>(buffer: &'a Buffer, op: &str) -> Result<&'a Buffer> {
    Ok(&buffer.downcast::<CountingStorage>(op, NAME)?.inner)
}

/// The same view over the inner backend's buffer.
fn r<'a>(v: TensorRef<'a>) -> Result<TensorRef<'a>> {
    let inner = inner_buffer(v.buffer(), "counting op")?;
    // SAFETY: the inner buffer is reachable only through this wrapper's buffer,
    // and the new view covers exactly the elements of `v`, for `v`'s lifetime.
    unsafe { TensorRef::from_raw_parts(inner, v.offset(), v.shape(), v.dtype()) }
}

/// The same exclusive view over the inner backend's buffer.
fn m<'a>(v: TensorMut<'a>) -> Result<TensorMut<'a>> {
    let inner = inner_buffer(v.buffer(), "counting op")?;
    // SAFETY: as in `r`; `v` is consumed, so the new view stays exclusive.
    unsafe { TensorMut::from_raw_parts(inner, v.offset(), v.shape(), v.dtype()) }
}

fn ro(v: Option<TensorRef<'_>>) -> Result<Option<TensorRef<'_>>> {
    v.map(r).transpose()
}

fn mo(v: Option<TensorMut<'_>>) -> Result<Option<TensorMut<'_>>> {
    v.map(m).transpose()
}

impl Backend for CountingBackend {
    fn name(&self) -> &str {
        NAME
    }
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    fn supports(&self, dtype: DType) -> bool {
        self.inner.supports(dtype)
    }
    fn gemm_rows_alone(&self) -> usize {
        self.inner.gemm_rows_alone()
    }
    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let inner = self.inner.alloc(bytes)?;
        if !inner.is_host() {
            return Err(EngineError::Backend {
                backend: NAME.into(),
                reason: format!("the wrapped backend '{}' does not give host memory", self.inner.name()),
            });
        }
        Ok(Buffer::new(Box::new(CountingStorage { inner }), NAME))
    }
    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.uploaded_bytes.fetch_add(src.len() as u64, Ordering::Relaxed);
        self.inner.upload(m(dst)?, src)
    }
    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        self.downloaded_bytes.fetch_add(dst.len() as u64, Ordering::Relaxed);
        self.inner.download(dst, r(src)?)
    }
    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        self.inner.copy(m(dst)?, r(src)?)
    }
    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        self.inner.fill(m(dst)?, value)
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
        self.inner.gemm(m(out)?, r(a)?, r(b)?, ro(bias)?, dims, alpha, beta)
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
        self.inner.gemm_batched(m(out)?, r(a)?, r(b)?, batch, dims, alpha, beta)
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
        self.inner
            .gemm_grouped(m(out)?, r(a)?, r(b)?, group_rows, n, k, trans_b, alpha, beta)
    }
    fn gemm_act(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        act: Unary,
    ) -> Result<()> {
        self.inner
            .gemm_act(m(out)?, r(a)?, r(b)?, bias.map(r).transpose()?, dims, act)
    }
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
        self.inner
            .gemm_grouped_bias(m(out)?, r(a)?, r(b)?, r(bias)?, group_rows, n, k, trans_b, act)
    }
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
        let (x, rows, b, bias) = (r(x)?, r(rows)?, r(b)?, r(bias)?);
        self.inner
            .gemm_grouped_bias_gathered(m(out)?, x, rows, b, bias, group_rows, n, k, trans_b, act)
    }
    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.inner.add_broadcast(m(out)?, r(inp)?)
    }
    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        self.inner.axpby(m(y)?, a, r(x)?, b)
    }
    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.inner.sum_rows(m(out)?, r(inp)?, rows, cols, accumulate)
    }
    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
        self.inner.softmax_rows(m(out)?, r(inp)?, rows, cols)
    }
    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.inner
            .softmax_rows_backward(m(dinp)?, r(dout)?, r(out)?, rows, cols)
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
        self.inner.layer_norm(
            m(out)?,
            m(mean)?,
            m(rstd)?,
            r(inp)?,
            ro(weight)?,
            ro(bias)?,
            rows,
            cols,
            eps,
        )
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
        self.inner.layer_norm_backward(
            m(dinp)?,
            mo(dweight)?,
            mo(dbias)?,
            r(dout)?,
            r(inp)?,
            r(mean)?,
            r(rstd)?,
            ro(weight)?,
            rows,
            cols,
        )
    }
    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.inner.unary(op, m(out)?, r(inp)?)
    }
    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()> {
        self.inner.unary_backward(op, m(dinp)?, r(dout)?, r(inp)?)
    }
    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.inner.modulate(m(out)?, r(inp)?, r(modulation)?, which, dims)
    }
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
        self.inner.layer_norm_modulate(
            m(out)?,
            ln.map(m).transpose()?,
            m(mean)?,
            m(rstd)?,
            r(inp)?,
            r(modulation)?,
            which,
            dims,
            eps,
        )
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
        self.inner.modulate_backward(
            m(dinp)?,
            m(dmodulation)?,
            r(dout)?,
            r(inp)?,
            r(modulation)?,
            which,
            dims,
        )
    }
    fn gated_residual(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        self.inner.gated_residual(m(x)?, r(y)?, r(modulation)?, which, dims)
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
        self.inner
            .gated_residual_backward(m(dy)?, m(dmodulation)?, r(dx)?, r(y)?, r(modulation)?, which, dims)
    }
    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.inner.patchify(m(out)?, r(inp)?, dims)
    }
    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        self.inner.unpatchify(m(out)?, r(inp)?, dims)
    }
    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()> {
        self.inner.timestep_features(m(out)?, r(t)?, dim, max_period)
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
        self.inner
            .attention(m(out)?, mo(probs)?, r(q)?, r(k)?, r(v)?, ro(key_mask)?, dims)
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
        self.inner
            .attention_backward(m(dq)?, m(dk)?, m(dv)?, r(dout)?, r(probs)?, r(q)?, r(k)?, r(v)?, dims)
    }
    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()> {
        self.inner.gather_rows(m(out)?, r(inp)?, r(idx)?, cols)
    }
    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        self.inner.scatter_add_rows(m(out)?, r(inp)?, r(idx)?, ro(scale)?, cols)
    }
    fn gather_dot(
        &self,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        idx: TensorRef<'_>,
        b: TensorRef<'_>,
        cols: usize,
    ) -> Result<()> {
        self.inner.gather_dot(m(out)?, r(a)?, r(idx)?, r(b)?, cols)
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
        self.inner.top_k_rows(m(idx)?, m(val)?, r(inp)?, rows, cols, k)
    }
    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()> {
        self.inner.router_softmax(m(out)?, r(scores)?, rows, experts)
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
        self.inner
            .top_k_tokens(m(idx)?, m(val)?, r(probs)?, groups, group_rows, experts, k)
    }
    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m_: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        self.inner.adamw_step(m(param)?, r(grad)?, m(m_)?, m(v)?, hp, step)
    }
    fn rmsprop_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        v: TensorMut<'_>,
        buf: TensorMut<'_>,
        hp: RmsProp,
    ) -> Result<()> {
        self.inner.rmsprop_step(m(param)?, r(grad)?, m(v)?, m(buf)?, hp)
    }
}
