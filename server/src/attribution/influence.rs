//! Each node's influence on chosen target outputs (issue "Reading big graphs"), as circuit-tracer
//! and Neuronpedia prune graphs: every target node's incoming |edges| are normalised to sum to 1,
//! and a node's influence is the weighted sum over every path from it to the targets of the
//! products of those shares — the sum of all powers of the normalised adjacency matrix, applied to
//! the targets' weights. An edge's score is the influence that flows along it: its target's
//! influence times its share.
//!
//! Edges always run from a layer earlier in model order to a later one (`wte` first, `output`
//! last; cross-position edges go from q/k/v to the same block's o_proj), so the graph is a DAG and
//! one pass over the layers from the last down sums every path: no iteration to convergence.
//!
//! This file holds the whole-graph version, over edges in memory; the fast engine folds the same
//! numbers while it computes (`fast/trace.rs`), and the tests hold one to the other.

use std::collections::HashMap;

use app::types::TraceTarget;

use super::graph::Edge;
use super::layer::Layer;

/// A node: layer, position, component (token id for `output`, 0 for `wte`).
pub type Node = (Layer, u32, u32);

/// What a trace starts from, resolved against a graph's output nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Seeds {
    /// Nodes with weights; each one's incoming edges are normalised on their own.
    Nodes(Vec<(Node, f64)>),
    /// The logit difference `a − b` at `pos`: one virtual target whose incoming edge from a source
    /// is the source's edge into `a` minus its edge into `b` (absent edges count 0).
    Diff { pos: u32, a: u32, b: u32 },
}

impl Seeds {
    /// The seeds of `target` in a graph whose alive output tokens per position are `outputs` and
    /// whose output probabilities are `probs`: the last position's outputs weighted by their
    /// probabilities (normalised to sum 1), one token (weight 1), or a difference. Fails where a
    /// needed output is not a node of the graph.
    pub fn resolve(
        target: TraceTarget,
        outputs: &[Vec<u32>],
        probs: &[Vec<f32>],
    ) -> Result<Seeds, String> {
        let alive = |pos: u32, token: u32| {
            outputs
                .get(pos as usize)
                .is_some_and(|o| o.binary_search(&token).is_ok())
        };
        let missing = |pos: u32, token: u32| {
            format!(
                "output token {token} at position {pos} is not a node of this graph (its \
                 probability is below the output threshold)"
            )
        };
        match target {
            TraceTarget::Last => {
                let pos = outputs.len().checked_sub(1).ok_or("the prompt is empty")?;
                let weights: Vec<(Node, f64)> = outputs[pos]
                    .iter()
                    .map(|&c| {
                        let p = probs[pos][c as usize] as f64;
                        ((Layer::Output, pos as u32, c), p)
                    })
                    .collect();
                let sum: f64 = weights.iter().map(|(_, w)| w).sum();
                if weights.is_empty() || sum <= 0.0 {
                    return Err(
                        "the last position has no output node above the output threshold".into(),
                    );
                }
                Ok(Seeds::Nodes(
                    weights.into_iter().map(|(n, w)| (n, w / sum)).collect(),
                ))
            }
            TraceTarget::Token { pos, token } => {
                if !alive(pos, token) {
                    return Err(missing(pos, token));
                }
                Ok(Seeds::Nodes(vec![((Layer::Output, pos, token), 1.0)]))
            }
            TraceTarget::Diff { pos, a, b } => {
                for t in [a, b] {
                    if !alive(pos, t) {
                        return Err(missing(pos, t));
                    }
                }
                Ok(Seeds::Diff { pos, a, b })
            }
        }
    }

    /// The target nodes: the seeds, or both sides of a difference.
    pub fn targets(&self) -> Vec<Node> {
        match self {
            Seeds::Nodes(n) => n.iter().map(|(n, _)| *n).collect(),
            Seeds::Diff { pos, a, b } => vec![(Layer::Output, *pos, *a), (Layer::Output, *pos, *b)],
        }
    }

