//! Host transliterations of the device's bit-exact arithmetic, so that what
//! the kernels promise can be checked on a machine without a GPU.
//!
//! - [`expf`] is `exp_exact` of `kernels/common.cu`: glibc's `expf` (the ARM
//!   optimized-routines algorithm, in double, rounded once), which is what
//!   Rust's `f32::exp` calls on Linux. The router softmax and the timestep
//!   frequencies use it on the device, so they give the host's bits; the tests
//!   check it against `f32::exp`.
//! - [`exp_cpu`] is `exp_cpu` of `kernels/common.cu`: the CPU backend's
//!   polynomial `exp`, used by the device's activations and softmaxes.
//!
//! The tests below also replay the kernels' 16-lane row sums (softmax, layer
//! norm) and the activations with these functions and compare them with the
//! CPU backend to the bit.

/// `2^(i/32)` as `TAB[i] + (i << 47)` (glibc's `__exp2f_data.tab`).
const EXP2F_TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// glibc's `expf`, operation for operation as `exp_exact` in `kernels/common.cu`,
/// in the host's form ([`host_uses_fma`]).
pub fn expf(x: f32) -> f32 {
    expf_with(x, host_uses_fma())
}

/// Inputs where glibc's two builds of `expf` differ (found by an exhaustive
/// search over all 2^32 floats: everywhere else they agree).
pub const FMA_WITNESSES: [u32; 2] = [0xc27c65d9, 0x4202422f];

/// Whether the host's `f32::exp` is glibc's FMA build (x86-64 with AVX2 and
/// FMA picks it at load time; GCC contracts the reduction and the polynomial
/// into fused multiply-adds) rather than the plain one. Decided once, by
/// asking `f32::exp` at the inputs where the two differ; a libm that is
/// neither gets the FMA form and a warning (the router softmax then agrees
/// with the host to within an ulp at most, not to the bit).
pub fn host_uses_fma() -> bool {
    static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FMA.get_or_init(|| {
        let matches = |fma: bool| {
            FMA_WITNESSES.iter().all(|&b| {
                let x = f32::from_bits(b);
                expf_with(x, fma).to_bits() == std::hint::black_box(x).exp().to_bits()
            })
        };
        if matches(true) {
            true
        } else if matches(false) {
            false
        } else {
            tracing::warn!("the host's f32::exp is not glibc's expf; router softmax on cuda is not bit-identical");
            true
        }
    })
}

/// glibc's `expf` (the ARM optimized-routines algorithm): with `fma`, the
/// build with fused multiply-adds (the reduction `k = x 32/ln2 + shift`,
/// `r = x 32/ln2 - k` and the cubic each rounded once), else plain multiplies
/// and adds.
pub fn expf_with(x: f32, fma: bool) -> f32 {
    let invln2n = f64::from_bits(0x40471547652b82fe); // 0x1.71547652b82fep+0 * 32
    let shift = f64::from_bits(0x4338000000000000); // 0x1.8p+52
    let c0 = f64::from_bits(0x3ebc6af84b912394); // 0x1.c6af84b912394p-5 / 32^3
    let c1 = f64::from_bits(0x3f2ebfce50fac4f3); // 0x1.ebfce50fac4f3p-3 / 32^2
    let c2 = f64::from_bits(0x3f962e42ff0c52d6); // 0x1.62e42ff0c52d6p-1 / 32
    let bits = x.to_bits();
    let abstop = (bits >> 20) & 0x7ff;
    if abstop >= 0x42b {
        if bits == 0xff800000 {
            return 0.0;
        }
        if abstop >= 0x7f8 {
            return x + x;
        }
        if x > f32::from_bits(0x42b17217) {
            return f32::INFINITY;
        }
        if x < f32::from_bits(0xc2cff1b4) {
            return 0.0;
        }
    }
    let xd = x as f64;
    let (ki, r) = if fma {
        let kd = invln2n.mul_add(xd, shift);
        let ki = kd.to_bits();
        (ki, invln2n.mul_add(xd, -(kd - shift)))
    } else {
        let z = invln2n * xd;
        let kd = z + shift;
        (kd.to_bits(), z - (kd - shift))
    };
    let t = EXP2F_TAB[(ki % 32) as usize].wrapping_add(ki << 47);
    let s = f64::from_bits(t);
    let y = if fma {
        c0.mul_add(r, c1).mul_add(r * r, c2.mul_add(r, 1.0))
    } else {
        (c0 * r + c1) * (r * r) + (c2 * r + 1.0)
    };
    (y * s) as f32
}

