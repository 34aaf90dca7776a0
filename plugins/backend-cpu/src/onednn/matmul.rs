//! oneDNN matmul primitives, built once per shape and cached:
//! `dst = alpha * op(src) @ op(weights) + bias + beta * dst`, plain or batched
//! (`[batch, m, k] @ [batch, k, n]`), f32 or bf16 inputs, f32 or bf16 output.
//!
//! A primitive is keyed by everything its JIT kernel depends on (shape,
//! transposes, dtypes, bias, alpha, beta, thread count, whether tasks run
//! it); it never changes once built, so tasks share it (`Arc`), and each run
//! wraps the caller's slices in memory objects of its own (a cached product
//! costs one hash lookup and a few small allocations). alpha is oneDNN's
//! output scale and beta its `sum` post-op. Operands keep our layouts (row-major, transposes as
//! strides), except the weights of plain products (`b`, batch 1, `a` not
//! transposed): those are read pre-packed in oneDNN's blocked layout,
//! packed once per weight and kept ([`super::packed`]).
//! k longer than [`MAX_K_CHUNK`] runs as several primitives over chunks of k,
//! each adding onto the output, so a row's bits never depend on the row count
//! (except bf16 products with `a` transposed: weight gradients, whose rows
//! are weights; see [`Spec::chunks`]).

use super::packed::{Aligned, Packing, WeightId};
use super::{c_string, check, Flavour, Handle, MatmulDescV2, MemoryDescV2, OneDnn};
use super::{ARG_BIAS, ARG_DST, ARG_SCRATCHPAD, ARG_SRC, ARG_WEIGHTS, DT_BF16, DT_F32};
use super::{FORMAT_TAG_ANY, QUERY_IMPL_INFO_STR, QUERY_SCRATCHPAD_MD, SCRATCHPAD_USER};
use ecdit_engine::dtype::bf16;
use ecdit_engine::GemmDims;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

/// Most primitives kept; the least recently used goes first beyond it
/// (grouped products with uneven experts see many row counts).
const MAX_PRIMITIVES: usize = 512;

/// Everything a matmul primitive is built for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Key {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The full contracted dimension the operands are stored with (`k` is
    /// one chunk of it): the leading dimension of `src` and `weights`.
    pub k_stride: usize,
    /// `src` stored `[k, m]` (per batch entry).
    pub trans_a: bool,
    /// `weights` stored `[n, k]` (per batch entry).
    pub trans_b: bool,
    /// `dnnl_data_type_t` of src and weights (the same) and of dst.
    pub src: c_int,
    pub dst: c_int,
    /// An f32 bias `[n]` added to every row.
    pub bias: bool,
    /// `alpha.to_bits()`, `beta.to_bits()`.
    pub alpha: u32,
    pub beta: u32,
    /// An activation applied last (`dnnl_alg_kind_t`, see [`Spec::act`]).
    pub act: Option<c_int>,
    /// OpenMP threads the primitive is built for.
    pub threads: usize,
    /// Built for [`OneDnn::matmul_in_task`]: one thread, run outside the
    /// lock with a scratchpad of the caller's (oneDNN's user scratchpad mode,
    /// in which one primitive may run on several threads at once).
    pub in_task: bool,
    /// Weights read in the layout oneDNN picks ([`super::packed`]): plain
    /// products ([`Spec::plain`]) whose `b` is a weight of known place
    /// ([`Product::b_id`]).
    pub packed_b: bool,
}

/// Most of `k` one primitive sums: longer products run in chunks of `k`
/// (each later one adding onto the output), because oneDNN 2.6's AMX kernel
/// picks its k blocking (or splits k over threads) by the row count when k
/// is larger, and a row's bits would then depend on the rows beside it.
/// Measured row-invariant on 1-4 threads: k up to 768 at n >= 32.
pub(crate) const MAX_K_CHUNK: usize = 768;

/// Whether all of k runs in one primitive whatever its length: bf16
/// (`src`) products with `a` transposed (see [`Spec::chunks`]).
pub(crate) fn whole_k(dims: GemmDims, src: c_int) -> bool {
    dims.trans_a && src == DT_BF16
}

