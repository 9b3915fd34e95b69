//! L1 normalization of incoming edges per target node (SPEC §3.6), in float64 as the original.

use std::collections::HashMap;

use super::graph::Edge;
use super::layer::Layer;

/// Divides every edge by the sum of |value| over the edges into the same target node; a node whose
/// sum is 0 keeps its values. Signs stay; order stays.
pub fn normalize_by_target(edges: &[Edge]) -> Vec<Edge> {
    let mut sums: HashMap<(Layer, u32, u32), f64> = HashMap::new();
    for e in edges {
        *sums.entry((e.target, e.s_out, e.c_out)).or_default() += e.value.abs();
    }
    edges
        .iter()
        .map(|e| {
            let sum = sums[&(e.target, e.s_out, e.c_out)];
            let value = if sum > 0.0 { e.value / sum } else { e.value };
            Edge { value, ..*e }
        })
        .collect()
}

/// How a graph's edges are normalised (the wire's type): not at all, L1 per target node (the
/// seed's), or L2 per target node / per target layer (SPD's app).
pub use app::types::Normalize as Normalization;

/// `edges` normalised as `kind` says. L1 keeps every edge (a zero group keeps its zeros); L2, as
/// SPD's app, divides by `√Σ value²` of the group in float64 and drops groups whose norm is 0.
/// Order stays.
pub fn normalize(edges: &[Edge], kind: Normalization) -> Vec<Edge> {
    let key = |e: &Edge| match kind {
        Normalization::L2Layer => (e.target, u32::MAX, u32::MAX),
        _ => (e.target, e.s_out, e.c_out),
    };
    match kind {
        Normalization::None => edges.to_vec(),
        Normalization::L1 => normalize_by_target(edges),
        Normalization::L2Target | Normalization::L2Layer => {
            let mut sums: HashMap<(Layer, u32, u32), f64> = HashMap::new();
            for e in edges {
                *sums.entry(key(e)).or_default() += e.value * e.value;
            }
            edges
                .iter()
                .filter_map(|e| {
                    let norm = sums[&key(e)].sqrt();
                    (norm > 0.0).then(|| Edge {
                        value: e.value / norm,
                        ..*e
                    })
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(target: Layer, s_out: u32, c_out: u32, value: f64) -> Edge {
        Edge {
            source: Layer::Wte,
            target,
            c_in: 0,
            c_out,
            s_in: s_out,
            s_out,
            value,
            is_cross_seq: false,
        }
    }

    #[test]
    fn l2_per_target_and_per_layer_drop_zero_groups() {
        let (a, b) = (Layer::Module(0), Layer::Module(1));
        let edges = [
            edge(a, 0, 0, 3.0),
            edge(a, 0, 0, -4.0),
            edge(a, 1, 0, 1.0),
            edge(b, 0, 0, 0.0),
        ];
        let t: Vec<f64> = normalize(&edges, Normalization::L2Target)
            .iter()
            .map(|e| e.value)
            .collect();
        assert_eq!(t, vec![0.6, -0.8, 1.0]);
        let l: Vec<f64> = normalize(&edges, Normalization::L2Layer)
            .iter()
            .map(|e| e.value)
            .collect();
        let n = 26f64.sqrt();
        assert_eq!(l, vec![3.0 / n, -4.0 / n, 1.0 / n]);
        let l1: Vec<f64> = normalize(&edges, Normalization::L1)
            .iter()
            .map(|e| e.value)
            .collect();
        assert_eq!(l1, vec![3.0 / 7.0, -4.0 / 7.0, 1.0, 0.0]);
        assert_eq!(normalize(&edges, Normalization::None), edges.to_vec());
        for n in ["none", "l1", "l2-target", "l2-layer"] {
            assert_eq!(Normalization::from_name(n).unwrap().name(), n);
        }
    }
}
