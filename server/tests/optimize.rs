//! CI optimised for a label (SPEC §7) against SPD's app on the v2 fixtures (30 steps of CE on a
//! label token, CI masks): the optimised CI within 1e-3 of the original's after float32 drift over
//! the steps, the same alive pairs, the label's probability and L0 within 1e-3, and the graph of
//! our optimised CI (both engines, the app's semantics over the tokens up to the position) equal to
//! the app's optimised graph. Properties: the loss falls on a fixed seed, cancelling stops it, bad
//! configurations are refused.

mod common;

use std::ops::ControlFlow;

use candle_core::Device;
use common::{compare_edges, expected, fixture_dir};
use serde_json::{Value, json};
use server::attribution::{
    Backend, FastEngine, PromptCi, Semantics, SourceMap, Thresholds, reference_graph_with, report,
};
use server::circuit::{OptimConfig, OptimError, Recon, optimize, optimized_prompt};
use server::model::SpdModel;

fn check(name: &str) {
    let exp = expected(&format!("v2/{name}"));
    let model = SpdModel::load(&fixture_dir(&format!("v2/{name}")), &Device::Cpu).unwrap();
    let o = &exp["optimized"];
    let k = &exp["meta"]["constants"]["optim"];
    let p = &exp["prompts"][o["prompt_index"].as_u64().unwrap() as usize];
    let tokens = common::token_ids(p);
    let position = o["position"].as_u64().unwrap() as usize;
    let cfg = OptimConfig {
        loss_coeff: k["loss_coeff"].as_f64().unwrap(),
        beta: k["beta"].as_f64().unwrap(),
        lr: k["lr"].as_f64().unwrap(),
        ..OptimConfig::ce(
            position,
            o["label_token"].as_u64().unwrap() as u32,
            k["steps"].as_u64().unwrap() as usize,
            k["imp_min_coeff"].as_f64().unwrap(),
            k["pnorm"].as_f64().unwrap(),
        )
    };
    let ci = PromptCi::compute(&model, &tokens).unwrap();
    let mut losses = vec![];
    let got = optimize(&model, &ci, &cfg, &mut |p| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(losses.len(), cfg.steps);
    let m = &o["modes"]["fp32"];
    let mut worst = 0f64;
    for (i, module) in model.modules.iter().enumerate() {
        let theirs = &m["ci_pre_sigmoid"][&module.name];
        worst = worst.max(common::max_abs_diff_2d(&got.pre_sigmoid[i], theirs));
        let lower = common::max_abs_diff_2d(&got.lower[i], &m["ci_lower_leaky"][&module.name]);
        assert!(
            lower <= 1e-3,
            "{name} {}: lower CI off by {lower:e}",
            module.name
        );
        if let Some(counts) = m["alive_counts"][&module.name].as_array() {
            let theirs: Vec<usize> = counts
                .iter()
                .map(|c| c.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.alive_counts[i], theirs, "{name} {}", module.name);
        }
        // The same pairs are on after the optimisation.
        for (ours, theirs) in got.lower[i]
            .iter()
            .zip(m["ci_lower_leaky"][&module.name].as_array().unwrap())
        {
            for (a, b) in ours.iter().zip(theirs.as_array().unwrap()) {
                assert_eq!(
                    *a > 0.0,
                    b.as_f64().unwrap() > 0.0,
                    "{name} {}",
                    module.name
                );
            }
        }
    }
    assert!(
        worst <= 1e-3,
        "{name}: optimised pre-sigmoid CI off by {worst:e}"
    );
    let metrics = &m["metrics"];
    let label_prob = metrics["ci_masked_label_prob"]
        .as_f64()
        .or(metrics["label_prob"].as_f64())
        .unwrap();
    let ours = got.metrics.ci_masked_label_prob.unwrap() as f64;
    assert!(
        (ours - label_prob).abs() <= 1e-3,
        "{name}: label prob {ours} vs {label_prob}"
    );
    if let Some(l0) = metrics["l0_total"].as_f64() {
        assert!(
            (got.metrics.l0_total - l0).abs() <= 1e-3,
            "{name}: L0 {} vs {l0}",
            got.metrics.l0_total
        );
    }
    eprintln!(
        "{name}: optimised pre-sigmoid CI within {worst:.1e}, label prob {ours:.6} vs {label_prob:.6}, \
         loss {:.4} → {:.4}",
        losses[0],
        losses[cfg.steps - 1]
    );
    let stoch = got.metrics.stoch_masked_label_prob.unwrap();
    assert!((0.0..=1.0).contains(&stoch));

    // The graph of our optimised CI: the app's semantics over the tokens up to the position.
    let opt_ci = optimized_prompt(&model, &ci, &got, position).unwrap();
    assert_eq!(opt_ci.tokens.len(), position + 1);
    let sources = SourceMap::probe(&model).unwrap();
    let th = Thresholds {
        ci: 0.0,
        output_prob: 0.01,
    };
    let cap = exp["meta"]["constants"]["MAX_OUTPUT_NODES_PER_POS"]
        .as_u64()
        .map(|c| c as usize);
    let reference =
        reference_graph_with(&model, &sources, &opt_ci, th, Semantics::App, cap).unwrap();
    let fast = FastEngine::with_backend(&model, &sources, Backend::Host)
        .unwrap()
        .graph_with(&model, &opt_ci, th, Semantics::App, cap)
        .unwrap();
    let raw = |g: &server::attribution::Graph| -> Value {
        json!(
            g.edges
                .iter()
                .map(|e| report::edge_tuple(&model, e))
                .collect::<Vec<_>>()
        )
    };
    compare_edges(
        &raw(&fast),
        &raw(&reference),
        1e-4,
        &format!("{name}: fast vs reference"),
    );
    let names = common::canonical_names(&exp);
    let theirs: Vec<Value> = m["graph"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.as_array().unwrap().clone();
            e[0] = json!(names(e[0].as_str().unwrap()));
            e[1] = json!(names(e[1].as_str().unwrap()));
            json!(e)
        })
        .collect();
    compare_edges(
        &raw(&reference),
        &json!(theirs),
        1e-3,
        &format!("{name}: ours vs the app's"),
    );
}

