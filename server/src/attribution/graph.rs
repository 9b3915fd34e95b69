//! The reference attribution engine: one backward pass per alive target node, exactly as the original.
//! Slow but obviously right; faster engines are checked against it.

use candle_core::{Device, IndexOp, Tensor};

use super::layer::Layer;
use super::prompt::PromptCi;
use super::sources::SourceMap;
use crate::model::transformer::softmax_last;
use crate::model::{RunError, SpdModel};

/// What makes a node alive (SPEC §3.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// A component node is alive where its CI ≥ this.
    pub ci: f32,
    /// An output node is alive where its probability ≥ this.
    pub output_prob: f32,
}

/// One edge: `∂ target_act[s_out, c_out] / ∂ a'_source[s_in, c_in] × a'_source[s_in, c_in]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edge {
    pub source: Layer,
    pub target: Layer,
    pub c_in: u32,
    pub c_out: u32,
    pub s_in: u32,
    pub s_out: u32,
    pub value: f64,
    pub is_cross_seq: bool,
}

/// A prompt's attribution graph and the numbers behind it.
#[derive(Debug, Clone)]
pub struct Graph {
    pub edges: Vec<Edge>,
    /// `[position][vocab]` of the CI-masked component model: what output nodes are thresholded on.
    pub masked_probs: Vec<Vec<f32>>,
    pub masked_logits: Vec<Vec<f32>>,
    /// `alive[layer.index()][position]`: alive component indices (token ids for `output`).
    pub alive: Vec<Vec<Vec<u32>>>,
    pub n_backward_passes: usize,
}

/// How a graph is computed (SPEC §6, "Two graph semantics"): the wire's type, so the page, the
/// HTTP API, `attribute` and the engines share one set of names.
pub use app::types::Semantics;

/// The cap on output nodes per position a semantics has by default: the app's 15, the seed none.
pub fn default_max_outputs(semantics: Semantics) -> Option<usize> {
    match semantics {
        Semantics::Seed => None,
        Semantics::App => Some(15),
    }
}

/// Alive nodes per layer and position under `semantics`: `wte:0` everywhere; components with CI
/// at or above (seed) or strictly above (app) the threshold; output tokens likewise by masked
/// probability, the `max_outputs` most probable per position (ties to the lower token id).
pub fn alive_nodes_with(
    ci: &PromptCi,
    masked_probs: &[Vec<f32>],
    th: Thresholds,
    semantics: Semantics,
    max_outputs: Option<usize>,
) -> Vec<Vec<Vec<u32>>> {
    let keep = |v: f32, thr: f32| match semantics {
        Semantics::Seed => v >= thr,
        Semantics::App => v > thr,
    };
    let above = |row: &[f32], thr: f32| -> Vec<u32> {
        row.iter()
            .enumerate()
            .filter(|(_, v)| keep(**v, thr))
            .map(|(i, _)| i as u32)
            .collect()
    };
    let t = ci.tokens.len();
    let mut alive = vec![vec![vec![0u32]; t]];
    for module in &ci.lower {
        alive.push(module.iter().map(|row| above(row, th.ci)).collect());
    }
    alive.push(
        masked_probs
            .iter()
            .map(|row| {
                let mut out = above(row, th.output_prob);
                if let Some(k) = max_outputs
                    && out.len() > k
                {
                    out.sort_by(|a, b| {
                        row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b))
                    });
                    out.truncate(k);
                    out.sort_unstable();
                }
                out
            })
            .collect(),
    );
    alive
}

/// Alive nodes of the seed's semantics: `wte:0` everywhere, components with CI ≥ threshold, output
/// tokens with masked probability ≥ threshold.
pub fn alive_nodes(ci: &PromptCi, masked_probs: &[Vec<f32>], th: Thresholds) -> Vec<Vec<Vec<u32>>> {
    alive_nodes_with(ci, masked_probs, th, Semantics::Seed, None)
}

