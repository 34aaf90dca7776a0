//! `ecdit bench moe`: one MoE layer's forward beside a dense FFN of the same
//! FLOPs, per router.
//!
//! The default setting is DiT-S/2 at batch 8: d = 384, 256 tokens per image,
//! E = 8 GELU experts of width 4d, each router tuned to two experts per token
//! on average (expert choice f_c = 2, token choice k = 2, expert race k = 2).
//! The dense FFN of equal FLOPs is a GELU MLP of width 2 x 4d on all tokens
//! at once (no router, gather or scatter): two GEMMs on input-major weights
//! with the bias fused, as the experts read theirs, so the ratio is the whole
//! price of routing. The `dense` router is timed as the MoE layer with one
//! expert of width 2 x 4d holding the very same weights, i.e. the dense FFN
//! through the MoE plumbing. Weights and activations are stored in the
//! configured dtype (f32 or bf16) on both sides.
//!
//! Each router's runs are interleaved with dense runs after warm-up, in pairs
//! whose order alternates (MoE dense, dense MoE, ...), so drift in machine
//! load and cache warmth hit both sides alike; medians are reported,
//! plus the median of the per-pair ratios (each MoE run over the dense run
//! right after it) and the fastest run of each side, which on a shared,
//! loaded machine say more than the ratio of two medians.

use ecdit_engine::{
    Backend, BackendExt, DType, EngineError, Expert, GemmDims, Init, Layout, MoeCache, MoeLayer, Param, Registry,
    Result, RouteShape, Tensor, TensorMut, TensorRef, Unary,
};
use ecdit_routers::experts::GeluMlp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Instant;

/// The layer and batch a MoE benchmark runs.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeBenchConfig {
    /// Model width d.
    pub d: usize,
    /// Tokens per image.
    pub tokens_per_sample: usize,
    /// Images in the batch.
    pub samples: usize,
    /// Experts per MoE layer (the `dense` router always uses 1).
    pub experts: usize,
    /// Hidden width of one expert as a multiple of d.
    pub mlp_ratio: f64,
    /// Experts per token on average: the dense FFN is `active_experts` times
    /// wider than one expert, and the `dense` router's single expert too.
    pub active_experts: f64,
    /// Untimed runs of each side before timing.
    pub warmup: usize,
    /// Storage dtype of weights and activations (f32 or bf16).
    pub dtype: DType,
}

impl Default for MoeBenchConfig {
    /// DiT-S/2 at batch 8 with 8 experts, two active per token.
    fn default() -> Self {
        Self {
            d: 384,
            tokens_per_sample: 256,
            samples: 8,
            experts: 8,
            mlp_ratio: 4.0,
            active_experts: 2.0,
            warmup: 2,
            dtype: DType::F32,
        }
    }
}

/// One router's timing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoeBenchRecord {
    /// Router kind.
    pub router: String,
    /// The router's full spec.
    pub spec: Value,
    /// Median milliseconds of one MoE layer forward (router, gather, experts, combine).
    pub ms: f64,
    /// Median milliseconds of the dense FFN of equal FLOPs, timed interleaved.
    pub dense_ms: f64,
    /// `ms / dense_ms`.
    pub ratio: f64,
    /// Median over reps of one MoE run's time over the dense run right after
    /// it: robust to slow drift in machine load.
    pub pair_ratio: f64,
    /// Fastest MoE run, milliseconds (closest to an unloaded machine).
    pub min_ms: f64,
    /// Fastest dense run, milliseconds.
    pub dense_min_ms: f64,
    /// Expert rows processed per token on average (2.0 for the defaults).
    pub slots_per_token: f64,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Backend threads.
    pub threads: usize,
    /// Storage dtype of weights and activations.
    pub dtype: String,
}

/// The routers `ecdit bench moe` times by default.
pub fn default_routers() -> Vec<Value> {
    vec![
        json!({"kind": "expert-choice", "capacity_factor": 2.0, "groups": "per_sample"}),
        json!({"kind": "token-choice", "k": 2, "groups": "per_sample"}),
        json!({"kind": "expert-race", "k": 2.0, "groups": "per_sample"}),
        json!({"kind": "dense"}),
    ]
}

