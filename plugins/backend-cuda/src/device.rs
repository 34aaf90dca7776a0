//! What every op of the CUDA backend shares: views to device addresses (the
//! kernels' [`DevTen`]), kernel launches, and turning cudarc panics into errors.

use crate::backend::CudaBackend;
use crate::probe::cuda_error;
use crate::storage::CudaStorage;
use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig};
use ecdit_engine::{DType, EngineError, Result, TensorRef};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Threads per block of every launch (`BLOCK` in `kernels/common.cu`).
pub const BLOCK: u32 = 256;

/// Most blocks of one launch: every kernel walks its items with a grid-stride
/// loop, so a capped grid still covers any count.
pub const MAX_BLOCKS: u32 = 1 << 20;

/// Runs `f`, turning a panic inside cudarc (a missing symbol, say) into an error.
pub fn guarded<T>(op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(cuda_error(format!("{op}: cudarc panicked: {msg}")))
    })
}

/// `threads` threads (one per item, or 16 per row, 32 per query row: whatever
/// the kernel walks), [`BLOCK`] per block, at most [`MAX_BLOCKS`] blocks.
pub fn launch_config(threads: usize) -> LaunchConfig {
    let blocks = threads.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A float tensor as the kernels take it (`struct Ten` in `kernels/common.cu`):
/// its device address and whether it is stored bf16 (else f32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevTen {
    /// Device address of the first element.
    pub ptr: u64,
    /// 1 when stored bf16, 0 when f32.
    pub bf16: u32,
    pad: u32,
}

// SAFETY: plain `repr(C)` integers, the layout of the CUDA struct (16 bytes, align 8).
unsafe impl DeviceRepr for DevTen {}

impl DevTen {
    /// An f32 tensor at device address `ptr` (scratch).
    pub fn f32(ptr: u64) -> Self {
        Self { ptr, bf16: 0, pad: 0 }
    }

    /// An absent optional tensor (never read: its flag argument says so).
    pub const NONE: DevTen = DevTen {
        ptr: 0,
        bf16: 0,
        pad: 0,
    };
}

/// The device address of a view of dtype `dtype` in a buffer of this backend.
pub fn dev_ptr(op: &str, what: &str, view: TensorRef<'_>, dtype: DType) -> Result<u64> {
    view.expect_dtype(op, what, dtype)?;
    raw_ptr(op, view)
}

/// The device address of a view of any dtype.
pub fn raw_ptr(op: &str, view: TensorRef<'_>) -> Result<u64> {
    let storage = view.buffer().downcast::<CudaStorage>(op, "cuda")?;
    Ok(storage.ptr(view.byte_offset()))
}

/// [`dev_ptr`] of an f32 view (router math, optimiser state).
pub fn f32_ptr(op: &str, what: &str, view: TensorRef<'_>) -> Result<u64> {
    dev_ptr(op, what, view, DType::F32)
}

/// A float view (f32 or bf16) for the kernels.
pub fn ten(op: &str, what: &str, view: TensorRef<'_>) -> Result<DevTen> {
    let bf16 = match view.dtype() {
        DType::F32 => 0,
        DType::BF16 => 1,
        other => return Err(EngineError::shape(format!("{op} ({what} dtype)"), "f32 or bf16", other)),
    };
    Ok(DevTen {
        ptr: raw_ptr(op, view)?,
        bf16,
        pad: 0,
    })
}

/// [`ten`] of an optional view: `(tensor or DevTen::NONE, present as 0/1)`.
pub fn opt_ten(op: &str, what: &str, view: Option<TensorRef<'_>>) -> Result<(DevTen, i32)> {
    match view {
        Some(v) => Ok((ten(op, what, v)?, 1)),
        None => Ok((DevTen::NONE, 0)),
    }
}

/// Errors unless `n` elements of `op` fit the 64-bit sizes the kernels take.
pub use ecdit_engine::error::numel;

impl CudaBackend {
    /// Launches a kernel whose arguments are already pushed onto `args` with
    /// `threads` threads (see [`launch_config`]); nothing to do for zero.
    pub(crate) fn launch(&self, op: &str, threads: usize, mut args: LaunchArgs<'_>) -> Result<()> {
        if threads == 0 {
            return Ok(());
        }
        // SAFETY: the argument lists match the kernel signatures in kernels/*.cu,
        // every view was length- and dtype-checked against the dimensions passed,
        // and every address is of a live buffer of this backend.
        unsafe { args.launch(launch_config(threads)) }.map_err(|e| cuda_error(format!("{op}: launch: {e}")))?;
        Ok(())
    }

    /// Runs `f` with this backend's context current on the calling thread, a
    /// cudarc panic turned into an error.
    pub(crate) fn run<T>(&self, op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        guarded(op, || {
            self.ctx()
                .bind_to_thread()
                .map_err(|e| cuda_error(format!("{op}: binding the context: {e}")))?;
            f()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_config_covers_every_thread_or_strides() {
        let cfg = launch_config(1000);
        assert_eq!(cfg.grid_dim.0 * cfg.block_dim.0, 1024);
        assert_eq!(launch_config(256).grid_dim.0, 1);
        assert_eq!(launch_config(1).grid_dim.0, 1);
        // Beyond the cap the grid-stride loops cover the rest.
        assert_eq!(launch_config(usize::MAX).grid_dim.0, MAX_BLOCKS);
    }

    #[test]
    fn dev_ten_is_the_kernels_struct() {
        // struct Ten { u64 ptr; u32 bf16; u32 pad; }: 16 bytes, 8-aligned.
        assert_eq!(std::mem::size_of::<DevTen>(), 16);
        assert_eq!(std::mem::align_of::<DevTen>(), 8);
        assert!(crate::kernels::SOURCE.contains("struct Ten {\n    u64 ptr;\n    u32 bf16;\n    u32 pad;\n};"));
    }

    #[test]
    fn guarded_turns_a_panic_into_a_cuda_error() {
        let e = guarded::<()>("probe", || panic!("Missing symbol cuFoo"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backend cuda") && e.contains("probe") && e.contains("cuFoo"),
            "{e}"
        );
    }
}
