//! A vectorisable `exp` for the element-wise ops (activations, softmax).

/// `exp(x)` in f32 to a few ulp: Cephes' `expf` (range reduction by `ln 2`,
/// degree-6 polynomial) written in plain arithmetic, so loops over it
/// vectorise; libm's `expf`/`tanhf` are scalar calls and dominated the MoE
/// layer's time. Inputs above 88 are clamped to 88 (`2^n` stays finite);
/// below -87 the result is 0 (the true value is under 1.7e-38), so
/// `exp(-inf) = 0` as a softmax needs.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `t`'s low mantissa bits hold n: reading them with integer ops instead of
    // `n as i32` (a saturating cast LLVM scalarises) keeps the loop in SIMD.
    // Same value: n is a whole number in [-126, 127] after the clamp.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let e = y * f32::from_bits(((n_int + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

/// `row[j] = exp(row[j] - shift)` for the whole row, compiled for AVX-512,
/// AVX2+FMA and the baseline and picked at run time; every path gives the
/// same bits (Rust never contracts into FMA).
pub(crate) fn exp_shifted_inplace(row: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_shifted_avx512(row, shift) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_shifted_avx2(row, shift) };
        }
    }
    exp_shifted_plain(row, shift)
}

#[inline(always)]
fn exp_shifted_plain(row: &mut [f32], shift: f32) {
    row.iter_mut().for_each(|x| *x = exp_approx(*x - shift));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], shift: f32) {
    exp_shifted_plain(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], shift: f32) {
    exp_shifted_plain(row, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate_over_its_range() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let rel = ((exp_approx(x) as f64) / (x as f64).exp() - 1.0).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert!(exp_approx(f32::NEG_INFINITY) == 0.0 && exp_approx(-88.0) == 0.0 && exp_approx(1000.0).is_finite());
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn dispatched_exp_gives_the_plain_bits() {
        let x: Vec<f32> = (0..1031).map(|i| (i as f32 * 0.37).sin() * 90.0).collect();
        let (mut fast, mut plain) = (x.clone(), x.clone());
        exp_shifted_inplace(&mut fast, 1.5);
        exp_shifted_plain(&mut plain, 1.5);
        assert!(fast.iter().zip(&plain).all(|(f, p)| f.to_bits() == p.to_bits()));
    }
}
