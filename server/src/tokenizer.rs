//! Text → token ids with a local Hugging Face `tokenizer.json` (no hub access).

use std::path::Path;

/// Encodes `text` without adding special tokens.
pub fn encode(tokenizer_json: &Path, text: &str) -> Result<Vec<u32>, String> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| format!("{}: cannot load tokenizer: {e}", tokenizer_json.display()))?;
    let enc = tok
        .encode(text, false)
        .map_err(|e| format!("cannot tokenize the text: {e}"))?;
    Ok(enc.get_ids().to_vec())
}
