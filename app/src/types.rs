//! The typed structs that cross the wire between server and browser.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The attribution graph of one prompt (SPEC §3).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphData {
    /// The stored prompt this graph is of; `None` for a custom prompt typed by the user.
    pub prompt_id: Option<i64>,
    /// Decoded tokens of the prompt, one per sequence position.
    pub tokens: Vec<String>,
    /// Number of transformer blocks of the model, so empty layers still get a row.
    pub n_blocks: usize,
    pub nodes: Vec<Node>,
    /// The strongest edges by |value| (normalized afterwards when asked), strongest first.
    pub edges: Vec<Edge>,
    /// Edges of the full graph before the cap and the mean-CI filter.
    pub total_edges: usize,
    /// The cap applied (`edges.len() <= cap`).
    pub edge_cap: usize,
    /// The parameters the graph was computed with.
    pub params: GraphParams,
    /// Output nodes: the predicted token and its probability (CI-masked model), by node key.
    pub outputs: Vec<OutputNode>,
    /// For a graph of optimised CI: how it was optimised and how well.
    #[serde(default)]
    pub optimization: Option<OptimizationInfo>,
    /// For a traced graph: every node's influence on the trace's targets and every edge's score;
    /// `edges` are then the highest-scoring ones rather than the strongest.
    #[serde(default)]
    pub trace: Option<TraceData>,
}

/// What a trace follows: the outputs whose causes a researcher wants to see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TraceTarget {
    /// The last position's output nodes, each weighted by its probability.
    Last,
    /// One output token at a position.
    Token { pos: u32, token: u32 },
    /// The logit difference `a − b` at a position: one target whose incoming edge from a source
    /// is the source's edge into `a` minus its edge into `b`, so effects on both cancel.
    Diff { pos: u32, a: u32, b: u32 },
}

impl TraceTarget {
    /// `last`, `POS:TOKEN` or `POS:A-B`: the URL's and the HTTP API's spelling.
    pub fn to_url(self) -> String {
        match self {
            Self::Last => "last".into(),
            Self::Token { pos, token } => format!("{pos}:{token}"),
            Self::Diff { pos, a, b } => format!("{pos}:{a}-{b}"),
        }
    }

    pub fn from_url(s: &str) -> Option<Self> {
        if s == "last" {
            return Some(Self::Last);
        }
        let (pos, rest) = s.split_once(':')?;
        let pos = pos.trim().parse().ok()?;
        match rest.split_once('-') {
            None => Some(Self::Token {
                pos,
                token: rest.trim().parse().ok()?,
            }),
            Some((a, b)) => Some(Self::Diff {
                pos,
                a: a.trim().parse().ok()?,
                b: b.trim().parse().ok()?,
            }),
        }
    }

    /// Output tokens the trace needs as nodes even where their probability is below the output
    /// threshold: `(position, token)`.
    pub fn needed_outputs(self) -> Vec<(usize, u32)> {
        match self {
            Self::Last => vec![],
            Self::Token { pos, token } => vec![(pos as usize, token)],
            Self::Diff { pos, a, b } => vec![(pos as usize, a), (pos as usize, b)],
        }
    }
}

/// The influence of a traced graph (issue "Reading big graphs"): computed by the server over the
/// whole graph the engine produced, so the page can prune to any threshold without asking again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceData {
    /// Keys of the target nodes (the traced outputs).
    pub targets: Vec<String>,
    /// Per node of [`GraphData::nodes`]: its influence on the targets summed over every path, as
    /// a fraction of the targets' total weight (a target's own is its weight).
    pub influence: Vec<f32>,
    /// Per edge of [`GraphData::edges`]: its target's influence times the edge's share of the
    /// target's incoming |values|, i.e. the influence that flows along it.
    pub edge_scores: Vec<f32>,
    /// Σ influence over every node of the whole graph but `wte` and the targets.
    pub total_influence: f64,
    /// Σ score over every edge of the whole graph.
    pub total_edge_score: f64,
}

