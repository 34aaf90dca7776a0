// Shared helpers of every kernel file. NVRTC has no standard headers, so only
// built-in math and `unsigned long long` for 64-bit sizes. Arithmetic that the
// CPU backend's results are compared against to the bit uses the explicit
// round-to-nearest intrinsics (__fadd_rn, __fmul_rn, ...): NVRTC would otherwise
// contract a * b + c into one FMA and round differently.
//
// Every kernel runs [BLOCK = 256] threads per block and walks its items with a
// grid-stride loop, so any grid size covers any item count.
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// -infinity (NVRTC has no math.h for INFINITY).
#define NEG_INF __int_as_float(0xff800000)

// Threads per block of every launch (crate::device::BLOCK).
#define BLOCK 256

__device__ __forceinline__ u64 thread_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ u64 grid_stride() {
    return (u64)gridDim.x * blockDim.x;
}

// One thread per item: for (i = first; i < n; i += stride).
#define FOR_EACH(i, n) for (u64 i = thread_index(); i < (n); i += grid_stride())

// bf16 storage as raw 16-bit words: widening is exact.
__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even, NaN kept quiet (as half::bf16::from_f32).
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

// A float tensor view: its device address and its storage type. Kernels read
// and write float tensors only through ld/st, so every float op takes f32 and
// bf16 storage in any mix; arithmetic is always f32 (bf16 is widened exactly
// on load and rounded to nearest even on store, once per element).
struct Ten {
    u64 ptr;
    u32 bf16;
    u32 pad;
};

__device__ __forceinline__ float ld(Ten t, u64 i) {
    if (t.bf16) return bf16_to_f32(((const u16*)t.ptr)[i]);
    return ((const float*)t.ptr)[i];
}

__device__ __forceinline__ void st(Ten t, u64 i, float v) {
    if (t.bf16) {
        ((u16*)t.ptr)[i] = f32_to_bf16(v);
    } else {
        ((float*)t.ptr)[i] = v;
    }
}

// The backend's status words (crate::status): status[0] ORs the bit of every
// op that met a row index out of range (the index is skipped, never read or
// written), status[1] keeps the largest such index. Read back and cleared at
// the next download or synchronize, so no op waits for the host.
__device__ __forceinline__ void flag_bad_index(u32* status, u32 op_bit, u32 index) {
    atomicOr(status, op_bit);
    atomicMax(status + 1, index);
}

// The CPU backend's vectorisable exp (ops/exp.rs `exp_approx`: Cephes' expf,
// range reduction by ln 2 and a degree-6 polynomial), operation for operation,
// so activations and softmaxes give the CPU's bits.
__device__ __forceinline__ float exp_cpu(float x) {
    const float ln2_hi = __int_as_float(0x3f318000);  // 0.693_359_4
    const float ln2_lo = __int_as_float(0xb95e8083);  // -2.121_944_4e-4
    const float round = __int_as_float(0x4b400000);   // 1.5 * 2^23
    const float log2e = __int_as_float(0x3fb8aa3b);   // LOG2_E
    bool underflow = x < -87.0f;
    // clamp(x, -87, 88), NaN kept.
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = __fadd_rn(__fmul_rn(xc, log2e), round);
    float n = __fsub_rn(t, round);
    float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, ln2_hi)), __fmul_rn(n, ln2_lo));
    float p = __int_as_float(0x39506967);                       // 1.987_569_1e-4
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3ab743ce)); // 1.398_199_9e-3
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3c088908)); // 8.333_452e-3
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3d2aa9c1)); // 4.166_579_6e-2
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(0x3e2aaaaa)); // 1.666_666_5e-1
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    float y = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    int n_int = __float_as_int(t) - __float_as_int(round);
    float e = __fmul_rn(y, __uint_as_float(((u32)(n_int + 127)) << 23));
    return underflow ? 0.0f : e;
}

// 2^(i/32) as tab[i] + (i << 47), glibc's __exp2f_data.tab (ARM's optimized-routines).
__constant__ u64 EXP2F_TAB[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

// The host's `f32::exp` (glibc's expf: x * 32/ln2 = k + r, 2^(k/32) from the
// table, a cubic in r, all in double, rounded once to float), operation for
// operation with explicit rounding, so the router softmax and the timestep
// frequencies give the host's bits. glibc has two builds that differ at two of
// the 2^32 inputs: with `fma` the one x86-64 picks on CPUs with FMA (GCC
// contracts the reduction and the cubic into fused multiply-adds), else the
// plain one; the backend asks the host which (crate::exact::host_uses_fma,
// which also mirrors this function and is checked against `f32::exp`).
__device__ float exp_exact(float x, int fma) {
    const double invln2n = __longlong_as_double(0x40471547652b82fell);  // 0x1.71547652b82fep+0 * 32
    const double shift = __longlong_as_double(0x4338000000000000ll);    // 0x1.8p+52
    const double c0 = __longlong_as_double(0x3ebc6af84b912394ll);       // 0x1.c6af84b912394p-5 / 32^3
    const double c1 = __longlong_as_double(0x3f2ebfce50fac4f3ll);       // 0x1.ebfce50fac4f3p-3 / 32^2
    const double c2 = __longlong_as_double(0x3f962e42ff0c52d6ll);       // 0x1.62e42ff0c52d6p-1 / 32
    u32 bits = __float_as_uint(x);
    u32 abstop = (bits >> 20) & 0x7ff;
    if (abstop >= 0x42b) {  // |x| >= 88 or x is NaN
        if (bits == 0xff800000u) return 0.0f;        // exp(-inf)
        if (abstop >= 0x7f8) return __fadd_rn(x, x); // +inf, NaN
        if (x > __uint_as_float(0x42b17217u)) return __uint_as_float(0x7f800000u);  // overflow
        if (x < __uint_as_float(0xc2cff1b4u)) return 0.0f;                         // underflow
    }
    double xd = (double)x;
    u64 ki;
    double r, y;
    if (fma) {
        double kd = __fma_rn(invln2n, xd, shift);
        ki = (u64)__double_as_longlong(kd);
        r = __fma_rn(invln2n, xd, -__dsub_rn(kd, shift));
    } else {
        double z = __dmul_rn(invln2n, xd);
        double kd = __dadd_rn(z, shift);
        ki = (u64)__double_as_longlong(kd);
        r = __dsub_rn(z, __dsub_rn(kd, shift));
    }
    u64 t = EXP2F_TAB[ki % 32] + (ki << 47);
    double s = __longlong_as_double((long long)t);
    double r2 = __dmul_rn(r, r);
    if (fma) {
        y = __fma_rn(__fma_rn(c0, r, c1), r2, __fma_rn(c2, r, 1.0));
    } else {
        y = __dadd_rn(__dmul_rn(__dadd_rn(__dmul_rn(c0, r), c1), r2), __dadd_rn(__dmul_rn(c2, r), 1.0));
    }
    return __double2float_rn(__dmul_rn(y, s));
}

// Sum of `v` over the 16 lanes of this thread's half-warp, folded in lane
// order from `init` (the CPU backend's `lane_wise` fold of its 16 lane
// accumulators); every lane of the half-warp gets it. All 32 lanes of the
// warp must call it together.
__device__ __forceinline__ float fold_lanes16(float v, float init) {
    float acc = init;
    for (int l = 0; l < 16; ++l) acc = __fadd_rn(acc, __shfl_sync(0xffffffffu, v, l, 16));
    return acc;
}

// Max of `v` over the half-warp (lane order does not matter for a max of numbers).
__device__ __forceinline__ float max_lanes16(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, 16));
    return v;
}