/// One oneDNN product as the backend asks for it (before chunking k).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Spec {
    pub batch: usize,
    pub dims: GemmDims,
    /// `dnnl_data_type_t` of both inputs, and of the output.
    pub src: c_int,
    pub dst: c_int,
    pub bias: bool,
    pub alpha: f32,
    pub beta: f32,
    /// An activation of the result (after bias and beta), fused as oneDNN's
    /// eltwise post-op: `ELTWISE_GELU_TANH` or `ELTWISE_SWISH` (alpha 1).
    pub act: Option<c_int>,
    /// All of k in one primitive, whatever its length: for products whose
    /// rows never share a product with a varying number of others (each
    /// head of attention is a product of its own).
    pub whole_k: bool,
}

impl Spec {
    /// The k chunks `(k0, kc)`: `ceil(k / MAX_K_CHUNK)` of equal length
    /// rounded up to 32 (the AMX tile depth), the last one shorter. They
    /// depend on `k` alone.
    ///
    /// bf16 products with `a` transposed (weight gradients, `x^T @ dy`, whose
    /// k is the batch's rows and whose rows are weights) run whole: their
    /// rows never share a product with a varying number of others, and one
    /// pass instead of k / 768 read-modify-writes of the f32 output made the
    /// bf16 training step about 15% faster. oneDNN may split their k over
    /// threads, so their bits depend on the thread count (the same count
    /// gives the same bits); f32 ones keep the chunks, and with them the
    /// same bits on 1 and 2 threads.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        let k = self.dims.k;
        if self.whole_k || whole_k(self.dims, self.src) {
            return vec![(0, k)];
        }
        let count = k.div_ceil(MAX_K_CHUNK).max(1);
        let len = k.div_ceil(count).next_multiple_of(32).min(k);
        (0..k).step_by(len.max(1)).map(|k0| (k0, len.min(k - k0))).collect()
    }

    /// A plain product: batch 1, `a` not transposed. Its `b` is a weight in
    /// every product the model makes, read pre-packed when its place is
    /// known ([`Key::packed_b`]).
    pub fn plain(&self) -> bool {
        self.batch == 1 && !self.dims.trans_a
    }

    /// The chunk's first elements in `a` and `b` (pointers to the whole
    /// operands, elements of `src`'s size): column k0 of a (row k0 when
    /// transposed), row k0 of b (column k0 when transposed).
    ///
    /// # Safety
    /// The operands hold the elements the spec spans.
    unsafe fn chunk_ptrs(&self, k0: usize, a: *mut c_void, b: *mut c_void) -> (*mut c_void, *mut c_void) {
        let GemmDims {
            m, n, trans_a, trans_b, ..
        } = self.dims;
        let size = if self.src == DT_BF16 { 2 } else { 4 };
        let a_off = if trans_a { k0 * m } else { k0 };
        let b_off = if trans_b { k0 } else { k0 * n };
        (
            (a as *mut u8).add(a_off * size) as *mut c_void,
            (b as *mut u8).add(b_off * size) as *mut c_void,
        )
    }

    /// The primitive key of the chunk starting at `k0`: the first chunk
    /// carries beta and the bias, the later ones add onto the output, and
    /// the last one applies the activation.
    fn key(&self, (k0, kc): (usize, usize), threads: usize, in_task: bool, packed_b: bool) -> Key {
        let first = k0 == 0;
        let last = k0 + kc == self.dims.k;
        Key {
            batch: self.batch,
            m: self.dims.m,
            n: self.dims.n,
            k: kc,
            k_stride: self.dims.k,
            trans_a: self.dims.trans_a,
            trans_b: self.dims.trans_b,
            src: self.src,
            dst: self.dst,
            bias: self.bias && first,
            alpha: self.alpha.to_bits(),
            beta: if first { self.beta.to_bits() } else { 1.0f32.to_bits() },
            act: if last { self.act } else { None },
            threads,
            in_task,
            packed_b,
        }
    }

    /// Errors for what oneDNN would compute differently: an empty product,
    /// and alpha with a bias (oneDNN 2.x scales the bias by the output scale).
    fn check(&self) -> Result<(), String> {
        let GemmDims { m, n, k, .. } = self.dims;
        if self.batch == 0 || m == 0 || n == 0 || k == 0 {
            return Err("an empty product".into());
        }
        if self.bias && self.alpha != 1.0 {
            return Err("alpha != 1 with a bias (oneDNN 2.x would scale the bias too)".into());
        }
        Ok(())
    }
}