/// An alive output node: token `token_id` at position `seq` with probability `prob`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputNode {
    pub key: String,
    pub token: String,
    pub prob: f32,
}

/// How a graph is computed: the seed tool's semantics (components masked by CI, no weight deltas)
/// or SPD's app's (gradients with every mask 1 plus the weight deltas; at most 15 output nodes per
/// position; alive where CI > threshold).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Semantics {
    #[default]
    Seed,
    App,
}

impl Semantics {
    pub const ALL: [Semantics; 2] = [Semantics::Seed, Semantics::App];

    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::App => "app",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// How each target's incoming edges are scaled: not at all, by their L1 sum per target node (the
/// seed's), or by their L2 norm per target node or per target layer (SPD's app).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    None,
    #[default]
    L1,
    L2Target,
    L2Layer,
}

impl Normalize {
    pub const ALL: [Normalize; 4] = [
        Normalize::None,
        Normalize::L1,
        Normalize::L2Target,
        Normalize::L2Layer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::L1 => "l1",
            Self::L2Target => "l2-target",
            Self::L2Layer => "l2-layer",
        }
    }

    /// A name, or the original tool's booleans (`true`/`1` is L1).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "true" | "1" => Some(Self::L1),
            "false" | "0" => Some(Self::None),
            _ => Self::ALL.into_iter().find(|x| x.name() == s),
        }
    }
}

/// What a graph is computed with. Defaults are the original server's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphParams {
    /// Components with CI at or above this are nodes.
    pub ci_threshold: f32,
    /// Output tokens with probability at or above this are nodes.
    pub output_prob_threshold: f32,
    /// How each target's incoming edges are scaled.
    pub normalize: Normalize,
    /// The seed's semantics or SPD's app's.
    pub semantics: Semantics,
    /// Drop components whose mean CI over the database is above this (1 keeps all).
    pub max_mean_ci: f32,
    /// Trace these outputs: send the edges that carry the most influence on them, with every
    /// node's influence ([`TraceData`]). `None` sends the strongest edges, as the original.
    #[serde(default)]
    pub trace: Option<TraceTarget>,
}

impl Default for GraphParams {
    fn default() -> Self {
        GraphParams {
            ci_threshold: 0.1,
            output_prob_threshold: 0.05,
            normalize: Normalize::L1,
            semantics: Semantics::Seed,
            max_mean_ci: 1.0,
            trace: None,
        }
    }
}

impl GraphParams {
    /// A message naming the first parameter out of its range.
    pub fn check(&self) -> Result<(), String> {
        let in_unit = |x: f32| (0.0..=1.0).contains(&x);
        if !self.ci_threshold.is_finite() || self.ci_threshold < 0.0 {
            return Err(format!(
                "ci_threshold must be a number >= 0, got {}",
                self.ci_threshold
            ));
        }
        if !in_unit(self.output_prob_threshold) {
            return Err(format!(
                "output_prob_threshold must be in [0, 1], got {}",
                self.output_prob_threshold
            ));
        }
        if !in_unit(self.max_mean_ci) {
            return Err(format!(
                "max_mean_ci must be in [0, 1], got {}",
                self.max_mean_ci
            ));
        }
        if let Some(TraceTarget::Diff { a, b, .. }) = self.trace
            && a == b
        {
            return Err(format!(
                "a logit difference needs two different tokens, got {a} - {b}"
            ));
        }
        Ok(())
    }
}

/// Which prompt to graph: a stored one, or text the user typed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PromptRef {
    Stored(i64),
    Text(String),
}

