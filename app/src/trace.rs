//! Pruning a traced graph to what carries its targets' influence (issue "Reading big graphs"):
//! the smallest set of nodes, most influential first, that reaches a node threshold of the total
//! influence; the highest-scoring edges that reach an edge threshold of the total score; then only
//! what still has a path to a target. `wte` and the targets are always kept.
//!
//! Both rankings are fixed by the server's numbers (and the edge threshold is a fraction of the
//! whole graph's score, not of what survived the node cut), so the kept set only grows with either
//! threshold: a slider never brings back a node by removing another. Pure, so the page prunes on
//! every slider step without asking the server and the tests run natively.

use std::collections::HashMap;

use crate::types::{GraphData, TraceData};

/// Node and edge thresholds a trace view starts with (circuit-tracer's defaults).
pub const DEFAULT_NODE_THRESHOLD: f64 = 0.8;
pub const DEFAULT_EDGE_THRESHOLD: f64 = 0.98;

/// What a pruning kept, as indices into the traced graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Pruned {
    /// Kept nodes, in the graph's order.
    pub nodes: Vec<usize>,
    /// Kept edges, in the graph's (score) order.
    pub edges: Vec<usize>,
    /// The fraction of the whole graph's non-target influence the kept nodes carry.
    pub completeness: f64,
}

/// The kept part of `graph` at the two thresholds (each in [0, 1]); `None` for a graph that was
/// not traced.
pub fn prune(graph: &GraphData, node_threshold: f64, edge_threshold: f64) -> Option<Pruned> {
    let trace = graph.trace.as_ref()?;
    let n = graph.nodes.len();
    let index: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| (node.key.as_str(), i))
        .collect();
    let mut target = vec![false; n];
    for t in &trace.targets {
        if let Some(&i) = index.get(t.as_str()) {
            target[i] = true;
        }
    }
    let is_wte: Vec<bool> = graph
        .nodes
        .iter()
        .map(|node| node.key.starts_with("wte:"))
        .collect();
    let influence = |i: usize| f64::from(trace.influence.get(i).copied().unwrap_or(0.0));

    // Nodes: the most influential first, until they carry the threshold.
    let mut ranked: Vec<usize> = (0..n)
        .filter(|&i| !target[i] && !is_wte[i] && influence(i) > 0.0)
        .collect();
    ranked.sort_by(|&a, &b| influence(b).total_cmp(&influence(a)).then(a.cmp(&b)));
    let total = trace.total_influence;
    let mut kept: Vec<bool> = (0..n).map(|i| target[i] || is_wte[i]).collect();
    let mut carried = 0.0;
    for i in ranked {
        if total > 0.0 && carried >= node_threshold * total {
            break;
        }
        carried += influence(i);
        kept[i] = true;
    }

    // Edges: the highest-scoring first, until they carry the threshold; both ends kept.
    let score = |j: usize| f64::from(trace.edge_scores.get(j).copied().unwrap_or(0.0));
    let mut by_score: Vec<usize> = (0..graph.edges.len()).collect();
    by_score.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    let ends: Vec<Option<(usize, usize)>> = graph
        .edges
        .iter()
        .map(|e| Some((*index.get(e.src.as_str())?, *index.get(e.tgt.as_str())?)))
        .collect();
    let mut edge_on = vec![false; graph.edges.len()];
    let mut flowed = 0.0;
    for j in by_score {
        if flowed >= edge_threshold * trace.total_edge_score || score(j) <= 0.0 {
            break;
        }
        flowed += score(j);
        if let Some((s, t)) = ends[j]
            && kept[s]
            && kept[t]
        {
            edge_on[j] = true;
        }
    }

    // Only what still reaches a target: walk the kept edges backwards from the targets.
    let mut into: Vec<Vec<usize>> = vec![vec![]; n];
    for (j, on) in edge_on.iter().enumerate() {
        if *on && let Some((s, t)) = ends[j] {
            into[t].push(s);
        }
    }
    let mut reaches = target.clone();
    let mut stack: Vec<usize> = (0..n).filter(|&i| target[i]).collect();
    while let Some(t) = stack.pop() {
        for &s in &into[t] {
            if !reaches[s] {
                reaches[s] = true;
                stack.push(s);
            }
        }
    }
    let nodes: Vec<usize> = (0..n)
        .filter(|&i| target[i] || is_wte[i] || (kept[i] && reaches[i]))
        .collect();
    let edges: Vec<usize> = (0..graph.edges.len())
        .filter(|&j| edge_on[j] && ends[j].is_some_and(|(_, t)| reaches[t]))
        .collect();
    let carried: f64 = nodes
        .iter()
        .filter(|&&i| !target[i] && !is_wte[i])
        .map(|&i| influence(i))
        // From +0: an empty `sum` of floats is −0, which the status line would print as "-0.0%".
        .fold(0.0, |a, b| a + b);
    let completeness = if total > 0.0 {
        (carried / total).min(1.0)
    } else {
        1.0
    };
    Some(Pruned {
        nodes,
        edges,
        completeness,
    })
}

