//! Experts: the feed-forward networks a MoE layer's router dispatches tokens to.
//!
//! Every expert kind computes all E experts of a layer in one call over the
//! expert-major rows of a dispatch (rows of expert e are
//! `offsets[e]..offsets[e + 1]`), one grouped GEMM per projection over
//! slices of consecutive experts (`Backend::gemm_grouped`, which a CPU backend
//! runs expert-parallel), so an expert with no rows costs nothing. Parameters
//! of the E experts are stacked on a leading expert axis, each matrix
//! input-major `[in, out]` (the transpose of PyTorch's `Linear`).

mod gelu_mlp;
mod swiglu;

pub use gelu_mlp::GeluMlp;
pub use swiglu::SwiGlu;

use ecdit_engine::{
    Backend, BackendExt, ComponentInfo, DType, EngineError, ExpertCache, Family, Init, Layout, ParamInfo, ParamShape,
    ParamType, Registry, Result, Tensor, TensorMut, TensorRef,
};
use serde_json::json;
use std::sync::Arc;

/// Registers the `gelu-mlp` and `swiglu` experts.
pub fn register(registry: &mut Registry) -> Result<()> {
    let ratio = || {
        ParamInfo::new(
            "mlp_ratio",
            ParamType::Float,
            Some(json!(4.0)),
            "hidden width = floor(mlp_ratio * d)",
        )
    };
    registry.register_expert(
        ComponentInfo {
            family: Family::Expert,
            kind: GeluMlp::KIND.into(),
            description: "DiT's MLP: Linear(d, h) -> GELU (tanh) -> Linear(h, d), with biases".into(),
            params: vec![ratio()],
            origin: "builtin".into(),
        },
        Arc::new(|p| Ok(Box::new(GeluMlp::new(read_ratio(GeluMlp::KIND, p)?)?) as _)),
    )?;
    registry.register_expert(
        ComponentInfo {
            family: Family::Expert,
            kind: SwiGlu::KIND.into(),
            description: "DiT-MoE's SwiGLU: w2(silu(w1 x) * w3 x), no biases, h = mlp_ratio * d".into(),
            params: vec![ratio()],
            origin: "builtin".into(),
        },
        Arc::new(|p| Ok(Box::new(SwiGlu::new(read_ratio(SwiGlu::KIND, p)?)?) as _)),
    )?;
    Ok(())
}

fn read_ratio(kind: &str, params: &serde_json::Map<String, serde_json::Value>) -> Result<f64> {
    ecdit_engine::spec::get(&format!("expert '{kind}'"), params, "mlp_ratio")
}

/// Checks an MLP ratio: finite and positive.
fn check_ratio(kind: &str, mlp_ratio: f64) -> Result<()> {
    if mlp_ratio.is_finite() && mlp_ratio > 0.0 {
        Ok(())
    } else {
        Err(EngineError::param(
            format!("expert '{kind}'"),
            "mlp_ratio",
            mlp_ratio,
            "must be a finite number > 0",
        ))
    }
}

/// Hidden width `floor(mlp_ratio * d)`, at least 1 (DiT: `int(hidden_size * mlp_ratio)`).
fn hidden_width(mlp_ratio: f64, d: usize) -> usize {
    ((mlp_ratio * d as f64) as usize).max(1)
}

/// The `ParamShape`s of stacked expert tensors: matrices `[E, in, out]`
/// (input-major on disk and in memory, as docs/WEIGHTS.md lists them) start
/// xavier-uniform per expert, vectors `[E, n]` (biases) at zero.
fn stacked_shapes(names: &[&str], shapes: Vec<Vec<usize>>) -> Vec<ParamShape> {
    names
        .iter()
        .zip(shapes)
        .map(|(name, shape)| {
            let init = match shape.as_slice() {
                &[_, fan_in, fan_out] => Init::XavierUniform { fan_in, fan_out },
                _ => Init::Zeros,
            };
            ParamShape {
                name: name.to_string(),
                shape,
                layout: Layout::AsStored,
                init,
            }
        })
        .collect()
}

