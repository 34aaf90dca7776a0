//! The diffusion loss: mean squared error between the model's prediction and
//! the scheduler's target, over the tokens the model saw (all, or the kept
//! ones under token masking) and the predicted channels (a learned variance's
//! extra channels are not trained by it). The prediction arrives in patch
//! rows, so the target is read in the same layout.

/// Where the patches of an image lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGeometry {
    /// Images B.
    pub batch: usize,
    /// Target channels C (the first C of the prediction's).
    pub channels: usize,
    /// Prediction channels C_out (2C with a learned variance).
    pub out_channels: usize,
    /// Image side.
    pub size: usize,
    /// Patch side p.
    pub patch: usize,
}

impl PatchGeometry {
    /// Tokens per image.
    pub fn tokens(&self) -> usize {
        (self.size / self.patch).pow(2)
    }
}

/// pred: [B, T_kept, p*p*C_out], row element `(pi * p + qi) * C_out + ch`;
/// target: [B, C, H, W]; kept: [B, T_kept] token indices (None: every token).
/// Returns the mean squared error over the kept tokens' first C channels,
/// summed in f64, and its gradient with respect to `pred` (0 elsewhere).
pub fn patch_mse(pred: &[f32], target: &[f32], kept: Option<&[u32]>, g: PatchGeometry) -> (f64, Vec<f32>) {
    let (p, c_out, size) = (g.patch, g.out_channels, g.size);
    let grid = size / p;
    let row_len = p * p * c_out;
    let rows = pred.len() / row_len.max(1);
    let per_image = rows / g.batch.max(1);
    let count = (rows * p * p * g.channels).max(1) as f64;
    let scale = 2.0 / count;
    let mut grad = vec![0.0f32; pred.len()];
    let mut sum = 0.0f64;
    for r in 0..rows {
        let b = r / per_image.max(1);
        let token = match kept {
            Some(k) => k[r] as usize,
            None => r % per_image.max(1),
        };
        let (row, col) = (token / grid, token % grid);
        for pi in 0..p {
            for qi in 0..p {
                for ch in 0..g.channels {
                    let i = r * row_len + (pi * p + qi) * c_out + ch;
                    let pixel = ((b * g.channels + ch) * size + row * p + pi) * size + col * p + qi;
                    let diff = pred[i] as f64 - target[pixel] as f64;
                    sum += diff * diff;
                    grad[i] = (scale * diff) as f32;
                }
            }
        }
    }
    (sum / count, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecdit_backend_cpu::CpuBackend;
    use ecdit_engine::{Backend, BackendExt, DType, PatchDims};

    fn geometry() -> PatchGeometry {
        PatchGeometry {
            batch: 2,
            channels: 3,
            out_channels: 6,
            size: 8,
            patch: 2,
        }
    }

    /// Without masking the loss is the image-space MSE of the prediction's
    /// first C channels, the image coming from the backend's `unpatchify`.
    #[test]
    fn equals_the_image_space_mse() {
        let g = geometry();
        let be = CpuBackend::new(1).unwrap();
        let n_pred = g.batch * g.tokens() * g.patch * g.patch * g.out_channels;
        let pred: Vec<f32> = (0..n_pred).map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0).collect();
        let target: Vec<f32> = (0..g.batch * g.channels * 64).map(|i| (i as f32 * 0.3).sin()).collect();
        let (loss, grad) = patch_mse(&pred, &target, None, g);

        let rows = be.upload_f32(&[g.batch, g.tokens(), 24], &pred, DType::F32).unwrap();
        let mut img = be.zeros(&[g.batch, g.out_channels, 8, 8], DType::F32).unwrap();
        let dims = PatchDims {
            batch: g.batch,
            channels: g.out_channels,
            height: 8,
            width: 8,
            patch: 2,
            channels_fastest: true,
        };
        be.unpatchify(img.view_mut(), rows.view(), dims).unwrap();
        let img = be.read_f32(img.view()).unwrap();
        let mut want = 0.0f64;
        for b in 0..g.batch {
            for ch in 0..g.channels {
                for px in 0..64 {
                    let d = img[(b * g.out_channels + ch) * 64 + px] as f64
                        - target[(b * g.channels + ch) * 64 + px] as f64;
                    want += d * d;
                }
            }
        }
        want /= (g.batch * g.channels * 64) as f64;
        assert!((loss - want).abs() < 1e-9 * want.max(1.0), "{loss} vs {want}");
        // The variance channels get no gradient; the others 2 (pred - target) / N.
        let nonzero = grad.iter().filter(|&&v| v != 0.0).count();
        assert!(nonzero > 0 && nonzero <= n_pred / 2);
    }

    /// With masking only the kept tokens count, read at their own pixels.
    #[test]
    fn masked_tokens_read_their_own_pixels() {
        let g = PatchGeometry {
            out_channels: 3,
            ..geometry()
        };
        let kept = [5u32, 9, 0, 15];
        let target: Vec<f32> = (0..g.batch * 3 * 64).map(|i| i as f32).collect();
        // A prediction equal to the target at the kept tokens: zero loss.
        let mut pred = vec![0.0f32; 4 * 12];
        for (r, &tok) in kept.iter().enumerate() {
            let b = r / 2;
            let (row, col) = (tok as usize / 4, tok as usize % 4);
            for pi in 0..2 {
                for qi in 0..2 {
                    for ch in 0..3 {
                        pred[r * 12 + (pi * 2 + qi) * 3 + ch] =
                            target[((b * 3 + ch) * 8 + row * 2 + pi) * 8 + col * 2 + qi];
                    }
                }
            }
        }
        let (loss, grad) = patch_mse(&pred, &target, Some(&kept), g);
        assert_eq!(loss, 0.0);
        assert!(grad.iter().all(|&v| v == 0.0));
        pred[0] += 1.0;
        let (loss, _) = patch_mse(&pred, &target, Some(&kept), g);
        assert!((loss - 1.0 / 48.0).abs() < 1e-12, "{loss}");
    }
}