/// The fraction of the whole graph's non-target influence that a (pruned) traced graph's nodes
/// carry; `None` for a graph that was not traced.
pub fn completeness(graph: &GraphData) -> Option<f64> {
    let t = graph.trace.as_ref()?;
    if t.total_influence <= 0.0 {
        return Some(1.0);
    }
    let carried: f64 = graph
        .nodes
        .iter()
        .zip(&t.influence)
        .filter(|(n, _)| !n.key.starts_with("wte:") && !t.targets.contains(&n.key))
        .map(|(_, &v)| f64::from(v))
        .fold(0.0, |a, b| a + b);
    Some((carried / t.total_influence).min(1.0))
}

/// The graph restricted to what `pruned` kept: the graph the canvas draws in trace mode, with its
/// trace data aligned to the kept nodes and edges.
pub fn pruned_graph(graph: &GraphData, pruned: &Pruned) -> GraphData {
    let trace = graph.trace.as_ref();
    let pick = |v: &[f32], ids: &[usize]| -> Vec<f32> {
        ids.iter()
            .map(|&i| v.get(i).copied().unwrap_or(0.0))
            .collect()
    };
    GraphData {
        nodes: pruned
            .nodes
            .iter()
            .map(|&i| graph.nodes[i].clone())
            .collect(),
        edges: pruned
            .edges
            .iter()
            .map(|&j| graph.edges[j].clone())
            .collect(),
        trace: trace.map(|t| TraceData {
            targets: t.targets.clone(),
            influence: pick(&t.influence, &pruned.nodes),
            edge_scores: pick(&t.edge_scores, &pruned.edges),
            total_influence: t.total_influence,
            total_edge_score: t.total_edge_score,
        }),
        ..graph.clone_without_elements()
    }
}

