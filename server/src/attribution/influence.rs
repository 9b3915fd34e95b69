//! Each node's influence on chosen target outputs (issue "Reading big graphs", step 1), as
//! circuit-tracer and Neuronpedia prune graphs: every target node's incoming |edges| are
//! normalised to sum to 1, and a node's influence is the weighted sum over every path from it to
//! the targets of the products of those shares — the sum of all powers of the normalised
//! adjacency matrix, applied to the targets' weights.
//!
//! Edges always run from a layer earlier in model order to a later one (`wte` first, `output`
//! last; cross-position edges go from q/k/v to the same block's o_proj), so the graph is a DAG and
//! one pass over the layers from the last down sums every path: no iteration to convergence.
//!
//! Not wired to the server yet: this takes the graph's edges in memory.

use std::collections::HashMap;

use super::graph::Edge;
use super::layer::Layer;

/// A node: layer, position, component (token id for `output`, 0 for `wte`).
pub type Node = (Layer, u32, u32);

/// Influence of every node that reaches a target, the targets themselves included (their own
/// weight). `targets` are output nodes (or any nodes) with weights, e.g. the last position's
/// outputs weighted by probability.
pub fn influence(edges: &[Edge], targets: &[(Node, f64)]) -> HashMap<Node, f64> {
    // Σ |incoming| per node, then the incoming edges grouped by target node.
    let mut incoming: HashMap<Node, (f64, Vec<usize>)> = HashMap::new();
    for (i, e) in edges.iter().enumerate() {
        let entry = incoming
            .entry((e.target, e.s_out, e.c_out))
            .or_insert((0.0, Vec::new()));
        entry.0 += e.value.abs();
        entry.1.push(i);
    }
    let mut infl: HashMap<Node, f64> = HashMap::new();
    for &(node, w) in targets {
        *infl.entry(node).or_default() += w;
    }
    // Nodes by layer, latest first: every edge into a node comes from an earlier layer, so a
    // node's influence is complete when its layer is reached.
    let mut order: Vec<Node> = incoming.keys().copied().collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    for node in order {
        let Some(&mine) = infl.get(&node) else {
            continue;
        };
        let (total, edge_ids) = &incoming[&node];
        if mine == 0.0 || *total == 0.0 {
            continue;
        }
        for &i in edge_ids {
            let e = &edges[i];
            let share = e.value.abs() / total;
            if share > 0.0 {
                *infl.entry((e.source, e.s_in, e.c_in)).or_default() += mine * share;
            }
        }
    }
    infl
}

/// The smallest set of nodes, most influential first, whose influence reaches `threshold` of the
/// total over non-target nodes; `wte` nodes and the targets are always kept. Returns the kept
/// nodes and the fraction of the non-target influence they carry (the completeness figure).
pub fn prune_nodes(
    infl: &HashMap<Node, f64>,
    targets: &[(Node, f64)],
    threshold: f64,
) -> (Vec<Node>, f64) {
    let is_target = |n: &Node| targets.iter().any(|(t, _)| t == n);
    let mut ranked: Vec<(Node, f64)> = infl
        .iter()
        .filter(|(n, _)| !is_target(n) && n.0 != Layer::Wte)
        .map(|(n, v)| (*n, *v))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = ranked.iter().map(|(_, v)| v).sum();
    let mut kept: Vec<Node> = targets.iter().map(|(n, _)| *n).collect();
    kept.extend(infl.keys().filter(|n| n.0 == Layer::Wte).copied());
    let mut carried = 0.0;
    for (n, v) in ranked {
        if total > 0.0 && carried / total >= threshold {
            break;
        }
        carried += v;
        kept.push(n);
    }
    let completeness = if total > 0.0 { carried / total } else { 1.0 };
    (kept, completeness)
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
        let infl = influence(&edges, &[(out, 0.5)]);
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

        let (kept, complete) = prune_nodes(&infl, &[(out, 0.5)], 0.5);
        assert!(kept.contains(&out) && kept.contains(&w));
        assert!(kept.contains(&a), "a carries more than half: {kept:?}");
        assert!(!kept.contains(&b));
        assert!((complete - 0.40625 / 0.78125).abs() < 1e-12);
        let (all, complete) = prune_nodes(&infl, &[(out, 0.5)], 1.0);
        assert_eq!(all.len(), 4);
        assert!((complete - 1.0).abs() < 1e-12);
    }
}
