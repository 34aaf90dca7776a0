//! The engine's op-conformance suite (`backend_kit`), each variant against the
//! one-thread CPU backend: the CPU backend on two threads, and the
//! transfer-counting wrapper over it (whose buffers refuse host views, so any
//! op that reached around the backend would fail there); every backward op
//! also against finite differences.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::counting::CountingBackend;
use std::sync::Arc;

fn cpu(threads: usize) -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(threads).expect("cpu pool"))
}

ecdit_engine::backend_conformance!(cpu_two_threads, cpu(2), cpu(1));
ecdit_engine::backend_conformance!(counting_over_cpu, Arc::new(CountingBackend::new(cpu(2))), cpu(1));