/// Times each router with [`MoeBenchConfig::default`], `reps` timed runs each.
pub fn bench_moe(
    registry: &Registry,
    backend: &dyn Backend,
    routers: &[Value],
    reps: usize,
) -> Result<Vec<MoeBenchRecord>> {
    bench_moe_with(registry, backend, routers, reps, &MoeBenchConfig::default())
}

/// Times each router on the layer `cfg` describes, `reps` timed runs (at least 1).
pub fn bench_moe_with(
    registry: &Registry,
    backend: &dyn Backend,
    routers: &[Value],
    reps: usize,
    cfg: &MoeBenchConfig,
) -> Result<Vec<MoeBenchRecord>> {
    let d = cfg.d;
    let tokens = cfg.samples * cfg.tokens_per_sample;
    let dtype = cfg.dtype;
    if !dtype.is_float() || !backend.supports(dtype) {
        return Err(EngineError::param(
            "bench moe",
            "dtype",
            dtype,
            format!("backend '{}' cannot store float tensors in it", backend.name()),
        ));
    }
    let mut rng = StdRng::seed_from_u64(0x0ec0_0d17);
    // x: [T, d], as the layer norm hands it over.
    let x_host: Vec<f32> = (0..tokens * d).map(|_| rng.gen_range(-1.7f32..1.7)).collect();
    let x = backend.upload_f32(&[tokens, d], &x_host, dtype)?;

    // The dense FFN of equal FLOPs: one GELU MLP active_experts times wider.
    let dense_ratio = cfg.mlp_ratio * cfg.active_experts;
    let dense_h = hidden_width(dense_ratio, d);
    // Its matrices are drawn like the experts' (xavier-uniform of one expert's
    // [h, d]), as if two experts were stacked: the GELU's cost in libm depends on
    // the range of its inputs, so a differently scaled dense FFN would do
    // different work per element.
    let expert_h = hidden_width(cfg.mlp_ratio, d);
    let bound = (6.0 / (d + expert_h) as f32).sqrt();
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
    // Upstream layout: fc1.weight [h, d], fc2.weight [d, h]; biases start at zero.
    let dense_values = [draw(dense_h * d), vec![0.0; dense_h], draw(d * dense_h), vec![0.0; d]];
    let dense = DenseFfn::new(backend, d, dense_h, dtype, &dense_values)?;
    let mut dense_bufs = dense.buffers(backend, tokens)?;
    let mut dense_out = backend.zeros(&[tokens, d], dtype)?;
    let mut run_dense = || dense.forward(backend, dense_out.view_mut(), &mut dense_bufs, x.view());

    let mut records = Vec::with_capacity(routers.len());
    for spec in routers {
        let router = registry.router(spec)?;
        let kind = router.kind().to_string();
        let (experts, ratio) = if kind == "dense" {
            (1, dense_ratio)
        } else {
            (cfg.experts, cfg.mlp_ratio)
        };
        let expert = registry.expert(&json!({"kind": GeluMlp::KIND, "mlp_ratio": ratio}))?;
        let layer = if kind == "dense" {
            // The very FFN of the dense side, behind the MoE plumbing: its
            // single expert's [1, ...] tensors take the dense tensors as held
            // in memory (both input-major), copied on the backend.
            let mut layer = MoeLayer::new(router, expert, d, 1, backend, dtype, "")?;
            for (p, src) in layer.params.iter_mut().zip(dense.params()) {
                let (want, got) = (p.memory_shape(), src.memory_shape());
                if want[1..] != got[..] {
                    return Err(EngineError::shape(
                        format!("bench moe: dense expert parameter '{}'", p.name),
                        format!("{:?} in memory", [&[1], &got[..]].concat()),
                        format!("{want:?}"),
                    ));
                }
                backend.copy(p.tensor.view_mut(), src.tensor.view())?;
            }
            layer
        } else {
            MoeLayer::new_random(router, expert, d, experts, backend, dtype, "", &mut rng)?
        };
        let shape = RouteShape {
            samples: cfg.samples,
            tokens_per_sample: cfg.tokens_per_sample,
            experts,
        };
        let mut out = backend.zeros(&[tokens, d], dtype)?;
        // The cache keeps the layer's buffers between runs, as the dense side
        // keeps its own. An inference forward (nothing kept for a backward),
        // as the dense side runs: both fuse their first layer's bias and GELU.
        let mut cache = MoeCache::default();
        let mut run_moe = || layer.forward(backend, out.view_mut(), &mut cache, false, x.view(), shape);

        let mut slots = 0;
        for _ in 0..cfg.warmup {
            slots = run_moe()?.slots();
            run_dense()?;
        }
        let mut moe_times = Vec::with_capacity(reps.max(1));
        let mut dense_times = Vec::with_capacity(reps.max(1));
        for rep in 0..reps.max(1) {
            // Alternate which side goes first (MoE dense, dense MoE, ...), so
            // neither always runs on caches the other just filled.
            let moe_first = rep % 2 == 0;
            if moe_first {
                let start = Instant::now();
                slots = run_moe()?.slots();
                moe_times.push(start.elapsed().as_secs_f64());
            }
            let start = Instant::now();
            run_dense()?;
            dense_times.push(start.elapsed().as_secs_f64());
            if !moe_first {
                let start = Instant::now();
                slots = run_moe()?.slots();
                moe_times.push(start.elapsed().as_secs_f64());
            }
        }
        let mut pair_ratios: Vec<f64> = moe_times.iter().zip(&dense_times).map(|(m, d)| m / d).collect();
        let pair_ratio = median(&mut pair_ratios);
        let (ms, dense_ms) = (median(&mut moe_times) * 1e3, median(&mut dense_times) * 1e3);
        let (min_ms, dense_min_ms) = (moe_times[0] * 1e3, dense_times[0] * 1e3);
        records.push(MoeBenchRecord {
            router: kind,
            spec: layer.router.spec(),
            ms,
            dense_ms,
            ratio: ms / dense_ms,
            pair_ratio,
            min_ms,
            dense_min_ms,
            slots_per_token: slots as f64 / tokens.max(1) as f64,
            tokens,
            threads: backend.threads(),
            dtype: dtype.to_string(),
        });
    }
    Ok(records)
}

