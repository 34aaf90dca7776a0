//! A training run in a directory: `run.json` (the config), `metrics.csv`,
//! `checkpoints/step-N/` (weights, EMA, optimiser state, step; written
//! atomically, the last K kept) and, at the end, the EMA weights as
//! `model.safetensors` (+ `text_encoder.safetensors`) that `Model::load` reads.
//!
//! ```text
//! check DIR (a new run, or --resume of a compatible one); estimate memory, refuse over the limit
//! resume: the newest checkpoint that reads back whole (older ones if newer are damaged)
//! loop: step; metrics row every log_every; validation loss every val_every;
//!       checkpoint every checkpoint_every and at the end
//! export the EMA weights
//! ```

use super::checkpoint::{writer_alive, CheckpointError, CheckpointStore, Loaded, TensorData};
use super::config::TrainConfig;
use super::metrics::{MetricsLog, MetricsRow, MoeMetrics};
use super::trainer::{TrainError, Trainer};
use crate::config::Conditioning;
use crate::limits;
use crate::model::ModelError;
use crate::weights::Weights;
use ecdit_engine::{Backend, Registry};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run directory.
    pub out: PathBuf,
    /// Continue the run in `out` from its newest complete checkpoint.
    pub resume: bool,
    /// Refuse configs whose estimated memory exceeds this (bytes); None:
    /// [`limits::default_limit`].
    pub max_memory: Option<u64>,
    /// The backend spec (`{"kind": "cpu", "threads": T}`).
    pub backend: serde_json::Value,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// A new run starts from this model directory's weights (`model.safetensors`,
    /// and `text_encoder.safetensors` for a text-conditioned model) instead of
    /// fresh ones: a fine-tune. Its model config must be the run's.
    pub init_from: Option<PathBuf>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The step it resumed from (None: a fresh run).
    pub resumed_from: Option<u64>,
    /// Steps done in all.
    pub steps: u64,
    /// The last step's loss.
    pub last_loss: f64,
    /// Non-finite steps skipped.
    pub skipped: u64,
    /// The exported EMA model.
    pub model_path: PathBuf,
}

const RUN_FILE: &str = "run.json";

