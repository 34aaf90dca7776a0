//! Class embedding: a table with one extra row for the null class (DiT's
//! `LabelEmbedder`); classifier-free guidance passes the null class id.

use super::param::{Init, Param, Params};
use ecdit_engine::{Backend, EngineError, Result};

/// `y_embedder.embedding_table.weight`: [num_classes + 1, d].
#[derive(Clone, Debug, PartialEq)]
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
    pub fn new(num_classes: usize, d: usize) -> Self {
        Self {
            table: Param::new(
                "y_embedder.embedding_table.weight",
                &[num_classes + 1, d],
                Init::Normal(0.02),
            ),
            num_classes,
            d,
        }
    }

    /// The null (unconditional) class id.
    pub fn null_class(&self) -> u32 {
        self.num_classes as u32
    }

    /// out: [B, d]; labels: [B] in `0..=num_classes`.
    pub fn forward(&self, backend: &dyn Backend, out: &mut [f32], labels: &[u32]) -> Result<()> {
        if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &l)| l as usize > self.num_classes) {
            return Err(EngineError::Other(format!(
                "class label {bad} at batch index {i} is out of range: the model has {} classes \
                 (0..{}) plus the null class {}",
                self.num_classes, self.num_classes, self.num_classes
            )));
        }
        backend.gather_rows(out, &self.table.data, labels, self.d)
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
