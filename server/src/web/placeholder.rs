//! A made-up graph with the shape of a real one (2 blocks, 8 tokens, ~40 edges), for front-end work.

use app::api::GraphSourceError;
use app::types::{Edge, GraphData, Node};

const PROMPTS: [[&str; 8]; 4] = [
    ["The", " cat", " sat", " on", " the", " mat", ".", " It"],
    ["Once", " upon", " a", " time", ",", " there", " was", " a"],
    ["1", " +", " 1", " =", " 2", ",", " 2", " +"],
    [
        "She", " opened", " the", " door", " and", " saw", " the", " sea",
    ],
];
const N_BLOCKS: usize = 2;
const N_COMPONENTS: u32 = 24;
const VOCAB: u32 = 4096;
const N_EDGES: usize = 40;

/// The placeholder graph of prompt `prompt_id` (0 to 3); the same every time.
pub fn graph(prompt_id: u32) -> Result<GraphData, GraphSourceError> {
    let tokens = PROMPTS
        .get(prompt_id as usize)
        .ok_or(GraphSourceError::UnknownPrompt(prompt_id))?;
    let mut rng = Lcg(0x5eed_0000 + u64::from(prompt_id));

    let mut nodes = Vec::new();
    for layer in layers() {
        for s in 0..tokens.len() {
            let components: Vec<u32> = match layer.as_str() {
                "wte" => vec![0],
                "output" => vec![rng.below(VOCAB)],
                // Zero, one or two alive components per position, as a sparse decomposition gives.
                _ => {
                    let n = [0, 1, 1, 2][rng.below(4) as usize];
                    let first = rng.below(N_COMPONENTS);
                    (0..n).map(|i| (first + 7 * i) % N_COMPONENTS).collect()
                }
            };
            for c in components {
                let importance = if layer == "wte" {
                    1.0
                } else {
                    0.1 + 0.9 * rng.unit()
                };
                nodes.push(Node {
                    key: format!("{layer}:{s}:{c}"),
                    importance,
                });
            }
        }
    }

    let mut pairs: Vec<(usize, usize)> = (0..nodes.len())
        .flat_map(|t| (0..nodes.len()).map(move |s| (s, t)))
        .filter(|&(s, t)| is_edge(&nodes[s].key, &nodes[t].key))
        .collect();
    // Fisher-Yates: a deterministic sample of the possible edges.
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, rng.below(i as u32 + 1) as usize);
    }
    pairs.truncate(N_EDGES);
    pairs.sort_unstable_by_key(|&(s, t)| (t, s));
    let edges = pairs
        .into_iter()
        .map(|(s, t)| Edge {
            src: nodes[s].key.clone(),
            tgt: nodes[t].key.clone(),
            val: 2.0 * rng.unit() - 1.0,
        })
        .collect();

    Ok(GraphData {
        prompt_id,
        tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
        n_blocks: N_BLOCKS,
        nodes,
        edges,
    })
}

fn layers() -> Vec<String> {
    let blocks = (0..N_BLOCKS).flat_map(|b| {
        [
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.c_fc",
            "mlp.down_proj",
        ]
        .map(|m| format!("h.{b}.{m}"))
    });
    std::iter::once("wte".to_owned())
        .chain(blocks)
        .chain(std::iter::once("output".to_owned()))
        .collect()
}

/// Where a layer sits in the residual stream, and whether it writes to it or reads from it.
fn stage(layer: &str) -> (usize, bool) {
    if layer == "wte" {
        return (0, true);
    }
    if layer == "output" {
        return (4 * N_BLOCKS + 1, false);
    }
    let (block, module) = layer["h.".len()..].split_once('.').expect("a block layer");
    let b: usize = block.parse().expect("a block index");
    match module {
        "attn.o_proj" => (4 * b + 2, true),
        "mlp.c_fc" => (4 * b + 3, false),
        "mlp.down_proj" => (4 * b + 4, true),
        _ => (4 * b + 1, false),
    }
}