/// A built primitive and the memory descriptors of its arguments; never
/// changed after it is built, so tasks share it through an `Arc`.
pub(crate) struct Primitive {
    pd: Handle,
    prim: Handle,
    src: Box<MemoryDescV2>,
    /// The weights as the caller stores them (row-major, strided).
    pub(crate) weights: Box<MemoryDescV2>,
    /// The packed layout the primitive reads instead ([`Key::packed_b`]).
    pub(crate) packing: Option<Packing>,
    bias: Option<Box<MemoryDescV2>>,
    dst: Box<MemoryDescV2>,
    /// The scratchpad's descriptor (owned by `pd`) and bytes, for primitives
    /// built for the caller's scratchpad ([`Key::in_task`]).
    scratchpad: Option<(*const c_void, usize)>,
    impl_name: String,
}

// SAFETY: a primitive is immutable once built. Those built for the lock run
// only under it; those built `in_task` run concurrently, which oneDNN allows
// in user scratchpad mode with one scratchpad per run.
unsafe impl Send for Primitive {}
unsafe impl Sync for Primitive {}

/// A cache entry: the primitive (`Err`: oneDNN has no kernel for that key,
/// remembered so it is asked once) and when it was last asked for.
struct Entry {
    built: Result<Arc<Primitive>, String>,
    last_used: u64,
}

/// What the lock of [`OneDnn`] guards: the stream and the primitive cache.
pub(crate) struct State {
    stream: Handle,
    cache: HashMap<Key, Entry>,
    tick: u64,
    packs: super::packed::Store,
}

impl State {
    pub(crate) fn new(stream: Handle) -> Self {
        Self {
            stream,
            cache: HashMap::new(),
            tick: 0,
            packs: Default::default(),
        }
    }

    /// The primitive for `key`, built on first use.
    fn get(&mut self, lib: &OneDnn, key: Key) -> Result<Arc<Primitive>, String> {
        self.tick += 1;
        if !self.cache.contains_key(&key) {
            if self.cache.len() >= MAX_PRIMITIVES {
                self.evict(lib);
            }
            let built = create(lib, key).map(Arc::new);
            if let Err(e) = &built {
                tracing::debug!("oneDNN matmul {key:?}: {e}");
            }
            self.cache.insert(key, Entry { built, last_used: 0 });
        }
        match self.cache.get_mut(&key) {
            Some(entry) => {
                entry.last_used = self.tick;
                entry.built.clone()
            }
            None => Err("primitive cache lost an entry".into()),
        }
    }

    /// Drops the least recently used entry that no task is running
    /// (failed entries first).
    fn evict(&mut self, lib: &OneDnn) {
        let oldest = self
            .cache
            .iter()
            .filter(|(_, e)| e.built.as_ref().map_or(true, |p| Arc::strong_count(p) == 1))
            .min_by_key(|(_, e)| e.built.as_ref().map_or(0, |_| e.last_used))
            .map(|(k, _)| *k);
        if let Some(Entry { built: Ok(p), .. }) = oldest.and_then(|k| self.cache.remove(&k)) {
            if let Ok(p) = Arc::try_unwrap(p) {
                destroy(lib, p);
            }
        }
    }
}

