//! A Rust plugin's own `tracing` events reach the host's subscriber: the
//! export macro installs a forwarding subscriber in the plugin's copy of
//! `tracing` that calls the host's log callback. (Its own test binary, so the
//! plugin is first loaded here, under the capturing subscriber.)

mod plugin_common;

use ecdit_engine::Registry;
use std::sync::{Arc, Mutex};

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
        let mut v = V(format!("{} {}", event.metadata().level(), event.metadata().target()));
        event.record(&mut v);
        self.0.lock().unwrap().push(v.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_rust_plugins_tracing_events_reach_the_host() {
    let lib = plugin_common::shipped("ecdit-routers-plugin");
    let lines = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::with_default(Capture(lines.clone()), || {
        Registry::new().load_plugin(&lib).unwrap();
    });
    let lines = lines.lock().unwrap();
    // The routers crate registers experts too; the exporter says at debug
    // level, inside the plugin, which components it exports over ABI v2.
    assert!(
        lines.iter().any(|l| l.starts_with("DEBUG ecdit_plugin")
            && l.contains("plugin_target=ecdit_engine::plugin::export")
            && l.contains("exporting")
            && l.contains("gelu-mlp")),
        "{lines:#?}"
    );
}
