//! Identity insertions (`identity_module_info`, SPEC §6): an identity `I` in front of a projection,
//! decomposed like any module. The target model is unchanged by it; the component model with all
//! masks at 1 plus the weight deltas reproduces the target; a run written with identities loads
//! back with the same CI; the graph has the identity as a layer between its sources and the
//! projection it feeds.

use candle_core::{Device, Tensor};
use server::attribution::{Layer, PromptCi, SourceMap};
use server::generate::synthetic::write_run;
use server::model::SpdModel;
use server::model::synthetic::{SyntheticSpec, synthetic_model};
use server::model::transformer::{Family, PlainForward};

fn spec(family: Family, identities: &[&str]) -> SyntheticSpec {
    SyntheticSpec {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 40,
        block_size: 16,
        c: 5,
        ci_hidden: vec![4],
        ci_active_frac: 0.4,
        family,
        biases: family == Family::Gpt2Simple,
        identities: identities.iter().map(|s| s.to_string()).collect(),
        ..SyntheticSpec::simple_stories_1m()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn identities_leave_the_target_unchanged_and_deltas_restore_it() {
    for family in [
        Family::Gpt2Simple,
        Family::LlamaSimpleMlp,
        Family::LlamaSimple,
    ] {
        let plain = synthetic_model(&spec(family, &[])).unwrap();
        let with =
            synthetic_model(&spec(family, &["h.*.attn.q_proj", "h.1.mlp.down_proj"])).unwrap();
        let names: Vec<&str> = with.modules.iter().map(|m| m.name.as_str()).collect();
        let q = names.iter().position(|n| *n == "h.0.attn.q_proj").unwrap();
        assert_eq!(names[q - 1], "h.0.attn.q_proj.pre_identity", "{names:?}");
        let down = names
            .iter()
            .position(|n| *n == "h.1.mlp.down_proj")
            .unwrap();
        assert_eq!(names[down - 1], "h.1.mlp.down_proj.pre_identity");
        assert_eq!(with.modules.len(), plain.modules.len() + 3);

        let tokens = Tensor::new(&[[3u32, 17, 5, 29, 0, 11]], &Device::Cpu).unwrap();
        // The same target weights (the seeds differ only after the target is drawn).
        let a = plain.target.forward(&tokens, &mut PlainForward).unwrap();
        let b = with.target.forward(&tokens, &mut PlainForward).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{family:?}");
        // All masks 1 plus the deltas (I − (V U)ᵀ for the identities) is the target again.
        let ones = with.ones_masks(6).unwrap();
        let restored = with.masked_logits(&tokens, &ones, true).unwrap();
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale: f32 = scale.to_scalar().unwrap();
        assert!(
            max_abs_diff(&restored, &a) <= 1e-4 * scale,
            "{family:?}: {}",
            max_abs_diff(&restored, &a)
        );
        // Without the deltas the random identity components change the output.
        let masked = with.masked_logits(&tokens, &ones, false).unwrap();
        assert!(max_abs_diff(&masked, &a) > 1e-2 * scale);
    }
}

#[test]
fn a_run_with_identities_loads_back_with_the_same_ci_and_graph_layers() {
    let model = synthetic_model(&spec(Family::LlamaSimpleMlp, &["h.*.mlp.c_fc"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_run(&model, dir.path()).unwrap();
    let config = std::fs::read_to_string(dir.path().join("final_config.yaml")).unwrap();
    assert!(
        config.contains("identity_module_info:\n- module_pattern: 'h.0.mlp.c_fc'\n  C: 5"),
        "{config}"
    );
    let loaded = SpdModel::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.module_layout(), model.module_layout());
    let tokens = [1u32, 9, 33, 4, 20];
    let (a, b) = (
        PromptCi::compute(&model, &tokens).unwrap(),
        PromptCi::compute(&loaded, &tokens).unwrap(),
    );
    assert_eq!(a.lower, b.lower);

    // The identity reads the norm's output (its sources are the residual writers) and c_fc reads
    // only the identity.
    let sources = SourceMap::probe(&loaded).unwrap();
    let index =
        |name: &str| Layer::Module(loaded.modules.iter().position(|m| m.name == name).unwrap());
    let of = |name: &str| -> Vec<Layer> {
        sources
            .sources_of(index(name))
            .unwrap()
            .iter()
            .map(|s| s.layer)
            .collect()
    };
    assert_eq!(of("h.1.mlp.c_fc"), vec![index("h.1.mlp.c_fc.pre_identity")]);
    assert_eq!(
        of("h.1.mlp.c_fc.pre_identity"),
        vec![
            Layer::Wte,
            index("h.0.attn.o_proj"),
            index("h.0.mlp.down_proj"),
            index("h.1.attn.o_proj")
        ]
    );
}

#[test]
fn identity_patterns_that_match_nothing_or_collide_are_refused() {
    let model = synthetic_model(&spec(Family::Gpt2Simple, &["h.0.mlp.c_fc"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_run(&model, dir.path()).unwrap();
    let path = dir.path().join("final_config.yaml");
    let config = std::fs::read_to_string(&path).unwrap();

    let nothing = config.replace(
        "- module_pattern: 'h.0.mlp.c_fc'\n  C: 5\nci_fn",
        "- module_pattern: 'h.7.mlp.c_fc'\n  C: 5\nci_fn",
    );
    assert_ne!(nothing, config);
    std::fs::write(&path, &nothing).unwrap();
    let err = SpdModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("identity pattern `h.7.mlp.c_fc` matches no projection"),
        "{err}"
    );

    // A module pattern matching the identity's own path as well: spd refuses the double match.
    let double = config.replacen(
        "module_info:\n",
        "module_info:\n- module_pattern: 'h.0.mlp.c_fc.*'\n  C: 5\n",
        1,
    );
    std::fs::write(&path, &double).unwrap();
    let err = SpdModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is an identity insertion too"), "{err}");
}
