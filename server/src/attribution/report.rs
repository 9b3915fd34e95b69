//! The JSON document `attribute` prints: the same keys and edge tuples as the original's outputs
//! (`expected.json` of the fixtures), so scripts can diff the two.

use serde_json::{Map, Value, json};

use super::active::extract_active;
use super::graph::Semantics;
use super::graph::{Edge, Graph, Thresholds};
use super::normalize::{Normalization, normalize};
use super::prompt::PromptCi;
use super::sources::SourceMap;
use crate::model::SpdModel;

/// `[src, tgt, c_in, c_out, s_in, s_out, value, is_cross_seq]`
pub fn edge_tuple(model: &SpdModel, e: &Edge) -> Value {
    json!([
        e.source.name(model),
        e.target.name(model),
        e.c_in,
        e.c_out,
        e.s_in,
        e.s_out,
        e.value,
        e.is_cross_seq
    ])
}

pub fn sources_json(model: &SpdModel, sources: &SourceMap) -> Value {
    let mut map = Map::new();
    for (target, srcs) in &sources.targets {
        let names: Vec<&str> = srcs.iter().map(|s| s.layer.name(model)).collect();
        map.insert(target.name(model).to_owned(), json!(names));
    }
    Value::Object(map)
}

pub fn per_module(model: &SpdModel, values: &[Vec<Vec<f32>>]) -> Value {
    let mut map = Map::new();
    for (m, v) in model.modules.iter().zip(values) {
        map.insert(m.name.clone(), json!(v));
    }
    Value::Object(map)
}

pub struct Timing {
    pub ci_ms: f64,
    pub graph_ms: f64,
}

/// How the graph of a report was made.
#[derive(Debug, Clone, Copy)]
pub struct Made {
    pub semantics: Semantics,
    pub normalize: Normalization,
}

/// The whole report of one prompt, its edges normalised as `made` says.
pub fn report(
    model: &SpdModel,
    sources: &SourceMap,
    ci: &PromptCi,
    graph: &Graph,
    th: Thresholds,
    made: Made,
    timing: Timing,
) -> Value {
    let edges = normalize(&graph.edges, made.normalize);
    let names: Vec<&str> = model.modules.iter().map(|m| m.name.as_str()).collect();
    let mut active = Map::new();
    for (key, entry) in extract_active(&names, &ci.lower, &ci.target_probs, th) {
        active.insert(key, json!([entry.max, entry.positions]));
    }
    json!({
        "tokens": ci.tokens,
        "ci": per_module(model, &ci.lower),
        "ci_upper_leaky": per_module(model, &ci.upper),
        "ci_pre_sigmoid": per_module(model, &ci.pre_sigmoid),
        "masked_output_probs": graph.masked_probs,
        "target_output_probs": ci.target_probs,
        "sources_by_target": sources_json(model, sources),
        "ci_threshold": th.ci,
        "output_prob_threshold": th.output_prob,
        "normalized": made.normalize != Normalization::None,
        "normalize": made.normalize.name(),
        "semantics": made.semantics.name(),
        "n_backward_passes": graph.n_backward_passes,
        "edges": edges.iter().map(|e| edge_tuple(model, e)).collect::<Vec<_>>(),
        "active": Value::Object(active),
        "timing_ms": {"ci": timing.ci_ms, "graph": timing.graph_ms},
    })
}
