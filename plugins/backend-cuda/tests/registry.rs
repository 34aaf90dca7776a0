//! Runs on every machine, GPU or not: registration, parameters, and the clean
//! refusal on a machine without a CUDA driver.

use ecdit_backend_cuda::{probe_driver, register, DRIVER_LIBRARIES};
use ecdit_engine::{EngineError, Family, ParamType, Registry};
use serde_json::json;

fn registry() -> Registry {
    let mut r = Registry::new();
    register(&mut r).unwrap();
    r
}

fn driver_present() -> bool {
    // Independent of the crate's probe: the same names, opened directly.
    DRIVER_LIBRARIES
        .iter()
        // SAFETY: opening the NVIDIA driver library only runs its initialisers.
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok())
}

#[test]
fn register_lists_cuda_with_its_params() {
    let list = registry().list();
    let info = list
        .iter()
        .find(|c| c.family == Family::Backend && c.kind == "cuda")
        .expect("cuda listed");
    let params: Vec<(&str, &ParamType, serde_json::Value)> = info
        .params
        .iter()
        .map(|p| (p.name.as_str(), &p.ty, p.default.clone().unwrap()))
        .collect();
    assert_eq!(params[0], ("device", &ParamType::Int, json!(0)));
    assert_eq!(params[1], ("tf32", &ParamType::Bool, json!(false)));
    assert_eq!(
        params[2],
        (
            "dtype",
            &ParamType::Choice(vec!["f32".into(), "bf16".into()]),
            json!("f32")
        )
    );
    assert_eq!(params.len(), 3);
}

#[test]
fn without_a_driver_the_factory_is_a_clean_error() {
    let reg = registry();
    let built = reg.backend(&json!({"kind": "cuda", "device": 0}));
    if driver_present() {
        // A GPU machine: either a working backend or a reasoned error (toolkit missing).
        match built {
            Ok(b) => assert_eq!(b.name(), "cuda"),
            Err(e) => assert!(matches!(e, EngineError::Backend { .. }), "{e}"),
        }
        return;
    }
    let e = built.err().expect("no driver: must be an error");
    match &e {
        EngineError::Backend { backend, reason } => {
            assert_eq!(backend, "cuda");
            assert!(
                reason.starts_with("no CUDA driver found (tried libcuda.so.1, libcuda.so: "),
                "{reason}"
            );
            // The dlopen errors themselves are kept.
            assert!(reason.contains("libcuda.so.1:"), "{reason}");
        }
        other => panic!("expected a backend error, got {other}"),
    }
    assert_eq!(probe_driver().unwrap_err().to_string(), e.to_string());
    // Every dtype and device goes through the same probe first.
    for spec in [
        json!({"kind": "cuda", "dtype": "bf16"}),
        json!({"kind": "cuda", "device": 7, "tf32": true}),
    ] {
        let e = reg.backend(&spec).err().expect("no driver").to_string();
        assert!(e.contains("no CUDA driver found"), "{e}");
    }
}

#[test]
fn mistyped_params_are_refused_before_any_probe() {
    let reg = registry();
    let err = |spec| reg.backend(&spec).err().expect("must fail").to_string();
    let e = err(json!({"kind": "cuda", "dtype": "f16"}));
    assert!(
        e.contains("'dtype'") && e.contains("\"f16\"") && e.contains("bf16"),
        "{e}"
    );
    let e = err(json!({"kind": "cuda", "device": -1}));
    assert!(e.contains("'device'") && e.contains("-1"), "{e}");
    let e = err(json!({"kind": "cuda", "tf32": "yes"}));
    assert!(e.contains("'tf32'") && e.contains("\"yes\""), "{e}");
    let e = err(json!({"kind": "cuda", "streams": 2}));
    assert!(e.contains("'streams'") && e.contains("unknown"), "{e}");
}

#[test]
fn registering_twice_is_refused() {
    let mut reg = registry();
    let e = register(&mut reg).unwrap_err().to_string();
    assert!(e.contains("cuda") && e.contains("already registered"), "{e}");
}
