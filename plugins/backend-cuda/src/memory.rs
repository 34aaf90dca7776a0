//! Allocation and the transfers: device buffers from cudarc, bytes moved by
//! the driver's copies on the backend's stream.

use crate::backend::CudaBackend;
use crate::device::dev_ptr;
use crate::probe::cuda_error;
use crate::storage::CudaStorage;
use cudarc::driver::PushKernelArg;
use cudarc::driver::{result, sys};
use ecdit_engine::{bf16, Buffer, DType, EngineError, Result, TensorMut, TensorRef};

impl CudaBackend {
    /// `bytes` zeroed bytes of device memory.
    pub(crate) fn alloc_impl(&self, bytes: usize) -> Result<Buffer> {
        self.run("alloc", || {
            // CUDA allocates no zero-sized memory; keep one byte.
            let slice = self
                .stream()
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(|e| cuda_error(format!("alloc: {bytes} bytes: {e}")))?;
            let storage = CudaStorage::new(slice, self.stream(), bytes);
            Ok(Buffer::new(Box::new(storage), "cuda"))
        })
    }

    /// Host bytes into a view.
    pub(crate) fn upload_impl(&self, dst: TensorMut<'_>, src: &[u8]) -> Result<()> {
        let op = "upload";
        check_bytes(op, src.len(), dst.byte_len())?;
        let ptr = dev_ptr(op, "dst", dst.as_ref(), dst.dtype())?;
        if src.is_empty() {
            return Ok(());
        }
        self.run(op, || {
            // SAFETY: `ptr` addresses `src.len()` bytes of a live buffer (the view
            // was bounds-checked when made). From pageable memory the copy has
            // read `src` when the call returns.
            unsafe { result::memcpy_htod_async(ptr, src, self.stream().cu_stream()) }
                .map_err(|e| cuda_error(format!("{op}: host-to-device copy: {e}")))
        })
    }

    /// A view's bytes to the host; waits for the stream.
    pub(crate) fn download_bytes(&self, op: &str, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        check_bytes(op, dst.len(), src.byte_len())?;
        let ptr = dev_ptr(op, "src", src, src.dtype())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.run(op, || {
            // SAFETY: as in `upload_impl`; the synchronize below completes the
            // copy before `dst` is handed back.
            unsafe { result::memcpy_dtoh_async(dst, ptr, self.stream().cu_stream()) }
                .map_err(|e| cuda_error(format!("{op}: device-to-host copy: {e}")))?;
            self.stream()
                .synchronize()
                .map_err(|e| cuda_error(format!("{op}: synchronize: {e}")))
        })
    }

    /// Device-to-device copy, converting between f32 and bf16.
    pub(crate) fn copy_impl(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        let op = "copy";
        dst.expect_len(op, "dst", src.numel())?;
        let (d, s) = (
            dev_ptr(op, "dst", dst.as_ref(), dst.dtype())?,
            dev_ptr(op, "src", src, src.dtype())?,
        );
        let n = src.numel() as u64;
        if n == 0 {
            return Ok(());
        }
        self.run(op, || match (dst.dtype(), src.dtype()) {
            (a, b) if a == b => {
                // SAFETY: both views cover `byte_len` bytes of live buffers; an
                // exclusive and a shared view never overlap.
                unsafe { result::memcpy_dtod_async(d, s, src.byte_len(), self.stream().cu_stream()) }
                    .map_err(|e| cuda_error(format!("{op}: device-to-device copy: {e}")))
            }
            (DType::BF16, DType::F32) => {
                let mut args = self.stream().launch_builder(&self.kernels().f32_to_bf16_copy);
                args.arg(&d).arg(&s).arg(&n);
                self.launch(op, n as usize, args)
            }
            (DType::F32, DType::BF16) => {
                let mut args = self.stream().launch_builder(&self.kernels().bf16_to_f32_copy);
                args.arg(&d).arg(&s).arg(&n);
                self.launch(op, n as usize, args)
            }
            (a, b) => Err(EngineError::shape(
                format!("{op} (dtypes)"),
                "the same dtype, or f32 and bf16",
                format!("dst {a}, src {b}"),
            )),
        })
    }

    /// Every element of a float view set to `value`.
    pub(crate) fn fill_impl(&self, dst: TensorMut<'_>, value: f32) -> Result<()> {
        let op = "fill";
        let ptr = dev_ptr(op, "dst", dst.as_ref(), dst.dtype())?;
        let n = dst.numel();
        if n == 0 && dst.dtype().is_float() {
            return Ok(());
        }
        self.run(op, || {
            let stream = self.stream().cu_stream();
            // SAFETY: `ptr` addresses `n` elements of the view's dtype in a live
            // buffer, aligned to the element size (buffers are 256-byte aligned).
            let status = match dst.dtype() {
                DType::F32 => unsafe { sys::cuMemsetD32Async(ptr, value.to_bits(), n, stream) },
                DType::BF16 => unsafe { sys::cuMemsetD16Async(ptr, bf16::from_f32(value).to_bits(), n, stream) },
                other => return Err(EngineError::shape(format!("{op} (dst dtype)"), "f32 or bf16", other)),
            };
            status.result().map_err(|e| cuda_error(format!("{op}: memset: {e}")))
        })
    }
}

fn check_bytes(op: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::shape(
            format!("{op} (host bytes)"),
            format!("{want} bytes"),
            format!("{got} bytes"),
        ))
    }
}
