//! Training: the optimisers, the training loop, checkpoints and metrics.

pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod run;
pub mod trainer;
