//! Loading real libraries: the C example router (ABI 2), a C backend (ABI 2,
//! full and shortened tables), version 1 libraries built from the frozen
//! `ecdit_plugin_v1.h`, and a misbehaving C plugin for each load-time check.
//! Each refusal is a clear error, the host stays alive, and nothing of a
//! refused plugin is registered.

mod common;

use ecdit_engine::plugin::{self, load_dirs, plugin_files};
#[cfg(feature = "router-kit")]
use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::{BackendExt, Buffer, DType, EngineError, GemmDims, HostStorage, Registry, RouteShape, Tensor};
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
        e.contains("version 99") && e.contains("this host speaks version 2"),
        "{e}"
    );
}

#[test]
fn a_descriptor_size_mismatch_is_refused() {
    let e = load_err(&common::bad_plugin("-DDESC_SIZE=8", "bad_size"));
    // ABI 2's descriptor needs ABI 1's fields; what follows has defaults.
    let needed = std::mem::offset_of!(plugin::abi::PluginDesc, features);
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

    assert!(r.couples_samples(), "no router-hints slots: the default applies");
    assert!(r.check_tokens_per_sample(7).is_ok());
    #[cfg(feature = "router-kit")]
    {
        let config = ContractConfig {
            cases: Some(64),
            ..ContractConfig::default()
        };
        check_router_contract(|| reg.router(&json!({"kind": "c-hash", "seed": 3})).unwrap(), &config).unwrap();
    }
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

#[test]
fn a_v1_router_library_built_from_the_v1_header_still_loads_and_routes() {
    let mut reg = Registry::new();
    let info = reg.load_plugin(common::v1_hash_router()).unwrap();
    assert_eq!((info.name.as_str(), info.abi_version), ("c-hash-router-v1", 1));
    assert!(info.features.is_empty());
    let c = &info.components[0];
    assert_eq!((c.kind.as_str(), c.params[0].name.as_str()), ("c-hash-v1", "seed"));
    assert!(c.origin.contains("ABI 1"), "{}", c.origin);
    // The same router compiled against ABI 2 routes identically.
    reg.load_plugin(common::c_hash_router()).unwrap();
    let shape = RouteShape {
        samples: 2,
        tokens_per_sample: 8,
        experts: 4,
    };
    let scores: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let v1 = reg.router(&json!({"kind": "c-hash-v1", "seed": 5})).unwrap();
    let v2 = reg.router(&json!({"kind": "c-hash", "seed": 5})).unwrap();
    let (a, b) = (v1.route(&scores, shape).unwrap(), v2.route(&scores, shape).unwrap());
    assert_eq!(a.dispatch, b.dispatch);
    assert_eq!(a.probs, b.probs);
    let gg: Vec<f32> = (0..a.dispatch.slots()).map(|i| i as f32 * 0.1 - 0.5).collect();
    let (mut ga, mut gb) = (vec![0.0; 64], vec![0.0; 64]);
    v1.backward(&a, &scores, &gg, 0.0, &mut ga).unwrap();
    v2.backward(&b, &scores, &gg, 0.0, &mut gb).unwrap();
    assert_eq!(ga, gb);
    // ABI 1 has no hints: the documented defaults.
    assert!(v1.couples_samples());
    assert!(v1.check_tokens_per_sample(3).is_ok());
}

#[test]
fn a_v1_backend_library_is_refused_naming_both_versions() {
    let e = load_err(&common::v1_backend());
    assert!(
        e.contains("v1-backend-plugin") && e.contains("version 1") && e.contains("version 2") && e.contains("backend"),
        "{e}"
    );
}

fn c_backend_registry(flag: &str, name: &str) -> (Registry, plugin::PluginInfo) {
    let mut reg = Registry::new();
    let info = reg.load_plugin(common::c_backend(flag, name)).unwrap();
    (reg, info)
}

#[test]
fn a_c_backend_computes_on_its_own_buffers_with_defaults_for_missing_ops() {
    let (reg, info) = c_backend_registry("", "c_backend");
    assert_eq!(info.abi_version, 2);
    assert!(
        info.features.iter().any(|f| f == "from-the-future"),
        "an unknown feature is tolerated and reported: {:?}",
        info.features
    );
    let b = reg.backend(&json!("c-backend")).unwrap();
    assert_eq!((b.name(), b.threads()), ("c-backend", 1), "threads: the default");
    assert!(
        b.supports(DType::F32) && !b.supports(DType::BF16),
        "supports: the default"
    );
    let (m, n, k) = (3, 2, 4);
    let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 1.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| 1.0 - i as f32 * 0.25).collect();
    let (ta, tw) = (
        b.upload_f32(&[m, k], &a, DType::F32).unwrap(),
        b.upload_f32(&[n, k], &w, DType::F32).unwrap(),
    );
    let mut out = b.zeros(&[m, n], DType::F32).unwrap();
    b.gemm(
        out.view_mut(),
        ta.view(),
        tw.view(),
        None,
        GemmDims::nt(m, n, k),
        1.0,
        0.0,
    )
    .unwrap();
    let want: Vec<f32> = (0..m * n)
        .map(|ij| (0..k).map(|p| a[ij / n * k + p] * w[ij % n * k + p]).sum())
        .collect();
    assert_eq!(b.read_f32(out.view()).unwrap(), want);
    // Host memory, announced: host code may read it without a transfer.
    assert_eq!(out.view().host::<f32>().unwrap(), &want[..]);
    // gemm_grouped is absent: the trait's default loop of gemm, same bits as
    // one gemm per group.
    let groups = [1usize, 0, 2];
    let wg: Vec<f32> = (0..groups.len() * n * k).map(|i| (i as f32 * 0.3).cos()).collect();
    let twg = b.upload_f32(&[groups.len(), n, k], &wg, DType::F32).unwrap();
    let mut grouped = b.zeros(&[m, n], DType::F32).unwrap();
    b.gemm_grouped(grouped.view_mut(), ta.view(), twg.view(), &groups, n, k, true, 1.0, 0.0)
        .unwrap();
    let mut by_hand = b.zeros(&[m, n], DType::F32).unwrap();
    let mut r0 = 0;
    for (g, &rows) in groups.iter().enumerate().filter(|(_, r)| **r > 0) {
        let out_rows = by_hand.view_mut().rows(r0, rows).unwrap();
        let wg_g = twg.view().rows(g, 1).unwrap().reshape(&[n, k]).unwrap();
        b.gemm(
            out_rows,
            ta.view().rows(r0, rows).unwrap(),
            wg_g,
            None,
            GemmDims::nt(rows, n, k),
            1.0,
            0.0,
        )
        .unwrap();
        r0 += rows;
    }
    assert_eq!(b.read_f32(grouped.view()).unwrap(), b.read_f32(by_hand.view()).unwrap());
    // An op with no slot and no default: a clear error naming plugin and op.
    let mut p = b.zeros(&[2], DType::F32).unwrap();
    let e = b.softmax_rows(p.view_mut(), ta.view(), 1, 2).unwrap_err().to_string();
    assert!(
        e.contains("c-backend-plugin") && e.contains("does not implement op softmax_rows"),
        "{e}"
    );
    // axpby is in the full table.
    let x = b.upload_f32(&[2], &[1.0, 2.0], DType::F32).unwrap();
    b.axpby(p.view_mut(), 2.0, x.view(), 1.0).unwrap();
    assert_eq!(b.read_f32(p.view()).unwrap(), vec![2.0, 4.0]);
    // Errors of the plugin cross with its name (a wrong transfer length is
    // now caught by the host first, still naming the plugin); a tensor of
    // another backend is refused.
    let e = b.upload(p.view_mut(), &[0u8; 3]).unwrap_err().to_string();
    assert!(e.contains("c-backend-plugin") && e.contains("upload: length"), "{e}");
    let mut ints = b.zeros(&[2], DType::U32).unwrap();
    let e = b.fill(ints.view_mut(), 1.0).unwrap_err().to_string();
    assert!(
        e.contains("c-backend-plugin") && e.contains("c-backend computes f32 only"),
        "{e}"
    );
    let foreign = Buffer::new(Box::new(HostStorage::zeroed(8).unwrap()), "host");
    let mut foreign = Tensor::from_buffer(foreign, &[2], DType::F32).unwrap();
    let e = b.fill(foreign.view_mut(), 1.0).unwrap_err().to_string();
    assert!(e.contains("backend 'host'"), "{e}");
}

