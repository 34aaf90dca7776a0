//! The op bodies of [`crate::CudaBackend`], one file per family; the `Backend`
//! impl in `backend.rs` delegates to them. Each checks its views' counts and
//! dtypes (f32 for float tensors: bf16 storage is not implemented here yet),
//! then launches one kernel of `kernels/*.cu` (or a cuBLAS call).

mod adaln;
mod attention;
mod elementwise;
mod embed;
mod gather;
mod products;
mod rows;
mod topk;