/// Checks the inputs every expert forward/backward shares and returns the
/// number of dispatched rows N, x as [N, d] and the parameters in `shapes`.
/// x: [N, d]; offsets: [E + 1], monotone from 0; params: as `shapes`.
fn check_dispatch<'a>(
    op: &str,
    x: TensorRef<'a>,
    params: &[TensorRef<'a>],
    shapes: &[Vec<usize>],
    offsets: &[usize],
    d: usize,
) -> Result<(usize, TensorRef<'a>, Vec<TensorRef<'a>>)> {
    let (rows, params) = check_offsets_and_params(op, params, shapes, offsets)?;
    x.expect_len(op, "x", rows * d)?;
    Ok((rows, x.reshape(&[rows, d])?, params))
}

/// [`check_dispatch`] for a forward over gathered rows `x[rows[i]]`: returns
/// N, x as [T, d], rows and the parameters. x: [T, d]; rows: [N] (u32;
/// each below T, which the product checks); the rest as in `check_dispatch`.
#[allow(clippy::type_complexity)]
fn check_gathered<'a>(
    op: &str,
    (x, rows): (TensorRef<'a>, TensorRef<'a>),
    params: &[TensorRef<'a>],
    shapes: &[Vec<usize>],
    offsets: &[usize],
    d: usize,
) -> Result<(usize, TensorRef<'a>, TensorRef<'a>, Vec<TensorRef<'a>>)> {
    let (n, params) = check_offsets_and_params(op, params, shapes, offsets)?;
    rows.expect_dtype(op, "rows", DType::U32)?;
    rows.expect_len(op, "rows", n)?;
    if d == 0 || !x.numel().is_multiple_of(d) {
        return Err(EngineError::shape(
            format!("{op} (x)"),
            format!("[T, {d}]"),
            format!("{} elements", x.numel()),
        ));
    }
    Ok((n, x.reshape(&[x.numel() / d, d])?, rows, params))
}

/// The dispatch's row count N from `offsets` ([E + 1], monotone from 0) and
/// the parameters checked against and shaped as `shapes`.
fn check_offsets_and_params<'a>(
    op: &str,
    params: &[TensorRef<'a>],
    shapes: &[Vec<usize>],
    offsets: &[usize],
) -> Result<(usize, Vec<TensorRef<'a>>)> {
    if offsets.len() < 2 || offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(EngineError::shape(
            format!("{op} (offsets)"),
            "E + 1 >= 2 monotone offsets starting at 0",
            format!("{offsets:?}"),
        ));
    }
    if params.len() != shapes.len() {
        return Err(EngineError::shape(
            format!("{op} (params)"),
            format!("{} tensors", shapes.len()),
            format!("{} tensors", params.len()),
        ));
    }
    let params = params
        .iter()
        .zip(shapes)
        .enumerate()
        .map(|(i, (p, s))| {
            p.expect_len(op, &format!("params[{i}] {s:?}"), s.iter().product())?;
            p.reshape(s)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((offsets[offsets.len() - 1], params))
}

/// The input rows of an expert forward: the dispatch's rows as gathered,
/// or the tokens `x` with the row index `rows` (gathered by the product).
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// [N, d], expert-major.
    Dispatched(TensorRef<'a>),
    /// x: [T, d]; rows: [N] (u32).
    Gathered { x: TensorRef<'a>, rows: TensorRef<'a> },
}

impl<'a> Rows<'a> {
    /// Rows `r0..r0 + m` of the dispatch.
    fn slice(self, r0: usize, m: usize) -> Result<Self> {
        Ok(match self {
            Rows::Dispatched(x) => Rows::Dispatched(x.rows(r0, m)?),
            Rows::Gathered { x, rows } => Rows::Gathered {
                x,
                rows: rows.flat(r0, m)?,
            },
        })
    }

    fn dtype(self) -> DType {
        match self {
            Rows::Dispatched(x) | Rows::Gathered { x, .. } => x.dtype(),
        }
    }
}

/// Number of experts E of a dispatch whose `offsets` hold E + 1 entries.
fn expert_count(offsets: &[usize]) -> usize {
    offsets.len().saturating_sub(1)
}

/// Rows of every expert, `offsets[e + 1] - offsets[e]` (offsets checked monotone).
fn expert_rows(offsets: &[usize]) -> Vec<usize> {
    offsets.windows(2).map(|w| w[1] - w[0]).collect()
}

/// The experts that hold rows, as `(e, r0, m)` with rows `r0..r0 + m`;
/// backward works expert by expert and skips the empty ones.
fn experts_with_rows(offsets: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| (e, w[0], w[1] - w[0]))
}

