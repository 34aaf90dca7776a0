//! A host program using ecdit as a library.
//!
//! It builds a registry with the shipped CPU backend and experts, registers a
//! router of its own (`round-robin`, statically, with plain
//! `Registry::register_router`), loads any plugin libraries named with
//! `--plugin <lib>` or found in `$ECDIT_PLUGIN_PATH`, builds a MoE layer from a
//! JSON config on the configured backend, runs one inference forward pass on
//! random tokens (uploaded once; the layer computes in the backend's buffers)
//! and prints the routing statistics as JSON.
//!
//! ```text
//! cargo run -p ecdit-embed-example -- [config.json] [--plugin libfoo.so]...
//! ```

use anyhow::{bail, Context, Result};
use ecdit_engine::*;
use rand::{Rng as _, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The layer to build and the batch to run.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    d: usize,
    experts: usize,
    samples: usize,
    tokens_per_sample: usize,
    seed: u64,
    router: Value,
    expert: Value,
    backend: Value,
}

const DEFAULT_CONFIG: &str = r#"{
    "d": 16, "experts": 4, "samples": 2, "tokens_per_sample": 16, "seed": 0,
    "router": {"kind": "round-robin"},
    "expert": {"kind": "gelu-mlp"},
    "backend": {"kind": "cpu", "threads": 1}
}"#;

/// The host's own router: token t goes to expert `t mod E` (perfectly
/// balanced, blind to the scores) with gate = its router probability.
struct RoundRobin;

impl Router for RoundRobin {
    fn kind(&self) -> &str {
        "round-robin"
    }

    fn spec(&self) -> Value {
        json!({"kind": "round-robin"})
    }

    fn route(&self, scores: &[f32], shape: RouteShape) -> ecdit_engine::Result<Routing> {
        let e_count = shape.experts;
        error::check_len("round-robin", "scores", scores.len(), shape.tokens() * e_count)?;
        error::check_finite("round-robin scores", scores)?;
        // probs: [T, E], row softmax
        let mut probs = vec![0.0f32; scores.len()];
        for (row, p) in scores.chunks(e_count).zip(probs.chunks_mut(e_count)) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = row
                .iter()
                .zip(p.iter_mut())
                .map(|(&x, o)| {
                    *o = (x - max).exp();
                    *o
                })
                .sum();
            p.iter_mut().for_each(|o| *o /= sum);
        }
        let mut lists = vec![Vec::new(); e_count];
        for t in 0..shape.tokens() {
            let e = t % e_count;
            lists[e].push((t as u32, probs[t * e_count + e]));
        }
        let dispatch = Dispatch::from_lists(shape.tokens(), lists);
        let stats = RoutingStats::compute(&dispatch, &probs);
        Ok(Routing {
            dispatch,
            probs,
            aux_loss: None,
            stats,
            group_size: shape.tokens_per_sample,
        })
    }

    fn backward(
        &self,
        routing: &Routing,
        _scores: &[f32],
        grad_gates: &[f32],
        _grad_aux: f32,
        grad_scores: &mut [f32],
    ) -> ecdit_engine::Result<()> {
        // gate = p_e, so d gate / d s_j = p_e (delta_ej - p_j)
        let d = &routing.dispatch;
        let e_count = d.experts;
        error::check_len("round-robin backward", "grad_gates", grad_gates.len(), d.slots())?;
        error::check_len(
            "round-robin backward",
            "grad_scores",
            grad_scores.len(),
            routing.probs.len(),
        )?;
        grad_scores.iter_mut().for_each(|g| *g = 0.0);
        for e in 0..e_count {
            let (tokens, _) = d.expert(e);
            for (&t, &gg) in tokens.iter().zip(&grad_gates[d.offsets[e]..d.offsets[e + 1]]) {
                let t = t as usize;
                let p = &routing.probs[t * e_count..(t + 1) * e_count];
                for j in 0..e_count {
                    let delta = if j == e { 1.0 } else { 0.0 };
                    grad_scores[t * e_count + j] += gg * p[e] * (delta - p[j]);
                }
            }
        }
        Ok(())
    }
}

fn registry() -> Result<Registry> {
    let mut registry = Registry::new();
    ecdit_backend_cpu::register(&mut registry)?;
    ecdit_routers::register(&mut registry)?;
    registry.register_router(
        ComponentInfo {
            family: Family::Router,
            kind: "round-robin".into(),
            description: "host-defined: token t to expert t mod E, gate = router probability".into(),
            params: vec![],
            origin: "ecdit-embed".into(),
        },
        Arc::new(|_: &Map<String, Value>| Ok(Box::new(RoundRobin) as Box<dyn Router>)),
    )?;
    Ok(registry)
}

fn main() -> Result<()> {
    let mut config_text = DEFAULT_CONFIG.to_string();
    let mut plugins = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--plugin" {
            plugins.push(args.next().context("--plugin needs a library path")?);
        } else if arg.starts_with('-') {
            bail!("unknown flag {arg} (usage: ecdit-embed [config.json] [--plugin lib]...)");
        } else {
            config_text = std::fs::read_to_string(&arg).with_context(|| format!("reading config {arg}"))?;
        }
    }
    let config: Config = serde_json::from_str(&config_text).context("parsing the layer config")?;

    let mut registry = registry()?;
    for (path, result) in plugin::load_env_path(&mut registry) {
        if let Err(e) = result {
            eprintln!("skipping plugin {}: {e}", path.display());
        }
    }
    for path in &plugins {
        registry.load_plugin(path)?;
    }

    let backend = registry.backend(&config.backend)?;
    let be = backend.as_ref();
    let router = registry.router(&config.router)?;
    let expert = registry.expert(&config.expert)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let layer = MoeLayer::new_random(router, expert, config.d, config.experts, be, DType::F32, "", &mut rng)?;
    let shape = RouteShape {
        samples: config.samples,
        tokens_per_sample: config.tokens_per_sample,
        experts: config.experts,
    };
    let (tokens, d) = (shape.tokens(), config.d);
    let x_host: Vec<f32> = (0..tokens * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
    // Tensors live in the backend's buffers: the input goes up once, the
    // output and the routing statistics come down once each.
    let x = be.upload_f32(&[tokens, d], &x_host, DType::F32)?;
    let mut out = be.zeros(&[tokens, d], DType::F32)?;
    // An inference forward (keep = false) keeps nothing for a backward.
    let routing = layer.forward(be, out.view_mut(), &mut MoeCache::default(), false, x.view(), shape)?;
    let out = be.read_f32(out.view())?;
    let out_norm = (out.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / out.len() as f64).sqrt();
    let report = json!({
        "router": layer.router.spec(),
        "expert": layer.expert.spec(),
        "backend": backend.name(),
        "tokens": tokens,
        "output_rms": out_norm,
        "stats": routing.stats(be)?,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
