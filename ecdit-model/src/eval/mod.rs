//! GenEval-style evaluation of generated images of the shapes world.
//!
//! GenEval (Ghosh et al., 2023) scores a text-to-image model by generating
//! images for prompts of six kinds (single object, two objects, counting,
//! colours, position, colour attribution) and checking each image with an
//! object detector; the overall score is the mean of the six tag accuracies.
//! The data world (`crate::data`) has no need of a learned detector: its
//! objects are flat-coloured shapes on black, so [`detect`] segments pixels by
//! palette colour, finds connected components and classifies their shapes.
//!
//! - [`prompts`](read_prompts): GenEval's metadata format (one JSON object a
//!   line), read with errors naming the file and line; [`make_prompts`] is
//!   the shipped suite (`eval/prompts.jsonl` at the repository root);
//! - [`detect`]: the detector, with tolerances for blurry generated images;
//! - [`judge`] and [`Report`]: GenEval's rules and its summary;
//! - [`write_marked_grid`]: samples with a green (pass) or red (fail) frame;
//! - [`render_prompt`] and [`corrupt`]: ground-truth and deliberately wrong
//!   renders, which the tests use to check the detector and the rules.

mod detector;
mod grid;
mod prompts;
mod render;
mod score;

pub use detector::{
    detect, min_pixels, Detection, MAX_HUE_ANGLE_DEG, MIN_CORE, MIN_CORE_PIXELS, MIN_COVERAGE, MIN_PIXELS_32,
    MIN_TEMPLATE_SIDE, SQUARE_FILL, SQUARE_IOU_MARGIN, TRIANGLE_FILL, TRIANGLE_SKEW,
};
pub use grid::write_marked_grid;
pub use prompts::{
    colour_from_name, make_prompts, parse_prompt, parse_prompts, read_prompts, relation_from_name, shape_from_name,
    tag_from_name, write_prompts, PromptSpec, Requirement,
};
pub use render::{corrupt, render_prompt, Corruption};
pub use score::{judge, relative_position, Judgement, Report};

use crate::data::DataError;
use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong reading prompts or writing evaluation output.
#[derive(Debug, Error)]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of a prompt file is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Prompt {
        /// The prompt file.
        path: PathBuf,
        /// The line, counted from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Images, judgements and prompts handed to the grid writer do not fit together.
    #[error("cannot write {}: {reason}", path.display())]
    Grid {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The PNG writer failed.
    #[error(transparent)]
    Data(#[from] DataError),
}
