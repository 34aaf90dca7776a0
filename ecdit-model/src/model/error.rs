//! Errors of building, loading, saving and running the model.

use crate::weights::WeightsError;
use ecdit_engine::EngineError;
use thiserror::Error;

/// What can go wrong with a [`super::Model`].
#[derive(Debug, Error)]
pub enum ModelError {
    /// A bad config, a bad input, or a backend/router/expert failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A weights file could not be read or written.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Result with a [`ModelError`].
pub type ModelResult<T> = std::result::Result<T, ModelError>;
