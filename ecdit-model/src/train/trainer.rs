//! One training step, llm.c style, on any backend with the ops:
//!
//! ```text
//! images, captions = data[step * B .. (step + 1) * B]
//! t, noise ~ rng(seed, step); x_t, target = scheduler(images, noise, t)
//! prompts -> "" with probability `dropout` (labels -> the null class)
//! kept tokens ~ rng(seed, step)                       (token masking)
//! text = encoder(prompts); pred = model(x_t, t, text, kept)
//! loss = mse(pred, target) + routers' auxiliary losses   (host: one download, one upload)
//! grads = backward(...); skip the step if anything is not finite
//! clip grads to the norm; optimiser step at lr(step); ema = d ema + (1 - d) weights
//! ```
//! Everything random in a step is drawn from a generator seeded by (seed,
//! step), and the data position is the step, so a run resumed from a
//! checkpoint repeats an uninterrupted run's steps to the bit.

use super::config::TrainConfig;
use super::loss::{patch_mse, PatchGeometry};
use super::optimizer::Optimizer;
use crate::config::Conditioning;
use crate::data::{DataError, Dataset};
use crate::model::{
    Backprop, BackwardOptions, CondEmbedder, Condition, EncodedText, Grads, Model, ModelActs, ModelError,
};
use crate::text::{TextEncoderActs, TextError, TransformerTextEncoder};
use ecdit_engine::{Backend, BackendExt, DType, EngineError, Init, Param, Registry, Scheduler, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

/// What can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model or a backend op.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The data.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The text encoder.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Too many steps in a row had a non-finite loss or gradient.
    #[error(
        "training diverged: {bad} steps in a row up to step {step} had a non-finite loss or gradient \
         (max_bad_steps = {limit}); the last good checkpoint is untouched. Lower the learning rate or \
         enable gradient clipping"
    )]
    Diverged {
        /// The last bad step.
        step: u64,
        /// Bad steps in a row.
        bad: u64,
        /// The limit.
        limit: u64,
    },
    /// Anything else, with what and where.
    #[error("{0}")]
    Other(String),
}

impl From<EngineError> for TrainError {
    fn from(e: EngineError) -> Self {
        TrainError::Model(e.into())
    }
}

/// Per MoE block: (block index, fraction of tokens no expert chose, max experts on one token).
pub type RoutingSummary = Vec<(usize, f64, f64)>;

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step (1-based).
    pub step: u64,
    /// Diffusion loss plus the routers' auxiliary losses (NaN when not finite).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the step was skipped (non-finite loss or gradient).
    pub applied: bool,
    /// Per MoE block routing statistics, when asked for.
    pub routing: RoutingSummary,
}

/// The model, its text encoder, the optimiser, the EMA and the buffers of a run.
pub struct Trainer {
    /// The config.
    pub config: TrainConfig,
    /// The model (live weights).
    pub model: Model,
    /// The text encoder, trained with the model (text-conditioned models).
    pub encoder: Option<TransformerTextEncoder>,
    scheduler: Box<dyn Scheduler>,
    data: Box<dyn Dataset>,
    backend: Arc<dyn Backend>,
    /// Mixed precision (`dtype` bf16): an f32 master of each of the model's
    /// trainable parameters. The optimiser steps them, the EMA follows them,
    /// checkpoints hold them; the model's bf16 weights are rounded from them
    /// after every change. Empty when the model trains in f32.
    masters: Vec<Param>,
    grads: Grads,
    optimizer: Optimizer,
    /// The EMA of every trainable parameter (f32, memory layout, training order).
    ema: Vec<Tensor>,
    acts: ModelActs,
    bp: Backprop,
    text_acts: TextEncoderActs,
    dout: Option<Tensor>,
    norms: Option<(Tensor, Tensor)>,
    /// Steps done.
    pub step: u64,
    /// Non-finite steps skipped in all, and in a row.
    pub skipped: u64,
    bad_in_a_row: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.config.model.name)
            .field("step", &self.step)
            .finish()
    }
}

/// The held-out data starts here (the training data never gets this far).
const VALIDATION_INDEX: u64 = 1 << 48;

