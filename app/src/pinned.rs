//! The pinned subgraph: every node of the pinned components and every edge among them, with the
//! token columns they occupy and no others, so a circuit reads on a small canvas beside the graph.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::canvas::scene::component_of;
use crate::types::{Edge, GraphData, Node, NodeKey};

/// The part of `g` the pinned components (`"layer:c"`) make, its positions renumbered to the
/// columns they use (the tokens shown are theirs); `None` when no pinned component is in `g`.
pub fn pinned_subgraph(g: &GraphData, pins: &[String]) -> Option<GraphData> {
    let pins: HashSet<&str> = pins.iter().map(String::as_str).collect();
    let nodes: Vec<(&Node, NodeKey<'_>)> = g
        .nodes
        .iter()
        .filter(|n| pins.contains(component_of(&n.key).as_str()))
        .filter_map(|n| Some((n, NodeKey::parse(&n.key).ok()?)))
        .collect();
    if nodes.is_empty() {
        return None;
    }
    let used: BTreeSet<usize> = nodes.iter().map(|(_, k)| k.seq).collect();
    let column: HashMap<usize, usize> = used.iter().enumerate().map(|(c, &s)| (s, c)).collect();
    let rekey = |k: &NodeKey<'_>| format!("{}:{}:{}", k.layer, column[&k.seq], k.c_idx);
    let new_key: HashMap<&str, String> = nodes
        .iter()
        .map(|(n, k)| (n.key.as_str(), rekey(k)))
        .collect();
    let edges = g
        .edges
        .iter()
        .filter_map(|e| {
            Some(Edge {
                src: new_key.get(e.src.as_str())?.clone(),
                tgt: new_key.get(e.tgt.as_str())?.clone(),
                val: e.val,
            })
        })
        .collect();
    let outputs = g
        .outputs
        .iter()
        .filter_map(|o| {
            Some(crate::types::OutputNode {
                key: new_key.get(o.key.as_str())?.clone(),
                ..o.clone()
            })
        })
        .collect();
    Some(GraphData {
        tokens: used
            .iter()
            .map(|&s| g.tokens.get(s).cloned().unwrap_or_default())
            .collect(),
        nodes: nodes
            .iter()
            .map(|(n, k)| Node {
                key: rekey(k),
                importance: n.importance,
            })
            .collect(),
        edges,
        outputs,
        trace: None,
        ..g.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::test_graph;

    #[test]
    fn only_pinned_nodes_their_edges_and_their_columns_are_kept() {
        let g = test_graph(
            5,
            1,
            &[
                "wte:1:0",
                "h.0.attn.v_proj:1:28",
                "h.0.attn.o_proj:4:3",
                "h.0.attn.o_proj:2:3",
                "h.0.mlp.c_fc:4:9",
            ],
            0.5,
            &[
                ("wte:1:0", "h.0.attn.v_proj:1:28", 1.0),
                ("h.0.attn.v_proj:1:28", "h.0.attn.o_proj:4:3", 0.5),
                ("h.0.attn.v_proj:1:28", "h.0.attn.o_proj:2:3", 0.25),
                ("h.0.attn.o_proj:4:3", "h.0.mlp.c_fc:4:9", 2.0),
            ],
        );
        let pins = vec![
            "h.0.attn.v_proj:28".to_owned(),
            "h.0.attn.o_proj:3".to_owned(),
        ];
        let s = pinned_subgraph(&g, &pins).unwrap();
        assert_eq!(s.tokens, vec!["t1", "t2", "t4"]);
        let keys: Vec<&str> = s.nodes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "h.0.attn.v_proj:0:28",
                "h.0.attn.o_proj:2:3",
                "h.0.attn.o_proj:1:3"
            ]
        );
        let edges: Vec<(&str, &str, f32)> = s
            .edges
            .iter()
            .map(|e| (e.src.as_str(), e.tgt.as_str(), e.val))
            .collect();
        assert_eq!(
            edges,
            vec![
                ("h.0.attn.v_proj:0:28", "h.0.attn.o_proj:2:3", 0.5),
                ("h.0.attn.v_proj:0:28", "h.0.attn.o_proj:1:3", 0.25),
            ]
        );
        assert!(pinned_subgraph(&g, &["h.0.mlp.c_fc:1".to_owned()]).is_none());
    }
}
