//! The intervention forward against what SPD's app computed on the v2 fixtures (keep only five
//! nodes, top 10 per position), and its properties on random models of every family: keeping every
//! component is the all-ones forward without deltas, ablating nothing is the graph's forward,
//! scaling by 1 changes nothing, a fork changes only what follows the swapped token.

mod common;

use candle_core::{Device, Tensor};
use common::{expected, fixture_dir};
use server::attribution::{PromptCi, Semantics};
use server::circuit::{Intervention, Mode, Selected, fork, intervene};
use server::model::SpdModel;
use server::model::synthetic::{SyntheticSpec, synthetic_model};
use server::model::transformer::{Family, softmax_last, tokens_tensor};

fn check_fixture(name: &str) {
    let exp = expected(&format!("v2/{name}"));
    let model = SpdModel::load(&fixture_dir(&format!("v2/{name}")), &Device::Cpu).unwrap();
    let mut checked = 0;
    for p in exp["prompts"].as_array().unwrap() {
        let iv = &p["modes"]["fp32"]["intervention"];
        let tokens = common::token_ids(p);
        let selected: Vec<Selected> = iv["active_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let key = format!("{}:{}:{}", n[0].as_str().unwrap(), n[1], n[2]);
                Selected::parse(&key, &model, tokens.len()).unwrap()
            })
            .collect();
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let got = intervene(
            &model,
            &ci,
            &Intervention {
                selected,
                mode: Mode::Keep,
                semantics: Semantics::Seed,
                top_k: iv["top_k"].as_u64().unwrap() as usize,
            },
        )
        .unwrap();
        let theirs = iv["predictions_per_position"].as_array().unwrap();
        assert_eq!(got.predictions.len(), theirs.len(), "{name}");
        for (s, (ours, theirs)) in got.predictions.iter().zip(theirs).enumerate() {
            let theirs = theirs.as_array().unwrap();
            let ids: Vec<u64> = theirs.iter().map(|r| r[1].as_u64().unwrap()).collect();
            let our_ids: Vec<u64> = ours.iter().map(|r| r.token as u64).collect();
            assert_eq!(our_ids, ids, "{name} position {s}: top-k tokens");
            for (o, t) in ours.iter().zip(theirs) {
                let f = |i: usize| t[i].as_f64().unwrap();
                let what = format!("{name} position {s} token {}", o.token);
                assert!(
                    (o.prob as f64 - f(2)).abs() <= 1e-5,
                    "{what}: prob {} vs {}",
                    o.prob,
                    f(2)
                );
                assert!(
                    (o.target_prob as f64 - f(4)).abs() <= 1e-5,
                    "{what}: target prob"
                );
                assert!((o.logit as f64 - f(3)).abs() <= 1e-4, "{what}: logit");
                assert!(
                    (o.target_logit as f64 - f(5)).abs() <= 1e-4,
                    "{what}: target logit"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{name}: {checked} predictions compared");
}

#[test]
fn keep_only_matches_the_app_on_llama_mlp_layerwise() {
    check_fixture("llama_mlp_layerwise");
}

#[test]
fn keep_only_matches_the_app_on_llama_glu_global() {
    check_fixture("llama_glu_global");
}

#[test]
fn keep_only_matches_the_app_on_gpt2_transformer_ci() {
    check_fixture("gpt2_transformer_ci");
}

#[test]
fn keep_only_matches_the_app_on_gpt2_main_format() {
    check_fixture("gpt2_main_format");
}

fn small(family: Family) -> SpdModel {
    synthetic_model(&SyntheticSpec {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 30,
        block_size: 16,
        c: 5,
        ci_hidden: vec![4],
        ci_active_frac: 0.4,
        family,
        biases: family != Family::LlamaSimple,
        ..SyntheticSpec::simple_stories_1m()
    })
    .unwrap()
}

fn probs_of(model: &SpdModel, tokens: &[u32], masks: &[Tensor], delta: bool) -> Vec<Vec<f32>> {
    let t = tokens_tensor(tokens, model.device()).unwrap();
    softmax_last(&model.masked_logits(&t, masks, delta).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn keep_all_ablate_nothing_and_scale_by_one_are_the_plain_forwards() {
    let tokens = [4u32, 17, 9, 2, 28, 11];
    for family in [
        Family::Gpt2Simple,
        Family::LlamaSimpleMlp,
        Family::LlamaSimple,
    ] {
        let model = small(family);
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let vocab = model.vocab_size();
        let run = |selected: Vec<Selected>, mode, semantics| {
            intervene(
                &model,
                &ci,
                &Intervention {
                    selected,
                    mode,
                    semantics,
                    top_k: vocab,
                },
            )
            .unwrap()
        };
        let every: Vec<Selected> = (0..model.modules.len())
            .flat_map(|m| {
                (0..model.modules[m].components.c()).map(move |c| Selected {
                    module: m,
                    pos: None,
                    c,
                })
            })
            .collect();
        let by_token = |r: &server::circuit::InterventionResult| -> Vec<Vec<f32>> {
            r.predictions
                .iter()
                .map(|row| {
                    let mut p = vec![0f32; vocab];
                    for x in row {
                        p[x.token as usize] = x.prob;
                    }
                    p
                })
                .collect()
        };
        let close = |a: &[Vec<f32>], b: &[Vec<f32>], what: &str| {
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() <= 1e-6, "{family:?} {what}: {x} vs {y}");
            }
        };
        let ones = model.ones_masks(tokens.len()).unwrap();
        let keep_all = run(every.clone(), Mode::Keep, Semantics::Seed);
        close(
            &by_token(&keep_all),
            &probs_of(&model, &tokens, &ones, false),
            "keep all",
        );
        // Every row lists the whole vocabulary by descending probability, and its other columns
        // are the target's and the CI-masked model's.
        for (s, row) in keep_all.predictions.iter().enumerate() {
            assert!(row.windows(2).all(|w| w[0].prob >= w[1].prob));
            for x in row {
                assert_eq!(x.target_prob, ci.target_probs[s][x.token as usize]);
            }
        }
        let masked = probs_of(&model, &tokens, &ci.lower_tensors, false);
        let none = run(vec![], Mode::Ablate, Semantics::Seed);
        close(&by_token(&none), &masked, "ablate nothing");
        for (row, s) in none.predictions.iter().zip(0..) {
            for x in row {
                assert_eq!(x.ci_masked_prob, x.prob, "position {s}");
            }
        }
        close(
            &by_token(&run(every.clone(), Mode::Scale(1.0), Semantics::Seed)),
            &masked,
            "scale by 1",
        );
        // Under the app's semantics the graph's forward is the target model.
        let app = run(vec![], Mode::Ablate, Semantics::App);
        close(&by_token(&app), &ci.target_probs, "app: ablate nothing");
        assert!(app.kl.iter().all(|k| *k < 1e-6), "{:?}", app.kl);
        let ablate_all = run(every.clone(), Mode::Ablate, Semantics::Seed);
        assert!(ablate_all.kl.iter().all(|k| *k > 0.0));
        let zero = run(every, Mode::Scale(0.0), Semantics::Seed);
        close(
            &by_token(&zero),
            &by_token(&ablate_all),
            "scale by 0 = ablate",
        );
    }
}

#[test]
fn a_fork_changes_only_the_swapped_position_onwards_and_bad_input_is_refused() {
    let model = small(Family::LlamaSimpleMlp);
    let tokens = [4u32, 17, 9, 2, 28, 11];
    let forked = fork(&model, &tokens, &[(3, 5)]).unwrap();
    assert_eq!(forked, vec![4, 17, 9, 5, 28, 11]);
    let iv = Intervention {
        selected: vec![Selected::parse("h.1.mlp.c_fc:2", &model, 6).unwrap()],
        mode: Mode::Ablate,
        semantics: Semantics::Seed,
        top_k: 3,
    };
    let a = intervene(&model, &PromptCi::compute(&model, &tokens).unwrap(), &iv).unwrap();
    let b = intervene(&model, &PromptCi::compute(&model, &forked).unwrap(), &iv).unwrap();
    assert_eq!(a.predictions[..3], b.predictions[..3]);
    assert_ne!(a.predictions[3], b.predictions[3]);

    assert!(
        fork(&model, &tokens, &[(6, 1)])
            .unwrap_err()
            .contains("out of range")
    );
    assert!(
        fork(&model, &tokens, &[(0, 30)])
            .unwrap_err()
            .contains("vocabulary")
    );
    for (key, msg) in [
        ("h.1.mlp.c_fc:6:0", "out of range"),
        ("h.1.mlp.c_fc:0:5", "has 5 components"),
        ("h.9.mlp.c_fc:0:0", "not a decomposed module"),
        ("output:0:0", "not a decomposed module"),
        ("h.1.mlp.c_fc:x:0", "not a number"),
        ("nonsense", "not a node key"),
    ] {
        let err = Selected::parse(key, &model, 6).unwrap_err();
        assert!(err.contains(msg), "{key}: {err}");
    }
    assert!(Mode::parse("scale", None).is_err());
    assert!(Mode::parse("scale", Some(f32::NAN)).is_err());
    assert_eq!(Mode::parse("scale", Some(2.0)), Ok(Mode::Scale(2.0)));
    assert!(
        Mode::parse("boost", None)
            .unwrap_err()
            .contains("unknown mode")
    );
}