/// An input of a product: f32 or bf16 elements.
#[derive(Clone, Copy)]
pub(crate) enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Data<'a> {
    /// `len` elements from `start`.
    pub(crate) fn range(self, start: usize, len: usize) -> Data<'a> {
        match self {
            Data::F32(s) => Data::F32(&s[start..][..len]),
            Data::Bf16(s) => Data::Bf16(&s[start..][..len]),
        }
    }

    fn parts(&self) -> (c_int, usize, *mut c_void) {
        match self {
            Data::F32(s) => (DT_F32, s.len(), s.as_ptr() as *mut c_void),
            Data::Bf16(s) => (DT_BF16, s.len(), s.as_ptr() as *mut c_void),
        }
    }
}

/// The output of a product: f32 or bf16 elements.
pub(crate) enum DataMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
}

impl<'a> DataMut<'a> {
    /// The first `len` elements, and the rest.
    pub(crate) fn split(self, len: usize) -> (DataMut<'a>, DataMut<'a>) {
        match self {
            DataMut::F32(s) => {
                let (a, b) = s.split_at_mut(len);
                (DataMut::F32(a), DataMut::F32(b))
            }
            DataMut::Bf16(s) => {
                let (a, b) = s.split_at_mut(len);
                (DataMut::Bf16(a), DataMut::Bf16(b))
            }
        }
    }

    fn parts(&mut self) -> (c_int, usize, *mut c_void) {
        match self {
            DataMut::F32(s) => (DT_F32, s.len(), s.as_mut_ptr() as *mut c_void),
            DataMut::Bf16(s) => (DT_BF16, s.len(), s.as_mut_ptr() as *mut c_void),
        }
    }
}

/// The arguments of one product (batch entries contiguous, see [`OneDnn::matmul`]).
pub(crate) struct Product<'a> {
    pub out: DataMut<'a>,
    pub a: Data<'a>,
    pub b: Data<'a>,
    pub bias: Option<&'a [f32]>,
    pub spec: Spec,
    /// Where `b` lives, for keeping its packed copy ([`Key::packed_b`]):
    /// given for weights; `None` for products of activations (attention).
    pub b_id: Option<WeightId>,
}

/// One k chunk of a product, ready to run: its primitive and operands.
struct ChunkRun {
    p: Arc<Primitive>,
    a: *mut c_void,
    weights: Weights,
    dst: *mut c_void,
}

impl ChunkRun {
    fn ptrs(&self) -> [*mut c_void; 3] {
        [self.a, self.weights.ptr(), self.dst]
    }
}

/// The weights a chunk's run reads: the caller's, or a packed copy (held
/// for the run).
enum Weights {
    Plain(*mut c_void),
    Packed(Arc<Aligned>),
}

impl Weights {
    fn ptr(&self) -> *mut c_void {
        match self {
            Weights::Plain(p) => *p,
            Weights::Packed(copy) => copy.ptr(),
        }
    }
}

impl Product<'_> {
    /// Whether `b` is read pre-packed ([`Key::packed_b`]).
    fn packs_b(&self) -> bool {
        self.spec.plain() && self.b_id.is_some()
    }

    /// The bias, as a run passes it (used by the first chunk's primitive).
    fn bias_ptr(&self) -> Option<*mut c_void> {
        self.bias.map(|b| b.as_ptr() as *mut c_void)
    }

    /// Errors on mixed input dtypes, dtypes other than the spec's, or wrong lengths.
    fn check(&mut self) -> Result<(), String> {
        let Spec { batch, dims, .. } = self.spec;
        let GemmDims { m, n, k, .. } = dims;
        let (src, a_len, _) = self.a.parts();
        let (wei, b_len, _) = self.b.parts();
        let (dst, out_len, _) = self.out.parts();
        if src != self.spec.src || wei != self.spec.src || dst != self.spec.dst {
            return Err("operand dtypes other than the primitive's".into());
        }
        let want = |rows: usize, cols: usize| batch.checked_mul(rows).and_then(|r| r.checked_mul(cols));
        if Some(a_len) != want(m, k) || Some(b_len) != want(k, n) || Some(out_len) != want(m, n) {
            return Err(format!(
                "lengths a {a_len}, b {b_len}, out {out_len} for {batch} x [{m}, {n}, {k}]"
            ));
        }
        if self.bias.map(<[f32]>::len) != self.spec.bias.then_some(n) {
            return Err(format!("bias of {:?} for n = {n}", self.bias.map(<[f32]>::len)));
        }
        self.spec.check()
    }
}