/// Computes the graph of one prompt by one backward pass per alive target node (seed semantics).
pub fn reference_graph(
    model: &SpdModel,
    sources: &SourceMap,
    ci: &PromptCi,
    th: Thresholds,
) -> Result<Graph, RunError> {
    reference_graph_with(model, sources, ci, th, Semantics::Seed, None)
}

/// [`reference_graph`] under either semantics, with at most `max_outputs` output nodes per
/// position. For the app's, a CI-masked forward (no deltas) gives the output nodes and the
/// probabilities shown; the gradients come from a second forward with every mask 1 plus the
/// weight deltas.
pub fn reference_graph_with(
    model: &SpdModel,
    sources: &SourceMap,
    ci: &PromptCi,
    th: Thresholds,
    semantics: Semantics,
    max_outputs: Option<usize>,
) -> Result<Graph, RunError> {
    let tokens = &ci.tokens;
    let t = tokens.len();
    let n = model.modules.len();
    let host2 = |x: &Tensor| -> candle_core::Result<Vec<Vec<f32>>> {
        x.squeeze(0)?.to_device(&Device::Cpu)?.to_vec2()
    };
    // The seed's gradient forward is the CI-masked one; the app's is a second forward, so its
    // CI-masked logits need no leaves.
    let (fwd, masked) = match semantics {
        Semantics::Seed => {
            let fwd = model.leaf_forward(tokens, &ci.lower_tensors)?;
            let masked = fwd.logits.detach();
            (fwd, masked)
        }
        Semantics::App => (
            model.leaf_forward_with(tokens, &model.ones_masks(t)?, true)?,
            model.masked_logits(
                &crate::model::transformer::tokens_tensor(tokens, model.device())?,
                &ci.lower_tensors,
                false,
            )?,
        ),
    };
    let masked_logits = host2(&masked)?;
    let masked_probs = host2(&softmax_last(&masked)?)?;
    let alive = alive_nodes_with(ci, &masked_probs, th, semantics, max_outputs);
    // Leaf values on the host, indexed like `alive`.
    let mut leaf_vals = vec![host2(fwd.wte.as_tensor())?];
    for leaf in &fwd.leaves {
        leaf_vals.push(host2(leaf.as_tensor())?);
    }

    let mut edges = Vec::new();
    let mut n_backward_passes = 0;
    for (target, srcs) in &sources.targets {
        let act = match target {
            Layer::Module(i) => &fwd.acts[*i],
            _ => &fwd.logits,
        };
        for s_out in 0..t {
            for &c_out in &alive[target.index(n)][s_out] {
                let grads = act.i((0, s_out, c_out as usize))?.backward()?;
                n_backward_passes += 1;
                for src in srcs {
                    let li = src.layer.index(n);
                    let leaf = match src.layer {
                        Layer::Wte => fwd.wte.as_tensor(),
                        Layer::Module(j) => fwd.leaves[j].as_tensor(),
                        Layer::Output => unreachable!("output is never a source"),
                    };
                    let grad = grads.get(leaf).map(host2).transpose()?;
                    let first = if src.cross_seq { 0 } else { s_out };
                    for s_in in first..=s_out {
                        for &c_in in &alive[li][s_in] {
                            let value = match (&grad, src.layer) {
                                (None, _) => 0.0,
                                (Some(g), Layer::Wte) => g[s_in]
                                    .iter()
                                    .zip(&leaf_vals[li][s_in])
                                    .map(|(g, a)| g * a)
                                    .sum::<f32>(),
                                (Some(g), _) => {
                                    g[s_in][c_in as usize] * leaf_vals[li][s_in][c_in as usize]
                                }
                            };
                            edges.push(Edge {
                                source: src.layer,
                                target: *target,
                                c_in,
                                c_out,
                                s_in: s_in as u32,
                                s_out: s_out as u32,
                                value: value as f64,
                                is_cross_seq: src.cross_seq,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(Graph {
        edges,
        masked_probs,
        masked_logits,
        alive,
        n_backward_passes,
    })
}
