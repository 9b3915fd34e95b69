//! Two prompts' graphs side by side: what differs between "One day, a girl named Mia …" and
//! "One day, a boy named Leo …". Nodes are aligned by component and by position counted from the
//! end of the prompt, so two prompts of different lengths still line up where their predictions
//! are made. Pure, so it is tested natively and recomputed in the page whenever either graph changes.

use std::collections::HashMap;

use crate::types::{GraphData, NodeKey};

/// Rows of each list the page shows.
pub const ROWS: usize = 25;

/// A component node alive in one prompt and not at the same place in the other.
#[derive(Clone, Debug, PartialEq)]
pub struct OnlyIn {
    /// `"layer:c"`.
    pub component: String,
    /// Positions before the last (0: the last token).
    pub from_end: usize,
    /// The token at that position in the prompt it is alive in.
    pub token: String,
    pub ci: f32,
}

/// An output token whose probability differs between the prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputChange {
    pub from_end: usize,
    pub token: String,
    /// 0 where the token is not among that prompt's output nodes.
    pub prob_a: f32,
    pub prob_b: f32,
}

/// An edge (aligned as its two ends are) whose value differs most between the prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeChange {
    /// `"layer:c"` and positions from the end, of the source and the target.
    pub src: (String, usize),
    pub tgt: (String, usize),
    /// 0 where that prompt's graph has no such edge (not alive, or not among its edges).
    pub val_a: f32,
    pub val_b: f32,
}

impl EdgeChange {
    pub fn delta(&self) -> f32 {
        self.val_b - self.val_a
    }
}

/// The differences between graph A and graph B, each list largest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    pub only_a: Vec<OnlyIn>,
    pub only_b: Vec<OnlyIn>,
    pub outputs: Vec<OutputChange>,
    pub edges: Vec<EdgeChange>,
    /// Component nodes alive in both at the same place.
    pub shared: usize,
}

/// A node's place independent of the prompt's length: `(layer:c, positions from the end)`.
type Place = (String, usize);

fn place(key: &str, n_tokens: usize) -> Option<Place> {
    let k = NodeKey::parse(key).ok()?;
    let from_end = n_tokens.checked_sub(k.seq + 1)?;
    Some((format!("{}:{}", k.layer, k.c_idx), from_end))
}

fn is_component(key: &str) -> bool {
    !key.starts_with("wte:") && !key.starts_with("output:")
}

/// Component nodes of `g` by place, with their CI and token.
fn components(g: &GraphData) -> HashMap<Place, (f32, String)> {
    g.nodes
        .iter()
        .filter(|n| is_component(&n.key))
        .filter_map(|n| {
            let k = NodeKey::parse(&n.key).ok()?;
            let token = g.tokens.get(k.seq).cloned().unwrap_or_default();
            Some((place(&n.key, g.tokens.len())?, (n.importance, token)))
        })
        .collect()
}

fn only_in(
    mine: &HashMap<Place, (f32, String)>,
    other: &HashMap<Place, (f32, String)>,
) -> Vec<OnlyIn> {
    let mut out: Vec<OnlyIn> = mine
        .iter()
        .filter(|(p, _)| !other.contains_key(*p))
        .map(|((component, from_end), (ci, token))| OnlyIn {
            component: component.clone(),
            from_end: *from_end,
            token: token.clone(),
            ci: *ci,
        })
        .collect();
    out.sort_by(|x, y| {
        y.ci.total_cmp(&x.ci)
            .then_with(|| x.from_end.cmp(&y.from_end))
            .then_with(|| x.component.cmp(&y.component))
    });
    out
}

/// Output probabilities by `(positions from the end, token string)`.
fn outputs(g: &GraphData) -> HashMap<(usize, String), f32> {
    g.outputs
        .iter()
        .filter_map(|o| {
            let k = NodeKey::parse(&o.key).ok()?;
            let from_end = g.tokens.len().checked_sub(k.seq + 1)?;
            Some(((from_end, o.token.clone()), o.prob))
        })
        .collect()
}

