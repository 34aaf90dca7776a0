//! The router arithmetic that host routers and backends share, so that routing
//! on a backend and on the host agree to the bit: the exact row softmax, its
//! backward, and the ranking order with its tie rule.

/// Row softmax over experts in f32 with the exact `exp` (never an approximation).
/// probs, scores: [N, E].
pub fn softmax_rows(probs: &mut [f32], scores: &[f32], experts: usize) {
    for (p_row, x_row) in probs.chunks_exact_mut(experts).zip(scores.chunks_exact(experts)) {
        softmax_row(p_row, x_row);
    }
}

/// One row of [`softmax_rows`]: `p_j = exp(x_j - max) / sum_k exp(x_k - max)`.
pub fn softmax_row(p_row: &mut [f32], x_row: &[f32]) {
    let max = x_row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (p, &x) in p_row.iter_mut().zip(x_row) {
        *p = (x - max).exp();
        sum += *p;
    }
    let inv = 1.0 / sum;
    p_row.iter_mut().for_each(|p| *p *= inv);
}

/// Backward of [`softmax_rows`], in place: `grad` holds dL/dprobs on entry and
/// dL/dscores on exit, `dx_j = p_j * (dp_j - sum_k p_k dp_k)`.
// grad: [N, E] in/out; probs: [N, E]
pub fn softmax_rows_backward(grad: &mut [f32], probs: &[f32], experts: usize) {
    for (g_row, p_row) in grad.chunks_exact_mut(experts).zip(probs.chunks_exact(experts)) {
        let dot: f32 = g_row.iter().zip(p_row).map(|(g, p)| g * p).sum();
        for (g, &p) in g_row.iter_mut().zip(p_row) {
            *g = p * (*g - dot);
        }
    }
}

/// Packs a candidate into one integer whose ascending order is the ranking
/// order: larger value first, ties to the lower index. Integer keys make the
/// selection a plain `u64` partial sort, several times faster than comparing
/// `(f32, u32)` pairs. `value` must be >= 0 (a probability or a sigmoid): the
/// bit patterns of non-negative floats order like the floats (`+ 0.0` turns a
/// stray `-0.0` into `+0.0`). NaN ranks last, below every number, so a
/// backend that routes without checking its scores never prefers it.
pub fn rank_key(value: f32, index: u32) -> u64 {
    if value.is_nan() {
        return (u32::MAX as u64) << 32 | index as u64;
    }
    ((!(value + 0.0).to_bits() as u64) << 32) | index as u64
}

/// The index packed by [`rank_key`].
pub fn key_index(key: u64) -> u32 {
    key as u32
}

/// The value packed by [`rank_key`].
pub fn key_value(key: u64) -> f32 {
    f32::from_bits(!((key >> 32) as u32))
}

/// Moves the `take` best keys (smallest, see [`rank_key`]) to the front,
/// unordered; `O(len)` instead of a full sort.
pub fn select_best(keys: &mut [u64], take: usize) {
    if take > 0 && take < keys.len() {
        keys.select_nth_unstable(take - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_keys_order_by_value_then_index() {
        let mut keys = [
            rank_key(0.25, 3),
            rank_key(1.0, 7),
            rank_key(0.0, 0),
            rank_key(0.25, 1),
            rank_key(-0.0, 2),
            rank_key(1e-30, 9),
        ];
        keys.sort_unstable();
        let order: Vec<(f32, u32)> = keys.iter().map(|&k| (key_value(k), key_index(k))).collect();
        assert_eq!(
            order,
            vec![(1.0, 7), (0.25, 1), (0.25, 3), (1e-30, 9), (0.0, 0), (0.0, 2)]
        );
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let scores = [1.0f32, 2.0, 3.0, -50.0, 0.0, 50.0];
        let mut p = [0.0f32; 6];
        softmax_rows(&mut p, &scores, 3);
        for row in p.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!(p[0] < p[1] && p[1] < p[2]);
        // e / (1 + e + e^2) for the middle entry of [1, 2, 3].
        let e = std::f64::consts::E;
        assert!((p[1] as f64 - e / (1.0 + e + e * e)).abs() < 1e-7);
    }
}
