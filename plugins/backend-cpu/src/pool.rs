//! Buffer reuse for the CPU backend. A forward allocates the same sizes on
//! every call (routing tables, expert rows, scratch), and memory fresh from
//! the operating system costs a page fault per 4 KiB on first touch, about a
//! fifth of an `ec-s-8e` forward when every buffer was new. Freed buffers
//! therefore go back to a pool keyed by their exact size, and `alloc` hands
//! them out again zeroed (a memset, far cheaper than faulting pages in).

use ecdit_engine::error::Result;
use ecdit_engine::{BufferStorage, HostStorage};
use std::any::Any;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Most bytes the pool keeps idle; buffers freed beyond it go back to the system.
const MAX_IDLE_BYTES: usize = 1 << 30;

/// Idle host buffers by byte size.
#[derive(Default)]
pub(crate) struct BufferPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_size: HashMap<usize, Vec<HostStorage>>,
    bytes: usize,
}

impl BufferPool {
    /// `bytes` zeroed bytes, reused from the pool when one of that size is idle.
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize) -> Result<PooledStorage> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let found = idle.by_size.get_mut(&bytes).and_then(Vec::pop);
            if found.is_some() {
                idle.bytes -= bytes;
            }
            found
        };
        let storage = match reused {
            Some(s) => {
                // SAFETY: the storage owns `bytes` writable bytes at its pointer.
                unsafe { std::ptr::write_bytes(s.ptr().as_ptr(), 0, bytes) };
                s
            }
            None => HostStorage::zeroed(bytes)?,
        };
        Ok(PooledStorage {
            storage: Some(storage),
            pool: self.clone(),
        })
    }

    fn give_back(&self, storage: HostStorage) {
        let bytes = storage.len_bytes();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.bytes + bytes <= MAX_IDLE_BYTES {
            idle.bytes += bytes;
            idle.by_size.entry(bytes).or_default().push(storage);
        }
    }
}

/// Host memory that returns to its pool when the buffer is dropped.
pub(crate) struct PooledStorage {
    storage: Option<HostStorage>,
    pool: Arc<BufferPool>,
}

impl PooledStorage {
    fn inner(&self) -> &HostStorage {
        self.storage.as_ref().expect("present until drop")
    }
}

impl Drop for PooledStorage {
    fn drop(&mut self) {
        if let Some(s) = self.storage.take() {
            self.pool.give_back(s);
        }
    }
}

impl BufferStorage for PooledStorage {
    fn len_bytes(&self) -> usize {
        self.inner().len_bytes()
    }
    fn host_ptr(&self) -> Option<NonNull<u8>> {
        Some(self.inner().ptr())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_buffer_comes_back_zeroed() {
        let pool = Arc::new(BufferPool::default());
        let first = pool.alloc(256).unwrap();
        let ptr = first.host_ptr().unwrap();
        // SAFETY: 256 writable bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 7, 256) };
        drop(first);
        let again = pool.alloc(256).unwrap();
        assert_eq!(again.host_ptr(), Some(ptr), "the idle buffer of that size is reused");
        // SAFETY: 256 readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), 256) };
        assert!(bytes.iter().all(|&b| b == 0));
        let other = pool.alloc(128).unwrap();
        assert_ne!(other.host_ptr(), Some(ptr));
    }
}
