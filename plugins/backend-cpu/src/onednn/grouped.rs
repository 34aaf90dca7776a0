//! Grouped products (an MoE layer's experts) as tasks: each group's product
//! runs on one thread ([`OneDnn::matmul_in_task`]), the groups shared out
//! over the backend's pool, largest first.
//!
//! One group after another on oneDNN's OpenMP team pays a wake-up and a join
//! per product and k chunk (OpenMP waits passively here, so every one is a
//! futex round trip) and splits 512-row products thin. Measured on an AMD
//! EPYC with AVX-512 BF16 (2 threads, `OMP_WAIT_POLICY=passive`, interleaved
//! runs of `benches/onednn/grouped_experts.c`): 8 experts of 512 rows (d 384,
//! width 1536, bf16) one after another on the team 15.4-16.0 ms, as tasks
//! 13.7-14.2 ms, the dense FFN of equal FLOPs on the team 13.7-14.1 ms.
//!
//! A group's bits are the same as on the team: the products' k chunks keep a
//! row's sum independent of the threads (see [`super::matmul::MAX_K_CHUNK`]).

use super::matmul::{Data, DataMut, Outcome, Product, Spec};
use super::packed::WeightId;
use super::OneDnn;
use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::Mutex;

/// Where a group's rows of the output go.
pub(crate) enum GroupOut<'a> {
    /// Written by oneDNN as stored (the product's output dtype).
    Direct(DataMut<'a>),
    /// bf16 storage of a product with an f32 output (bf16 inputs summed in
    /// k chunks): summed in the task's f32 scratch and rounded once into it
    /// (holding the old values first when beta reads them).
    Narrowed(&'a mut [bf16]),
}

/// One group's product: its rows of the output and of `a`, its weights.
pub(crate) struct Group<'a> {
    pub out: GroupOut<'a>,
    pub a: Data<'a>,
    pub b: Data<'a>,
    pub bias: Option<&'a [f32]>,
    /// Where the group's weights live (they are read pre-packed).
    pub b_id: WeightId,
    /// The group's product (its row count as `m`).
    pub spec: Spec,
}

/// Runs every group on `threads` workers of `pool`, the largest first.
pub(crate) fn run(lib: &OneDnn, pool: &ThreadPool, threads: usize, mut groups: Vec<Group<'_>>) -> Result<(), String> {
    // Popped from the end: the largest first, so the last to start are short.
    groups.sort_by_key(|g| g.spec.dims.m);
    let queue = Mutex::new(groups);
    let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
    pool.install(|| {
        (0..threads.max(1)).into_par_iter().try_for_each(|_| {
            let (mut scratchpad, mut wide) = (Vec::new(), Vec::new());
            while let Some(group) = next() {
                run_group(lib, group, &mut scratchpad, &mut wide)?;
            }
            Ok(())
        })
    })
}

/// One group's product on this thread; `wide` is the task's f32 scratch.
fn run_group(lib: &OneDnn, group: Group<'_>, scratchpad: &mut Vec<u8>, wide: &mut Vec<f32>) -> Result<(), String> {
    let Group {
        out,
        a,
        b,
        bias,
        b_id,
        spec,
    } = group;
    let product = |out| Product {
        out,
        a,
        b,
        bias,
        spec,
        b_id: Some(b_id.clone()),
    };
    let done = match out {
        GroupOut::Direct(out) => lib.matmul_in_task(product(out), scratchpad)?,
        GroupOut::Narrowed(dst) => {
            wide.resize(dst.len(), 0.0);
            if spec.beta != 0.0 {
                bf16_to_f32(wide, dst);
            }
            let done = lib.matmul_in_task(product(DataMut::F32(wide)), scratchpad)?;
            f32_to_bf16(dst, wide);
            done
        }
    };
    match done {
        Outcome::Done => Ok(()),
        Outcome::Unsupported(e) => Err(e),
    }
}
