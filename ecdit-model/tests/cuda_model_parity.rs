//! The whole EC-DiT model on the CUDA backend against the CPU backend, and its
//! speed. Every test needs a CUDA GPU, so all are `#[ignore]`d;
//! scripts/gpu-check.sh runs them (`--ignored --nocapture --test-threads=1`).
//!
//! - parity: a small text-conditioned EC-DiT (grouped-query attention, a padded
//!   prompt, pooled text, expert-choice MoE in every other block) with every
//!   weight random, run on both backends: the inference forward in f32 and in
//!   bf16 storage, and a training step (training forward, backward, AdamW and
//!   RMSProp steps) in f32. Lines `PARITY model_<what> <dtype> <err> <tol> -`.
//! - residency: a forward on the CUDA backend moves exactly the bytes the CPU
//!   backend's does (inputs up, prediction down), counted by the engine's
//!   transfer-counting wrapper.
//! - speed: an EC-DiT-XL-8E forward (d = 1152, 28 layers, 256 tokens per
//!   image) in bf16, in images/s and MFU against the card's bf16 matrix peak
//!   measured in the same run, and the EC layer against a dense FFN of equal
//!   FLOPs. Lines `BENCH <what> <value> <unit>`. `ECDIT_BENCH_BATCH` (default
//!   32) and `ECDIT_BENCH_REPS` (default 10) size the runs.

use ecdit_backend_cpu::CpuBackend;
use ecdit_backend_cuda::CudaBackend;
use ecdit_engine::counting::CountingBackend;
use ecdit_engine::{Backend, BackendExt, DType, GemmDims, Init, MoeCache, MoeLayer, RouteShape, TensorRef, Unary};
use ecdit_model::config::{Conditioning, ModelConfig};
use ecdit_model::model::{Backprop, BackwardOptions, Condition, ForwardOptions, Grads, Model, ModelActs, TextInput};
use ecdit_model::train::config::OptimizerConfig;
use ecdit_model::train::optimizer::Optimizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

const TEXT_DIM: usize = 24;
const TEXT_LEN: usize = 5;
const BATCH: usize = 2;

fn small_config() -> ModelConfig {
    serde_json::from_value(json!({
        "name": "cuda-parity", "input_size": 16, "patch_size": 2, "in_channels": 4, "learn_sigma": true,
        "hidden": 96, "depth": 4, "heads": 6, "kv_heads": 2, "mlp_ratio": 4.0,
        "conditioning": {"text": {"text_dim": TEXT_DIM, "max_tokens": TEXT_LEN, "dropout": 0.1, "pooled": true}},
        "moe": {"experts": 4, "every": 2, "first": 1,
                "router": {"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"},
                "expert": {"kind": "gelu-mlp", "mlp_ratio": 4.0}},
        "scheduler": {"kind": "rectified-flow"}
    }))
    .expect("config")
}

fn cuda() -> Arc<dyn Backend> {
    Arc::new(CudaBackend::new(0, false).expect("a CUDA backend on this machine"))
}

/// The small model on `backend`, every trainable weight redrawn from one seed
/// (so both backends hold the same values), in `dtype`.
fn small_model(backend: Arc<dyn Backend>, dtype: DType) -> Model {
    let registry = ecdit_model::registry().expect("registry");
    let mut model = Model::new(small_config(), &registry, backend.clone(), 3).expect("model");
    let mut rng = StdRng::seed_from_u64(5);
    for p in model.params_mut() {
        if p.init != Init::Fixed {
            let values: Vec<f32> = (0..p.numel()).map(|_| rng.gen_range(-0.25..0.25)).collect();
            p.load(backend.as_ref(), &values).expect("load");
        }
    }
    model.to_dtype(dtype).expect("dtype");
    model
}

struct Inputs {
    x: Vec<f32>,
    t: Vec<f32>,
    tokens: Vec<f32>,
    mask: Vec<u8>,
    pooled: Vec<f32>,
}

