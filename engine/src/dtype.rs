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

/// Rounds f32 values to bf16 (round to nearest even), as storage conversion does.
pub fn f32_to_bf16(dst: &mut [bf16], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// Widens bf16 values to f32 (exact).
pub fn bf16_to_f32(dst: &mut [f32], src: &[bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
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
