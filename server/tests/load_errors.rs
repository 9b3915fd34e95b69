//! Bad runs give errors that name the file, the key and the shapes; bad prompts are refused.

mod common;

use std::path::Path;

use candle_core::Device;
use common::fixture_dir;
use server::model::{LoadError, RunError, SpdModel};

/// Copies a fixture run (config, checkpoint, target/) into a temp dir for mutation.
fn copy_run(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::copy_tree(&fixture_dir(name), dir.path());
    dir
}

fn load(path: &Path) -> Result<SpdModel, LoadError> {
    SpdModel::load(path, &Device::Cpu)
}

/// Rewrites `model.safetensors` after `edit` changes its tensors, and removes the .pth so it is used.
fn edit_safetensors(
    dir: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "pth") {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// Replaces `from` by `to` in the run's `final_config.yaml` (which must contain it).
fn edit_config(dir: &Path, from: &str, to: &str) {
    let cfg = dir.join("final_config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&cfg, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn global_ci_with_a_missing_tensor_names_it() {
    let dir = copy_run("v2/llama_glu_global");
    edit_safetensors(dir.path(), |t| {
        t.remove("ci_fn._global_ci_fn.layers.2.W");
    });
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("missing tensor `ci_fn._global_ci_fn.layers.2.W`")
            && msg.contains("[40, 154]"),
        "{msg}"
    );
    // A module dropped from the config changes the network's input width: the shape says so.
    let dir = copy_run("v2/gpt2_transformer_ci");
    edit_config(
        dir.path(),
        "- module_pattern: h.*.attn.q_proj\n  C: 8\n",
        "",
    );
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("_input_projector.W")
            && msg.contains("[576, 16]")
            && msg.contains("[512, 16]"),
        "{msg}"
    );
}

#[test]
fn config_c_that_differs_from_the_tensors_is_named() {
    let dir = copy_run("v2/llama_mlp_layerwise");
    edit_config(
        dir.path(),
        "h.1.attn.q_proj\n  C: 9",
        "h.1.attn.q_proj\n  C: 10",
    );
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("_components.h-1-attn-q_proj.V")
            && msg.contains("[32, 9]")
            && msg.contains("C = 10"),
        "{msg}"
    );
}

#[test]
fn unknown_ci_fn_types_and_modules_are_refused() {
    let dir = copy_run("v2/llama_mlp_layerwise");
    edit_config(
        dir.path(),
        "fn_type: shared_mlp",
        "fn_type: shared_transformer",
    );
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("final_config.yaml")
            && msg.contains("unknown ci fn type `shared_transformer`"),
        "{msg}"
    );
    let dir = copy_run("v2/llama_mlp_layerwise");
    edit_config(dir.path(), "h.*.mlp.c_fc", "h.*.mlp.gate_proj");
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("`h.*.mlp.gate_proj` matches no projection of the LlamaSimpleMLP target"),
        "{msg}"
    );
    let dir = copy_run("v2/gpt2_main_format");
    edit_config(
        dir.path(),
        "spd.pretrain.models.gpt2_simple.GPT2Simple",
        "spd.pretrain.models.llama.Llama",
    );
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("spd.pretrain.models.llama.Llama") && msg.contains("LlamaSimpleMLP"),
        "{msg}"
    );
}

#[test]
fn truncated_checkpoint_is_an_error_naming_the_file() {
    let dir = copy_run("tiny_shared");
    let pth = dir.path().join("model_1.pth");
    let bytes = std::fs::read(&pth).unwrap();
    std::fs::write(&pth, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&pth).unwrap_err().to_string();
    assert!(
        err.contains("model_1.pth") && err.contains("cannot read tensors"),
        "{err}"
    );

    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(&st).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("cannot read tensors"),
        "{err}"
    );

    std::fs::write(&st, b"not a checkpoint at all").unwrap();
    assert!(matches!(load(&st), Err(LoadError::Tensors { .. })));
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = copy_run("tiny_shared");
    edit_safetensors(dir.path(), |t| {
        let v = t["_components.h-1-mlp-c_fc.V"].narrow(1, 0, 15).unwrap();
        t.insert("_components.h-1-mlp-c_fc.V".into(), v);
    });
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::ComponentCount { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("_components.h-1-mlp-c_fc.V"),
        "{msg}"
    );
    assert!(
        msg.contains("[32, 15]") && msg.contains("[32, 16]") && msg.contains("C = 16"),
        "{msg}"
    );
    // A wrong input dimension is a plain shape mismatch.
    let dir = copy_run("tiny_shared");
    edit_safetensors(dir.path(), |t| {
        let u = t["_components.h-0-attn-q_proj.U"].narrow(1, 0, 31).unwrap();
        t.insert("_components.h-0-attn-q_proj.U".into(), u);
    });
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("[16, 31]") && msg.contains("[16, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_key_is_named() {
    let dir = copy_run("tiny_vector");
    edit_safetensors(dir.path(), |t| {
        t.remove("_ci_fns.h-2-attn-v_proj.layers.2.W");
    });
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("missing tensor `_ci_fns.h-2-attn-v_proj.layers.2.W`"),
        "{msg}"
    );
    assert!(msg.contains("[12, 8, 1]"), "{msg}");
}

