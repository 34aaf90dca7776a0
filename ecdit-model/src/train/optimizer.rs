//! The optimiser: per parameter two f32 state tensors in the parameter's
//! memory shape (AdamW: first and second moments; RMSProp: the squared-
//! gradient average and the momentum buffer), stepped by backend ops.

use super::config::{OptimizerConfig, OptimizerStep};
use crate::model::Grads;
use ecdit_engine::{Backend, EngineError, Param, Result, Tensor};

/// An optimiser over a fixed list of parameters.
#[derive(Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    /// Two state tensors per parameter, in the order of the parameter list.
    state: Vec<[Tensor; 2]>,
    /// Steps taken (AdamW's bias correction counts from 1).
    steps: u64,
}

impl Optimizer {
    /// Zero state for `params` (the trainable ones, in training order).
    pub fn new(backend: &dyn Backend, config: OptimizerConfig, params: &[&Param]) -> Result<Self> {
        let state = params
            .iter()
            .map(|p| Ok([p.zeros_like(backend)?, p.zeros_like(backend)?]))
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            state,
            steps: 0,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One step at learning rate `lr` over `params` (the list given to
    /// [`Optimizer::new`], in order) with their gradients in `grads`.
    pub fn step(&mut self, backend: &dyn Backend, params: Vec<&mut Param>, grads: &Grads, lr: f32) -> Result<()> {
        if params.len() != self.state.len() {
            return Err(EngineError::shape(
                "optimizer step",
                format!("{} parameters", self.state.len()),
                params.len(),
            ));
        }
        self.steps += 1;
        for (param, [s0, s1]) in params.into_iter().zip(&mut self.state) {
            let grad = grads.get(&param.name)?;
            let p = param.tensor.view_mut();
            match self.config.at(lr) {
                OptimizerStep::Adamw(hp) => {
                    backend.adamw_step(p, grad, s0.view_mut(), s1.view_mut(), hp, self.steps)?
                }
                OptimizerStep::Rmsprop(hp) => backend.rmsprop_step(p, grad, s0.view_mut(), s1.view_mut(), hp)?,
            }
        }
        Ok(())
    }

    /// The state tensors, per parameter, for a checkpoint.
    pub fn state(&self) -> &[[Tensor; 2]] {
        &self.state
    }

    /// The state tensors, mutably (restoring a checkpoint), and the step count.
    pub fn state_mut(&mut self) -> (&mut [[Tensor; 2]], &mut u64) {
        (&mut self.state, &mut self.steps)
    }
}
