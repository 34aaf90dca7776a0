//! The engine's op-conformance suite (`backend_kit`), each variant against the
//! one-thread CPU backend on the `gemm` crate: the CPU backend on two threads
//! on each matrix path (the `gemm` crate alone, and oneDNN for every product
//! it takes, when the library is found; without it that variant runs the
//! `gemm` crate too), and the transfer-counting wrapper over the default
//! backend (whose buffers refuse host views, so any op that reached around
//! the backend would fail there); every backward op also against finite
//! differences. `tests/onednn.rs` compares the two paths on larger products.

use ecdit_backend_cpu::{CpuBackend, OneDnnMode};
use ecdit_engine::counting::CountingBackend;
use std::sync::Arc;

fn cpu(threads: usize, onednn: OneDnnMode) -> Arc<CpuBackend> {
    Arc::new(CpuBackend::with_onednn(threads, onednn).expect("cpu pool"))
}

ecdit_engine::backend_conformance!(cpu_two_threads, cpu(2, OneDnnMode::Off), cpu(1, OneDnnMode::Off));
ecdit_engine::backend_conformance!(
    cpu_onednn_two_threads,
    cpu(2, OneDnnMode::Always),
    cpu(1, OneDnnMode::Off)
);
ecdit_engine::backend_conformance!(
    counting_over_cpu,
    Arc::new(CountingBackend::new(cpu(2, OneDnnMode::Auto))),
    cpu(1, OneDnnMode::Off)
);
