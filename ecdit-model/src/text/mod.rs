//! Text conditioning: prompts to the token embeddings the DiT cross-attends to.
//!
//! [`TextEncoder`] is the interface the model consumes; [`Tokenizer`] is a
//! word-level tokenizer over a vocabulary file (the built-in one covers the
//! built-in data world of shapes, colours, counts and positions);
//! [`TransformerTextEncoder`] is a small trainable transformer encoder on the
//! engine's [`ecdit_engine::Backend`] ops.

mod encoder;
mod encoder_train;
mod tokenizer;

pub use encoder::{
    param_shapes, DeviceTextBatch, LayerParams, TextEncoderConfig, TextEncoderParams, TransformerTextEncoder,
};
pub use encoder_train::TextEncoderActs;
pub use tokenizer::{Tokenized, Tokenizer, Vocab, BOS, BUILTIN_VOCAB, EOS, PAD, UNK};

use ecdit_engine::{EngineError, Result};
use std::path::PathBuf;
use thiserror::Error;

/// Encoded prompts: what the DiT's cross-attention and pooled conditioning read.
#[derive(Clone, Debug, PartialEq)]
pub struct TextBatch {
    /// Token embeddings [B, L, dim]; rows of padding positions are finite but meaningless.
    pub tokens: Vec<f32>,
    /// [B, L], 1 = real token, 0 = padding. Every prompt has at least one real token.
    pub mask: Vec<u8>,
    /// Masked mean of `tokens` over the real tokens [B, dim].
    pub pooled: Vec<f32>,
    /// Prompts B.
    pub batch: usize,
    /// Tokens per prompt L (the longest prompt of the batch).
    pub len: usize,
    /// Channels per token.
    pub dim: usize,
}

/// Turns prompts into token embeddings.
pub trait TextEncoder: Send + Sync {
    /// Channels per output token.
    fn dim(&self) -> usize;
    /// Longest prompt in tokens; longer ones are truncated with a warning.
    fn max_tokens(&self) -> usize;
    /// Encodes a batch of prompts (the empty prompt is valid).
    fn encode(&self, prompts: &[&str]) -> Result<TextBatch>;
}

/// What can go wrong building a tokenizer or text encoder.
#[derive(Debug, Error)]
pub enum TextError {
    /// A vocabulary file could not be read.
    #[error("cannot read vocabulary file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A vocabulary is malformed; line 0 means the file as a whole.
    #[error("bad vocabulary {origin}, line {line}: {reason}")]
    Vocab {
        /// The file (or `<built-in>`).
        origin: String,
        /// 1-based line number, 0 for the whole file.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A text-encoder setting is out of range.
    #[error("text encoder: {field} = {value}: {reason}")]
    Config {
        /// The setting.
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A backend op failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<TextError> for EngineError {
    fn from(e: TextError) -> Self {
        match e {
            TextError::Engine(e) => e,
            other => EngineError::Other(other.to_string()),
        }
    }
}
