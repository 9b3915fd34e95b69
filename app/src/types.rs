//! The typed structs that cross the wire between server and browser.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The attribution graph of one prompt (SPEC §3).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphData {
    pub prompt_id: u32,
    /// Decoded tokens of the prompt, one per sequence position.
    pub tokens: Vec<String>,
    /// Number of transformer blocks of the model, so empty layers still get a row.
    pub n_blocks: usize,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// An alive node: `wte:s:0`, a component `layer:s:c`, or an output token `output:s:v`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The wire key `"layer:seq:cIdx"` (SPEC §3.7).
    pub key: String,
    /// Causal importance for components, probability for outputs, 1.0 for `wte`.
    pub importance: f32,
}

/// A direct effect of `src` on `tgt`; both are node keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub src: String,
    pub tgt: String,
    pub val: f32,
}

/// A node key split into its parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey<'a> {
    pub layer: &'a str,
    pub seq: usize,
    pub c_idx: usize,
}

/// A node key that is not `"layer:seq:cIdx"` with integer `seq` and `cIdx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadNodeKey(pub String);

impl fmt::Display for BadNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected a node key \"layer:seq:cIdx\", found {:?}",
            self.0
        )
    }
}

impl std::error::Error for BadNodeKey {}

impl<'a> NodeKey<'a> {
    /// Parses `"h.1.attn.o_proj:4:12"`; layer names contain dots but never colons.
    pub fn parse(key: &'a str) -> Result<Self, BadNodeKey> {
        let bad = || BadNodeKey(key.to_owned());
        let mut parts = key.rsplitn(3, ':');
        let c_idx = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let seq = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let layer = parts.next().filter(|l| !l.is_empty()).ok_or_else(bad)?;
        Ok(NodeKey { layer, seq, c_idx })
    }
}

impl fmt::Display for NodeKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.layer, self.seq, self.c_idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_keys() {
        for key in ["h.1.attn.o_proj:4:12", "wte:3:0", "output:7:431"] {
            assert_eq!(NodeKey::parse(key).unwrap().to_string(), key);
        }
        let k = NodeKey::parse("h.0.mlp.c_fc:2:17").unwrap();
        assert_eq!((k.layer, k.seq, k.c_idx), ("h.0.mlp.c_fc", 2, 17));
    }

    #[test]
    fn rejects_malformed_keys() {
        for key in ["", "wte", "wte:1", ":1:2", "wte:x:0", "wte:1:-2"] {
            assert_eq!(NodeKey::parse(key), Err(BadNodeKey(key.to_owned())));
        }
    }

    #[test]
    fn round_trips_through_json() {
        let g = GraphData {
            prompt_id: 3,
            tokens: vec!["a".into()],
            n_blocks: 1,
            nodes: vec![Node {
                key: "wte:0:0".into(),
                importance: 1.0,
            }],
            edges: vec![Edge {
                src: "wte:0:0".into(),
                tgt: "output:0:5".into(),
                val: -0.5,
            }],
        };
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GraphData>(&json).unwrap(), g);
    }
}
