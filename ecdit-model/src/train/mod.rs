//! Training: the optimisers, the training loop, checkpoints and metrics.

pub mod checkpoint;
pub mod metrics;
