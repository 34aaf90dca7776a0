//! Forward of a tiny text-conditioned EC-DiT (MoE every other block,
//! expert-choice routing, grouped-query attention).

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{BackendExt, DType, Init};
use ecdit_model::config::ModelConfig;
use ecdit_model::model::{
    patch_dims, Act, CfgChannels, CfgOptions, Condition, FinalActs, ForwardOptions, Model, ModelActs, TextInput,
};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;

const TEXT_DIM: usize = 8;
const TEXT_LEN: usize = 5;

fn ec_config(groups: serde_json::Value) -> ModelConfig {
    serde_json::from_value(json!({
        "name": "ec-tiny", "input_size": 8, "patch_size": 2, "in_channels": 4, "learn_sigma": false,
        "hidden": 32, "depth": 4, "heads": 4, "kv_heads": 2, "mlp_ratio": 4.0,
        "conditioning": {"text": {"text_dim": TEXT_DIM, "max_tokens": TEXT_LEN, "dropout": 0.1, "pooled": true}},
        "moe": {
            "experts": 4, "every": 2, "first": 1,
            "router": {"kind": "expert-choice", "capacity_factor": 2.0, "groups": groups},
            "expert": {"kind": "gelu-mlp", "mlp_ratio": 2.0}
        },
        "scheduler": {"kind": "rectified-flow"}
    }))
    .expect("EC config")
}

fn build(config: ModelConfig) -> Model {
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(1).expect("cpu backend"));
    Model::new(config, &registry, backend, 11).expect("model")
}

/// Overwrites every dense parameter with small random values, so zero-initialised
/// adaLN, cross-attention output and final layer all take part (MoE layers
/// keep their xavier draws; the fixed position table stays).
fn randomise(model: &mut Model, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let be = model.backend_arc().clone();
    for p in model.params_mut() {
        if p.init == Init::Fixed || p.name.contains(".moe.") {
            continue;
        }
        let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.2..0.2)).collect();
        p.load(be.as_ref(), &values).expect("load");
    }
}

struct Batch {
    x: Vec<f32>,
    t: Vec<f32>,
    tokens: Vec<f32>,
    mask: Vec<u8>,
    pooled: Vec<f32>,
    n: usize,
    /// Floats per image (C * H * W).
    per_image: usize,
    /// Channels per text token.
    text_dim: usize,
}

impl Batch {
    /// n images of the tiny config (4 x 8 x 8), text of width `TEXT_DIM`.
    fn new(n: usize, seed: u64) -> Self {
        Self::sized(n, seed, 4 * 64, TEXT_DIM)
    }

    fn sized(n: usize, seed: u64, per_image: usize, text_dim: usize) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut mask = vec![1u8; n * TEXT_LEN];
        for b in 0..n {
            // Prompt b has TEXT_LEN - b % 3 real tokens.
            for l in TEXT_LEN - b % 3..TEXT_LEN {
                mask[b * TEXT_LEN + l] = 0;
            }
        }
        Self {
            x: (0..n * per_image).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            t: (0..n).map(|_| rng.gen_range(0.0..1.0)).collect(),
            tokens: (0..n * TEXT_LEN * text_dim).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            mask,
            pooled: (0..n * text_dim).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            n,
            per_image,
            text_dim,
        }
    }

    fn text(&self) -> TextInput<'_> {
        TextInput {
            tokens: &self.tokens,
            mask: &self.mask,
            pooled: &self.pooled,
            batch: self.n,
            len: TEXT_LEN,
            dim: self.text_dim,
        }
    }

    /// Samples `start..start + n`.
    fn samples(&self, start: usize, n: usize) -> Batch {
        let (per, tl) = (self.per_image, TEXT_LEN * self.text_dim);
        Batch {
            x: self.x[start * per..(start + n) * per].to_vec(),
            t: self.t[start..start + n].to_vec(),
            tokens: self.tokens[start * tl..(start + n) * tl].to_vec(),
            mask: self.mask[start * TEXT_LEN..(start + n) * TEXT_LEN].to_vec(),
            pooled: self.pooled[start * self.text_dim..(start + n) * self.text_dim].to_vec(),
            n,
            per_image: per,
            text_dim: self.text_dim,
        }
    }

    /// Sample i alone.
    fn sample(&self, i: usize) -> Batch {
        self.samples(i, 1)
    }
}

