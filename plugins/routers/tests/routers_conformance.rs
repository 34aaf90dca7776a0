//! The engine's router contract (`ecdit_engine::router_kit`) run on every
//! shipped router: structure, statistics, capacity, determinism, gradients.

use ecdit_engine::router_conformance;
use ecdit_engine::router_kit::ContractConfig;
use ecdit_engine::Registry;

fn registry() -> Registry {
    let mut registry = Registry::new();
    ecdit_routers::register(&mut registry).expect("register routers");
    registry
}

router_conformance!(
    expert_choice_contract,
    registry(),
    {"kind": "expert-choice", "capacity_factor": 2.0},
    ContractConfig::with_capacity(2.0)
);
router_conformance!(
    expert_choice_batch_contract,
    registry(),
    {"kind": "expert-choice", "capacity_factor": 0.75, "groups": "batch"},
    ContractConfig::with_capacity(0.75)
);
router_conformance!(
    token_choice_contract,
    registry(),
    {"kind": "token-choice", "k": 1, "renormalize": true, "capacity_factor": 1.0, "aux_loss_coef": 0.5}
);
router_conformance!(
    expert_race_sigmoid_contract,
    registry(),
    {"kind": "expert-race", "k": 2.0}
);
router_conformance!(
    expert_race_softmax_contract,
    registry(),
    {"kind": "expert-race", "k": 1.5, "score_fn": "softmax", "groups": "batch"}
);
router_conformance!(
    dense_contract,
    registry(),
    {"kind": "dense"},
    ContractConfig {
        max_experts: 1,
        ..ContractConfig::default()
    }
);
