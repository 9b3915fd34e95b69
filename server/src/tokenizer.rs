//! Text → token ids with a local Hugging Face `tokenizer.json` (no hub access).

use std::path::{Path, PathBuf};

use crate::model::SpdModel;

/// Encodes `text` without adding special tokens.
pub fn encode(tokenizer_json: &Path, text: &str) -> Result<Vec<u32>, String> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| format!("{}: cannot load tokenizer: {e}", tokenizer_json.display()))?;
    let enc = tok
        .encode(text, false)
        .map_err(|e| format!("cannot tokenize the text: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// `tokenizer.json` next to the run, at the run's `tokenizer_name` when that is a local path
/// (relative to the run directory, or to the working directory), or beside the target model (spd's
/// pretrain runs keep it in the checkpoint's grandparent directory).
pub fn find_for(model: &SpdModel) -> Option<PathBuf> {
    let run_dir = model.checkpoint.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![run_dir.join("tokenizer.json")];
    if let Some(name) = &model.config.tokenizer_name {
        for base in [run_dir.join(name), PathBuf::from(name)] {
            candidates.push(base.join("tokenizer.json"));
            candidates.push(base);
        }
    }
    if let Some(target) = model.config.pretrained_location() {
        let target = run_dir.join(target);
        for dir in target.ancestors().skip(1).take(2) {
            candidates.push(dir.join("tokenizer.json"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// How a token is shown: its decoded text, else its vocabulary entry, else `#id` (a run without a
/// tokenizer).
pub fn token_string(tokenizer: Option<&tokenizers::Tokenizer>, id: u32) -> String {
    tokenizer
        .and_then(|t| t.decode(&[id], false).ok().or_else(|| t.id_to_token(id)))
        .unwrap_or_else(|| format!("#{id}"))
}
