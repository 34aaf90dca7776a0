//! Weights pre-packed in oneDNN's blocked layout, packed once and kept while
//! the weight is unchanged.
//!
//! oneDNN's `brg` matmul kernels read the weights in a blocked layout of
//! their own; given plain row-major weights they copy them into it inside
//! every run, again for each block of rows. A primitive built for packed
//! weights ([`super::matmul::Key::packed_b`]) skips that copy, and this store
//! keeps the packed copy of each weight. Measured on an AMD EPYC with
//! AVX-512 BF16 (2 threads, oneDNN 2.6.3, DiT-S shapes, interleaved runs of
//! `benches/onednn/packed_weights.c`): bf16 products 7-16% faster (35% at 64
//! rows), f32 ones 0-15%.
//!
//! A copy is found by where its weight lives (buffer id, byte offset, the k
//! chunk, the plain layout) and remembers the buffer's write count
//! ([`ecdit_engine::Buffer::writes`]) it was packed from: a weight written
//! since (an optimiser step, a load) is packed again into the same memory.
//! So at inference each weight is packed once; in training once per step
//! for each layout it is read in (the forward's and the input gradient's).

use super::matmul::{Key, Primitive};
use super::{check, Handle, MemoryDescV2, OneDnn, ARG_FROM, ARG_TO, QUERY_WEIGHTS_MD};
use ecdit_engine::BufferWatch;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// Most bytes of packed weights kept; beyond it the least recently used go.
/// (Twice the bf16 weights of a 500M-parameter model: its forward and
/// backward layouts.)
const MAX_BYTES: usize = 2 << 30;

/// Where a weight operand lives, and its buffer's write count.
#[derive(Clone, Debug)]
pub(crate) struct WeightId {
    /// The weight's buffer (its id; and whether it still lives).
    pub buffer: BufferWatch,
    /// The operand's first byte in the buffer.
    pub offset: usize,
    /// [`ecdit_engine::Buffer::writes`] when the product reads it.
    pub writes: u64,
}

/// A primitive's packed weights layout and the reorder that packs plain
/// weights (its [`Primitive`]'s strided descriptor) into it.
pub(crate) struct Packing {
    /// The packed descriptor, owned by the matmul's primitive descriptor.
    pub md: *const c_void,
    pub bytes: usize,
    reorder_pd: Handle,
    reorder: Handle,
}

impl Packing {
    /// The layout the matmul primitive descriptor `pd` picked for its
    /// weights, and a reorder into it from `plain`.
    ///
    /// # Safety
    /// `pd` is a live matmul primitive descriptor built with weights in
    /// `FORMAT_TAG_ANY`; it must outlive the result.
    pub(crate) unsafe fn new(lib: &OneDnn, pd: Handle, plain: &MemoryDescV2) -> Result<Self, String> {
        let (api, super::Flavour::V2(v2)) = (&lib.api, &lib.flavour);
        let md = (v2.primitive_desc_query_md)(pd, QUERY_WEIGHTS_MD, 0);
        if md.is_null() {
            return Err("dnnl_primitive_desc_query_md (weights) returned null".into());
        }
        let bytes = (v2.memory_desc_get_size)(md);
        let mut reorder_pd: Handle = std::ptr::null_mut();
        check(
            (v2.reorder_primitive_desc_create)(
                &mut reorder_pd,
                plain as *const MemoryDescV2 as *const c_void,
                lib.engine,
                md,
                lib.engine,
                std::ptr::null_mut(),
            ),
            "dnnl_reorder_primitive_desc_create",
        )?;
        let mut reorder: Handle = std::ptr::null_mut();
        if let Err(e) = check(
            (api.primitive_create)(&mut reorder, reorder_pd),
            "dnnl_primitive_create (reorder)",
        ) {
            (api.primitive_desc_destroy)(reorder_pd);
            return Err(e);
        }
        Ok(Self {
            md,
            bytes,
            reorder_pd,
            reorder,
        })
    }

    /// Releases the reorder (the descriptor belongs to the matmul's).
    ///
    /// # Safety
    /// Once, when no run uses it.
    pub(crate) unsafe fn destroy(&self, lib: &OneDnn) {
        (lib.api.primitive_destroy)(self.reorder);
        (lib.api.primitive_desc_destroy)(self.reorder_pd);
    }

    /// Packs the plain weights at `from` (laid out as `plain`) into `to`,
    /// on `stream` (the lock's, with OpenMP at the primitive's threads).
    ///
    /// # Safety
    /// `from` holds the elements `plain` spans, `to` holds `self.bytes`.
    unsafe fn run(
        &self,
        lib: &OneDnn,
        stream: Handle,
        plain: &MemoryDescV2,
        from: *mut c_void,
        to: *mut c_void,
    ) -> Result<(), String> {
        let plain = plain as *const MemoryDescV2 as *const c_void;
        lib.run(stream, self.reorder, &[(ARG_FROM, plain, from), (ARG_TO, self.md, to)])
    }
}

/// `len` bytes aligned to 64 (a cache line; what oneDNN asks of its buffers).
/// Shared (`Arc`) between the store and the runs reading it: a copy the
/// store lets go of stays alive until a run in a task is done with it.
pub(crate) struct Aligned {
    /// Owns the bytes; never touched after `zeroed` (reads and writes go
    /// through `start`).
    _buf: Vec<u8>,
    start: *mut u8,
    len: usize,
}

