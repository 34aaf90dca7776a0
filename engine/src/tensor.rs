//! The host tensor: a shape and row-major f32 data, convertible to and from ndarray.

use crate::error::{EngineError, Result};
use ndarray::{ArrayD, IxDyn};

/// A dense row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from a shape and its data; errors if the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(EngineError::shape(
                "HostTensor::new",
                format!("{n} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Self { shape, data })
    }

    /// All zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Converts to an owned ndarray.
    pub fn to_ndarray(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.data.clone())
            .expect("HostTensor invariant: data length equals shape product")
    }

    /// Converts from any ndarray (any memory order; copied to row-major).
    pub fn from_ndarray<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> Self {
        Self {
            shape: a.shape().to_vec(),
            data: a.iter().copied().collect(),
        }
    }
}

impl<D: ndarray::Dimension> From<ndarray::Array<f32, D>> for HostTensor {
    fn from(a: ndarray::Array<f32, D>) -> Self {
        Self::from_ndarray(&a)
    }
}

impl From<&HostTensor> for ArrayD<f32> {
    fn from(t: &HostTensor) -> Self {
        t.to_ndarray()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndarray_round_trip_keeps_row_major_order() {
        let a = ndarray::Array2::from_shape_fn((2, 3), |(i, j)| (i * 10 + j) as f32);
        let t = HostTensor::from(a.clone());
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
        // A transposed view is copied in logical row-major order.
        let tt = HostTensor::from_ndarray(&a.t().to_owned());
        assert_eq!(tt.data, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        assert_eq!(t.to_ndarray().into_dimensionality::<ndarray::Ix2>().unwrap(), a);
    }

    #[test]
    fn new_rejects_wrong_length() {
        let err = HostTensor::new(vec![2, 2], vec![0.0; 3]).unwrap_err();
        assert!(err.to_string().contains("4 elements"), "{err}");
    }
}
