//! Component swaps at model level: an EC-DiT whose routers, schedulers and/or
//! backend come from the shipped plugin libraries (through the C ABI) gives
//! the same bits as one built from the statically linked components, on random
//! small configs; the third-party example routers (Rust and C) route a whole
//! model's forward and keep the router contract there; and a config naming an
//! unregistered router is a clean error that lists the known ones.

mod plugin_common;

use ecdit_engine::{Backend, BackendExt, Family, Init, Registry, RouteShape, Routing, RoutingStats};
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{Condition, ForwardOptions, ForwardOutput, Model, ModelActs, TextInput};
use plugin_common::bits;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};

/// Image side and channels of every case: 8 x 8 latents, patch 2, so T = 16 tokens.
const SIZE: usize = 8;
const CHANNELS: usize = 4;
const TOKENS: usize = (SIZE / 2) * (SIZE / 2);
const NUM_CLASSES: usize = 10;
const TEXT_DIM: usize = 16;
const TEXT_LEN: usize = 5;

/// `PROPTEST_CASES` when set, else `default`: a case builds and runs whole models.
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(n)
}

// ---------------------------------------------------------------------------
// Registries

/// Which component families come from the shipped plugin libraries (the
/// routers plugin carries the experts).
#[derive(Clone, Copy, Debug)]
struct Swap {
    routers: bool,
    schedulers: bool,
    backend: bool,
}

impl Swap {
    /// Bit 0 routers, bit 1 schedulers, bit 2 backend.
    fn from_mask(mask: usize) -> Self {
        Self {
            routers: mask & 1 != 0,
            schedulers: mask & 2 != 0,
            backend: mask & 4 != 0,
        }
    }
    fn mask(self) -> usize {
        self.routers as usize | (self.schedulers as usize) << 1 | (self.backend as usize) << 2
    }
}

/// Every shipped component, statically linked.
fn static_registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| ecdit_model::registry().expect("static registry"))
}

/// A fresh registry with the swapped families loaded from the shipped plugins
/// and the others registered statically; built once per swap set.
fn swapped_registry(swap: Swap) -> &'static Registry {
    static R: [OnceLock<Registry>; 8] = [const { OnceLock::new() }; 8];
    R[swap.mask()].get_or_init(|| {
        let mut reg = Registry::new();
        let mut load = |package: &str| {
            let path = plugin_common::shipped(package);
            reg.load_plugin(&path)
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        };
        if swap.routers {
            load("ecdit-routers-plugin");
        }
        if swap.schedulers {
            load("ecdit-schedulers-plugin");
        }
        if swap.backend {
            load("ecdit-backend-cpu-plugin");
        }
        // The routers plugin brings the experts too (plugin ABI v2 carries them).
        if !swap.routers {
            ecdit_routers::register(&mut reg).expect("routers");
        }
        if !swap.schedulers {
            ecdit_schedulers::register(&mut reg).expect("schedulers");
        }
        if !swap.backend {
            ecdit_backend_cpu::register(&mut reg).expect("cpu backend");
        }
        // The swap is real: each family comes from where the swap set says.
        for c in reg.list() {
            let swapped = match c.family {
                Family::Router => swap.routers,
                Family::Scheduler => swap.schedulers,
                Family::Backend => swap.backend,
                Family::Expert => swap.routers,
            };
            assert_eq!(
                c.origin != "builtin",
                swapped,
                "{} '{}' comes from {} under {swap:?}",
                c.family,
                c.kind,
                c.origin
            );
        }
        reg
    })
}

/// Every shipped component plus the two third-party example routers.
fn examples_registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let mut reg = ecdit_model::registry().expect("static registry");
        for lib in [plugin_common::rust_example(), plugin_common::c_example()] {
            reg.load_plugin(&lib)
                .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
        }
        reg
    })
}

fn cpu_backend(registry: &Registry) -> Arc<dyn Backend> {
    // One thread: same seed, config and thread count give the same bits.
    Arc::from(
        registry
            .backend(&json!({"kind": "cpu", "threads": 1}))
            .expect("cpu backend"),
    )
}

// ---------------------------------------------------------------------------
// Configs and inputs