#[test]
fn ec_forward_is_finite_shaped_and_reports_every_moe_layer() {
    let mut model = build(ec_config(json!("per_sample")));
    randomise(&mut model, 1);
    let batch = Batch::new(3, 2);
    let out = model
        .predict(&batch.x, &batch.t, Condition::Text(batch.text()))
        .expect("forward");
    assert_eq!(out.out.len(), 3 * 4 * 8 * 8);
    assert!(out.out.iter().all(|v| v.is_finite()));
    assert!(
        out.out.iter().any(|v| v.abs() > 1e-3),
        "a randomised model outputs something"
    );
    let blocks: Vec<usize> = out.routing.iter().map(|(i, _)| *i).collect();
    assert_eq!(blocks, vec![1, 3]);
    for (i, stats) in &out.routing {
        // 3 samples x 16 tokens, 4 experts, C = round(2 * 16 / 4) = 8 per sample.
        assert_eq!(stats.tokens_per_expert, vec![24; 4], "block {i}");
        assert_eq!(stats.experts_per_token_hist.iter().sum::<u64>(), 48);
        assert!((stats.mean_experts_per_token - 2.0).abs() < 1e-6);
    }
    // Parameter listing: MoE blocks hold routers and experts, dense ones an MLP.
    let names: Vec<String> = model.param_shapes().into_iter().map(|(n, _)| n).collect();
    for want in [
        "blocks.1.moe.router.weight",
        "blocks.3.moe.experts.fc1.weight",
        "blocks.0.mlp.fc1.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n == "blocks.1.mlp.fc1.weight"));
    // `params()` lists every parameter: MoE routers and experts, and the fixed table last.
    let params = model.params();
    assert!(params
        .iter()
        .any(|p| p.name == "blocks.3.moe.router.weight" && p.shape == [4, 32]));
    assert_eq!(params.last().map(|p| p.name.as_str()), Some("pos_embed"));
    let all: usize = params.iter().map(|p| p.numel()).sum();
    assert_eq!(
        model.num_params(),
        all - 16 * 32,
        "everything but pos_embed is trainable"
    );
    assert!(
        names.iter().any(|n| n == "blocks.0.attn.kv.weight"),
        "GQA uses q/kv projections"
    );
}

/// An EC config whose per-sample products are all past the CPU GEMM's
/// tiny-product kernels (see `per_sample_output_is_bit_identical_for_batch_1_and_3`):
/// 64 tokens per image, 4 experts, so each expert takes C = 32 tokens per image.
fn ec_config_64_tokens(hidden: usize, heads: usize, depth: usize, input_size: usize) -> ModelConfig {
    let mut config = ec_config(json!("per_sample"));
    config.hidden = hidden;
    config.heads = heads;
    config.kv_heads = heads / 2;
    config.depth = depth;
    config.input_size = input_size;
    config
}

/// The forward of `batch` with its MoE blocks' dispatches.
fn forward_with_dispatch(model: &Model, batch: &Batch) -> (Vec<f32>, ModelActs) {
    let mut acts = ModelActs::default();
    let out = model
        .forward(
            &mut acts,
            &batch.x,
            &batch.t,
            Condition::Text(batch.text()),
            ForwardOptions::training(),
        )
        .expect("forward");
    (out.out, acts)
}

/// Asserts that image `i` of `batched` (a forward of `n` images) has the bits
/// and the routing of `alone` (a forward of image i by itself).
fn assert_sample_matches(
    model: &Model,
    batched: &(Vec<f32>, ModelActs),
    alone: &(Vec<f32>, ModelActs),
    i: usize,
    what: &str,
) {
    let c = model.config();
    let per_out = c.out_channels() * c.input_size * c.input_size;
    let tokens = c.tokens();
    let got = &batched.0[i * per_out..(i + 1) * per_out];
    if let Some(k) = (0..per_out).find(|&k| got[k].to_bits() != alone.0[k].to_bits()) {
        panic!(
            "{what}, sample {i}: output [{k}] is {} batched, {} alone (max |diff| {})",
            got[k],
            alone.0[k],
            got.iter().zip(&alone.0).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        );
    }
    let be = model.backend();
    for (block, (bb, ba)) in batched.1.blocks.iter().zip(&alone.1.blocks).enumerate() {
        let (Some(rb), Some(ra)) = (&bb.routing, &ba.routing) else {
            assert!(bb.routing.is_none() && ba.routing.is_none(), "block {block}");
            continue;
        };
        let (db, da) = (
            rb.to_host(be).expect("routing").dispatch,
            ra.to_host(be).expect("routing").dispatch,
        );
        for e in 0..da.experts {
            let mine: Vec<u32> = db
                .expert(e)
                .0
                .iter()
                .filter(|&&t| (t as usize) / tokens == i)
                .map(|&t| t - (i * tokens) as u32)
                .collect();
            assert_eq!(mine, da.expert(e).0, "{what}: block {block} expert {e} sample {i}");
        }
    }
}

/// Per-sample routing (EC-DIT.md section 6): each image's routing and output
/// are those it gets alone, to the bit. Needs every product whose row count
/// grows with the batch to give each row the same bits whatever the row count:
/// the model runs the per-sample conditioning and text products one sample at
/// a time, and the image-token and expert products are row-invariant in the
/// GEMM's blocked kernel. Not covered: per-expert products of C * d <= 256
/// (C tokens per image, e.g. 8 x 32), which the `gemm` crate computes with a
/// different kernel when alone; the config here has C = 32.
#[test]
fn per_sample_output_is_bit_identical_for_batch_1_and_3() {
    let mut model = build(ec_config_64_tokens(32, 4, 4, 16));
    randomise(&mut model, 3);
    let batch = Batch::sized(3, 4, 4 * 16 * 16, TEXT_DIM);
    let batched = forward_with_dispatch(&model, &batch);
    assert_eq!(
        batched.1.blocks[1].routing.as_ref().expect("MoE block").slots(),
        3 * 4 * 32
    );
    for i in 0..3 {
        let alone = forward_with_dispatch(&model, &batch.sample(i));
        assert_sample_matches(&model, &batched, &alone, i, "batch 3 vs 1");
    }
}

/// The same at the S model's shapes (width 384, 6 heads of 64, 256 tokens, 8
/// experts of 4d, C = 64; two blocks), for batches 2 to 4 on 1 and 2 threads:
/// the GEMM may split big products differently with more rows or threads,
/// but never changes a row's summation order.
#[test]
fn per_sample_output_is_bit_identical_at_s_shapes_on_1_and_2_threads() {
    let mut config = ec_config(json!("per_sample"));
    config.hidden = 384;
    config.heads = 6;
    config.kv_heads = 6;
    config.depth = 2;
    config.input_size = 32;
    if let Some(moe) = config.moe.as_mut() {
        moe.experts = 8;
        moe.expert = json!({"kind": "gelu-mlp", "mlp_ratio": 4.0});
    }
    let registry = ecdit_model::registry().expect("registry");
    let batch = Batch::sized(4, 12, 4 * 32 * 32, TEXT_DIM);
    for threads in [1, 2] {
        let backend = Arc::new(CpuBackend::new(threads).expect("cpu backend"));
        let mut model = Model::new(config.clone(), &registry, backend, 5).expect("model");
        randomise(&mut model, 6);
        let alone: Vec<_> = (0..4)
            .map(|i| forward_with_dispatch(&model, &batch.sample(i)))
            .collect();
        for n in 2..=4 {
            let batched = forward_with_dispatch(&model, &batch.samples(0, n));
            for (i, one) in alone.iter().enumerate().take(n) {
                assert_sample_matches(&model, &batched, one, i, &format!("{threads} threads, batch {n}"));
            }
        }
    }
}

#[test]
fn zero_adaln_blocks_are_the_identity() {
    // Fresh init: every block's adaLN (so every gate) and cross-attention proj is zero.
    let mut model = build(ec_config(json!("per_sample")));
    // Give the final layer weights so the output is not trivially zero.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let be = model.backend_arc().clone();
    for p in model.params_mut() {
        if p.name.starts_with("final_layer.") {
            let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.5..0.5)).collect();
            p.load(be.as_ref(), &values).expect("load");
        }
    }
    let batch = Batch::new(2, 5);
    let mut acts = ModelActs::default();
    let out = model
        .forward(
            &mut acts,
            &batch.x,
            &batch.t,
            Condition::Text(batch.text()),
            ForwardOptions::training().with_stats(),
        )
        .expect("forward");
    // The residual stream leaves the blocks exactly as it entered them.
    let be = model.backend();
    let inp = acts.blocks[0].inp.read(be).expect("block input");
    assert_eq!(acts.x.read(be).expect("x"), inp);
    assert_eq!(out.routing.len(), 2, "MoE layers still route");
    // And the output is the final layer applied to the embedded input.
    let mut fin = FinalActs::default();
    model
        .final_layer
        .forward(
            be,
            &mut fin,
            acts.blocks[0].inp.view().expect("inp"),
            acts.silu_c.view().expect("silu_c"),
            2,
            16,
            DType::F32,
        )
        .expect("final layer");
    let mut img = Act::default();
    img.ensure(be, &[2, 4, 8, 8], DType::F32).expect("alloc");
    be.unpatchify(
        img.view_mut().expect("img"),
        fin.out.view().expect("final out"),
        patch_dims(2, 4, 8, 2, true),
    )
    .expect("unpatchify");
    let want = img.read(be).expect("read");
    assert_eq!(out.out, want);
    assert!(want.iter().any(|v| v.abs() > 1e-3));
}

