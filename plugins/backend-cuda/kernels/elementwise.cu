// out: [n]; inp: [len]. out[i] += inp[i % len] (bias over rows, position table).
extern "C" __global__ void add_broadcast(Ten out, Ten inp, u64 n, u64 len) {
    FOR_EACH(i, n) st(out, i, __fadd_rn(ld(out, i), ld(inp, i % len)));
}

// y, x: [n]. y = a * x + b * y: two products and one sum, no FMA (the CPU
// backend's and the host schedulers' arithmetic).
extern "C" __global__ void axpby(Ten y, Ten x, u64 n, float a, float b) {
    FOR_EACH(i, n) st(y, i, __fadd_rn(__fmul_rn(a, ld(x, i)), __fmul_rn(b, ld(y, i))));
}

// The CPU backend's activations (ops/activation.rs), operation for operation:
// GELU (tanh form) as x * sigmoid(2 * s * (x + c x^3)), SiLU as x * sigmoid(x).
#define GELU_SCALE __int_as_float(0x3f4c422a)  // 0.797_884_6
#define GELU_CUBE __int_as_float(0x3d372713)   // 0.044715

__device__ __forceinline__ float sigmoid_cpu(float z) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_cpu(-z)));
}

__device__ __forceinline__ float gelu_arg(float x) {
    return __fmul_rn(GELU_SCALE, __fadd_rn(x, __fmul_rn(__fmul_rn(__fmul_rn(GELU_CUBE, x), x), x)));
}

// op 0: GELU (tanh approximation), op 1: SiLU.
__device__ __forceinline__ float unary_value(int op, float x) {
    if (op == 0) return __fmul_rn(x, sigmoid_cpu(__fmul_rn(2.0f, gelu_arg(x))));
    return __fmul_rn(x, sigmoid_cpu(x));
}

__device__ __forceinline__ float unary_derivative(int op, float x) {
    if (op == 0) {
        float s = sigmoid_cpu(__fmul_rn(2.0f, gelu_arg(x)));
        // s + 2 x s (1 - s) SCALE (1 + 3 CUBE x^2), left to right as the CPU.
        float three_cube = __fmul_rn(3.0f, GELU_CUBE);
        float inner = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(three_cube, x), x));
        float t = __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(2.0f, x), s), __fsub_rn(1.0f, s)), GELU_SCALE);
        return __fadd_rn(s, __fmul_rn(t, inner));
    }
    float s = sigmoid_cpu(x);
    return __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(x, __fsub_rn(1.0f, s))));
}

// out, inp: [n]
extern "C" __global__ void unary_forward(Ten out, Ten inp, u64 n, int op) {
    FOR_EACH(i, n) st(out, i, unary_value(op, ld(inp, i)));
}

// dinp, dout, inp: [n]. dinp = dout * act'(inp).
extern "C" __global__ void unary_backward(Ten dinp, Ten dout, Ten inp, u64 n, int op) {
    FOR_EACH(i, n) st(dinp, i, __fmul_rn(ld(dout, i), unary_derivative(op, ld(inp, i))));
}

// param, grad, m, v: [n], f32. PyTorch AdamW as the CPU backend computes it
// (ops/optim.rs): decay = 1 - lr wd, step_size = lr / (1 - beta1^t) and
// bc2_sqrt = sqrt(1 - beta2^t) from the host (f64, rounded to f32).
extern "C" __global__ void adamw_step(float* param, float* m, float* v, const float* grad, u64 n,
                                      float beta1, float beta2, float eps, float decay,
                                      float step_size, float bc2_sqrt) {
    float one_b1 = __fsub_rn(1.0f, beta1), one_b2 = __fsub_rn(1.0f, beta2);
    FOR_EACH(i, n) {
        float g = grad[i];
        float p = __fmul_rn(param[i], decay);
        float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_b1, g));
        float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_b2, g), g));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        m[i] = mi;
        v[i] = vi;
        param[i] = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mi), denom));
    }
}

// param, grad, v, buf: [n], f32. One RMSProp-with-momentum step, the engine's
// RmsProp::update per element: p *= 1 - lr wd; v = alpha v + (1 - alpha) g^2;
// buf = momentum buf + g / (sqrt(v) + eps); p -= lr buf.
extern "C" __global__ void rmsprop_step(float* param, float* v, float* buf, const float* grad, u64 n,
                                        float lr, float alpha, float eps, float momentum, float weight_decay) {
    float decay = __fsub_rn(1.0f, __fmul_rn(lr, weight_decay));
    float one_a = __fsub_rn(1.0f, alpha);
    FOR_EACH(i, n) {
        float g = grad[i];
        float p = __fmul_rn(param[i], decay);
        float vi = __fadd_rn(__fmul_rn(alpha, v[i]), __fmul_rn(__fmul_rn(one_a, g), g));
        float bi = __fadd_rn(__fmul_rn(momentum, buf[i]), __fdiv_rn(g, __fadd_rn(__fsqrt_rn(vi), eps)));
        v[i] = vi;
        buf[i] = bi;
        param[i] = __fsub_rn(p, __fmul_rn(lr, bi));
    }
}