/// Runs (or resumes) training as `config` says, in `opts.out`.
pub fn run(config: TrainConfig, registry: &Registry, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let out = &opts.out;
    // Refuse what does not fit before allocating (or creating) anything.
    let estimate = limits::training_estimate(&config, registry)?;
    limits::check_memory(
        format!("model '{}' at batch {}", config.model.name, config.batch),
        estimate,
        opts.max_memory,
        "lower --batch or raise --max-memory",
    )
    .map_err(|e| TrainError::Other(e.to_string()))?;

    // A new fine-tune's files are checked before anything is created (a
    // resumed one reads them only if no checkpoint holds its weights yet).
    let mut init = match (&opts.init_from, opts.resume) {
        (Some(dir), false) => Some(InitWeights::open(dir, &config.model)?),
        _ => None,
    };

    let io = |what: &str, path: &Path, e: std::io::Error| TrainError::Other(format!("{what} {}: {e}", path.display()));
    std::fs::create_dir_all(out).map_err(|e| io("cannot create the run directory", out, e))?;
    let run_file = out.join(RUN_FILE);
    check_directory(&config, out, &run_file, opts.resume)?;
    // What a writer killed mid-write left (a whole model's size, for an export).
    for path in stale_temp_files(out) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "could not remove a leftover temporary file: {e}");
        }
    }

    let backend: Arc<dyn Backend> = Arc::from(registry.backend(&opts.backend).map_err(ModelError::from)?);
    let data = crate::data::open(&config.data.source, config.data.seed, config.model.input_size)?;
    let mut trainer = Trainer::new(config.clone(), registry, backend, data)?;
    let store = CheckpointStore::new(out, config.keep_checkpoints);
    store.clean_temp().map_err(|e| TrainError::Other(e.to_string()))?;
    let mut resumed_from = None;
    if opts.resume {
        match store.load_latest().map_err(|e| TrainError::Other(e.to_string()))? {
            Some(loaded) => {
                for (path, why) in &loaded.skipped {
                    tracing::warn!("skipped damaged checkpoint {}: {why}", path.display());
                    eprintln!(
                        "warning: checkpoint {} is damaged ({why}); using an older one",
                        path.display()
                    );
                }
                restore(&mut trainer, &loaded)?;
                eprintln!("resuming from {} (step {})", loaded.path.display(), loaded.step);
                resumed_from = Some(loaded.step);
            }
            None => eprintln!("no checkpoint in {}: starting from step 0", store.dir().display()),
        }
    }
    // A fine-tune's weights, unless a checkpoint of it has them already.
    if let (Some(dir), None) = (&opts.init_from, resumed_from) {
        let init = match init.take() {
            Some(init) => init,
            None => InitWeights::open(dir, &config.model)?,
        };
        init.load_into(&mut trainer)?;
        eprintln!("starting from the weights in {}", init.dir.display());
    }
    if !run_file.exists() {
        let json = serde_json::to_string_pretty(&config).map_err(|e| TrainError::Other(e.to_string()))?;
        write_atomic(&run_file, json.as_bytes()).map_err(|e| io("cannot write", &run_file, e))?;
    }

    let moe_blocks: Vec<usize> = match &config.model.moe {
        Some(moe) => (0..config.model.depth).filter(|&i| moe.is_moe_block(i)).collect(),
        None => Vec::new(),
    };
    let mut metrics =
        MetricsLog::open(out, &moe_blocks, Some(trainer.step)).map_err(|e| TrainError::Other(e.to_string()))?;
    let bar = progress_bar(opts.progress, config.steps, trainer.step);
    let mut last_loss = f64::NAN;
    let mut window = (Instant::now(), 0u64);
    while trainer.step < config.steps {
        let log = (trainer.step + 1) % config.log_every == 0 || trainer.step + 1 == config.steps;
        let report = trainer.train_step(log)?;
        window.1 += 1;
        last_loss = report.loss;
        bar.inc(1);
        if log {
            let images_per_sec = (window.1 * config.batch as u64) as f64 / window.0.elapsed().as_secs_f64();
            window = (Instant::now(), 0);
            let val_loss = if config.val_every > 0 && report.step % config.val_every == 0 {
                Some(trainer.validation_loss()?)
            } else {
                None
            };
            bar.set_message(format!("loss {:.4}  {images_per_sec:.1} img/s", report.loss));
            let row = MetricsRow {
                step: report.step,
                loss: report.loss,
                lr: report.lr as f64,
                grad_norm: report.grad_norm,
                images_per_sec,
                val_loss: val_loss.unwrap_or(f64::NAN),
                moe: report
                    .routing
                    .iter()
                    .map(|&(block, unchosen, max_experts)| MoeMetrics {
                        block,
                        unchosen,
                        max_experts,
                    })
                    .collect(),
            };
            metrics.append(&row).map_err(|e| TrainError::Other(e.to_string()))?;
        }
        if trainer.step % config.checkpoint_every == 0 || trainer.step == config.steps {
            save_checkpoint(&trainer, &store)?;
        }
    }
    bar.finish_and_clear();

    // The EMA weights, loadable by `Model::load` (and the encoder's beside them).
    let model_path = out.join("model.safetensors");
    trainer.swap_ema()?;
    let saved = export(&trainer, out, &model_path);
    trainer.swap_ema()?;
    saved?;
    Ok(RunSummary {
        resumed_from,
        steps: trainer.step,
        last_loss,
        skipped: trainer.skipped,
        model_path,
    })
}

/// The weights of an exported model a new run starts from (`--init-from`).
struct InitWeights {
    dir: PathBuf,
    model: Weights,
    /// The text encoder's, for a text-conditioned model.
    encoder: Option<Weights>,
}