/// A dense GELU MLP `d -> h -> d` (DiT's FFN): weights input-major (memory
/// `[in, out]`, as the experts hold theirs), biases fused into the GEMMs.
struct DenseFfn {
    fc1_weight: Param,
    fc1_bias: Param,
    fc2_weight: Param,
    fc2_bias: Param,
    hidden: usize,
    d: usize,
}

/// The dense FFN's hidden activations after the GELU: [T, h].
struct DenseBuffers {
    act: Tensor,
}

impl DenseFfn {
    /// An MLP holding `values` (upstream layout: fc1.weight [h, d], fc1.bias,
    /// fc2.weight [d, h], fc2.bias) in `dtype`.
    fn new(backend: &dyn Backend, d: usize, hidden: usize, dtype: DType, values: &[Vec<f32>; 4]) -> Result<Self> {
        let weight = |name: &str, out_f: usize, in_f: usize| {
            let init = Init::XavierUniform {
                fan_in: in_f,
                fan_out: out_f,
            };
            Param::new(backend, name, &[out_f, in_f], dtype, Layout::InputMajor, init)
        };
        let bias = |name: &str, n: usize| Param::new(backend, name, &[n], dtype, Layout::AsStored, Init::Zeros);
        let mut ffn = Self {
            fc1_weight: weight("mlp.fc1.weight", hidden, d)?,
            fc1_bias: bias("mlp.fc1.bias", hidden)?,
            fc2_weight: weight("mlp.fc2.weight", d, hidden)?,
            fc2_bias: bias("mlp.fc2.bias", d)?,
            hidden,
            d,
        };
        let params = [
            &mut ffn.fc1_weight,
            &mut ffn.fc1_bias,
            &mut ffn.fc2_weight,
            &mut ffn.fc2_bias,
        ];
        for (p, v) in params.into_iter().zip(values) {
            p.load(backend, v)?;
        }
        Ok(ffn)
    }

    /// The parameters in the experts' order (fc1.weight, fc1.bias, fc2.weight, fc2.bias).
    fn params(&self) -> [&Param; 4] {
        [&self.fc1_weight, &self.fc1_bias, &self.fc2_weight, &self.fc2_bias]
    }

