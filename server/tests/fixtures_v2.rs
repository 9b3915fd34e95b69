//! Runs in spd's Feb 2026 formats (`tests/fixtures/v2`, written and computed by spd `dev` 2ab728c0
//! and `main` 3f0bb61e): per-module C, layerwise and global CI networks, weight deltas, and the
//! GPT2Simple / LlamaSimpleMLP / LlamaSimple targets. Against the original's outputs: CI (lower,
//! upper, pre-sigmoid), every forward's logits, `sources_by_target`; and the seed-semantics graph of
//! the reference engine against the fast engine where the fast engine covers the family.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use common::*;
use serde_json::{Value, json};
use server::attribution::{
    Backend, FastEngine, Layer, PromptCi, SourceMap, Thresholds, reference_graph, report,
};
use server::model::SpdModel;
use server::model::transformer::{softmax_last, tokens_tensor};

const ABS_TOL: f64 = 1e-5;
const EDGE_REL_TOL: f64 = 1e-4;

fn v2(name: &str) -> String {
    format!("v2/{name}")
}

fn per_module_diff(model: &SpdModel, ours: &[Vec<Vec<f32>>], theirs: &Value) -> f64 {
    model
        .modules
        .iter()
        .zip(ours)
        .map(|(m, o)| max_abs_diff_2d(o, &theirs[&m.name]))
        .fold(0.0, f64::max)
}

fn host2(x: &Tensor) -> Vec<Vec<f32>> {
    x.squeeze(0).unwrap().to_vec2().unwrap()
}