/// conditioning: 0 class labels, 1 text, 2 text with the pooled embedding.
#[allow(clippy::too_many_arguments)]
fn model_config(
    depth: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    experts: usize,
    router: Value,
    expert: &str,
    conditioning: usize,
    scheduler: Value,
) -> ModelConfig {
    let conditioning = match conditioning {
        0 => json!({"class": {"num_classes": NUM_CLASSES}}),
        c => json!({"text": {"text_dim": TEXT_DIM, "max_tokens": TEXT_LEN, "pooled": c == 2}}),
    };
    serde_json::from_value(json!({
        "name": "swap-case", "input_size": SIZE, "patch_size": 2, "in_channels": CHANNELS, "learn_sigma": false,
        "hidden": hidden, "depth": depth, "heads": heads, "kv_heads": kv_heads, "mlp_ratio": 2.0,
        "conditioning": conditioning,
        "moe": {"experts": experts, "every": 2, "first": 1, "router": router,
                "expert": {"kind": expert, "mlp_ratio": 2.0}},
        "scheduler": scheduler,
    }))
    .expect("a valid model config")
}

/// A class-conditioned depth-4 model (MoE in blocks 1 and 3) with `router`.
fn class_config(router: Value, experts: usize) -> ModelConfig {
    model_config(4, 32, 2, 1, experts, router, "gelu-mlp", 0, json!("rectified-flow"))
}

/// The model with every dense parameter drawn small and random from `seed`, so
/// the zero-initialised adaLN gates and final layer take part (a fresh
/// adaLN-Zero model outputs zeros whatever its routers do).
fn build(config: &ModelConfig, registry: &Registry, seed: u64) -> Model {
    let mut model = match Model::new(config.clone(), registry, cpu_backend(registry), seed) {
        Ok(m) => m,
        Err(e) => panic!("building {}: {e}", serde_json::to_string(config).unwrap_or_default()),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let be = model.backend_arc().clone();
    for p in model.params_mut() {
        // Dense parameters only: MoE layers keep their draws, pos_embed is fixed.
        if p.init == Init::Fixed || p.name.contains(".moe.") {
            continue;
        }
        let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.3..0.3)).collect();
        p.load(be.as_ref(), &values).expect("load a parameter");
    }
    model
}

/// Random model inputs for `batch` samples.
struct Inputs {
    x: Vec<f32>,
    labels: Vec<u32>,
    text_tokens: Vec<f32>,
    text_mask: Vec<u8>,
    text_pooled: Vec<f32>,
    batch: usize,
}

impl Inputs {
    fn new(batch: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let x = uniform(batch * CHANNELS * SIZE * SIZE);
        let text_tokens = uniform(batch * TEXT_LEN * TEXT_DIM);
        let text_pooled = uniform(batch * TEXT_DIM);
        // Prompt b has TEXT_LEN - b % 3 real tokens; the class of sample b is 3b mod 10.
        let text_mask = (0..batch * TEXT_LEN)
            .map(|i| u8::from(i % TEXT_LEN < TEXT_LEN - (i / TEXT_LEN) % 3))
            .collect();
        let labels = (0..batch as u32).map(|b| 3 * b % NUM_CLASSES as u32).collect();
        Self {
            x,
            labels,
            text_tokens,
            text_mask,
            text_pooled,
            batch,
        }
    }

    fn condition(&self, config: &ModelConfig) -> Condition<'_> {
        match config.conditioning {
            ecdit_model::config::Conditioning::Class { .. } => Condition::Class(&self.labels),
            ecdit_model::config::Conditioning::Text { .. } => Condition::Text(TextInput {
                tokens: &self.text_tokens,
                mask: &self.text_mask,
                pooled: &self.text_pooled,
                batch: self.batch,
                len: TEXT_LEN,
                dim: TEXT_DIM,
            }),
        }
    }
}

/// The forward, keeping every block's activations (MoE dispatches included).
fn forward(model: &Model, acts: &mut ModelActs, inputs: &Inputs, t: &[f32]) -> ForwardOutput {
    let config = model.config();
    let opts = ForwardOptions::training().with_stats();
    match model.forward(acts, &inputs.x, t, inputs.condition(config), opts) {
        Ok(out) => out,
        Err(e) => panic!("forward of {}: {e}", serde_json::to_string(config).unwrap_or_default()),
    }
}

/// The routing block `i`'s MoE layer kept, on the host (a download).
fn host_routing(model: &Model, acts: &ModelActs, i: usize) -> Routing {
    let routing = acts.blocks[i]
        .moe
        .routing
        .as_ref()
        .expect("a MoE block keeps its routing");
    routing.to_host(model.backend()).expect("download the routing")
}

fn moe_blocks(config: &ModelConfig) -> Vec<usize> {
    let moe = config.moe.as_ref().expect("a MoE config");
    (0..config.depth).filter(|&i| moe.is_moe_block(i)).collect()
}

// ---------------------------------------------------------------------------
// 1. Static vs plugin components in a whole model