/// The CPU backend's polynomial `exp` (`exp_approx`), as `exp_cpu` in `kernels/common.cu`.
pub fn exp_cpu(x: f32) -> f32 {
    let ln2_hi = f32::from_bits(0x3f318000);
    let ln2_lo = f32::from_bits(0xb95e8083);
    let round = f32::from_bits(0x4b400000);
    let log2e = f32::from_bits(0x3fb8aa3b);
    let underflow = x < -87.0;
    // NaN stays NaN, as in the kernel's comparisons.
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * log2e + round;
    let n = t - round;
    let r = xc - n * ln2_hi - n * ln2_lo;
    let mut p = f32::from_bits(0x39506967);
    for c in [0x3ab743ce, 0x3c088908, 0x3d2aa9c1, 0x3e2aaaaa] {
        p = p * r + f32::from_bits(c);
    }
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(round.to_bits() as i32);
    let e = y * f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_engine::{Backend, BackendExt, DType, Unary};
    use rand::{Rng, SeedableRng};

    fn bits_equal(a: &[f32], b: &[f32]) -> Option<usize> {
        a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits())
    }

    /// Every 61st float, all of [-104, 0] at a finer step (the router softmax's
    /// range), the special values, and the inputs where glibc's two builds
    /// differ: the device's exact exp (in the host's form) is the host's.
    #[test]
    fn expf_is_the_hosts_exp() {
        let check = |x: f32| {
            // black_box: LLVM would fold `exp` of a constant with its own libm.
            let (got, want) = (expf(x), std::hint::black_box(x).exp());
            assert!(
                got.to_bits() == want.to_bits() || got.is_nan() && want.is_nan(),
                "expf({x:e} = {:#x}): {got:e} vs f32::exp {want:e}",
                x.to_bits()
            );
        };
        for bits in (0..=u32::MAX).step_by(61) {
            check(f32::from_bits(bits));
        }
        // Negative floats down to -104 (0x80000000..=0xc2d00000), every 7th.
        for bits in (0x8000_0000u32..=0xc2d0_0000).step_by(7) {
            check(f32::from_bits(bits));
        }
        for x in [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.72,
            -103.9,
            -103.3,
            -87.5,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
        ] {
            check(x);
        }
        for b in FMA_WITNESSES {
            check(f32::from_bits(b));
        }
    }

    /// The two forms differ at the witnesses (so the host probe can tell
    /// them apart) and agree elsewhere on a sample.
    #[test]
    fn the_two_forms_differ_only_at_the_witnesses() {
        for b in FMA_WITNESSES {
            let x = f32::from_bits(b);
            assert_ne!(expf_with(x, true).to_bits(), expf_with(x, false).to_bits(), "{x:e}");
        }
        for bits in (0..=u32::MAX).step_by(997) {
            let x = f32::from_bits(bits);
            let (a, b) = (expf_with(x, true), expf_with(x, false));
            assert!(a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(), "{x:e}");
        }
    }

    fn cpu() -> CpuBackend {
        CpuBackend::new(1).unwrap()
    }

    /// The 16-lane sum of `softmax_rows`/`layer_norm` in `kernels/rows.cu`:
    /// lane l adds elements 16 j + l, lanes folded in order from 0, then the tail.
    fn lane_sum(row: &[f32], g: impl Fn(f32) -> f32) -> f32 {
        let full = row.len() / 16;
        let mut acc = [0.0f32; 16];
        for j in 0..full {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += g(row[16 * j + l]);
            }
        }
        let mut sum = acc.iter().fold(0.0f32, |s, &a| s + a);
        for &x in &row[16 * full..] {
            sum += g(x);
        }
        sum
    }

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    /// The kernel's softmax_rows, replayed: the CPU backend's bits.
    #[test]
    fn softmax_kernel_order_gives_the_cpu_bits() {
        let b = cpu();
        for cols in [1usize, 7, 16, 33, 100, 1152] {
            let rows = 5;
            let x = random(rows * cols, cols as u64, 8.0);
            let xt = b.upload_f32(&[rows, cols], &x, DType::F32).unwrap();
            let mut out = b.zeros(&[rows, cols], DType::F32).unwrap();
            b.softmax_rows(out.view_mut(), xt.view(), rows, cols).unwrap();
            let want = b.read_f32(out.view()).unwrap();
            let mut got = Vec::new();
            for row in x.chunks(cols) {
                let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                let sum = lane_sum(row, |v| exp_cpu(v - mx));
                let inv = 1.0 / sum;
                got.extend(row.iter().map(|&v| exp_cpu(v - mx) * inv));
            }
            assert_eq!(bits_equal(&got, &want), None, "cols {cols}");
        }
    }

    /// The kernel's layer_norm, replayed: the CPU backend's bits.
    #[test]
    fn layer_norm_kernel_order_gives_the_cpu_bits() {
        let b = cpu();
        for cols in [1usize, 8, 17, 64, 1152] {
            let rows = 4;
            let x = random(rows * cols, 3 + cols as u64, 3.0);
            let (w, bias) = (random(cols, 1, 1.0), random(cols, 2, 1.0));
            let eps = 1e-6f32;
            let xt = b.upload_f32(&[rows, cols], &x, DType::F32).unwrap();
            let (wt, bt) = (
                b.upload_f32(&[cols], &w, DType::F32).unwrap(),
                b.upload_f32(&[cols], &bias, DType::F32).unwrap(),
            );
            let mut out = b.zeros(&[rows, cols], DType::F32).unwrap();
            let (mut mean, mut rstd) = (
                b.zeros(&[rows], DType::F32).unwrap(),
                b.zeros(&[rows], DType::F32).unwrap(),
            );
            b.layer_norm(
                out.view_mut(),
                mean.view_mut(),
                rstd.view_mut(),
                xt.view(),
                Some(wt.view()),
                Some(bt.view()),
                rows,
                cols,
                eps,
            )
            .unwrap();
            let (mut got, mut got_mu, mut got_rs) = (Vec::new(), Vec::new(), Vec::new());
            for row in x.chunks(cols) {
                let m = lane_sum(row, |v| v) / cols as f32;
                let var = lane_sum(row, |v| (v - m) * (v - m)) / cols as f32;
                let s = 1.0 / (var + eps).sqrt();
                got.extend(row.iter().enumerate().map(|(c, &v)| (v - m) * s * w[c] + bias[c]));
                got_mu.push(m);
                got_rs.push(s);
            }
            assert_eq!(bits_equal(&got, &b.read_f32(out.view()).unwrap()), None, "cols {cols}");
            assert_eq!(bits_equal(&got_mu, &b.read_f32(mean.view()).unwrap()), None);
            assert_eq!(bits_equal(&got_rs, &b.read_f32(rstd.view()).unwrap()), None);
        }
    }

    /// The kernels' activations (`kernels/elementwise.cu`), replayed: the CPU bits.
    #[test]
    fn activation_kernels_give_the_cpu_bits() {
        let b = cpu();
        let x = random(4000, 9, 12.0);
        let dout = random(4000, 10, 2.0);
        let sigmoid = |z: f32| 1.0 / (1.0 + exp_cpu(-z));
        let (scale, cube) = (f32::from_bits(0x3f4c422a), f32::from_bits(0x3d372713));
        let arg = |x: f32| scale * (x + cube * x * x * x);
        let (xt, dt) = (
            b.upload_f32(&[4000], &x, DType::F32).unwrap(),
            b.upload_f32(&[4000], &dout, DType::F32).unwrap(),
        );
        for op in [Unary::GeluTanh, Unary::Silu] {
            let f = |x: f32| match op {
                Unary::GeluTanh => x * sigmoid(2.0 * arg(x)),
                Unary::Silu => x * sigmoid(x),
            };
            let df = |x: f32| match op {
                Unary::GeluTanh => {
                    let s = sigmoid(2.0 * arg(x));
                    let t = 2.0 * x * s * (1.0 - s) * scale;
                    s + t * (1.0 + 3.0 * cube * x * x)
                }
                Unary::Silu => {
                    let s = sigmoid(x);
                    s * (1.0 + x * (1.0 - s))
                }
            };
            let mut y = b.zeros(&[4000], DType::F32).unwrap();
            b.unary(op, y.view_mut(), xt.view()).unwrap();
            let got: Vec<f32> = x.iter().map(|&v| f(v)).collect();
            assert_eq!(bits_equal(&got, &b.read_f32(y.view()).unwrap()), None, "{op:?}");
            b.unary_backward(op, y.view_mut(), dt.view(), xt.view()).unwrap();
            let got: Vec<f32> = x.iter().zip(&dout).map(|(&v, &d)| d * df(v)).collect();
            assert_eq!(
                bits_equal(&got, &b.read_f32(y.view()).unwrap()),
                None,
                "{op:?} backward"
            );
        }
    }

    /// The router_softmax kernel with [`expf`], replayed: the CPU backend's
    /// (and the host routers') bits, -inf scores included.
    #[test]
    fn router_softmax_kernel_gives_the_cpu_bits() {
        let b = cpu();
        let (rows, e) = (64, 8);
        let mut s = random(rows * e, 4, 30.0);
        s[3] = f32::NEG_INFINITY;
        let st = b.upload_f32(&[rows, e], &s, DType::F32).unwrap();
        let mut out = b.zeros(&[rows, e], DType::F32).unwrap();
        b.router_softmax(out.view_mut(), st.view(), rows, e).unwrap();
        let mut got = Vec::new();
        for row in s.chunks(e) {
            let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let p: Vec<f32> = row.iter().map(|&v| expf(v - mx)).collect();
            let sum = p.iter().fold(0.0f32, |a, &v| a + v);
            let inv = 1.0 / sum;
            got.extend(p.iter().map(|&v| v * inv));
        }
        assert_eq!(bits_equal(&got, &b.read_f32(out.view()).unwrap()), None);
    }

    #[test]
    fn exp_cpu_is_close_to_exp() {
        for i in 0..10_000 {
            let x = -87.0 + 175.0 * i as f32 / 10_000.0;
            let rel = (exp_cpu(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 4e-7, "{x}: {rel}");
        }
        assert_eq!(exp_cpu(f32::NEG_INFINITY), 0.0);
        assert!(exp_cpu(f32::NAN).is_nan());
    }
}
