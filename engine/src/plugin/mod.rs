//! Plugins: components shipped as dynamic libraries behind a versioned C ABI.
//!
//! Rust has no stable ABI, so `Box<dyn Router>` cannot cross a library
//! boundary built by another compiler. The boundary is C instead:
//! - [`abi`]: the `#[repr(C)]` descriptor and vtables (mirrored by
//!   `engine/include/ecdit_plugin.h`);
//! - [`export`]: the plugin side; [`export_plugin!`](crate::export_plugin) turns a
//!   crate's `register` function into the C tables, with `catch_unwind` at every
//!   exported function;
//! - [`host`]: the host side; [`load`] opens a library, checks versions and
//!   sizes, and registers adapters that turn the C tables back into
//!   `Box<dyn Router>`, `Box<dyn Scheduler>` and `Box<dyn Backend>`;
//! - [`log`]: plugin log lines into the host's `tracing`.
//!
//! Experts are not part of ABI v1 (an expert drives a host backend, which
//! would need a reverse vtable); a plugin's experts are skipped with a log line.

pub mod abi;
pub mod export;
pub mod host;
pub mod log;

pub use host::{load, load_dirs, load_env_path, load_in_process, plugin_files, PluginInfo, PLUGIN_PATH_ENV};

use crate::error::{EngineError, Result};
use abi::{ErrBuf, F32s, F32sMut, U32s, U32sMut, U8s};
use std::ffi::{c_char, CStr};

/// Capacity of the error buffers the host lends.
pub(crate) const ERR_CAP: usize = 1024;

/// Reads a NUL-terminated string; `None` for a null pointer.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
pub(crate) unsafe fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// Writes `msg` into `err`, truncated on a character boundary to its capacity.
///
/// # Safety
/// `err` is null or a valid [`ErrBuf`] whose `msg` has `cap` writable bytes.
pub(crate) unsafe fn write_err(err: *mut ErrBuf, msg: &str) {
    let Some(err) = err.as_mut() else { return };
    if err.msg.is_null() || err.cap == 0 {
        return;
    }
    let mut n = msg.len().min(err.cap - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    std::ptr::copy_nonoverlapping(msg.as_ptr(), err.msg as *mut u8, n);
    *err.msg.add(n) = 0;
}

fn null_error(what: &str, len: usize) -> EngineError {
    EngineError::Other(format!("{what}: null pointer with length {len}"))
}

/// A required read-only buffer (any pointer when empty).
///
/// # Safety
/// A non-null `s.ptr` points to `s.len` readable elements that outlive `'a`.
pub(crate) unsafe fn f32s<'a>(s: F32s, what: &str) -> Result<&'a [f32]> {
    match (s.len, s.ptr.is_null()) {
        (0, _) => Ok(&[]),
        (n, true) => Err(null_error(what, n)),
        (n, false) => Ok(std::slice::from_raw_parts(s.ptr, n)),
    }
}

/// An optional read-only buffer (null pointer: absent).
///
/// # Safety
/// As [`f32s`].
pub(crate) unsafe fn opt_f32s<'a>(s: F32s) -> Option<&'a [f32]> {
    match (s.ptr.is_null(), s.len) {
        (true, _) => None,
        (false, 0) => Some(&[]),
        (false, n) => Some(std::slice::from_raw_parts(s.ptr, n)),
    }
}

/// A required writable buffer.
///
/// # Safety
/// A non-null `s.ptr` points to `s.len` writable elements, unaliased, outliving `'a`.
pub(crate) unsafe fn f32s_mut<'a>(s: F32sMut, what: &str) -> Result<&'a mut [f32]> {
    match (s.len, s.ptr.is_null()) {
        (0, _) => Ok(&mut []),
        (n, true) => Err(null_error(what, n)),
        (n, false) => Ok(std::slice::from_raw_parts_mut(s.ptr, n)),
    }
}

/// An optional writable buffer.
///
/// # Safety
/// As [`f32s_mut`].
pub(crate) unsafe fn opt_f32s_mut<'a>(s: F32sMut) -> Option<&'a mut [f32]> {
    match (s.ptr.is_null(), s.len) {
        (true, _) => None,
        (false, 0) => Some(&mut []),
        (false, n) => Some(std::slice::from_raw_parts_mut(s.ptr, n)),
    }
}

/// A required read-only u32 buffer.
///
/// # Safety
/// As [`f32s`].
pub(crate) unsafe fn u32s<'a>(s: U32s, what: &str) -> Result<&'a [u32]> {
    match (s.len, s.ptr.is_null()) {
        (0, _) => Ok(&[]),
        (n, true) => Err(null_error(what, n)),
        (n, false) => Ok(std::slice::from_raw_parts(s.ptr, n)),
    }
}

/// A required writable u32 buffer.
///
/// # Safety
/// As [`f32s_mut`].
pub(crate) unsafe fn u32s_mut<'a>(s: U32sMut, what: &str) -> Result<&'a mut [u32]> {
    match (s.len, s.ptr.is_null()) {
        (0, _) => Ok(&mut []),
        (n, true) => Err(null_error(what, n)),
        (n, false) => Ok(std::slice::from_raw_parts_mut(s.ptr, n)),
    }
}

/// An optional byte buffer.
///
/// # Safety
/// As [`f32s`].
pub(crate) unsafe fn opt_u8s<'a>(s: U8s) -> Option<&'a [u8]> {
    match (s.ptr.is_null(), s.len) {
        (true, _) => None,
        (false, 0) => Some(&[]),
        (false, n) => Some(std::slice::from_raw_parts(s.ptr, n)),
    }
}

/// Borrows a slice as an ABI buffer.
pub(crate) fn as_f32s(s: &[f32]) -> F32s {
    F32s {
        ptr: s.as_ptr(),
        len: s.len(),
    }
}

/// Borrows an optional slice as an ABI buffer (null when absent).
pub(crate) fn as_opt_f32s(s: Option<&[f32]>) -> F32s {
    s.map(as_f32s).unwrap_or(F32s {
        ptr: std::ptr::null(),
        len: 0,
    })
}

/// Borrows a mutable slice as an ABI buffer.
pub(crate) fn as_f32s_mut(s: &mut [f32]) -> F32sMut {
    F32sMut {
        ptr: s.as_mut_ptr(),
        len: s.len(),
    }
}

/// Borrows an optional mutable slice as an ABI buffer.
pub(crate) fn as_opt_f32s_mut(s: Option<&mut [f32]>) -> F32sMut {
    s.map(as_f32s_mut).unwrap_or(F32sMut {
        ptr: std::ptr::null_mut(),
        len: 0,
    })
}