#[test]
fn optimised_ci_matches_the_app_on_llama_mlp_layerwise() {
    check("llama_mlp_layerwise");
}

#[test]
fn optimised_ci_matches_the_app_on_llama_glu_global() {
    check("llama_glu_global");
}

#[test]
fn optimised_ci_matches_the_app_on_gpt2_transformer_ci() {
    check("gpt2_transformer_ci");
}

#[test]
fn optimised_ci_matches_the_app_on_gpt2_main_format() {
    check("gpt2_main_format");
}

#[test]
fn the_loss_falls_cancelling_stops_and_bad_configs_are_refused() {
    let model = SpdModel::load(&fixture_dir("v2/llama_mlp_layerwise"), &Device::Cpu).unwrap();
    let tokens = [5u32, 17, 40, 2, 61, 33, 8];
    let ci = PromptCi::compute(&model, &tokens).unwrap();
    let cfg = OptimConfig::ce(6, 12, 60, 1e-3, 0.5);
    let mut losses = vec![];
    let got = optimize(&model, &ci, &cfg, &mut |p| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    // The label's probability does not fall from where it started by more than the sparsity term
    // allows: the CE part of the loss is lower at the end.
    let start = ci.target_probs[6][12];
    let end = got.metrics.ci_masked_label_prob.unwrap();
    assert!(
        end > 0.0 && (end >= start || -(end as f64).ln() < losses[0]),
        "{start} → {end}"
    );

    let kl = OptimConfig {
        recon: Recon::Kl,
        ..cfg.clone()
    };
    let got = optimize(&model, &ci, &kl, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(got.metrics.ci_masked_label_prob, None);

    let err = optimize(&model, &ci, &cfg, &mut |p| {
        if p.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, OptimError::Cancelled(3)), "{err}");

    for (bad, msg) in [
        (
            OptimConfig {
                position: 7,
                ..cfg.clone()
            },
            "out of range",
        ),
        (
            OptimConfig {
                recon: Recon::Ce { label: 96 },
                ..cfg.clone()
            },
            "vocabulary",
        ),
        (
            OptimConfig {
                steps: 0,
                ..cfg.clone()
            },
            "steps",
        ),
        (
            OptimConfig {
                steps: 100_001,
                ..cfg.clone()
            },
            "steps",
        ),
        (
            OptimConfig {
                imp_min_coeff: f64::NAN,
                ..cfg.clone()
            },
            "imp_min_coeff",
        ),
        (
            OptimConfig {
                pnorm: 0.0,
                ..cfg.clone()
            },
            "pnorm",
        ),
    ] {
        let err = optimize(&model, &ci, &bad, &mut |_| ControlFlow::Continue(())).unwrap_err();
        assert!(err.to_string().contains(msg), "{bad:?}: {err}");
    }
}

/// Stochastic masks and the PGD adversary run, are seeded (the same seed, the same result), and
/// report their label probabilities. The adversary ascends the loss, so on this prompt its label
/// probability is below the CI mask's (a search from a random start, so not a law: a fixed seed).
#[test]
fn stochastic_masks_and_pgd_are_seeded_and_reported() {
    use server::circuit::{MaskType, Pgd, PgdInit};
    let model = SpdModel::load(&fixture_dir("v2/llama_glu_global"), &Device::Cpu).unwrap();
    let tokens = [5u32, 17, 40, 2, 61, 33, 8];
    let ci = PromptCi::compute(&model, &tokens).unwrap();
    let cfg = OptimConfig {
        mask_type: MaskType::Stochastic,
        pgd: Some(Pgd {
            n_steps: 3,
            step_size: 0.1,
            init: PgdInit::Random,
        }),
        seed: 7,
        ..OptimConfig::ce(6, 12, 8, 1e-3, 0.5)
    };
    let run = || optimize(&model, &ci, &cfg, &mut |_| ControlFlow::Continue(())).unwrap();
    let (a, b) = (run(), run());
    assert_eq!(a.pre_sigmoid, b.pre_sigmoid);
    assert_eq!(a.metrics, b.metrics);
    let m = &a.metrics;
    for p in [
        m.ci_masked_label_prob,
        m.stoch_masked_label_prob,
        m.adv_pgd_label_prob,
    ] {
        assert!((0.0..=1.0).contains(&p.unwrap()), "{m:?}");
    }
    assert!(
        m.adv_pgd_label_prob.unwrap() <= m.ci_masked_label_prob.unwrap() + 1e-6,
        "{m:?}"
    );
    let other = optimize(
        &model,
        &ci,
        &OptimConfig {
            seed: 8,
            ..cfg.clone()
        },
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_ne!(
        other.pre_sigmoid, a.pre_sigmoid,
        "the seed drives the masks"
    );
}
