//! Products of a few rows, `out[m, n] = alpha * a[m, k] @ b[k, n] (+ beta * out)
//! (+ bias)` with `m <= FEW_ROWS`, in the plain (nn) layout. Each output element
//! is summed over k in ascending order, one multiply and one add per term, so a
//! row gets the same bits whatever the other rows are and however many there
//! are. A model batches its per-sample products (conditioning vectors)
//! through it and reads each weight once per batch instead of once per sample,
//! keeping every sample's bits independent of its batch.

use rayon::prelude::*;

/// Most rows a product may have to take this path.
pub(crate) const FEW_ROWS: usize = 8;

/// Output columns per task: four AVX-512 registers of sums, four independent
/// chains of adds, so the add latency does not bound the loop.
const COLS: usize = 64;

/// out: [m, n]; a: [m, k]; b: [k, n]; bias: [n]. Lengths checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_few_rows(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) {
    // Column blocks in parallel (each reads its columns of `b` once for all
    // rows), then written back in order.
    let sums: Vec<(usize, Vec<f32>)> = (0..n)
        .into_par_iter()
        .step_by(COLS)
        .map(|j0| (j0, block(a, b, m, n, k, j0, COLS.min(n - j0))))
        .collect();
    for (j0, acc) in sums {
        let w = COLS.min(n - j0);
        for r in 0..m {
            for c in 0..w {
                let o = &mut out[r * n + j0 + c];
                let mut v = alpha * acc[r * COLS + c];
                if beta != 0.0 {
                    v += beta * *o;
                }
                if let Some(bias) = bias {
                    v += bias[j0 + c];
                }
                *o = v;
            }
        }
    }
}

/// The sums of columns `j0..j0 + w` for every row: [m, COLS] (w used).
fn block(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, j0: usize, w: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; m * COLS];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            unsafe { block_avx512(&mut acc, a, b, (m, n, k), j0, w) };
            return acc;
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { block_avx2(&mut acc, a, b, (m, n, k), j0, w) };
            return acc;
        }
    }
    block_plain(&mut acc, a, b, (m, n, k), j0, w);
    acc
}

/// The same loop compiled for wider registers; Rust never fuses the multiply
/// and add, so every version gives the same bits.
macro_rules! block_for {
    ($($name:ident => $feature:literal),*) => {
        $(
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $name(acc: &mut [f32], a: &[f32], b: &[f32], mnk: (usize, usize, usize), j0: usize, w: usize) {
                block_plain(acc, a, b, mnk, j0, w)
            }
        )*
    };
}
block_for!(block_avx512 => "avx512f", block_avx2 => "avx2");

/// Row by row, the block's sums held in registers across all of k (the
/// block's `k x COLS` weights stay in L2 between rows).
#[inline(always)]
fn block_plain(acc: &mut [f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize), j0: usize, w: usize) {
    for r in 0..m {
        let a_row = &a[r * k..(r + 1) * k];
        let mut sums = [0.0f32; COLS];
        for (kk, &av) in a_row.iter().enumerate() {
            let w_row = &b[kk * n + j0..kk * n + j0 + w];
            match <&[f32; COLS]>::try_from(w_row) {
                Ok(full) => {
                    for (s, &x) in sums.iter_mut().zip(full) {
                        *s += av * x;
                    }
                }
                Err(_) => {
                    for (s, &x) in sums.iter_mut().zip(w_row) {
                        *s += av * x;
                    }
                }
            }
        }
        acc[r * COLS..(r + 1) * COLS].copy_from_slice(&sums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's bits do not depend on the rows beside it, and the sums match
    /// an f64 reference.
    #[test]
    fn rows_get_their_own_bits_at_any_row_count() {
        let (n, k) = (77, 45);
        let a: Vec<f32> = (0..FEW_ROWS * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 10.0).collect();
        let mut all = vec![0.0f32; FEW_ROWS * n];
        gemm_few_rows(&mut all, &a, &b, Some(&bias), (FEW_ROWS, n, k), 1.5, 0.0);
        for r in 0..FEW_ROWS {
            let mut one = vec![0.0f32; n];
            gemm_few_rows(&mut one, &a[r * k..(r + 1) * k], &b, Some(&bias), (1, n, k), 1.5, 0.0);
            assert!(one == all[r * n..(r + 1) * n], "row {r}");
            for j in 0..n {
                let want: f64 = 1.5
                    * (0..k)
                        .map(|kk| a[r * k + kk] as f64 * b[kk * n + j] as f64)
                        .sum::<f64>()
                    + bias[j] as f64;
                assert!((one[j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "[{r}, {j}]");
            }
        }
    }
}
