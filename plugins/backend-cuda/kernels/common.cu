// Shared helpers of every kernel file. NVRTC has no standard headers, so only
// built-in math and `unsigned long long` for 64-bit sizes. Arithmetic that the
// CPU backend's results are compared against to the bit uses the explicit
// round-to-nearest intrinsics (__fadd_rn, __fmul_rn): NVRTC would otherwise
// contract a * b + c into one FMA and round differently.
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// -infinity (NVRTC has no math.h for INFINITY).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u64 thread_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

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
