//! CLIP's byte-level BPE tokenizer, assembled with the `tokenizers` crate with the rules of
//! transformers' `CLIPTokenizer`: NFC, whitespace folded, lower-cased, CLIP's word split,
//! BOS/EOS around at most `max_length - 2` tokens, padded to `max_length` with the model's
//! pad token.
//!
//! The vocabulary and merges come from one of two layouts of a tokenizer folder:
//! - `tokenizer.json` (what transformers 5.24 and later save, alone);
//! - `vocab.json` + `merges.txt` (older saves and most hub repositories).
//!
//! When both are present, `tokenizer.json` is read, as transformers does, and the folder is
//! refused unless the two agree: other tools read the other pair, and a folder whose layouts
//! disagree tokenizes differently depending on who reads it. Like transformers'
//! `CLIPTokenizer`, only the vocabulary and merges are taken from `tokenizer.json`; the
//! normalizer, word split and post-processing are CLIP's fixed ones.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const WORD_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A special token in `special_tokens_map.json`/`tokenizer_config.json` is either a string
/// or an object with a `content` field.
fn token_setting(dir: &Path, key: &str) -> Option<serde_json::Value> {
    ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .find_map(|json| json.get(key).filter(|v| !v.is_null()).cloned())
}

fn token_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// The part of `tokenizer.json` that CLIP's tokenizer takes from it.
#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeEntry>,
}

/// `tokenizers` writes a merge as `["a", "b"]` since 0.20 and as `"a b"` before.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Pair(String, String),
    Joined(String),
}

fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges)> {
    let bad = |message: String| Error::Tokenizer(format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let json: TokenizerJson = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(kind) = json.model.kind.as_deref().filter(|kind| *kind != "BPE") {
        return Err(bad(format!(
            "a CLIP tokenizer is a BPE model, this one is `{kind}`"
        )));
    }
    let merges = json
        .model
        .merges
        .into_iter()
        .map(|merge| match merge {
            MergeEntry::Pair(a, b) => Ok((a, b)),
            MergeEntry::Joined(joined) => joined
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("the merge `{joined}` is not two tokens"))),
        })
        .collect::<Result<Merges>>()?;
    Ok((json.model.vocab.into_iter().collect(), merges))
}

/// The vocabulary and merges of a tokenizer folder, and the name of the file that gave
/// them (for messages). See the module's doc for the layouts and which one wins.
fn read_vocab_and_merges(dir: &Path) -> Result<(Vocab, Merges, &'static str)> {
    let json = dir.join("tokenizer.json");
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let read_bpe_files = || {
        BPE::read_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))
    };
    let has_bpe_files = vocab.is_file() && merges.is_file();
    if !json.is_file() {
        if !has_bpe_files {
            return Err(Error::Tokenizer(format!(
                "{}: no tokenizer: neither tokenizer.json nor vocab.json + merges.txt is there",
                dir.display()
            )));
        }
        let (vocab, merges) = read_bpe_files()?;
        return Ok((vocab, merges, "vocab.json"));
    }
    let (json_vocab, json_merges) = read_tokenizer_json(&json)?;
    if has_bpe_files {
        let (file_vocab, file_merges) = read_bpe_files()?;
        if let Some(difference) =
            layout_difference(&json_vocab, &json_merges, &file_vocab, &file_merges)
        {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.json and vocab.json + merges.txt disagree ({difference}); \
                 tokenizer.json is the one transformers reads: remove vocab.json and \
                 merges.txt, or save the tokenizer again into an empty folder",
                dir.display()
            )));
        }
    }
    Ok((json_vocab, json_merges, "tokenizer.json"))
}

/// The first difference between the two layouts' vocabularies and merges, in words.
fn layout_difference(
    json_vocab: &Vocab,
    json_merges: &Merges,
    file_vocab: &Vocab,
    file_merges: &Merges,
) -> Option<String> {
    if json_vocab.len() != file_vocab.len() {
        return Some(format!(
            "{} tokens against {}",
            json_vocab.len(),
            file_vocab.len()
        ));
    }
    let mut tokens: Vec<(&String, &u32)> = json_vocab.iter().collect();
    tokens.sort_by_key(|(_, id)| **id);
    for (token, id) in tokens {
        match file_vocab.get(token) {
            Some(other) if other == id => {}
            Some(other) => return Some(format!("`{token}` is {id} against {other}")),
            None => return Some(format!("`{token}` is missing from vocab.json")),
        }
    }
    if json_merges.len() != file_merges.len() {
        return Some(format!(
            "{} merges against {}",
            json_merges.len(),
            file_merges.len()
        ));
    }
    json_merges
        .iter()
        .zip(file_merges)
        .position(|(a, b)| a != b)
        .map(|i| {
            format!(
                "merge {} is `{} {}` against `{} {}`",
                i + 1,
                json_merges[i].0,
                json_merges[i].1,
                file_merges[i].0,
                file_merges[i].1
            )
        })
}