#[test]
fn guidance_keeps_cond_and_uncond_in_separate_routing_groups() {
    let mut model = build(ec_config(json!("batch")));
    randomise(&mut model, 6);
    // Sample 0 conditional, sample 1 its unconditional pass (same image).
    let mut batch = Batch::new(2, 7);
    let per = 4 * 64;
    let first: Vec<f32> = batch.x[..per].to_vec();
    batch.x[per..].copy_from_slice(&first);
    let opts = CfgOptions {
        scale: 3.0,
        channels: CfgChannels::All,
        share_routing_group: false,
    };
    let fwd = ForwardOptions::inference().with_stats();
    let mut acts = ModelActs::default();
    let guided = model
        .forward_with_cfg(&mut acts, &batch.x, &batch.t, Condition::Text(batch.text()), opts, fwd)
        .expect("cfg");
    let cond = batch.sample(0);
    let uncond = batch.sample(1);
    let c = model
        .predict(&cond.x, &cond.t, Condition::Text(cond.text()))
        .expect("cond")
        .out;
    let u = model
        .predict(&uncond.x, &uncond.t, Condition::Text(uncond.text()))
        .expect("uncond")
        .out;
    let want: Vec<f32> = u.iter().zip(&c).map(|(u, c)| u + 3.0 * (c - u)).collect();
    assert_eq!(&guided.out[..per], &want[..]);
    assert_eq!(&guided.out[per..], &want[..]);
    assert_eq!(guided.routing.len(), 4, "two routing calls per MoE layer");
    // The two separate passes share one set of activations, so keeping them
    // for a backward is refused rather than silently keeping the second.
    let err = model
        .forward_with_cfg(
            &mut ModelActs::default(),
            &batch.x,
            &batch.t,
            Condition::Text(batch.text()),
            opts,
            ForwardOptions::training(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("keep"), "{err}");
    // Sharing the group changes the routing, hence the result.
    let shared = model
        .forward_with_cfg(
            &mut acts,
            &batch.x,
            &batch.t,
            Condition::Text(batch.text()),
            CfgOptions {
                share_routing_group: true,
                ..opts
            },
            fwd,
        )
        .expect("cfg shared");
    assert_eq!(shared.routing.len(), 2);
    assert_ne!(shared.out, guided.out);
    // Statistics are downloaded only when asked for.
    let quiet = model
        .forward_with_cfg(
            &mut acts,
            &batch.x,
            &batch.t,
            Condition::Text(batch.text()),
            opts,
            ForwardOptions::inference(),
        )
        .expect("cfg");
    assert!(quiet.routing.is_empty());
    assert_eq!(quiet.out, guided.out);
}

/// Guidance checks the conditions' count before slicing them into halves
/// (the separate-routing path): too few is an error, not a panic.
#[test]
fn guidance_with_too_few_conditions_is_an_error() {
    let model = build(ec_config(json!("batch")));
    let batch = Batch::new(2, 7);
    let one = batch.sample(0);
    let err = model
        .forward_with_cfg(
            &mut ModelActs::default(),
            &batch.x,
            &batch.t,
            Condition::Text(one.text()),
            CfgOptions::default(),
            ForwardOptions::inference(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("conditions [2N]"), "{err}");
}

/// `{"tokens": N}` routing groups that are not whole images fail when the
/// config is validated (and so when a model is built), not at the first forward.
#[test]
fn routing_groups_of_partial_images_fail_at_validation() {
    for tokens in [0, 24] {
        let config = ec_config(json!({"tokens": tokens}));
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("moe.router.groups.tokens") && err.contains("16 tokens"),
            "{err}"
        );
        let registry = ecdit_model::registry().expect("registry");
        let backend = Arc::new(CpuBackend::new(1).expect("cpu backend"));
        assert!(Model::new(config, &registry, backend, 0).is_err());
    }
    assert!(ec_config(json!({"tokens": 32})).validate().is_ok());
}

#[test]
fn same_seed_same_model_and_save_load_round_trip() {
    let a = build(ec_config(json!("per_sample")));
    let b = build(ec_config(json!("per_sample")));
    let pa: Vec<_> = a.param_shapes();
    assert_eq!(pa, b.param_shapes());
    let be = a.backend_arc().clone();
    for (x, y) in a.params().iter().zip(b.params()) {
        let (xd, yd) = (x.to_upstream_f32(be.as_ref()), y.to_upstream_f32(be.as_ref()));
        assert_eq!(xd.expect("read"), yd.expect("read"), "{}", x.name);
    }
    let mut model = a;
    randomise(&mut model, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ec.safetensors");
    model.save(&path).unwrap();
    let registry = ecdit_model::registry().unwrap();
    let back = Model::load(&path, &registry, Arc::new(CpuBackend::new(1).unwrap())).unwrap();
    let batch = Batch::new(2, 10);
    let o1 = model
        .predict(&batch.x, &batch.t, Condition::Text(batch.text()))
        .unwrap();
    let o2 = back.predict(&batch.x, &batch.t, Condition::Text(batch.text())).unwrap();
    assert_eq!(o1.out, o2.out, "router transpose and expert tensors survive save/load");
    assert_eq!(model.num_params(), back.num_params());
}

/// The inference forward (blocks share one set of buffers, attention keeps
/// no probabilities) computes the same ops as the training forward: its
/// output and routing are the bits of the caching forward, with buffers
/// reused across batch sizes.
#[test]
fn inference_forward_has_the_bits_of_the_caching_forward() {
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(2).expect("cpu backend"));
    let mut model = Model::new(ec_config(json!("per_sample")), &registry, backend, 11).expect("model");
    randomise(&mut model, 21);
    let mut buffers = ModelActs::default();
    let batch = Batch::new(3, 22);
    let opts = ForwardOptions::inference().with_stats();
    for b in [batch.samples(0, 3), batch.sample(1), batch.samples(1, 2)] {
        let cond = Condition::Text(b.text());
        let lean = model
            .forward(&mut buffers, &b.x, &b.t, cond, opts)
            .expect("lean forward");
        assert_eq!(buffers.blocks.len(), 1, "one shared block buffer");
        assert!(!buffers.blocks[0].attn.probs.is_set(), "no attention probabilities");
        let full = model
            .forward(
                &mut ModelActs::default(),
                &b.x,
                &b.t,
                cond,
                ForwardOptions::training().with_stats(),
            )
            .expect("caching forward");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&lean.out), bits(&full.out), "batch {}", b.n);
        assert_eq!(lean.routing.len(), 2);
        for ((i, a), (j, f)) in lean.routing.iter().zip(&full.routing) {
            assert_eq!((i, &a.tokens_per_expert), (j, &f.tokens_per_expert), "batch {}", b.n);
        }
    }
}

