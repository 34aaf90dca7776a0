//! Device buffers: a [`BufferStorage`] that owns a cudarc device slice.
//!
//! The memory is never host memory ([`BufferStorage::host_ptr`] is `None`), so
//! host code reaches it only through the backend's `upload` / `download`.
//! Ops address a view as the slice's base device pointer plus the view's byte
//! offset. Every op of one backend runs on its one stream, so the raw pointers
//! are ordered by the stream and need no cudarc event tracking.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ecdit_engine::BufferStorage;
use std::any::Any;
use std::ptr::NonNull;

/// One device allocation of the `cuda` backend.
pub struct CudaStorage {
    // Owns (and on drop frees, stream-ordered) the allocation.
    slice: CudaSlice<u8>,
    // The slice's device address, read once: it never moves.
    base: u64,
    // Bytes asked for (the slice has at least one, as CUDA allocates no zero-sized memory).
    len: usize,
}

impl CudaStorage {
    /// Wraps `slice`, `len` of whose bytes are the buffer.
    pub fn new(slice: CudaSlice<u8>, stream: &CudaStream, len: usize) -> Self {
        let base = {
            let (base, _record) = slice.device_ptr(stream);
            base
        };
        Self { slice, base, len }
    }

    /// The device address of byte `offset`.
    pub fn ptr(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// The underlying cudarc slice.
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

impl BufferStorage for CudaStorage {
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        None
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