    /// The weight a target starts with (a difference's two sides carry 1 between them).
    pub fn weight(&self, node: Node) -> f64 {
        match self {
            Seeds::Nodes(n) => n.iter().filter(|(m, _)| *m == node).map(|(_, w)| w).sum(),
            Seeds::Diff { .. } => {
                if self.targets().contains(&node) {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// A source's edges into the two sides of a difference: `(into a, into b)`.
pub type DiffPair = (f64, f64);

/// How a difference's influence flows back: per source, its share `|ea − eb| / Σ |ea − eb|`,
/// split between its two edges in proportion to their |values|. Returns, per source, its share
/// and the scores of its edges into `a` and `b`.
pub fn split_difference(pairs: &[DiffPair]) -> Vec<(f64, f64, f64)> {
    let total: f64 = pairs.iter().map(|(a, b)| (a - b).abs()).sum();
    pairs
        .iter()
        .map(|&(a, b)| {
            if total == 0.0 {
                return (0.0, 0.0, 0.0);
            }
            let share = (a - b).abs() / total;
            let both = a.abs() + b.abs();
            if both == 0.0 {
                (share, 0.0, 0.0)
            } else {
                (share, share * a.abs() / both, share * b.abs() / both)
            }
        })
        .collect()
}

/// A graph's influences: per node, and per edge of the slice it was computed on.
#[derive(Debug, Clone)]
pub struct Traced {
    pub influence: HashMap<Node, f64>,
    pub scores: Vec<f64>,
}

impl Traced {
    /// Σ influence over the nodes that are neither `wte` nor targets: what completeness is a
    /// fraction of.
    pub fn total_influence(&self, seeds: &Seeds) -> f64 {
        let targets = seeds.targets();
        self.influence
            .iter()
            .filter(|(n, _)| n.0 != Layer::Wte && !targets.contains(n))
            .map(|(_, v)| v)
            .sum()
    }
}

/// Influence of every node that reaches a target (the targets with their own weight), and every
/// edge's score, over a whole graph in memory.
pub fn trace(edges: &[Edge], seeds: &Seeds) -> Traced {
    let node_in = |e: &Edge| (e.target, e.s_out, e.c_out);
    let node_out = |e: &Edge| (e.source, e.s_in, e.c_in);
    // Σ |incoming| per node, then the incoming edges grouped by target node.
    let mut incoming: HashMap<Node, (f64, Vec<usize>)> = HashMap::new();
    for (i, e) in edges.iter().enumerate() {
        let entry = incoming.entry(node_in(e)).or_insert((0.0, Vec::new()));
        entry.0 += e.value.abs();
        entry.1.push(i);
    }
    let mut infl: HashMap<Node, f64> = HashMap::new();
    let mut scores = vec![0.0; edges.len()];
    let targets = seeds.targets();
    for &t in &targets {
        infl.insert(t, seeds.weight(t));
    }
    if let Seeds::Diff { .. } = seeds {
        // The virtual target: per source (in first-seen order), its edges into both sides.
        let mut pairs: Vec<(Node, DiffPair, [Option<usize>; 2])> = Vec::new();
        let mut slot: HashMap<Node, usize> = HashMap::new();
        for (side, t) in targets.iter().enumerate() {
            for &i in incoming.get(t).map_or(&[][..], |(_, ids)| ids) {
                let src = node_out(&edges[i]);
                let at = *slot.entry(src).or_insert_with(|| {
                    pairs.push((src, (0.0, 0.0), [None, None]));
                    pairs.len() - 1
                });
                let p = &mut pairs[at];
                if side == 0 {
                    p.1.0 += edges[i].value;
                } else {
                    p.1.1 += edges[i].value;
                }
                p.2[side] = Some(i);
            }
        }
        let split = split_difference(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
        for (p, (share, sa, sb)) in pairs.iter().zip(split) {
            if share > 0.0 {
                *infl.entry(p.0).or_default() += share;
            }
            for (at, score) in p.2.iter().zip([sa, sb]) {
                if let Some(i) = at {
                    scores[*i] = score;
                }
            }
        }
    }
    // Nodes by layer, latest first: every edge into a node comes from an earlier layer, so a
    // node's influence is complete when its layer is reached.
    let mut order: Vec<Node> = incoming.keys().copied().collect();
    order.sort_by(|a, b| b.cmp(a));
    for node in order {
        if matches!(seeds, Seeds::Diff { .. }) && targets.contains(&node) {
            continue; // already carried back as the difference
        }
        let Some(&mine) = infl.get(&node) else {
            continue;
        };
        let (total, edge_ids) = &incoming[&node];
        if mine == 0.0 || *total == 0.0 {
            continue;
        }
        for &i in edge_ids {
            let e = &edges[i];
            debug_assert!(e.source < e.target, "edges run forward in model order");
            let share = e.value.abs() / total;
            if share > 0.0 {
                *infl.entry(node_out(e)).or_default() += mine * share;
                scores[i] = mine * share;
            }
        }
    }
    Traced {
        influence: infl,
        scores,
    }
}

/// Dense indices of a graph's alive nodes, in the order `Graph::alive` lists them (layer in model
/// order, then position, then component): the order the wire lists nodes in.
#[derive(Debug, Clone)]
pub struct NodeIndex {
    /// `start[layer][position]`: the index of that cell's first node; one extra entry per layer
    /// and one extra layer close the ranges.
    start: Vec<Vec<usize>>,
    len: usize,
}

impl NodeIndex {
    pub fn new(alive: &[Vec<Vec<u32>>]) -> Self {
        let mut start = Vec::with_capacity(alive.len() + 1);
        let mut at = 0;
        for layer in alive {
            let mut row = Vec::with_capacity(layer.len() + 1);
            for cell in layer {
                row.push(at);
                at += cell.len();
            }
            row.push(at);
            start.push(row);
        }
        start.push(vec![at]);
        NodeIndex { start, len: at }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The index of `(layer, s, c)` where `alive` lists it, the layer given by its dense index.
    #[inline]
    pub fn get(&self, alive: &[Vec<Vec<u32>>], layer: usize, s: u32, c: u32) -> Option<usize> {
        let cell = alive.get(layer)?.get(s as usize)?;
        let at = cell.binary_search(&c).ok()?;
        Some(self.start[layer][s as usize] + at)
    }

    /// The indices of one layer's nodes.
    pub fn layer(&self, layer: usize) -> std::ops::Range<usize> {
        self.start[layer][0]..self.start[layer + 1][0]
    }
}

/// A traced graph: the seeds, every alive node's influence (in [`NodeIndex`] order) and the score
/// of every edge the graph holds.
#[derive(Debug, Clone)]
pub struct GraphTrace {
    pub seeds: Seeds,
    pub node: Vec<f64>,
    /// Per edge of the graph's `edges`.
    pub edge: Vec<f64>,
    /// Σ score over every edge of the whole graph (also those not kept).
    pub total_edge_score: f64,
}

impl GraphTrace {
    /// [`trace`] of a whole graph in memory, whose nodes are `alive` (a layer's dense index as
    /// [`Layer::index`] gives it, `n` the number of modules).
    pub fn of_edges(alive: &[Vec<Vec<u32>>], n: usize, edges: &[Edge], seeds: Seeds) -> Self {
        let traced = trace(edges, &seeds);
        let index = NodeIndex::new(alive);
        let mut node = vec![0.0; index.len()];
        for (&(layer, s, c), &v) in &traced.influence {
            if let Some(i) = index.get(alive, layer.index(n), s, c) {
                node[i] = v;
            }
        }
        GraphTrace {
            seeds,
            node,
            total_edge_score: traced.scores.iter().sum(),
            edge: traced.scores,
        }
    }

    /// Σ influence over every node but `wte` and the targets: what completeness is a fraction of.
    pub fn total_influence(&self, alive: &[Vec<Vec<u32>>], n: usize) -> f64 {
        let index = NodeIndex::new(alive);
        let mut skip: Vec<usize> = self
            .seeds
            .targets()
            .iter()
            .filter_map(|&(l, s, c)| index.get(alive, l.index(n), s, c))
            .collect();
        skip.sort_unstable();
        let wte = index.layer(Layer::Wte.index(n));
        self.node
            .iter()
            .enumerate()
            .filter(|(i, _)| !wte.contains(i) && skip.binary_search(i).is_err())
            .map(|(_, v)| v)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(src: Node, tgt: Node, value: f64) -> Edge {
        Edge {
            source: src.0,
            target: tgt.0,
            c_in: src.2,
            c_out: tgt.2,
            s_in: src.1,
            s_out: tgt.1,
            value,
            is_cross_seq: src.1 != tgt.1,
        }
    }

    /// wte → a, b → out; a → b: the influence is the sum over paths of products of the targets'
    /// normalised |edge| shares, checked against the powers of the normalised matrix in float64.
    #[test]
    fn influence_sums_every_path_as_the_matrix_powers_do() {
        let w: Node = (Layer::Wte, 0, 0);
        let a: Node = (Layer::Module(0), 0, 3);
        let b: Node = (Layer::Module(1), 0, 5);
        let out: Node = (Layer::Output, 0, 9);
        let edges = vec![
            edge(w, a, 2.0),
            edge(w, b, -1.0),
            edge(a, b, 3.0),
            edge(a, out, -1.0),
            edge(b, out, 3.0),
            edge(w, out, 0.0),
        ];
        let infl = trace(&edges, &Seeds::Nodes(vec![(out, 0.5)])).influence;
        // Normalised shares: out ← a 1/4, ← b 3/4, ← w 0; b ← w 1/4, ← a 3/4; a ← w 1.
        let nodes = [w, a, b, out];
        let mut m = [[0f64; 4]; 4]; // m[t][s]
        for e in &edges {
            let t = nodes
                .iter()
                .position(|n| *n == (e.target, e.s_out, e.c_out))
                .unwrap();
            let s = nodes
                .iter()
                .position(|n| *n == (e.source, e.s_in, e.c_in))
                .unwrap();
            m[t][s] += e.value.abs();
        }
        for row in &mut m {
            let sum: f64 = row.iter().sum();
            if sum > 0.0 {
                row.iter_mut().for_each(|x| *x /= sum);
            }
        }
        // x = Σ_k (Mᵀ)^k e_out · 0.5
        let mut x = [0.0, 0.0, 0.0, 0.5];
        let mut total = x;
        for _ in 0..4 {
            let mut next = [0f64; 4];
            for t in 0..4 {
                for s in 0..4 {
                    next[s] += x[t] * m[t][s];
                }
            }
            x = next;
            for i in 0..4 {
                total[i] += x[i];
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            let got = infl.get(n).copied().unwrap_or(0.0);
            assert!(
                (got - total[i]).abs() < 1e-12,
                "{n:?}: {got} vs {}",
                total[i]
            );
        }
        // By hand: b = 0.5·3/4 = 0.375, a = 0.5·1/4 + 0.375·3/4 = 0.40625, w = a + b/4.
        assert!((infl[&b] - 0.375).abs() < 1e-12);
        assert!((infl[&a] - 0.40625).abs() < 1e-12);
        assert!((infl[&w] - (0.40625 + 0.375 / 4.0)).abs() < 1e-12);
    }
}