#[test]
fn a_shorter_table_reads_what_lies_beyond_its_struct_size_as_absent() {
    let (reg, _) = c_backend_registry("-DSHORT", "c_backend_short");
    let b = reg.backend(&json!("c-backend")).unwrap();
    let mut y = b.upload_f32(&[2], &[1.0, 1.0], DType::F32).unwrap();
    let x = b.upload_f32(&[2], &[1.0, 2.0], DType::F32).unwrap();
    // The C struct holds an axpby pointer, but past struct_size: not there.
    let e = b.axpby(y.view_mut(), 2.0, x.view(), 1.0).unwrap_err().to_string();
    assert!(e.contains("does not implement op axpby"), "{e}");
    // gemm lies inside: it works, and gemm_grouped (beyond) takes its default.
    let w = b.upload_f32(&[1, 1, 1], &[3.0], DType::F32).unwrap();
    let a = b.upload_f32(&[2, 1], &[1.0, 2.0], DType::F32).unwrap();
    b.gemm_grouped(y.view_mut(), a.view(), w.view(), &[2], 1, 1, true, 1.0, 0.0)
        .unwrap();
    assert_eq!(b.read_f32(y.view()).unwrap(), vec![3.0, 6.0]);
}

#[test]
fn device_buffers_are_reached_only_through_transfers() {
    let (reg, _) = c_backend_registry("-DNO_HOST_PTR", "c_backend_device");
    let b = reg.backend(&json!("c-backend")).unwrap();
    let t = b.upload_f32(&[3], &[1.0, 2.0, 3.0], DType::F32).unwrap();
    assert!(!t.buffer().is_host());
    let e = t.view().host::<f32>().unwrap_err().to_string();
    assert!(e.contains("device memory"), "{e}");
    assert_eq!(b.read_f32(t.view().flat(1, 2).unwrap()).unwrap(), vec![2.0, 3.0]);
}

