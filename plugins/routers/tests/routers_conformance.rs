//! The engine's router contract (`ecdit_engine::router_kit`) run on every
//! shipped router: structure, statistics, capacity, determinism, gradients,
//! and on the CPU backend `route_on` equal to `route` bit for bit (and
//! `backward_on` to `backward`), whether the router has a backend path
//! (expert choice, dense) or uses the download/upload default.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::router_conformance;
use ecdit_engine::router_kit::ContractConfig;
use ecdit_engine::Registry;

fn registry() -> Registry {
    let mut registry = Registry::new();
    ecdit_routers::register(&mut registry).expect("register routers");
    registry
}

fn cpu() -> CpuBackend {
    CpuBackend::new(1).expect("a one-thread CPU backend")
}

router_conformance!(
    expert_choice_contract,
    registry(),
    {"kind": "expert-choice", "capacity_factor": 2.0},
    ContractConfig::with_capacity(2.0),
    on cpu()
);
router_conformance!(
    expert_choice_batch_contract,
    registry(),
    {"kind": "expert-choice", "capacity_factor": 0.75, "groups": "batch"},
    ContractConfig::with_capacity(0.75),
    on cpu()
);
router_conformance!(
    token_choice_contract,
    registry(),
    {"kind": "token-choice", "k": 1, "renormalize": true, "capacity_factor": 1.0, "aux_loss_coef": 0.5},
    ContractConfig::default(),
    on cpu()
);
router_conformance!(
    expert_race_sigmoid_contract,
    registry(),
    {"kind": "expert-race", "k": 2.0},
    ContractConfig::default(),
    on cpu()
);
router_conformance!(
    expert_race_softmax_contract,
    registry(),
    {"kind": "expert-race", "k": 1.5, "score_fn": "softmax", "groups": "batch"},
    ContractConfig::default(),
    on cpu()
);
router_conformance!(
    dense_contract,
    registry(),
    {"kind": "dense"},
    ContractConfig {
        max_experts: 1,
        ..ContractConfig::default()
    },
    on cpu()
);
// Groups of whole samples: shapes the groups cannot split are refused on
// the backend as on the host.
router_conformance!(
    expert_choice_token_groups_contract,
    registry(),
    {"kind": "expert-choice", "capacity_factor": 1.5, "groups": {"tokens": 12}},
    ContractConfig::with_capacity(1.5),
    on cpu()
);
