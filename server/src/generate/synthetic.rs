//! Runs on disk from models built in memory (such as [`crate::model::synthetic`]'s random ones), in
//! the original tool's layout, so that everything `generate` does (loading, hashing, resuming, several
//! devices) runs on them as on a real run; and a small word-level tokenizer to go with them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::model::SpdModel;
use crate::model::config::{CiFnType, SigmoidType};
use crate::model::gpt2_simple::ModuleKind;

use super::GenerateError;

/// Writes `model` (on the CPU) as a run directory: `final_config.yaml`, `model.safetensors` with the
/// target model embedded under `target_model.`, and `model_config.yaml`.
pub fn write_run(model: &SpdModel, dir: &Path) -> Result<(), GenerateError> {
    let io = |source| GenerateError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let tm = &model.target;
    t.insert("target_model.wte.weight".into(), tm.wte.clone());
    t.insert("target_model.wpe.weight".into(), tm.wpe.clone());
    t.insert(
        "target_model.lm_head.weight".into(),
        tm.lm_head_t.t()?.contiguous()?,
    );
    let mut ln = |name: String, ln: &crate::model::gpt2_simple::LayerNorm| {
        t.insert(format!("target_model.{name}.weight"), ln.weight.clone());
        t.insert(format!("target_model.{name}.bias"), ln.bias.clone());
    };
    ln("ln_f".into(), &tm.ln_f);
    for (i, block) in tm.blocks.iter().enumerate() {
        ln(format!("h.{i}.ln_1"), &block.ln_1);
        ln(format!("h.{i}.ln_2"), &block.ln_2);
    }
    for (i, block) in tm.blocks.iter().enumerate() {
        for kind in ModuleKind::ALL {
            let lin = &block.linears[kind as usize];
            let p = format!("target_model.h.{i}.{}", kind.suffix());
            t.insert(format!("{p}.weight"), lin.wt.t()?.contiguous()?);
            if let Some(b) = &lin.bias {
                t.insert(format!("{p}.bias"), b.clone());
            }
        }
    }
    for m in &model.modules {
        let dash = m.name.replace('.', "-");
        t.insert(format!("_components.{dash}.V"), m.components.v.clone());
        t.insert(format!("_components.{dash}.U"), m.components.u.clone());
        if let Some(b) = &m.components.bias {
            t.insert(format!("_components.{dash}.bias"), b.clone());
        }
        for (l, (w, b)) in m.ci_fn.layers.iter().enumerate() {
            let key = format!("_ci_fns.{dash}.layers.{}", 2 * l);
            // In memory the per-component biases carry a broadcast axis, `[C, 1, out]`.
            let b = match m.ci_fn.kind {
                CiFnType::SharedMlp => b.clone(),
                CiFnType::VectorMlp | CiFnType::Mlp => b.squeeze(1)?,
            };
            t.insert(format!("{key}.W"), w.clone());
            t.insert(format!("{key}.b"), b);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;

    let g = &tm.cfg;
    let model_config = format!(
        "block_size: {}\nvocab_size: {}\nn_layer: {}\nn_head: {}\nn_embd: {}\n",
        g.block_size, g.vocab_size, g.n_layer, g.n_head, g.n_embd
    );
    std::fs::write(dir.join("model_config.yaml"), model_config).map_err(io)?;
    let cfg = &model.config;
    let hidden: Vec<String> = cfg.ci_fn_hidden_dims.iter().map(usize::to_string).collect();
    let patterns: Vec<String> = model
        .modules
        .iter()
        .map(|m| format!("'{}'", m.name))
        .collect();
    let config = format!(
        "C: {}\nci_fn_type: {}\nci_fn_hidden_dims: [{}]\nsigmoid_type: {}\nsampling: continuous\n\
         target_module_patterns: [{}]\n\
         pretrained_model_class: simple_stories_train.models.gpt2_simple.GPT2Simple\n\
         pretrained_model_name: model.safetensors\ntask_config:\n  max_seq_len: {}\n",
        cfg.c,
        match cfg.ci_fn_type {
            CiFnType::SharedMlp => "shared_mlp",
            CiFnType::VectorMlp => "vector_mlp",
            CiFnType::Mlp => "mlp",
        },
        hidden.join(", "),
        match cfg.sigmoid_type {
            SigmoidType::Normal => "normal",
            SigmoidType::Hard => "hard",
            SigmoidType::LeakyHard => "leaky_hard",
            SigmoidType::UpperLeakyHard => "upper_leaky_hard",
            SigmoidType::LowerLeakyHard => "lower_leaky_hard",
            SigmoidType::SwishHard => "swish_hard",
        },
        patterns.join(", "),
        g.block_size
    );
    std::fs::write(dir.join("final_config.yaml"), config).map_err(io)?;
    Ok(())
}

/// `n` documents of 3 to `2 + max_extra` words drawn uniformly from `words`, from `seed`: a corpus for
/// [`word_level_tokenizer`] runs.
pub fn random_documents(words: &[String], n: usize, max_extra: usize, seed: u64) -> Vec<String> {
    let mut rng = crate::model::synthetic::Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 3 + rng.below(max_extra);
            (0..len)
                .map(|_| words[rng.below(words.len())].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A Hugging Face `tokenizer.json` (as text) of a word-level tokenizer: `[EOS]` is id 0, `[UNK]` id 1,
/// then `words` in order; words are split on whitespace and punctuation.
pub fn word_level_tokenizer(words: &[String]) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[EOS]".into(), 0.into());
    vocab.insert("[UNK]".into(), 1.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), (i + 2).into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 0, "content": "[EOS]", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}
