//! The entry points of the fuzz targets, one function per surface that reads
//! input from outside. Each takes the fuzz input's bytes, hands them to the
//! project's own parser the way the program reads that kind of input, checks
//! a few invariants of what comes back, and returns `Ok` when the parser
//! accepted the input or its error as text. An `Err` is the right answer to
//! bad input; a panic, an abort, a hang or an allocation over the cap
//! (`scripts/fuzz.sh`) is a bug.
//!
//! The targets in `fuzz_targets/` call these. The normal test suite
//! (`tests/tests/fuzz_regressions.rs`) includes this file by path and replays
//! the committed seed corpora, and every input that once found a bug, through
//! the same functions; so this file uses only crates the `tests` crate has.

use ecdit_backend_cpu::{CpuBackend, OneDnnMode};
use ecdit_engine::plugin::abi::{BackendVtable, ExpertVtable, PluginDesc, RouterVtable, SchedulerVtable};
use ecdit_engine::plugin::host::register_descriptor;
use ecdit_engine::spec::{check_params, split_spec};
use ecdit_engine::{Backend, Family, Registry};
use ecdit_model::config::ModelConfig;
use ecdit_model::config_files::parse_config;
use ecdit_model::eval::{parse_prompt, parse_prompts};
use ecdit_model::model::{config_from_metadata, Model};
use ecdit_model::text::{Tokenizer, Vocab, BOS, EOS};
use ecdit_model::train::checkpoint::CheckpointStore;
use ecdit_model::train::config::TrainConfig;
use ecdit_model::weights::Weights;
use serde_json::Value;
use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// What one input came to: `Ok` accepted, `Err` refused with this message.
pub type Outcome = Result<(), String>;

/// A target's entry point.
pub type Entry = fn(&[u8]) -> Outcome;

/// Every target: its name (the `fuzz_targets/<name>.rs` file and the
/// `corpus/<name>/` folder) and its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("safetensors_weights", safetensors_weights),
    ("model_config", model_config),
    ("component_spec", component_spec),
    ("tokenizer", tokenizer),
    ("prompt_file", prompt_file),
    ("checkpoint_meta", checkpoint_meta),
    ("plugin_descriptor", plugin_descriptor),
];

/// The small model weights files are bound to (MoE, text conditioning with
/// pooling, grouped-query attention, learned sigma: every kind of parameter).
pub const TINY_MODEL: &str = include_str!("tiny_model.json");

/// What every input shares, built once per process.
pub struct Fixture {
    /// Every shipped component, as `ecdit` builds them.
    pub registry: Registry,
    /// A one-thread CPU backend without oneDNN.
    pub backend: Arc<dyn Backend>,
    /// [`TINY_MODEL`], parsed.
    pub tiny: ModelConfig,
}

/// The shared [`Fixture`].
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        registry: ecdit_model::registry().expect("the shipped components register"),
        backend: Arc::new(CpuBackend::with_onednn(1, OneDnnMode::Off).expect("a one-thread CPU backend")),
        tiny: parse_config(TINY_MODEL, Path::new("fuzz/src/tiny_model.json")).expect("fuzz/src/tiny_model.json"),
    })
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Bytes read front to back; past the end every read gives zeros, so any
/// input decodes to something.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

// ---------------------------------------------------------------------------
// safetensors_weights: the weights reader (`Weights`) and the binder
// (`Model::from_weights`), as `ecdit generate` loads a model file.

/// A safetensors file from the input's bytes, bound to [`TINY_MODEL`]'s
/// parameters; its metadata config parsed as `Model::load` parses it, and
/// every tensor read back under its own shape.
pub fn safetensors_weights(data: &[u8]) -> Outcome {
    let f = fixture();
    let weights = Weights::from_bytes("<fuzz>.safetensors", data.to_vec()).map_err(text)?;
    // `Model::load` takes the config from the metadata. Parsed and validated
    // here but not built: a valid config may describe a model of gigabytes.
    if let Ok(config) = config_from_metadata(&weights) {
        let _ = config.validate();
    }
    let bound = Model::from_weights(f.tiny.clone(), &f.registry, f.backend.clone(), &weights, &[]);
    // Whatever the binding said, every tensor the header lists reads back
    // (offsets, dtype widening) or is refused by dtype, without a panic.
    for name in weights.names() {
        let shape = weights.shape(&name).expect("a listed tensor has a shape");
        if let Ok(values) = weights.get(&name, &shape) {
            assert_eq!(values.len(), shape.iter().product::<usize>(), "tensor '{name}'");
        }
    }
    bound.map(drop).map_err(text)
}