// SAFETY: the bytes are written only while packing, under the lock of
// [`OneDnn`], into a copy no run holds; runs only read them.
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

impl Aligned {
    const ALIGN: usize = 64;

    fn zeroed(len: usize) -> Self {
        let mut buf = vec![0u8; len + Self::ALIGN - 1];
        let offset = buf.as_ptr().align_offset(Self::ALIGN);
        // SAFETY: `offset < ALIGN`, inside the allocation.
        let start = unsafe { buf.as_mut_ptr().add(offset) };
        Self { _buf: buf, start, len }
    }

    /// The first byte (of `len`); written through only while packing.
    pub(crate) fn ptr(&self) -> *mut c_void {
        self.start as *mut c_void
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// What a packed copy is the copy of: a weight's place and plain layout.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Slot {
    buffer: u64,
    offset: usize,
    k0: usize,
    k: usize,
    k_stride: usize,
    n: usize,
    trans_b: bool,
    src: c_int,
}

/// One packed copy: the primitive whose layout it has (kept alive for its
/// descriptor), its weight's buffer, the write count it was packed from
/// (`None` before it is), and the bytes.
struct PackedCopy {
    layout: Arc<Primitive>,
    buffer: BufferWatch,
    writes: Option<u64>,
    data: Arc<Aligned>,
    last_used: u64,
}

/// The packed copies, under the lock of [`OneDnn`].
#[derive(Default)]
pub(crate) struct Store {
    slots: HashMap<Slot, Vec<PackedCopy>>,
    bytes: usize,
    tick: u64,
    /// Weights packed so far.
    pub(crate) packed: u64,
}

impl Store {
    /// The weights at `plain` (k chunk `k0` of the weight `id`) packed in the
    /// layout of `p` (built for `key`, with a [`Packing`]): the kept copy when
    /// its buffer was not written since, else packed now (into fresh memory
    /// while a run in a task still reads the old copy).
    ///
    /// # Safety
    /// `plain` holds the chunk's elements as `p`'s plain descriptor spans
    /// them; `stream` is the lock's, and the caller holds the lock.
    pub(crate) unsafe fn weights(
        &mut self,
        lib: &OneDnn,
        stream: Handle,
        (p, key, k0): (&Arc<Primitive>, Key, usize),
        id: &WeightId,
        plain: *mut c_void,
    ) -> Result<Arc<Aligned>, String> {
        let packing = p.packing.as_ref().ok_or("a primitive without packed weights")?;
        let super::Flavour::V2(v2) = &lib.flavour;
        self.tick += 1;
        let slot = Slot {
            buffer: id.buffer.id(),
            offset: id.offset,
            k0,
            k: key.k,
            k_stride: key.k_stride,
            n: key.n,
            trans_b: key.trans_b,
            src: key.src,
        };
        if !self.slots.contains_key(&slot) {
            self.drop_dead();
        }
        let copies = self.slots.entry(slot).or_default();
        let same_layout = |c: &PackedCopy| {
            c.layout
                .packing
                .as_ref()
                .is_some_and(|l| (v2.memory_desc_equal)(l.md, packing.md) == 1)
        };
        let i = match copies.iter().position(same_layout) {
            Some(i) => i,
            None => {
                copies.push(PackedCopy {
                    layout: p.clone(),
                    buffer: id.buffer.clone(),
                    writes: None,
                    data: Arc::new(Aligned::zeroed(packing.bytes)),
                    last_used: 0,
                });
                self.bytes += packing.bytes;
                copies.len() - 1
            }
        };
        let copy = &mut copies[i];
        if copy.writes != Some(id.writes) {
            if Arc::strong_count(&copy.data) > 1 {
                copy.data = Arc::new(Aligned::zeroed(packing.bytes));
            }
            packing.run(lib, stream, &p.weights, plain, copy.data.ptr())?;
            copy.writes = Some(id.writes);
            self.packed += 1;
        }
        copy.last_used = self.tick;
        let data = copy.data.clone();
        self.evict();
        Ok(data)
    }

    /// Bytes of the copies kept.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the copies of weights whose buffers are gone (a freed model's).
    fn drop_dead(&mut self) {
        let mut freed = 0;
        self.slots.retain(|_, copies| {
            copies.retain(|c| {
                let alive = c.buffer.writes().is_some();
                if !alive {
                    freed += c.data.len();
                }
                alive
            });
            !copies.is_empty()
        });
        self.bytes -= freed;
    }

    /// Drops the least recently used copies while more than [`MAX_BYTES`]
    /// are kept, never the one used at this tick (about to run).
    fn evict(&mut self) {
        while self.bytes > MAX_BYTES {
            let tick = self.tick;
            let oldest = self
                .slots
                .iter()
                .flat_map(|(s, copies)| copies.iter().enumerate().map(move |(i, c)| ((*s, i), c.last_used)))
                .filter(|&(_, used)| used != tick)
                .min_by_key(|&(_, used)| used)
                .map(|(at, _)| at);
            let Some((slot, i)) = oldest else { return };
            if let Some(copies) = self.slots.get_mut(&slot) {
                self.bytes -= copies.swap_remove(i).data.len();
                if copies.is_empty() {
                    self.slots.remove(&slot);
                }
            }
        }
    }
}