/// `sources_by_target` as target → set of sources; spd names the unembedding `lm_head` (dev) or
/// `output` (main), this tool always `output`. The orders differ (spd lists the config's module
/// order); the edges are ordered by this tool's model order in both engines.
fn source_sets(v: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let rename = |s: &str| if s == "lm_head" { "output" } else { s }.to_owned();
    let pairs: Vec<(String, Vec<String>)> = match v {
        Value::Array(items) => items
            .iter()
            .map(|p| {
                let srcs = p[1].as_array().unwrap();
                (
                    p[0].as_str().unwrap().to_owned(),
                    srcs.iter()
                        .map(|s| s.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, s)| {
                let srcs = s.as_array().unwrap();
                (
                    k.clone(),
                    srcs.iter()
                        .map(|s| s.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect(),
        _ => panic!("sources_by_target: {v}"),
    };
    pairs
        .into_iter()
        .map(|(t, s)| (rename(&t), s.iter().map(|x| rename(x)).collect()))
        .collect()
}

fn check_run(name: &str, checkpoint: &str) {
    let exp = expected(&v2(name));
    let model = SpdModel::load(&fixture_dir(&v2(name)).join(checkpoint), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    // Module paths and C as the original lists them (its order is the config's; compare as sets).
    let ours: BTreeSet<(String, u64)> = model
        .modules
        .iter()
        .map(|m| (m.name.clone(), m.components.c() as u64))
        .collect();
    let theirs: BTreeSet<(String, u64)> = exp["meta"]["module_to_c"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(ours, theirs, "{name}: modules and C");

    let sources = SourceMap::probe(&model).unwrap();
    assert_eq!(
        source_sets(&report::sources_json(&model, &sources)),
        source_sets(&exp["meta"]["sources_by_target"]),
        "{name}: sources_by_target"
    );
    // Cross-position sources are exactly k/v → o_proj of one block.
    for (target, srcs) in &sources.targets {
        for s in srcs {
            let expect_cross = match (target, s.layer) {
                (Layer::Module(t), Layer::Module(src)) => {
                    let (t, src) = (&model.modules[*t].id, &model.modules[src].id);
                    use server::model::ModuleKind::*;
                    t.kind == O && t.block == src.block && matches!(src.kind, K | V)
                }
                _ => false,
            };
            assert_eq!(s.cross_seq, expect_cross, "{name}: cross_seq of {s:?}");
        }
    }

    // The host backend covers every family; the tensor backend GPT2Simple only.
    let family = model.target.cfg.family;
    let gpt2 = family == server::model::transformer::Family::Gpt2Simple;
    let mut engines = vec![FastEngine::with_backend(&model, &sources, Backend::Host).unwrap()];
    match FastEngine::with_backend(&model, &sources, Backend::Tensor) {
        Ok(engine) => engines.push(engine),
        Err(why) => assert!(!gpt2, "{name}: {why}"),
    }
    assert_eq!(engines.len(), if gpt2 { 2 } else { 1 }, "{name}: backends");

    let (mut ci_err, mut logit_err, mut edge_err) = (0f64, 0f64, 0f64);
    for p in exp["prompts"].as_array().unwrap() {
        let tokens = common::token_ids(p);
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        ci_err = ci_err
            .max(per_module_diff(&model, &ci.lower, &p["ci_lower_leaky"]))
            .max(per_module_diff(&model, &ci.upper, &p["ci_upper_leaky"]))
            .max(per_module_diff(
                &model,
                &ci.pre_sigmoid,
                &p["ci_pre_sigmoid"],
            ));
        let logits = &p["logits"];
        logit_err = logit_err.max(max_abs_diff_2d(&ci.target_logits, &logits["target"]));
        let tok = tokens_tensor(&tokens, &Device::Cpu).unwrap();
        let ones = model.ones_masks(tokens.len()).unwrap();
        for (masks, delta, key) in [
            (&ci.lower_tensors, false, "ci_masked"),
            (&ci.lower_tensors, true, "ci_masked_plus_delta"),
            (&ones, true, "unmasked_plus_delta"),
            (&ones, false, "unmasked_no_delta"),
        ] {
            let ours = model.masked_logits(&tok, masks, delta).unwrap();
            let d = max_abs_diff_2d(&host2(&ours), &logits[key]);
            assert!(d <= ABS_TOL, "{name} {tokens:?}: {key} logits off by {d:e}");
            logit_err = logit_err.max(d);
        }

        // Seed semantics at the app's CI threshold 0 is the whole graph; a higher threshold keeps
        // the reference engine quick on these sizes.
        let th = Thresholds {
            ci: 0.1,
            output_prob: 0.05,
        };
        let graph = reference_graph(&model, &sources, &ci, th).unwrap();
        let masked =
            softmax_last(&model.masked_logits(&tok, &ci.lower_tensors, false).unwrap()).unwrap();
        assert_eq!(graph.masked_probs, host2(&masked), "{name}: masked probs");
        assert!(!graph.edges.is_empty(), "{name}: an empty graph");
        let raw = |g: &server::attribution::Graph| {
            json!(
                g.edges
                    .iter()
                    .map(|e| report::edge_tuple(&model, e))
                    .collect::<Vec<_>>()
            )
        };
        for engine in &engines {
            let fg = engine.graph(&model, &ci, th).unwrap();
            let what = format!("{name} {tokens:?} fast {:?}", engine.backend());
            edge_err = edge_err.max(compare_edges(&raw(&fg), &raw(&graph), EDGE_REL_TOL, &what));
            let keys = |v: &Value| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(edge_key)
                    .collect::<Vec<_>>()
            };
            assert!(keys(&raw(&fg)) == keys(&raw(&graph)), "{what}: edge order");
        }
    }
    assert!(
        ci_err <= ABS_TOL,
        "{name}/{checkpoint}: CI error {ci_err:e}"
    );
    assert!(
        logit_err <= ABS_TOL,
        "{name}/{checkpoint}: logits error {logit_err:e}"
    );
    eprintln!(
        "{name}/{checkpoint}: max |ΔCI| {ci_err:.2e}, max |Δlogit| {logit_err:.2e}, fast vs reference {edge_err:.2e} of max |edge|"
    );
}

macro_rules! runs {
    ($($test:ident: $name:literal, $ckpt:literal;)*) => {
        $(#[test] fn $test() { check_run($name, $ckpt); })*
    };
}

runs! {
    llama_mlp_layerwise_pth: "llama_mlp_layerwise", "model_1000.pth";
    llama_mlp_layerwise_safetensors: "llama_mlp_layerwise", "model.safetensors";
    llama_glu_global_pth: "llama_glu_global", "model_1000.pth";
    llama_glu_global_safetensors: "llama_glu_global", "model.safetensors";
    gpt2_transformer_ci_pth: "gpt2_transformer_ci", "model_1000.pth";
    gpt2_transformer_ci_safetensors: "gpt2_transformer_ci", "model.safetensors";
    gpt2_main_format_pth: "gpt2_main_format", "model_1000.pth";
    gpt2_main_format_safetensors: "gpt2_main_format", "model.safetensors";
}

/// The global transformer CI attends both ways: changing the last token changes CI at position 0.
#[test]
fn transformer_ci_reads_later_tokens() {
    let model = SpdModel::load(&fixture_dir(&v2("gpt2_transformer_ci")), &Device::Cpu).unwrap();
    let a = PromptCi::compute(&model, &[3, 4, 5, 6]).unwrap();
    let b = PromptCi::compute(&model, &[3, 4, 5, 7]).unwrap();
    let first = |ci: &PromptCi| {
        ci.pre_sigmoid
            .iter()
            .map(|m| m[0].clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(first(&a), first(&b));
}

fn our_names(exp: &Value) -> impl Fn(&str) -> String + '_ {
    common::canonical_names(exp)
}

/// A display edge `["layer:pos:c", "layer:pos:c", value, cross]` as a raw edge tuple.
fn display_as_raw(e: &Value, names: &dyn Fn(&str) -> String) -> Value {
    let split = |k: &str| {
        let mut parts = k.rsplitn(3, ':');
        let c: u64 = parts.next().unwrap().parse().unwrap();
        let s: u64 = parts.next().unwrap().parse().unwrap();
        (names(parts.next().unwrap()), s, c)
    };
    let (src, s_in, c_in) = split(e[0].as_str().unwrap());
    let (tgt, s_out, c_out) = split(e[1].as_str().unwrap());
    json!([src, tgt, c_in, c_out, s_in, s_out, e[2], e[3]])
}

/// SPD's app semantics by the reference engine against the app's own graphs: the raw graph (edge
/// set identical, values within 1e-4 of the largest |edge|), the output nodes after the
/// 15-per-position cap, and the display's L2 normalisations and CI filter.
fn check_app(name: &str) {
    use server::attribution::{Normalization, Semantics, normalize, reference_graph_with};
    let exp = expected(&v2(name));
    let names = our_names(&exp);
    let model = SpdModel::load(&fixture_dir(&v2(name)), &Device::Cpu).unwrap();
    let sources = SourceMap::probe(&model).unwrap();
    let rename = |edges: &Value| -> Value {
        json!(
            edges
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let mut e = e.as_array().unwrap().clone();
                    e[0] = json!(names(e[0].as_str().unwrap()));
                    e[1] = json!(names(e[1].as_str().unwrap()));
                    e
                })
                .collect::<Vec<_>>()
        )
    };
    // spd `dev`'s app caps outputs at 15 per position; `main`'s had no cap.
    let cap = exp["meta"]["constants"]["MAX_OUTPUT_NODES_PER_POS"]
        .as_u64()
        .map(|c| c as usize);
    // The app sorts display edges by |value| (stably) and keeps the first GLOBAL_EDGE_LIMIT.
    let limit = exp["meta"]["constants"]["GLOBAL_EDGE_LIMIT"]
        .as_u64()
        .unwrap_or(50_000) as usize;
    let mut worst = 0f64;
    let mut noise_groups = 0;
    for p in exp["prompts"].as_array().unwrap() {
        let tokens = common::token_ids(p);
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        for (key, g) in p["modes"]["fp32"]["graph"].as_object().unwrap() {
            let th = Thresholds {
                ci: 0.0,
                output_prob: g["output_prob_threshold"].as_f64().unwrap() as f32,
            };
            let fast = FastEngine::with_backend(&model, &sources, Backend::Host).unwrap();
            for engine in ["reference", "fast"] {
                let what = format!("{name} {tokens:?} {key} {engine} engine");
                let graph = match engine {
                    "reference" => {
                        reference_graph_with(&model, &sources, &ci, th, Semantics::App, cap)
                            .unwrap()
                    }
                    _ => fast
                        .graph_with(&model, &ci, th, Semantics::App, cap)
                        .unwrap(),
                };
                let outputs: Vec<(u64, u64)> = graph.alive[model.modules.len() + 1]
                    .iter()
                    .enumerate()
                    .flat_map(|(s, v)| v.iter().map(move |&t| (s as u64, t as u64)))
                    .collect();
                let mut theirs: Vec<(u64, u64)> = g["output_nodes"]["alive"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| (x[0].as_u64().unwrap(), x[1].as_u64().unwrap()))
                    .collect();
                theirs.sort_unstable();
                assert_eq!(outputs, theirs, "{what}: output nodes");
                let raw = |edges: &[server::attribution::Edge]| {
                    json!(
                        edges
                            .iter()
                            .map(|e| report::edge_tuple(&model, e))
                            .collect::<Vec<_>>()
                    )
                };
                worst = worst.max(compare_edges(
                    &raw(&graph.edges),
                    &rename(&g["edges"]),
                    EDGE_REL_TOL,
                    &what,
                ));
                let scale = graph.edges.iter().fold(0f64, |m, e| m.max(e.value.abs()));
                for (display, norm) in [
                    ("ci0_none", Normalization::None),
                    ("ci0_target", Normalization::L2Target),
                    ("ci0_layer", Normalization::L2Layer),
                ] {
                    let Some(theirs) = g["display"][display]["edges"].as_array() else {
                        continue;
                    };
                    // A group whose norm is float noise (in an RMSNorm model `wte` → block-0 edges are
                    // exactly zero: the norm is scale-invariant) normalises to arbitrary values on
                    // both sides; those groups are left out, every other one must match.
                    let group = |layer: &str, s: u64, c: u64| match norm {
                        Normalization::L2Layer => (layer.to_owned(), 0, 0),
                        _ => (layer.to_owned(), s, c),
                    };
                    let mut norms: std::collections::HashMap<(String, u64, u64), f64> =
                        Default::default();
                    for e in raw(&graph.edges).as_array().unwrap() {
                        let k = group(
                            e[1].as_str().unwrap(),
                            e[5].as_u64().unwrap(),
                            e[3].as_u64().unwrap(),
                        );
                        *norms.entry(k).or_default() += e[6].as_f64().unwrap().powi(2);
                    }
                    let signal = |e: &Value| {
                        let k = group(
                            e[1].as_str().unwrap(),
                            e[5].as_u64().unwrap(),
                            e[3].as_u64().unwrap(),
                        );
                        norm == Normalization::None || norms[&k].sqrt() > 1e-4 * scale
                    };
                    noise_groups += norms.values().filter(|n| n.sqrt() <= 1e-4 * scale).count();
                    let theirs: Vec<Value> = theirs
                        .iter()
                        .map(|e| display_as_raw(e, &names))
                        .filter(|e| signal(e))
                        .collect();
                    let mut shown = normalize(&graph.edges, norm);
                    shown.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
                    shown.truncate(limit);
                    let ours: Vec<Value> = raw(&shown)
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|e| signal(e))
                        .cloned()
                        .collect();
                    // Normalised values are at most 1: an absolute tolerance.
                    let max = ours
                        .iter()
                        .fold(0f64, |m, e| m.max(e[6].as_f64().unwrap().abs()));
                    compare_edges(
                        &json!(ours),
                        &json!(theirs),
                        1e-4 / max.max(1e-30),
                        &format!("{what} {display}"),
                    );
                }
                // The display's CI filter: both endpoints' CI > 0.1 (embed and outputs always kept).
                let kept = |layer: server::attribution::Layer, s: u32, c: u32| match layer {
                    Layer::Module(i) => ci.lower[i][s as usize][c as usize] > 0.1,
                    _ => true,
                };
                let mut filtered: Vec<_> = graph
                    .edges
                    .iter()
                    .filter(|e| kept(e.source, e.s_in, e.c_in) && kept(e.target, e.s_out, e.c_out))
                    .copied()
                    .collect();
                filtered.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
                filtered.truncate(limit);
                let Some(theirs) = g["display"]["ci0.1_none"]["edges"].as_array() else {
                    continue;
                };
                let theirs: Vec<Value> = theirs.iter().map(|e| display_as_raw(e, &names)).collect();
                compare_edges(
                    &raw(&filtered),
                    &json!(theirs),
                    EDGE_REL_TOL,
                    &format!("{what} ci0.1_none"),
                );
            }
        }
    }
    eprintln!(
        "{name}: app semantics, both engines vs SPD's app: {worst:.2e} of max |edge| \
         ({noise_groups} normalisation groups at float-noise level left out)"
    );
}

#[test]
fn app_semantics_llama_mlp_layerwise() {
    check_app("llama_mlp_layerwise");
}

#[test]
fn app_semantics_llama_glu_global() {
    check_app("llama_glu_global");
}

#[test]
fn app_semantics_gpt2_transformer_ci() {
    check_app("gpt2_transformer_ci");
}

#[test]
fn app_semantics_gpt2_main_format() {
    check_app("gpt2_main_format");
}
