//! Tokenizer and vocabulary: splitting, unknown words, truncation, the empty
//! prompt, and errors for bad vocabulary files.

use ecdit_model::text::{Tokenizer, Vocab, BOS, EOS, PAD, UNK};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Runs `f` with a tracing subscriber that records formatted log lines.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

fn tokenizer(max_tokens: usize) -> Tokenizer {
    Tokenizer::new(Vocab::builtin().unwrap(), max_tokens).unwrap()
}

fn ids(t: &Tokenizer, words: &[&str]) -> Vec<u32> {
    words
        .iter()
        .map(|w| t.vocab().id(w).unwrap_or_else(|| panic!("'{w}' not in vocab")))
        .collect()
}

#[test]
fn splits_on_whitespace_and_punctuation_and_lowercases() {
    assert_eq!(
        Tokenizer::words("A photo of a RED circle,and a blue  square."),
        ["a", "photo", "of", "a", "red", "circle", ",", "and", "a", "blue", "square", "."]
    );
    assert_eq!(Tokenizer::words("  \t\n"), Vec::<String>::new());
    assert_eq!(Tokenizer::words("two-stars"), ["two", "-", "stars"]);
}

#[test]
fn known_prompt_maps_to_its_ids_between_bos_and_eos() {
    let t = tokenizer(32);
    let (out, logs) = capture_logs(|| t.tokenize("A red circle, left of a blue square."));
    let expect = ids(
        &t,
        &[
            BOS, "a", "red", "circle", ",", "left", "of", "a", "blue", "square", ".", EOS,
        ],
    );
    assert_eq!(out.ids, expect);
    assert!(out.unknown.is_empty() && !out.truncated);
    assert!(logs.is_empty(), "no warnings expected, got: {logs}");
}

#[test]
fn unknown_word_maps_to_unk_and_warns_naming_it() {
    let t = tokenizer(32);
    let (out, logs) = capture_logs(|| t.tokenize("a red zeppelin"));
    assert_eq!(out.ids, ids(&t, &[BOS, "a", "red", UNK, EOS]));
    assert_eq!(out.unknown, ["zeppelin"]);
    assert!(logs.contains("WARN") && logs.contains("zeppelin"), "logs: {logs}");
}

#[test]
fn long_prompt_is_truncated_to_max_tokens_with_a_warning() {
    let t = tokenizer(5);
    let (out, logs) = capture_logs(|| t.tokenize("one two three four five six"));
    assert_eq!(out.ids, ids(&t, &[BOS, "one", "two", "three", EOS]));
    assert!(out.truncated);
    assert!(logs.contains("truncated"), "logs: {logs}");
    // Exactly max_tokens after bos/eos is not truncated.
    let exact = t.tokenize_quiet("one two three");
    assert_eq!(exact.ids.len(), 5);
    assert!(!exact.truncated);
}

#[test]
fn empty_prompt_is_bos_eos() {
    let t = tokenizer(8);
    assert_eq!(t.tokenize("").ids, ids(&t, &[BOS, EOS]));
    assert_eq!(t.tokenize(" , ").ids, ids(&t, &[BOS, ",", EOS]));
}

#[test]
fn batch_pads_to_longest_prompt_with_mask() {
    let t = tokenizer(16);
    let (batch, mask, len) = t.tokenize_batch(&["", "a red star"]);
    assert_eq!(len, 5);
    let pad = t.vocab().id(PAD).unwrap();
    assert_eq!(&batch[..5], &[ids(&t, &[BOS, EOS]), vec![pad; 3]].concat()[..]);
    assert_eq!(&batch[5..], &ids(&t, &[BOS, "a", "red", "star", EOS])[..]);
    assert_eq!(mask, [1, 1, 0, 0, 0, 1, 1, 1, 1, 1]);
}

#[test]
fn max_tokens_below_two_is_refused() {
    let err = Tokenizer::new(Vocab::builtin().unwrap(), 1).unwrap_err();
    assert!(err.to_string().contains("max_tokens = 1"), "{err}");
}

#[test]
fn builtin_vocab_covers_the_data_world() {
    let v = Vocab::builtin().unwrap();
    for w in [
        "a", "photo", "of", "and", "circle", "square", "triangle", "star", "ring", "cross", "heart", "circles",
        "crosses", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "one", "two", "three",
        "four", "2", "left", "right", "above", "below", ",", ".",
    ] {
        assert!(v.id(w).is_some(), "built-in vocab lacks '{w}'");
    }
    assert_eq!(v.token(v.id("star").unwrap()), Some("star"));
}

#[test]
fn bad_vocab_files_name_path_and_line() {
    let dir = std::env::temp_dir().join(format!("ecdit-vocab-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "dup.txt",
            "<pad>\n<unk>\n<bos>\n<eos>\nred\nblue\nred\n",
            "line 7",
            "duplicate token 'red' (first on line 5)",
        ),
        ("blank.txt", "<pad>\n<unk>\n\n<bos>\n<eos>\n", "line 3", "empty line"),
        (
            "nospecial.txt",
            "<pad>\n<unk>\n<bos>\nred\n",
            "line 0",
            "missing the special token '<eos>'",
        ),
        ("empty.txt", "", "line 0", "no tokens"),
    ];
    for (file, text, line, reason) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let err = Vocab::from_path(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(line) && err.contains(reason), "{file}: {err}");
    }
    let good = dir.join("good.txt");
    std::fs::write(&good, "<pad>\n<unk>\n<bos>\n<eos>\nzeppelin\n").unwrap();
    let v = Vocab::from_path(&good).unwrap();
    assert_eq!((v.len(), v.id("zeppelin")), (5, Some(4)));
    let missing = dir.join("missing.txt");
    let err = Vocab::from_path(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.txt"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