impl InitWeights {
    /// Opens the model directory's files and checks that they hold a model of `config`.
    fn open(dir: &Path, config: &crate::config::ModelConfig) -> Result<Self, TrainError> {
        let model_file = dir.join("model.safetensors");
        let model = Weights::open(&model_file).map_err(ModelError::from)?;
        let mut theirs = crate::model::config_from_metadata(&model)?;
        // The architecture must match; the name is the run's.
        theirs.name.clone_from(&config.name);
        if &theirs != config {
            return Err(TrainError::Other(format!(
                "--init-from {}: its model config differs from the run's in {}; a fine-tune keeps the architecture",
                model_file.display(),
                config_differences(&theirs, config)
            )));
        }
        let encoder = match config.conditioning {
            Conditioning::Text { .. } => {
                Some(Weights::open(dir.join("text_encoder.safetensors")).map_err(ModelError::from)?)
            }
            Conditioning::Class { .. } => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            encoder,
        })
    }

    /// Sets the trainer's live weights (the f32 masters in mixed precision)
    /// and its EMA from the files.
    fn load_into(&self, trainer: &mut Trainer) -> Result<(), TrainError> {
        let backend = trainer.backend_arc();
        let read = |r: Result<(), crate::weights::WeightsError>| r.map_err(ModelError::from);
        for p in trainer.params_mut() {
            let file = match &self.encoder {
                Some(enc) if enc.contains(&p.name) => enc,
                _ => &self.model,
            };
            read(file.load_param(backend.as_ref(), p))?;
        }
        // The fixed sin-cos table is the run's own; every other tensor was read.
        read(self.model.check_all_used(&["pos_embed"]))?;
        if let Some(enc) = &self.encoder {
            read(enc.check_all_used(&[]))?;
        }
        trainer.sync_model()?;
        trainer.reset_ema()
    }
}

