//! Activation buffers are reused across calls (and across blocks in an
//! inference forward), so sizing one must not reallocate when it fits.

/// Sets `buf` to `len` elements, reusing its allocation. Contents are
/// unspecified: every caller overwrites them.
pub(crate) fn resize(buf: &mut Vec<f32>, len: usize) {
    if buf.len() != len {
        buf.clear();
        buf.resize(len, 0.0);
    }
}
