//! Typed errors of the engine. Every error says what was wrong and where.

use thiserror::Error;

/// Result with an [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine and its components.
#[derive(Debug, Error)]
pub enum EngineError {
    /// A spec asked for a component kind nobody registered.
    #[error("unknown {family} kind '{kind}' (known: {known})")]
    UnknownKind {
        /// "router", "expert", "scheduler" or "backend".
        family: String,
        /// The kind asked for.
        kind: String,
        /// Comma-separated kinds that would have worked.
        known: String,
    },
    /// A spec is not a JSON object with a string `kind`.
    #[error("bad {family} spec: {reason} (spec: {spec})")]
    BadSpec {
        /// Component family.
        family: String,
        /// What is wrong.
        reason: String,
        /// The spec as given.
        spec: String,
    },
    /// A spec parameter is unknown, missing, mistyped or out of range.
    #[error("{component}: parameter '{field}' = {value}: {reason}")]
    BadParam {
        /// The component kind, e.g. `router 'expert-choice'`.
        component: String,
        /// The parameter name.
        field: String,
        /// The value as given (JSON), or `<missing>`.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two components registered under one name.
    #[error("{family} '{kind}' is already registered (by {existing}); refusing the one from {incoming}")]
    Duplicate {
        /// Component family.
        family: String,
        /// The clashing kind.
        kind: String,
        /// Where the registered one came from.
        existing: String,
        /// Where the refused one came from.
        incoming: String,
    },
    /// Tensor shapes or buffer lengths do not agree.
    #[error("shape mismatch in {op}: expected {expected}, found {found}")]
    Shape {
        /// The operation or tensor.
        op: String,
        /// The expected shape or length.
        expected: String,
        /// The found shape or length.
        found: String,
    },
    /// A value that must be finite is NaN or infinite.
    #[error("non-finite value in {what} at index {index}: {value}")]
    NonFinite {
        /// Which buffer.
        what: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// A plugin library failed to load, was refused, or misbehaved.
    #[error("plugin {plugin}: {reason}")]
    Plugin {
        /// Plugin path or name.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
    /// A backend is not usable on this machine or an op failed on it.
    #[error("backend {backend}: {reason}")]
    Backend {
        /// Backend name.
        backend: String,
        /// What went wrong.
        reason: String,
    },
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    /// A shape error from anything printable.
    pub fn shape(op: impl Into<String>, expected: impl ToString, found: impl ToString) -> Self {
        EngineError::Shape {
            op: op.into(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }

    /// A bad-parameter error.
    pub fn param(
        component: impl Into<String>,
        field: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        EngineError::BadParam {
            component: component.into(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The product of `dims`, or an error naming the op if it overflows.
pub fn numel(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| EngineError::shape(op, "dimensions whose product fits in usize", format!("{dims:?}")))
}

/// Checks that a buffer has exactly `expected` elements.
pub fn check_len(op: &str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(EngineError::shape(
            format!("{op} ({what})"),
            format!("{expected} elements"),
            format!("{len} elements"),
        ))
    }
}

/// Checks that every element is finite; the error names the first bad one.
pub fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(EngineError::NonFinite {
            what: what.to_string(),
            index,
            value: data[index],
        }),
    }
}
