//! Plugin log lines reach the host's `tracing` subscriber through the log
//! callback. Its own test binary: `tracing` caches per-callsite interest
//! process-wide, so a scoped subscriber races with other tests' threads.

mod common;

use ecdit_engine::Registry;
use std::sync::{Arc, Mutex};

/// Captures events (target, message) for the log-callback test.
struct Capture(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct V(String);
        impl tracing::field::Visit for V {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={v:?}", f.name()));
            }
        }
        let mut v = V(event.metadata().target().to_string());
        event.record(&mut v);
        self.0.lock().unwrap().push(v.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn plugin_log_lines_reach_the_host_subscriber() {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let lib = common::compile_c_plugin(
        &[&common::engine_dir().join("../examples/c-router/c_hash_router.c")],
        &[],
        "c_hash_router_log",
    );
    tracing::subscriber::with_default(Capture(lines.clone()), || {
        Registry::new().load_plugin(&lib).unwrap();
    });
    let lines = lines.lock().unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("ecdit_plugin")
            && l.contains("plugin_target=c_hash_router")
            && l.contains("c-hash router loaded")),
        "{lines:?}"
    );
}
