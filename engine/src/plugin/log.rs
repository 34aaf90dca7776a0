//! Plugin log lines into the host's `tracing` subscriber.
//!
//! A Rust plugin links its own copy of `tracing` with its own (empty) global
//! dispatcher, so its `tracing::info!` would go nowhere. At entry the plugin
//! installs [`Forwarder`], a subscriber that formats each event and calls the
//! host's [`LogFn`]; the host's [`host_log`] re-emits the line as a `tracing`
//! event with target `ecdit_plugin` and the plugin's own target as a field.

use super::abi::{Host, LogFn, LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_TRACE, LOG_WARN};
use super::cstr;
use std::ffi::{c_char, CString};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tracing::level_filters::LevelFilter;
use tracing::{field, span, Event, Level, Metadata, Subscriber};

/// The host's log sink, handed to every plugin in [`Host::log`].
///
/// # Safety
/// `target` and `msg` are null or NUL-terminated strings.
pub unsafe extern "C" fn host_log(level: u32, target: *const c_char, msg: *const c_char) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let target = cstr(target).unwrap_or_default();
        let msg = cstr(msg).unwrap_or_default();
        match level {
            LOG_ERROR => tracing::error!(target: "ecdit_plugin", plugin_target = %target, "{msg}"),
            LOG_WARN => tracing::warn!(target: "ecdit_plugin", plugin_target = %target, "{msg}"),
            LOG_INFO => tracing::info!(target: "ecdit_plugin", plugin_target = %target, "{msg}"),
            LOG_DEBUG => tracing::debug!(target: "ecdit_plugin", plugin_target = %target, "{msg}"),
            _ => tracing::trace!(target: "ecdit_plugin", plugin_target = %target, "{msg}"),
        }
    }));
}

/// The most verbose level the host's subscriber records, as a `LOG_*` code.
pub fn host_max_level() -> u32 {
    match LevelFilter::current().into_level() {
        None => 0,
        Some(level) => level_code(&level),
    }
}

fn level_code(level: &Level) -> u32 {
    match *level {
        Level::ERROR => LOG_ERROR,
        Level::WARN => LOG_WARN,
        Level::INFO => LOG_INFO,
        Level::DEBUG => LOG_DEBUG,
        Level::TRACE => LOG_TRACE,
    }
}

/// Installs [`Forwarder`] as this library's global subscriber (once; a no-op
/// if the plugin installed its own, or the host lent no sink).
///
/// # Safety
/// `host` is null or points to a valid [`Host`].
pub unsafe fn install_forwarder(host: *const Host) {
    let Some(host) = host.as_ref() else { return };
    // Only the fields read here need to be present (a longer or shorter host is fine).
    let size_ok = host.struct_size as usize >= std::mem::offset_of!(Host, max_level) + 4;
    let (Some(log), true) = (host.log, size_ok) else { return };
    let max_level = host.max_level;
    let _ = tracing::subscriber::set_global_default(Forwarder { log, max_level });
}

/// A minimal subscriber that sends every event to the host's sink. Spans are
/// not forwarded (the host has its own around plugin calls).
pub struct Forwarder {
    log: LogFn,
    max_level: u32,
}

/// Collects an event's message and fields into one line.
struct Line(String);

impl field::Visit for Line {
    fn record_debug(&mut self, f: &field::Field, value: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", f.name());
        }
    }
    fn record_str(&mut self, f: &field::Field, value: &str) {
        if f.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", f.name());
        }
    }
}

impl Subscriber for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        level_code(metadata.level()) <= self.max_level
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.max_level {
            0 => LevelFilter::OFF,
            LOG_ERROR => LevelFilter::ERROR,
            LOG_WARN => LevelFilter::WARN,
            LOG_INFO => LevelFilter::INFO,
            LOG_DEBUG => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        let meta = event.metadata();
        let target = CString::new(meta.target().replace('\0', "")).unwrap_or_default();
        let msg = CString::new(line.0.replace('\0', "")).unwrap_or_default();
        // SAFETY: the host keeps its sink valid for the life of the process.
        unsafe { (self.log)(level_code(meta.level()), target.as_ptr(), msg.as_ptr()) }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}