impl GraphData {
    /// Everything but the nodes, edges and trace, which a derived view replaces.
    fn clone_without_elements(&self) -> GraphData {
        GraphData {
            prompt_id: self.prompt_id,
            tokens: self.tokens.clone(),
            n_blocks: self.n_blocks,
            nodes: vec![],
            edges: vec![],
            total_edges: self.total_edges,
            edge_cap: self.edge_cap,
            params: self.params,
            outputs: self.outputs.clone(),
            optimization: self.optimization.clone(),
            trace: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::test_graph;

    /// wte → a → out, wte → b → out, wte → c (no path on), d → out with no influence.
    fn traced() -> GraphData {
        let nodes = [
            "wte:0:0",
            "h.0.mlp.c_fc:0:1",
            "h.0.mlp.c_fc:0:2",
            "h.0.mlp.c_fc:0:3",
            "h.0.mlp.down_proj:0:4",
            "output:0:9",
        ];
        let edges = [
            ("h.0.mlp.c_fc:0:1", "output:0:9", 3.0),
            ("h.0.mlp.c_fc:0:2", "output:0:9", -1.0),
            ("wte:0:0", "h.0.mlp.c_fc:0:1", 1.0),
            ("wte:0:0", "h.0.mlp.c_fc:0:2", 1.0),
            ("wte:0:0", "h.0.mlp.c_fc:0:3", 1.0),
            ("h.0.mlp.c_fc:0:3", "h.0.mlp.down_proj:0:4", 1.0),
        ];
        let mut g = test_graph(1, 1, &nodes, 0.5, &edges);
        // out's shares: a 3/4, b 1/4; a and b each get all of theirs from wte.
        g.trace = Some(TraceData {
            targets: vec!["output:0:9".into()],
            influence: vec![1.0, 0.75, 0.25, 0.0, 0.0, 1.0],
            edge_scores: vec![0.75, 0.25, 0.75, 0.25, 0.0, 0.0],
            total_influence: 1.0,
            total_edge_score: 2.0,
        });
        g
    }

    fn keys(g: &GraphData, p: &Pruned) -> Vec<String> {
        p.nodes.iter().map(|&i| g.nodes[i].key.clone()).collect()
    }

    #[test]
    fn thresholds_of_one_keep_every_influential_node_and_complete_the_trace() {
        let g = traced();
        let p = prune(&g, 1.0, 1.0).unwrap();
        assert_eq!(
            keys(&g, &p),
            [
                "wte:0:0",
                "h.0.mlp.c_fc:0:1",
                "h.0.mlp.c_fc:0:2",
                "output:0:9"
            ]
        );
        assert_eq!(p.edges, vec![0, 1, 2, 3]);
        assert!((p.completeness - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_low_node_threshold_keeps_the_strongest_path_and_says_how_much_it_carries() {
        let g = traced();
        let p = prune(&g, 0.5, 1.0).unwrap();
        assert_eq!(keys(&g, &p), ["wte:0:0", "h.0.mlp.c_fc:0:1", "output:0:9"]);
        assert_eq!(p.edges, vec![0, 2]);
        assert!((p.completeness - 0.75).abs() < 1e-12);
        // The edge threshold alone: 0.75 + 0.75 of 2.0 reach 0.7, so b's edges go, and b with them.
        let p = prune(&g, 1.0, 0.7).unwrap();
        assert_eq!(p.edges, vec![0, 2]);
        assert_eq!(keys(&g, &p), ["wte:0:0", "h.0.mlp.c_fc:0:1", "output:0:9"]);
        // Nothing at all: wte and the targets stay.
        let p = prune(&g, 0.0, 0.0).unwrap();
        assert_eq!(keys(&g, &p), ["wte:0:0", "output:0:9"]);
        assert!(p.edges.is_empty());
        assert_eq!(p.completeness, 0.0);
        assert!(
            p.completeness.is_sign_positive(),
            "shown as 0.0%, not -0.0%"
        );
    }

    #[test]
    fn an_untraced_graph_has_nothing_to_prune() {
        let mut g = traced();
        g.trace = None;
        assert!(prune(&g, 0.8, 0.98).is_none());
    }

    /// A random layered graph with random influences and scores: raising either threshold never
    /// drops a kept node or edge, and wte and the targets are always there.
    #[test]
    fn pruning_is_monotone_in_both_thresholds() {
        let mut seed = 7u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 10_000.0
        };
        let layers = ["wte", "h.0.attn.q_proj", "h.0.mlp.c_fc", "output"];
        let mut nodes = vec![];
        for (l, layer) in layers.iter().enumerate() {
            for c in 0..if l == 0 { 1 } else { 6 } {
                nodes.push(format!("{layer}:0:{c}"));
            }
        }
        let mut edges = vec![];
        for (i, s) in nodes.iter().enumerate() {
            for t in &nodes[i + 1..] {
                let (ls, lt) = (s.split(':').next(), t.split(':').next());
                if ls != lt && rand() < 0.5 {
                    edges.push((s.clone(), t.clone(), rand() as f32 - 0.5));
                }
            }
        }
        let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let edge_refs: Vec<(&str, &str, f32)> = edges
            .iter()
            .map(|(s, t, v)| (s.as_str(), t.as_str(), *v))
            .collect();
        let mut g = test_graph(1, 1, &node_refs, 0.5, &edge_refs);
        let influence: Vec<f32> = (0..nodes.len()).map(|_| rand() as f32).collect();
        let edge_scores: Vec<f32> = (0..edges.len()).map(|_| rand() as f32).collect();
        g.trace = Some(TraceData {
            targets: vec!["output:0:2".into(), "output:0:4".into()],
            total_influence: influence.iter().map(|&x| f64::from(x)).sum(),
            total_edge_score: edge_scores.iter().map(|&x| f64::from(x)).sum(),
            influence,
            edge_scores,
        });
        let steps = [0.0, 0.3, 0.5, 0.8, 0.9, 0.98, 1.0];
        for &tn in &steps {
            for w in steps.windows(2) {
                for (a, b) in [
                    (prune(&g, tn, w[0]), prune(&g, tn, w[1])),
                    (prune(&g, w[0], tn), prune(&g, w[1], tn)),
                ] {
                    let (a, b) = (a.unwrap(), b.unwrap());
                    assert!(a.nodes.iter().all(|i| b.nodes.contains(i)), "{tn} {w:?}");
                    assert!(a.edges.iter().all(|j| b.edges.contains(j)), "{tn} {w:?}");
                    assert!(a.completeness <= b.completeness + 1e-12);
                    for must in ["wte:0:0", "output:0:2", "output:0:4"] {
                        assert!(keys(&g, &b).iter().any(|k| k == must));
                    }
                }
            }
        }
    }

    #[test]
    fn the_pruned_graph_keeps_the_trace_aligned() {
        let g = traced();
        let p = prune(&g, 0.5, 1.0).unwrap();
        let v = pruned_graph(&g, &p);
        assert_eq!(v.nodes.len(), 3);
        assert_eq!(v.edges.len(), 2);
        let t = v.trace.clone().unwrap();
        assert_eq!(t.influence, vec![1.0, 0.75, 1.0]);
        assert_eq!(t.edge_scores, vec![0.75, 0.75]);
        assert_eq!(v.tokens, g.tokens);
        assert_eq!(completeness(&v), Some(p.completeness));
        assert_eq!(completeness(&g), Some(1.0));
    }
}