/// Whether [`OneDnn::matmul`] would run.
pub(crate) enum Outcome {
    Done,
    /// oneDNN has no kernel for this product (the reason); nothing was written.
    Unsupported(String),
}

impl OneDnn {
    /// Runs `product` on `threads` OpenMP threads from the calling thread,
    /// under the process-wide lock: `out = alpha * op(a) @ op(b) + bias +
    /// beta * out`, per batch entry, k in chunks (see [`MAX_K_CHUNK`]).
    /// out: [batch, m, n]; a: [batch, m, k] (or [batch, k, m]); b: [batch, k, n] (or [batch, n, k]); bias: [n].
    pub(crate) fn matmul(&self, threads: usize, mut product: Product<'_>) -> Result<Outcome, String> {
        if let Err(e) = product.check() {
            return Ok(Outcome::Unsupported(e));
        }
        let mut state = self.lock(threads);
        let runs = match self.chunk_runs(&mut state, threads, false, &mut product)? {
            Ok(runs) => runs,
            Err(e) => return Ok(Outcome::Unsupported(e)),
        };
        let stream = state.stream;
        for run in &runs {
            // SAFETY: `check` matched the slices' lengths to the spec, the
            // chunk's descriptors stay inside them (offset plus strides of
            // the full k), and the slices outlive the call.
            unsafe { self.execute(stream, &run.p, run.ptrs(), product.bias_ptr(), None)? };
        }
        Ok(Outcome::Done)
    }

    /// [`OneDnn::matmul`] on the calling thread alone, outside the lock, so
    /// that rayon tasks run products side by side (each on one thread: one
    /// level of parallelism): the primitives and packed weights are found
    /// (or made) under the lock, then run on a stream of this call's own and
    /// `scratchpad` (the task's, grown as needed).
    pub(crate) fn matmul_in_task(&self, mut product: Product<'_>, scratchpad: &mut Vec<u8>) -> Result<Outcome, String> {
        if let Err(e) = product.check() {
            return Ok(Outcome::Unsupported(e));
        }
        // `lock(1)` also sets this thread's OpenMP count to one, so the runs
        // below stay on it.
        let runs = match self.chunk_runs(&mut self.lock(1), 1, true, &mut product)? {
            Ok(runs) => runs,
            Err(e) => return Ok(Outcome::Unsupported(e)),
        };
        let bytes = runs
            .iter()
            .map(|r| r.p.scratchpad.map_or(0, |(_, b)| b))
            .max()
            .unwrap_or(0);
        if scratchpad.len() < bytes {
            scratchpad.resize(bytes, 0);
        }
        let api = &self.api;
        let mut stream: Handle = std::ptr::null_mut();
        // SAFETY: an out-pointer, on the process's engine; destroyed below.
        check(
            unsafe { (api.stream_create)(&mut stream, self.engine, super::STREAM_DEFAULT) },
            "dnnl_stream_create",
        )?;
        let mut done = Ok(());
        for run in &runs {
            // SAFETY: as in `matmul`; the stream and scratchpad are this call's.
            done = unsafe { self.execute(stream, &run.p, run.ptrs(), product.bias_ptr(), Some(scratchpad)) };
            if done.is_err() {
                break;
            }
        }
        // SAFETY: made above, used by nothing else.
        unsafe { (api.stream_destroy)(stream) };
        done.map(|()| Outcome::Done)
    }

