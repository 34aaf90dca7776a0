//! Plugins: components shipped as dynamic libraries behind a versioned C ABI.
//!
//! Rust has no stable ABI, so `Box<dyn Router>` cannot cross a library
//! boundary built by another compiler. The boundary is C instead:
//! - [`abi`]: the `#[repr(C)]` descriptor and tables of ABI 2 (mirrored by
//!   `engine/include/ecdit_plugin.h`); [`abi_v1`]: ABI 1, frozen, for reading
//!   old router and scheduler libraries (`ecdit_plugin_v1.h`);
//! - [`export`]: the plugin side, one file per component kind;
//!   [`export_plugin!`](crate::export_plugin) turns a crate's `register`
//!   function into the C tables, with `catch_unwind` at every exported function;
//! - [`host`]: the host side, one file per component kind; [`load`] opens a
//!   library, checks versions and sizes, and registers adapters that turn the
//!   C tables back into `Box<dyn Router>`, `Box<dyn Scheduler>`,
//!   `Box<dyn Backend>` and `Box<dyn Expert>`;
//! - [`log`]: plugin log lines into the host's `tracing`.
//!
//! Backends cross as buffer handles plus tensor descriptors, so a plugin
//! backend may keep its memory on a device. Routers and schedulers stay host
//! code over host buffers (the traits' `route_on` / `step_on` defaults move the
//! data). Experts cross the other way round too: the host lends the expert its
//! backend as a table of the same layout ([`abi::BackendRef`]).

pub mod abi;
pub mod abi_v1;
pub mod export;
pub mod host;
pub mod log;

pub use host::{load, load_dirs, load_env_path, load_in_process, plugin_files, PluginInfo, PLUGIN_PATH_ENV};

use crate::error::{EngineError, Result};
use abi::{ErrBuf, F32s, F32sMut, U32s};
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

/// The most entries of a list a plugin announces by count (the tables of one
/// family, the tensors of one call): a larger count is a bug, not a model.
pub(crate) const MAX_LIST: usize = 4096;

/// Checks a count of `size`-byte entries a plugin announced before it becomes
/// a slice length: at most `max`, and a byte length a slice can have.
pub(crate) fn check_count(n: usize, max: usize, size: usize, what: &str) -> Result<()> {
    if n <= max && n.checked_mul(size).is_some_and(|b| b <= isize::MAX as usize) {
        Ok(())
    } else {
        Err(EngineError::Other(format!(
            "{what}: {n} entries announced, at most {max} are accepted"
        )))
    }
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

/// Borrows a slice as an ABI buffer.
pub(crate) fn as_f32s(s: &[f32]) -> F32s {
    F32s {
        ptr: s.as_ptr(),
        len: s.len(),
    }
}

/// Borrows a mutable slice as an ABI buffer.
pub(crate) fn as_f32s_mut(s: &mut [f32]) -> F32sMut {
    F32sMut {
        ptr: s.as_mut_ptr(),
        len: s.len(),
    }
}

/// Reads a NULL-terminated array of strings (NULL: empty).
///
/// # Safety
/// `p` is null or points to a NULL-terminated array of NUL-terminated strings.
pub(crate) unsafe fn string_list(p: *const *const c_char) -> Vec<String> {
    let mut out = Vec::new();
    if p.is_null() {
        return out;
    }
    let mut i = 0;
    // A runaway list (no terminator) is a plugin bug; cap it rather than read forever.
    while i < 4096 {
        let s = *p.add(i);
        if s.is_null() {
            break;
        }
        out.extend(cstr(s));
        i += 1;
    }
    out
}

/// Reads a table of `struct_size` bytes into `T`: fields beyond a shorter table
/// read as zero (NULL slots, zero counts), bytes beyond a longer one are ignored.
///
/// # Safety
/// `p` points to at least `struct_size` readable bytes; all-zero bytes are a valid `T`.
pub(crate) unsafe fn read_table<T: Copy>(p: *const std::ffi::c_void, struct_size: usize) -> T {
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    let n = struct_size.min(std::mem::size_of::<T>());
    std::ptr::copy_nonoverlapping(p as *const u8, out.as_mut_ptr() as *mut u8, n);
    out.assume_init()
}
