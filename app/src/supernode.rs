//! Supernodes: nodes a researcher grouped ("these three carry the name") drawn as one box whose
//! edges are the sums of its members' edges. Merging is a pure graph-to-graph step after pruning,
//! so everything downstream (scene, hover, trace sizes) treats a supernode as one more node.

use std::collections::HashMap;

use crate::canvas::layout::{Layout, Point, row_of};
use crate::types::{Edge, GraphData, Node, NodeKey, TraceData};

/// A named group of node keys (`"layer:pos:c"`); collapsed it is drawn as one node, open its
/// members are drawn as usual.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub label: String,
    pub members: Vec<String>,
    pub open: bool,
}

/// The node key of group `i`: layer `group.{i}`, at the rightmost member's position.
pub fn group_key(i: usize, seq: usize) -> String {
    format!("group.{i}:{seq}:0")
}

/// The group a node key names, if it is a supernode's.
pub fn group_of(key: &str) -> Option<usize> {
    let layer = NodeKey::parse(key).ok()?.layer;
    layer.strip_prefix("group.")?.parse().ok()
}

/// `graph` with every collapsed group's members (those present) replaced by one node: its
/// importance the largest member's, its influence the members' sum; edges between a member and
/// the rest summed per other end, edges inside a group dropped. Nodes keep their order, the
/// supernodes follow; a node in two groups belongs to the first. Takes the graph by value so a view
/// without supernodes (the usual case, on every slider step) costs no copy.
pub fn merge(graph: GraphData, groups: &[Group]) -> GraphData {
    let index: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.key.as_str(), i))
        .collect();
    // Which group each node joins, and each drawn group's members.
    let mut joins: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    let mut drawn: Vec<(usize, Vec<usize>)> = vec![];
    for (gi, g) in groups.iter().enumerate() {
        if g.open {
            continue;
        }
        let members: Vec<usize> = g
            .members
            .iter()
            .filter_map(|k| index.get(k.as_str()).copied())
            .filter(|&i| joins[i].is_none())
            .collect();
        if members.is_empty() {
            continue;
        }
        for &i in &members {
            joins[i] = Some(drawn.len());
        }
        drawn.push((gi, members));
    }
    if drawn.is_empty() {
        return graph;
    }

    // New index of every old node: kept nodes in order, then one per drawn group.
    let kept: Vec<usize> = (0..graph.nodes.len())
        .filter(|&i| joins[i].is_none())
        .collect();
    let mut new_of = vec![0usize; graph.nodes.len()];
    for (n, &i) in kept.iter().enumerate() {
        new_of[i] = n;
    }
    for (i, j) in joins.iter().enumerate() {
        if let Some(d) = j {
            new_of[i] = kept.len() + d;
        }
    }
    let seq = |i: usize| NodeKey::parse(&graph.nodes[i].key).map_or(0, |k| k.seq);
    let mut nodes: Vec<Node> = kept.iter().map(|&i| graph.nodes[i].clone()).collect();
    for (gi, members) in &drawn {
        nodes.push(Node {
            key: group_key(*gi, members.iter().map(|&i| seq(i)).max().unwrap_or(0)),
            importance: members
                .iter()
                .map(|&i| graph.nodes[i].importance)
                .fold(0.0, f32::max),
        });
    }

    // Edges summed per (new source, new target), in the order each pair first appears.
    let scores = graph.trace.as_ref().map(|t| &t.edge_scores);
    let mut pair_at: HashMap<(usize, usize), usize> = HashMap::new();
    let mut edges: Vec<Edge> = vec![];
    let mut edge_scores: Vec<f32> = vec![];
    for (ei, e) in graph.edges.iter().enumerate() {
        let (Some(&s), Some(&t)) = (index.get(e.src.as_str()), index.get(e.tgt.as_str())) else {
            continue;
        };
        let (s, t) = (new_of[s], new_of[t]);
        if s == t {
            continue;
        }
        let score = scores.and_then(|v| v.get(ei)).copied().unwrap_or(0.0);
        match pair_at.get(&(s, t)) {
            Some(&at) => {
                edges[at].val += e.val;
                edge_scores[at] += score;
            }
            None => {
                pair_at.insert((s, t), edges.len());
                edges.push(Edge {
                    src: nodes[s].key.clone(),
                    tgt: nodes[t].key.clone(),
                    val: e.val,
                });
                edge_scores.push(score);
            }
        }
    }

    let trace = graph.trace.as_ref().map(|t| {
        let of = |i: usize| t.influence.get(i).copied().unwrap_or(0.0);
        let mut influence: Vec<f32> = kept.iter().map(|&i| of(i)).collect();
        influence.extend(
            drawn
                .iter()
                .map(|(_, m)| m.iter().map(|&i| of(i)).sum::<f32>()),
        );
        TraceData {
            targets: t.targets.clone(),
            influence,
            edge_scores,
            total_influence: t.total_influence,
            total_edge_score: t.total_edge_score,
        }
    });
    GraphData {
        nodes,
        edges,
        trace,
        ..graph
    }
}

