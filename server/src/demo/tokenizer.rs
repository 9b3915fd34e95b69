//! The demo's Hugging Face `tokenizer.json`: whole words with their leading space (as GPT-2 spells
//! them, ` ball`), punctuation split off, `<|endoftext|>` and `[UNK]` as special tokens, and a `Fuse`
//! decoder, so decoding the ids of a story gives back the story exactly.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

pub const EOS: &str = "<|endoftext|>";
pub const UNK: &str = "[UNK]";
/// A word with an optional leading space, a number, one punctuation mark, or a run of other space.
const PATTERN: &str = r" ?[A-Za-z]+| ?[0-9]+| ?[^A-Za-z0-9\s]|\s+";

fn tokenizer_json(vocab: &[String]) -> Value {
    let mut map = serde_json::Map::new();
    for (id, tok) in vocab.iter().enumerate() {
        map.insert(tok.clone(), json!(id));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, EOS), special(1, UNK)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": PATTERN},
                          "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK},
    })
}

/// The pieces the tokenizer's pre-tokenizer cuts `text` into.
fn pieces(pre: &impl PreTokenizer, text: &str) -> tokenizers::Result<Vec<String>> {
    let mut p = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut p)?;
    Ok(p.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_owned())
        .collect())
}

/// Builds the tokenizer of `texts`: the special tokens, then every piece by falling count (ties in
/// byte order). Returns the `tokenizer.json` text (deterministic) and the loaded tokenizer.
pub fn build(texts: &[String]) -> tokenizers::Result<(String, Tokenizer)> {
    let empty: Tokenizer = tokenizer_json(&[EOS.into(), UNK.into()])
        .to_string()
        .parse()?;
    let pre = empty
        .get_pre_tokenizer()
        .expect("the json sets a pre-tokenizer");
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for t in texts {
        for p in pieces(pre, t)? {
            *counts.entry(p).or_default() += 1;
        }
    }
    let mut by_count: Vec<(String, u64)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut vocab = vec![EOS.to_owned(), UNK.to_owned()];
    vocab.extend(by_count.into_iter().map(|(p, _)| p));
    let text = serde_json::to_string_pretty(&tokenizer_json(&vocab))?;
    let tok: Tokenizer = text.parse()?;
    Ok((text, tok))
}