    /// Each k chunk's primitive (built for `threads`, in a task or not) and
    /// its `[src, weights, dst]`, the weights packed where the product
    /// packs them; `Ok(Err)` when oneDNN has no kernel for the product.
    fn chunk_runs(
        &self,
        state: &mut State,
        threads: usize,
        in_task: bool,
        product: &mut Product<'_>,
    ) -> Result<Result<Vec<ChunkRun>, String>, String> {
        let spec = product.spec;
        let packs_b = product.packs_b();
        let (_, _, a_ptr) = product.a.parts();
        let (_, _, b_ptr) = product.b.parts();
        let (_, _, dst_ptr) = product.out.parts();
        let mut runs = Vec::new();
        for chunk in spec.chunks() {
            let key = spec.key(chunk, threads, in_task, packs_b);
            let p = match state.get(self, key) {
                Ok(p) => p,
                Err(e) if chunk.0 == 0 => return Ok(Err(e)),
                Err(e) => return Err(format!("k chunk at {}: {e}", chunk.0)),
            };
            // SAFETY: `check` matched the slices' lengths to the spec.
            let (a, b) = unsafe { spec.chunk_ptrs(chunk.0, a_ptr, b_ptr) };
            let weights = match (&p.packing, &product.b_id) {
                (None, _) => Weights::Plain(b),
                // SAFETY: `b` holds the chunk's weights as `p` spans them;
                // the stream is the lock's, held by the caller.
                (Some(_), Some(id)) => {
                    Weights::Packed(unsafe { state.packs.weights(self, state.stream, (&p, key, chunk.0), id, b)? })
                }
                (Some(_), None) => return Err("packed weights without their place (`Product::b_id`)".into()),
            };
            runs.push(ChunkRun {
                p,
                a,
                weights,
                dst: dst_ptr,
            });
        }
        Ok(Ok(runs))
    }

    /// Runs `p` on `stream` over the buffers at `[src, weights, dst]` (and
    /// the bias), with `scratchpad` when `p` was built for the caller's, and
    /// waits for it: memory objects are made for the call and released after.
    ///
    /// # Safety
    /// The pointers must hold the elements `p`'s descriptors span, and no
    /// other run may use `stream` or `scratchpad` meanwhile.
    unsafe fn execute(
        &self,
        stream: Handle,
        p: &Primitive,
        [src, weights, dst]: [*mut c_void; 3],
        bias: Option<*mut c_void>,
        scratchpad: Option<&mut Vec<u8>>,
    ) -> Result<(), String> {
        let mut parts: Vec<(c_int, *const c_void, *mut c_void)> = vec![
            (ARG_SRC, &*p.src as *const MemoryDescV2 as *const c_void, src),
            (
                ARG_WEIGHTS,
                p.packing
                    .as_ref()
                    .map_or(&*p.weights as *const MemoryDescV2 as *const c_void, |k| k.md),
                weights,
            ),
            (ARG_DST, &*p.dst as *const MemoryDescV2 as *const c_void, dst),
        ];
        if let (Some(md), Some(ptr)) = (&p.bias, bias) {
            parts.push((ARG_BIAS, &**md as *const MemoryDescV2 as *const c_void, ptr));
        }
        match (p.scratchpad, scratchpad) {
            (Some((md, _)), Some(buf)) => parts.push((ARG_SCRATCHPAD, md, buf.as_mut_ptr() as *mut c_void)),
            (None, None) => {}
            _ => return Err("a scratchpad given to a primitive not built for one, or none to one that is".into()),
        }
        self.run(stream, p.prim, &parts)
    }

    /// The implementation oneDNN picks for `spec` ("brg:avx512_core_amx_bf16",
    /// its first k chunk) on the lock's team, weights packed where plain,
    /// building and caching its primitives; an error when it has none.
    pub(crate) fn implementation(&self, spec: Spec, threads: usize) -> Result<String, String> {
        spec.check()?;
        let mut state = self.lock(threads);
        let mut name = String::new();
        for chunk in spec.chunks() {
            let p = state.get(self, spec.key(chunk, threads, false, spec.plain()))?;
            if name.is_empty() {
                name = p.impl_name.clone();
            }
        }
        Ok(name)
    }

