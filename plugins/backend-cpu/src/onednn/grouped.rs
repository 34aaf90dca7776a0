//! Grouped products (an MoE layer's experts) as tasks: each group's product
//! runs on one thread ([`OneDnn::matmul_in_task`]), the groups shared out
//! over the backend's pool, largest first.
//!
//! One group after another on oneDNN's OpenMP team pays a wake-up and a join
//! per product and k chunk (OpenMP waits passively here, so every one is a
//! futex round trip) and splits 512-row products thin. Measured on an AMD
//! EPYC with AVX-512 BF16 (2 threads, `OMP_WAIT_POLICY=passive`, six runs of
//! `benches/onednn/grouped_experts.c`): 8 experts of 512 rows (d 384, width
//! 1536, bf16) one after another on the team 15.4-17.0 ms, as tasks
//! 13.7-15.1 ms (within 2% of the dense FFN of equal FLOPs on the team in
//! every run). Groups of 2048 rows (training at batch 32) gain nothing, and
//! lose nothing.
//!
//! A group's bits are the same as on the team: the products' k chunks keep a
//! row's sum independent of the threads (see [`super::matmul::MAX_K_CHUNK`]).
//!
//! A group may read its rows gathered from the tokens (the MoE dispatch into
//! the experts' first product): its task copies them into a scratch of its
//! own right before its product, in cache, instead of the whole layer's
//! gathered rows going out to memory and back.

use super::matmul::{Data, DataMut, Outcome, Product, Spec};
use super::packed::WeightId;
use super::OneDnn;
use ecdit_engine::dtype::{bf16, bf16_to_f32, f32_to_bf16};
use rayon::prelude::*;
use rayon::ThreadPool;
use std::cell::RefCell;
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

/// A group's rows of `a`.
#[derive(Clone, Copy)]
pub(crate) enum GroupIn<'a> {
    /// As stored: [m, k].
    Rows(Data<'a>),
    /// `x[rows[i]]` for each of the group's `rows` (each below x's row
    /// count, checked by the caller); x: [T, k].
    Gathered { x: Data<'a>, rows: &'a [u32], k: usize },
}

/// One group's product: its rows of the output and of `a`, its weights.
pub(crate) struct Group<'a> {
    pub out: GroupOut<'a>,
    pub a: GroupIn<'a>,
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
            SCRATCH.with_borrow_mut(|scratch| {
                while let Some(group) = next() {
                    run_group(lib, group, scratch)?;
                }
                Ok(())
            })
        })
    })
}

thread_local! {
    /// Each pool thread's scratch, kept from call to call (a layer's groups
    /// need the same sizes every time).
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// A worker's scratch, kept from group to group.
#[derive(Default)]
struct Scratch {
    /// oneDNN's scratchpad.
    scratchpad: Vec<u8>,
    /// The f32 sums of a [`GroupOut::Narrowed`] output.
    wide: Vec<f32>,
    /// Gathered rows ([`GroupIn::Gathered`]), of either dtype.
    rows_bf16: Vec<bf16>,
    rows_f32: Vec<f32>,
}

/// Copies `x[rows[i]]` (rows of `k`) into `dst`, in order.
fn gather<T: Copy>(dst: &mut Vec<T>, x: &[T], rows: &[u32], k: usize) {
    dst.clear();
    for &r in rows {
        dst.extend_from_slice(&x[r as usize * k..][..k]);
    }
}

/// One group's product on this thread.
fn run_group(lib: &OneDnn, group: Group<'_>, scratch: &mut Scratch) -> Result<(), String> {
    let Group {
        out,
        a,
        b,
        bias,
        b_id,
        spec,
    } = group;
    let Scratch {
        scratchpad,
        wide,
        rows_bf16,
        rows_f32,
    } = scratch;
    let a = match a {
        GroupIn::Rows(a) => a,
        GroupIn::Gathered {
            x: Data::Bf16(x),
            rows,
            k,
        } => {
            gather(rows_bf16, x, rows, k);
            Data::Bf16(rows_bf16)
        }
        GroupIn::Gathered {
            x: Data::F32(x),
            rows,
            k,
        } => {
            gather(rows_f32, x, rows, k);
            Data::F32(rows_f32)
        }
    };
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