impl Inputs {
    fn new() -> Self {
        let cfg = small_config();
        let mut rng = StdRng::seed_from_u64(9);
        let mut uniform = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let image = cfg.in_channels * cfg.input_size * cfg.input_size;
        let mut mask = vec![1u8; BATCH * TEXT_LEN];
        mask[2 * TEXT_LEN - 2..].fill(0); // the second prompt is two tokens shorter
        Self {
            x: uniform(BATCH * image),
            t: vec![0.25, 0.8],
            tokens: uniform(BATCH * TEXT_LEN * TEXT_DIM),
            mask,
            pooled: uniform(BATCH * TEXT_DIM),
        }
    }

    fn cond(&self) -> Condition<'_> {
        Condition::Text(TextInput {
            tokens: &self.tokens,
            mask: &self.mask,
            pooled: &self.pooled,
            batch: BATCH,
            len: TEXT_LEN,
            dim: TEXT_DIM,
        })
    }
}

/// Max of `|got - want| / max(|want|, 1)`, and whether a NaN turned up.
fn max_rel(got: &[f32], want: &[f32]) -> (f32, bool) {
    assert_eq!(got.len(), want.len(), "lengths");
    let nan = got.iter().zip(want).any(|(g, w)| g.is_nan() != w.is_nan());
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0f32, f32::max);
    (err, nan)
}

