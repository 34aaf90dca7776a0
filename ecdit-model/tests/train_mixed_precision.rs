//! Mixed-precision training (`dtype: bf16`): the DiT computes in bf16 while
//! f32 master weights take the optimiser's steps; the model's weights are
//! always the masters rounded to bf16, the run follows the f32 run's losses,
//! and a resumed run repeats an uninterrupted one to the bit.

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, Init, Param};
use ecdit_model::train::checkpoint::CheckpointStore;
use ecdit_model::train::config::TrainConfig;
use ecdit_model::train::run::{restore, save_checkpoint};
use ecdit_model::train::trainer::Trainer;
use std::sync::Arc;

fn config(dtype: DType) -> TrainConfig {
    let mut cfg = TrainConfig::resolve(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/train/smoke-ec.json"))
        .expect("smoke config");
    cfg.dtype = dtype;
    cfg.steps = 40;
    cfg
}

fn trainer(dtype: DType) -> Trainer {
    let cfg = config(dtype);
    let registry = ecdit_model::registry().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2).unwrap());
    let data = ecdit_model::data::open("shapes", 3, cfg.model.input_size).unwrap();
    Trainer::new(cfg, &registry, backend, data).expect("trainer")
}

/// The values of a parameter as f32 (bf16 widened exactly).
fn values(be: &dyn Backend, p: &Param) -> Vec<f32> {
    be.read_f32(p.tensor.view()).unwrap()
}

/// Every bit of every master and every model weight.
fn all_bits(t: &Trainer) -> Vec<u32> {
    let be = t.backend();
    let masters = t.params().into_iter().flat_map(|p| values(be, p));
    let model = t.model.params().into_iter().flat_map(|p| values(be, p));
    masters.chain(model).map(f32::to_bits).collect()
}

/// The model's trainable weights hold the masters rounded to bf16 (nearest
/// even, as the `half` crate rounds), or the masters themselves where a
/// weight stays f32 (the routers).
fn assert_model_is_rounded_masters(t: &Trainer) {
    let be = t.backend();
    let live: Vec<&Param> = t.model.params().into_iter().filter(|p| p.init != Init::Fixed).collect();
    let masters = t.params();
    assert!(live.len() <= masters.len());
    let mut bf16_weights = 0;
    for (w, m) in live.iter().zip(&masters) {
        assert_eq!(w.name, m.name);
        assert_eq!(m.tensor.dtype(), DType::F32, "master '{}'", m.name);
        let (w_vals, m_vals) = (values(be, w), values(be, m));
        let expected: Vec<f32> = match w.tensor.dtype() {
            DType::BF16 => {
                bf16_weights += 1;
                m_vals.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
            }
            _ => m_vals,
        };
        assert!(
            w_vals.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
            "model weight '{}' is not its master rounded",
            w.name
        );
    }
    assert!(
        bf16_weights > live.len() / 2,
        "only {bf16_weights} of {} weights are bf16",
        live.len()
    );
}

#[test]
fn bf16_training_steps_f32_masters_and_follows_the_f32_run() {
    let mut f32_run = trainer(DType::F32);
    let mut bf16_run = trainer(DType::BF16);
    // The same initial weights: the masters are the f32 run's weights, bit for bit.
    let be = f32_run.backend();
    for (a, b) in f32_run.params().into_iter().zip(bf16_run.params()) {
        assert_eq!(values(be, a), values(bf16_run.backend(), b), "initial '{}'", a.name);
    }
    assert_model_is_rounded_masters(&bf16_run);

    let mut losses = (Vec::new(), Vec::new());
    for _ in 0..40 {
        losses.0.push(f32_run.train_step(false).unwrap().loss);
        losses.1.push(bf16_run.train_step(false).unwrap().loss);
    }
    assert_model_is_rounded_masters(&bf16_run);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let first = (losses.0[0], losses.1[0]);
    let last = (mean(&losses.0[30..]), mean(&losses.1[30..]));
    println!("f32 {:.4?}\nbf16 {:.4?}", losses.0, losses.1);
    // Same weights up to bf16 rounding, same batch: the first losses agree
    // to bf16's precision (8 bits, 0.4%).
    assert!(
        (first.0 - first.1).abs() <= 4e-3 * first.0,
        "first loss f32 {} bf16 {}",
        first.0,
        first.1
    );
    // Both learn, and bf16 as well as f32.
    assert!(
        last.0 < 0.8 * first.0,
        "the f32 run did not learn: {first:?} -> {last:?}"
    );
    assert!(
        last.1 < 0.8 * first.1,
        "the bf16 run did not learn: {first:?} -> {last:?}"
    );
    assert!(
        (last.1 - last.0).abs() <= 0.05 * last.0,
        "last losses f32 {} bf16 {}",
        last.0,
        last.1
    );
}

#[test]
fn a_resumed_bf16_run_repeats_the_uninterrupted_one_to_the_bit() {
    let mut whole = trainer(DType::BF16);
    for _ in 0..6 {
        whole.train_step(false).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path(), 2);
    let mut first = trainer(DType::BF16);
    for _ in 0..3 {
        first.train_step(false).unwrap();
    }
    save_checkpoint(&first, &store).unwrap();
    let loaded = store.load_latest().unwrap().expect("a checkpoint");
    // The checkpoint holds the f32 masters, not the rounded weights.
    let master = &first.params()[0].name;
    assert_eq!(loaded.tensors[&format!("param/{master}")].dtype, DType::F32);

    let mut resumed = trainer(DType::BF16);
    restore(&mut resumed, &loaded).unwrap();
    assert_model_is_rounded_masters(&resumed);
    for _ in 0..3 {
        resumed.train_step(false).unwrap();
    }
    assert_eq!(resumed.step, whole.step);
    assert!(
        all_bits(&resumed) == all_bits(&whole),
        "the resumed run's weights differ"
    );
}