/// The fields in which two model configs differ: `hidden (32 there, 48 here)`.
fn config_differences(there: &crate::config::ModelConfig, here: &crate::config::ModelConfig) -> String {
    let (a, b) = (json!(there), json!(here));
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "its fields".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
            format!("{k} ({} there, {} here)", show(a.get(k)), show(b.get(k)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A new run needs a directory without another run (or anything else); a
/// resumed one a run of a compatible config.
fn check_directory(config: &TrainConfig, out: &Path, run_file: &Path, resume: bool) -> Result<(), TrainError> {
    if run_file.exists() {
        let text = limits::read_text_file(run_file)
            .map_err(|e| TrainError::Other(format!("cannot read {}: {e}", run_file.display())))?;
        let saved: TrainConfig = serde_json::from_str(&text).map_err(|e| {
            TrainError::Other(format!(
                "{} is not a training config ({e}); not touching {}",
                run_file.display(),
                out.display()
            ))
        })?;
        if !resume {
            return Err(TrainError::Other(format!(
                "{} already holds a run of model '{}'; pass --resume to continue it, or choose another --out",
                out.display(),
                saved.model.name
            )));
        }
        if let Some(why) = config.incompatible_with(&saved) {
            return Err(TrainError::Other(format!(
                "cannot resume the run in {} with this config: {why}",
                out.display()
            )));
        }
        return Ok(());
    }
    // A run killed while writing its run.json leaves only that file's
    // temporary: still a new run's directory (run() removes it).
    let stale = stale_temp_files(out);
    let mut entries = std::fs::read_dir(out).map_err(|e| TrainError::Other(format!("{}: {e}", out.display())))?;
    if entries.any(|e| e.map_or(true, |e| !stale.contains(&e.path()))) {
        return Err(TrainError::Other(format!(
            "{} is not empty and holds no training run ({RUN_FILE} missing); choose an empty or new directory",
            out.display()
        )));
    }
    Ok(())
}

/// The temporary files of a run's own atomic writes (`run.json`,
/// `metrics.csv`, the exported models) whose writer is dead: `NAME.tmp-PID`,
/// as [`write_atomic`], the metrics log and `weights::save_tensors` name them.
fn stale_temp_files(out: &Path) -> Vec<PathBuf> {
    const WRITTEN: [&str; 4] = ["run", "metrics.csv", ".model.safetensors", ".text_encoder.safetensors"];
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let Some((stem, pid)) = name.to_str().and_then(|n| n.rsplit_once(".tmp-")) else {
                return false;
            };
            WRITTEN.contains(&stem)
                && e.file_type().is_ok_and(|t| t.is_file())
                && pid.parse().is_ok_and(|pid| !writer_alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

/// Names of a trainable parameter's tensors in a checkpoint.
fn names(param: &str) -> [String; 4] {
    [
        format!("param/{param}"),
        format!("ema/{param}"),
        format!("opt0/{param}"),
        format!("opt1/{param}"),
    ]
}

/// Writes the trainer's whole state: weights, EMA, optimiser state (memory
/// layout, bit for bit), the config and the step.
pub fn save_checkpoint(trainer: &Trainer, store: &CheckpointStore) -> Result<PathBuf, TrainError> {
    let be = trainer.backend();
    let mut tensors = Vec::new();
    let state = trainer.optimizer().state();
    for ((p, ema), [s0, s1]) in trainer.params().into_iter().zip(trainer.ema()).zip(state) {
        let [n_param, n_ema, n0, n1] = names(&p.name);
        for (name, t) in [(n_param, &p.tensor), (n_ema, ema), (n0, s0), (n1, s1)] {
            let mut bytes = vec![0u8; t.numel() * t.dtype().size()];
            be.download(&mut bytes, t.view())?;
            tensors.push((
                name,
                TensorData {
                    shape: t.shape().to_vec(),
                    dtype: t.dtype(),
                    bytes,
                },
            ));
        }
    }
    let c = &trainer.config;
    let meta = json!({
        "config": c,
        "step": trainer.step,
        "data_position": trainer.step * c.batch as u64,
        "optimizer_steps": trainer.optimizer().steps(),
        "skipped_steps": trainer.skipped,
        "rng": "each step draws from a generator seeded by (seed, step)",
    });
    store
        .save(trainer.step, &tensors, &meta)
        .map_err(|e| save_error(e, store, trainer.step))
}

/// A failed save, said so that a full disk reads as one: the error names the
/// file, and the hint the checkpoint that is kept.
fn save_error(e: CheckpointError, store: &CheckpointStore, step: u64) -> TrainError {
    let full = matches!(&e, CheckpointError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull);
    if !full {
        return TrainError::Other(format!("cannot save the checkpoint of step {step}: {e}"));
    }
    let kept = match store.list().ok().and_then(|list| list.first().map(|(s, _)| *s)) {
        Some(newest) => format!("the checkpoints saved before are kept (the newest is of step {newest})"),
        None => "no checkpoint was saved before".to_string(),
    };
    TrainError::Other(format!(
        "cannot save the checkpoint of step {step}: {e}. The disk holding {} is full; {kept}. \
         Free some space and continue with --resume",
        store.dir().display()
    ))
}

/// Sets the trainer's whole state from a checkpoint of a compatible run.
pub fn restore(trainer: &mut Trainer, loaded: &Loaded) -> Result<(), TrainError> {
    let at = loaded.path.display().to_string();
    let saved: TrainConfig = serde_json::from_value(loaded.state["config"].clone())
        .map_err(|e| TrainError::Other(format!("checkpoint {at}: its config does not parse: {e}")))?;
    if let Some(why) = trainer.config.incompatible_with(&saved) {
        return Err(TrainError::Other(format!("checkpoint {at} is of another run: {why}")));
    }
    let number = |key: &str| {
        loaded.state[key]
            .as_u64()
            .ok_or_else(|| TrainError::Other(format!("checkpoint {at}: '{key}' missing or not a number")))
    };
    let (step, opt_steps, skipped) = (number("step")?, number("optimizer_steps")?, number("skipped_steps")?);
    let backend = trainer.backend_arc();
    let be = backend.as_ref();
    let upload = |name: &str, t: &mut ecdit_engine::Tensor| -> Result<(), TrainError> {
        let data = loaded
            .tensors
            .get(name)
            .ok_or_else(|| TrainError::Other(format!("checkpoint {at}: tensor '{name}' missing")))?;
        if data.shape != t.shape() || data.dtype != t.dtype() {
            return Err(TrainError::Other(format!(
                "checkpoint {at}: tensor '{name}' is {:?} {:?}, expected {:?} {:?}",
                data.dtype,
                data.shape,
                t.dtype(),
                t.shape()
            )));
        }
        be.upload(t.view_mut(), &data.bytes)?;
        Ok(())
    };
    let names: Vec<[String; 4]> = trainer.params().iter().map(|p| names(&p.name)).collect();
    for (p, n) in trainer.params_mut().into_iter().zip(&names) {
        upload(&n[0], &mut p.tensor)?;
    }
    for (e, n) in trainer.ema_mut().iter_mut().zip(&names) {
        upload(&n[1], e)?;
    }
    let (state, steps) = trainer.optimizer_mut().state_mut();
    for ([s0, s1], n) in state.iter_mut().zip(&names) {
        upload(&n[2], s0)?;
        upload(&n[3], s1)?;
    }
    *steps = opt_steps;
    trainer.step = step;
    trainer.skipped = skipped;
    trainer.sync_model()
}

/// The EMA weights of a run's newest complete checkpoint as a model and its
/// text encoder (a run still training can be sampled); returns the step.
pub fn load_ema(
    run_dir: &Path,
    registry: &Registry,
    backend: Arc<dyn Backend>,
) -> Result<(crate::model::Model, Option<crate::text::TransformerTextEncoder>, u64), TrainError> {
    load_checkpoint_weights(run_dir, registry, backend, "ema")
}

/// As [`load_ema`], with the checkpoint's `ema` or live (`param`) weights.
pub fn load_checkpoint_weights(
    run_dir: &Path,
    registry: &Registry,
    backend: Arc<dyn Backend>,
    which: &str,
) -> Result<(crate::model::Model, Option<crate::text::TransformerTextEncoder>, u64), TrainError> {
    let config = read_run_config(run_dir)?;
    let store = CheckpointStore::new(run_dir, config.keep_checkpoints);
    let loaded = store
        .load_latest()
        .map_err(|e| TrainError::Other(e.to_string()))?
        .ok_or_else(|| TrainError::Other(format!("{} holds no checkpoint yet", store.dir().display())))?;
    let at = loaded.path.display().to_string();
    // Every tensor the config needs is in the checkpoint, of its size, before
    // the model is allocated: run.json cannot make us allocate more than the
    // checkpoint holds.
    for (name, shape) in limits::trainable_shapes(&config.model, registry)? {
        let name = format!("{which}/{name}");
        let numel = shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
        match loaded.tensors.get(&name) {
            None => return Err(TrainError::Other(format!("checkpoint {at}: tensor '{name}' missing"))),
            Some(data) if data.shape.iter().map(|&d| d as u64).product::<u64>() != numel => {
                return Err(TrainError::Other(format!(
                    "checkpoint {at}: tensor '{name}' has shape {:?}, the config wants {numel} values ({shape:?})",
                    data.shape
                )))
            }
            Some(_) => {}
        }
    }
    let mut model = crate::model::Model::new(config.model.clone(), registry, backend.clone(), config.seed)?;
    let mut encoder = match config.model.conditioning {
        Conditioning::Text { .. } => Some(crate::text::TransformerTextEncoder::for_model(
            backend.clone(),
            &config.model,
            0,
        )?),
        Conditioning::Class { .. } => None,
    };
    let mut params: Vec<&mut ecdit_engine::Param> = model
        .params_mut()
        .into_iter()
        .filter(|p| p.init != ecdit_engine::Init::Fixed)
        .collect();
    if let Some(enc) = &mut encoder {
        ecdit_engine::Params::collect_mut(enc, &mut params);
    }
    for p in params {
        let name = format!("{which}/{}", p.name);
        let data = loaded
            .tensors
            .get(&name)
            .ok_or_else(|| TrainError::Other(format!("checkpoint {at}: tensor '{name}' missing")))?;
        if data.shape != p.tensor.shape() || data.dtype != p.tensor.dtype() {
            return Err(TrainError::Other(format!(
                "checkpoint {at}: tensor '{name}' has another shape or dtype"
            )));
        }
        backend.upload(p.tensor.view_mut(), &data.bytes)?;
    }
    Ok((model, encoder, loaded.step))
}

/// The training config of the run in `run_dir` (its `run.json`), its model config validated.
pub fn read_run_config(run_dir: &Path) -> Result<TrainConfig, TrainError> {
    let run_file = run_dir.join(RUN_FILE);
    let text = limits::read_text_file(&run_file)
        .map_err(|e| TrainError::Other(format!("cannot read {}: {e}", run_file.display())))?;
    let config: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| TrainError::Other(format!("{} is not a training config: {e}", run_file.display())))?;
    config
        .model
        .validate()
        .map_err(|e| TrainError::Other(format!("{}: {e}", run_file.display())))?;
    Ok(config)
}

/// Saves the model (and text encoder) as they are now.
fn export(trainer: &Trainer, out: &Path, model_path: &Path) -> Result<(), TrainError> {
    trainer.model.save(model_path)?;
    if let Some(enc) = &trainer.encoder {
        enc.save(out.join("text_encoder.safetensors"))
            .map_err(|e| TrainError::Other(e.to_string()))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn progress_bar(show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_position(done);
    if let Ok(style) = indicatif::ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg}  ETA {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