/// Checks the forward cache handed to backward: exactly `K` tensors, named
/// `names` in errors, each `[rows, cols]`.
fn check_cache<'c, const K: usize>(
    op: &str,
    cache: &'c ExpertCache,
    names: [&str; K],
    rows: usize,
    cols: usize,
) -> Result<[TensorRef<'c>; K]> {
    if cache.tensors.len() != K {
        return Err(EngineError::shape(
            format!("{op} (cache)"),
            format!("{K} tensors from a training forward"),
            format!("{} tensors", cache.tensors.len()),
        ));
    }
    let mut views = Vec::with_capacity(K);
    for (name, t) in names.iter().zip(&cache.tensors) {
        t.view().expect_len(op, &format!("cache {name}"), rows * cols)?;
        views.push(t.view().reshape(&[rows, cols])?);
    }
    views
        .try_into()
        .map_err(|_| EngineError::Other(format!("{op}: cache views")))
}

/// Checks the parameter gradients handed to backward: exactly `K` tensors,
/// each as long as its shape in `shapes`; returns them reshaped so.
fn check_grads<'g, const K: usize>(
    op: &str,
    dparams: &'g mut [TensorMut<'_>],
    shapes: &[Vec<usize>],
) -> Result<[TensorMut<'g>; K]> {
    if dparams.len() != K {
        return Err(EngineError::shape(
            format!("{op} (dparams)"),
            format!("{K} tensors"),
            format!("{} tensors", dparams.len()),
        ));
    }
    let mut grads = Vec::with_capacity(K);
    for (i, (grad, shape)) in dparams.iter_mut().zip(shapes).enumerate() {
        grad.expect_len(op, &format!("dparams[{i}] {shape:?}"), shape.iter().product())?;
        grads.push(grad.reborrow().reshape(shape)?);
    }
    grads
        .try_into()
        .map_err(|_| EngineError::Other(format!("{op}: gradient views")))
}

