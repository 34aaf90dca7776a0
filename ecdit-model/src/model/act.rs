//! Activation buffers on the model's backend, reused across calls: a buffer
//! grows when a call needs more and otherwise keeps its allocation, so a
//! sampler's steady state allocates nothing (and a smaller batch after a
//! larger one reuses the larger buffer).

use ecdit_engine::{Backend, BackendExt, DType, EngineError, Result, Tensor, TensorMut, TensorRef};

/// One reusable activation: a backend tensor at least as large as the
/// current call's shape, viewed at exactly that shape.
#[derive(Debug, Default)]
pub struct Act {
    tensor: Option<Tensor>,
    dims: Vec<usize>,
}

impl Act {
    /// Sizes the buffer for `dims` of `dtype`, reallocating only when it is
    /// too small or of another dtype. Contents are unspecified afterwards.
    pub fn ensure(&mut self, backend: &dyn Backend, dims: &[usize], dtype: DType) -> Result<()> {
        let need = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| EngineError::shape("activation", "a size that fits in memory", format!("{dims:?}")))?;
        let fits = self
            .tensor
            .as_ref()
            .is_some_and(|t| t.numel() >= need && t.dtype() == dtype);
        if !fits {
            self.tensor = None; // free the old buffer before allocating the new one
            self.tensor = Some(backend.zeros(&[need], dtype)?);
        }
        self.dims.clear();
        self.dims.extend_from_slice(dims);
        Ok(())
    }

    /// The current shape (empty before the first [`Act::ensure`]).
    pub fn shape(&self) -> &[usize] {
        &self.dims
    }

    /// True once the buffer has been sized.
    pub fn is_set(&self) -> bool {
        self.tensor.is_some()
    }

    /// The current call's elements.
    pub fn view(&self) -> Result<TensorRef<'_>> {
        let t = self.tensor.as_ref().ok_or_else(not_computed)?;
        let n = self.dims.iter().product();
        t.view().flat(0, n)?.reshape(&self.dims)
    }

    /// The current call's elements, exclusively.
    pub fn view_mut(&mut self) -> Result<TensorMut<'_>> {
        let n = self.dims.iter().product();
        let t = self.tensor.as_mut().ok_or_else(not_computed)?;
        t.view_mut().flat(0, n)?.reshape(&self.dims)
    }

    /// The current values as f32 on the host (one download): for tests and
    /// inspection, never on the forward's path.
    pub fn read(&self, backend: &dyn Backend) -> Result<Vec<f32>> {
        backend.read_f32(self.view()?)
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.tensor.as_ref().map_or(0, |t| t.numel() * t.dtype().size())
    }

    /// Frees the buffer.
    pub fn clear(&mut self) {
        self.tensor = None;
        self.dims.clear();
    }
}

fn not_computed() -> EngineError {
    EngineError::Other("activation read before the forward computed it".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecdit_backend_cpu::CpuBackend;

    #[test]
    fn a_buffer_grows_but_never_shrinks_and_views_the_current_shape() {
        let be = CpuBackend::new(1).unwrap();
        let mut a = Act::default();
        assert!(a.view().is_err(), "unsized buffers are an error, not a panic");
        a.ensure(&be, &[2, 3], DType::F32).unwrap();
        assert_eq!((a.view().unwrap().shape(), a.bytes()), (&[2, 3][..], 24));
        be.write_f32(a.view_mut().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        // Smaller: same allocation, viewed at the new shape.
        a.ensure(&be, &[1, 2], DType::F32).unwrap();
        assert_eq!((a.view().unwrap().shape(), a.bytes()), (&[1, 2][..], 24));
        assert_eq!(a.read(&be).unwrap(), vec![1.0, 2.0]);
        // Larger, or another dtype: a new allocation.
        a.ensure(&be, &[4, 3], DType::F32).unwrap();
        assert_eq!(a.bytes(), 48);
        a.ensure(&be, &[4, 3], DType::BF16).unwrap();
        assert_eq!((a.bytes(), a.view().unwrap().dtype()), (24, DType::BF16));
    }
}
