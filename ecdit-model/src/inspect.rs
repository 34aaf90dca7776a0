//! Where the experts spend their compute (the paper's interpretability
//! figures): for one prompt, at every sampling step and every MoE layer, how
//! many experts chose each image patch, and how that compute divides among
//! the prompt's words through the same block's cross-attention.
//!
//! ```text
//! at each step k, with the sampler's x_t:   forward(x_t, t, prompt) keeping activations
//!   counts[b][p]  = experts of MoE block b that chose patch p
//!   share[b][w]   = sum_p counts[b][p] * mean_heads attn_b[p, w] / sum_p counts[b][p]
//! ```
//! The conditional pass alone is inspected (guidance's unconditional pass
//! routes by itself and never shares a group with it).

use crate::model::{Condition, ForwardOptions, Model, ModelActs, ModelError};
use crate::sample::StepInfo;
use ecdit_engine::{BackendExt, EngineError};
use serde::Serialize;

/// One MoE layer at one step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRecord {
    /// Block index.
    pub block: usize,
    /// Experts that chose each patch, row-major over the patch grid.
    pub experts_per_patch: Vec<u32>,
    /// Experts of the layer.
    pub experts: usize,
    /// The most experts on one patch, as a fraction of the layer's experts.
    pub max_fraction: f64,
    /// Patches no expert chose, as a fraction.
    pub unchosen_fraction: f64,
    /// The share of the layer's expert compute each prompt token attracts
    /// (`(token, share)`, in prompt order, `<bos>`/`<eos>` included); empty
    /// for models without cross-attention.
    pub word_compute: Vec<(String, f64)>,
}

/// One sampling step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// Step index.
    pub step: usize,
    /// Scheduler time (1 = noise).
    pub t: f32,
    /// Each MoE layer.
    pub layers: Vec<LayerRecord>,
}

/// Records one step of a single-prompt sampling run: a forward of the
/// conditional pass at the sampler's state, keeping what inspection reads.
/// `tokens`: the prompt's token strings (as the encoder read them).
pub fn record_step(
    model: &Model,
    acts: &mut ModelActs,
    info: &StepInfo<'_>,
    cond: Condition<'_>,
    tokens: &[String],
) -> Result<StepRecord, ModelError> {
    let c = model.config();
    let image = c.in_channels * c.input_size * c.input_size;
    let x = info
        .x
        .get(..image)
        .ok_or_else(|| EngineError::Other("inspect: no image in the sampler state".into()))?;
    let cond = cond.slice(0, 1)?;
    model.forward(acts, x, &[info.t_model], cond, ForwardOptions::training())?;
    let be = model.backend();
    let grid_tokens = c.tokens();
    let mut layers = Vec::new();
    for (i, block) in acts.blocks.iter().enumerate() {
        let Some(routing) = &block.routing else { continue };
        let host = routing.to_host(be)?;
        let mut counts = vec![0u32; grid_tokens];
        for &tok in &host.dispatch.tokens {
            if let Some(cnt) = counts.get_mut(tok as usize) {
                *cnt += 1;
            }
        }
        let experts = host.dispatch.experts;
        let max = counts.iter().copied().max().unwrap_or(0);
        let unchosen = counts.iter().filter(|&&n| n == 0).count();
        let word_compute = if block.cross.probs.is_set() && !tokens.is_empty() {
            let probs = be.read_f32(block.cross.probs.view()?)?; // [1, H, T, L]
            let len = block.cross.probs.shape()[3];
            let heads = block.cross.probs.shape()[1];
            let total: f64 = counts.iter().map(|&n| n as f64).sum::<f64>().max(1.0);
            let mut share = vec![0.0f64; len];
            for h in 0..heads {
                for (p, &n) in counts.iter().enumerate() {
                    let row = &probs[(h * grid_tokens + p) * len..(h * grid_tokens + p + 1) * len];
                    for (s, &a) in share.iter_mut().zip(row) {
                        *s += n as f64 * a as f64 / heads as f64;
                    }
                }
            }
            tokens.iter().zip(&share).map(|(w, s)| (w.clone(), s / total)).collect()
        } else {
            Vec::new()
        };
        layers.push(LayerRecord {
            block: i,
            experts_per_patch: counts,
            experts,
            max_fraction: max as f64 / experts.max(1) as f64,
            unchosen_fraction: unchosen as f64 / grid_tokens.max(1) as f64,
            word_compute,
        });
    }
    Ok(StepRecord {
        step: info.step,
        t: info.t,
        layers,
    })
}