/// At the S model's shapes (width 384, 256 tokens, 6 heads, 8 experts of 4d;
/// one dense and one MoE block), the inference buffers stay within the
/// `ecdit info` activation estimate plus the attention and MLP scratch the
/// estimate counts per image, and far below what the caching forward holds.
#[test]
fn inference_buffers_hold_about_the_activation_estimate() {
    let mut config = ec_config(json!("per_sample"));
    config.hidden = 384;
    config.heads = 6;
    config.kv_heads = 6;
    config.depth = 2;
    config.input_size = 32;
    if let Some(moe) = config.moe.as_mut() {
        moe.experts = 8;
        moe.expert = json!({"kind": "gelu-mlp", "mlp_ratio": 4.0});
    }
    let registry = ecdit_model::registry().expect("registry");
    let backend = Arc::new(CpuBackend::new(2).expect("cpu backend"));
    let model = Model::new(config.clone(), &registry, backend, 5).expect("model");
    let n = 4;
    let batch = Batch::sized(n, 12, 4 * 32 * 32, TEXT_DIM);
    let cond = Condition::Text(batch.text());
    let mut buffers = ModelActs::default();
    model
        .forward(&mut buffers, &batch.x, &batch.t, cond, ForwardOptions::inference())
        .expect("forward");
    let mut acts = ModelActs::default();
    model
        .forward(&mut acts, &batch.x, &batch.t, cond, ForwardOptions::training())
        .expect("forward");
    let estimate = ecdit_model::info::activation_memory(&registry, &config, n)
        .expect("estimate")
        .inference_bytes as usize;
    let held = buffers.bytes();
    eprintln!("held {held} estimate {estimate}");
    assert!(held <= estimate * 5 / 4, "held {held} B, estimate {estimate} B");
    // Inference buffers are shared by every block: twice the depth holds the
    // same bytes, while a caching forward holds more for every block.
    let mut deeper = config.clone();
    deeper.depth = 4;
    let model = Model::new(deeper, &registry, Arc::new(CpuBackend::new(2).expect("cpu")), 5).expect("model");
    let mut deep_buffers = ModelActs::default();
    model
        .forward(&mut deep_buffers, &batch.x, &batch.t, cond, ForwardOptions::inference())
        .expect("forward");
    assert_eq!(deep_buffers.bytes(), held, "inference buffers grow with depth");
    let mut deep_acts = ModelActs::default();
    model
        .forward(&mut deep_acts, &batch.x, &batch.t, cond, ForwardOptions::training())
        .expect("forward");
    assert!(
        deep_acts.bytes() > acts.bytes() * 3 / 2,
        "a caching forward keeps every block"
    );
}