impl Trainer {
    /// A fresh run: weights from `config.seed`, data from `data`, on `backend`.
    pub fn new(
        config: TrainConfig,
        registry: &Registry,
        backend: Arc<dyn Backend>,
        data: Box<dyn Dataset>,
    ) -> Result<Self, TrainError> {
        config.validate(None).map_err(|e| TrainError::Other(e.to_string()))?;
        let m = &config.model;
        if data.channels() != m.in_channels || data.size() != m.input_size {
            return Err(TrainError::Other(format!(
                "the data ({}) has {}-channel {}x{} images; model '{}' takes {}-channel {}x{} inputs \
                 (set in_channels and input_size to match)",
                data.describe(),
                data.channels(),
                data.size(),
                data.size(),
                m.name,
                m.in_channels,
                m.input_size,
                m.input_size
            )));
        }
        let scheduler = registry.scheduler(&m.scheduler).map_err(ModelError::from)?;
        let mut model = Model::new(m.clone(), registry, backend.clone(), config.seed)?;
        let masters = if config.dtype == DType::F32 {
            Vec::new()
        } else {
            let be = backend.as_ref();
            let masters = trainable(&model, None)
                .into_iter()
                .map(|p| {
                    let mut tensor = p.zeros_like(be)?;
                    be.copy(tensor.view_mut(), p.tensor.view())?;
                    Ok(Param {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        layout: p.layout,
                        init: p.init,
                        tensor,
                    })
                })
                .collect::<Result<Vec<_>, EngineError>>()?;
            model.to_dtype(config.dtype)?;
            masters
        };
        let encoder = match m.conditioning {
            Conditioning::Text { .. } => Some(TransformerTextEncoder::for_model(
                backend.clone(),
                m,
                config.seed.wrapping_add(1),
            )?),
            Conditioning::Class { .. } => None,
        };
        let be = backend.as_ref();
        let params = recorded(&masters, &model, encoder.as_ref());
        let grads = Grads::new(be, &params)?;
        let optimizer = Optimizer::new(be, config.optimizer, &params)?;
        let ema = params
            .iter()
            .map(|p| {
                let mut t = p.zeros_like(be)?;
                be.copy(t.view_mut(), p.tensor.view())?;
                Ok(t)
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            config,
            model,
            encoder,
            scheduler,
            data,
            backend,
            masters,
            grads,
            optimizer,
            ema,
            acts: ModelActs::default(),
            bp: Backprop::default(),
            text_acts: TextEncoderActs::default(),
            dout: None,
            norms: None,
            step: 0,
            skipped: 0,
            bad_in_a_row: 0,
        })
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, shared.
    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// Every trainable parameter in training order, the model's then the
    /// encoder's, as the optimiser steps them (the f32 masters in mixed precision).
    pub fn params(&self) -> Vec<&Param> {
        recorded(&self.masters, &self.model, self.encoder.as_ref())
    }

    /// The EMA tensors, in the order of [`Trainer::params`].
    pub fn ema(&self) -> &[Tensor] {
        &self.ema
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimiser, mutably (restoring a checkpoint).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The EMA tensors, mutably (restoring a checkpoint).
    pub fn ema_mut(&mut self) -> &mut [Tensor] {
        &mut self.ema
    }

    /// [`Trainer::params`], mutably; after changing them, [`Trainer::sync_model`].
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        recorded_mut(&mut self.masters, &mut self.model, self.encoder.as_mut())
    }

    /// Rounds the f32 masters into the model's bf16 weights (mixed
    /// precision; in f32 the model's weights are the masters, nothing to do).
    pub fn sync_model(&mut self) -> Result<(), TrainError> {
        let be = self.backend.clone();
        let live = self.model.params_mut().into_iter().filter(|p| p.init != Init::Fixed);
        for (master, p) in self.masters.iter().zip(live) {
            be.copy(p.tensor.view_mut(), master.tensor.view())?;
        }
        Ok(())
    }

    /// The learning rate of step `step` (1-based).
    pub fn lr(&self, step: u64) -> f32 {
        let c = &self.config;
        c.schedule.lr(c.optimizer.lr(), step, c.steps)
    }

    /// Runs the next step; `stats`: report the routing statistics too.
    pub fn train_step(&mut self, stats: bool) -> Result<StepReport, TrainError> {
        let step = self.step + 1;
        let batch = self.config.batch;
        let mut rng = step_rng(self.config.seed, step);
        let images = self.data.batch(self.step * batch as u64, batch)?;
        let captions: Vec<&str> = images.captions.iter().map(String::as_str).collect();
        let (loss, routing) = self.forward_loss(&images.images, &captions, &mut rng, true, stats)?;
        let lr = self.lr(step);
        self.step = step;
        if !loss.is_finite() {
            return self.bad_step(step, loss, f64::NAN, lr, routing);
        }

        // Backward: the model, then the text encoder from the model's text gradients.
        self.grads.zero(self.backend.as_ref())?;
        let dout = self
            .dout
            .as_ref()
            .ok_or_else(|| TrainError::Other("no loss gradient".into()))?;
        let opts = BackwardOptions {
            input_grad: false,
            grad_aux: 1.0,
        };
        self.model
            .backward(&self.acts, &mut self.bp, &mut self.grads, dout.view(), opts)?;
        if let Some(enc) = &self.encoder {
            let pooled = match &self.model.cond {
                CondEmbedder::Text { pooled: Some(_), .. } => Some(self.bp.d_text_pooled.view()?),
                _ => None,
            };
            enc.backward(&self.text_acts, &mut self.grads, self.bp.d_text_tokens.view()?, pooled)?;
        }
        let grad_norm = self.grad_norm()?;
        if !grad_norm.is_finite() {
            return self.bad_step(step, loss, grad_norm, lr, routing);
        }
        self.bad_in_a_row = 0;

        // Clip, step, average.
        if let Some(max) = self.config.clip_grad_norm {
            if grad_norm > max as f64 {
                self.scale_grads((max as f64 / grad_norm) as f32)?;
            }
        }
        let backend = self.backend.clone();
        let params = recorded_mut(&mut self.masters, &mut self.model, self.encoder.as_mut());
        self.optimizer.step(backend.as_ref(), params, &self.grads, lr)?;
        self.sync_model()?;
        self.update_ema()?;
        Ok(StepReport {
            step,
            loss,
            lr,
            grad_norm,
            applied: true,
            routing,
        })
    }

    /// The loss of a fixed held-out batch (the same every call: its images,
    /// times, noise and prompts never change; no dropout, no masking) under
    /// the current weights.
    pub fn validation_loss(&mut self) -> Result<f64, TrainError> {
        let n = self.config.batch.min(16);
        let images = self.data.batch(VALIDATION_INDEX, n)?;
        let captions: Vec<&str> = images.captions.iter().map(String::as_str).collect();
        let mut rng = step_rng(self.config.seed ^ 0x5EED_0F5A_11AA, VALIDATION_INDEX);
        Ok(self.forward_loss(&images.images, &captions, &mut rng, false, false)?.0)
    }

    /// Noises `x0`, runs the forward and the loss; leaves the loss gradient in
    /// `self.dout`. `train`: prompt dropout and token masking apply.
    fn forward_loss(
        &mut self,
        x0: &[f32],
        captions: &[&str],
        rng: &mut StdRng,
        train: bool,
        stats: bool,
    ) -> Result<(f64, RoutingSummary), TrainError> {
        let cfg = &self.config;
        let m = &cfg.model;
        let be = self.backend.clone();
        let be = be.as_ref();
        let b = captions.len();
        let image = m.in_channels * m.input_size * m.input_size;

        // x_t and the target at times t.
        let (mut x_t, mut target) = (vec![0.0f32; b * image], vec![0.0f32; b * image]);
        let mut t_model = Vec::with_capacity(b);
        let mut noise = vec![0.0f32; image];
        for i in 0..b {
            let t = self.scheduler.draw_t(rng);
            noise.iter_mut().for_each(|v| *v = StandardNormal.sample(rng));
            let span = i * image..(i + 1) * image;
            let x0 = &x0[span.clone()];
            self.scheduler.add_noise(&mut x_t[span.clone()], x0, &noise, t)?;
            self.scheduler.target(&mut target[span], x0, &noise, t)?;
            t_model.push(self.scheduler.model_time(t)?);
        }
        // Prompt dropout: the empty prompt (the null class).
        let dropout = if train { cfg.dropout() } else { 0.0 };
        let dropped: Vec<bool> = (0..b).map(|_| rng.gen::<f32>() < dropout).collect();
        // Token masking: each image keeps a random subset, in token order.
        let tokens = m.tokens();
        let kept_per_image = ((tokens as f64) * (1.0 - cfg.mask_ratio as f64)).round().max(1.0) as usize;
        let kept: Option<Vec<u32>> = (train && kept_per_image < tokens).then(|| {
            let mut all = Vec::with_capacity(b * kept_per_image);
            for _ in 0..b {
                let mut order: Vec<u32> = (0..tokens as u32).collect();
                for j in 0..kept_per_image {
                    let k = rng.gen_range(j..tokens);
                    order.swap(j, k);
                }
                let mut chosen = order[..kept_per_image].to_vec();
                chosen.sort_unstable();
                all.extend(chosen);
            }
            all
        });

        // Forward.
        let routings = match (&self.encoder, &self.model.cond) {
            (Some(enc), _) => {
                let prompts: Vec<&str> = captions
                    .iter()
                    .zip(&dropped)
                    .map(|(c, &d)| if d { "" } else { *c })
                    .collect();
                let (ids, mask, len) = enc.tokenizer().tokenize_batch(&prompts);
                enc.forward_train(&mut self.text_acts, &ids, &mask, b, len)?;
                let text = EncodedText {
                    tokens: self.text_acts.tokens()?,
                    mask: self.text_acts.mask()?,
                    pooled: self.text_acts.pooled()?,
                };
                self.model.forward_train(
                    &mut self.acts,
                    &x_t,
                    &t_model,
                    Condition::Encoded(text),
                    kept.as_deref(),
                )?
            }
            (None, CondEmbedder::Class(table)) => {
                let labels: Vec<u32> = captions
                    .iter()
                    .zip(&dropped)
                    .map(|(c, &d)| {
                        if d {
                            table.null_class()
                        } else {
                            class_of(c, table.num_classes)
                        }
                    })
                    .collect();
                self.model.forward_train(
                    &mut self.acts,
                    &x_t,
                    &t_model,
                    Condition::Class(&labels),
                    kept.as_deref(),
                )?
            }
            (None, CondEmbedder::Text { .. }) => {
                return Err(TrainError::Other(
                    "a text-conditioned model needs its text encoder".into(),
                ))
            }
        };

        // Loss on the host: one download of the prediction, one upload of its gradient.
        let pred_view = self.acts.patch_prediction()?;
        let shape = pred_view.shape().to_vec();
        let pred = be.read_f32(pred_view)?;
        let geometry = PatchGeometry {
            batch: b,
            channels: m.in_channels,
            out_channels: m.out_channels(),
            size: m.input_size,
            patch: m.patch_size,
        };
        let (mut loss, grad) = patch_mse(&pred, &target, kept.as_deref(), geometry);
        let mut routing = Vec::new();
        for (block, r) in &routings {
            loss += r.aux_loss.unwrap_or(0.0) as f64;
            if stats {
                let s = r.stats(be)?;
                routing.push((*block, s.unrouted_fraction as f64, s.max_experts_per_token as f64));
            }
        }
        let fits = self.dout.as_ref().is_some_and(|t| t.shape() == shape.as_slice());
        if !fits {
            self.dout = Some(be.zeros(&shape, self.model.dtype())?);
        }
        if let Some(dout) = &mut self.dout {
            be.write_f32(dout.view_mut(), &grad)?;
        }
        Ok((loss, routing))
    }

    /// Counts a skipped step; too many in a row is an error.
    fn bad_step(
        &mut self,
        step: u64,
        loss: f64,
        grad_norm: f64,
        lr: f32,
        routing: RoutingSummary,
    ) -> Result<StepReport, TrainError> {
        self.skipped += 1;
        self.bad_in_a_row += 1;
        tracing::warn!(step, loss, grad_norm, "non-finite loss or gradient: step skipped");
        if self.bad_in_a_row >= self.config.max_bad_steps {
            return Err(TrainError::Diverged {
                step,
                bad: self.bad_in_a_row,
                limit: self.config.max_bad_steps,
            });
        }
        Ok(StepReport {
            step,
            loss,
            lr,
            grad_norm,
            applied: false,
            routing,
        })
    }

    /// The global L2 norm of every gradient: per tensor `<g, g>` on the
    /// backend (`gather_dot` of the tensor as one row with itself), one download.
    fn grad_norm(&mut self) -> Result<f64, TrainError> {
        let be = self.backend.as_ref();
        let n = self.grads.names().len();
        if self.norms.as_ref().is_none_or(|(sq, _)| sq.numel() != n) {
            let zero = be.upload_u32(&[1], &[0])?;
            self.norms = Some((be.zeros(&[n], DType::F32)?, zero));
        }
        let Some((squares, zero)) = &mut self.norms else {
            return Err(TrainError::Other("gradient norm buffers".into()));
        };
        for (i, (name, g)) in self.grads.iter().enumerate() {
            let g = g?;
            let len = g.numel();
            let row = g.reshape(&[1, len])?;
            let out = squares.view_mut().flat(i, 1)?;
            be.gather_dot(out, row, zero.view(), row, len)
                .map_err(|e| TrainError::Other(format!("gradient norm of '{name}': {e}")))?;
        }
        let squares = be.read_f32(squares.view())?;
        Ok(squares.iter().map(|&s| s as f64).sum::<f64>().sqrt())
    }

    /// Every gradient times `scale`.
    fn scale_grads(&mut self, scale: f32) -> Result<(), TrainError> {
        let be = self.backend.as_ref();
        let params = recorded(&self.masters, &self.model, self.encoder.as_ref());
        // g = 0 * w + scale * g (the weight only lends a tensor of the right count).
        for ((_, g), p) in self.grads.iter_mut().zip(params) {
            be.axpby(g?, 0.0, p.tensor.view(), scale)?;
        }
        Ok(())
    }

    /// ema = d * ema + (1 - d) * weights.
    fn update_ema(&mut self) -> Result<(), TrainError> {
        let d = self.config.ema_decay;
        let be = self.backend.as_ref();
        let params = recorded(&self.masters, &self.model, self.encoder.as_ref());
        for (ema, p) in self.ema.iter_mut().zip(params) {
            be.axpby(ema.view_mut(), 1.0 - d, p.tensor.view(), d)?;
        }
        Ok(())
    }

    /// Sets the EMA to the live weights (a run starting from given weights).
    pub fn reset_ema(&mut self) -> Result<(), TrainError> {
        let be = self.backend.clone();
        let params = recorded(&self.masters, &self.model, self.encoder.as_ref());
        for (ema, p) in self.ema.iter_mut().zip(params) {
            be.copy(ema.view_mut(), p.tensor.view())?;
        }
        Ok(())
    }

    /// Swaps the live weights with the EMA (call again to swap back): the
    /// model and encoder then hold the averaged weights, e.g. for saving.
    pub fn swap_ema(&mut self) -> Result<(), TrainError> {
        let mut ema = std::mem::take(&mut self.ema);
        for (p, e) in self.params_mut().into_iter().zip(ema.iter_mut()) {
            std::mem::swap(&mut p.tensor, e);
        }
        self.ema = ema;
        self.sync_model()
    }
}

/// The trainable parameters: the model's (all but the fixed position
/// table), then the text encoder's.
fn trainable<'a>(model: &'a Model, encoder: Option<&'a TransformerTextEncoder>) -> Vec<&'a Param> {
    let mut out: Vec<&Param> = model.params().into_iter().filter(|p| p.init != Init::Fixed).collect();
    if let Some(enc) = encoder {
        ecdit_engine::Params::collect(enc, &mut out);
    }
    out
}

/// What the optimiser steps, the EMA follows and a checkpoint holds: the
/// model's trainable parameters, or their f32 `masters` in mixed precision,
/// then the encoder's.
fn recorded<'a>(masters: &'a [Param], model: &'a Model, encoder: Option<&'a TransformerTextEncoder>) -> Vec<&'a Param> {
    if masters.is_empty() {
        return trainable(model, encoder);
    }
    let mut out: Vec<&Param> = masters.iter().collect();
    if let Some(enc) = encoder {
        ecdit_engine::Params::collect(enc, &mut out);
    }
    out
}

