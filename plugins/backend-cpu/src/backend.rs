//! [`CpuBackend`]: the [`Backend`] op set on the CPU, on a thread pool it owns.
//!
//! Buffers are zeroed, aligned host memory ([`HostStorage`]), so every op
//! takes host slices of its views (`slices.rs`: bf16 widened to f32 and
//! rounded back) and runs the f32 kernels of `ops/` inside the pool.

use crate::onednn::attention::Bf16Attention;
use crate::onednn::grouped::{Group, GroupIn, GroupOut};
use crate::onednn::matmul::{whole_k, Data, DataMut, Outcome, Product, Spec, MAX_K_CHUNK};
use crate::onednn::packed::WeightId;
use crate::onednn::{self, OneDnn, OneDnnMode};
use crate::ops;
use crate::ops::gemm::SharedMut;
use crate::ops::numel;
use crate::pool::BufferPool;
use crate::slices::{
    bytes, bytes_mut, elementwise, f32_input, f32_output, indices, indices_mut, input, input_opt, mask, output,
    output_opt, sample_rows,
};
use ecdit_engine::backend::{add_group_bias, check_grouped, gemm_grouped_bias_after_gather};
use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use ecdit_engine::error::{check_len, EngineError, Result};
use ecdit_engine::{
    AdamW, AttnDims, Backend, Buffer, DType, GemmDims, ModChunks, PatchDims, RmsProp, RowDims, TensorMut, TensorRef,
    Unary,
};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::borrow::Cow;
use std::sync::Arc;

/// The CPU backend. It owns a rayon pool of `threads` threads and runs every
/// op inside it: row-wise ops split rows over the pool and the GEMM splits its
/// tiles over the same pool, never both nested (one level of parallelism).
/// Large matrix products go to oneDNN when the library is found (see
/// [`CpuBackend::matmul_library`]), called from the op's calling thread with
/// OpenMP set to the same `threads` while the pool sleeps.
pub struct CpuBackend {
    pool: ThreadPool,
    threads: usize,
    buffers: Arc<BufferPool>,
    /// oneDNN, unless it is off or missing.
    onednn: Option<&'static OneDnn>,
    onednn_mode: OneDnnMode,
    /// What [`CpuBackend::matmul_library`] reports.
    matmul_library: String,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .field("matmul", &self.matmul_library)
            .finish()
    }
}

