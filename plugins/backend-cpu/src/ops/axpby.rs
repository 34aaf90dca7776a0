//! `y = a * x + b * y`, in place (BLAS axpby): guidance mixes, sampler steps,
//! noising.

use super::PAR_MIN_ELEMS;
use ecdit_engine::error::{check_len, Result};
use rayon::prelude::*;

/// Elements per parallel task.
const TASK_ELEMS: usize = PAR_MIN_ELEMS / 2;

/// `y[i] = a * x[i] + b * y[i]`, evaluated exactly so (two products, one
/// sum, no FMA), so a host step written the same way gives the same bits.
/// y, x: [n].
pub fn axpby(y: &mut [f32], a: f32, x: &[f32], b: f32) -> Result<()> {
    check_len("axpby", "x", x.len(), y.len())?;
    y.par_chunks_mut(TASK_ELEMS)
        .zip(x.par_chunks(TASK_ELEMS))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = a * x + b * *y));
    Ok(())
}