/// A forward moves only its inputs and its output: on a backend whose
/// buffers the host cannot see, the inference forward of a text-conditioned
/// EC model uploads x, t, the text tokens, mask and pooled text (one upload
/// each) and downloads the prediction once, plus the routing statistics
/// only when asked for them.
#[test]
fn a_forward_transfers_only_its_inputs_and_output() {
    use ecdit_engine::counting::CountingBackend;
    let registry = ecdit_model::registry().expect("registry");
    let cpu = Arc::new(CpuBackend::new(1).expect("cpu backend"));
    let counting = Arc::new(CountingBackend::new(cpu));
    let mut model = Model::new(ec_config(json!("per_sample")), &registry, counting.clone(), 11).expect("model");
    randomise(&mut model, 4);
    let batch = Batch::new(2, 9);
    let mut acts = ModelActs::default();
    let cond = Condition::Text(batch.text());
    // The first call sizes the buffers; count the second (the steady state).
    let first = model
        .forward(&mut acts, &batch.x, &batch.t, cond, ForwardOptions::inference())
        .expect("forward");
    counting.reset();
    let again = model
        .forward(&mut acts, &batch.x, &batch.t, cond, ForwardOptions::inference())
        .expect("forward");
    assert_eq!(first.out, again.out);
    let moved = counting.transfers();
    let floats = batch.x.len() + batch.t.len() + batch.tokens.len() + batch.pooled.len();
    assert_eq!(moved.uploads, 5, "{moved:?}");
    assert_eq!(
        moved.uploaded_bytes as usize,
        4 * floats + batch.mask.len(),
        "{moved:?}"
    );
    assert_eq!(moved.downloads, 1, "{moved:?}");
    assert_eq!(moved.downloaded_bytes as usize, 4 * again.out.len(), "{moved:?}");
}

