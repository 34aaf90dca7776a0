//! Explicit transfers and allocation helpers over any [`Backend`]: every host
//! read or write of tensor data outside a host-memory view goes through here
//! (and so through the backend's `upload` / `download`, which a test backend
//! counts).

use crate::backend::Backend;
use crate::dtype::{bf16, DType};
use crate::error::{numel, EngineError, Result};
use crate::tensor::{byte_len, Tensor, TensorMut, TensorRef};

/// Allocation and transfer helpers for every backend.
pub trait BackendExt: Backend {
    /// A zero-filled tensor.
    fn zeros(&self, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let numel = numel("zeros", dims)?;
        let buffer = self.alloc(byte_len(numel, dtype)?)?;
        Tensor::from_buffer(buffer, dims, dtype)
    }

    /// A new tensor holding `data`, stored as `dtype` (f32 or bf16; bf16 rounds).
    fn upload_f32(&self, dims: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        let mut t = self.zeros(dims, dtype)?;
        self.write_f32(t.view_mut(), data)?;
        Ok(t)
    }

    /// A new u32 tensor (indices).
    fn upload_u32(&self, dims: &[usize], data: &[u32]) -> Result<Tensor> {
        let mut t = self.zeros(dims, DType::U32)?;
        t.view().expect_len("upload_u32", "data", data.len())?;
        self.upload(t.view_mut(), bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// A new u8 tensor (masks).
    fn upload_u8(&self, dims: &[usize], data: &[u8]) -> Result<Tensor> {
        let mut t = self.zeros(dims, DType::U8)?;
        t.view().expect_len("upload_u8", "data", data.len())?;
        self.upload(t.view_mut(), data)?;
        Ok(t)
    }

    /// Writes f32 values into a float view (converting to its dtype). One transfer.
    fn write_f32(&self, dst: TensorMut<'_>, data: &[f32]) -> Result<()> {
        dst.expect_len("write_f32", "data", data.len())?;
        match dst.dtype() {
            DType::F32 => self.upload(dst, bytemuck::cast_slice(data)),
            DType::BF16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                self.upload(dst, bytemuck::cast_slice(&v))
            }
            other => Err(EngineError::shape("write_f32 (dtype)", "f32 or bf16", other)),
        }
    }

    /// A float view's values as f32 on the host. One transfer.
    fn read_f32(&self, src: TensorRef<'_>) -> Result<Vec<f32>> {
        match src.dtype() {
            DType::F32 => {
                let mut out = vec![0.0f32; src.numel()];
                self.download(bytemuck::cast_slice_mut(&mut out), src)?;
                Ok(out)
            }
            DType::BF16 => {
                let mut raw = vec![bf16::ZERO; src.numel()];
                self.download(bytemuck::cast_slice_mut(&mut raw), src)?;
                Ok(raw.iter().map(|v| v.to_f32()).collect())
            }
            other => Err(EngineError::shape("read_f32 (dtype)", "f32 or bf16", other)),
        }
    }

    /// A u32 view's values on the host. One transfer.
    fn read_u32(&self, src: TensorRef<'_>) -> Result<Vec<u32>> {
        src.expect_dtype("read_u32", "src", DType::U32)?;
        let mut out = vec![0u32; src.numel()];
        self.download(bytemuck::cast_slice_mut(&mut out), src)?;
        Ok(out)
    }
}

impl<B: Backend + ?Sized> BackendExt for B {}