/// `||got - want|| / ||want||`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Routing slots whose token differs between the two backends, over every MoE layer.
fn routing_differences(
    a: &Model,
    ra: &[(usize, Arc<ecdit_engine::DeviceRouting>)],
    b: &Model,
    rb: &[(usize, Arc<ecdit_engine::DeviceRouting>)],
) -> usize {
    ra.iter()
        .zip(rb)
        .map(|((_, x), (_, y))| {
            let tx = a.backend().read_u32(x.tokens.view()).unwrap();
            let ty = b.backend().read_u32(y.tokens.view()).unwrap();
            tx.iter().zip(&ty).filter(|(p, q)| p != q).count()
        })
        .sum()
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn model_forward_matches_the_cpu_in_f32_and_bf16() {
    let inp = Inputs::new();
    let mut failures = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let gpu = small_model(cuda(), dtype);
        let host = small_model(Arc::new(CpuBackend::new(2).unwrap()), dtype);
        let (mut ga, mut ha) = (ModelActs::default(), ModelActs::default());
        let opts = ForwardOptions::inference();
        let got = gpu
            .forward(&mut ga, &inp.x, &inp.t, inp.cond(), opts)
            .expect("cuda forward");
        let want = host
            .forward(&mut ha, &inp.x, &inp.t, inp.cond(), opts)
            .expect("cpu forward");
        // The training forward too (attention keeps its probabilities), and the routing.
        let rg = gpu.forward_train(&mut ga, &inp.x, &inp.t, inp.cond(), None).unwrap();
        let rh = host.forward_train(&mut ha, &inp.x, &inp.t, inp.cond(), None).unwrap();
        let flips = routing_differences(&gpu, &rg, &host, &rh);
        let pg = gpu.backend().read_f32(ga.patch_prediction().unwrap()).unwrap();
        let ph = host.backend().read_f32(ha.patch_prediction().unwrap()).unwrap();
        let (tol, metric) = if dtype == DType::F32 {
            (1e-4, "max_rel")
        } else {
            (1e-2, "rel_l2")
        };
        for (what, g, w) in [("inference", &got.out, &want.out), ("training", &pg, &ph)] {
            let (m, nan) = max_rel(g, w);
            let err = if dtype == DType::F32 { m as f64 } else { rel_l2(g, w) };
            println!("PARITY model_forward_{what} {dtype} {err:.2e} {tol:.0e} routing_flips={flips} ({metric})");
            if nan || err > tol {
                failures.push(format!(
                    "{what} {dtype}: {metric} {err:.3e} > {tol:.0e} (NaN: {nan}; routing slots that differ: {flips})"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What a training step leaves: the prediction, every gradient by name, the
/// trainable parameters after the optimiser step.
struct StepResult {
    prediction: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    params_after: Vec<Vec<f32>>,
}

/// Forward, backward and an optimiser step; returns (prediction, grads by name, params after).
fn train_step(model: &mut Model, inp: &Inputs, r: &[f32], optimizer: OptimizerConfig) -> StepResult {
    let backend = model.backend_arc().clone();
    let be = backend.as_ref();
    let mut acts = ModelActs::default();
    model
        .forward_train(&mut acts, &inp.x, &inp.t, inp.cond(), None)
        .expect("forward");
    let pred_view: TensorRef<'_> = acts.patch_prediction().unwrap();
    let pred = be.read_f32(pred_view).unwrap();
    let shape = pred_view.shape().to_vec();
    let dout = be.upload_f32(&shape, r, DType::F32).unwrap();
    let mut grads = Grads::new(be, &model.params()).unwrap();
    let mut bp = Backprop::default();
    let opts = BackwardOptions {
        input_grad: true,
        grad_aux: 1.0,
    };
    model
        .backward(&acts, &mut bp, &mut grads, dout.view(), opts)
        .expect("backward");
    let by_name: Vec<(String, Vec<f32>)> = grads
        .names()
        .iter()
        .map(|n| (n.clone(), be.read_f32(grads.get(n).unwrap()).unwrap()))
        .collect();
    let trainable: Vec<String> = model
        .params()
        .iter()
        .filter(|p| p.init != Init::Fixed && grads.get(&p.name).is_ok())
        .map(|p| p.name.clone())
        .collect();
    let mut opt = {
        let params: Vec<&ecdit_engine::Param> = model
            .params()
            .into_iter()
            .filter(|p| trainable.contains(&p.name))
            .collect();
        Optimizer::new(be, optimizer, &params).unwrap()
    };
    let params_mut: Vec<&mut ecdit_engine::Param> = model
        .params_mut()
        .into_iter()
        .filter(|p| trainable.contains(&p.name))
        .collect();
    opt.step(be, params_mut, &grads, 1e-5).expect("optimizer step");
    let after = model
        .params()
        .iter()
        .filter(|p| trainable.contains(&p.name))
        .map(|p| be.read_f32(p.tensor.view()).unwrap())
        .collect();
    StepResult {
        prediction: pred,
        grads: by_name,
        params_after: after,
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn training_step_matches_the_cpu() {
    let inp = Inputs::new();
    let cfg = small_config();
    let n_out = BATCH * cfg.tokens() * cfg.patch_size * cfg.patch_size * cfg.out_channels();
    let mut rng = StdRng::seed_from_u64(17);
    let r: Vec<f32> = (0..n_out).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut failures = Vec::new();
    let optimizers: [(&str, OptimizerConfig); 2] = [
        (
            "adamw",
            serde_json::from_value(json!({"kind": "adamw", "lr": 1e-5, "weight_decay": 0.01})).unwrap(),
        ),
        (
            "rmsprop",
            serde_json::from_value(json!({"kind": "rmsprop", "lr": 1e-5})).unwrap(),
        ),
    ];
    for (name, opt) in optimizers {
        let (mut gpu, mut host) = (
            small_model(cuda(), DType::F32),
            small_model(Arc::new(CpuBackend::new(2).unwrap()), DType::F32),
        );
        let StepResult {
            prediction: pg,
            grads: gg,
            params_after: ag,
        } = train_step(&mut gpu, &inp, &r, opt);
        let StepResult {
            prediction: ph,
            grads: gh,
            params_after: ah,
        } = train_step(&mut host, &inp, &r, opt);
        let tol = 1e-4f32;
        let mut check = |what: String, g: &[f32], w: &[f32]| {
            let (err, nan) = max_rel(g, w);
            if nan || err > tol {
                failures.push(format!("{what}: {err:.3e} (NaN: {nan})"));
            }
            err
        };
        let e_pred = check(format!("{name} prediction"), &pg, &ph);
        let mut e_grad = 0.0f32;
        for ((n, g), (_, w)) in gg.iter().zip(&gh) {
            e_grad = e_grad.max(check(format!("{name} grad {n}"), g, w));
        }
        let mut e_param = 0.0f32;
        for (i, (g, w)) in ag.iter().zip(&ah).enumerate() {
            e_param = e_param.max(check(format!("{name} param #{i} after the step"), g, w));
        }
        println!("PARITY model_train_prediction({name}) f32 {e_pred:.2e} {tol:.0e} -");
        println!(
            "PARITY model_train_grads({name}) f32 {e_grad:.2e} {tol:.0e} {}_tensors",
            gg.len()
        );
        println!(
            "PARITY model_train_params_after_step({name}) f32 {e_param:.2e} {tol:.0e} {}_tensors",
            ag.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The CUDA forward moves what the CPU forward moves, and nothing more: its
/// inputs up, its prediction down (the routers run on the device).
#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn a_forward_moves_only_its_inputs_and_output() {
    let inp = Inputs::new();
    let mut counts = Vec::new();
    for inner in [cuda(), Arc::new(CpuBackend::new(2).unwrap()) as Arc<dyn Backend>] {
        let counting = Arc::new(CountingBackend::new(inner));
        let model = small_model(counting.clone(), DType::BF16);
        let mut acts = ModelActs::default();
        model
            .forward(&mut acts, &inp.x, &inp.t, inp.cond(), ForwardOptions::inference())
            .unwrap();
        counting.reset();
        model
            .forward(&mut acts, &inp.x, &inp.t, inp.cond(), ForwardOptions::inference())
            .unwrap();
        counts.push(counting.transfers());
    }
    println!("TRANSFERS cuda {:?}", counts[0]);
    println!("TRANSFERS cpu  {:?}", counts[1]);
    assert_eq!(
        counts[0], counts[1],
        "the CUDA forward moves other bytes than the CPU forward"
    );
    assert_eq!(counts[0].downloads, 1, "one download: the prediction");
    println!(
        "PARITY model_forward_transfers bf16 0 0 {}_up/{}_down",
        counts[0].uploads, counts[0].downloads
    );
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Waits for `be`'s queue: a download of one element (the CUDA backend's
/// downloads synchronise its one stream, whatever tensor they read).
fn sync(be: &dyn Backend, t: TensorRef<'_>) {
    be.read_f32(t.flat(0, 1).unwrap()).unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Best bf16 GFLOP/s of the backend's product over `shapes` (m, n, k), nt layout.
fn bf16_peak_gflops(be: &dyn Backend, shapes: &[(usize, usize, usize)], reps: usize) -> (f64, (usize, usize, usize)) {
    let mut best = (0.0, (0, 0, 0));
    for &(m, n, k) in shapes {
        let a = be.upload_f32(&[m, k], &vec![0.01; m * k], DType::BF16).unwrap();
        let b = be.upload_f32(&[n, k], &vec![0.02; n * k], DType::BF16).unwrap();
        let mut out = be.zeros(&[m, n], DType::BF16).unwrap();
        let dims = GemmDims::nt(m, n, k);
        for _ in 0..3 {
            be.gemm(out.view_mut(), a.view(), b.view(), None, dims, 1.0, 0.0)
                .unwrap();
        }
        sync(be, out.view());
        let start = Instant::now();
        for _ in 0..reps {
            be.gemm(out.view_mut(), a.view(), b.view(), None, dims, 1.0, 0.0)
                .unwrap();
        }
        sync(be, out.view());
        let gflops = dims.flops() * reps as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("BENCH gemm_bf16_{m}x{n}x{k} {gflops:.0} GFLOP/s");
        if gflops > best.0 {
            best = (gflops, (m, n, k));
        }
    }
    best
}

/// EC-DiT-XL-8E with `text_len` text tokens, as benches/reference/forward_torch.py builds it.
fn xl_config(text_len: usize) -> ModelConfig {
    let mut cfg: ModelConfig =
        serde_json::from_str(include_str!("../../configs/paper/ec-dit-xl-8e.json")).expect("xl config");
    if let Conditioning::Text { max_tokens, .. } = &mut cfg.conditioning {
        *max_tokens = text_len;
    }
    cfg
}

#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn bench_ec_dit_xl_forward_bf16() {
    let (batch, reps, text_len) = (
        env_usize("ECDIT_BENCH_BATCH", 32),
        env_usize("ECDIT_BENCH_REPS", 10),
        16,
    );
    let cuda = Arc::new(CudaBackend::new(0, false).unwrap());
    println!(
        "BENCH device {}",
        cuda.device_name().unwrap_or_default().replace(' ', "_")
    );
    let be: Arc<dyn Backend> = cuda;
    let registry = ecdit_model::registry().unwrap();
    let cfg = xl_config(text_len);
    let flops_per_image = ecdit_model::info::flops_per_image(&registry, &cfg).unwrap().total();
    let start = Instant::now();
    let mut model = Model::new(cfg.clone(), &registry, be.clone(), 0).expect("xl model");
    model.to_dtype(DType::BF16).unwrap();
    println!("BENCH xl_model_build {:.1} s", start.elapsed().as_secs_f64());

    let mut rng = StdRng::seed_from_u64(1);
    let mut uniform = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
    let text_dim = match cfg.conditioning {
        Conditioning::Text { text_dim, .. } => text_dim,
        Conditioning::Class { .. } => unreachable!("the XL config is text-conditioned"),
    };
    let x = uniform(batch * cfg.in_channels * cfg.input_size * cfg.input_size);
    let t: Vec<f32> = (0..batch).map(|i| (i as f32 + 0.5) / batch as f32).collect();
    let tokens = uniform(batch * text_len * text_dim);
    let pooled = uniform(batch * text_dim);
    let mask = vec![1u8; batch * text_len];
    let cond = Condition::Text(TextInput {
        tokens: &tokens,
        mask: &mask,
        pooled: &pooled,
        batch,
        len: text_len,
        dim: text_dim,
    });
    let mut acts = ModelActs::default();
    let run = ForwardOptions::inference();
    for _ in 0..2 {
        model.forward(&mut acts, &x, &t, cond, run).expect("warm-up forward");
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let out = model.forward(&mut acts, &x, &t, cond, run).expect("forward");
        times.push(start.elapsed().as_secs_f64());
        assert!(out.out.iter().all(|v| v.is_finite()), "non-finite output");
    }
    let sec = median(&mut times);
    let achieved = flops_per_image * batch as f64 / sec / 1e9;
    let d = cfg.hidden;
    let m = batch * cfg.tokens();
    let mut shapes = ecdit_model::bench_forward::peak_shapes(&cfg, batch);
    shapes.push((8192, 8192, 8192));
    let (peak, at) = bf16_peak_gflops(be.as_ref(), &shapes, 20);
    println!("BENCH xl_forward_batch {batch} images");
    println!("BENCH xl_forward_ms {:.2} ms", sec * 1e3);
    println!("BENCH xl_forward_images_per_s {:.1} images/s", batch as f64 / sec);
    println!("BENCH xl_forward_tflops {:.1} TFLOP/s", achieved / 1e3);
    println!(
        "BENCH bf16_matmul_peak {:.1} TFLOP/s at {}x{}x{}",
        peak / 1e3,
        at.0,
        at.1,
        at.2
    );
    println!("BENCH xl_forward_mfu {:.1} %", 100.0 * achieved / peak);
    println!("BENCH xl_tokens {m} (d = {d})");
}

/// One EC MoE layer (8 experts of width 4d, capacity factor 2, per-sample
/// groups) against a dense GELU FFN of width 8d on the same tokens: equal FLOPs.
#[test]
#[ignore = "needs a CUDA GPU; run scripts/gpu-check.sh"]
fn bench_ec_layer_against_dense_ffn_bf16() {
    let (batch, reps) = (
        env_usize("ECDIT_BENCH_BATCH", 32),
        env_usize("ECDIT_BENCH_REPS", 10) * 2,
    );
    let (d, tpi, experts) = (1152usize, 256usize, 8usize);
    let tokens = batch * tpi;
    let be: Arc<dyn Backend> = cuda();
    let be = be.as_ref();
    let registry = ecdit_model::registry().unwrap();
    let dt = DType::BF16;
    let mut rng = StdRng::seed_from_u64(3);
    let mut draw = |n: usize, s: f32| (0..n).map(|_| rng.gen_range(-s..s)).collect::<Vec<f32>>();
    let x = be.upload_f32(&[tokens, d], &draw(tokens * d, 1.7), dt).unwrap();

    let router = registry
        .router(&json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"}))
        .unwrap();
    let expert = registry.expert(&json!({"kind": "gelu-mlp", "mlp_ratio": 4.0})).unwrap();
    let mut rng2 = StdRng::seed_from_u64(4);
    let layer = MoeLayer::new_random(router, expert, d, experts, be, dt, "", &mut rng2).unwrap();
    let shape = RouteShape {
        samples: batch,
        tokens_per_sample: tpi,
        experts,
    };
    let mut moe_out = be.zeros(&[tokens, d], dt).unwrap();
    let mut cache = MoeCache::default();

    // Dense FFN of equal FLOPs: d -> 8d -> d, input-major weights, fused biases.
    let h = 8 * d;
    let bound = (6.0 / (d + 4 * d) as f32).sqrt();
    let w1 = be.upload_f32(&[d, h], &draw(d * h, bound), dt).unwrap();
    let b1 = be.upload_f32(&[h], &vec![0.0; h], dt).unwrap();
    let w2 = be.upload_f32(&[h, d], &draw(h * d, bound), dt).unwrap();
    let b2 = be.upload_f32(&[d], &vec![0.0; d], dt).unwrap();
    let (mut pre, mut act, mut dense_out) = (
        be.zeros(&[tokens, h], dt).unwrap(),
        be.zeros(&[tokens, h], dt).unwrap(),
        be.zeros(&[tokens, d], dt).unwrap(),
    );

    // Downloading anything waits for the whole stream.
    let marker = be.zeros(&[1], DType::F32).unwrap();
    let mut run_moe = || {
        layer
            .forward(be, moe_out.view_mut(), &mut cache, false, x.view(), shape)
            .unwrap();
    };
    let mut run_dense = || {
        be.gemm(
            pre.view_mut(),
            x.view(),
            w1.view(),
            Some(b1.view()),
            GemmDims::nn(tokens, h, d),
            1.0,
            0.0,
        )
        .unwrap();
        be.unary(Unary::GeluTanh, act.view_mut(), pre.view()).unwrap();
        be.gemm(
            dense_out.view_mut(),
            act.view(),
            w2.view(),
            Some(b2.view()),
            GemmDims::nn(tokens, d, h),
            1.0,
            0.0,
        )
        .unwrap();
    };
    for _ in 0..3 {
        run_moe();
        run_dense();
    }
    sync(be, marker.view());
    let (mut moe_t, mut dense_t) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..reps {
            run_moe();
        }
        sync(be, marker.view());
        moe_t.push(start.elapsed().as_secs_f64() / reps as f64);
        let start = Instant::now();
        for _ in 0..reps {
            run_dense();
        }
        sync(be, marker.view());
        dense_t.push(start.elapsed().as_secs_f64() / reps as f64);
    }
    let (moe_ms, dense_ms) = (median(&mut moe_t) * 1e3, median(&mut dense_t) * 1e3);
    let flops = 2.0 * 2.0 * (tokens * d * h) as f64; // two products of the dense FFN
    println!("BENCH ec_layer_ms {moe_ms:.3} ms ({tokens} tokens, d = {d}, E = {experts}, f_c = 2)");
    println!("BENCH dense_ffn_equal_flops_ms {dense_ms:.3} ms (hidden {h})");
    println!("BENCH ec_over_dense {:.2} x", moe_ms / dense_ms);
    println!("BENCH ec_layer_tflops {:.1} TFLOP/s", flops / (moe_ms * 1e-3) / 1e12);
}