// ---------------------------------------------------------------------------
// model_config: model configs (`parse_config`: JSON + `validate`), the same
// text as a training config, and as upstream DiT's config.

/// Config text read three ways (an `ecdit` model config, a training config
/// with its model inline, an upstream DiT config as converted checkpoints
/// carry it); `Ok` when any of them accepts it.
pub fn model_config(data: &[u8]) -> Outcome {
    let text_in = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let path = Path::new("<fuzz>/config.json");
    let model = parse_config(text_in, path).map(|c| use_model_config(&c)).map_err(text);
    let train = serde_json::from_str::<TrainConfig>(text_in)
        .map_err(text)
        .and_then(|c| {
            c.model.validate().map_err(text)?;
            c.validate(Some(path)).map_err(text)?;
            use_model_config(&c.model);
            Ok(())
        });
    let upstream = serde_json::from_str::<Value>(text_in)
        .map_err(text)
        .and_then(|v| ModelConfig::from_upstream_dit(&v).map_err(text))
        .map(|c| use_model_config(&c));
    match (model, train, upstream) {
        (Ok(()), _, _) | (_, Ok(()), _) | (_, _, Ok(())) => Ok(()),
        (Err(e), _, _) => Err(e),
    }
}

/// What callers compute from a validated config, and the serde round trip a
/// saved model's metadata relies on.
fn use_model_config(c: &ModelConfig) {
    let _ = (c.tokens(), c.out_channels(), c.mlp_hidden(), c.head_dim());
    if let Some(moe) = &c.moe {
        for i in 0..c.depth.min(1024) {
            let _ = moe.is_moe_block(i);
        }
    }
    if let (Some(te), ecdit_model::config::Conditioning::Text { text_dim, .. }) = (&c.text_encoder, &c.conditioning) {
        let _ = (te.heads_for(*text_dim), te.mlp_hidden(*text_dim));
    }
    let json = serde_json::to_string(c).expect("a model config serialises");
    let back: ModelConfig = serde_json::from_str(&json).expect("a serialised model config parses");
    assert_eq!(&back, c, "model config round trip through {json}");
}

// ---------------------------------------------------------------------------
// component_spec: building a router, expert or scheduler from a JSON spec
// through the registry (`spec::split_spec`, `spec::check_params`, factories).