impl CpuBackend {
    /// A backend computing with `threads` threads; 0 means every core
    /// (`std::thread::available_parallelism`). oneDNN as `ECDIT_ONEDNN` says
    /// ([`OneDnnMode::from_env`]: used where faster unless set to 0).
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_onednn(threads, OneDnnMode::from_env())
    }

    /// [`CpuBackend::new`] with the use of oneDNN given explicitly (tests run
    /// both paths in one process).
    pub fn with_onednn(threads: usize, mode: OneDnnMode) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ecdit-cpu-{i}"))
            .build()
            .map_err(|e| EngineError::Backend {
                backend: "cpu".into(),
                reason: format!("cannot start a pool of {threads} threads: {e}"),
            })?;
        let onednn = match mode {
            OneDnnMode::Off => None,
            _ => onednn::library().ok(),
        };
        Ok(Self {
            pool,
            threads,
            buffers: Arc::default(),
            onednn,
            onednn_mode: if onednn.is_some() { mode } else { OneDnnMode::Off },
            matmul_library: onednn::status(mode),
        })
    }

    /// What the matrix products run on, in one line: "onednn 2.6.3 (OpenMP)
    /// for bf16 products with k >= 32 and n >= 32 (brg:avx512_core_amx_bf16);
    /// gemm crate for f32 (...) and the rest", or "gemm crate (why not
    /// oneDNN, and how to get it)".
    pub fn matmul_library(&self) -> &str {
        &self.matmul_library
    }

    /// How this backend uses oneDNN (`Off` when the library is missing).
    pub fn onednn_mode(&self) -> OneDnnMode {
        self.onednn_mode
    }

    /// The kernel a `gemm` of `dims` with `dtype` inputs and an f32 output
    /// (alpha 1, beta 0, no bias) runs on here, when called from outside a
    /// rayon pool: oneDNN's implementation name ("brg:avx512_core_amx_bf16"),
    /// "gemm crate", or "few rows" (the backend's own kernel for products of
    /// at most 8 rows).
    pub fn gemm_kernel(&self, dims: GemmDims, dtype: DType) -> String {
        if dims.m <= ops::gemm_few_rows::FEW_ROWS && !dims.trans_a && !dims.trans_b {
            return "few rows".into();
        }
        match self.onednn_key(dims, 1, dtype, dtype, DType::F32, false, 1.0, 0.0, None) {
            Some((lib, spec)) => lib
                .implementation(spec, self.onednn_threads(&spec))
                .unwrap_or_else(|e| e),
            None => "gemm crate".into(),
        }
    }

    /// oneDNN when this backend sends a product of `dims` with these dtypes
    /// to it: the library is loaded, the shape qualifies
    /// (`ops::gemm::onednn_takes`), and the caller is not a rayon task
    /// (oneDNN's OpenMP team must never run inside our pool).
    fn onednn_for(&self, dims: GemmDims, a: DType, b: DType, out: DType) -> Option<&'static OneDnn> {
        let lib = self.onednn?;
        let floats = |d: DType| matches!(d, DType::F32 | DType::BF16);
        if !(floats(a) && floats(b) && floats(out)) || rayon::current_thread_index().is_some() {
            return None;
        }
        ops::gemm::onednn_takes(self.onednn_mode, dims, (a, b)).then_some(lib)
    }

    /// oneDNN's threads for `spec`: the backend's, but one for products too
    /// small to share (a second OpenMP thread's wake-up and join cost more
    /// than its half of the work: the per-sample text K/V projections). A
    /// row's bits stay the same whatever the row count, and so whatever the
    /// thread count this picks (`tests/onednn.rs` spans both); only weight
    /// gradients' depend on the count (see `Spec::chunks`), still fixed by
    /// their shape.
    fn onednn_threads(&self, spec: &Spec) -> usize {
        if spec.batch as f64 * spec.dims.flops() < ONEDNN_SHARED_MIN_FLOPS {
            1
        } else {
            self.threads
        }
    }

    /// [`CpuBackend::onednn_for`] plus the primitive for `batch` such
    /// products, built (or found in the cache) when oneDNN has a kernel for it.
    #[allow(clippy::too_many_arguments)]
    fn onednn_key(
        &self,
        dims: GemmDims,
        batch: usize,
        a: DType,
        b: DType,
        out: DType,
        bias: bool,
        alpha: f32,
        beta: f32,
        act: Option<Unary>,
    ) -> Option<(&'static OneDnn, Spec)> {
        let lib = self.onednn_for(dims, a, b, out)?;
        let bf16_inputs = a == DType::BF16 && b == DType::BF16;
        let src = if bf16_inputs { onednn::DT_BF16 } else { onednn::DT_F32 };
        // oneDNN writes bf16 itself only when one primitive sums all of k:
        // k chunks would round each partial sum to bf16.
        let one_primitive = dims.k <= MAX_K_CHUNK || whole_k(dims, src);
        let dst = if bf16_inputs && out == DType::BF16 && one_primitive {
            onednn::DT_BF16
        } else {
            onednn::DT_F32
        };
        let spec = Spec {
            batch,
            dims,
            src,
            dst,
            bias,
            alpha,
            beta,
            act: act.map(|a| match a {
                Unary::GeluTanh => onednn::ELTWISE_GELU_TANH,
                Unary::Silu => onednn::ELTWISE_SWISH,
            }),
            whole_k: false,
        };
        lib.ready(spec, self.onednn_threads(&spec)).ok().map(|()| (lib, spec))
    }

    /// The products of `spec` on oneDNN (from [`CpuBackend::onednn_key`]): bf16 inputs stay bf16 when both are, else
    /// both are read as f32; a bf16 output is written directly by a bf16
    /// product and through an f32 scratch by an f32 one.
    #[allow(clippy::too_many_arguments)]
    fn gemm_onednn(
        &self,
        (lib, spec): (&'static OneDnn, Spec),
        op: &str,
        out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
    ) -> Result<()> {
        let Spec { batch, dims, beta, .. } = spec;
        ops::gemm::check_blocks(op, out.numel(), a.numel(), b.numel(), batch, dims)?;
        let bias = bias.map(|t| bias_f32(op, t, dims.n)).transpose()?;
        let b_id = weight_id(b, 0);
        let run = |out: DataMut<'_>, a: Data<'_>, b: Data<'_>| -> Result<()> {
            let product = Product {
                out,
                a,
                b,
                bias: bias.as_deref(),
                spec,
                b_id: Some(b_id.clone()),
            };
            match lib.matmul(self.onednn_threads(&spec), product) {
                Ok(Outcome::Done) => Ok(()),
                Ok(Outcome::Unsupported(e)) | Err(e) => Err(EngineError::Backend {
                    backend: "cpu".into(),
                    reason: format!("{op} on oneDNN: {e}"),
                }),
            }
        };
        // Borrow what oneDNN reads as stored; widen (bf16 read as f32) and
        // narrow (an f32 result into bf16 storage) over the pool, outside
        // which the product runs.
        let bf16_in = spec.src == onednn::DT_BF16;
        let converts = (!bf16_in && (a.dtype() == DType::BF16 || b.dtype() == DType::BF16))
            || (spec.dst == onednn::DT_F32 && out.dtype() == DType::BF16);
        let prepare = || -> Result<(Operand<'_>, Operand<'_>, Dest<'_>)> {
            let dest = if spec.dst == onednn::DT_BF16 {
                Dest::Bf16(out.host_mut::<bf16>()?)
            } else {
                Dest::F32(output(op, "out", out, beta != 0.0)?)
            };
            Ok((operand(op, "a", a, bf16_in)?, operand(op, "b", b, bf16_in)?, dest))
        };
        let (a, b, mut dest) = if converts {
            self.pool.install(prepare)?
        } else {
            prepare()?
        };
        let out = match &mut dest {
            Dest::Bf16(s) => DataMut::Bf16(s),
            Dest::F32(o) => DataMut::F32(o),
        };
        run(out, a.data(), b.data())?;
        if let Dest::F32(o) = dest {
            if converts {
                self.pool.install(|| o.finish());
            }
        }
        Ok(())
    }

    /// A grouped product on oneDNN as tasks, each group on one thread
    /// (`onednn/grouped.rs`): taken on two threads or more for two groups
    /// or more, each above the few-row kernel's bound, with inputs oneDNN
    /// reads as stored. `Ok(false)` when not taken (nothing written).
    #[allow(clippy::too_many_arguments)]
    fn grouped_in_tasks(
        &self,
        op: &str,
        out: TensorMut<'_>,
        (a, b, bias): (GroupedA<'_>, TensorRef<'_>, Option<TensorRef<'_>>),
        group_rows: &[usize],
        (n, k, trans_b): (usize, usize, bool),
        (alpha, beta): (f32, f32),
        act: Option<Unary>,
    ) -> Result<bool> {
        let (x, dt_in) = match a {
            GroupedA::Rows(a) | GroupedA::Gathered { x: a, .. } => (a, a.dtype()),
        };
        let busy = group_rows.iter().filter(|&&m| m > 0);
        let few = busy.clone().any(|&m| m <= ops::gemm_few_rows::FEW_ROWS);
        if self.threads < 2 || busy.count() < 2 || few || dt_in != b.dtype() {
            return Ok(false);
        }
        let dims = group_dims(tallest_group(group_rows), n, k, trans_b);
        let dt_out = out.dtype();
        let key = self.onednn_key(dims, 1, dt_in, dt_in, dt_out, bias.is_some(), alpha, beta, act);
        let Some((lib, spec)) = key else { return Ok(false) };
        let bf16_in = dt_in == DType::BF16;
        if (spec.src == onednn::DT_BF16) != bf16_in {
            return Ok(false);
        }
        let gathered = match a {
            GroupedA::Rows(_) => None,
            GroupedA::Gathered { rows, .. } => {
                let rows = indices(op, "rows", rows)?;
                check_gather_source(op, x.numel(), k, rows)?;
                Some(rows)
            }
        };
        let a_len = gathered.map_or(x.numel(), |rows| rows.len() * k);
        check_grouped(op, out.numel(), a_len, b.numel(), group_rows, n, k)?;
        let bias = bias.map(|t| bias_f32(op, t, group_rows.len() * n)).transpose()?;
        let (a_all, b_all) = if bf16_in {
            (Data::Bf16(x.host::<bf16>()?), Data::Bf16(b.host::<bf16>()?))
        } else {
            (Data::F32(x.host::<f32>()?), Data::F32(b.host::<f32>()?))
        };
        // bf16 storage of an f32 product is rounded per group in its task.
        let narrowed = spec.dst == onednn::DT_F32 && dt_out == DType::BF16;
        let mut rest = match dt_out {
            DType::BF16 => DataMut::Bf16(out.host_mut::<bf16>()?),
            _ => DataMut::F32(out.host_mut::<f32>()?),
        };
        let mut groups = Vec::with_capacity(group_rows.len());
        let mut r0 = 0;
        for (g, &m) in group_rows.iter().enumerate() {
            let (rows, tail) = rest.split(m * n);
            rest = tail;
            if m > 0 {
                let out = match rows {
                    DataMut::Bf16(rows) if narrowed => GroupOut::Narrowed(rows),
                    rows => GroupOut::Direct(rows),
                };
                let a = match gathered {
                    None => GroupIn::Rows(a_all.range(r0 * k, m * k)),
                    Some(rows) => GroupIn::Gathered {
                        x: a_all,
                        rows: &rows[r0..][..m],
                        k,
                    },
                };
                groups.push(Group {
                    out,
                    a,
                    b: b_all.range(g * n * k, n * k),
                    bias: bias.as_deref().map(|v| &v[g * n..][..n]),
                    b_id: weight_id(b, g * n * k * dt_in.size()),
                    spec: Spec {
                        dims: group_dims(m, n, k, trans_b),
                        ..spec
                    },
                });
            }
            r0 += m;
        }
        onednn::grouped::run(lib, &self.pool, self.threads, groups).map_err(|e| EngineError::Backend {
            backend: "cpu".into(),
            reason: format!("{op} on oneDNN, groups in tasks: {e}"),
        })?;
        Ok(true)
    }

    /// oneDNN for a bf16 product with its bias and activation fused as
    /// post-ops (alpha 1, beta 0); `None` for f32 products, whose fused ops
    /// keep the bits of the separate ones by running them separately.
    fn fused_onednn(
        &self,
        dims: GemmDims,
        a: DType,
        b: DType,
        out: DType,
        bias: bool,
        act: Option<Unary>,
    ) -> Option<(&'static OneDnn, Spec)> {
        if a != DType::BF16 || b != DType::BF16 {
            return None;
        }
        self.onednn_key(dims, 1, a, b, out, bias, 1.0, 0.0, act)
    }

    /// `out = act(out)` element-wise, in place.
    fn activate_in_place(&self, act: Unary, out: TensorMut<'_>) -> Result<()> {
        self.pool.install(|| {
            elementwise("activation", out, true, [], |o, []| {
                ops::activation::unary_in_place(act, o);
                Ok(())
            })
        })
    }

    /// The bf16 attention on oneDNN (`onednn/attention.rs`) when every
    /// tensor of the call is bf16 (`bf16`), oneDNN runs bf16 products on this
    /// CPU and the dims are non-empty; `None` keeps the f32 kernels of
    /// `ops/attention.rs`. (Its products run one per task on one thread each,
    /// so it is taken from inside rayon tasks too.)
    fn bf16_attention(&self, d: AttnDims, bf16: bool) -> Option<Bf16Attention<'_>> {
        let lib = self.onednn?;
        let dims = [d.batch, d.q_len, d.kv_len, d.heads, d.kv_heads, d.head_dim];
        let usable = bf16 && lib.has_bf16() && !dims.contains(&0) && d.heads.is_multiple_of(d.kv_heads);
        usable.then_some(Bf16Attention {
            lib,
            pool: &self.pool,
            d,
        })
    }

    /// Runs `f` on this backend's pool, so rayon work inside it (a model's own
    /// per-sample or per-expert loops) shares the op threads instead of
    /// nesting a second pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

