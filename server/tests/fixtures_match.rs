//! The engine against the original implementation's outputs on every fixture run, prompt and
//! threshold setting: CI, logits, probabilities, `sources_by_target`, edges, normalization, `active`.

mod common;

use candle_core::Device;
use common::*;
use serde_json::{Value, json};
use server::attribution::{
    Backend, FastEngine, PromptCi, SourceMap, Thresholds, normalize_by_target, reference_graph,
    report,
};
use server::model::SpdModel;

const ABS_TOL: f64 = 1e-5;
const EDGE_REL_TOL: f64 = 1e-4;

fn per_module_diff(model: &SpdModel, ours: &[Vec<Vec<f32>>], theirs: &Value) -> f64 {
    model
        .modules
        .iter()
        .zip(ours)
        .map(|(m, o)| max_abs_diff_2d(o, &theirs[&m.name]))
        .fold(0.0, f64::max)
}

/// The original server's order: stable sort by |value| descending, first 30,000, then normalize.
fn server_normalized(model: &SpdModel, graph: &server::attribution::Graph) -> Value {
    let mut edges = graph.edges.clone();
    edges.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    edges.truncate(30_000);
    json!(
        normalize_by_target(&edges)
            .iter()
            .map(|e| report::edge_tuple(model, e))
            .collect::<Vec<_>>()
    )
}

fn check_fixture(name: &str, checkpoint: &str) {
    let exp = expected(name);
    let path = fixture_dir(name).join(checkpoint);
    let model = SpdModel::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let sources = SourceMap::probe(&model).unwrap();
    let engines = [Backend::Host, Backend::Tensor]
        .map(|b| FastEngine::with_backend(&model, &sources, b).unwrap());
    assert_eq!(
        report::sources_json(&model, &sources),
        exp["meta"]["sources_by_target"],
        "{name}: sources_by_target"
    );
    let names: Vec<&str> = model.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(json!(names), exp["meta"]["target_module_paths"]);

    let (mut ci_err, mut logit_err, mut edge_err, mut fast_err) = (0f64, 0f64, 0f64, 0f64);
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
        logit_err = logit_err
            .max(max_abs_diff_2d(
                &ci.target_logits,
                &p["target_output_logits"],
            ))
            .max(max_abs_diff_2d(&ci.target_probs, &p["target_output_probs"]));
        for (run, attr) in p["attr"].as_object().unwrap() {
            let th = Thresholds {
                ci: attr["ci_threshold"].as_f64().unwrap() as f32,
                output_prob: attr["output_prob_threshold"].as_f64().unwrap() as f32,
            };
            let what = format!("{name}/{checkpoint} prompt {tokens:?} {run}");
            let graph = reference_graph(&model, &sources, &ci, th).unwrap();
            logit_err = logit_err
                .max(max_abs_diff_2d(
                    &graph.masked_logits,
                    &p["masked_output_logits"],
                ))
                .max(max_abs_diff_2d(
                    &graph.masked_probs,
                    &p["masked_output_probs"],
                ));
            assert_eq!(
                graph.n_backward_passes as u64,
                attr["n_backward_passes"].as_u64().unwrap(),
                "{what}"
            );
            let raw = json!(
                graph
                    .edges
                    .iter()
                    .map(|e| report::edge_tuple(&model, e))
                    .collect::<Vec<_>>()
            );
            edge_err = edge_err.max(compare_edges(&raw, &attr["edges"], EDGE_REL_TOL, &what));
            // The fast engine on both backends: same edges in the same order, values within
            // tolerance.
            for fast in &engines {
                let fast_graph = fast.graph(&model, &ci, th).unwrap();
                let fast_raw = json!(
                    fast_graph
                        .edges
                        .iter()
                        .map(|e| report::edge_tuple(&model, e))
                        .collect::<Vec<_>>()
                );
                let what = format!("{what} fast ({:?})", fast.backend());
                fast_err = fast_err.max(compare_edges(
                    &fast_raw,
                    &attr["edges"],
                    EDGE_REL_TOL,
                    &what,
                ));
                let keys = |v: &Value| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(edge_key)
                        .collect::<Vec<_>>()
                };
                assert!(keys(&fast_raw) == keys(&raw), "{what}: edge order differs");
                assert_eq!(
                    fast_graph.masked_probs, graph.masked_probs,
                    "{what}: masked probs"
                );
            }
            let norm = json!(
                normalize_by_target(&graph.edges)
                    .iter()
                    .map(|e| report::edge_tuple(&model, e))
                    .collect::<Vec<_>>()
            );
            edge_err = edge_err.max(compare_edges(
                &norm,
                &attr["edges_normalized"],
                EDGE_REL_TOL,
                &format!("{what} normalized"),
            ));
            edge_err = edge_err.max(compare_edges(
                &server_normalized(&model, &graph),
                &attr["edges_server_normalized"],
                EDGE_REL_TOL,
                &format!("{what} server-normalized"),
            ));

            let doc = report::report(
                &model,
                &sources,
                &ci,
                &graph,
                th,
                report::Made {
                    semantics: server::attribution::Semantics::Seed,
                    normalize: server::attribution::Normalization::None,
                },
                report::Timing {
                    ci_ms: 0.0,
                    graph_ms: 0.0,
                },
            );
            let ours = active_map(&doc["active"]);
            let theirs = active_map(&attr["active"]);
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                theirs.keys().collect::<Vec<_>>(),
                "{what}: active keys"
            );
            for (k, (max, pos)) in &theirs {
                assert_eq!(&ours[k].1, pos, "{what}: active positions of {k}");
                assert!(
                    (ours[k].0 - max).abs() <= ABS_TOL,
                    "{what}: active max of {k}: {} vs {max}",
                    ours[k].0
                );
            }
        }
    }
    assert!(
        ci_err <= ABS_TOL,
        "{name}/{checkpoint}: CI error {ci_err:e}"
    );
    assert!(
        logit_err <= ABS_TOL,
        "{name}/{checkpoint}: logits/probs error {logit_err:e}"
    );
    eprintln!(
        "{name}/{checkpoint}: max |ΔCI| {ci_err:.2e}, max |Δlogit/prob| {logit_err:.2e}, max edge error {edge_err:.2e} (fast engine, both backends {fast_err:.2e}) of max |edge|"
    );
}

#[test]
fn tiny_shared_pth() {
    check_fixture("tiny_shared", "model_1.pth");
}

#[test]
fn tiny_shared_safetensors() {
    check_fixture("tiny_shared", "model.safetensors");
}

#[test]
fn tiny_vector_pth() {
    check_fixture("tiny_vector", "model_1.pth");
}

#[test]
fn tiny_vector_safetensors() {
    check_fixture("tiny_vector", "model.safetensors");
}

#[test]
fn tiny_mlp_pth() {
    check_fixture("tiny_mlp", "model_1.pth");
}

#[test]
fn tiny_mlp_safetensors() {
    check_fixture("tiny_mlp", "model.safetensors");
}

#[test]
fn run_directory_picks_the_pth_checkpoint() {
    let model = SpdModel::load(&fixture_dir("tiny_shared"), &Device::Cpu).unwrap();
    assert!(model.checkpoint.ends_with("model_1.pth"));
}
