//! Patchify / unpatchify and the patch embedding (a stride-p conv written as
//! a linear map on each `C x p x p` patch).
//!
//! Tokens are patches in row-major order, token `row * grid + col`. A patch
//! vector is laid out `ch * p * p + pi * p + qi` for pixel
//! `(row * p + pi, col * p + qi)`, which is the flattening of the conv weight
//! `[d, C, p, p]`, so `x_embedder.proj.weight` loads unchanged as `[d, C*p*p]`.

use super::linear::Linear;
use super::param::Init;

/// The patch embedding `x_embedder.proj`: weight [d, C, p, p], bias [d].
pub fn patch_embedder(d: usize, channels: usize, p: usize) -> Linear {
    let patch = channels * p * p;
    // DiT initialises the conv weight as xavier over its [d, C*p*p] view.
    let init = Init::XavierUniform {
        fan_in: patch,
        fan_out: d,
    };
    Linear::with_weight_shape("x_embedder.proj", &[d, channels, p, p], d, patch, init)
}

/// patches: [B, T, C*p*p]; x: [B, C, size, size].
pub fn patchify(patches: &mut [f32], x: &[f32], batch: usize, channels: usize, size: usize, p: usize) {
    let grid = size / p;
    let patch = channels * p * p;
    for b in 0..batch {
        let img = &x[b * channels * size * size..][..channels * size * size];
        for row in 0..grid {
            for col in 0..grid {
                let out = &mut patches[((b * grid + row) * grid + col) * patch..][..patch];
                for ch in 0..channels {
                    for pi in 0..p {
                        let src = &img[(ch * size + row * p + pi) * size + col * p..][..p];
                        out[(ch * p + pi) * p..][..p].copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// img: [B, C_out, size, size]; patches: [B, T, p*p*C_out] with index
/// `(pi * p + qi) * C_out + ch` (upstream's `unpatchify`).
pub fn unpatchify(img: &mut [f32], patches: &[f32], batch: usize, out_ch: usize, size: usize, p: usize) {
    let grid = size / p;
    let patch = p * p * out_ch;
    for b in 0..batch {
        let out = &mut img[b * out_ch * size * size..][..out_ch * size * size];
        for row in 0..grid {
            for col in 0..grid {
                let src = &patches[((b * grid + row) * grid + col) * patch..][..patch];
                for pi in 0..p {
                    for qi in 0..p {
                        for ch in 0..out_ch {
                            out[(ch * size + row * p + pi) * size + col * p + qi] = src[(pi * p + qi) * out_ch + ch];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_reads_channel_major_patches_in_row_major_order() {
        // 1 image, 2 channels, 4x4, p = 2: pixel value = ch*100 + y*10 + x.
        let (c, s, p) = (2, 4, 2);
        let x: Vec<f32> = (0..c * s * s)
            .map(|i| ((i / 16) * 100 + (i % 16 / 4) * 10 + i % 4) as f32)
            .collect();
        let mut patches = vec![0.0; 4 * c * p * p];
        patchify(&mut patches, &x, 1, c, s, p);
        // Token 1 = row 0, col 1: pixels x in 2..4, y in 0..2.
        assert_eq!(&patches[8..16], &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]);
        // Token 2 = row 1, col 0.
        assert_eq!(&patches[16..20], &[20.0, 21.0, 30.0, 31.0]);
    }

    #[test]
    fn unpatchify_uses_channel_last_patch_index() {
        let (c, s, p) = (3, 4, 2);
        let patches: Vec<f32> = (0..4 * p * p * c).map(|i| i as f32).collect();
        let mut img = vec![0.0; c * s * s];
        unpatchify(&mut img, &patches, 1, c, s, p);
        // Token 3 (row 1, col 1), pi 1, qi 0 (index p * c), ch 2 -> pixel (3, 2) of channel 2.
        let want = (3 * p * p * c + p * c + 2) as f32;
        assert_eq!(img[(2 * s + 3) * s + 2], want);
    }
}