/// A sampling step keeps the image on the backend: the model reads `x` where
/// it lies and the scheduler steps it in place there, so a step uploads only
/// its small inputs (t, the text condition) and downloads nothing; routing
/// statistics cost one download of tokens, gates and probabilities per MoE
/// layer, only when asked for. The steps give the bits of the host path.
#[test]
fn a_sampling_step_moves_only_its_inputs() {
    use ecdit_engine::counting::CountingBackend;
    let registry = ecdit_model::registry().expect("registry");
    let cpu = Arc::new(CpuBackend::new(1).expect("cpu backend"));
    let counting = Arc::new(CountingBackend::new(cpu));
    let mut model = Model::new(ec_config(json!("per_sample")), &registry, counting.clone(), 11).expect("model");
    randomise(&mut model, 4);
    let scheduler = registry.scheduler(&json!("rectified-flow")).expect("scheduler");
    let batch = Batch::new(2, 9);
    let cond = Condition::Text(batch.text());
    let times = scheduler.sampling_times(3).expect("times");
    let mut x = counting.upload_f32(&[batch.x.len()], &batch.x, DType::F32).expect("x");
    let mut acts = ModelActs::default();
    let mut host_x = batch.x.clone();
    for (step, w) in times.windows(2).enumerate() {
        let t = vec![scheduler.model_time(w[0]).expect("model time"); 2];
        counting.reset();
        let stats = ForwardOptions {
            stats: step == 1,
            ..ForwardOptions::inference()
        };
        let routing = model
            .forward_device(&mut acts, x.view(), &t, cond, stats)
            .expect("forward");
        scheduler
            .step_on(
                counting.as_ref(),
                x.view_mut(),
                acts.prediction().expect("prediction"),
                w[0],
                w[1],
            )
            .expect("step");
        let moved = counting.transfers();
        let text_bytes = 4 * (batch.tokens.len() + batch.pooled.len()) + batch.mask.len();
        assert_eq!(moved.uploads, 4, "step {step}: t, tokens, mask, pooled: {moved:?}");
        assert_eq!(
            moved.uploaded_bytes as usize,
            4 * t.len() + text_bytes,
            "step {step}: {moved:?}"
        );
        if step == 1 {
            assert_eq!(routing.len(), 2);
            assert_eq!(moved.downloads, 3 * 2, "step {step}: one set per MoE layer: {moved:?}");
        } else {
            assert!(routing.is_empty());
            assert_eq!(moved.downloads, 0, "step {step}: {moved:?}");
        }
        // The same step through host slices.
        let v = model
            .forward(
                &mut ModelActs::default(),
                &host_x,
                &t,
                cond,
                ForwardOptions::inference(),
            )
            .expect("host forward")
            .out;
        scheduler.step(&mut host_x, &v, w[0], w[1]).expect("host step");
    }
    assert_eq!(counting.read_f32(x.view()).expect("x"), host_x);
}

