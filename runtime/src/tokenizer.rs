//! CLIP's byte-level BPE tokenizer, assembled with the `tokenizers` crate from a model's
//! `tokenizer/vocab.json` + `merges.txt` with the rules of transformers' `CLIPTokenizer`:
//! NFC, whitespace folded, lower-cased, CLIP's word split, BOS/EOS around at most
//! `max_length - 2` tokens, padded to `max_length` with the model's pad token.

use std::path::Path;

use tokenizers::models::bpe::BPE;
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

impl ClipTokenizer {
    /// Reads `dir/vocab.json`, `dir/merges.txt` and, when present, the pad token and
    /// `model_max_length` from `dir/special_tokens_map.json` / `dir/tokenizer_config.json`.
    /// `max_positions` (the text encoder's) caps the length.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(Error::Tokenizer(format!("{} is missing", file.display())));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(EOS.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
        let mut inner = Tokenizer::new(bpe);
        let id = |t: &Tokenizer, token: &str| {
            t.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!("{}: `{token}` is not in vocab.json", dir.display()))
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