    /// Hidden buffers for `tokens` rows, in the weights' dtype.
    fn buffers(&self, backend: &dyn Backend, tokens: usize) -> Result<DenseBuffers> {
        let dtype = self.fc1_weight.dtype();
        Ok(DenseBuffers {
            act: backend.zeros(&[tokens, self.hidden], dtype)?,
        })
    }

    /// out [T, d] = fc2(gelu(fc1(x))); x: [T, d].
    fn forward(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        bufs: &mut DenseBuffers,
        x: TensorRef<'_>,
    ) -> Result<()> {
        let (d, h) = (self.d, self.hidden);
        let tokens = x.numel() / d;
        let (w1, b1) = (self.fc1_weight.tensor.view(), self.fc1_bias.tensor.view());
        let (w2, b2) = (self.fc2_weight.tensor.view(), self.fc2_bias.tensor.view());
        // The fused product the experts use at inference too (a fair baseline).
        backend.gemm_act(
            bufs.act.view_mut(),
            x,
            w1,
            Some(b1),
            GemmDims::nn(tokens, h, d),
            Unary::GeluTanh,
        )?;
        backend.gemm(out, bufs.act.view(), w2, Some(b2), GemmDims::nn(tokens, d, h), 1.0, 0.0)
    }
}

/// One expert's hidden width, as `GeluMlp` computes it.
fn hidden_width(mlp_ratio: f64, d: usize) -> usize {
    GeluMlp::new(mlp_ratio).map_or(1, |e| e.hidden(d))
}

/// Median of `times`, which it sorts (so `times[0]` is the minimum afterwards).
pub(crate) fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_router_with_equal_work() {
        let registry = crate::registry().expect("registry");
        let backend = ecdit_backend_cpu::CpuBackend::new(1).expect("backend");
        let cfg = MoeBenchConfig {
            d: 16,
            tokens_per_sample: 16,
            samples: 2,
            experts: 4,
            mlp_ratio: 2.0,
            active_experts: 2.0,
            warmup: 1,
            dtype: DType::F32,
        };
        let recs = bench_moe_with(&registry, &backend, &default_routers(), 3, &cfg).expect("bench");
        let kinds: Vec<&str> = recs.iter().map(|r| r.router.as_str()).collect();
        assert_eq!(kinds, ["expert-choice", "token-choice", "expert-race", "dense"]);
        for r in &recs {
            assert!(r.ms > 0.0 && r.dense_ms > 0.0 && (r.ratio - r.ms / r.dense_ms).abs() < 1e-12);
            assert!(r.min_ms > 0.0 && r.min_ms <= r.ms && r.dense_min_ms > 0.0 && r.dense_min_ms <= r.dense_ms);
            assert!(r.pair_ratio > 0.0 && r.pair_ratio.is_finite());
            assert_eq!(r.tokens, 32);
        }
        // Every router does the dense FFN's work: two expert rows per token on
        // average, one row of a double-width expert for `dense`.
        assert_eq!(recs[0].slots_per_token, 2.0);
        assert_eq!(recs[1].slots_per_token, 2.0);
        assert_eq!(recs[2].slots_per_token, 2.0);
        assert_eq!(recs[3].slots_per_token, 1.0);
        let err = bench_moe_with(&registry, &backend, &[json!({"kind": "nope"})], 1, &cfg).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(recs.iter().all(|r| r.dtype == "f32"));
        // bf16 weights and activations run the same work.
        if backend.supports(DType::BF16) {
            let bf16 = MoeBenchConfig {
                dtype: DType::BF16,
                ..cfg.clone()
            };
            let recs = bench_moe_with(&registry, &backend, &default_routers(), 1, &bf16).expect("bf16 bench");
            let slots: Vec<f64> = recs.iter().map(|r| r.slots_per_token).collect();
            assert_eq!(slots, [2.0, 2.0, 2.0, 1.0]);
            assert!(recs.iter().all(|r| r.dtype == "bf16" && r.ms > 0.0 && r.dense_ms > 0.0));
        }
        let bad = MoeBenchConfig {
            dtype: DType::U32,
            ..cfg
        };
        let err = bench_moe_with(&registry, &backend, &default_routers(), 1, &bad).unwrap_err();
        assert!(err.to_string().contains("u32"), "{err}");
    }
}