/// What the page shows about the served run and its database.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Where the model was loaded from.
    pub model_path: String,
    /// The run's name (its directory's), what the page's header shows.
    #[serde(default)]
    pub run_name: String,
    pub n_blocks: usize,
    /// Longest prompt the model takes.
    pub n_ctx: usize,
    /// The target model's family, e.g. `LlamaSimpleMLP`.
    pub family: String,
    /// The CI network kind, e.g. `shared_mlp` or `global_shared_transformer`.
    pub ci_kind: String,
    pub prompt_count: u64,
    /// Size of the database file in bytes (0 without a database).
    pub db_bytes: u64,
    /// Whether component hover cards can show activation contexts.
    pub has_contexts: bool,
    /// Whether custom text can be tokenized (a tokenizer.json was found).
    pub can_tokenize: bool,
}

/// One component of a layer with its statistics over the database (`None` without activation
/// contexts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentRow {
    pub c: usize,
    pub mean_ci: Option<f64>,
    /// Fraction of indexed tokens where it fires.
    pub density: Option<f64>,
}

/// Every component of a layer, in component order, for the component browser.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerComponents {
    pub layer: String,
    /// Every decomposed layer of the run, in the model's order.
    pub layers: Vec<String>,
    pub rows: Vec<ComponentRow>,
}

/// One component's CI on every token of a text: the run's CI pass on that text alone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub key: String,
    pub tokens: Vec<String>,
    pub ci: Vec<f32>,
}

/// A prompt in the picker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptSummary {
    pub id: i64,
    /// The decoded prompt, tokens joined.
    pub text: String,
    pub n_tokens: usize,
}

/// A page of the prompt list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptPage {
    pub prompts: Vec<PromptSummary>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next_after: Option<i64>,
}

/// A prompt where searched components fire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub prompt: PromptSummary,
    /// Smallest (all) or largest (any) max CI of the searched components.
    pub score: f32,
    /// Per searched component alive in this prompt: its key, max CI and positions.
    pub matches: Vec<ComponentMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentMatch {
    pub key: String,
    pub max_ci: f32,
    pub positions: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchResults {
    pub total: usize,
    pub hits: Vec<SearchHit>,
}

/// What the database knows about a component (`"layer:c"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub key: String,
    /// Mean CI over every indexed token; `None` without activation contexts.
    pub mean_ci: Option<f64>,
    /// Fraction of indexed tokens where it fires.
    pub density: Option<f64>,
    /// Prompts in which it is alive.
    pub n_prompts: u64,
    /// Top examples, best first.
    pub examples: Vec<ContextSnippet>,
}

/// Tokens around a firing position, with the component's CI at each; `active` is the firing token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextSnippet {
    pub tokens: Vec<String>,
    pub ci: Vec<f32>,
    pub active: usize,
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

/// A graph of `tokens` positions and `n_blocks` blocks with nodes `keys` (all of `importance`) and
/// `(src, tgt, val)` edges: the fixture the geometry tests build on.
#[cfg(test)]
pub fn test_graph(
    tokens: usize,
    n_blocks: usize,
    keys: &[&str],
    importance: f32,
    edges: &[(&str, &str, f32)],
) -> GraphData {
    GraphData {
        tokens: (0..tokens).map(|i| format!("t{i}")).collect(),
        n_blocks,
        nodes: keys
            .iter()
            .map(|k| Node {
                key: (*k).into(),
                importance,
            })
            .collect(),
        edges: edges
            .iter()
            .map(|(s, t, v)| Edge {
                src: (*s).into(),
                tgt: (*t).into(),
                val: *v,
            })
            .collect(),
        ..GraphData::default()
    }
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
            prompt_id: Some(3),
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
            ..GraphData::default()
        };
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GraphData>(&json).unwrap(), g);
    }
}

/// What an intervention does to the selected nodes (SPEC §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterventionMode {
    /// Only the selected nodes on (mask 1), every other component off, no weight deltas.
    #[default]
    Keep,
    /// The selected nodes off, the rest as the graph's forward has them.
    Ablate,
    /// The selected nodes times a factor, the rest as the graph's forward has them.
    Scale,
}

