//! Loading real libraries: the C example router, and a misbehaving C plugin
//! for each load-time check. Each refusal is a clear error, the host stays
//! alive, and nothing of a refused plugin is registered.

mod common;

use ecdit_engine::plugin::{self, load_dirs, plugin_files};
use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::{EngineError, Registry, RouteShape};
use serde_json::json;

fn load_err(path: &std::path::Path) -> String {
    let mut reg = Registry::new();
    let e = reg.load_plugin(path).unwrap_err();
    assert!(matches!(e, EngineError::Plugin { .. }), "{e:?}");
    assert!(reg.list().is_empty(), "a refused plugin left components behind");
    e.to_string()
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let path = common::scratch().join("libnot_a_library.so");
    std::fs::write(&path, "this is text, not ELF").unwrap();
    let e = load_err(&path);
    assert!(
        e.contains("libnot_a_library.so") && e.contains("cannot load as a shared library"),
        "{e}"
    );
    let e = load_err(&common::scratch().join("libmissing.so"));
    assert!(e.contains("libmissing.so"), "{e}");
}

#[test]
fn a_library_without_the_entry_symbol_is_refused() {
    let e = load_err(&common::bad_plugin("-DNO_ENTRY", "bad_no_entry"));
    assert!(
        e.contains("ecdit_plugin_entry") && e.contains("not an ecdit plugin"),
        "{e}"
    );
}

#[test]
fn an_entry_returning_null_is_refused() {
    let e = load_err(&common::bad_plugin("-DNULL_ENTRY", "bad_null_entry"));
    assert!(e.contains("returned null"), "{e}");
}

#[test]
fn a_wrong_abi_version_is_refused_naming_both_versions() {
    let e = load_err(&common::bad_plugin("-DABI=99", "bad_abi"));
    assert!(
        e.contains("version 99") && e.contains("this host speaks version 1"),
        "{e}"
    );
}

#[test]
fn a_descriptor_size_mismatch_is_refused() {
    let e = load_err(&common::bad_plugin("-DDESC_SIZE=8", "bad_size"));
    let needed = std::mem::size_of::<plugin::abi::PluginDesc>();
    assert!(
        e.contains("struct_size 8") && e.contains(&format!("at least {needed}")),
        "{e}"
    );
}

#[test]
fn a_null_function_slot_and_bad_params_are_refused() {
    let e = load_err(&common::bad_plugin("-DNULL_ROUTE", "bad_null_route"));
    assert!(e.contains("router 'bad-a'") && e.contains("null: route"), "{e}");
    let e = load_err(&common::bad_plugin("-DBAD_PARAMS", "bad_params"));
    assert!(e.contains("params_json") && e.contains("not a list"), "{e}");
}

#[test]
fn clashing_names_register_nothing() {
    // Inside one plugin.
    let e = load_err(&common::bad_plugin("-DTWO_KINDS", "bad_two_kinds"));
    assert!(e.contains("'bad-a'") && e.contains("already registered"), "{e}");
    // Across two plugins: the second copy of c-hash is refused, naming both.
    let lib = common::c_hash_router();
    let mut reg = Registry::new();
    reg.load_plugin(&lib).unwrap();
    let before = reg.list().len();
    let e = reg.load_plugin(&lib).unwrap_err().to_string();
    assert!(
        e.contains("c-hash") && e.contains("already registered") && e.contains("c-hash-router"),
        "{e}"
    );
    assert_eq!(reg.list().len(), before);
}

#[test]
fn a_plugin_whose_route_errors_reports_it_by_name() {
    let mut reg = Registry::new();
    let info = reg.load_plugin(common::bad_plugin("", "bad_route_errors")).unwrap();
    assert_eq!(info.name, "bad-plugin");
    let r = reg.router(&json!("bad-a")).unwrap();
    let shape = RouteShape {
        samples: 1,
        tokens_per_sample: 2,
        experts: 2,
    };
    let e = r.route(&[0.0; 4], shape).unwrap_err().to_string();
    assert!(e.contains("bad-plugin") && e.contains("route failed"), "{e}");
}

#[test]
fn the_c_router_loads_lists_its_parameters_and_keeps_the_contract() {
    let mut reg = Registry::new();
    let info = reg.load_plugin(common::c_hash_router()).unwrap();
    assert_eq!((info.name.as_str(), info.version.as_str()), ("c-hash-router", "0.1.0"));
    let c = &info.components[0];
    assert_eq!(c.kind, "c-hash");
    assert_eq!(c.params[0].name, "seed");
    assert_eq!(c.params[0].default, Some(json!(0)));
    assert!(c.origin.contains("c-hash-router 0.1.0"), "{}", c.origin);

    let r = reg.router(&json!({"kind": "c-hash", "seed": 7})).unwrap();
    assert_eq!(r.spec(), json!({"kind": "c-hash", "seed": 7}));
    let shape = RouteShape {
        samples: 2,
        tokens_per_sample: 8,
        experts: 4,
    };
    let scores: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let routing = r.route(&scores, shape).unwrap();
    // Every token exactly once, and the seed changes the assignment.
    assert_eq!(routing.dispatch.slots(), 16);
    assert_eq!(routing.stats.experts_per_token_hist[1], 16);
    let other = reg
        .router(&json!({"kind": "c-hash", "seed": 8}))
        .unwrap()
        .route(&scores, shape)
        .unwrap();
    assert_ne!(routing.dispatch.tokens, other.dispatch.tokens);

    let config = ContractConfig {
        cases: Some(64),
        ..ContractConfig::default()
    };
    check_router_contract(|| reg.router(&json!({"kind": "c-hash", "seed": 3})).unwrap(), &config).unwrap();
}

#[test]
fn plugin_path_dirs_load_each_library_and_report_each_failure() {
    let dir = common::scratch().join("plugin-path");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::c_hash_router(), dir.join("libc_hash_router.so")).unwrap();
    std::fs::write(dir.join("libjunk.so"), "junk").unwrap();
    std::fs::write(dir.join("README.txt"), "not a library, ignored").unwrap();
    assert_eq!(plugin_files(&dir).unwrap().len(), 2);
    let mut reg = Registry::new();
    let list = format!("{}:{}", dir.display(), common::scratch().join("no-such-dir").display());
    let results = load_dirs(&mut reg, std::ffi::OsStr::new(&list));
    assert_eq!(results.len(), 3, "two files and one unreadable directory");
    let ok: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
    assert_eq!(ok.len(), 1);
    assert!(ok[0].0.ends_with("libc_hash_router.so"));
    let errors: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert!(errors.iter().any(|e| e.contains("libjunk.so")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("no-such-dir")), "{errors:?}");
    assert!(reg.router(&json!("c-hash")).is_ok());
}