/// Edges of `g` by the places of their ends; output ends are placed by their token string, so the
/// same predicted word lines up in both prompts.
fn edges(g: &GraphData) -> HashMap<(Place, Place), f32> {
    let n = g.tokens.len();
    let token_of: HashMap<&str, &str> = g
        .outputs
        .iter()
        .map(|o| (o.key.as_str(), o.token.as_str()))
        .collect();
    let end = |key: &str| -> Option<Place> {
        let (c, from_end) = place(key, n)?;
        match token_of.get(key) {
            Some(t) => Some((format!("output:{t:?}"), from_end)),
            None => Some((c, from_end)),
        }
    };
    g.edges
        .iter()
        .filter_map(|e| Some(((end(&e.src)?, end(&e.tgt)?), e.val)))
        .collect()
}

/// Every key of either map with its value in each (0 where absent), in key order.
fn paired<'m, K: Ord + std::hash::Hash>(
    a: &'m HashMap<K, f32>,
    b: &'m HashMap<K, f32>,
) -> Vec<(&'m K, f32, f32)> {
    let mut keys: Vec<&K> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let v = |m: &HashMap<K, f32>| m.get(k).copied().unwrap_or(0.0);
            (k, v(a), v(b))
        })
        .collect()
}

/// What differs between `a` and `b`. Every list is whole (the page shows the first [`ROWS`]).
pub fn compare(a: &GraphData, b: &GraphData) -> Comparison {
    let (ca, cb) = (components(a), components(b));
    let shared = ca.keys().filter(|p| cb.contains_key(*p)).count();

    let (oa, ob) = (outputs(a), outputs(b));
    let mut outputs: Vec<OutputChange> = paired(&oa, &ob)
        .into_iter()
        .map(|(k, prob_a, prob_b)| OutputChange {
            from_end: k.0,
            token: k.1.clone(),
            prob_a,
            prob_b,
        })
        .collect();
    outputs.sort_by(|x, y| {
        (y.prob_b - y.prob_a)
            .abs()
            .total_cmp(&(x.prob_b - x.prob_a).abs())
            .then_with(|| x.from_end.cmp(&y.from_end))
            .then_with(|| x.token.cmp(&y.token))
    });

    let (ea, eb) = (edges(a), edges(b));
    let mut edges: Vec<EdgeChange> = paired(&ea, &eb)
        .into_iter()
        .map(|(k, val_a, val_b)| EdgeChange {
            src: k.0.clone(),
            tgt: k.1.clone(),
            val_a,
            val_b,
        })
        .filter(|e| e.delta() != 0.0)
        .collect();
    edges.sort_by(|x, y| {
        y.delta()
            .abs()
            .total_cmp(&x.delta().abs())
            .then_with(|| (&x.src, &x.tgt).cmp(&(&y.src, &y.tgt)))
    });

    Comparison {
        only_a: only_in(&ca, &cb),
        only_b: only_in(&cb, &ca),
        outputs,
        edges,
        shared,
    }
}

