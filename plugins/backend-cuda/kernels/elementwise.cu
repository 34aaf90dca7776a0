// out: [n]; inp: [len]. out[i] += inp[i % len] (bias over rows, position table).
extern "C" __global__ void add_broadcast(float* out, const float* inp, u64 n, u64 len) {
    u64 i = thread_index();
    if (i < n) out[i] = __fadd_rn(out[i], inp[i % len]);
}

// y, x: [n]. y = a * x + b * y: two products and one sum, no FMA (the CPU
// backend's and the host schedulers' arithmetic).
extern "C" __global__ void axpby(float* y, const float* x, u64 n, float a, float b) {
    u64 i = thread_index();
    if (i < n) y[i] = __fadd_rn(__fmul_rn(a, x[i]), __fmul_rn(b, y[i]));
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