#[test]
fn unknown_model_class_is_refused() {
    let dir = copy_run("tiny_mlp");
    let cfg = dir.path().join("final_config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "simple_stories_train.models.gpt2_simple.GPT2Simple",
        "transformers.SomethingElse",
    );
    std::fs::write(&cfg, text).unwrap();
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("final_config.yaml") && msg.contains("transformers.SomethingElse"),
        "{msg}"
    );
}

#[test]
fn missing_paths_and_configs_are_errors() {
    let msg = load(Path::new("/nonexistent/run")).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/run"), "{msg}");
    let dir = copy_run("tiny_mlp");
    std::fs::remove_file(dir.path().join("target/model_config.yaml")).unwrap();
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("model_config.yaml"), "{msg}");
    let empty = tempfile::tempdir().unwrap();
    let msg = load(empty.path()).unwrap_err().to_string();
    assert!(
        msg.contains("no model_<step>.pth or model.safetensors"),
        "{msg}"
    );
}

/// A run whose state dict lacks the target's weights reads them from the pretrained checkpoint, in
/// either format, and old key spellings (`patched_model.`, `_gates.`, `.original.`, `.components.`) load.
#[test]
fn target_from_pretrained_checkpoint_and_old_key_names() {
    let reference = load(&fixture_dir("tiny_shared")).unwrap();
    for target_file in ["checkpoints/model_step_0.pt", "model.safetensors"] {
        let dir = copy_run("tiny_shared");
        edit_safetensors(dir.path(), |t| {
            t.retain(|k, _| !k.starts_with("target_model."))
        });
        let cfg = dir.path().join("final_config.yaml");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "target/checkpoints/model_step_0.pt",
            &format!("target/{target_file}"),
        );
        std::fs::write(&cfg, text).unwrap();
        let model = load(dir.path()).unwrap();
        let diff = (&model.target.wte - &reference.target.wte)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{target_file}");
    }
    // Old spellings.
    let dir = copy_run("tiny_shared");
    edit_safetensors(dir.path(), |t| {
        let old: Vec<_> = t.drain().collect();
        for (k, v) in old {
            let k = if let Some(rest) = k.strip_prefix("target_model.") {
                match rest.strip_suffix(".weight") {
                    Some(m) if m.contains("_proj") || m.contains("c_fc") => {
                        format!("patched_model.{m}.original.weight")
                    }
                    _ => format!("patched_model.{rest}"),
                }
            } else if let Some(rest) = k.strip_prefix("_components.") {
                let (module, leaf) = rest.rsplit_once('.').unwrap();
                format!(
                    "patched_model.{}.components.{leaf}",
                    module.replace('-', ".")
                )
            } else if let Some(rest) = k.strip_prefix("_ci_fns.") {
                format!("_gates.{rest}")
            } else {
                k
            };
            t.insert(k, v);
        }
    });
    let model = load(dir.path()).unwrap();
    let tokens = [1u32, 2, 3, 4];
    let a = reference
        .ci(&server::model::transformer::tokens_tensor(&tokens, &Device::Cpu).unwrap())
        .unwrap();
    let b = model
        .ci(&server::model::transformer::tokens_tensor(&tokens, &Device::Cpu).unwrap())
        .unwrap();
    for (x, y) in a.lower.iter().zip(&b.lower) {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}

#[test]
fn bad_prompts_are_refused_with_reasons() {
    let model = load(&fixture_dir("tiny_mlp")).unwrap();
    assert!(matches!(
        model.check_tokens(&[]),
        Err(RunError::EmptyPrompt)
    ));
    let long = vec![1u32; 65];
    let msg = model.check_tokens(&long).unwrap_err().to_string();
    assert!(
        msg.contains("65 tokens") && msg.contains("context of 64"),
        "{msg}"
    );
    let msg = model.check_tokens(&[1, 2, 96]).unwrap_err().to_string();
    assert!(
        msg.contains("token id 96 at position 2") && msg.contains("size 96"),
        "{msg}"
    );
    assert!(model.check_tokens(&vec![95u32; 64]).is_ok());
}
