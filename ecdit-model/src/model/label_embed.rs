//! Class embedding: a table with one extra row for the null class (DiT's
//! `LabelEmbedder`); classifier-free guidance passes the null class id.

use super::grads::Grads;
use ecdit_engine::{Backend, DType, EngineError, Init, Layout, Param, Params, Result, TensorMut, TensorRef};

/// `y_embedder.embedding_table.weight`: [num_classes + 1, d].
#[derive(Debug)]
pub struct LabelEmbedder {
    /// [num_classes + 1, d]; row `num_classes` is the null class.
    pub table: Param,
    /// Real classes.
    pub num_classes: usize,
    /// Width d.
    pub d: usize,
}

impl LabelEmbedder {
    /// Table drawn `N(0, 0.02^2)` (DiT).
    pub fn new(backend: &dyn Backend, num_classes: usize, d: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            table: Param::new(
                backend,
                "y_embedder.embedding_table.weight",
                &[num_classes + 1, d],
                dtype,
                Layout::AsStored,
                Init::Normal(0.02),
            )?,
            num_classes,
            d,
        })
    }

    /// The null (unconditional) class id.
    pub fn null_class(&self) -> u32 {
        self.num_classes as u32
    }

    /// Checks host labels before they are uploaded: each in `0..=num_classes`.
    pub fn check(&self, labels: &[u32]) -> Result<()> {
        if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &l)| l as usize > self.num_classes) {
            return Err(EngineError::Other(format!(
                "class label {bad} at batch index {i} is out of range: the model has {} classes \
                 (0..{}) plus the null class {}",
                self.num_classes, self.num_classes, self.num_classes
            )));
        }
        Ok(())
    }

    /// out: [B, d] = table rows; labels: [B] u32 on the backend (checked).
    pub fn forward(&self, backend: &dyn Backend, out: TensorMut<'_>, labels: TensorRef<'_>) -> Result<()> {
        backend.gather_rows(out, self.table.tensor.view(), labels, self.d)
    }
}

impl LabelEmbedder {
    /// Backward of [`LabelEmbedder::forward`]: each sample's gradient adds
    /// into its label's row. demb: [B, d]; labels: [B] u32 on the backend.
    pub fn backward(
        &self,
        backend: &dyn Backend,
        grads: &mut Grads,
        demb: TensorRef<'_>,
        labels: TensorRef<'_>,
    ) -> Result<()> {
        backend.scatter_add_rows(grads.view_mut(&self.table)?, demb, labels, None, self.d)
    }
}

impl Params for LabelEmbedder {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.table);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.table);
    }
}