/// Whether every tensor is bf16.
fn all_bf16(tensors: &[&TensorRef<'_>]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::BF16)
}

/// A product's f32 bias of `len` values: f32 as stored, bf16 widened (on
/// the calling thread: a bias is short).
fn bias_f32<'a>(op: &str, t: TensorRef<'a>, len: usize) -> Result<Cow<'a, [f32]>> {
    t.expect_len(op, "bias", len)?;
    Ok(match t.dtype() {
        DType::BF16 => {
            let s = t.host::<bf16>()?;
            let mut v = vec![0.0f32; s.len()];
            bf16_to_f32(&mut v, s);
            Cow::Owned(v)
        }
        _ => Cow::Borrowed(f32_input(op, "bias", t)?),
    })
}

/// Where the weight operand `b` lives, `bytes` past its view's start, for
/// its packed copy (read before any write of the op: none writes `b`).
fn weight_id(b: TensorRef<'_>, bytes: usize) -> WeightId {
    WeightId {
        buffer: b.buffer().watch(),
        offset: b.byte_offset() + bytes,
        writes: b.buffer().writes(),
    }
}

/// The `a` of a grouped product: rows as stored, or gathered by index.
#[derive(Clone, Copy)]
enum GroupedA<'a> {
    /// [R, k].
    Rows(TensorRef<'a>),
    /// Row r is `x[rows[r]]`; x: [T, k]; rows: [R] (u32).
    Gathered { x: TensorRef<'a>, rows: TensorRef<'a> },
}

