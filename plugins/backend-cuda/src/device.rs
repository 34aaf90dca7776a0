//! What every op of the CUDA backend shares: views to device addresses, kernel
//! launches, and turning cudarc panics into errors.

use crate::backend::CudaBackend;
use crate::probe::cuda_error;
use crate::storage::CudaStorage;
use cudarc::driver::{LaunchArgs, LaunchConfig};
use ecdit_engine::{DType, EngineError, Result, TensorRef};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Threads per block of every launch.
pub const BLOCK: u32 = 256;

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

/// The error of an op this backend does not run yet.
pub fn not_implemented(op: &str) -> EngineError {
    cuda_error(format!("op {op} is not implemented on the CUDA backend yet"))
}

/// One thread per item, [`BLOCK`] threads per block.
pub fn launch_config(op: &str, items: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(items.div_ceil(BLOCK as usize))
        .map_err(|_| cuda_error(format!("{op}: {items} threads exceed one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The device address of a view of dtype `dtype` in a buffer of this backend.
pub fn dev_ptr(op: &str, what: &str, view: TensorRef<'_>, dtype: DType) -> Result<u64> {
    view.expect_dtype(op, what, dtype)?;
    let storage = view.buffer().downcast::<CudaStorage>(op, "cuda")?;
    Ok(storage.ptr(view.byte_offset()))
}

/// [`dev_ptr`] of an f32 view.
pub fn f32_ptr(op: &str, what: &str, view: TensorRef<'_>) -> Result<u64> {
    dev_ptr(op, what, view, DType::F32)
}

/// [`dev_ptr`] of an optional f32 view: `(address or 0, present as 0/1)`.
pub fn opt_f32_ptr(op: &str, what: &str, view: Option<TensorRef<'_>>) -> Result<(u64, i32)> {
    match view {
        Some(v) => Ok((f32_ptr(op, what, v)?, 1)),
        None => Ok((0, 0)),
    }
}

/// Errors unless `n` elements of `op` fit the 64-bit sizes the kernels take.
pub use ecdit_engine::error::numel;

impl CudaBackend {
    /// Launches a kernel whose arguments are already pushed onto `args`, one
    /// thread per item; nothing to do for zero items.
    pub(crate) fn launch(&self, op: &str, items: usize, mut args: LaunchArgs<'_>) -> Result<()> {
        if items == 0 {
            return Ok(());
        }
        let cfg = launch_config(op, items)?;
        // SAFETY: the argument lists match the kernel signatures in kernels/*.cu,
        // every view was length- and dtype-checked against the dimensions passed,
        // and every address is of a live buffer of this backend.
        unsafe { args.launch(cfg) }.map_err(|e| cuda_error(format!("{op}: launch: {e}")))?;
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

    /// Checks u32 row indices against `rows` on the host (one download of the
    /// indices); the kernels skip an out-of-range index too, so memory stays
    /// safe either way.
    pub(crate) fn check_indices(&self, op: &str, idx: TensorRef<'_>, rows: usize) -> Result<()> {
        let mut host = vec![0u32; idx.numel()];
        self.download_bytes(op, bytemuck::cast_slice_mut(&mut host), idx)?;
        match host.iter().position(|&i| i as usize >= rows) {
            None => Ok(()),
            Some(p) => Err(EngineError::shape(
                format!("{op} (idx[{p}])"),
                format!("a row index < {rows}"),
                host[p],
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_config_covers_every_item() {
        let cfg = launch_config("t", 1000).unwrap();
        assert_eq!(cfg.grid_dim.0 * cfg.block_dim.0, 1024);
        assert_eq!(launch_config("t", 256).unwrap().grid_dim.0, 1);
        assert!(launch_config("t", usize::MAX).is_err());
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

    #[test]
    fn not_implemented_names_the_op_and_backend() {
        let e = not_implemented("attention").to_string();
        assert_eq!(
            e,
            "backend cuda: op attention is not implemented on the CUDA backend yet"
        );
    }
}
