//! The CLIP BPE tokenizer, as transformers 5.23's `CLIPTokenizer` (tokenizers backend,
//! `models/clip/tokenization_clip.py`) runs when diffusers' StableDiffusionPipeline calls
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
//!
//! Steps, each as in the `tokenizers` library:
//! 1. split the raw prompt on the added (special) tokens that are not `normalized`
//!    (leftmost-longest match), e.g. `<|endoftext|>`, or tiny-b's pad token `!`;
//! 2. normalize the rest: NFC, `\s+` → `" "`, per-char lowercase (no final-sigma rule);
//!    then split on the `normalized` added tokens;
//! 3. pre-tokenize with CLIP's regex (contractions, `\p{L}+`, one `\p{N}`, punctuation runs),
//!    then the ByteLevel pre-tokenizer (GPT-2's regex again, bytes → printable chars);
//! 4. BPE by merge rank, `</w>` appended to each word's last symbol, unknown symbols → unk;
//! 5. BOS + ids[..max_length-2] + EOS, right-padded with the pad token to `max_length`.
//!
//! Loads `vocab.json` + `merges.txt` (+ `special_tokens_map.json`/`tokenizer_config.json`,
//! the hub SD1.x layout) or `tokenizer.json` (+ `tokenizer_config.json`, newer saves).
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use tch::Tensor;
use unicode_normalization::UnicodeNormalization;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer.__init__`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's ByteLevel pattern. Its `\s+(?!\S)|\s+` tail is reduced to `\s+`: the pieces it
/// runs on (matches of `CLIP_PATTERN`) never contain whitespace.
const BYTE_LEVEL_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
const END_OF_WORD: &str = "</w>";
/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order (later entries win on flags).
const NAMED_SPECIALS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
/// `CLIPTokenizer.__init__`'s defaults.
const DEFAULTS: [(&str, &str); 4] = [
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("unk_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];
const CACHE_LIMIT: usize = 10_000;
/// Token ids must lie in `[0, MAX_TOKEN_ID)` (far above any vocabulary size).
const MAX_TOKEN_ID: i64 = 1 << 24;

/// A token matched on the text before BPE (`tokenizers`' AddedToken).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: i64,
    /// Matched on the normalized text instead of the raw text.
    normalized: bool,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    /// (left id, right id) → (rank, merged id)
    merges: HashMap<(i64, i64), (usize, i64)>,
    added: Vec<AddedToken>,
    byte_encoder: [char; 256],
    clip_re: Regex,
    byte_re: Regex,
    cache: Mutex<HashMap<String, Vec<i64>>>,
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
    pub unk: i64,
    /// `model_max_length` of tokenizer_config.json (77 when absent or "unlimited").
    pub max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder (e.g. `<pipeline>/tokenizer`): `tokenizer.json` when present
    /// (as transformers prefers it), else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let json_file = dir.join("tokenizer.json");
        let (vocab, merges, mut added) = if json_file.is_file() {
            load_tokenizer_json(&json_file)?
        } else {
            let (vocab_file, merges_file) = (dir.join("vocab.json"), dir.join("merges.txt"));
            for f in [&vocab_file, &merges_file] {
                if !f.is_file() {
                    bail!(
                        "{}: missing tokenizer file {} (a CLIP tokenizer needs vocab.json + merges.txt, or tokenizer.json)",
                        dir.display(),
                        f.file_name().unwrap_or_default().to_string_lossy()
                    );
                }
            }
            let vocab: HashMap<String, i64> = serde_json::from_value(read_json(&vocab_file)?)
                .with_context(|| format!("{}: not a {{token: id}} map", vocab_file.display()))?;
            let text = std::fs::read_to_string(&merges_file)
                .with_context(|| format!("cannot read {}", merges_file.display()))?;
            let mut merges = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.starts_with("#version") || line.is_empty() {
                    continue;
                }
                match line.split(' ').collect::<Vec<_>>()[..] {
                    [a, b] => merges.push((a.to_string(), b.to_string())),
                    _ => bail!("{}:{}: not a merge `a b`", merges_file.display(), i + 1),
                }
            }
            let decoder = config.as_ref().and_then(|c| c.get("added_tokens_decoder"));
            let added = match decoder.and_then(Value::as_object) {
                Some(map) => map
                    .iter()
                    .map(|(id, t)| {
                        let id = id.parse().ok().with_context(|| {
                            format!("tokenizer_config.json: added_tokens_decoder id {id:?}")
                        })?;
                        added_token(t, Some(id), false)
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            (vocab, merges, added)
        };
        // Ids index the text encoder's embedding table: a negative or absurd id is a broken file.
        let bad_id = vocab
            .iter()
            .map(|(t, &id)| (t.as_str(), id))
            .chain(added.iter().map(|t| (t.content.as_str(), t.id)))
            .find(|(_, id)| !(0..MAX_TOKEN_ID).contains(id));
        if let Some((token, id)) = bad_id {
            let token: String = token.chars().take(40).collect();
            bail!(
                "{}: token {token:?} has id {id}, expected 0 ≤ id < {MAX_TOKEN_ID}",
                dir.display()
            );
        }
        // Tokens of tokenizer.json / `added_tokens_decoder` keep their flags.
        let fixed = added.len();

        // Named special tokens: tokenizer_config.json, overridden by special_tokens_map.json
        // when the config has no `added_tokens_decoder` (transformers' legacy path).
        let mut named: HashMap<&str, Value> = HashMap::new();
        let has_decoder = config
            .as_ref()
            .is_some_and(|c| c.get("added_tokens_decoder").is_some());
        let stm = match has_decoder {
            true => None,
            false => read_optional_json(&dir.join("special_tokens_map.json"))?,
        };
        for source in [&config, &stm].into_iter().flatten() {
            for key in NAMED_SPECIALS {
                if let Some(v) = source.get(key).filter(|v| !v.is_null()) {
                    named.insert(key, v.clone());
                }
            }
        }
        let mut next_id = vocab
            .values()
            .chain(added.iter().map(|t| &t.id))
            .max()
            .map_or(0, |m| m + 1);
        let mut ids = HashMap::new();
        // In transformers' order; a later file-given token sets the flags of an earlier one
        // with the same content (strings: not normalized); class defaults never change flags.
        for key in NAMED_SPECIALS {
            let (content, normalized) = match named.get(key) {
                Some(Value::String(s)) => (s.clone(), Some(false)),
                Some(v @ Value::Object(_)) => {
                    let t = added_token(v, Some(0), false)?;
                    (t.content, Some(t.normalized))
                }
                Some(v) => bail!("{}: {key} is {v}, expected a string", dir.display()),
                None => match DEFAULTS.iter().find(|(k, _)| *k == key) {
                    Some((_, d)) => (d.to_string(), None),
                    None => continue,
                },
            };
            let id = match added.iter().position(|t| t.content == content) {
                Some(i) => {
                    if let (true, Some(n)) = (i >= fixed, normalized) {
                        added[i].normalized = n;
                    }
                    added[i].id
                }
                None => {
                    let id = vocab.get(&content).copied().unwrap_or_else(|| {
                        next_id += 1;
                        next_id - 1
                    });
                    added.push(AddedToken {
                        content,
                        id,
                        normalized: normalized.unwrap_or(false),
                    });
                    id
                }
            };
            ids.insert(key, id);
        }
        // transformers writes 1e30 (VERY_LARGE_INTEGER) when a tokenizer has no limit; CLIP's
        // text encoder takes 77 positions, so that (and a missing value) means 77.
        let max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => 77,
            Some(v) => match v.as_f64() {
                Some(n) if n > 1e6 => 77,
                Some(n) if n >= 2.0 && n.fract() == 0.0 => n as usize,
                _ => bail!("{}: model_max_length {v} is not usable", dir.display()),
            },
        };
        let merges = merges
            .iter()
            .enumerate()
            .map(|(rank, (a, b))| {
                let id = |t: &str| {
                    vocab.get(t).copied().with_context(|| {
                        format!(
                            "{}: merge {} ({a} {b}) uses {t:?}, which is not in the vocabulary",
                            dir.display(),
                            rank + 1
                        )
                    })
                };
                Ok(((id(a)?, id(b)?), (rank, id(&format!("{a}{b}"))?)))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        // Longest first, so a scan that takes the first match takes the longest one.
        added.sort_by_key(|t| Reverse(t.content.len()));
        Ok(Self {
            vocab,
            merges,
            added,
            byte_encoder: bytes_to_unicode(),
            clip_re: Regex::new(CLIP_PATTERN)?,
            byte_re: Regex::new(BYTE_LEVEL_PATTERN)?,
            cache: Mutex::new(HashMap::new()),
            bos: ids["bos_token"],
            eos: ids["eos_token"],
            pad: ids["pad_token"],
            unk: ids["unk_token"],
            max_length,
        })
    }

    /// `<pipeline>/tokenizer`.
    pub fn load(folder: &crate::io::folder::DiffusersFolder) -> Result<Self> {
        Self::from_dir(&folder.component("tokenizer")?)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Ids without BOS/EOS, padding or truncation.
    pub fn tokenize(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for (raw, special) in split_added(text, &self.added, false) {
            if let Some(id) = special {
                ids.push(id);
                continue;
            }
            let normalized = normalize(raw);
            for (piece, special) in split_added(&normalized, &self.added, true) {
                match special {
                    Some(id) => ids.push(id),
                    None => self.tokenize_normalized(piece, &mut ids),
                }
            }
        }
        ids
    }

    fn tokenize_normalized(&self, text: &str, ids: &mut Vec<i64>) {
        for word in self.clip_re.find_iter(text) {
            for piece in self.byte_re.find_iter(word.as_str()) {
                let mapped: String = piece
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_encoder[b as usize])
                    .collect();
                ids.extend(self.bpe(&mapped));
            }
        }
    }

    /// BPE of one byte-mapped word: lowest-rank pair first (leftmost on ties), as
    /// `tokenizers`' `Word::merge_all`.
    fn bpe(&self, word: &str) -> Vec<i64> {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(word).cloned()) {
            return ids;
        }
        let n = word.chars().count();
        let symbols: Vec<i64> = word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let s = if i + 1 == n {
                    format!("{c}{END_OF_WORD}")
                } else {
                    c.to_string()
                };
                self.vocab.get(&s).copied().unwrap_or(self.unk)
            })
            .collect();
        let symbols = self.merge_all(symbols);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), symbols.clone());
        }
        symbols
    }

    /// Applies merges to `ids` by (rank, position) with a heap over a linked list of symbols,
    /// O(n log n) in the word length (`tokenizers`' `Word::merge_all`).
    fn merge_all(&self, mut ids: Vec<i64>) -> Vec<i64> {
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).collect(); // n = none
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let pair = |ids: &[i64], next: &[usize], i: usize| {
            let j = *next.get(i)?;
            let &(rank, merged) = self.merges.get(&(ids[i], *ids.get(j)?))?;
            Some(Reverse((rank, i, ids[i], ids[j], merged)))
        };
        heap.extend((0..n).filter_map(|i| pair(&ids, &next, i)));
        while let Some(Reverse((_, i, a, b, merged))) = heap.pop() {
            let j = next[i];
            // Skip entries that earlier merges made stale.
            if !alive[i] || j >= n || ids[i] != a || ids[j] != b {
                continue;
            }
            ids[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = Some(i);
            }
            heap.extend(prev[i].and_then(|p| pair(&ids, &next, p)));
            heap.extend(pair(&ids, &next, i));
        }
        (0..n).filter(|&i| alive[i]).map(|i| ids[i]).collect()
    }

    /// `max_length` ids: BOS, the prompt's ids truncated to `max_length - 2`, EOS, pad.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = self.tokenize(text);
        ids.truncate(self.max_length.saturating_sub(2));
        let mut out = Vec::with_capacity(self.max_length);
        out.push(self.bos);
        out.extend(ids);
        out.push(self.eos);
        out.resize(self.max_length, self.pad);
        out
    }

    /// `[B, max_length]` Int64 ids.
    pub fn encode_batch(&self, texts: &[&str]) -> Tensor {
        let flat: Vec<i64> = texts.iter().flat_map(|t| self.encode(t)).collect();
        Tensor::from_slice(&flat).view([texts.len() as i64, self.max_length as i64])
    }
}

/// tokenizers' `Sequence[NFC, Replace(\s+, " "), Lowercase]`; lowercase is per char.
fn normalize(text: &str) -> String {
    static WS: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let ws = WS.get_or_init(|| Regex::new(r"\s+").expect("valid regex"));
    let nfc: String = text.nfc().collect();
    ws.replace_all(&nfc, " ")
        .chars()
        .flat_map(char::to_lowercase)
        .collect()
}

/// Splits `text` on the added tokens whose `normalized` flag is `normalized` (leftmost,
/// longest first): `(piece, Some(id))` for a token, `(piece, None)` for text between tokens.
fn split_added<'a>(
    text: &'a str,
    added: &[AddedToken],
    normalized: bool,
) -> Vec<(&'a str, Option<i64>)> {
    let tokens: Vec<&AddedToken> = added
        .iter()
        .filter(|t| t.normalized == normalized && !t.content.is_empty())
        .collect();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        let rest = &text[i..];
        if let Some(t) = tokens.iter().find(|t| rest.starts_with(t.content.as_str())) {
            if start < i {
                out.push((&text[start..i], None));
            }
            out.push((&text[i..i + t.content.len()], Some(t.id)));
            i += t.content.len();
            start = i;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push((&text[start..], None));
    }
    out
}

/// GPT-2's reversible byte → printable-char table.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

/// An AddedToken from JSON: a string, or `{content, normalized?, lstrip?, rstrip?, single_word?}`.
fn added_token(v: &Value, id: Option<i64>, default_normalized: bool) -> Result<AddedToken> {
    let id = match (id, v.get("id").and_then(Value::as_i64)) {
        (_, Some(id)) | (Some(id), None) => id,
        (None, None) => bail!("added token {v} has no id"),
    };
    if let Some(s) = v.as_str() {
        return Ok(AddedToken {
            content: s.to_string(),
            id,
            normalized: default_normalized,
        });
    }
    let content = v
        .get("content")
        .and_then(Value::as_str)
        .with_context(|| format!("added token {v} has no content"))?;
    for flag in ["lstrip", "rstrip", "single_word"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            bail!("added token {content:?}: {flag}=true is not supported");
        }
    }
    Ok(AddedToken {
        content: content.to_string(),
        id,
        normalized: v
            .get("normalized")
            .and_then(Value::as_bool)
            .unwrap_or(default_normalized),
    })
}

type Loaded = (HashMap<String, i64>, Vec<(String, String)>, Vec<AddedToken>);

/// vocab, merges and added tokens of a `tokenizer.json` with a BPE model.
fn load_tokenizer_json(path: &Path) -> Result<Loaded> {
    let json = read_json(path)?;
    let model = json
        .get("model")
        .with_context(|| format!("{}: no model", path.display()))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(t) => bail!(
            "{}: model type {t}, a CLIP tokenizer is BPE",
            path.display()
        ),
    }
    let vocab: HashMap<String, i64> = serde_json::from_value(
        model.get("vocab").cloned().unwrap_or(Value::Null),
    )
    .with_context(|| format!("{}: model.vocab is not a {{token: id}} map", path.display()))?;
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .with_context(|| format!("{}: no model.merges", path.display()))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let pair: Option<(String, String)> = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .filter(|(_, b)| !b.contains(' '))
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => a[0]
                    .as_str()
                    .zip(a[1].as_str())
                    .map(|(a, b)| (a.into(), b.into())),
                _ => None,
            };
            pair.with_context(|| format!("{}: merge {} is not a pair: {m}", path.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let added = json
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|t| added_token(t, None, false)).collect())
        .transpose()
        .with_context(|| format!("{}: added_tokens", path.display()))?
        .unwrap_or_default();
    Ok((vocab, merges, added))
}

fn read_json(path: &Path) -> Result<Value> {
    crate::io::folder::read_json(path)
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_tokenizers() {
        assert_eq!(normalize("A\u{a0}B\t\n C"), "a b c");
        assert_eq!(normalize("ΣΑΣ"), "σασ");
        assert_eq!(normalize("cafe\u{301}"), "café");
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[0], 'Ā');
    }
}