/// Patches of a `grid x grid` patch grid over a `size x size` image that
/// overlap an object's box (`[x0, y0, x1, y1]`, pixels, exclusive ends).
pub fn object_patches(boxes: &[[f32; 4]], size: usize, grid: usize) -> Vec<bool> {
    let patch = size as f32 / grid.max(1) as f32;
    (0..grid * grid)
        .map(|p| {
            let (px0, py0) = ((p % grid) as f32 * patch, (p / grid) as f32 * patch);
            boxes
                .iter()
                .any(|b| b[0] < px0 + patch && px0 < b[2] && b[1] < py0 + patch && py0 < b[3])
        })
        .collect()
}

/// How much more expert compute object patches get than an even spread:
/// (share of the expert assignments on object patches) / (share of patches
/// that are object patches). 1: no preference; above 1: compute
/// concentrates on objects. `None` when there are no object or no
/// background patches (nothing to compare).
pub fn object_concentration(counts: &[u32], objects: &[bool]) -> Option<f64> {
    let on = objects.iter().filter(|&&o| o).count();
    if on == 0 || on == objects.len() {
        return None;
    }
    let total: u64 = counts.iter().map(|&n| n as u64).sum();
    if total == 0 {
        return None;
    }
    let on_objects: u64 = counts
        .iter()
        .zip(objects)
        .filter(|(_, &o)| o)
        .map(|(&n, _)| n as u64)
        .sum();
    Some((on_objects as f64 / total as f64) / (on as f64 / objects.len() as f64))
}

/// A heat map of counts on a `grid x grid` patch grid, `cell` pixels per patch,
/// from black (0) through purple and orange to yellow (`max`), RGB8.
pub fn heat_map(counts: &[u32], grid: usize, max: u32, cell: usize) -> Vec<u8> {
    let side = grid * cell;
    let mut rgb = vec![0u8; side * side * 3];
    for (p, &n) in counts.iter().enumerate().take(grid * grid) {
        let colour = ramp(n as f32 / max.max(1) as f32);
        let (row, col) = (p / grid, p % grid);
        for y in row * cell..(row + 1) * cell {
            for x in col * cell..(col + 1) * cell {
                rgb[(y * side + x) * 3..(y * side + x) * 3 + 3].copy_from_slice(&colour);
            }
        }
    }
    rgb
}

/// A perceptually ordered ramp (black, purple, red, orange, yellow) at v in [0, 1].
fn ramp(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 0.0],
        [0.35, 0.05, 0.55],
        [0.80, 0.15, 0.30],
        [0.98, 0.55, 0.05],
        [1.0, 0.95, 0.25],
    ];
    let v = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    let f = v - i as f32;
    let mix = |k: usize| ((STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f) * 255.0).round() as u8;
    [mix(0), mix(1), mix(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_patches_are_those_a_box_overlaps() {
        // 32x32 in a 4x4 grid of 8-pixel patches; a box over pixels 6..10 x 0..3
        // touches patches 0 and 1 of the top row only.
        let m = object_patches(&[[6.0, 0.0, 10.0, 3.0]], 32, 4);
        let on: Vec<usize> = (0..16).filter(|&p| m[p]).collect();
        assert_eq!(on, vec![0, 1]);
        // A box ending exactly at a patch edge does not spill over.
        let m = object_patches(&[[0.0, 0.0, 8.0, 8.0]], 32, 4);
        assert_eq!(m.iter().filter(|&&o| o).count(), 1);
    }

    #[test]
    fn concentration_compares_compute_share_with_area_share() {
        let objects = [true, false, false, false];
        // Even compute: 1; all compute on the one object patch: 4; none there: 0.
        assert_eq!(object_concentration(&[2, 2, 2, 2], &objects), Some(1.0));
        assert_eq!(object_concentration(&[8, 0, 0, 0], &objects), Some(4.0));
        assert_eq!(object_concentration(&[0, 3, 3, 2], &objects), Some(0.0));
        // 3 of 6 assignments on half the patches.
        assert_eq!(
            object_concentration(&[2, 1, 3, 0], &[true, true, false, false]),
            Some(1.0)
        );
        assert_eq!(object_concentration(&[1, 1], &[true, true]), None);
        assert_eq!(object_concentration(&[0, 0], &[true, false]), None);
    }

    #[test]
    fn heat_map_paints_each_patch_its_count() {
        let rgb = heat_map(&[0, 4, 2, 4], 2, 4, 3);
        assert_eq!(rgb.len(), 6 * 6 * 3);
        let px = |x: usize, y: usize| &rgb[(y * 6 + x) * 3..(y * 6 + x) * 3 + 3];
        assert_eq!(px(0, 0), &[0, 0, 0], "no expert: black");
        assert_eq!(px(3, 0), px(5, 5), "equal counts, equal colours");
        assert_eq!(px(5, 0), &ramp(1.0));
        assert_ne!(px(0, 4), px(4, 4), "2 of 4 differs from 4 of 4");
    }
}