/// [`recorded`], mutably.
fn recorded_mut<'a>(
    masters: &'a mut [Param],
    model: &'a mut Model,
    encoder: Option<&'a mut TransformerTextEncoder>,
) -> Vec<&'a mut Param> {
    if masters.is_empty() {
        return trainable_mut(model, encoder);
    }
    let mut out: Vec<&mut Param> = masters.iter_mut().collect();
    if let Some(enc) = encoder {
        ecdit_engine::Params::collect_mut(enc, &mut out);
    }
    out
}

/// [`trainable`], mutably.
fn trainable_mut<'a>(model: &'a mut Model, encoder: Option<&'a mut TransformerTextEncoder>) -> Vec<&'a mut Param> {
    let mut out: Vec<&mut Param> = model
        .params_mut()
        .into_iter()
        .filter(|p| p.init != Init::Fixed)
        .collect();
    if let Some(enc) = encoder {
        ecdit_engine::Params::collect_mut(enc, &mut out);
    }
    out
}

/// The generator of everything random in step `step` of a run seeded `seed`.
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The class of a caption for class-conditional models: its first shape
/// word (circle 0, square 1, triangle 2), modulo the model's classes.
pub fn class_of(caption: &str, num_classes: usize) -> u32 {
    let class = caption
        .split_whitespace()
        .find_map(|w| match w.trim_end_matches('s') {
            "circle" => Some(0),
            "square" => Some(1),
            "triangle" => Some(2),
            _ => None,
        })
        .unwrap_or(0);
    (class % num_classes.max(1)) as u32
}
