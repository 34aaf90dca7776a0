//! The op bodies of [`crate::CudaBackend`], one file per family; the `Backend`
//! impl in `backend.rs` delegates to them. Each checks its views' counts and
//! dtypes (float tensors f32 or bf16, in any mix, except the f32-only router
//! and optimiser tensors; u32 indices, u8 masks), then queues kernels of
//! `kernels/*.cu` (or cuBLAS calls) on the backend's stream. No op waits for
//! the host: scratch is stream-ordered device memory.

mod adaln;
mod attention;
mod elementwise;
mod embed;
mod gather;
mod products;
mod rows;
mod topk;