/// Places each supernode of `graph` at the centre of its members' rows and columns (members the
/// layout cannot place are skipped), drawn larger than a node.
pub fn place_groups(layout: &mut Layout, graph: &GraphData, groups: &[Group]) {
    let row_y: HashMap<_, f64> = layout.rows.iter().copied().collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        let Some(g) = group_of(&node.key).and_then(|gi| groups.get(gi)) else {
            continue;
        };
        let spots: Vec<Point> = g
            .members
            .iter()
            .filter_map(|k| {
                let k = NodeKey::parse(k).ok()?;
                let (row, _) = row_of(k.layer)?;
                Some(Point {
                    x: *layout.columns.get(k.seq)?,
                    y: *row_y.get(&row)?,
                })
            })
            .collect();
        if spots.is_empty() {
            continue;
        }
        let n = spots.len() as f64;
        layout.points[i] = Some(Point {
            x: spots.iter().map(|p| p.x).sum::<f64>() / n,
            y: spots.iter().map(|p| p.y).sum::<f64>() / n,
        });
        layout.radii[i] = layout.radius * 1.8;
    }
}

/// The URL form of one group: `c|label|key,key,…` (`o` for an open group).
pub fn to_url(g: &Group) -> String {
    format!(
        "{}|{}|{}",
        if g.open { "o" } else { "c" },
        g.label,
        g.members.join(",")
    )
}

