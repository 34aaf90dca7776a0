//! Helpers shared by the plugin tests: compiling C plugins with the system compiler.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The engine crate root.
pub fn engine_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory under the target dir, shared by one test binary.
pub fn scratch() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-tests");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Compiles C sources with `cc -shared -fPIC` into `lib<name>.so` in the
/// scratch dir (written under a temporary name, then renamed, so a library
/// another process has mapped is never rewritten in place).
/// Each name is compiled once per test process (tests run on threads).
pub fn compile_c_plugin(sources: &[&Path], flags: &[&str], name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let out = scratch().join(format!("lib{name}.{}", std::env::consts::DLL_EXTENSION));
    let tmp = scratch().join(format!("lib{name}.{}.tmp", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-Wall"])
        .arg("-I")
        .arg(engine_dir().join("include"))
        .args(flags)
        .args(sources)
        .arg("-o")
        .arg(&tmp)
        .arg("-lm")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC): {e}"));
    assert!(status.success(), "{cc} failed on {sources:?} {flags:?}");
    std::fs::rename(&tmp, &out).expect("rename compiled plugin");
    built.insert(name.to_string(), out.clone());
    out
}

/// The C example router, compiled.
pub fn c_hash_router() -> PathBuf {
    let src = engine_dir().join("../examples/c-router/c_hash_router.c");
    compile_c_plugin(&[&src], &[], "c_hash_router")
}

/// The misbehaving C fixture with one `-D` flag (or none).
pub fn bad_plugin(flag: &str, name: &str) -> PathBuf {
    let src = engine_dir().join("tests/fixtures/bad_plugin.c");
    let flags: Vec<&str> = if flag.is_empty() { vec![] } else { vec![flag] };
    compile_c_plugin(&[&src], &flags, name)
}

/// The version 1 c-hash router (built against the frozen `ecdit_plugin_v1.h`).
pub fn v1_hash_router() -> PathBuf {
    let src = engine_dir().join("tests/fixtures/v1_hash_router.c");
    compile_c_plugin(&[&src], &[], "v1_hash_router")
}

/// A version 1 library with a backend (must be refused).
pub fn v1_backend() -> PathBuf {
    let src = engine_dir().join("tests/fixtures/v1_backend.c");
    compile_c_plugin(&[&src], &[], "v1_backend")
}

/// The C backend written against ABI 2, with one `-D` flag (or none).
pub fn c_backend(flag: &str, name: &str) -> PathBuf {
    let src = engine_dir().join("tests/fixtures/c_backend.c");
    let flags: Vec<&str> = if flag.is_empty() { vec![] } else { vec![flag] };
    compile_c_plugin(&[&src], &flags, name)
}
