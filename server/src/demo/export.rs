//! Writes the demo as an SPD run directory in the original tool's layout: `final_config.yaml`,
//! `model.safetensors` (components and CI functions under the original keys), `tokenizer.json`, and
//! the target under `target/` (`model.safetensors`, `model_config.yaml`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::train_spd::SpdSpec;
use crate::model::transformer::Gpt2Config;

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, bytes).map_err(io(path))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    candle_core::safetensors::save(tensors, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `target/model.safetensors` and `target/model_config.yaml` under `run_dir`.
pub fn write_target(
    run_dir: &Path,
    cfg: &Gpt2Config,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), String> {
    let dir = run_dir.join("target");
    save_tensors(&dir.join("model.safetensors"), tensors)?;
    let yaml = format!(
        "block_size: {}\nvocab_size: {}\nn_layer: {}\nn_head: {}\nn_embd: {}\nflash_attention: false\n",
        cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd
    );
    write(&dir.join("model_config.yaml"), yaml.as_bytes())
}

/// The run's `final_config.yaml`, with the fields the original writes and the values used here.
pub fn final_config(spec: &SpdSpec, max_seq_len: usize) -> String {
    format!(
        "\
# The built-in demo: decomposed by `make demo-model` (server/src/demo/train_spd.rs).
seed: {seed}
C: {c}
n_mask_samples: 1
ci_fn_type: shared_mlp
ci_fn_hidden_dims:
- {hidden}
sampling: continuous
sigmoid_type: leaky_hard
target_module_patterns:
- h.*.attn.q_proj
- h.*.attn.k_proj
- h.*.attn.v_proj
- h.*.attn.o_proj
- h.*.mlp.c_fc
- h.*.mlp.down_proj
identity_module_patterns: null
use_delta_component: false
loss_metric_configs:
- coeff: {imp}
  classname: ImportanceMinimalityLoss
  pnorm: {p_start}
  p_anneal_start_frac: 0.0
  p_anneal_final_p: {p_end}
  p_anneal_end_frac: 1.0
  eps: {eps:e}
- coeff: 1.0
  classname: StochasticReconSubsetLoss
  routing:
    type: uniform_k_subset
- coeff: 1.0
  classname: StochasticReconLoss
- coeff: {faith}
  classname: FaithfulnessLoss
- coeff: {ci_masked}
  classname: CIMaskedReconLoss
output_loss_type: kl
lr: {lr}
steps: {steps}
batch_size: {batch}
gradient_accumulation_steps: 1
grad_clip_norm: 1.0
faithfulness_warmup_steps: {fw_steps}
faithfulness_warmup_lr: {fw_lr}
faithfulness_warmup_weight_decay: 0.0
# Constant, then linear decay to 5% over the last fifth of the steps.
lr_schedule: constant
lr_warmup_pct: 0.0
ci_alive_threshold: 0.0
pretrained_model_class: simple_stories_train.models.gpt2_simple.GPT2Simple
pretrained_model_path: target
pretrained_model_name: null
pretrained_model_output_attr: idx_0
# tokenizer.json is in this directory.
tokenizer_name: null
task_config:
  task_name: lm
  max_seq_len: {max_seq_len}
  dataset_name: null
  column_name: story
  is_tokenized: false
",
        seed = spec.seed,
        c = spec.c,
        hidden = spec.ci_hidden,
        imp = spec.importance_coeff,
        p_start = spec.p_start,
        p_end = spec.p_end,
        eps = spec.eps,
        faith = spec.faithfulness_coeff,
        ci_masked = spec.ci_masked_coeff,
        lr = spec.lr,
        steps = spec.steps,
        batch = spec.batch,
        fw_steps = spec.faithfulness_warmup_steps,
        fw_lr = spec.faithfulness_warmup_lr,
    )
}

/// The SPD half of the run directory: `final_config.yaml`, `model.safetensors`, `tokenizer.json`.
pub fn write_run(
    run_dir: &Path,
    spec: &SpdSpec,
    max_seq_len: usize,
    tensors: &HashMap<String, Tensor>,
    tokenizer_json: &str,
) -> Result<(), String> {
    save_tensors(&run_dir.join("model.safetensors"), tensors)?;
    write(
        &run_dir.join("final_config.yaml"),
        final_config(spec, max_seq_len).as_bytes(),
    )?;
    write(&run_dir.join("tokenizer.json"), tokenizer_json.as_bytes())
}

pub fn write_text(path: &Path, text: &str) -> Result<(), String> {
    write(path, text.as_bytes())
}
