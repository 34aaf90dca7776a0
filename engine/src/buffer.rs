//! Buffers: memory a backend allocated, as ggml-backend's buffer interface.
//!
//! A [`Buffer`] owns one allocation through a backend's [`BufferStorage`]. The
//! storage says whether its memory is host memory; only then may host code view
//! it without a transfer ([`crate::TensorRef::host`]). Device memory (and the
//! transfer-counting test backend's memory) is reachable only through the
//! backend's `upload` and `download`.

use crate::error::{EngineError, Result};
use std::alloc::Layout;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Alignment of host buffers: a cache line, and what AVX-512 loads like.
pub const HOST_ALIGN: usize = 64;

/// One allocation of a backend. Implementations free their memory on drop.
pub trait BufferStorage: Send + Sync + Any {
    /// Size in bytes.
    fn len_bytes(&self) -> usize;

    /// The base address when this is host memory that host code may read and
    /// write directly; `None` for device memory. Writes go through
    /// [`crate::TensorMut::host_mut`], which counts them ([`Buffer::writes`]).
    fn host_ptr(&self) -> Option<NonNull<u8>>;

    /// For the owning backend to recover its concrete storage type.
    fn as_any(&self) -> &dyn Any;

    /// Host code is about to write this memory through a mutable view
    /// ([`crate::TensorMut::host_mut`]). A storage standing for another
    /// side's buffer (a plugin's) passes the news on, so that side's
    /// [`Buffer::writes`] count moves too. Default: nothing to tell.
    fn written(&self) {}
}

/// A buffer: a backend's storage plus the name of the backend that made it
/// (for errors when a tensor reaches the wrong backend), an id no other
/// buffer of the process shares, and a count of mutable host views taken of
/// it. The id and the count let a backend keep data derived from a buffer's
/// contents (oneDNN's pre-packed weights) and know when it is stale.
pub struct Buffer {
    storage: Box<dyn BufferStorage>,
    backend: &'static str,
    id: u64,
    /// Shared with [`BufferWatch`]es, which see the buffer go when it drops.
    writes: Arc<AtomicU64>,
}

/// The next [`Buffer::id`].
static NEXT_BUFFER_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("backend", &self.backend)
            .field("bytes", &self.storage.len_bytes())
            .field("host", &self.storage.host_ptr().is_some())
            .finish()
    }
}

impl Buffer {
    /// Wraps a backend's storage.
    pub fn new(storage: Box<dyn BufferStorage>, backend: &'static str) -> Self {
        Self {
            storage,
            backend,
            id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed),
            writes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// This buffer's id: never reused within the process, even when a
    /// backend recycles the memory behind it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many times the contents may have changed: every mutable host view
    /// ([`crate::TensorMut::host_mut`], which every write of a host backend
    /// goes through) counts one. Equal counts mean equal contents.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// A watch on this buffer's write count that does not keep it alive.
    pub fn watch(&self) -> BufferWatch {
        BufferWatch {
            id: self.id,
            writes: Arc::downgrade(&self.writes),
        }
    }

    /// Counts a write (see [`Buffer::writes`]) and tells the storage.
    pub fn note_write(&self) {
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.storage.written();
    }

    /// The storage, for the backend that owns it.
    pub fn storage(&self) -> &dyn BufferStorage {
        self.storage.as_ref()
    }

    /// The backend that allocated this buffer.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        self.storage.len_bytes()
    }

    /// True when host code may view this memory directly.
    pub fn is_host(&self) -> bool {
        self.storage.host_ptr().is_some()
    }

    /// The concrete storage of backend type `S`, or an error naming both sides.
    pub fn downcast<S: BufferStorage>(&self, op: &str, backend: &str) -> Result<&S> {
        self.storage
            .as_any()
            .downcast_ref::<S>()
            .ok_or_else(|| EngineError::Backend {
                backend: backend.into(),
                reason: format!("{op}: a tensor lives in a buffer of backend '{}'", self.backend),
            })
    }
}

/// A buffer's id and write count seen from outside it, for data derived from
/// its contents: that data is current while the count is the one it was
/// derived at, and can go once the buffer is gone.
#[derive(Clone, Debug)]
pub struct BufferWatch {
    id: u64,
    writes: Weak<AtomicU64>,
}

impl BufferWatch {
    /// [`Buffer::id`] of the watched buffer.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// [`Buffer::writes`] of the watched buffer; `None` once it is dropped.
    pub fn writes(&self) -> Option<u64> {
        self.writes.upgrade().map(|w| w.load(Ordering::Acquire))
    }
}

/// Zero-initialised, [`HOST_ALIGN`]-aligned host memory: the CPU backend's
/// buffers, and what other backends stage transfers through.
pub struct HostStorage {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the memory is owned exclusively by this value; access is mediated by
// the tensor views, which follow Rust's borrow rules.
unsafe impl Send for HostStorage {}
unsafe impl Sync for HostStorage {}

impl HostStorage {
    /// `bytes` zeroed bytes, or an error when the allocator refuses.
    pub fn zeroed(bytes: usize) -> Result<Self> {
        let too_big = || EngineError::Backend {
            backend: "host".into(),
            reason: format!("cannot allocate {bytes} bytes"),
        };
        // A zero-sized layout is not allowed for alloc; keep one aligned unit.
        let layout = Layout::from_size_align(bytes.max(1), HOST_ALIGN).map_err(|_| too_big())?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(too_big)?;
        Ok(Self {
            ptr,
            len: bytes,
            layout,
        })
    }

    /// The base pointer (valid for `len_bytes` bytes).
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for HostStorage {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl BufferStorage for HostStorage {
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        Some(self.ptr)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
