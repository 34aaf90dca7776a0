//! One parameter type for every learnable (or fixed) tensor of a model: its
//! upstream dotted name, its shape on disk, its dtype, how it starts, and the
//! tensor holding it on the backend.
//!
//! Every parameter, the experts' and the text encoder's included, is a
//! [`Param`] in one list ([`Params`]) that initialisation, loading, saving,
//! `info`, listing, gradients and the optimiser walk in the same order.
//! Names and shapes on disk stay upstream (PyTorch `Linear` is `[out, in]`);
//! in memory a parameter may be held transposed ([`Layout::InputMajor`]) when
//! that is what the backend's GEMM reads fastest.

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::tensor::{Tensor, TensorRef};
use crate::transfer::BackendExt;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// How a parameter starts (DiT's `initialize_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Xavier (Glorot) uniform, `U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`;
    /// stacked expert weights `[E, out, in]` draw one block per expert, in order.
    XavierUniform {
        /// Inputs of one output unit.
        fan_in: usize,
        /// Outputs of one input unit.
        fan_out: usize,
    },
    /// `N(0, std^2)` (label table and timestep MLP).
    Normal(f32),
    /// All zeros (biases, adaLN modulation, final layer: blocks start as identity).
    Zeros,
    /// All ones (LayerNorm weights of the text encoder: the norm starts as identity).
    Ones,
    /// Computed, not drawn, and never trained (the sin-cos position table):
    /// initialisation leaves it as its owner set it.
    Fixed,
}

/// How a parameter's elements sit in memory relative to its upstream shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As on disk.
    AsStored,
    /// The last two axes swapped: a `[.., out, in]` weight held `[.., in, out]`
    /// (input-major), so `y = x @ W` reads it without repacking.
    InputMajor,
    /// A fused `[k * out, in]` weight (attention's qkv, kv) held `[k, in, out]`:
    /// each of the k output chunks input-major and contiguous, so each part
    /// (q, k, v) is its own plain `x @ W_j` into its own contiguous output.
    InputMajorChunks(usize),
}

/// A named parameter tensor.
#[derive(Debug)]
pub struct Param {
    /// Full dotted upstream name (`blocks.3.attn.qkv.weight`).
    pub name: String,
    /// Shape on disk (upstream layout).
    pub shape: Vec<usize>,
    /// How the elements sit in memory.
    pub layout: Layout,
    /// How [`Param::initialise`] fills it.
    pub init: Init,
    /// The values on the backend, in `memory_shape()`.
    pub tensor: Tensor,
}

impl Param {
    /// A zero-filled parameter of `dtype` on `backend`.
    pub fn new(
        backend: &dyn Backend,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        layout: Layout,
        init: Init,
    ) -> Result<Self> {
        let name = name.into();
        if layout != Layout::AsStored && shape.len() < 2 {
            return Err(EngineError::shape(
                format!("parameter '{name}'"),
                "at least 2 dimensions for an input-major layout",
                format!("{shape:?}"),
            ));
        }
        if let Layout::InputMajorChunks(k) = layout {
            if shape.len() != 2 || k == 0 || !shape[0].is_multiple_of(k) {
                return Err(EngineError::shape(
                    format!("parameter '{name}'"),
                    format!("a [k * out, in] matrix with k = {k}"),
                    format!("{shape:?}"),
                ));
            }
        }
        let tensor = backend.zeros(&memory_shape(shape, layout), dtype)?;
        Ok(Self {
            name,
            shape: shape.to_vec(),
            layout,
            init,
            tensor,
        })
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.tensor.dtype()
    }

    /// The shape in memory (`shape` with the last two axes swapped when input-major).
    pub fn memory_shape(&self) -> Vec<usize> {
        memory_shape(&self.shape, self.layout)
    }

    /// Fills the values according to `init`, drawing from `rng` in the upstream
    /// (on-disk) element order, so the draws do not depend on the layout.
    pub fn initialise(&mut self, backend: &dyn Backend, rng: &mut impl Rng) -> Result<()> {
        let mut data = vec![0.0f32; self.numel()];
        match self.init {
            Init::Zeros => {}
            Init::Ones => data.fill(1.0),
            Init::Fixed => return Ok(()),
            Init::Normal(std) => {
                let normal = Normal::new(0.0f32, std).map_err(|e| {
                    EngineError::param(format!("parameter '{}'", self.name), "init std", std, e.to_string())
                })?;
                data.iter_mut().for_each(|v| *v = normal.sample(rng));
            }
            Init::XavierUniform { fan_in, fan_out } => {
                let a = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt() as f32;
                data.iter_mut().for_each(|v| *v = rng.gen_range(-a..=a));
            }
        }
        self.load(backend, &data)
    }