impl InterventionMode {
    pub const ALL: [InterventionMode; 3] = [Self::Keep, Self::Ablate, Self::Scale];

    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Ablate => "ablate",
            Self::Scale => "scale",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// An intervention the page asks for: nodes `layer:pos:c` (or `layer:c` at every position).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterventionParams {
    pub prompt: PromptRef,
    pub nodes: Vec<String>,
    pub mode: InterventionMode,
    /// The factor of `Scale` (ignored otherwise).
    pub factor: f32,
    pub top_k: usize,
    /// A fork's token swaps, `(position, token id)`.
    pub replacements: Vec<(usize, u32)>,
    /// The graph forward `Ablate` and `Scale` start from.
    pub semantics: Semantics,
}

/// A candidate next token at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictionRow {
    pub token: String,
    pub id: u32,
    /// Under the intervention.
    pub prob: f32,
    pub target_prob: f32,
    pub ci_masked_prob: f32,
}

/// An intervention's result, as kept in the prompt's run history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterventionRun {
    /// Its id in the notes file (`None` where the server could not keep it).
    pub id: Option<i64>,
    pub params: InterventionParams,
    /// The (forked) prompt's tokens.
    pub tokens: Vec<String>,
    /// Per position, the top-k tokens by intervened probability.
    pub rows: Vec<Vec<PredictionRow>>,
    /// Per position, the target model's most probable token.
    pub target_top: Vec<TopToken>,
    /// Per position, `KL(target ‖ intervened)`.
    pub kl: Vec<f64>,
}

impl InterventionRun {
    /// Positions where the intervened model's most probable token differs from the target's.
    pub fn changed_argmax(&self) -> Vec<bool> {
        self.rows
            .iter()
            .zip(&self.target_top)
            .map(|(row, t)| row.first().is_some_and(|r| r.id != t.id))
            .collect()
    }
}

/// A model's most probable token at a position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopToken {
    pub id: u32,
    pub token: String,
    pub prob: f32,
}

/// A vocabulary entry found by a token search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VocabEntry {
    pub id: u32,
    pub token: String,
}

/// What the optimised CI keeps at its position: a label token's cross-entropy, or the target's
/// distribution (KL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimLoss {
    #[default]
    Ce,
    Kl,
}

/// The masks of the optimisation's reconstruction forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimMask {
    #[default]
    Ci,
    Stochastic,
}

/// An optimised graph's request (SPEC §7): CI re-optimised so that the label stays predicted at
/// `position` with as few components as the sparsity coefficient allows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizeSpec {
    pub loss: OptimLoss,
    /// The label token (CE).
    pub label: u32,
    pub position: usize,
    pub imp_min_coeff: f32,
    pub steps: usize,
    pub pnorm: f32,
    pub beta: f32,
    pub mask: OptimMask,
    /// Adversarial PGD steps (0: none) and step size.
    pub pgd_steps: usize,
    pub pgd_step_size: f32,
}

impl Default for OptimizeSpec {
    fn default() -> Self {
        OptimizeSpec {
            loss: OptimLoss::Ce,
            label: 0,
            position: 0,
            imp_min_coeff: 1e-3,
            steps: 100,
            pnorm: 0.3,
            beta: 0.0,
            mask: OptimMask::Ci,
            pgd_steps: 0,
            pgd_step_size: 0.1,
        }
    }
}

/// What an optimised graph reports beside its edges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizationInfo {
    pub spec: OptimizeSpec,
    /// The label's string.
    pub label_str: String,
    /// The label's probability under the optimised CI mask (CE only).
    pub ci_masked_label_prob: Option<f32>,
    pub stoch_masked_label_prob: Option<f32>,
    pub adv_pgd_label_prob: Option<f32>,
    /// Σ over modules of the mean number of components with CI > 0 per position.
    pub l0_total: f64,
    /// The same before the optimisation (the model's own CI over the same positions).
    pub l0_before: f64,
}
