//! Workspace-level integration and property tests live in `tests/tests/`;
//! this library holds what several of them share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `ecdit` binary of this build (`ECDIT_BIN` names another one).
///
/// Why not `env!("CARGO_BIN_EXE_ecdit")`: cargo sets it only for the
/// integration tests of the package that defines the binary (ecdit-model),
/// and a workspace test crate cannot depend on another package's binary
/// (artifact dependencies are unstable). So the binary is taken from where
/// cargo puts it, `target/<profile>/ecdit`, the folder above this test
/// executable's `deps/`; and it is built first, once per test process, with
/// `cargo build -p ecdit-model --bin ecdit` in the same profile and target
/// dir. That is a no-op when the binary is fresh, and it means these tests
/// never run a binary older than the sources (`cargo test -p ecdit-tests`
/// alone does not rebuild it). Where cargo cannot be run (tests copied to
/// another machine) an existing binary is used as it is.
pub fn ecdit_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("ECDIT_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lies in target/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join(format!("ecdit{}", std::env::consts::EXE_SUFFIX));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--quiet", "-p", "ecdit-model", "--bin", "ecdit"])
            .current_dir(workspace_dir());
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        match cmd.status() {
            Ok(status) => assert!(
                status.success(),
                "building the ecdit binary failed; run `cargo build -p ecdit-model --bin ecdit` to see why"
            ),
            Err(e) if bin.is_file() => eprintln!("cannot run {cargo} ({e}); using {} as it is", bin.display()),
            Err(e) => panic!("cannot run {cargo} to build the ecdit binary: {e}"),
        }
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// A command running the `ecdit` binary in the workspace root.
pub fn ecdit() -> Command {
    let mut cmd = Command::new(ecdit_bin());
    cmd.current_dir(workspace_dir());
    cmd
}