    /// Sets the values from upstream-layout f32 data (converted to the
    /// parameter's layout and dtype). One upload.
    pub fn load(&mut self, backend: &dyn Backend, upstream: &[f32]) -> Result<()> {
        if upstream.len() != self.numel() {
            return Err(EngineError::shape(
                format!("parameter '{}'", self.name),
                format!("{} values for {:?}", self.numel(), self.shape),
                format!("{} values", upstream.len()),
            ));
        }
        match self.layout {
            Layout::AsStored => backend.write_f32(self.tensor.view_mut(), upstream),
            Layout::InputMajor => {
                let swapped = swap_last_two(upstream, &self.shape);
                backend.write_f32(self.tensor.view_mut(), &swapped)
            }
            Layout::InputMajorChunks(k) => {
                let swapped = swap_last_two(upstream, &[k, self.shape[0] / k, self.shape[1]]);
                backend.write_f32(self.tensor.view_mut(), &swapped)
            }
        }
    }

    /// The values in upstream layout as f32 (for saving and listing). One download.
    pub fn to_upstream_f32(&self, backend: &dyn Backend) -> Result<Vec<f32>> {
        self.upstream_of(backend, self.tensor.view())
    }

    /// A tensor of this parameter's memory shape (its gradient, an optimiser
    /// moment) in upstream layout as f32. One download.
    pub fn upstream_of(&self, backend: &dyn Backend, tensor: TensorRef<'_>) -> Result<Vec<f32>> {
        tensor.expect_len(&format!("parameter '{}'", self.name), "tensor", self.numel())?;
        let mem = backend.read_f32(tensor)?;
        Ok(match self.layout {
            Layout::AsStored => mem,
            Layout::InputMajor | Layout::InputMajorChunks(_) => swap_last_two(&mem, &self.memory_shape()),
        })
    }

    /// A zero f32 tensor of the memory shape: this parameter's gradient.
    pub fn zeros_like(&self, backend: &dyn Backend) -> Result<Tensor> {
        backend.zeros(&self.memory_shape(), DType::F32)
    }
}

fn memory_shape(shape: &[usize], layout: Layout) -> Vec<usize> {
    let mut s = shape.to_vec();
    match layout {
        Layout::AsStored => {}
        Layout::InputMajor => {
            let n = s.len();
            s.swap(n - 2, n - 1);
        }
        Layout::InputMajorChunks(k) => s = vec![k, shape[1], shape[0] / k],
    }
    s
}

/// `[.., r, c]` row-major to `[.., c, r]`.
fn swap_last_two(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = shape.len();
    let (r, c) = (shape[n - 2], shape[n - 1]);
    let mut out = vec![0.0f32; data.len()];
    if r * c == 0 {
        return out; // nothing to move (and `chunks_exact(0)` would panic)
    }
    for (src, dst) in data.chunks_exact(r * c).zip(out.chunks_exact_mut(r * c)) {
        for i in 0..r {
            for j in 0..c {
                dst[j * r + i] = src[i * c + j];
            }
        }
    }
    out
}

/// Anything holding parameters: lists them in one fixed order (the order
/// initialisation draws in and files are written in).
pub trait Params {
    /// Appends every parameter, in order.
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>);
    /// Appends every parameter mutably, in the same order as [`Params::collect`].
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_last_two_transposes_each_block() {
        // Two [2, 3] blocks.
        let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let t = swap_last_two(&data, &[2, 2, 3]);
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
        assert_eq!(swap_last_two(&t, &[2, 3, 2]), data);
        assert_eq!(memory_shape(&[4, 2, 3], Layout::InputMajor), vec![4, 3, 2]);
        // A fused [3 * 2, 4] weight: three [4, 2] input-major chunks.
        assert_eq!(memory_shape(&[6, 4], Layout::InputMajorChunks(3)), vec![3, 4, 2]);
    }
}
