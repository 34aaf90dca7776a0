//! The CUDA C kernels, compiled once per backend with NVRTC.
//!
//! Each kernel is the plainest correct version (one thread per element, row or
//! column), written for parity with the CPU backend, not for speed. Reductions run
//! serially inside one thread so results are deterministic.

use crate::probe::cuda_error;
use cudarc::driver::{CudaContext, CudaFunction};
use ecdit_engine::Result;
use std::sync::Arc;

/// CUDA C source of every kernel below. NVRTC has no standard headers, so it uses
/// only the built-in math functions and `unsigned long long` for 64-bit indices.
pub const SOURCE: &str = r#"
typedef unsigned long long u64;

__device__ __forceinline__ u64 thread_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

// out: [rows, cols]; bias: [cols]
extern "C" __global__ void add_bias(float* out, const float* bias, u64 rows, u64 cols) {
    u64 i = thread_index();
    if (i < rows * cols) out[i] += bias[i % cols];
}

// out: [cols]; inp: [rows, cols]. One thread per column, rows summed in order.
extern "C" __global__ void sum_rows(float* out, const float* inp, u64 rows, u64 cols, int accumulate) {
    u64 c = thread_index();
    if (c >= cols) return;
    float acc = 0.0f;
    for (u64 r = 0; r < rows; ++r) acc += inp[r * cols + c];
    out[c] = accumulate ? out[c] + acc : acc;
}

// op 0: GELU (tanh approximation), op 1: SiLU.
__device__ __forceinline__ float unary_value(int op, float x) {
    if (op == 0) {
        const float s = 0.7978845608028654f; // sqrt(2 / pi)
        return 0.5f * x * (1.0f + tanhf(s * (x + 0.044715f * x * x * x)));
    }
    return x / (1.0f + expf(-x));
}

__device__ __forceinline__ float unary_derivative(int op, float x) {
    if (op == 0) {
        const float s = 0.7978845608028654f;
        float t = tanhf(s * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * s * (1.0f + 3.0f * 0.044715f * x * x);
    }
    float sig = 1.0f / (1.0f + expf(-x));
    return sig * (1.0f + x * (1.0f - sig));
}

// out, inp: [n]
extern "C" __global__ void unary_forward(float* out, const float* inp, u64 n, int op) {
    u64 i = thread_index();
    if (i < n) out[i] = unary_value(op, inp[i]);
}

// dinp, dout, inp: [n]
extern "C" __global__ void unary_backward(float* dinp, const float* dout, const float* inp, u64 n, int op) {
    u64 i = thread_index();
    if (i < n) dinp[i] = dout[i] * unary_derivative(op, inp[i]);
}

// out, inp: [rows, cols]. One thread per row, max-subtracted.
extern "C" __global__ void softmax_rows(float* out, const float* inp, u64 rows, u64 cols) {
    u64 r = thread_index();
    if (r >= rows) return;
    const float* x = inp + r * cols;
    float* y = out + r * cols;
    float mx = x[0];
    for (u64 c = 1; c < cols; ++c) mx = fmaxf(mx, x[c]);
    float sum = 0.0f;
    for (u64 c = 0; c < cols; ++c) {
        float e = expf(x[c] - mx);
        y[c] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (u64 c = 0; c < cols; ++c) y[c] *= inv;
}

// dinp, dout, out: [rows, cols]. dinp = out * (dout - sum(dout * out)).
extern "C" __global__ void softmax_rows_backward(float* dinp, const float* dout, const float* out, u64 rows, u64 cols) {
    u64 r = thread_index();
    if (r >= rows) return;
    u64 base = r * cols;
    float dot = 0.0f;
    for (u64 c = 0; c < cols; ++c) dot += dout[base + c] * out[base + c];
    for (u64 c = 0; c < cols; ++c) dinp[base + c] = out[base + c] * (dout[base + c] - dot);
}

// out: [n_idx, cols]; inp: [rows, cols]; idx: [n_idx], checked < rows on the host.
extern "C" __global__ void gather_rows(float* out, const float* inp, const unsigned int* idx, u64 n_idx, u64 cols) {
    u64 i = thread_index();
    if (i >= n_idx * cols) return;
    u64 r = i / cols, c = i % cols;
    out[i] = inp[(u64)idx[r] * cols + c];
}

// out: [rows, cols]; inp: [n_idx, cols]; idx, scale: [n_idx]. One thread per column,
// indices visited in order, so repeated indices add up deterministically.
extern "C" __global__ void scatter_add_rows(float* out, const float* inp, const unsigned int* idx,
                                           const float* scale, int has_scale, u64 n_idx, u64 cols) {
    u64 c = thread_index();
    if (c >= cols) return;
    for (u64 i = 0; i < n_idx; ++i) {
        float s = has_scale ? scale[i] : 1.0f;
        out[(u64)idx[i] * cols + c] += s * inp[i * cols + c];
    }
}

// param, grad, m, v: [n]. PyTorch AdamW; bc1 = 1 - beta1^step, bc2 = 1 - beta2^step.
extern "C" __global__ void adamw_step(float* param, float* m, float* v, const float* grad, u64 n,
                                      float lr, float beta1, float beta2, float eps, float weight_decay,
                                      float bc1, float bc2) {
    u64 i = thread_index();
    if (i >= n) return;
    float g = grad[i];
    float p = param[i] * (1.0f - lr * weight_decay);
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = p - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
}
"#;

/// The compiled kernels of one backend.
pub struct Kernels {
    /// See [`SOURCE`].
    pub add_bias: CudaFunction,
    /// See [`SOURCE`].
    pub sum_rows: CudaFunction,
    /// See [`SOURCE`].
    pub unary_forward: CudaFunction,
    /// See [`SOURCE`].
    pub unary_backward: CudaFunction,
    /// See [`SOURCE`].
    pub softmax_rows: CudaFunction,
    /// See [`SOURCE`].
    pub softmax_rows_backward: CudaFunction,
    /// See [`SOURCE`].
    pub gather_rows: CudaFunction,
    /// See [`SOURCE`].
    pub scatter_add_rows: CudaFunction,
    /// See [`SOURCE`].
    pub adamw_step: CudaFunction,
}

impl Kernels {
    /// Compiles [`SOURCE`] with NVRTC and loads it into `ctx`.
    pub fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| cuda_error(format!("NVRTC compile failed: {e}")))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| cuda_error(format!("loading the kernel module: {e}")))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_error(format!("kernel '{name}' missing from the module: {e}")))
        };
        Ok(Self {
            add_bias: load("add_bias")?,
            sum_rows: load("sum_rows")?,
            unary_forward: load("unary_forward")?,
            unary_backward: load("unary_backward")?,
            softmax_rows: load("softmax_rows")?,
            softmax_rows_backward: load("softmax_rows_backward")?,
            gather_rows: load("gather_rows")?,
            scatter_add_rows: load("scatter_add_rows")?,
            adamw_step: load("adamw_step")?,
        })
    }
}
