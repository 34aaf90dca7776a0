//! A word-level tokenizer over a vocabulary file.
//!
//! Prompts are lowercased and split on whitespace and punctuation; each
//! punctuation character is a token of its own. Every prompt becomes
//! `<bos> words... <eos>`, so even the empty prompt has two tokens and
//! attention always has a key. Words outside the vocabulary map to `<unk>`
//! with a warning naming the word; prompts longer than `max_tokens` are
//! truncated (keeping `<bos>` and `<eos>`) with a warning.

use super::TextError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The vocabulary shipped for the built-in data world (shapes, colours,
/// counts, positions), one token per line.
pub const BUILTIN_VOCAB: &str = include_str!("../../assets/vocab.txt");

/// Padding token; its mask entry is 0.
pub const PAD: &str = "<pad>";
/// Stand-in for words outside the vocabulary.
pub const UNK: &str = "<unk>";
/// Start of every prompt.
pub const BOS: &str = "<bos>";
/// End of every prompt.
pub const EOS: &str = "<eos>";

/// A vocabulary: token strings and their ids (line order, from 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// Where the vocabulary came from (`<built-in>` or a path), for messages.
    source: String,
}

impl Vocab {
    /// The built-in vocabulary.
    pub fn builtin() -> Result<Self, TextError> {
        Self::parse(BUILTIN_VOCAB, "<built-in>")
    }

    /// Reads a vocabulary file: one token per line, no blank lines, no
    /// duplicates, and the four special tokens somewhere in it.
    pub fn from_path(path: &Path) -> Result<Self, TextError> {
        let text = crate::limits::read_text_file(path).map_err(|source| TextError::Io {
            path: PathBuf::from(path),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses vocabulary text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, TextError> {
        let bad = |line: usize, reason: String| TextError::Vocab {
            origin: source.to_string(),
            line,
            reason,
        };
        let mut tokens = Vec::new();
        let mut ids = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let token = raw.trim();
            if token.is_empty() {
                return Err(bad(line, "empty line (one token per line)".into()));
            }
            if token.chars().any(char::is_whitespace) {
                return Err(bad(line, format!("token '{token}' contains whitespace")));
            }
            let id = tokens.len() as u32;
            if let Some(first) = ids.insert(token.to_string(), id) {
                return Err(bad(
                    line,
                    format!("duplicate token '{token}' (first on line {})", first + 1),
                ));
            }
            tokens.push(token.to_string());
        }
        if tokens.is_empty() {
            return Err(bad(0, "the file has no tokens".into()));
        }
        for special in [PAD, UNK, BOS, EOS] {
            if !ids.contains_key(special) {
                return Err(bad(0, format!("missing the special token '{special}'")));
            }
        }
        Ok(Self {
            tokens,
            ids,
            source: source.to_string(),
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Every token, in id order (special tokens such as `<pad>` included).
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(String::as_str)
    }

    /// Always false: a parsed vocabulary holds at least the special tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The id of `token`, if present.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The token of `id`, if in range.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Where the vocabulary came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn special(&self, token: &str) -> u32 {
        // `parse` guarantees the special tokens exist.
        self.ids[token]
    }
}

/// The ids of one tokenized prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    /// `<bos> words... <eos>`, at most `max_tokens` long.
    pub ids: Vec<u32>,
    /// Words that mapped to `<unk>`.
    pub unknown: Vec<String>,
    /// Whether the prompt was cut to fit `max_tokens`.
    pub truncated: bool,
}

/// Word-level tokenizer with a fixed maximum length.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenizer {
    vocab: Vocab,
    max_tokens: usize,
}

impl Tokenizer {
    /// A tokenizer over `vocab` producing at most `max_tokens` ids per prompt
    /// (at least 2: `<bos>` and `<eos>`).
    pub fn new(vocab: Vocab, max_tokens: usize) -> Result<Self, TextError> {
        if max_tokens < 2 {
            return Err(TextError::Config {
                field: "max_tokens".into(),
                value: max_tokens.to_string(),
                reason: "must be at least 2 (<bos> and <eos>)".into(),
            });
        }
        Ok(Self { vocab, max_tokens })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Longest output in ids.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.vocab.special(PAD)
    }

    /// Splits a prompt into lowercase words and punctuation marks.
    pub fn words(prompt: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        for ch in prompt.chars() {
            if ch.is_alphanumeric() {
                word.extend(ch.to_lowercase());
                continue;
            }
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            if !ch.is_whitespace() && !ch.is_control() {
                words.push(ch.to_string());
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
        words
    }

    /// Tokenizes one prompt without logging.
    pub fn tokenize_quiet(&self, prompt: &str) -> Tokenized {
        let unk = self.vocab.special(UNK);
        let mut ids = vec![self.vocab.special(BOS)];
        let mut unknown = Vec::new();
        for word in Self::words(prompt) {
            match self.vocab.id(&word) {
                Some(id) => ids.push(id),
                None => {
                    ids.push(unk);
                    unknown.push(word);
                }
            }
        }
        let truncated = ids.len() + 1 > self.max_tokens;
        ids.truncate(self.max_tokens - 1);
        ids.push(self.vocab.special(EOS));
        Tokenized {
            ids,
            unknown,
            truncated,
        }
    }

    /// Tokenizes one prompt, warning about unknown words and truncation.
    pub fn tokenize(&self, prompt: &str) -> Tokenized {
        let t = self.tokenize_quiet(prompt);
        for word in &t.unknown {
            tracing::warn!(word = %word, vocab = %self.vocab.source, "unknown word in prompt, using <unk>");
        }
        if t.truncated {
            tracing::warn!(
                max_tokens = self.max_tokens,
                prompt = %prompt,
                "prompt longer than max_tokens, truncated"
            );
        }
        t
    }

    /// Tokenizes a batch and pads it to its longest prompt.
    /// Returns ids [B, L], mask [B, L] (1 = real token) and L.
    pub fn tokenize_batch(&self, prompts: &[&str]) -> (Vec<u32>, Vec<u8>, usize) {
        let rows: Vec<Tokenized> = prompts.iter().map(|p| self.tokenize(p)).collect();
        let len = rows.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let mut ids = vec![self.pad_id(); rows.len() * len];
        let mut mask = vec![0u8; rows.len() * len];
        for (b, row) in rows.iter().enumerate() {
            ids[b * len..b * len + row.ids.len()].copy_from_slice(&row.ids);
            mask[b * len..b * len + row.ids.len()].fill(1);
        }
        (ids, mask, len)
    }
}
