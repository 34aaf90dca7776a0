//! The example plugins (out-of-tree Rust crate, plain C) and the embedding
//! host: each router loads, lists its parameters, keeps the router contract
//! and routes a MoE layer forward; the host program runs and reports.

mod plugin_common;

use ecdit_engine::router_kit::{check_router_contract, ContractConfig};
use ecdit_engine::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn host_with(lib: &std::path::Path) -> (Registry, plugin::PluginInfo) {
    let mut reg = Registry::new();
    ecdit_backend_cpu::register(&mut reg).unwrap();
    ecdit_routers::register(&mut reg).unwrap();
    let info = reg.load_plugin(lib).unwrap();
    (reg, info)
}

/// Routes a MoE layer forward and backward with the plugin router.
fn moe_forward(reg: &Registry, router: &Value) -> RoutingStats {
    let backend = reg.backend(&json!({"kind": "cpu", "threads": 1})).unwrap();
    let (d, experts) = (8, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let layer = MoeLayer::new_random(
        reg.router(router).unwrap(),
        reg.expert(&json!("gelu-mlp")).unwrap(),
        d,
        experts,
        &*backend,
        DType::F32,
        "moe",
        &mut rng,
    )
    .unwrap();
    let shape = RouteShape {
        samples: 2,
        tokens_per_sample: 12,
        experts,
    };
    let n = shape.tokens() * d;
    let x_host: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x = backend.upload_f32(&[shape.tokens(), d], &x_host, DType::F32).unwrap();
    let mut out = backend.zeros(&[shape.tokens(), d], DType::F32).unwrap();
    let mut cache = MoeCache::default();
    let routing = layer
        .forward(&*backend, out.view_mut(), &mut cache, true, x.view(), shape)
        .unwrap();
    let out_host = backend.read_f32(out.view()).unwrap();
    assert!(out_host.iter().all(|v| v.is_finite()));
    assert!(out_host.iter().any(|&v| v != 0.0), "every token got zero output");
    let mut grads = layer.zero_grads(&*backend).unwrap();
    let mut dx = backend.zeros(&[shape.tokens(), d], DType::F32).unwrap();
    layer
        .backward(&*backend, dx.view_mut(), &mut grads, &cache, x.view(), out.view(), 0.0)
        .unwrap();
    assert!(
        backend
            .read_f32(grads.dw_router.view())
            .unwrap()
            .iter()
            .any(|&g| g != 0.0),
        "no gradient reached the router weights"
    );
    routing.stats(&*backend).unwrap()
}

#[test]
fn the_out_of_tree_rust_router_plugin_works_end_to_end() {
    let (reg, info) = host_with(&plugin_common::rust_example());
    assert_eq!(info.name, "balanced-random-router");
    let c = &info.components[0];
    assert_eq!(
        (c.kind.as_str(), c.params[0].name.as_str()),
        ("balanced-random", "seed")
    );
    let spec = json!({"kind": "balanced-random", "seed": 5});
    let stats = moe_forward(&reg, &spec);
    // 24 tokens dealt to 4 experts: perfectly balanced, each token once.
    assert_eq!(stats.tokens_per_expert, vec![6, 6, 6, 6]);
    assert_eq!(stats.max_experts_per_token, 1);
    let config = ContractConfig {
        cases: Some(48),
        ..ContractConfig::default()
    };
    check_router_contract(|| reg.router(&spec).unwrap(), &config).unwrap();
}

#[test]
fn the_c_router_plugin_works_end_to_end() {
    let (reg, info) = host_with(&plugin_common::c_example());
    assert_eq!(info.name, "c-hash-router");
    let spec = json!({"kind": "c-hash", "seed": 11});
    let stats = moe_forward(&reg, &spec);
    assert_eq!(stats.tokens_per_expert.iter().sum::<usize>(), 24);
    assert_eq!(stats.unrouted_fraction, 0.0);
    let config = ContractConfig {
        cases: Some(48),
        ..ContractConfig::default()
    };
    check_router_contract(|| reg.router(&spec).unwrap(), &config).unwrap();
}

#[test]
fn the_embedding_host_runs_its_own_router_and_a_plugin_router() {
    let ws = plugin_common::workspace_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |args: &[&str]| -> Value {
        let out = std::process::Command::new(&cargo)
            .args(["run", "--quiet", "-p", "ecdit-embed-example", "--"])
            .args(args)
            .current_dir(&ws)
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("the host prints JSON")
    };
    let report = run(&[]);
    assert_eq!(report["router"]["kind"], "round-robin");
    assert_eq!(report["stats"]["tokens_per_expert"], json!([8, 8, 8, 8]));
    assert!(report["output_rms"].as_f64().unwrap() > 0.0);

    let config = plugin_common::workspace_dir().join("target/embed-c-hash.json");
    std::fs::write(
        &config,
        r#"{"d": 8, "experts": 2, "samples": 1, "tokens_per_sample": 10, "seed": 1,
            "router": {"kind": "c-hash", "seed": 4}, "expert": {"kind": "gelu-mlp"}, "backend": "cpu"}"#,
    )
    .unwrap();
    let lib = plugin_common::c_example();
    let report = run(&[config.to_str().unwrap(), "--plugin", lib.to_str().unwrap()]);
    assert_eq!(report["router"], json!({"kind": "c-hash", "seed": 4}));
    assert_eq!(report["stats"]["experts_per_token_hist"], json!([0, 10, 0]));
}
