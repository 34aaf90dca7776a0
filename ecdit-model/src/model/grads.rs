//! Parameter gradients: one f32 tensor per trainable parameter, in the
//! parameter's memory shape (so a gradient is laid out as its weight and the
//! optimiser walks both in step), found by the parameter's name.

use ecdit_engine::{Backend, EngineError, Init, Param, Result, Tensor, TensorMut, TensorRef};
use std::collections::HashMap;

/// Gradients of a list of parameters (fixed ones, `Init::Fixed`, have none).
#[derive(Debug)]
pub struct Grads {
    index: HashMap<String, usize>,
    names: Vec<String>,
    tensors: Vec<Option<Tensor>>,
}

impl Grads {
    /// Zero gradients for every trainable parameter of `params`.
    pub fn new(backend: &dyn Backend, params: &[&Param]) -> Result<Self> {
        let mut grads = Self {
            index: HashMap::new(),
            names: Vec::new(),
            tensors: Vec::new(),
        };
        for p in params.iter().filter(|p| p.init != Init::Fixed) {
            if grads.index.insert(p.name.clone(), grads.names.len()).is_some() {
                return Err(EngineError::Other(format!("two parameters are named '{}'", p.name)));
            }
            grads.names.push(p.name.clone());
            grads.tensors.push(Some(p.zeros_like(backend)?));
        }
        Ok(grads)
    }

    /// Sets every gradient to zero (before a step's backward accumulates).
    pub fn zero(&mut self, backend: &dyn Backend) -> Result<()> {
        for (name, t) in self.names.iter().zip(&mut self.tensors) {
            backend.fill(slot_mut(t, name)?.view_mut(), 0.0)?;
        }
        Ok(())
    }

    /// Names in order (the order of the parameter list given to [`Grads::new`]).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The gradient of `param`, exclusively (backward accumulates into it).
    pub fn view_mut(&mut self, param: &Param) -> Result<TensorMut<'_>> {
        let i = self.find(&param.name)?;
        Ok(slot_mut(&mut self.tensors[i], &param.name)?.view_mut())
    }

    /// The gradient of the parameter named `name`.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let i = self.find(name)?;
        Ok(self.tensors[i].as_ref().ok_or_else(|| taken(name))?.view())
    }

    /// Takes `param`'s gradient out (a layer that accumulates into owned
    /// tensors); [`Grads::put`] returns it.
    pub fn take(&mut self, param: &Param) -> Result<Tensor> {
        let i = self.find(&param.name)?;
        self.tensors[i].take().ok_or_else(|| taken(&param.name))
    }

    /// Returns a gradient taken with [`Grads::take`].
    pub fn put(&mut self, param: &Param, tensor: Tensor) -> Result<()> {
        let i = self.find(&param.name)?;
        self.tensors[i] = Some(tensor);
        Ok(())
    }

    /// Every gradient, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Result<TensorRef<'_>>)> {
        self.names
            .iter()
            .zip(&self.tensors)
            .map(|(n, t)| (n.as_str(), t.as_ref().map(Tensor::view).ok_or_else(|| taken(n))))
    }

    /// Every gradient mutably, in order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, Result<TensorMut<'_>>)> {
        self.names
            .iter()
            .zip(&mut self.tensors)
            .map(|(n, t)| (n.as_str(), slot_mut(t, n).map(Tensor::view_mut)))
    }

    /// Total elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().flatten().map(Tensor::numel).sum()
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::Other(format!("no gradient for parameter '{name}' (fixed or unknown)")))
    }
}

fn slot_mut<'a>(slot: &'a mut Option<Tensor>, name: &str) -> Result<&'a mut Tensor> {
    slot.as_mut().ok_or_else(|| taken(name))
}

fn taken(name: &str) -> EngineError {
    EngineError::Other(format!("the gradient of '{name}' was taken and not returned"))
}
