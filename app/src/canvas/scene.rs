//! A graph prepared for drawing and hovering: edges as node indices, limited to the strongest
//! `top_k` by |value|, with per-node adjacency for highlighting and hover cards.

use std::collections::HashMap;

use crate::types::{GraphData, NodeKey};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SceneEdge {
    pub src: usize,
    pub tgt: usize,
    pub val: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// Node index by wire key.
    pub index: HashMap<String, usize>,
    /// The component (`"layer:c"`) of each node, what pins refer to.
    pub component: Vec<String>,
    /// Drawn edges, strongest first.
    pub edges: Vec<SceneEdge>,
    /// Edge indices into and out of each node, strongest first.
    pub incoming: Vec<Vec<usize>>,
    pub outgoing: Vec<Vec<usize>>,
    /// Largest |value| among drawn edges.
    pub max_abs: f32,
}

/// `"h.0.mlp.c_fc:3:17"` → `"h.0.mlp.c_fc:17"`.
pub fn component_of(key: &str) -> String {
    match NodeKey::parse(key) {
        Ok(k) => format!("{}:{}", k.layer, k.c_idx),
        Err(_) => key.to_owned(),
    }
}

impl Scene {
    pub fn new(graph: &GraphData, top_k: usize) -> Scene {
        let index: HashMap<String, usize> = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.key.clone(), i))
            .collect();
        let component = graph.nodes.iter().map(|n| component_of(&n.key)).collect();
        let mut edges: Vec<SceneEdge> = graph
            .edges
            .iter()
            .filter_map(|e| {
                Some(SceneEdge {
                    src: *index.get(&e.src)?,
                    tgt: *index.get(&e.tgt)?,
                    val: e.val,
                })
            })
            .collect();
        // Stable: the server's order (already by |value|) breaks ties.
        edges.sort_by(|a, b| b.val.abs().total_cmp(&a.val.abs()));
        edges.truncate(top_k);
        let mut incoming = vec![vec![]; graph.nodes.len()];
        let mut outgoing = vec![vec![]; graph.nodes.len()];
        for (i, e) in edges.iter().enumerate() {
            incoming[e.tgt].push(i);
            outgoing[e.src].push(i);
        }
        let max_abs = edges.first().map_or(0.0, |e| e.val.abs());
        Scene {
            index,
            component,
            edges,
            incoming,
            outgoing,
            max_abs,
        }
    }

    /// Node indices of every node of the pinned components.
    pub fn nodes_of(&self, components: &[String]) -> Vec<usize> {
        (0..self.component.len())
            .filter(|&i| components.contains(&self.component[i]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> GraphData {
        let nodes = [
            "wte:0:0",
            "h.0.mlp.c_fc:0:3",
            "h.0.mlp.c_fc:1:3",
            "output:1:9",
        ];
        let edges = [
            ("wte:0:0", "h.0.mlp.c_fc:0:3", 0.1),
            ("h.0.mlp.c_fc:1:3", "output:1:9", -0.9),
            ("wte:0:0", "output:1:9", 0.4),
            ("wte:0:0", "gone:0:0", 5.0),
        ];
        crate::types::test_graph(2, 1, &nodes, 0.5, &edges)
    }

    #[test]
    fn top_k_keeps_the_strongest_edges_and_drops_dangling_ones() {
        let g = graph();
        let all = Scene::new(&g, 100);
        assert_eq!(all.edges.len(), 3, "the edge to an unknown node is dropped");
        let vals: Vec<f32> = all.edges.iter().map(|e| e.val).collect();
        assert_eq!(vals, vec![-0.9, 0.4, 0.1]);
        assert_eq!(all.max_abs, 0.9);
        let two = Scene::new(&g, 2);
        assert_eq!(two.edges.len(), 2);
        assert_eq!(two.incoming[3], vec![0, 1]);
        assert_eq!(two.outgoing[0], vec![1]);
        assert!(two.incoming[1].is_empty());
    }

    #[test]
    fn pins_name_components_across_positions() {
        let s = Scene::new(&graph(), 10);
        assert_eq!(component_of("h.0.mlp.c_fc:1:3"), "h.0.mlp.c_fc:3");
        assert_eq!(s.nodes_of(&["h.0.mlp.c_fc:3".into()]), vec![1, 2]);
        assert!(s.nodes_of(&["output:3".into()]).is_empty());
    }
}