/// Where a forward writes its hidden activations: into the backward cache
/// (`K` tensors [N, h], refilled in place when the shape is unchanged), or at
/// inference into one scratch tensor of `K` regions sized for the largest
/// slice, reused slice after slice and kept in the cache for the next call
/// (so a steady state allocates nothing), holding no activations.
enum Hidden<'c> {
    Cache(&'c mut ExpertCache),
    Scratch { tensor: &'c mut Tensor, rows: usize },
}

impl<'c> Hidden<'c> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        backend: &dyn Backend,
        cache: &'c mut ExpertCache,
        keep: bool,
        k: usize,
        n: usize,
        h: usize,
        offsets: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        if keep {
            cache.tensors.truncate(k);
            for t in cache.tensors.iter_mut() {
                if t.shape() != [n, h] || t.dtype() != dtype {
                    *t = backend.zeros(&[n, h], dtype)?;
                }
            }
            while cache.tensors.len() < k {
                cache.tensors.push(backend.zeros(&[n, h], dtype)?);
            }
            Ok(Hidden::Cache(cache))
        } else {
            let rows = forward_slices(offsets)
                .map(|(.., r0, r1, _)| r1 - r0)
                .max()
                .unwrap_or(0);
            let fits = matches!(cache.tensors.as_slice(), [t] if t.shape() == [k * rows, h] && t.dtype() == dtype);
            if !fits {
                cache.tensors = vec![backend.zeros(&[k * rows, h], dtype)?];
            }
            Ok(Hidden::Scratch {
                tensor: &mut cache.tensors[0],
                rows,
            })
        }
    }

    /// The hidden views of rows `r0..r0 + m`, one per region.
    fn slice(&mut self, r0: usize, m: usize) -> Result<Vec<TensorMut<'_>>> {
        match self {
            Hidden::Cache(cache) => cache.tensors.iter_mut().map(|t| t.view_mut().rows(r0, m)).collect(),
            Hidden::Scratch { tensor, rows } => {
                let k = tensor.shape()[0] / (*rows).max(1);
                let mut rest = tensor.view_mut();
                let mut views = Vec::with_capacity(k);
                for _ in 0..k {
                    let (region, tail) = rest.split_rows(*rows)?;
                    views.push(region.rows(0, m)?);
                    rest = tail;
                }
                Ok(views)
            }
        }
    }
}

/// Rows per forward slice. A slice is a run of whole consecutive experts
/// (an expert with more rows is a slice alone) whose projections run as one
/// grouped GEMM each, so the backend spreads the slice's experts over its
/// threads. Large, because the pool can balance uneven experts only within a
/// slice; bounded, so one slice's hidden activations (4096 x h) stay a
/// fixed working set whatever the batch.
const SLICE_ROWS: usize = 4096;

/// The dispatch as slices `[e0, e1)` of consecutive experts holding at most
/// [`SLICE_ROWS`] rows together (or one expert with more); empty experts ride
/// along. Slices cut only between experts, so an expert's rows are always
/// computed by one product whatever its neighbours hold.
fn expert_slices(offsets: &[usize]) -> Vec<(usize, usize)> {
    let experts = expert_count(offsets);
    let mut slices = Vec::new();
    let mut e0 = 0;
    for e in 1..=experts {
        // Close the slice before expert e - 1 if adding it would overflow.
        if e - 1 > e0 && offsets[e] - offsets[e0] > SLICE_ROWS {
            slices.push((e0, e - 1));
            e0 = e - 1;
        }
    }
    if experts > e0 {
        slices.push((e0, experts));
    }
    slices
}

/// The [`expert_slices`] that hold rows, as `(e0, e1, r0, r1, group_rows)`:
/// experts `e0..e1`, their rows `r0..r1`, and each expert's row count (the
/// groups of the slice's grouped GEMMs).
fn forward_slices(offsets: &[usize]) -> impl Iterator<Item = (usize, usize, usize, usize, Vec<usize>)> + '_ {
    expert_slices(offsets)
        .into_iter()
        .map(move |(e0, e1)| (e0, e1, offsets[e0], offsets[e1]))
        .filter(|&(_, _, r0, r1)| r1 > r0)
        .map(move |(e0, e1, r0, r1)| (e0, e1, r0, r1, expert_rows(&offsets[e0..=e1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_slices_cut_between_experts_and_cover_all() {
        type Case<'a> = (&'a [usize], &'a [(usize, usize)]);
        let cases: &[Case] = &[
            (&[0, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096], &[(0, 8)]),
            (&[0, 2048, 4096, 6144], &[(0, 2), (2, 3)]),
            (&[0, 0, 0], &[(0, 2)]),
            (&[0, 4100, 4103, 4103, 4500], &[(0, 1), (1, 4)]),
            (&[0, 10, 5000, 5010], &[(0, 1), (1, 2), (2, 3)]),
            (&[0], &[]),
        ];
        for &(offsets, want) in cases {
            assert_eq!(expert_slices(offsets), want, "offsets {offsets:?}");
        }
    }
}