    /// How many times weights were packed into oneDNN's layout in this
    /// process ([`super::packed`]): once per weight, layout and write.
    pub fn weights_packed(&self) -> u64 {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).packs.packed
    }

    /// Bytes of packed weights kept now.
    pub fn packed_bytes(&self) -> usize {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).packs.bytes()
    }

    /// Builds (or finds) the primitives for `spec`; an error when oneDNN has
    /// no kernel for it (remembered: asked once per key).
    pub(crate) fn ready(&self, spec: Spec, threads: usize) -> Result<(), String> {
        self.implementation(spec, threads).map(|_| ())
    }
}

/// Builds the primitive for `key` (the caller holds the lock, with OpenMP set
/// to `key.threads`).
fn create(lib: &OneDnn, key: Key) -> Result<Primitive, String> {
    let api = &lib.api;
    let Key { batch, m, n, k, .. } = key;
    let (m, n, k, ks, b) = (m as i64, n as i64, k as i64, key.k_stride as i64, batch as i64);
    // Row-major per batch entry with the full k as leading dimension; a
    // transpose is a swap of the two strides.
    let src_strides = if key.trans_a { [1, m] } else { [ks, 1] };
    let wei_strides = if key.trans_b { [1, ks] } else { [n, 1] };
    let (src_dims, wei_dims, dst_dims, bias_dims) = ([m, k], [k, n], [m, n], [1, n]);
    let shape = |dims: [i64; 2], strides: [i64; 2], entry: i64| -> (Vec<i64>, Vec<i64>) {
        if batch > 1 {
            (vec![b, dims[0], dims[1]], vec![entry, strides[0], strides[1]])
        } else {
            (dims.to_vec(), strides.to_vec())
        }
    };
    let src = shape(src_dims, src_strides, m * ks);
    let wei = shape(wei_dims, wei_strides, ks * n);
    let dst = shape(dst_dims, [n, 1], m * n);
    let bias = if batch > 1 {
        (vec![1, 1, n], vec![n, n, 1])
    } else {
        (bias_dims.to_vec(), vec![n, 1])
    };
    let Flavour::V2(v2) = &lib.flavour;
    let md = |(dims, strides): &(Vec<i64>, Vec<i64>), dt: c_int| -> Result<Box<MemoryDescV2>, String> {
        let mut d = Box::new(MemoryDescV2([0; 1024]));
        // SAFETY: dims and strides hold `ndims` values; `d` is large enough.
        check(
            unsafe {
                (v2.memory_desc_init_by_strides)(&mut *d, dims.len() as c_int, dims.as_ptr(), dt, strides.as_ptr())
            },
            "dnnl_memory_desc_init_by_strides",
        )?;
        Ok(d)
    };
    let (src_md, wei_md, dst_md) = (md(&src, key.src)?, md(&wei, key.src)?, md(&dst, key.dst)?);
    let bias_md = if key.bias { Some(md(&bias, DT_F32)?) } else { None };
    // Packed weights: oneDNN picks the layout (`any`), `Packing` reorders into it.
    let any_md = if key.packed_b {
        let mut d = Box::new(MemoryDescV2([0; 1024]));
        let dims = [k, n];
        // SAFETY: dims holds 2 values; `d` is large enough.
        check(
            unsafe { (v2.memory_desc_init_by_tag)(&mut *d, 2, dims.as_ptr(), key.src, FORMAT_TAG_ANY) },
            "dnnl_memory_desc_init_by_tag",
        )?;
        Some(d)
    } else {
        None
    };
    let mut desc = Box::new(MatmulDescV2([0; 4096]));
    // SAFETY: every descriptor was initialised above; a null bias disables it.
    check(
        unsafe {
            (v2.matmul_desc_init)(
                &mut *desc,
                &*src_md,
                any_md.as_deref().unwrap_or(&*wei_md),
                bias_md
                    .as_deref()
                    .map_or(std::ptr::null(), |b| b as *const MemoryDescV2),
                &*dst_md,
            )
        },
        "dnnl_matmul_desc_init",
    )?;
    // Attributes: alpha as the output scale, beta as a `sum` post-op, then
    // the activation as an `eltwise` post-op.
    let mut attr: Handle = std::ptr::null_mut();
    // SAFETY: out-pointers to handles destroyed below.
    unsafe {
        check((api.primitive_attr_create)(&mut attr), "dnnl_primitive_attr_create")?;
        let configured = (|| {
            if key.in_task {
                check(
                    (v2.primitive_attr_set_scratchpad_mode)(attr, SCRATCHPAD_USER),
                    "dnnl_primitive_attr_set_scratchpad_mode",
                )?;
            }
            let alpha = f32::from_bits(key.alpha);
            if alpha != 1.0 {
                check(
                    (v2.primitive_attr_set_output_scales)(attr, 1, 0, &alpha),
                    "dnnl_primitive_attr_set_output_scales",
                )?;
            }
            let beta = f32::from_bits(key.beta);
            if beta != 0.0 || key.act.is_some() {
                let mut ops: Handle = std::ptr::null_mut();
                check((api.post_ops_create)(&mut ops), "dnnl_post_ops_create")?;
                let mut r = Ok(());
                if beta != 0.0 {
                    r = check((v2.post_ops_append_sum)(ops, beta), "dnnl_post_ops_append_sum");
                }
                if let (Ok(()), Some(alg)) = (&r, key.act) {
                    r = check(
                        (v2.post_ops_append_eltwise)(ops, 1.0, alg, 1.0, 0.0),
                        "dnnl_post_ops_append_eltwise",
                    );
                }
                let r = r.and_then(|()| check((api.primitive_attr_set_post_ops)(attr, ops), "set post-ops"));
                (api.post_ops_destroy)(ops);
                r?;
            }
            Ok::<(), String>(())
        })();
        let mut pd: Handle = std::ptr::null_mut();
        let made = configured.and_then(|()| {
            check(
                (v2.primitive_desc_create)(
                    &mut pd,
                    &*desc as *const MatmulDescV2 as *const c_void,
                    attr,
                    lib.engine,
                    std::ptr::null_mut(),
                ),
                "dnnl_primitive_desc_create (matmul)",
            )
        });
        (api.primitive_attr_destroy)(attr);
        made?;
        let mut name: *const c_char = std::ptr::null();
        let impl_name = match check(
            (api.primitive_desc_query)(
                pd,
                QUERY_IMPL_INFO_STR,
                0,
                &mut name as *mut *const c_char as *mut c_void,
            ),
            "query impl",
        ) {
            Ok(()) => c_string(name),
            Err(_) => "unknown".into(),
        };
        let mut prim: Handle = std::ptr::null_mut();
        if let Err(e) = check((api.primitive_create)(&mut prim, pd), "dnnl_primitive_create") {
            (api.primitive_desc_destroy)(pd);
            return Err(e);
        }
        let packing = match key.packed_b {
            true => match Packing::new(lib, pd, &wei_md) {
                Ok(packing) => Some(packing),
                Err(e) => {
                    (api.primitive_destroy)(prim);
                    (api.primitive_desc_destroy)(pd);
                    return Err(e);
                }
            },
            false => None,
        };
        let scratchpad = if key.in_task {
            let md = (v2.primitive_desc_query_md)(pd, QUERY_SCRATCHPAD_MD, 0);
            if md.is_null() {
                (api.primitive_destroy)(prim);
                (api.primitive_desc_destroy)(pd);
                return Err("dnnl_primitive_desc_query_md (scratchpad) returned null".into());
            }
            Some((md, (v2.memory_desc_get_size)(md)))
        } else {
            None
        };
        Ok(Primitive {
            pd,
            prim,
            src: src_md,
            weights: wei_md,
            packing,
            bias: bias_md,
            dst: dst_md,
            scratchpad,
            impl_name,
        })
    }
}

/// Releases a primitive (under the lock, when no task runs it).
fn destroy(lib: &OneDnn, p: Primitive) {
    let api = &lib.api;
    // SAFETY: each handle was made by oneDNN for this primitive and is
    // destroyed once.
    unsafe {
        if let Some(packing) = &p.packing {
            packing.destroy(lib);
        }
        (api.primitive_destroy)(p.prim);
        (api.primitive_desc_destroy)(p.pd);
    }
}