/// A JSON spec built as a router, an expert and a scheduler (and checked
/// against every backend's parameters); `Ok` when any family accepts it.
pub fn component_spec(data: &[u8]) -> Outcome {
    let spec: Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    let r = &fixture().registry;
    let mut errors = Vec::new();
    let mut accepted = false;
    match r.router(&spec) {
        Ok(router) => {
            accepted = true;
            for tokens in [1, 4, 256, 1 << 20] {
                let _ = router.check_tokens_per_sample(tokens);
            }
            let _ = router.couples_samples();
            let again = r.router(&router.spec()).expect("a built router's spec builds again");
            assert_eq!(again.spec(), router.spec(), "router spec round trip");
        }
        Err(e) => errors.push(e.to_string()),
    }
    match r.expert(&spec) {
        Ok(expert) => {
            accepted = true;
            let _ = (expert.hidden(8), expert.param_shapes(8, 2), expert.flops_per_token(8));
            let again = r.expert(&expert.spec()).expect("a built expert's spec builds again");
            assert_eq!(again.spec(), expert.spec(), "expert spec round trip");
        }
        Err(e) => errors.push(e.to_string()),
    }
    match r.scheduler(&spec) {
        Ok(scheduler) => {
            accepted = true;
            let _ = (scheduler.model_time(0.5), scheduler.sampling_times(4));
            let again = r
                .scheduler(&scheduler.spec())
                .expect("a built scheduler's spec builds again");
            assert_eq!(again.spec(), scheduler.spec(), "scheduler spec round trip");
        }
        Err(e) => errors.push(e.to_string()),
    }
    // Backends: the spec is checked against the backend's declared
    // parameters as `Registry::backend` checks it, but nothing is built
    // (building starts a thread pool or probes a GPU driver).
    match split_spec("backend", &spec) {
        Ok((kind, params)) => {
            let infos = r.list();
            match infos.iter().find(|i| i.family == Family::Backend && i.kind == kind) {
                Some(info) => match check_params(&format!("backend '{kind}'"), &info.params, &params) {
                    Ok(_) => accepted = true,
                    Err(e) => errors.push(e.to_string()),
                },
                None => errors.push(format!("no backend '{kind}'")),
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    if accepted {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn builtin_vocab() -> &'static Vocab {
    static VOCAB: OnceLock<Vocab> = OnceLock::new();
    VOCAB.get_or_init(|| Vocab::builtin().expect("the built-in vocabulary parses"))
}

// ---------------------------------------------------------------------------
// tokenizer: vocabulary files (`Vocab::parse`) and prompts (`Tokenizer`).

/// Input: one byte `max_tokens`, then vocabulary text up to the first NUL
/// byte, then a prompt. A vocabulary that does not parse is replaced by the
/// built-in one, so the prompt is tokenized either way; the outcome is the
/// vocabulary's (or the tokenizer's, for a bad `max_tokens`).
pub fn tokenizer(data: &[u8]) -> Outcome {
    let mut inp = Input(data);
    let max_tokens = inp.byte() as usize;
    let rest = inp.rest();
    let (vocab_bytes, prompt_bytes) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let parsed = std::str::from_utf8(vocab_bytes)
        .map_err(|e| format!("vocabulary not UTF-8: {e}"))
        .and_then(|t| Vocab::parse(t, "<fuzz>/vocab.txt").map_err(text));
    let vocab = match &parsed {
        Ok(v) => {
            for (id, token) in v.tokens().enumerate() {
                assert_eq!(v.id(token), Some(id as u32), "vocabulary token '{token}'");
            }
            v.clone()
        }
        Err(_) => builtin_vocab().clone(),
    };
    let (bos, eos, len) = (vocab.id(BOS), vocab.id(EOS), vocab.len());
    let tokenizer = Tokenizer::new(vocab, max_tokens).map_err(text)?;
    // A prompt comes from a command line or a file: any string.
    let prompt = String::from_utf8_lossy(prompt_bytes);
    let t = tokenizer.tokenize_quiet(&prompt);
    assert!(t.ids.len() >= 2 && t.ids.len() <= max_tokens, "{} ids", t.ids.len());
    assert_eq!(t.ids.first().copied(), bos);
    assert_eq!(t.ids.last().copied(), eos);
    assert!(
        t.ids.iter().all(|&id| (id as usize) < len),
        "an id out of the vocabulary"
    );
    let (ids, mask, l) = tokenizer.tokenize_batch(&[&prompt, ""]);
    assert_eq!((ids.len(), mask.len()), (2 * l, 2 * l));
    assert_eq!(&ids[..t.ids.len()], &t.ids[..]);
    parsed.map(drop)
}

// ---------------------------------------------------------------------------
// prompt_file: GenEval prompt metadata files (`parse_prompts`, as
// `read_prompts` reads `eval/prompts.jsonl`).

/// A prompt file; every prompt it accepts must write back to a line that
/// reads back the same.
pub fn prompt_file(data: &[u8]) -> Outcome {
    let text_in = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let specs = parse_prompts(text_in, Path::new("<fuzz>/prompts.jsonl")).map_err(text)?;
    for s in &specs {
        let line = s.to_json_line();
        let back = parse_prompt(&line).unwrap_or_else(|e| panic!("written line {line} does not read back: {e}"));
        assert_eq!(&back, s, "prompt round trip through {line}");
        for r in s.include.iter().chain(&s.exclude) {
            let _ = r.describe();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// checkpoint_meta: a checkpoint's `state.json` envelope and tensors file
// (`CheckpointStore::load_from_bytes`) and the training config in its state
// (what `--resume` reads next).

/// Flag bit: rewrite `tensors_file.bytes` and `.crc32` in `state.json` to
/// match the tensors, so the fuzzer reaches the tensor parsing behind the
/// checksum (which it cannot forge).
pub const CHECKPOINT_FIX_CRC: u8 = 1;
/// Flag bit: the checkpoint directory is named `step-00000007`, so the step
/// in `state.json` must agree with it.
pub const CHECKPOINT_STEP_DIR: u8 = 2;

/// Packs a checkpoint's two files as [`checkpoint_meta`] reads them.
pub fn pack_checkpoint(flags: u8, state: &[u8], tensors: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(state);
    out.extend_from_slice(tensors);
    out
}

/// Input: one flags byte, a u32 little-endian length, that many bytes of
/// `state.json`, then the tensors file.
pub fn checkpoint_meta(data: &[u8]) -> Outcome {
    let mut inp = Input(data);
    let flags = inp.byte();
    let n = inp.u32() as usize;
    let mut state = inp.take(n).to_vec();
    let tensors = inp.rest();
    if flags & CHECKPOINT_FIX_CRC != 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(&state) {
            if let Some(Value::Object(file)) = v.get_mut("tensors_file") {
                file.insert("bytes".into(), tensors.len().into());
                file.insert("crc32".into(), crc32fast::hash(tensors).into());
                state = serde_json::to_vec(&v).expect("JSON serialises");
            }
        }
    }
    let dir = if flags & CHECKPOINT_STEP_DIR != 0 {
        "run/checkpoints/step-00000007"
    } else {
        "run/checkpoints/latest"
    };
    let loaded = CheckpointStore::load_from_bytes(Path::new(dir), &state, tensors).map_err(text)?;
    for (name, t) in &loaded.tensors {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(
            numel.map(|n| n * t.dtype.size()),
            Some(t.bytes.len()),
            "tensor '{name}'"
        );
        if let Some(values) = t.to_f32_vec() {
            assert_eq!(Some(values.len()), numel, "tensor '{name}'");
        }
    }
    // Resuming reads the run's training config and counters from the state.
    if let Ok(config) = serde_json::from_value::<TrainConfig>(loaded.state["config"].clone()) {
        if config.model.validate().is_ok() && config.validate(None).is_ok() {
            use_model_config(&config.model);
        }
    }
    let _ = (loaded.state["step"].as_u64(), loaded.state["optimizer_steps"].as_u64());
    Ok(())
}

// ---------------------------------------------------------------------------
// plugin_descriptor: the host's checks of a plugin's descriptor and tables
// (`register_descriptor`, what `plugin::load` runs on the entry's result),
// on a fake descriptor built in memory from the input.

/// Every string, table and array a fake descriptor points into, kept alive
/// until the registry that read it is gone.
#[derive(Default)]
struct Keep {
    strings: Vec<CString>,
    tables: Vec<Box<[u64]>>,
    arrays: Vec<Box<[*const c_void]>>,
}

/// Stands in for every non-null function slot. The host must not call a
/// plugin while checking its descriptor; if it does, this aborts and the
/// fuzzer reports it.
unsafe extern "C" fn not_called() {
    eprintln!("the host called a plugin function while checking a descriptor");
    std::process::abort();
}

// The four table kinds share this header, so one writer fills them all.
macro_rules! check_header_layout {
    ($($t:ty),*) => {$(
        const _: () = assert!(
            offset_of!($t, kind) == 8
                && offset_of!($t, description) == 16
                && offset_of!($t, params_json) == 24
                && offset_of!($t, ctx) == 32
                && offset_of!($t, create) == 40
                && size_of::<$t>() % 8 == 0
        );
    )*};
}
check_header_layout!(RouterVtable, SchedulerVtable, BackendVtable, ExpertVtable);

/// Spelling of a fake descriptor's fields in the input (see [`plugin_descriptor`]).
pub mod desc_bytes {
    /// A string: this byte, then its length (up to 254) and bytes; 0xFF = NULL.
    pub const NULL_STRING: u8 = 0xFF;
    /// An `abi_version` byte: 0 = 2 (this host's), 1 = 1, 2 = 3, 3 = a u32 that follows.
    pub const VERSION_2: u8 = 0;
    /// ABI version 1 (see [`VERSION_2`]).
    pub const VERSION_1: u8 = 1;
    /// A `struct_size` byte: 0 = exact, 1 = a byte that follows, 2 = exact plus a
    /// byte that follows, 3 = a u32 that follows.
    pub const SIZE_EXACT: u8 = 0;
    /// The slots byte: 0 = all filled, 1 = all NULL, other = a bitmap follows.
    pub const SLOTS_ALL: u8 = 0;
}

fn version(inp: &mut Input<'_>) -> u32 {
    match inp.byte() % 4 {
        0 => 2,
        1 => 1,
        2 => 3,
        _ => inp.u32(),
    }
}

fn struct_size(inp: &mut Input<'_>, exact: usize) -> u32 {
    match inp.byte() % 4 {
        0 => exact as u32,
        1 => inp.byte() as u32,
        2 => exact as u32 + inp.byte() as u32,
        _ => inp.u32(),
    }
}

impl Keep {
    fn string(&mut self, inp: &mut Input<'_>) -> *const c_char {
        let n = inp.byte();
        if n == desc_bytes::NULL_STRING {
            return std::ptr::null();
        }
        let bytes = inp.take(n as usize);
        // C sees a string up to its first NUL.
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let s = CString::new(&bytes[..end]).expect("no NUL before end");
        let p = s.as_ptr();
        self.strings.push(s);
        p
    }

    /// One table of `size` bytes: header, three strings, a NULL `ctx`, and
    /// its function slots (from offset 40 on) filled or NULL.
    fn table(&mut self, inp: &mut Input<'_>, size: usize) -> *const c_void {
        let mut words = vec![0u64; size / 8].into_boxed_slice();
        let base = words.as_mut_ptr() as *mut u8;
        let (v, s) = (version(inp), struct_size(inp, size));
        // SAFETY: the buffer has `size` >= 40 bytes, 8-aligned.
        unsafe {
            std::ptr::write(base as *mut u32, v);
            std::ptr::write(base.add(4) as *mut u32, s);
        }
        for word in 1..4 {
            words[word] = self.string(inp) as usize as u64;
        }
        let mode = inp.byte();
        let mut bits = 0u8;
        for (i, slot) in words[5..].iter_mut().enumerate() {
            let filled = match mode {
                0 => true,
                1 => false,
                _ => {
                    if i % 8 == 0 {
                        bits = inp.byte();
                    }
                    bits >> (i % 8) & 1 == 1
                }
            };
            if filled {
                *slot = not_called as *const () as usize as u64;
            }
        }
        let p = words.as_ptr() as *const c_void;
        self.tables.push(words);
        p
    }

    /// The count and array of one family's tables: 0 to 3 tables; then the
    /// mode: a true count, a NULL array, a NULL entry, or a count above the
    /// host's limit over a short array (which the host must refuse unread).
    fn family(&mut self, inp: &mut Input<'_>, size: usize) -> (usize, *const c_void) {
        let b = inp.byte();
        let n = (b % 4) as usize;
        let mut tables: Vec<*const c_void> = (0..n).map(|_| self.table(inp, size)).collect();
        let count = match (b >> 2) % 4 {
            2 => return (n.max(1), std::ptr::null()),
            3 if n > 0 => {
                let i = inp.byte() as usize % n;
                tables[i] = std::ptr::null();
                n
            }
            3 => 4097 + inp.u32() as usize,
            _ => n,
        };
        // Never empty: a pointer the host may be handed must point somewhere.
        tables.push(std::ptr::null());
        let array = tables.into_boxed_slice();
        let p = array.as_ptr() as *const c_void;
        self.arrays.push(array);
        (count, p)
    }

    /// A NULL-terminated list of up to 4 strings, or NULL.
    fn string_list(&mut self, inp: &mut Input<'_>) -> *const *const c_char {
        let b = inp.byte();
        if b == 0 {
            return std::ptr::null();
        }
        let mut list: Vec<*const c_void> = Vec::new();
        for _ in 0..b % 5 {
            let s = self.string(inp);
            if !s.is_null() {
                list.push(s as *const c_void);
            }
        }
        list.push(std::ptr::null());
        let array = list.into_boxed_slice();
        let p = array.as_ptr() as *const *const c_char;
        self.arrays.push(array);
        p
    }
}

/// Input: a flags byte (bit 0: the registry already holds the shipped
/// routers, experts and schedulers, so kinds can clash), then the
/// descriptor: version, size, name, version string, then routers,
/// schedulers, backends and experts (each a [`Keep::family`]), then the
/// features list. Every table is version, size, kind, description,
/// params_json and a slots byte ([`desc_bytes`]).
pub fn plugin_descriptor(data: &[u8]) -> Outcome {
    let mut inp = Input(data);
    let mut keep = Keep::default();
    let flags = inp.byte();
    // SAFETY: all-zero is a valid descriptor (NULL pointers, zero counts).
    let mut desc: Box<PluginDesc> = Box::new(unsafe { std::mem::zeroed() });
    desc.abi_version = version(&mut inp);
    desc.struct_size = struct_size(&mut inp, size_of::<PluginDesc>());
    desc.name = keep.string(&mut inp);
    desc.version = keep.string(&mut inp);
    let (n, p) = keep.family(&mut inp, size_of::<RouterVtable>());
    (desc.n_routers, desc.routers) = (n, p as _);
    let (n, p) = keep.family(&mut inp, size_of::<SchedulerVtable>());
    (desc.n_schedulers, desc.schedulers) = (n, p as _);
    let (n, p) = keep.family(&mut inp, size_of::<BackendVtable>());
    (desc.n_backends, desc.backends) = (n, p as _);
    let (n, p) = keep.family(&mut inp, size_of::<ExpertVtable>());
    (desc.n_experts, desc.experts) = (n, p as _);
    desc.features = keep.string_list(&mut inp);

    let mut registry = Registry::new();
    if flags & 1 != 0 {
        ecdit_routers::register(&mut registry).expect("routers register");
        ecdit_schedulers::register(&mut registry).expect("schedulers register");
    }
    let before = registry.list();
    // SAFETY: every pointer in the descriptor leads into `keep` or to a
    // function, and outlives `registry`; no component is built (that would
    // call the plugin).
    let result = unsafe { register_descriptor(&mut registry, &*desc, "<fuzz>") };
    let after = registry.list();
    let outcome = match result {
        Ok(info) => {
            // All of the plugin's components, and nothing else, were added.
            assert_eq!(after.len(), before.len() + info.components.len());
            for c in &info.components {
                assert!(after.contains(c), "{} '{}' not registered", c.family, c.kind);
            }
            Ok(())
        }
        Err(e) => {
            // None of them.
            assert_eq!(after, before, "a refused plugin left components behind: {e}");
            Err(e.to_string())
        }
    };
    drop(registry);
    drop(keep);
    outcome
}

/// Encodes a fake descriptor for [`plugin_descriptor`] (the seed corpus):
/// `version` is a [`desc_bytes`] version code for the descriptor and every
/// table, sizes are exact and every slot is filled; a family is a list of
/// `(kind, params_json)`; `name` `None` is a NULL name.
pub fn encode_descriptor(
    clash: bool,
    version: u8,
    name: Option<&str>,
    families: [&[(&str, &str)]; 4],
    features: &[&str],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => {
                assert!(s.len() < desc_bytes::NULL_STRING as usize);
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
            None => out.push(desc_bytes::NULL_STRING),
        }
    }
    let mut out = vec![clash as u8, version, desc_bytes::SIZE_EXACT];
    string(&mut out, name);
    string(&mut out, Some("1.0.0"));
    for family in families {
        assert!(family.len() < 4);
        out.push(family.len() as u8);
        for (kind, params) in family {
            out.extend_from_slice(&[version, desc_bytes::SIZE_EXACT]);
            string(&mut out, Some(kind));
            string(&mut out, Some("a fake component"));
            string(&mut out, Some(params));
            out.push(desc_bytes::SLOTS_ALL);
        }
    }
    assert!(features.len() < 5);
    out.push(if features.is_empty() {
        0
    } else {
        5 + features.len() as u8
    });
    for f in features {
        string(&mut out, Some(f));
    }
    out
}
