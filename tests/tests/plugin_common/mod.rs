//! Shared by the workspace tests that load plugins: building the plugin
//! libraries (the shipped cdylib wrappers, built with `cargo build -p` in the
//! same profile and target dir as this test binary; the out-of-tree Rust
//! example; the C example) and comparing results bit for bit.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The shipped plugin crates.
pub const SHIPPED: [&str; 4] = [
    "ecdit-routers-plugin",
    "ecdit-schedulers-plugin",
    "ecdit-backend-cpu-plugin",
    "ecdit-backend-cuda-plugin",
];

pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/<profile>` and the target dir, from this test binary's path
/// (`target/<profile>/deps/<test>`).
fn profile_dir() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target = profile.parent().unwrap().to_path_buf();
    (profile, target)
}

fn cargo(args: &[&str], what: &str) {
    let (profile, target) = profile_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(args)
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_dir());
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => {}
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        status.success(),
        "building {what} failed; run `cargo build {}` to see why",
        args.join(" ")
    );
}

fn lib_path(stem: &str) -> PathBuf {
    let (profile, _) = profile_dir();
    let path = profile.join(format!(
        "{}{stem}.{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_EXTENSION
    ));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Path of a shipped plugin library, building all four once per test binary.
pub fn shipped(package: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut args = vec!["build", "--quiet"];
        for p in SHIPPED {
            args.extend(["-p", p]);
        }
        cargo(&args, "the shipped plugins");
    });
    lib_path(&package.replace('-', "_"))
}

/// The out-of-tree example router plugin, built once into the shared target dir.
pub fn rust_example() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let manifest = workspace_dir().join("examples/router-plugin/Cargo.toml");
        cargo(
            &["build", "--quiet", "--manifest-path", manifest.to_str().unwrap()],
            "examples/router-plugin",
        );
    });
    lib_path("balanced_random_router")
}

/// The C example router, compiled with the system C compiler.
pub fn c_example() -> PathBuf {
    c_plugin("examples/c-router/c_hash_router.c", &[], "c_hash_router")
}

/// A C plugin (`source` relative to the workspace) compiled with `-D` flags
/// `flags` into `lib<name>` with the system C compiler, once per test binary
/// and name (written under a temporary name, then renamed, so a library
/// another process has mapped is never rewritten in place).
pub fn c_plugin(source: &str, flags: &[&str], name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-examples");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("lib{name}.{}", std::env::consts::DLL_EXTENSION));
    let tmp = dir.join(format!("lib{name}.{}.tmp", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ws = workspace_dir();
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-pthread", "-I"])
        .arg(ws.join("engine/include"))
        .args(flags)
        .arg(ws.join(source))
        .arg("-o")
        .arg(&tmp)
        .arg("-lm")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC): {e}"));
    assert!(status.success(), "{cc} failed on {source} {flags:?}");
    std::fs::rename(&tmp, &out).unwrap();
    built.insert(name.to_string(), out.clone());
    out
}

/// The bit patterns of `v`, so `assert_eq!` compares floats exactly (NaN and -0.0 included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