prop_compose! {
    /// A router of a random shipped kind with random parameters; `groups` are
    /// added by the caller.
    fn router_spec()(
        kind in 0..3usize, factor in 0.5f64..3.0, k in 1u32..=2, renormalize in any::<bool>(),
        capacity in proptest::option::of(0.5f64..3.0), aux in 0.0f64..0.1, softmax in any::<bool>(),
    ) -> Value {
        match kind {
            0 => json!({"kind": "expert-choice", "capacity_factor": factor}),
            1 => json!({"kind": "token-choice", "k": k, "renormalize": renormalize,
                        "capacity_factor": capacity, "aux_loss_coef": aux}),
            _ => json!({"kind": "expert-race", "k": factor, "score_fn": if softmax { "softmax" } else { "sigmoid" }}),
        }
    }
}

prop_compose! {
    fn scheduler_spec()(ddpm in any::<bool>(), shift in 1.0f64..3.0, trailing in any::<bool>()) -> Value {
        if ddpm {
            json!({"kind": "ddpm", "spacing": if trailing { "trailing" } else { "leading" }})
        } else {
            json!({"kind": "rectified-flow", "shift": shift})
        }
    }
}

prop_compose! {
    /// A small random config and a batch its routing groups can split.
    fn model_case()(
        depth in 2usize..=4, wide in any::<bool>(), heads_log in 0u32..=2, kv_log in 0u32..=2,
        experts in 2usize..=4, groups in 0..3usize, samples_per_group in 1usize..=2, n_groups in 1usize..=2,
        router in router_spec(), swiglu in any::<bool>(), conditioning in 0..3usize, scheduler in scheduler_spec(),
    ) -> (ModelConfig, usize) {
        let heads = 1 << heads_log;
        let kv_heads = heads >> kv_log.min(heads_log);
        let mut router = router;
        router["groups"] = match groups {
            0 => json!("per_sample"),
            1 => json!("batch"),
            _ => json!({"tokens": samples_per_group * TOKENS}),
        };
        let expert = if swiglu { "swiglu" } else { "gelu-mlp" };
        let hidden = if wide { 64 } else { 32 };
        let config = model_config(depth, hidden, heads, kv_heads, experts, router, expert, conditioning, scheduler);
        (config, samples_per_group * n_groups)
    }
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn swapping_routers_schedulers_or_backend_for_plugins_changes_no_bit_of_a_model(
        (config, batch) in model_case(), swap in 1usize..8, seed in any::<u64>(), steps in 2usize..=8,
    ) {
        let swap = Swap::from_mask(swap);
        let (reg_a, reg_b) = (static_registry(), swapped_registry(swap));
        let (model_a, model_b) = (build(&config, reg_a, seed), build(&config, reg_b, seed));
        let (sched_a, sched_b) = match (reg_a.scheduler(&config.scheduler), reg_b.scheduler(&config.scheduler)) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => panic!("{}: static {:?} plugin {:?}", config.scheduler, a.err(), b.err()),
        };
        prop_assert_eq!(sched_a.spec(), sched_b.spec());

        // The first sampling step: times, the network's timestep, the forward, the update.
        let times = sched_a.sampling_times(steps).expect("static times");
        prop_assert_eq!(bits(&times), bits(&sched_b.sampling_times(steps).expect("plugin times")));
        let t_a = vec![sched_a.model_time(times[0]).expect("static model time"); batch];
        let t_b = vec![sched_b.model_time(times[0]).expect("plugin model time"); batch];
        prop_assert_eq!(bits(&t_a), bits(&t_b));
        let inputs = Inputs::new(batch, seed.wrapping_add(1));
        let (mut acts_a, mut acts_b) = (ModelActs::default(), ModelActs::default());
        let out_a = forward(&model_a, &mut acts_a, &inputs, &t_a);
        let out_b = forward(&model_b, &mut acts_b, &inputs, &t_b);
        prop_assert!(out_a.out.iter().all(|v| v.is_finite()));
        prop_assert!(out_a.out.iter().any(|&v| v != 0.0), "the output is all zeros: nothing compared");
        prop_assert_eq!(bits(&out_a.out), bits(&out_b.out));

        // Routing stats of every MoE block, and the dispatch behind them.
        let blocks = moe_blocks(&config);
        let indices: Vec<usize> = out_a.routing.iter().map(|(i, _)| *i).collect();
        prop_assert_eq!(&indices, &blocks);
        prop_assert_eq!(&out_a.routing, &out_b.routing);
        for &i in &blocks {
            let (ra, rb) = (host_routing(&model_a, &acts_a, i), host_routing(&model_b, &acts_b, i));
            let (ra, rb) = (&ra, &rb);
            prop_assert_eq!(&ra.dispatch.offsets, &rb.dispatch.offsets, "block {}", i);
            prop_assert_eq!(&ra.dispatch.tokens, &rb.dispatch.tokens, "block {}", i);
            prop_assert_eq!(bits(&ra.dispatch.gates), bits(&rb.dispatch.gates), "block {}", i);
            prop_assert_eq!(bits(&ra.probs), bits(&rb.probs), "block {}", i);
            prop_assert_eq!(ra.aux_loss.map(f32::to_bits), rb.aux_loss.map(f32::to_bits), "block {}", i);
        }

        let (mut x_a, mut x_b) = (inputs.x.clone(), inputs.x.clone());
        sched_a.step(&mut x_a, &out_a.out, times[0], times[1]).expect("static step");
        sched_b.step(&mut x_b, &out_b.out, times[0], times[1]).expect("plugin step");
        prop_assert!(x_a != inputs.x, "the sampling step left x unchanged");
        prop_assert_eq!(bits(&x_a), bits(&x_b));
    }
}

