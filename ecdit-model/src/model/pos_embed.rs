//! DiT's fixed 2-D sin-cos position table.
//!
//! Channels `[0, d/2)` encode the patch **column**, `[d/2, d)` the **row**; each
//! half is `[sin | cos]` over `d/4` frequencies `1 / 10000^(i / (d/4))`. Token
//! `row * grid + col`. Computed in f64 and rounded once, as upstream's numpy,
//! on the host when the model is built (a `Fixed` parameter, never trained).

/// pos: [grid * grid, d]. `d` must be a multiple of 4 (checked by
/// `ModelConfig::validate`).
pub fn sincos_2d(d: usize, grid: usize) -> Vec<f32> {
    let half = d / 2;
    let quarter = half / 2;
    let mut pos = vec![0.0f32; grid * grid * d];
    for row in 0..grid {
        for col in 0..grid {
            let out = &mut pos[(row * grid + col) * d..][..d];
            sincos_1d(&mut out[..half], col as f64, quarter);
            sincos_1d(&mut out[half..], row as f64, quarter);
        }
    }
    pos
}

// out: [2 * quarter] = [sin(pos * w_i) | cos(pos * w_i)].
fn sincos_1d(out: &mut [f32], pos: f64, quarter: usize) {
    for i in 0..quarter {
        let omega = 1.0 / 10000f64.powf(i as f64 / quarter as f64);
        let arg = pos * omega;
        out[i] = arg.sin() as f32;
        out[quarter + i] = arg.cos() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_in_the_first_half_rows_in_the_second() {
        let (d, grid) = (8, 3);
        let pos = sincos_2d(d, grid);
        // Token (row 2, col 1): first half encodes col 1, second half row 2.
        let t = &pos[(2 * grid + 1) * d..][..d];
        // quarter = 2: frequencies 1 and 1/100.
        let want = [1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
        for i in 0..4 {
            assert!((t[i] as f64 - want[i]).abs() < 1e-7, "col channel {i}");
        }
        let want = [2f64.sin(), 0.02f64.sin(), 2f64.cos(), 0.02f64.cos()];
        for i in 0..4 {
            assert!((t[4 + i] as f64 - want[i]).abs() < 1e-7, "row channel {i}");
        }
        // Token 0 is sin 0 = 0 and cos 0 = 1.
        assert_eq!(&pos[..d], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }
}
