//! Allocation and the transfers: device buffers from cudarc, bytes moved by
//! the driver's copies on the backend's stream.

use crate::backend::CudaBackend;
use crate::device::raw_ptr;
use crate::probe::cuda_error;
use crate::status;
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
        let ptr = raw_ptr(op, dst.as_ref())?;
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

    /// A view's bytes to the host; waits for the stream. The status words
    /// come back with the data: a bad index flagged since the last download
    /// makes this an error (see [`crate::status`]).
    pub(crate) fn download_bytes(&self, op: &str, dst: &mut [u8], src: TensorRef<'_>) -> Result<()> {
        check_bytes(op, dst.len(), src.byte_len())?;
        let ptr = raw_ptr(op, src)?;
        self.run(op, || {
            if !dst.is_empty() {
                // SAFETY: `ptr` addresses `dst.len()` bytes of a live buffer (the
                // view was bounds-checked when made); the synchronize in
                // `check_status` completes the copy before `dst` is handed back.
                unsafe { result::memcpy_dtoh_async(dst, ptr, self.stream().cu_stream()) }
                    .map_err(|e| cuda_error(format!("{op}: device-to-host copy: {e}")))?;
            }
            self.check_status(op)
        })
    }

    /// Waits for the stream, then reads and clears the status words.
    pub(crate) fn check_status(&self, op: &str) -> Result<()> {
        let mut words = [0u32; status::WORDS];
        let stream = self.stream().cu_stream();
        // SAFETY: the status allocation holds `status::WORDS` u32 words; the
        // synchronize below completes the copy before `words` is read.
        unsafe { result::memcpy_dtoh_async(&mut words[..], self.status_ptr(), stream) }
            .map_err(|e| cuda_error(format!("{op}: reading the status words: {e}")))?;
        self.stream()
            .synchronize()
            .map_err(|e| cuda_error(format!("{op}: synchronize: {e}")))?;
        match status::error(words) {
            None => Ok(()),
            Some(e) => {
                // SAFETY: as above; cleared in stream order.
                unsafe { sys::cuMemsetD32Async(self.status_ptr(), 0, status::WORDS, stream) }
                    .result()
                    .map_err(|e| cuda_error(format!("{op}: clearing the status words: {e}")))?;
                Err(e)
            }
        }
    }

    /// Device-to-device copy, converting between f32 and bf16.
    pub(crate) fn copy_impl(&self, dst: TensorMut<'_>, src: TensorRef<'_>) -> Result<()> {
        let op = "copy";
        dst.expect_len(op, "dst", src.numel())?;
        let (d, s) = (raw_ptr(op, dst.as_ref())?, raw_ptr(op, src)?);
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
        let ptr = raw_ptr(op, dst.as_ref())?;
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