/// The source rule of SPEC §3.4–3.5 for GPT2Simple, on node keys.
fn is_edge(src: &str, tgt: &str) -> bool {
    let split = |k: &str| -> (String, usize) {
        let mut p = k.rsplitn(3, ':');
        let _c = p.next();
        let s = p.next().and_then(|s| s.parse().ok()).expect("a position");
        (p.next().expect("a layer").to_owned(), s)
    };
    let ((sl, ss), (tl, ts)) = (split(src), split(tgt));
    let ((s_stage, s_writes), (t_stage, t_writes)) = (stage(&sl), stage(&tl));
    let same_block = sl.split('.').nth(1) == tl.split('.').nth(1);
    if tl.ends_with("attn.o_proj") && same_block {
        let cross = sl.ends_with("k_proj") || sl.ends_with("v_proj");
        return (cross && ss <= ts) || (sl.ends_with("q_proj") && ss == ts);
    }
    if tl.ends_with("mlp.down_proj") && same_block {
        return sl.ends_with("mlp.c_fc") && ss == ts;
    }
    s_writes && !t_writes && s_stage < t_stage && ss == ts
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants): tiny and reproducible.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }

    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::types::NodeKey;
    use std::collections::HashSet;

    #[test]
    fn is_deterministic_and_sized_like_a_small_prompt() {
        for id in 0..4 {
            let g = graph(id).unwrap();
            assert_eq!(g, graph(id).unwrap());
            assert_eq!(g.tokens.len(), 8);
            assert_eq!(g.edges.len(), N_EDGES);
            assert_eq!(g.n_blocks, N_BLOCKS);
        }
        assert_ne!(graph(0).unwrap(), graph(1).unwrap());
    }

    #[test]
    fn edges_join_distinct_alive_nodes_by_the_source_rule() {
        let g = graph(0).unwrap();
        let keys: HashSet<&str> = g.nodes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys.len(), g.nodes.len(), "duplicate node keys");
        let mut seen = HashSet::new();
        for e in &g.edges {
            assert!(
                keys.contains(e.src.as_str()) && keys.contains(e.tgt.as_str()),
                "{e:?}"
            );
            assert!(seen.insert((&e.src, &e.tgt)), "duplicate edge {e:?}");
            assert!((-1.0..=1.0).contains(&e.val));
            let (s, t) = (
                NodeKey::parse(&e.src).unwrap(),
                NodeKey::parse(&e.tgt).unwrap(),
            );
            assert!(s.seq <= t.seq);
        }
        for s in 0..8 {
            assert!(keys.contains(format!("wte:{s}:0").as_str()));
        }
    }

    #[test]
    fn source_rule_matches_gpt2_simple() {
        assert!(is_edge("wte:2:0", "h.0.attn.q_proj:2:1"));
        assert!(is_edge("wte:2:0", "output:2:9"));
        assert!(!is_edge("wte:1:0", "h.0.attn.q_proj:2:1"));
        assert!(is_edge("h.0.attn.k_proj:1:3", "h.0.attn.o_proj:4:5"));
        assert!(!is_edge("h.0.attn.k_proj:5:3", "h.0.attn.o_proj:4:5"));
        assert!(!is_edge("h.0.attn.q_proj:1:3", "h.0.attn.o_proj:4:5"));
        assert!(!is_edge("h.0.attn.k_proj:1:3", "h.1.attn.o_proj:4:5"));
        assert!(is_edge("h.0.attn.o_proj:3:3", "h.0.mlp.c_fc:3:5"));
        assert!(is_edge("h.0.mlp.c_fc:3:3", "h.0.mlp.down_proj:3:5"));
        assert!(!is_edge("h.0.mlp.c_fc:3:3", "h.1.mlp.down_proj:3:5"));
        assert!(is_edge("h.0.mlp.down_proj:3:3", "h.1.attn.v_proj:3:5"));
        assert!(!is_edge("h.1.mlp.down_proj:3:3", "h.1.attn.v_proj:3:5"));
        assert!(!is_edge("h.0.attn.q_proj:3:3", "h.0.mlp.c_fc:3:5"));
    }

    #[test]
    fn unknown_prompts_are_errors() {
        assert!(matches!(graph(4), Err(GraphSourceError::UnknownPrompt(4))));
    }
}