// ---------------------------------------------------------------------------
// 2. Third-party routers route the model

/// Checks the router contract on the dispatch each MoE block of a forward
/// actually used, and that the router gave every token exactly one expert
/// with its router probability as the gate (both examples promise that).
/// Returns each MoE block's token lists per expert.
fn check_one_expert_per_token(
    model: &Model,
    config: &ModelConfig,
    out: &ForwardOutput,
    acts: &ModelActs,
    batch: usize,
) -> Vec<Vec<Vec<u32>>> {
    let experts = config.moe.as_ref().map_or(0, |m| m.experts);
    let tokens = batch * TOKENS;
    assert!(out.out.iter().all(|v| v.is_finite()), "non-finite model output");
    assert!(out.out.iter().any(|&v| v != 0.0), "all-zero model output");
    let blocks = moe_blocks(config);
    assert_eq!(
        out.routing.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        blocks,
        "routing stats are not reported for each MoE block"
    );
    let mut lists = Vec::new();
    for (i, stats) in &out.routing {
        let cache = &acts.blocks[*i].moe;
        let r = &host_routing(model, acts, *i);
        let scores = model
            .backend()
            .read_f32(cache.scores.as_ref().expect("router scores kept").view())
            .expect("read scores");
        let shape = RouteShape {
            samples: batch,
            tokens_per_sample: TOKENS,
            experts,
        };
        assert_eq!(cache.shape, Some(shape), "block {i}");
        let d = &r.dispatch;
        assert_eq!(
            (d.experts, d.tokens_total),
            (experts, tokens),
            "block {i}: dispatch shape"
        );
        if let Err(e) = d.validate(&format!("block {i}")) {
            panic!("{e}");
        }
        assert_eq!(r.probs.len(), tokens * experts, "block {i}: probabilities");
        // probs = softmax of the router logits the block computed.
        for (t, (p_row, s_row)) in r.probs.chunks(experts).zip(scores.chunks(experts)).enumerate() {
            let max = s_row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let sum: f32 = s_row.iter().map(|&s| (s - max).exp()).sum();
            for (e, (&p, &s)) in p_row.iter().zip(s_row).enumerate() {
                let want = (s - max).exp() / sum;
                assert!(
                    (p - want).abs() < 1e-5,
                    "block {i} token {t} expert {e}: prob {p}, softmax {want}"
                );
            }
        }
        assert_eq!(*stats, RoutingStats::compute(d, &r.probs), "block {i}: reported stats");
        assert_eq!(*stats, r.stats, "block {i}: forward output and cache disagree");
        // Exactly one expert per token, gate = its router probability.
        let mut hist = vec![0u64; experts + 1];
        hist[1] = tokens as u64;
        assert_eq!(stats.experts_per_token_hist, hist, "block {i}");
        assert_eq!(stats.unrouted_fraction, 0.0, "block {i}");
        let mut per_expert = Vec::new();
        for e in 0..experts {
            let (toks, gates) = d.expert(e);
            for (&t, &g) in toks.iter().zip(gates) {
                let p = r.probs[t as usize * experts + e];
                assert_eq!(
                    g.to_bits(),
                    p.to_bits(),
                    "block {i} expert {e} token {t}: gate {g}, prob {p}"
                );
            }
            per_expert.push(toks.to_vec());
        }
        lists.push(per_expert);
    }
    // The MoE blocks see different inputs, so a score-blind router is the
    // only reason for identical dispatches below.
    let read = |i: usize| {
        let t = acts.blocks[i].moe.scores.as_ref().expect("router scores kept");
        model.backend().read_f32(t.view()).expect("read scores")
    };
    let scores: Vec<_> = blocks.iter().map(|&i| bits(&read(i))).collect();
    assert!(
        scores.windows(2).all(|w| w[0] != w[1]),
        "two MoE blocks saw the same scores"
    );
    lists
}