/// Errors unless `x` holds whole rows of `k` and every index is one of them.
fn check_gather_source(op: &str, x_len: usize, k: usize, rows: &[u32]) -> Result<()> {
    if k == 0 || !x_len.is_multiple_of(k) {
        return Err(EngineError::shape(
            format!("{op} (x)"),
            format!("[T, {k}]"),
            format!("{x_len} elements"),
        ));
    }
    ops::gather::check_indices(op, rows, x_len / k)
}

/// One group's product in a grouped gemm: `[m, k] @ op(b[g])`.
fn group_dims(m: usize, n: usize, k: usize, trans_b: bool) -> GemmDims {
    GemmDims {
        m,
        n,
        k,
        trans_a: false,
        trans_b,
    }
}

/// The row count at which a grouped product asks whether oneDNN takes its
/// groups: the tallest group's, at least one above the few-row kernel's
/// bound. Whether oneDNN takes a product depends on n, k and the dtypes, so
/// the answer holds for every group alike (groups of a few rows keep their
/// own kernel inside `gemm`).
fn tallest_group(group_rows: &[usize]) -> usize {
    let tallest = group_rows.iter().copied().max().unwrap_or(0);
    tallest.max(ops::gemm_few_rows::FEW_ROWS + 1)
}

/// An adaLN modulation `[B, chunks * d]` as f32, its length checked, read
/// one sample's row at a time by ops that run in [`sample_rows`] blocks.
struct ModulationRows<'a> {
    values: crate::slices::Input<'a>,
    row: usize,
}

impl ModulationRows<'_> {
    /// Sample `b`'s row: [chunks * d].
    fn sample(&self, b: usize) -> &[f32] {
        &self.values[b * self.row..][..self.row]
    }
}

fn modulation_rows<'a>(
    op: &str,
    modulation: TensorRef<'a>,
    which: ModChunks,
    dims: RowDims,
) -> Result<ModulationRows<'a>> {
    let values = input(op, "modulation", modulation)?;
    check_len(
        op,
        "modulation",
        values.len(),
        numel(op, &[dims.batch, which.chunks, dims.d])?,
    )?;
    Ok(ModulationRows {
        values,
        row: which.chunks * dims.d,
    })
}

/// The sample of a [`sample_rows`] block starting at row `row0` with `len`
/// elements, and the block's dims as one sample of its own.
fn sample_block(dims: RowDims, row0: usize, len: usize) -> (usize, RowDims) {
    let one = RowDims {
        batch: 1,
        tokens: len / dims.d.max(1),
        d: dims.d,
    };
    (row0 / dims.tokens.max(1), one)
}

/// An input of a oneDNN product: bf16 as stored, or f32 (borrowed or widened).
enum Operand<'a> {
    Bf16(&'a [bf16]),
    F32(crate::slices::Input<'a>),
}

impl Operand<'_> {
    fn data(&self) -> Data<'_> {
        match self {
            Operand::Bf16(s) => Data::Bf16(s),
            Operand::F32(v) => Data::F32(v),
        }
    }
}

/// `t` as a oneDNN product reads it: bf16 as stored when the product is bf16
/// (`bf16`), else as f32.
fn operand<'a>(op: &str, what: &str, t: TensorRef<'a>, bf16: bool) -> Result<Operand<'a>> {
    if bf16 {
        Ok(Operand::Bf16(t.host::<bf16>()?))
    } else {
        Ok(Operand::F32(input(op, what, t)?))
    }
}