/// A bf16 EC model (router logits and routing stay f32) runs the same
/// forward: finite, every MoE layer reporting, close to its f32 self.
#[test]
fn bf16_ec_model_forward_is_finite_and_close_to_f32() {
    let mut model = build(ec_config(json!("per_sample")));
    randomise(&mut model, 31);
    let batch = Batch::new(2, 32);
    let cond = Condition::Text(batch.text());
    let f32_out = model.predict(&batch.x, &batch.t, cond).expect("f32").out;
    model.to_dtype(DType::BF16).expect("bf16");
    for p in model.params() {
        let want = if p.name.ends_with("moe.router.weight") {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(p.dtype(), want, "{}: router weights stay f32, the rest is bf16", p.name);
    }
    let out = model.predict(&batch.x, &batch.t, cond).expect("bf16 forward");
    assert!(out.out.iter().all(|v| v.is_finite()));
    assert_eq!(out.routing.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 3]);
    // Loose: bf16 rounding may move a token to another expert.
    let norm = |v: &[f32]| v.iter().map(|a| (a * a) as f64).sum::<f64>().sqrt();
    let err: Vec<f32> = out.out.iter().zip(&f32_out).map(|(b, f)| b - f).collect();
    let rel = norm(&err) / norm(&f32_out);
    assert!(rel < 0.1, "relative L2 error {rel}");
    // Saved in bf16, reloaded as a bf16 model with the same bits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bf16.safetensors");
    model.save(&path).expect("save");
    let registry = ecdit_model::registry().unwrap();
    let back = Model::load(&path, &registry, Arc::new(CpuBackend::new(1).unwrap())).expect("load");
    assert_eq!(back.dtype(), DType::BF16);
    let again = back.predict(&batch.x, &batch.t, cond).expect("forward");
    assert_eq!(again.out, out.out);
}