/// `"h.0.mlp.c_fc:3"` at 0 from the end → `"h.0.mlp.c_fc:3 @ last"`; 2 → `"@ last−2"`.
pub fn describe_place(component: &str, from_end: usize) -> String {
    if from_end == 0 {
        format!("{component} @ last")
    } else {
        format!("{component} @ last−{from_end}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::OutputNode;

    /// A graph of `tokens` with nodes `(key, importance)`; output ids stand for words: 7 is
    /// " Mia", 8 " Leo", anything else " was".
    fn graph(tokens: &[&str], nodes: &[(&str, f32)], edges: &[(&str, &str, f32)]) -> GraphData {
        let keys: Vec<&str> = nodes.iter().map(|(k, _)| *k).collect();
        let mut g = crate::types::test_graph(tokens.len(), 1, &keys, 0.0, edges);
        g.tokens = tokens.iter().map(|t| (*t).to_owned()).collect();
        for (n, (_, v)) in g.nodes.iter_mut().zip(nodes) {
            n.importance = *v;
        }
        g.outputs = nodes
            .iter()
            .filter(|(k, _)| k.starts_with("output:"))
            .map(|(k, p)| OutputNode {
                key: (*k).to_owned(),
                token: match k.rsplit(':').next() {
                    Some("7") => " Mia",
                    Some("8") => " Leo",
                    _ => " was",
                }
                .to_owned(),
                prob: *p,
            })
            .collect();
        g
    }

    /// B has one token more at the front: positions line up from the end, not the start.
    fn mia_and_leo() -> (GraphData, GraphData) {
        let a = graph(
            &["a", " girl", " named"],
            &[
                ("wte:2:0", 1.0),
                ("h.0.mlp.c_fc:2:5", 0.9),  // "girl names": only in A
                ("h.0.mlp.c_fc:2:1", 0.5),  // in both
                ("h.0.mlp.c_fc:1:1", 0.25), // in both
                ("output:2:7", 0.6),
                ("output:2:9", 0.1),
            ],
            &[
                ("wte:2:0", "h.0.mlp.c_fc:2:5", 2.0),
                ("h.0.mlp.c_fc:2:5", "output:2:7", 1.5),
                ("h.0.mlp.c_fc:2:1", "output:2:9", 0.5),
            ],
        );
        let b = graph(
            &["then", "a", " boy", " named"],
            &[
                ("wte:3:0", 1.0),
                ("h.0.mlp.c_fc:3:6", 0.8), // "boy names": only in B
                ("h.0.mlp.c_fc:3:1", 0.5),
                ("h.0.mlp.c_fc:2:1", 0.3),
                ("h.0.mlp.c_fc:0:1", 0.2), // only in B, 3 from the end
                ("output:3:8", 0.5),
                ("output:3:9", 0.1),
            ],
            &[
                ("wte:3:0", "h.0.mlp.c_fc:3:6", 2.0),
                ("h.0.mlp.c_fc:3:1", "output:3:9", 0.75),
            ],
        );
        (a, b)
    }

    #[test]
    fn components_alive_in_one_prompt_only_are_listed_by_ci() {
        let (a, b) = mia_and_leo();
        let c = compare(&a, &b);
        assert_eq!(c.shared, 2);
        let places = |v: &[OnlyIn]| -> Vec<(String, usize, String)> {
            v.iter()
                .map(|o| (o.component.clone(), o.from_end, o.token.clone()))
                .collect()
        };
        assert_eq!(
            places(&c.only_a),
            vec![("h.0.mlp.c_fc:5".into(), 0, " named".into())]
        );
        assert_eq!(
            places(&c.only_b),
            vec![
                ("h.0.mlp.c_fc:6".into(), 0, " named".into()),
                ("h.0.mlp.c_fc:1".into(), 3, "then".into()),
            ]
        );
        // Symmetric: swapping the prompts swaps the lists.
        let s = compare(&b, &a);
        assert_eq!((s.only_a, s.only_b), (c.only_b, c.only_a));
    }

    #[test]
    fn outputs_and_edges_are_aligned_by_token_and_ordered_by_change() {
        let (a, b) = mia_and_leo();
        let c = compare(&a, &b);
        let outs: Vec<(&str, f32, f32)> = c
            .outputs
            .iter()
            .map(|o| (o.token.as_str(), o.prob_a, o.prob_b))
            .collect();
        assert_eq!(
            outs,
            vec![(" Mia", 0.6, 0.0), (" Leo", 0.0, 0.5), (" was", 0.1, 0.1)]
        );
        // The edge into " was" lines up across prompts (+0.25); the wte → name-component edges do
        // not (different components); the Mia edge exists in A only.
        let e: Vec<(String, String, f32)> = c
            .edges
            .iter()
            .map(|e| (e.src.0.clone(), e.tgt.0.clone(), e.delta()))
            .collect();
        assert_eq!(
            e,
            vec![
                ("wte:0".into(), "h.0.mlp.c_fc:5".into(), -2.0),
                ("wte:0".into(), "h.0.mlp.c_fc:6".into(), 2.0),
                ("h.0.mlp.c_fc:5".into(), "output:\" Mia\"".into(), -1.5),
                ("h.0.mlp.c_fc:1".into(), "output:\" was\"".into(), 0.25),
            ]
        );
        let same = compare(&a, &a);
        assert!(same.only_a.is_empty() && same.only_b.is_empty() && same.edges.is_empty());
        assert_eq!(same.shared, 3);
        assert!(same.outputs.iter().all(|o| o.prob_a == o.prob_b));
    }

    #[test]
    fn places_are_described_from_the_end() {
        assert_eq!(describe_place("h.0.mlp.c_fc:3", 0), "h.0.mlp.c_fc:3 @ last");
        assert_eq!(
            describe_place("h.0.mlp.c_fc:3", 2),
            "h.0.mlp.c_fc:3 @ last−2"
        );
    }
}
