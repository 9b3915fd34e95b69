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