/// Reads [`to_url`]'s form; the label may itself contain `|`.
pub fn from_url(v: &str) -> Option<Group> {
    let (flag, rest) = v.split_once('|')?;
    let (label, members) = rest.rsplit_once('|')?;
    let open = match flag {
        "o" => true,
        "c" => false,
        _ => return None,
    };
    let members: Vec<String> = members
        .split(',')
        .filter(|k| NodeKey::parse(k).is_ok())
        .map(str::to_owned)
        .collect();
    (!members.is_empty()).then(|| Group {
        label: label.to_owned(),
        members,
        open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::test_graph;

    fn group(members: &[&str]) -> Group {
        Group {
            label: "names".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            open: false,
        }
    }

    fn edge_map(g: &GraphData) -> Vec<(String, String, f32)> {
        g.edges
            .iter()
            .map(|e| (e.src.clone(), e.tgt.clone(), e.val))
            .collect()
    }

    #[test]
    fn a_supernode_sums_its_members_edges_and_drops_the_inner_ones() {
        let g = test_graph(
            3,
            1,
            &[
                "wte:0:0",
                "h.0.attn.v_proj:0:1",
                "h.0.attn.v_proj:1:2",
                "h.0.mlp.c_fc:2:3",
            ],
            0.5,
            &[
                ("wte:0:0", "h.0.attn.v_proj:0:1", 1.0),
                ("wte:0:0", "h.0.attn.v_proj:1:2", 0.25),
                ("h.0.attn.v_proj:0:1", "h.0.attn.v_proj:1:2", 9.0),
                ("h.0.attn.v_proj:0:1", "h.0.mlp.c_fc:2:3", -2.0),
                ("h.0.attn.v_proj:1:2", "h.0.mlp.c_fc:2:3", 0.5),
            ],
        );
        let m = merge(
            g.clone(),
            &[group(&["h.0.attn.v_proj:0:1", "h.0.attn.v_proj:1:2"])],
        );
        let keys: Vec<&str> = m.nodes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys, vec!["wte:0:0", "h.0.mlp.c_fc:2:3", "group.0:1:0"]);
        assert_eq!(
            edge_map(&m),
            vec![
                ("wte:0:0".into(), "group.0:1:0".into(), 1.25),
                ("group.0:1:0".into(), "h.0.mlp.c_fc:2:3".into(), -1.5),
            ]
        );
        assert_eq!(group_of("group.0:1:0"), Some(0));
        assert_eq!(group_of("h.0.mlp.c_fc:2:3"), None);
        // Open, or with no member in the graph, it changes nothing.
        let open = Group {
            open: true,
            ..group(&["h.0.attn.v_proj:0:1", "h.0.attn.v_proj:1:2"])
        };
        assert_eq!(merge(g.clone(), &[open]), g);
        assert_eq!(merge(g.clone(), &[group(&["h.1.mlp.c_fc:0:0"])]), g);
    }

    #[test]
    fn influence_and_edge_scores_merge_with_their_nodes() {
        let mut g = test_graph(
            2,
            1,
            &[
                "wte:0:0",
                "h.0.mlp.c_fc:0:1",
                "h.0.mlp.c_fc:0:2",
                "output:1:7",
            ],
            0.5,
            &[
                ("h.0.mlp.c_fc:0:1", "output:1:7", 1.0),
                ("h.0.mlp.c_fc:0:2", "output:1:7", 3.0),
                ("wte:0:0", "h.0.mlp.c_fc:0:1", 1.0),
            ],
        );
        g.trace = Some(TraceData {
            targets: vec!["output:1:7".into()],
            influence: vec![1.0, 0.25, 0.75, 1.0],
            edge_scores: vec![0.25, 0.75, 0.25],
            total_influence: 1.0,
            total_edge_score: 1.25,
        });
        let m = merge(
            g.clone(),
            &[group(&["h.0.mlp.c_fc:0:1", "h.0.mlp.c_fc:0:2"])],
        );
        let t = m.trace.unwrap();
        assert_eq!(t.influence, vec![1.0, 1.0, 1.0]);
        assert_eq!(t.edge_scores, vec![1.0, 0.25]);
        assert_eq!(m.edges[0].val, 4.0);
    }

    #[test]
    fn a_node_in_two_groups_joins_the_first() {
        let g = test_graph(
            1,
            1,
            &["h.0.mlp.c_fc:0:1", "h.0.mlp.c_fc:0:2", "h.0.mlp.c_fc:0:3"],
            0.5,
            &[],
        );
        let m = merge(
            g.clone(),
            &[
                group(&["h.0.mlp.c_fc:0:1", "h.0.mlp.c_fc:0:2"]),
                group(&["h.0.mlp.c_fc:0:2", "h.0.mlp.c_fc:0:3"]),
            ],
        );
        let keys: Vec<&str> = m.nodes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys, vec!["group.0:0:0", "group.1:0:0"]);
    }

    #[test]
    fn supernodes_sit_at_their_members_centre() {
        let g = test_graph(4, 2, &["h.0.mlp.c_fc:0:1", "h.1.mlp.c_fc:2:2"], 0.5, &[]);
        let groups = [group(&["h.0.mlp.c_fc:0:1", "h.1.mlp.c_fc:2:2"])];
        let m = merge(g.clone(), &groups);
        let mut l = Layout::new(&m, 900.0, crate::canvas::layout::LayoutMode::Jittered, 0);
        assert_eq!(
            l.points[0], None,
            "the layout alone cannot place a supernode"
        );
        place_groups(&mut l, &m, &groups);
        let base = Layout::new(&g, 900.0, crate::canvas::layout::LayoutMode::Importance, 0);
        let y = |row| l.rows.iter().find(|(r, _)| *r == row).unwrap().1;
        use crate::canvas::layout::Row;
        let p = l.points[0].unwrap();
        assert_eq!(p.x, (base.columns[0] + base.columns[2]) / 2.0);
        assert_eq!(p.y, (y(Row::MlpIn(0)) + y(Row::MlpIn(1))) / 2.0);
        assert!(l.radii[0] > l.radius);
    }

    #[test]
    fn groups_round_trip_through_their_url_form() {
        let g = Group {
            label: "copy | names".into(),
            members: vec!["h.0.attn.v_proj:6:28".into(), "h.1.attn.o_proj:14:3".into()],
            open: true,
        };
        assert_eq!(from_url(&to_url(&g)), Some(g.clone()));
        let closed = Group { open: false, ..g };
        assert_eq!(from_url(&to_url(&closed)), Some(closed));
        assert_eq!(from_url("x|a|h.0.mlp.c_fc:1:2"), None);
        assert_eq!(from_url("c|a|nonsense"), None);
    }
}