/// Builds a depth-4 model (MoE in blocks 1 and 3) with `router` from the
/// example plugins and runs one forward; returns its per-block dispatch lists.
fn third_party_forward(router: Value, experts: usize, batch: usize, seed: u64) -> Vec<Vec<Vec<u32>>> {
    let config = class_config(router, experts);
    let model = build(&config, examples_registry(), seed);
    let inputs = Inputs::new(batch, seed ^ 7);
    let t = vec![0.5; batch];
    let mut acts = ModelActs::default();
    let out = forward(&model, &mut acts, &inputs, &t);
    let lists = check_one_expert_per_token(&model, &config, &out, &acts, batch);
    // Deterministic: a second forward gives the same bits.
    let again = forward(&model, &mut ModelActs::default(), &inputs, &t);
    assert_eq!(bits(&out.out), bits(&again.out));
    assert_eq!(out.routing, again.routing);
    lists
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    fn the_rust_balanced_random_plugin_routes_the_model(
        experts in 2usize..=4, batch in 1usize..=3, router_seed in 0u64..1000, seed in any::<u64>(),
    ) {
        let lists = third_party_forward(json!({"kind": "balanced-random", "seed": router_seed}), experts, batch, seed);
        for block in &lists {
            // Each sample's tokens are dealt round the experts: balanced per sample.
            for s in 0..batch {
                let sample = (s * TOKENS) as u32..((s + 1) * TOKENS) as u32;
                for (e, toks) in block.iter().enumerate() {
                    let n = toks.iter().filter(|t| sample.contains(t)).count();
                    prop_assert!(n == TOKENS / experts || n == TOKENS.div_ceil(experts),
                        "sample {} expert {}: {} of {} tokens", s, e, n, TOKENS);
                }
            }
        }
        // The deal depends on the seed and the sample only, not the scores.
        prop_assert_eq!(&lists[0], &lists[1]);
    }

    #[test]
    fn the_c_hash_plugin_routes_the_model(
        experts in 2usize..=4, batch in 1usize..=3, router_seed in 0u64..1000, seed in any::<u64>(),
    ) {
        let lists = third_party_forward(json!({"kind": "c-hash", "seed": router_seed}), experts, batch, seed);
        // The expert of a token is a hash of its row and the seed, blind to the scores.
        prop_assert_eq!(&lists[0], &lists[1]);
    }
}

// ---------------------------------------------------------------------------
// 3. Bad input at model level

#[test]
fn an_unregistered_router_kind_is_an_error_listing_the_known_routers() {
    let shipped = ["dense", "expert-choice", "expert-race", "token-choice"];
    // Kinds in the registry's (sorted) order.
    let with_examples = [&["balanced-random", "c-hash"][..], &shipped].concat();
    for (registry, expected) in [
        (static_registry(), &shipped[..]),
        (examples_registry(), &with_examples[..]),
    ] {
        let config = class_config(json!({"kind": "no-such-router", "groups": "per_sample"}), 2);
        let err = match Model::new(config, registry, cpu_backend(registry), 0) {
            Ok(_) => panic!("a model was built with router kind 'no-such-router'"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("router") && err.contains("'no-such-router'"), "{err}");
        let known: Vec<String> = registry
            .list()
            .into_iter()
            .filter(|c| c.family == Family::Router)
            .map(|c| c.kind)
            .collect();
        assert_eq!(known, expected);
        for kind in &known {
            assert!(err.contains(kind.as_str()), "'{kind}' missing from: {err}");
        }
    }
}

#[test]
fn a_bad_plugin_router_parameter_is_an_error_naming_it() {
    let reg = examples_registry();
    for router in [
        json!({"kind": "balanced-random", "seed": "seven"}),
        json!({"kind": "c-hash", "seed": -3}),
        json!({"kind": "c-hash", "sed": 3}),
    ] {
        let config = class_config(router.clone(), 2);
        let err = match Model::new(config, reg, cpu_backend(reg), 0) {
            Ok(_) => panic!("a model was built with router {router}"),
            Err(e) => e.to_string(),
        };
        let field = if router.get("sed").is_some() { "sed" } else { "seed" };
        assert!(err.contains(field), "{router}: {err}");
    }
}