impl ClipTokenizer {
    /// Reads the vocabulary and merges (see the module's doc for the two layouts) and, when
    /// present, the pad token and `model_max_length` from `dir/special_tokens_map.json` /
    /// `dir/tokenizer_config.json`. `max_positions` (the text encoder's) caps the length.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let (vocab, merges, vocab_file) = read_vocab_and_merges(dir)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(EOS.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
        let mut inner = Tokenizer::new(bpe);
        let id = |t: &Tokenizer, token: &str| {
            t.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: `{token}` is not in {vocab_file}",
                    dir.display()
                ))
            })
        };
        let bos_id = id(&inner, BOS)?;
        let eos_id = id(&inner, EOS)?;
        let pad_token = token_setting(dir, "pad_token")
            .as_ref()
            .and_then(token_string)
            .unwrap_or_else(|| EOS.to_string());
        let pad_id = id(&inner, &pad_token)?;
        let max_length = token_setting(dir, "model_max_length")
            .and_then(|v| v.as_f64())
            .map(|v| v as usize)
            .filter(|v| *v >= 2)
            .unwrap_or(max_positions)
            .min(max_positions);

        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tok_err)?
            .into(),
            Lowercase.into(),
        ])));
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(WORD_SPLIT.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(tok_err)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_post_processor(Some(
            RobertaProcessing::new((EOS.to_string(), eos_id), (BOS.to_string(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.clone(),
        }));
        // transformers registers the pad token as a special token too, so SD 2's "!" in a
        // prompt becomes the pad id rather than the word-final "!</w>".
        let mut special = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
        if pad_token != BOS && pad_token != EOS {
            special.push(AddedToken::from(pad_token.clone(), true));
        }
        inner.add_special_tokens(&special);
        Ok(ClipTokenizer { inner, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `text`: BOS, the (truncated) text, EOS, then padding to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self.inner.encode(text, true).map_err(tok_err)?;
        Ok(encoding.get_ids().iter().map(|id| i64::from(*id)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A four-letter CLIP-style vocabulary: the letters, each also word-final, one merge.
    fn vocab_json() -> String {
        let mut tokens: Vec<String> = ["a", "b"]
            .iter()
            .flat_map(|t| [t.to_string(), format!("{t}</w>")])
            .collect();
        tokens.push("ab</w>".into());
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        let map: serde_json::Map<String, serde_json::Value> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i.into()))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    fn tokenizer_json(merges: serde_json::Value) -> String {
        let vocab: serde_json::Value = serde_json::from_str(&vocab_json()).unwrap();
        serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": merges}}).to_string()
    }

    fn folder(tag: &str, files: &[(&str, String)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("imagegen-tok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    fn ids(dir: &Path) -> Result<Vec<i64>> {
        ClipTokenizer::from_dir(dir, 6)?.encode("ab b")
    }

    #[test]
    fn both_layouts_give_the_same_ids() {
        let merges_txt = "#version: 0.2\na b</w>\n".to_string();
        let old = folder(
            "old",
            &[
                ("vocab.json", vocab_json()),
                ("merges.txt", merges_txt.clone()),
            ],
        );
        let pairs = folder(
            "pairs",
            &[(
                "tokenizer.json",
                tokenizer_json(serde_json::json!([["a", "b</w>"]])),
            )],
        );
        let joined = folder(
            "joined",
            &[(
                "tokenizer.json",
                tokenizer_json(serde_json::json!(["a b</w>"])),
            )],
        );
        let both = folder(
            "both",
            &[
                (
                    "tokenizer.json",
                    tokenizer_json(serde_json::json!([["a", "b</w>"]])),
                ),
                ("vocab.json", vocab_json()),
                ("merges.txt", merges_txt),
            ],
        );
        // BOS, "ab</w>", "b</w>", EOS, then EOS as padding.
        let expected = vec![5, 4, 3, 6, 6, 6];
        for dir in [old, pairs, joined, both] {
            assert_eq!(ids(&dir).unwrap(), expected, "{}", dir.display());
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn layouts_that_disagree_are_refused() {
        let dir = folder(
            "disagree",
            &[
                (
                    "tokenizer.json",
                    tokenizer_json(serde_json::json!([["a", "b</w>"]])),
                ),
                ("vocab.json", vocab_json()),
                ("merges.txt", "#version: 0.2\n".to_string()),
            ],
        );
        let message = ids(&dir).unwrap_err().to_string();
        assert!(
            message.contains("tokenizer.json and vocab.json + merges.txt disagree")
                && message.contains("1 merges against 0"),
            "{message}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_folder_without_a_tokenizer_says_what_is_missing() {
        let dir = folder("none", &[("vocab.json", vocab_json())]);
        let message = ids(&dir).unwrap_err().to_string();
        assert!(
            message.contains("neither tokenizer.json nor vocab.json + merges.txt"),
            "{message}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
