//! One named parameter tensor and how it is initialised.
//!
//! Every parameter of the model is a [`Param`] that carries its full dotted
//! name (`blocks.3.attn.qkv.weight`), its shape and its DiT initialisation, so
//! initialising, loading, saving and listing all walk the same list.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// How a parameter starts (DiT's `initialize_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Xavier (Glorot) uniform, `U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`;
    /// for stacked expert weights `[E, out, in]` each expert draws its own block.
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
}

/// A named parameter tensor, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Full dotted name as stored in safetensors files.
    pub name: String,
    /// Shape as stored (upstream PyTorch layout).
    pub shape: Vec<usize>,
    /// How [`Param::initialise`] fills it.
    pub init: Init,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl Param {
    /// A zero-filled parameter.
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Fills the data according to `init`, drawing from `rng`.
    pub fn initialise(&mut self, rng: &mut impl Rng) {
        match self.init {
            Init::Zeros => self.data.fill(0.0),
            Init::Normal(std) => {
                // A negative or NaN std is a programming error here; it draws zeros.
                match Normal::new(0.0f32, std) {
                    Ok(normal) => self.data.iter_mut().for_each(|v| *v = normal.sample(rng)),
                    Err(_) => self.data.fill(0.0),
                }
            }
            Init::XavierUniform { fan_in, fan_out } => {
                let a = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt() as f32;
                self.data.iter_mut().for_each(|v| *v = rng.gen_range(-a..=a));
            }
        }
    }
}

/// Anything holding parameters: lists them in a fixed order (the order
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
    use rand::SeedableRng;

    #[test]
    fn xavier_stays_in_bound_and_normal_has_the_right_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut p = Param::new(
            "w",
            &[64, 32],
            Init::XavierUniform {
                fan_in: 32,
                fan_out: 64,
            },
        );
        p.initialise(&mut rng);
        let a = (6.0f32 / 96.0).sqrt();
        assert!(p.data.iter().all(|v| v.abs() <= a));
        let max = p.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max > 0.9 * a, "max {max} vs bound {a}");
        let mut n = Param::new("n", &[100, 100], Init::Normal(0.02));
        n.initialise(&mut rng);
        let var = n.data.iter().map(|v| v * v).sum::<f32>() / n.len() as f32;
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
    }
}
