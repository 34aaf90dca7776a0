//! Storage dtypes. Tensors store f32 or bf16 values (plus u32 indices and u8
//! masks); every backend accumulates in f32, and router math is always f32
//! (EC-DIT.md section 6).

use bytemuck::Pod;
use std::fmt;

pub use half::bf16;

/// The element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    /// 32-bit IEEE float.
    F32 = 0,
    /// bfloat16: f32's exponent with a 7-bit mantissa.
    BF16 = 1,
    /// Unsigned 32-bit integers (token indices of a dispatch).
    U32 = 2,
    /// Bytes (attention key masks: nonzero = attend).
    U8 = 3,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Lower-case name as configs and errors spell it (`f32`, `bf16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }

    /// True for the floating-point storage dtypes (f32, bf16).
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16)
    }

    /// The dtype from its ABI code.
    pub fn from_code(code: u32) -> Option<Self> {
        [DType::F32, DType::BF16, DType::U32, DType::U8]
            .into_iter()
            .find(|d| *d as u32 == code)
    }

    /// Parses `f32` or `bf16` (the dtypes a model can be stored in).
    pub fn parse_float(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that is the element of one [`DType`].
pub trait Element: Pod + Send + Sync {
    /// The matching dtype.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// Rounds f32 values to bf16 (round to nearest even; a NaN stays a quiet
/// NaN), as storage conversion does: `half`'s `bf16::from_f32` bit for bit,
/// written without branches so that the loop vectorises.
pub fn f32_to_bf16(dst: &mut [bf16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        let x = s.to_bits();
        // Adding 0x7FFF plus the kept part's lowest bit carries into the kept
        // part exactly when the dropped half is above one half, or one half
        // with an odd kept part (it wraps only for negative NaNs, not kept).
        let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
        let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
        let quiet = (x >> 16) | 0x0040;
        *d = bf16::from_bits(if nan { quiet } else { rounded } as u16);
    }
}

/// Widens bf16 values to f32 (exact: the bits move up 16 places).
pub fn bf16_to_f32(dst: &mut [f32], src: &[bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_sizes_match_rust_types() {
        for d in [DType::F32, DType::BF16, DType::U32, DType::U8] {
            assert_eq!(DType::from_code(d as u32), Some(d));
        }
        assert_eq!(DType::from_code(9), None);
        assert_eq!(DType::F32.size(), std::mem::size_of::<f32>());
        assert_eq!(DType::BF16.size(), std::mem::size_of::<bf16>());
    }

    #[test]
    fn bf16_conversions_match_the_half_crate_bit_for_bit() {
        // Every low half (the rounding) under upper halves across the range:
        // zeros, subnormals, ordinary values, the largest finite, infinities
        // and NaNs, both signs.
        let uppers = [
            0x0000u32, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3FFF, 0x4B00, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0, 0x7FFF,
        ];
        let mut src = Vec::new();
        for sign in [0u32, 0x8000] {
            for upper in uppers {
                src.extend((0..=0xFFFFu32).map(|low| f32::from_bits(((upper | sign) << 16) | low)));
            }
        }
        let mut ours = vec![bf16::ZERO; src.len()];
        f32_to_bf16(&mut ours, &src);
        for (x, got) in src.iter().zip(&ours) {
            let want = bf16::from_f32(*x);
            assert_eq!(got.to_bits(), want.to_bits(), "{:#010x}", x.to_bits());
        }
        let mut back = vec![0.0f32; ours.len()];
        bf16_to_f32(&mut back, &ours);
        for (b, h) in back.iter().zip(&ours) {
            assert_eq!(b.to_bits(), h.to_f32().to_bits());
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties to even -> 1.
        let mut out = [bf16::ZERO; 2];
        f32_to_bf16(&mut out, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
        assert_eq!(out[0].to_f32(), 1.0);
        assert_eq!(out[1].to_f32(), 1.0 + 4.0 / 256.0);
        let mut back = [0.0f32; 2];
        bf16_to_f32(&mut back, &out);
        assert_eq!(back, [1.0, 1.0 + 4.0 / 256.0]);
    }
}
