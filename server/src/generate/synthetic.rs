//! Runs on disk from models built in memory (such as [`crate::model::synthetic`]'s random ones), in
//! the original tool's layout, so that everything `generate` does (loading, hashing, resuming, several
//! devices) runs on them as on a real run; and a small word-level tokenizer to go with them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::model::SpdModel;
use crate::model::config::{CiFnType, SigmoidType};
use crate::model::transformer::{Family, Norm, NormKind, Positions};

use super::GenerateError;

/// Writes `model` (on the CPU) as a run directory in spd `main`'s spelling (`module_info` with a C
/// per module): `final_config.yaml`, `model.safetensors` with the target model embedded under
/// `target_model.`, and `model_config.yaml`. Layerwise CI networks only.
pub fn write_run(model: &SpdModel, dir: &Path) -> Result<(), GenerateError> {
    let io = |source| GenerateError::Io {
        path: dir.to_owned(),
        source,
    };
    let Some(fn_type) = model.config.ci.layerwise() else {
        return Err(GenerateError::Usage(format!(
            "write_run writes layerwise CI networks, not {}",
            model.ci_kind()
        )));
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let tm = &model.target;
    let g = &tm.cfg;
    t.insert("target_model.wte.weight".into(), tm.wte.clone());
    if let Some(wpe) = &tm.wpe {
        t.insert("target_model.wpe.weight".into(), wpe.clone());
    }
    t.insert(
        "target_model.lm_head.weight".into(),
        tm.lm_head_t.t()?.contiguous()?,
    );
    let mut norm = |name: String, n: &Norm| {
        t.insert(format!("target_model.{name}.weight"), n.weight.clone());
        if let Some(b) = &n.bias {
            t.insert(format!("target_model.{name}.bias"), b.clone());
        }
    };
    let (n1, n2) = if matches!(g.norm, NormKind::LayerNorm { .. }) {
        ("ln_1", "ln_2")
    } else {
        ("rms_1", "rms_2")
    };
    norm("ln_f".into(), &tm.ln_f);
    for (i, block) in tm.blocks.iter().enumerate() {
        norm(format!("h.{i}.{n1}"), &block.norm_1);
        norm(format!("h.{i}.{n2}"), &block.norm_2);
    }
    // Inserted identities have no parameters in spd's state dict.
    for id in tm.module_ids().filter(|id| !id.pre_identity) {
        let lin = tm.linear(id);
        let p = format!("target_model.{}", id.name());
        t.insert(format!("{p}.weight"), lin.wt.t()?.contiguous()?);
        if let Some(b) = &lin.bias {
            t.insert(format!("{p}.bias"), b.clone());
        }
    }
    for m in &model.modules {
        let dash = m.name.replace('.', "-");
        t.insert(format!("_components.{dash}.V"), m.components.v.clone());
        t.insert(format!("_components.{dash}.U"), m.components.u.clone());
        if let Some(b) = &m.components.bias {
            t.insert(format!("_components.{dash}.bias"), b.clone());
        }
        let ci_fn = m.ci_fn.as_ref().expect("layerwise");
        for (l, (w, b)) in ci_fn.layers.iter().enumerate() {
            let key = format!("_ci_fns.{dash}.layers.{}", 2 * l);
            // In memory the per-component biases carry a broadcast axis, `[C, 1, out]`.
            let b = match ci_fn.kind {
                CiFnType::SharedMlp => b.clone(),
                CiFnType::VectorMlp | CiFnType::Mlp => b.squeeze(1)?,
            };
            t.insert(format!("{key}.W"), w.clone());
            t.insert(format!("{key}.b"), b);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;

    let mut model_config = format!(
        "model_type: {}\nblock_size: {}\nvocab_size: {}\nn_layer: {}\nn_head: {}\nn_embd: {}\n",
        g.family.name(),
        g.block_size,
        g.vocab_size,
        g.n_layer,
        g.n_head,
        g.n_embd
    );
    if g.family != Family::Gpt2Simple {
        let (base, n_ctx, adjacent) = match g.positions {
            Positions::Rotary {
                base,
                n_ctx,
                adjacent_pairs,
            } => (base, n_ctx, adjacent_pairs),
            Positions::Learned => (10000.0, g.block_size, false),
        };
        let eps = match g.norm {
            NormKind::Rms { eps } | NormKind::LayerNorm { eps } => eps,
        };
        model_config.push_str(&format!(
            "n_intermediate: {}\nn_key_value_heads: {}\nn_ctx: {n_ctx}\nrotary_base: {base}\n\
             rotary_adjacent_pairs: {adjacent}\nrms_norm_eps: {eps:e}\nattn_bias: {}\nmlp_bias: {}\n",
            g.d_mlp, g.n_kv_head, g.attn_bias, g.mlp_bias
        ));
    }
    std::fs::write(dir.join("model_config.yaml"), model_config).map_err(io)?;
    let cfg = &model.config;
    let hidden: Vec<String> = match &cfg.ci {
        crate::model::config::CiConfig::Layerwise { hidden_dims, .. } => {
            hidden_dims.iter().map(usize::to_string).collect()
        }
        crate::model::config::CiConfig::Global(_) => unreachable!("checked above"),
    };
    // Identities are spelt as spd does: the pattern of the projection they sit in front of.
    let info = |identities: bool| -> String {
        model
            .modules
            .iter()
            .filter(|m| m.id.pre_identity == identities)
            .map(|m| {
                format!(
                    "- module_pattern: '{}'\n  C: {}\n",
                    m.id.parent().name(),
                    m.components.c()
                )
            })
            .collect()
    };
    let module_info = info(false);
    let identity_info = match info(true) {
        s if s.is_empty() => "identity_module_info: null\n".to_owned(),
        s => format!("identity_module_info:\n{s}"),
    };
    let class = match g.family {
        Family::Gpt2Simple => "simple_stories_train.models.gpt2_simple.GPT2Simple",
        Family::LlamaSimpleMlp => "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
        Family::LlamaSimple => "spd.pretrain.models.llama_simple.LlamaSimple",
    };
    let config = format!(
        "module_info:\n{module_info}{identity_info}ci_fn_type: {}\nci_fn_hidden_dims: [{}]\nsigmoid_type: {}\n\
         sampling: continuous\nuse_delta_component: {}\npretrained_model_class: {class}\n\
         pretrained_model_name: model.safetensors\ntask_config:\n  max_seq_len: {}\n",
        fn_type.name(),
        hidden.join(", "),
        match cfg.sigmoid_type {
            SigmoidType::Normal => "normal",
            SigmoidType::Hard => "hard",
            SigmoidType::LeakyHard => "leaky_hard",
            SigmoidType::UpperLeakyHard => "upper_leaky_hard",
            SigmoidType::LowerLeakyHard => "lower_leaky_hard",
            SigmoidType::SwishHard => "swish_hard",
        },
        cfg.use_delta_component,
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
