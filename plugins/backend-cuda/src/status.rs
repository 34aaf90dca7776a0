//! The backend's status words: how a kernel reports a bad row index without
//! making the host wait.
//!
//! Gather, scatter-add and gather-dot read row indices from device memory, so
//! checking them on the host would cost a download and a synchronisation in
//! every MoE layer. Instead the kernels skip an index out of range (never
//! reading or writing through it) and record it in two device words: word 0
//! ORs the bit of each op that met one, word 1 keeps the largest such index.
//! The next download (or [`crate::CudaBackend::synchronize`]) reads them with
//! the data, clears them, and returns an error naming the op: a result that
//! depended on a skipped index never reaches the host unflagged.

use crate::probe::cuda_error;
use ecdit_engine::EngineError;

/// `gather_rows` met an index out of range (`BAD_GATHER` in `kernels/gather.cu`).
pub const BAD_GATHER: u32 = 1;
/// `scatter_add_rows` met one (`BAD_SCATTER`).
pub const BAD_SCATTER: u32 = 2;
/// `gather_dot` met one (`BAD_GATHER_DOT`).
pub const BAD_GATHER_DOT: u32 = 4;

/// Status words per backend.
pub const WORDS: usize = 2;

/// The error for status words `[flags, largest index]`, or `None` when clear.
pub fn error(words: [u32; WORDS]) -> Option<EngineError> {
    let [flags, largest] = words;
    if flags == 0 {
        return None;
    }
    let ops: Vec<&str> = [
        (BAD_GATHER, "gather_rows"),
        (BAD_SCATTER, "scatter_add_rows"),
        (BAD_GATHER_DOT, "gather_dot"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|&(_, name)| name)
    .collect();
    Some(cuda_error(format!(
        "{} met a row index out of range since the last download (largest: {largest}); \
         such rows were skipped, so results computed since then are wrong",
        ops.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_kernels_and_errors_name_the_ops() {
        let src = crate::kernels::SOURCE;
        assert!(src.contains("#define BAD_GATHER 1u"));
        assert!(src.contains("#define BAD_SCATTER 2u"));
        assert!(src.contains("#define BAD_GATHER_DOT 4u"));
        assert!(error([0, 0]).is_none());
        let e = error([BAD_GATHER | BAD_GATHER_DOT, 10]).unwrap().to_string();
        assert!(
            e.contains("gather_rows, gather_dot") && e.contains("largest: 10") && !e.contains("scatter"),
            "{e}"
        );
    }
}