/// The output of a oneDNN product: bf16 written by oneDNN, or f32 (direct,
/// or a scratch rounded into bf16 storage by `finish`).
enum Dest<'a> {
    Bf16(&'a mut [bf16]),
    F32(crate::slices::Output<'a>),
}

/// FLOPs below which a oneDNN product runs on one thread
/// ([`CpuBackend::onednn_threads`]).
const ONEDNN_SHARED_MIN_FLOPS: f64 = 1.6e7;

/// Elements per parallel task of the memory ops (fill, dtype conversion).
const MEM_TASK_ELEMS: usize = 1 << 15;

/// Errors unless a transfer's host side has the view's byte count.
fn check_bytes(op: &str, host: usize, view: usize) -> Result<()> {
    if host == view {
        Ok(())
    } else {
        Err(EngineError::shape(
            format!("{op} (host bytes)"),
            format!("{view} bytes"),
            format!("{host} bytes"),
        ))
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn gemm_rows_alone(&self) -> usize {
        ops::gemm_few_rows::FEW_ROWS
    }

    // ---- memory ----

    fn alloc(&self, bytes: usize) -> Result<Buffer> {
        Ok(Buffer::new(Box::new(self.buffers.alloc(bytes)?), "cpu"))
    }

    fn upload(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        check_bytes("upload", src.len(), dst.byte_len())?;
        bytes_mut(dst)?.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        check_bytes("download", dst.len(), src.byte_len())?;
        dst.copy_from_slice(bytes(src)?);
        Ok(())
    }

    fn copy(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        const OP: &str = "copy";
        check_len(OP, "src", src.numel(), dst.numel())?;
        self.pool.install(|| match (dst.dtype(), src.dtype()) {
            (d, s) if d == s => {
                bytes_mut(dst)?.copy_from_slice(bytes(src)?);
                Ok(())
            }
            (DType::F32, DType::BF16) => {
                let (d, s) = (dst.host_mut::<f32>()?, src.host::<bf16>()?);
                d.par_chunks_mut(MEM_TASK_ELEMS)
                    .zip(s.par_chunks(MEM_TASK_ELEMS))
                    .for_each(|(d, s)| bf16_to_f32(d, s));
                Ok(())
            }
            (DType::BF16, DType::F32) => {
                let (d, s) = (dst.host_mut::<bf16>()?, src.host::<f32>()?);
                d.par_chunks_mut(MEM_TASK_ELEMS)
                    .zip(s.par_chunks(MEM_TASK_ELEMS))
                    .for_each(|(d, s)| f32_to_bf16(d, s));
                Ok(())
            }
            (d, s) => Err(EngineError::shape(
                format!("{OP} (dtype)"),
                format!("the same dtype, or f32 and bf16 ({d} from {s})"),
                s,
            )),
        })
    }

    fn fill(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        self.pool.install(|| match dst.dtype() {
            DType::F32 => {
                dst.host_mut::<f32>()?
                    .par_chunks_mut(MEM_TASK_ELEMS)
                    .for_each(|d| d.fill(value));
                Ok(())
            }
            DType::BF16 => {
                let v = bf16::from_f32(value);
                dst.host_mut::<bf16>()?
                    .par_chunks_mut(MEM_TASK_ELEMS)
                    .for_each(|d| d.fill(v));
                Ok(())
            }
            other => Err(EngineError::shape("fill (dst dtype)", "f32 or bf16", other)),
        })
    }

    // ---- matrix products ----

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
        const OP: &str = "gemm";
        let (dt_a, dt_b, dt_out) = (a.dtype(), b.dtype(), out.dtype());
        if let Some(lib) = self.onednn_key(dims, 1, dt_a, dt_b, dt_out, bias.is_some(), alpha, beta, None) {
            return self.gemm_onednn(lib, OP, out, a, b, bias);
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, beta != 0.0)?;
            let (a, b, bias) = (input(OP, "a", a)?, input(OP, "b", b)?, input_opt(OP, "bias", bias)?);
            ops::gemm::gemm(&mut o, &a, &b, bias.as_deref(), dims, alpha, beta, self.threads)?;
            o.finish();
            Ok(())
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
        const OP: &str = "gemm_batched";
        let (dt_a, dt_b, dt_out) = (a.dtype(), b.dtype(), out.dtype());
        if let Some(lib) = self.onednn_key(dims, batch, dt_a, dt_b, dt_out, false, alpha, beta, None) {
            return self.gemm_onednn(lib, OP, out, a, b, None);
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, beta != 0.0)?;
            let (a, b) = (input(OP, "a", a)?, input(OP, "b", b)?);
            ops::gemm::gemm_batched(&mut o, &a, &b, batch, dims, alpha, beta, self.threads)?;
            o.finish();
            Ok(())
        })
    }

    fn gemm_grouped(
        &self,
        mut out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "gemm_grouped";
        // On oneDNN: the groups as tasks, or one product per group on all
        // threads (both what a `gemm` per group gives, bit for bit).
        let dims = group_dims(tallest_group(group_rows), n, k, trans_b);
        if self.onednn_for(dims, a.dtype(), b.dtype(), out.dtype()).is_some() {
            let (shape, scale) = ((n, k, trans_b), (alpha, beta));
            let operands = (GroupedA::Rows(a), b, None);
            if self.grouped_in_tasks(OP, out.reborrow(), operands, group_rows, shape, scale, None)? {
                return Ok(());
            }
            return ecdit_engine::backend::gemm_grouped_by_gemm(
                self, out, a, b, group_rows, n, k, trans_b, alpha, beta,
            );
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, beta != 0.0)?;
            let (a, b) = (input(OP, "a", a)?, input(OP, "b", b)?);
            ops::gemm::gemm_grouped(&mut o, &a, &b, group_rows, n, k, trans_b, alpha, beta, self.threads)?;
            o.finish();
            Ok(())
        })
    }

    fn gemm_act(
        &self,
        mut out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: Option<TensorRef<'_>>,
        dims: GemmDims,
        act: Unary,
    ) -> Result<()> {
        // bf16 on oneDNN: the activation as its post-op, on the f32 sum
        // before the one rounding. Otherwise the default's bits, in place.
        if let Some(lib) = self.fused_onednn(dims, a.dtype(), b.dtype(), out.dtype(), bias.is_some(), Some(act)) {
            return self.gemm_onednn(lib, "gemm_act", out, a, b, bias);
        }
        self.gemm(out.reborrow(), a, b, bias, dims, 1.0, 0.0)?;
        self.activate_in_place(act, out)
    }

    fn gemm_grouped_bias(
        &self,
        mut out: TensorMut<'_>,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        bias: TensorRef<'_>,
        group_rows: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        act: Option<Unary>,
    ) -> Result<()> {
        const OP: &str = "gemm_grouped_bias";
        let (dt_a, dt_b, dt_out) = (a.dtype(), b.dtype(), out.dtype());
        let dims = |m| group_dims(m, n, k, trans_b);
        let fused = |m| self.fused_onednn(dims(m), dt_a, dt_b, dt_out, true, act);
        if fused(tallest_group(group_rows)).is_none() {
            // f32, or no oneDNN: the default's steps (and so, in f32, its
            // bits), the activation in place.
            self.gemm_grouped(out.reborrow(), a, b, group_rows, n, k, trans_b, 1.0, 0.0)?;
            add_group_bias(self, out.reborrow(), bias, group_rows, n)?;
            return act.map_or(Ok(()), |act| self.activate_in_place(act, out));
        }
        // bf16 on oneDNN: one product per group with its bias and the
        // activation fused, each rounded once (groups of a few rows, which
        // keep their own kernel, take the steps above); as tasks where
        // they qualify.
        let (shape, scale, operands) = ((n, k, trans_b), (1.0, 0.0), (GroupedA::Rows(a), b, Some(bias)));
        if self.grouped_in_tasks(OP, out.reborrow(), operands, group_rows, shape, scale, act)? {
            return Ok(());
        }
        check_grouped(OP, out.numel(), a.numel(), b.numel(), group_rows, n, k)?;
        bias.expect_len(OP, "bias", group_rows.len() * n)?;
        let (a, b, bias) = (
            a.flat(0, a.numel())?,
            b.flat(0, b.numel())?,
            bias.flat(0, bias.numel())?,
        );
        let mut r0 = 0;
        for (g, &m) in group_rows.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let mut o = out.reborrow().flat(r0 * n, m * n)?;
            let (a_g, b_g, bias_g) = (a.flat(r0 * k, m * k)?, b.flat(g * n * k, n * k)?, bias.flat(g * n, n)?);
            match fused(m) {
                Some(lib) => self.gemm_onednn(lib, OP, o, a_g, b_g, Some(bias_g))?,
                None => {
                    self.gemm(o.reborrow(), a_g, b_g, Some(bias_g), dims(m), 1.0, 0.0)?;
                    if let Some(act) = act {
                        self.activate_in_place(act, o)?;
                    }
                }
            }
            r0 += m;
        }
        Ok(())
    }

    fn gemm_grouped_bias_gathered(
        &self,
        mut out: TensorMut<'_>,
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
        const OP: &str = "gemm_grouped_bias_gathered";
        // bf16 on oneDNN with the groups as tasks: each task gathers its
        // rows right before its product. Otherwise gather, then the product.
        let dims = group_dims(tallest_group(group_rows), n, k, trans_b);
        let shape = (n, k, trans_b);
        if self
            .fused_onednn(dims, x.dtype(), b.dtype(), out.dtype(), true, act)
            .is_some()
        {
            let operands = (GroupedA::Gathered { x, rows }, b, Some(bias));
            if self.grouped_in_tasks(OP, out.reborrow(), operands, group_rows, shape, (1.0, 0.0), act)? {
                return Ok(());
            }
        }
        gemm_grouped_bias_after_gather(self, out, (x, rows), b, bias, group_rows, shape, act)
    }

    // ---- element-wise and row ops ----

    fn add_broadcast(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        const OP: &str = "add_broadcast";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, true)?;
            ops::bias::add_broadcast(&mut o, &input(OP, "inp", inp)?)?;
            o.finish();
            Ok(())
        })
    }

    fn axpby(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        const OP: &str = "axpby";
        self.pool
            .install(|| elementwise(OP, y, true, [("x", x)], |y, [x]| ops::axpby::axpby(y, a, x, b)))
    }

    fn sum_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "sum_rows";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, accumulate)?;
            match inp.dtype() {
                DType::BF16 => ops::bias::sum_rows_bf16(&mut o, inp.host::<bf16>()?, rows, cols, accumulate)?,
                _ => ops::bias::sum_rows(&mut o, &input(OP, "inp", inp)?, rows, cols, accumulate)?,
            }
            o.finish();
            Ok(())
        })
    }

    fn softmax_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize, cols: usize) -> Result<()> {
        const OP: &str = "softmax_rows";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            ops::softmax::softmax_rows(&mut o, &input(OP, "inp", inp)?, rows, cols)?;
            o.finish();
            Ok(())
        })
    }

    fn softmax_rows_backward(
        &self,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        out: TensorRef<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_rows_backward";
        self.pool.install(|| {
            let mut di = output(OP, "dinp", dinp, false)?;
            let (dout, out) = (input(OP, "dout", dout)?, input(OP, "out", out)?);
            ops::softmax::softmax_rows_backward(&mut di, &dout, &out, rows, cols)?;
            di.finish();
            Ok(())
        })
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
        const OP: &str = "layer_norm";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let (mut mu, mut rs) = (output(OP, "mean", mean, false)?, output(OP, "rstd", rstd, false)?);
            let inp = input(OP, "inp", inp)?;
            let (w, b) = (input_opt(OP, "weight", weight)?, input_opt(OP, "bias", bias)?);
            ops::norm::layer_norm(
                &mut o,
                &mut mu,
                &mut rs,
                &inp,
                w.as_deref(),
                b.as_deref(),
                rows,
                cols,
                eps,
            )?;
            o.finish();
            mu.finish();
            rs.finish();
            Ok(())
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
        const OP: &str = "layer_norm_backward";
        self.pool.install(|| {
            let mut di = output(OP, "dinp", dinp, false)?;
            let mut dw = output_opt(OP, "dweight", dweight, true)?;
            let mut db = output_opt(OP, "dbias", dbias, true)?;
            let (dout, inp) = (input(OP, "dout", dout)?, input(OP, "inp", inp)?);
            let (mean, rstd) = (input(OP, "mean", mean)?, input(OP, "rstd", rstd)?);
            let w = input_opt(OP, "weight", weight)?;
            ops::norm::layer_norm_backward(
                &mut di,
                dw.as_deref_mut(),
                db.as_deref_mut(),
                &dout,
                &inp,
                &mean,
                &rstd,
                w.as_deref(),
                rows,
                cols,
            )?;
            di.finish();
            dw.into_iter().chain(db).for_each(|o| o.finish());
            Ok(())
        })
    }

    fn unary(&self, op: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        const OP: &str = "unary";
        self.pool.install(|| {
            elementwise(OP, out, false, [("inp", inp)], |o, [i]| {
                ops::activation::unary(op, o, i)
            })
        })
    }

    fn unary_backward(&self, op: Unary, dinp: TensorMut<'_>, dout: TensorRef<'_>, inp: TensorRef<'_>) -> Result<()> {
        const OP: &str = "unary_backward";
        self.pool.install(|| {
            elementwise(OP, dinp, false, [("dout", dout), ("inp", inp)], |di, [d, i]| {
                ops::activation::unary_backward(op, di, d, i)
            })
        })
    }

    // ---- adaLN ----

    fn modulate(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        const OP: &str = "modulate";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let (inp, m) = (input(OP, "inp", inp)?, input(OP, "modulation", modulation)?);
            ops::adaln::modulate(&mut o, &inp, &m, which, dims)?;
            o.finish();
            Ok(())
        })
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
        const OP: &str = "layer_norm_modulate";
        if ln.is_none() && dims.d > 0 {
            // Inference: sample by sample in blocks of rows, bf16 widened
            // block by block; the row statistics through disjoint blocks.
            return self.pool.install(|| {
                let (mut mu, mut rs) = (output(OP, "mean", mean, false)?, output(OP, "rstd", rstd, false)?);
                let md = modulation_rows(OP, modulation, which, dims)?;
                check_len(OP, "mean", mu.len(), dims.batch * dims.tokens)?;
                check_len(OP, "rstd", rs.len(), dims.batch * dims.tokens)?;
                let (mu_shared, rs_shared) = (SharedMut::new(&mut mu), SharedMut::new(&mut rs));
                sample_rows(OP, out, false, [("inp", inp)], dims, |row0, o, [x]| {
                    let (b, one) = sample_block(dims, row0, o.len());
                    // SAFETY: blocks cover disjoint rows, and the statistics
                    // outlive `sample_rows`.
                    let (m, s) = unsafe { (mu_shared.block(row0, one.tokens)?, rs_shared.block(row0, one.tokens)?) };
                    ops::adaln::layer_norm_modulate(o, None, m, s, x, md.sample(b), which, one, eps)
                })?;
                mu.finish();
                rs.finish();
                Ok(())
            });
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let mut l = output_opt(OP, "ln", ln, false)?;
            let (mut mu, mut rs) = (output(OP, "mean", mean, false)?, output(OP, "rstd", rstd, false)?);
            let (x, md) = (input(OP, "inp", inp)?, input(OP, "modulation", modulation)?);
            ops::adaln::layer_norm_modulate(&mut o, l.as_deref_mut(), &mut mu, &mut rs, &x, &md, which, dims, eps)?;
            o.finish();
            if let Some(l) = l {
                l.finish();
            }
            mu.finish();
            rs.finish();
            Ok(())
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
        const OP: &str = "modulate_backward";
        self.pool.install(|| {
            let mut di = output(OP, "dinp", dinp, false)?;
            let mut dm = output(OP, "dmodulation", dmodulation, true)?;
            let (dout, inp) = (input(OP, "dout", dout)?, input(OP, "inp", inp)?);
            let m = input(OP, "modulation", modulation)?;
            ops::adaln::modulate_backward(&mut di, &mut dm, &dout, &inp, &m, which, dims)?;
            di.finish();
            dm.finish();
            Ok(())
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
        const OP: &str = "gated_residual";
        self.pool.install(|| {
            let m = modulation_rows(OP, modulation, which, dims)?;
            // Sample by sample, in blocks of rows (bf16 widened block by block).
            sample_rows(OP, x, true, [("y", y)], dims, |row0, x, [y]| {
                let (b, one) = sample_block(dims, row0, x.len());
                ops::adaln::gated_residual(x, y, m.sample(b), which, one)
            })
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
        const OP: &str = "gated_residual_backward";
        self.pool.install(|| {
            let mut dyo = output(OP, "dy", dy, false)?;
            let mut dm = output(OP, "dmodulation", dmodulation, true)?;
            let (dx, y) = (input(OP, "dx", dx)?, input(OP, "y", y)?);
            let m = input(OP, "modulation", modulation)?;
            ops::adaln::gated_residual_backward(&mut dyo, &mut dm, &dx, &y, &m, which, dims)?;
            dyo.finish();
            dm.finish();
            Ok(())
        })
    }

    // ---- embeddings ----

    fn patchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        const OP: &str = "patchify";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            ops::patch::patchify(&mut o, &input(OP, "inp", inp)?, dims)?;
            o.finish();
            Ok(())
        })
    }

    fn unpatchify(&self, out: TensorMut<'_>, inp: TensorRef<'_>, dims: PatchDims) -> Result<()> {
        const OP: &str = "unpatchify";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            ops::patch::unpatchify(&mut o, &input(OP, "inp", inp)?, dims)?;
            o.finish();
            Ok(())
        })
    }

    fn timestep_features(&self, out: TensorMut<'_>, t: TensorRef<'_>, dim: usize, max_period: f32) -> Result<()> {
        const OP: &str = "timestep_features";
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            ops::timestep::timestep_features(&mut o, &input(OP, "t", t)?, dim, max_period)?;
            o.finish();
            Ok(())
        })
    }

    // ---- attention ----

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
        const OP: &str = "attention";
        let bf16s = [Some(&out), probs.as_ref()].map(|t| t.is_none_or(|t| t.dtype() == DType::BF16));
        if let Some(att) = self.bf16_attention(dims, bf16s.iter().all(|&b| b) && all_bf16(&[&q, &k, &v])) {
            let key_mask = key_mask.map(|m| mask(OP, "key_mask", m)).transpose()?;
            let (q, k, v) = (q.host::<bf16>()?, k.host::<bf16>()?, v.host::<bf16>()?);
            let probs = probs.map(|p| p.host_mut::<bf16>()).transpose()?;
            return att.forward(out.host_mut::<bf16>()?, probs, q, k, v, key_mask);
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let mut p = output_opt(OP, "probs", probs, false)?;
            let (q, k, v) = (input(OP, "q", q)?, input(OP, "k", k)?, input(OP, "v", v)?);
            let key_mask = key_mask.map(|m| mask(OP, "key_mask", m)).transpose()?;
            match p.as_deref_mut() {
                Some(p) => ops::attention::attention(&mut o, p, &q, &k, &v, key_mask, dims, self.threads)?,
                None => ops::attention::attention_inference(&mut o, &q, &k, &v, key_mask, dims, self.threads)?,
            }
            o.finish();
            if let Some(p) = p {
                p.finish();
            }
            Ok(())
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
        const OP: &str = "attention_backward";
        let outputs_bf16 = [&dq, &dk, &dv].iter().all(|t| t.dtype() == DType::BF16);
        if let Some(att) = self.bf16_attention(dims, outputs_bf16 && all_bf16(&[&dout, &probs, &q, &k, &v])) {
            let (dout, probs) = (dout.host::<bf16>()?, probs.host::<bf16>()?);
            let (q, k, v) = (q.host::<bf16>()?, k.host::<bf16>()?, v.host::<bf16>()?);
            let (dq, dk, dv) = (dq.host_mut::<bf16>()?, dk.host_mut::<bf16>()?, dv.host_mut::<bf16>()?);
            return att.backward(dq, dk, dv, dout, probs, q, k, v);
        }
        self.pool.install(|| {
            let mut dqo = output(OP, "dq", dq, false)?;
            let mut dko = output(OP, "dk", dk, false)?;
            let mut dvo = output(OP, "dv", dv, false)?;
            let (dout, probs) = (input(OP, "dout", dout)?, input(OP, "probs", probs)?);
            let (q, k, v) = (input(OP, "q", q)?, input(OP, "k", k)?, input(OP, "v", v)?);
            ops::attention::attention_backward(
                &mut dqo,
                &mut dko,
                &mut dvo,
                &dout,
                &probs,
                &q,
                &k,
                &v,
                dims,
                self.threads,
            )?;
            dqo.finish();
            dko.finish();
            dvo.finish();
            Ok(())
        })
    }

    // ---- gather, scatter, routing ----

    fn gather_rows(&self, out: TensorMut<'_>, inp: TensorRef<'_>, idx: TensorRef<'_>, cols: usize) -> Result<()> {
        const OP: &str = "gather_rows";
        if out.dtype() == DType::BF16 && inp.dtype() == DType::BF16 {
            let (o, inp, idx) = (out.host_mut::<bf16>()?, inp.host::<bf16>()?, indices(OP, "idx", idx)?);
            return self.pool.install(|| ops::gather::gather_rows(o, inp, idx, cols));
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let (inp, idx) = (input(OP, "inp", inp)?, indices(OP, "idx", idx)?);
            ops::gather::gather_rows(&mut o, &inp, idx, cols)?;
            o.finish();
            Ok(())
        })
    }

    fn scatter_add_rows(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        idx: TensorRef<'_>,
        scale: Option<TensorRef<'_>>,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "scatter_add_rows";
        if out.dtype() == DType::BF16 && inp.dtype() == DType::BF16 {
            let (o, inp, idx) = (out.host_mut::<bf16>()?, inp.host::<bf16>()?, indices(OP, "idx", idx)?);
            return self.pool.install(|| {
                let scale = input_opt(OP, "scale", scale)?;
                ops::gather::scatter_add_rows(o, inp, idx, scale.as_deref(), cols)
            });
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, true)?;
            let (inp, idx) = (input(OP, "inp", inp)?, indices(OP, "idx", idx)?);
            let scale = input_opt(OP, "scale", scale)?;
            ops::gather::scatter_add_rows(&mut o, &inp, idx, scale.as_deref(), cols)?;
            o.finish();
            Ok(())
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
        const OP: &str = "gather_dot";
        if a.dtype() == DType::BF16 && b.dtype() == DType::BF16 {
            let (a, idx, b) = (a.host::<bf16>()?, indices(OP, "idx", idx)?, b.host::<bf16>()?);
            return self.pool.install(|| {
                let mut o = output(OP, "out", out, false)?;
                ops::gather::gather_dot(&mut o, a, idx, b, cols)?;
                o.finish();
                Ok(())
            });
        }
        self.pool.install(|| {
            let mut o = output(OP, "out", out, false)?;
            let (a, idx, b) = (input(OP, "a", a)?, indices(OP, "idx", idx)?, input(OP, "b", b)?);
            ops::gather::gather_dot(&mut o, &a, idx, &b, cols)?;
            o.finish();
            Ok(())
        })
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
        const OP: &str = "top_k_rows";
        self.pool.install(|| {
            let idx = indices_mut(OP, "idx", idx)?;
            let mut v = output(OP, "val", val, false)?;
            ops::topk::top_k_rows(idx, &mut v, &input(OP, "inp", inp)?, rows, cols, k)?;
            v.finish();
            Ok(())
        })
    }

    fn router_softmax(&self, out: TensorMut<'_>, scores: TensorRef<'_>, rows: usize, experts: usize) -> Result<()> {
        const OP: &str = "router_softmax";
        self.pool.install(|| {
            let o = f32_output(OP, "out", out)?;
            ops::router::router_softmax(o, f32_input(OP, "scores", scores)?, rows, experts)
        })
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
        const OP: &str = "top_k_tokens";
        self.pool.install(|| {
            let (idx, val) = (indices_mut(OP, "idx", idx)?, f32_output(OP, "val", val)?);
            let probs = f32_input(OP, "probs", probs)?;
            ops::topk::top_k_tokens(idx, val, probs, groups, group_rows, experts, k)
        })
    }

    // ---- optimiser ----

    fn adamw_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        // f32 only: rounding a bf16 parameter after every step would drop
        // small updates, and this backend keeps no f32 master copy.
        self.pool.install(|| {
            let p = f32_output(OP, "param", param)?;
            let (m, v) = (f32_output(OP, "m", m)?, f32_output(OP, "v", v)?);
            ops::optim::adamw_step(p, f32_input(OP, "grad", grad)?, m, v, hp, step)
        })
    }

    fn rmsprop_step(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        v: TensorMut<'_>,
        buf: TensorMut<'_>,
        hp: RmsProp,
    ) -> Result<()> {
        const OP: &str = "rmsprop_step";
        self.pool.install(|| {
            let p = f32_output(OP, "param", param)?;
            let (v, buf) = (f32_output(OP, "v", v)?, f32_output(OP, "buf", buf)?);
            ops::optim::rmsprop_step(p, f32_input(OP, "grad", grad)?, v, buf, hp)
        })
    }
}