#[test]
fn transfers_of_the_wrong_length_are_refused_before_the_plugin_sees_them() {
    let (reg, _) = c_backend_registry("", "c_backend_lengths");
    let b = reg.backend(&json!("c-backend")).unwrap();
    let mut t = b.zeros(&[4], DType::F32).unwrap();
    // The host's own check, not the C backend's ("length is not the view's byte length").
    let e = b.upload(t.view_mut(), &[0u8; 3]).unwrap_err().to_string();
    assert!(e.contains("checked by the host") && !e.contains("byte length"), "{e}");
    let mut dst = [0u8; 20];
    let e = b.download(&mut dst, t.view()).unwrap_err().to_string();
    assert!(
        e.contains("download: length 20 bytes") && e.contains("checked by the host") && !e.contains("byte length"),
        "{e}"
    );
    b.upload(t.view_mut(), &[0u8; 16]).unwrap();
}

#[test]
fn a_misaligned_host_pointer_is_not_host_memory() {
    let (reg, _) = c_backend_registry("-DMISALIGNED_HOST_PTR", "c_backend_misaligned");
    let b = reg.backend(&json!("c-backend")).unwrap();
    let t = b.upload_f32(&[3], &[1.0, 2.0, 3.0], DType::F32).unwrap();
    assert!(!t.buffer().is_host(), "an address not aligned to 64 is not host memory");
    assert_eq!(b.read_f32(t.view()).unwrap(), vec![1.0, 2.0, 3.0]);
    // The aligned build is host memory.
    let (reg, _) = c_backend_registry("", "c_backend_aligned");
    let b = reg.backend(&json!("c-backend")).unwrap();
    assert!(b.upload_f32(&[3], &[1.0; 3], DType::F32).unwrap().buffer().is_host());
}
