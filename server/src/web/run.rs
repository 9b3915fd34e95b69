//! The served SPD run: the model, its attribution engine and tokenizer, and the conversion of a graph
//! into what the browser draws (filtered by mean CI, capped, normalized).

use std::path::{Path, PathBuf};

use app::api::ApiError;
use app::types::{
    Edge as WireEdge, GraphData, GraphParams, Node, OutputNode, TraceData, TraceTarget,
};
use candle_core::Device;

use crate::attribution::influence::{GraphTrace, Seeds};
use crate::attribution::{
    Backend, Edge, FastEngine, Graph, Layer, Normalization, PromptCi, Semantics, SourceMap,
    Thresholds, TopK, default_max_outputs, normalize, reference_graph_with, strongest,
};
use crate::model::SpdModel;

/// At most this many edges go to the browser, the strongest by |value| (as the original server).
pub const MAX_EDGES: usize = 30_000;

/// A loaded run, shared by every request.
pub struct Run {
    pub model: SpdModel,
    sources: SourceMap,
    fast: Option<FastEngine>,
    /// A host-backend engine for the app's semantics where `fast` is the tensor backend (which
    /// computes the seed's only).
    fast_app: Option<FastEngine>,
    tokenizer: Option<tokenizers::Tokenizer>,
    pub model_path: PathBuf,
}

impl Run {
    /// Loads the run at `path`; the tokenizer is found next to it (see [`crate::tokenizer::find_for`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        Self::load_with(path, device, None)
    }

    /// As [`Run::load`], with the fast engine's backend chosen by the caller (`None`: the one
    /// [`Backend::for_device`] picks).
    pub fn load_with(
        path: &Path,
        device: &Device,
        backend: Option<Backend>,
    ) -> Result<Self, String> {
        let model = SpdModel::load(path, device).map_err(|e| e.to_string())?;
        let tokenizer = match crate::tokenizer::find_for(&model) {
            Some(p) => Some(
                tokenizers::Tokenizer::from_file(&p)
                    .map_err(|e| format!("{}: cannot load tokenizer: {e}", p.display()))?,
            ),
            None => None,
        };
        Self::new(model, tokenizer, path, backend)
    }

    pub fn new(
        model: SpdModel,
        tokenizer: Option<tokenizers::Tokenizer>,
        path: &Path,
        backend: Option<Backend>,
    ) -> Result<Self, String> {
        let sources = SourceMap::probe(&model).map_err(|e| e.to_string())?;
        let backend = backend.unwrap_or_else(|| Backend::for_model(&model));
        let fast = match FastEngine::with_backend(&model, &sources, backend) {
            Ok(f) => {
                tracing::info!("graphs: fast engine, {:?} backend", f.backend());
                Some(f)
            }
            Err(why) => {
                tracing::warn!("{why}; graphs use the reference engine");
                None
            }
        };
        let fast_app = match &fast {
            Some(f) if !f.computes(Semantics::App) => {
                FastEngine::with_backend(&model, &sources, Backend::Host).ok()
            }
            _ => None,
        };
        Ok(Run {
            model,
            sources,
            fast,
            fast_app,
            tokenizer,
            model_path: path.to_owned(),
        })
    }

    pub fn can_tokenize(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// How a token reads on the page: the tokenizer's decoding of it alone, or `#id` without one.
    pub fn token_string(&self, id: u32) -> String {
        crate::tokenizer::token_string(self.tokenizer.as_ref(), id)
    }

    /// The prompt as one string, for lists and text search.
    pub fn text(&self, tokens: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(tokens, false).unwrap_or_default(),
            None => tokens
                .iter()
                .map(|id| format!("#{id}"))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Token ids of typed text; refuses empty text, text without a tokenizer, and text longer than
    /// the model's context.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::bad_request("the text is empty"));
        }
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            ApiError::bad_request("this run has no tokenizer.json, so text cannot be tokenized")
        })?;
        let ids = tok
            .encode(text, false)
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize the text: {e}")))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(ApiError::bad_request("the text has no tokens"));
        }
        let n_ctx = self.model.block_size();
        if ids.len() > n_ctx {
            return Err(ApiError::bad_request(format!(
                "the text is {} tokens long; the model takes at most {n_ctx}",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// The graph of `tokens` as the browser gets it. `mean_ci` gives a component's (`"layer:c"`)
    /// mean CI over the database, for `max_mean_ci`; `progress(done, total)` reports how far the
    /// engine has got.
    pub fn graph(
        &self,
        prompt_id: Option<i64>,
        tokens: &[u32],
        params: GraphParams,
        mean_ci: &dyn Fn(&str) -> Option<f64>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<GraphData, ApiError> {
        params.check().map_err(ApiError::bad_request)?;
        self.model
            .check_tokens(tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let internal = |e: crate::model::RunError| ApiError::internal(e.to_string());
        let ci = PromptCi::compute(&self.model, tokens).map_err(internal)?;
        self.graph_of_ci(prompt_id, &ci, params, mean_ci, progress)
    }

    /// [`Self::graph`] of a prompt whose CI is given (the model's, or an optimised one).
    pub fn graph_of_ci(
        &self,
        prompt_id: Option<i64>,
        ci: &PromptCi,
        params: GraphParams,
        mean_ci: &dyn Fn(&str) -> Option<f64>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<GraphData, ApiError> {
        params.check().map_err(ApiError::bad_request)?;
        let th = Thresholds {
            ci: params.ci_threshold,
            output_prob: params.output_prob_threshold,
        };
        let internal = |e: crate::model::RunError| ApiError::internal(e.to_string());
        let tokens = &ci.tokens;
        let hidden = Hidden::new(&self.model, params, mean_ci);
        let keep = |e: &Edge| !hidden.hides(e.source, e.c_in) && !hidden.hides(e.target, e.c_out);
        let semantics = params.semantics;
        let max_outputs = default_max_outputs(semantics);
        // The app normalises the whole graph before it keeps the strongest edges, so a
        // normalised view needs every edge; the others keep a running selection.
        let whole_graph = semantics == Semantics::App && params.normalize != Normalization::None;
        let engine = [&self.fast, &self.fast_app]
            .into_iter()
            .flatten()
            .find(|f| f.computes(semantics));
        if let Some(target) = params.trace {
            self.check_trace(target, tokens.len())?;
        }
        // A user's trace target that names no output node is their error, not the server's.
        let traced_error = |e: crate::model::RunError| match e {
            crate::model::RunError::Unsupported(m) => ApiError::bad_request(m),
            e => ApiError::internal(e.to_string()),
        };
        let (graph, total, trace) = match (engine, params.trace) {
            (Some(f), Some(target)) if !whole_graph => {
                let (g, trace, total) = f
                    .traced_graph(
                        &self.model,
                        ci,
                        th,
                        semantics,
                        max_outputs,
                        target,
                        MAX_EDGES,
                        &keep,
                        progress,
                    )
                    .map_err(traced_error)?;
                (g, total, Some(trace))
            }
            (Some(f), None) if !whole_graph => {
                let (g, total) = f
                    .strongest_graph_with(
                        &self.model,
                        ci,
                        th,
                        semantics,
                        max_outputs,
                        MAX_EDGES,
                        &keep,
                        progress,
                    )
                    .map_err(internal)?;
                (g, total, None)
            }
            (engine, trace) => {
                let force = trace.map(TraceTarget::needed_outputs).unwrap_or_default();
                let mut g = match engine {
                    Some(f) => f
                        .graph_forcing(&self.model, ci, th, semantics, max_outputs, &force)
                        .map_err(traced_error)?,
                    _ => reference_graph_with(
                        &self.model,
                        &self.sources,
                        ci,
                        th,
                        semantics,
                        max_outputs,
                    )
                    .map_err(internal)?,
                };
                let total = g.edges.len();
                if semantics == Semantics::App {
                    g.edges = normalize(&g.edges, params.normalize);
                }
                let trace = match trace {
                    None => {
                        g.edges = strongest(&g.edges, keep, MAX_EDGES);
                        None
                    }
                    Some(target) => {
                        let outputs = &g.alive[g.alive.len() - 1];
                        let seeds = Seeds::resolve(target, outputs, &g.masked_probs)
                            .map_err(ApiError::bad_request)?;
                        g.edges.retain(|e| keep(e));
                        let n = self.model.modules.len();
                        let mut whole = GraphTrace::of_edges(&g.alive, n, &g.edges, seeds);
                        let mut top = TopK::new(MAX_EDGES);
                        for (i, (e, score)) in g.edges.iter().zip(&whole.edge).enumerate() {
                            if *score > 0.0 {
                                top.offer_by(*score, i, e);
                            }
                        }
                        (whole.edge, g.edges) = top.into_ranked().into_iter().unzip();
                        Some(whole)
                    }
                };
                (g, total, trace)
            }
        };
        let strings = tokens.iter().map(|t| self.token_string(*t)).collect();
        Ok(to_wire(
            &self.model,
            prompt_id,
            strings,
            ci,
            &graph,
            total,
            params,
            &hidden,
            trace.as_ref(),
            &|id| self.token_string(id),
        ))
    }

    /// Refuses a trace target outside the prompt or the vocabulary.
    fn check_trace(&self, target: TraceTarget, n_tokens: usize) -> Result<(), ApiError> {
        let vocab = self.model.target.cfg.vocab_size;
        for (pos, token) in target.needed_outputs() {
            if pos >= n_tokens {
                return Err(ApiError::bad_request(format!(
                    "trace position {pos} is outside the prompt ({n_tokens} tokens)"
                )));
            }
            if token as usize >= vocab {
                return Err(ApiError::bad_request(format!(
                    "trace token {token} is out of the vocabulary (size {vocab})"
                )));
            }
        }
        Ok(())
    }
}

/// Components hidden from a view: those whose mean CI over the database exceeds `max_mean_ci`
/// (too often on to be informative), when the user asks. A table per module, so that testing an
/// edge costs two lookups.
pub struct Hidden(Vec<Vec<bool>>);

impl Hidden {
    /// `mean_ci` gives a component's (`"layer:c"`) mean CI, where the database knows it.
    pub fn new(
        model: &SpdModel,
        params: GraphParams,
        mean_ci: &dyn Fn(&str) -> Option<f64>,
    ) -> Self {
        if params.max_mean_ci >= 1.0 {
            return Self(Vec::new());
        }
        let limit = f64::from(params.max_mean_ci);
        Self(
            model
                .modules
                .iter()
                .map(|m| {
                    (0..m.components.c())
                        .map(|c| mean_ci(&format!("{}:{c}", m.name)).is_some_and(|x| x > limit))
                        .collect()
                })
                .collect(),
        )
    }

    /// Nothing hidden.
    pub fn none() -> Self {
        Self(Vec::new())
    }

    #[inline]
    pub fn hides(&self, layer: Layer, c: u32) -> bool {
        match layer {
            Layer::Module(i) => self
                .0
                .get(i)
                .and_then(|m| m.get(c as usize))
                .copied()
                .unwrap_or(false),
            _ => false,
        }
    }
}

/// The wire form of a graph whose `edges` are already the ones to draw, strongest first (see
/// [`strongest`]; `total_edges` counts the whole graph's): alive nodes without the `hidden`
/// components, the edges normalized per target when asked.
#[allow(clippy::too_many_arguments)]
pub fn to_wire(
    model: &SpdModel,
    prompt_id: Option<i64>,
    tokens: Vec<String>,
    ci: &PromptCi,
    graph: &Graph,
    total_edges: usize,
    params: GraphParams,
    hidden: &Hidden,
    trace: Option<&GraphTrace>,
    token_str: &dyn Fn(u32) -> String,
) -> GraphData {
    let n = model.modules.len();
    let mut nodes = Vec::new();
    let mut outputs = Vec::new();
    // Node `i` of the alive order, for the trace's per-node influence.
    let mut dense = 0usize;
    let mut influence = Vec::new();
    for layer in Layer::all(model) {
        for (s, alive) in graph.alive[layer.index(n)].iter().enumerate() {
            for &c in alive {
                let i = dense;
                dense += 1;
                let key = format!("{}:{s}:{c}", layer.name(model));
                let importance = match layer {
                    Layer::Wte => 1.0,
                    Layer::Module(_) if hidden.hides(layer, c) => continue,
                    Layer::Module(i) => ci.lower[i][s][c as usize],
                    Layer::Output => {
                        let prob = graph.masked_probs[s][c as usize];
                        outputs.push(OutputNode {
                            key: key.clone(),
                            token: token_str(c),
                            prob,
                        });
                        prob
                    }
                };
                if let Some(t) = trace {
                    influence.push(t.node[i] as f32);
                }
                nodes.push(Node { key, importance });
            }
        }
    }
    // The seed's server normalises the edges it sends; the app's graphs come normalised.
    let normalized;
    let kept = if params.semantics == Semantics::Seed {
        normalized = normalize(&graph.edges, params.normalize);
        &normalized
    } else {
        &graph.edges
    };
    let edges = kept
        .iter()
        .map(|e| WireEdge {
            src: format!("{}:{}:{}", e.source.name(model), e.s_in, e.c_in),
            tgt: format!("{}:{}:{}", e.target.name(model), e.s_out, e.c_out),
            val: e.value as f32,
        })
        .collect();
    GraphData {
        prompt_id,
        tokens,
        n_blocks: model.target.blocks.len(),
        nodes,
        edges,
        total_edges,
        edge_cap: MAX_EDGES,
        params,
        outputs,
        optimization: None,
        trace: trace.map(|t| TraceData {
            targets: t
                .seeds
                .targets()
                .iter()
                .map(|(l, s, c)| format!("{}:{s}:{c}", l.name(model)))
                .collect(),
            influence,
            edge_scores: t.edge.iter().map(|&x| x as f32).collect(),
            total_influence: t.total_influence(&graph.alive, n),
            total_edge_score: t.total_edge_score,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_shared")
    }

    /// The graph of the fixture's first prompt, without database means.
    fn graph0(run: &Run, params: GraphParams) -> Result<GraphData, ApiError> {
        run.graph(None, &prompt0(), params, &|_| None, &|_, _| {})
    }

    fn prompt0() -> Vec<u32> {
        let text = std::fs::read_to_string(fixture().join("prompts.json")).unwrap();
        let prompts: Vec<Vec<u32>> = serde_json::from_str(&text).unwrap();
        prompts[0].clone()
    }

    #[test]
    fn the_graph_backend_can_be_chosen_and_gives_the_same_graph() {
        let auto = Run::load(&fixture(), &Device::Cpu).unwrap();
        let tensor = Run::load_with(&fixture(), &Device::Cpu, Some(Backend::Tensor)).unwrap();
        assert_eq!(auto.fast.as_ref().unwrap().backend(), Backend::Host);
        assert_eq!(tensor.fast.as_ref().unwrap().backend(), Backend::Tensor);
        let params = GraphParams::default();
        let graph = |run: &Run| {
            run.graph(Some(1), &prompt0(), params, &|_| None, &|_, _| {})
                .unwrap()
        };
        let (a, b) = (graph(&auto), graph(&tensor));
        // Under the wire's cap, so both hold every edge; sorted by strength, near-ties may swap.
        assert!(!a.edges.is_empty() && a.edges.len() < MAX_EDGES);
        let by_key = |g: &GraphData| -> std::collections::HashMap<(String, String), f32> {
            g.edges
                .iter()
                .map(|e| ((e.src.clone(), e.tgt.clone()), e.val))
                .collect()
        };
        let (a, b) = (by_key(&a), by_key(&b));
        assert_eq!(a.len(), b.len());
        let scale = a.values().fold(0f32, |m, v| m.max(v.abs()));
        for (k, v) in &a {
            assert!((v - b[k]).abs() <= 1e-4 * scale, "{k:?}: {v} vs {}", b[k]);
        }
    }

    #[test]
    fn wire_graph_is_capped_sorted_and_consistent() {
        let run = Run::load(&fixture(), &Device::Cpu).unwrap();
        let params = GraphParams {
            normalize: app::types::Normalize::None,
            ..GraphParams::default()
        };
        let g = run
            .graph(Some(1), &prompt0(), params, &|_| None, &|_, _| {})
            .unwrap();
        assert_eq!(g.tokens.len(), 8);
        assert_eq!(g.n_blocks, 2);
        assert_eq!(g.total_edges, g.edges.len());
        let keys: HashSet<_> = g.nodes.iter().map(|n| n.key.as_str()).collect();
        assert!(!g.edges.is_empty());
        for e in &g.edges {
            assert!(keys.contains(e.src.as_str()) && keys.contains(e.tgt.as_str()));
        }
        assert!(g.edges.windows(2).all(|w| w[0].val.abs() >= w[1].val.abs()));
        // Every output node has its probability, and it is at or above the threshold.
        let n_out = g
            .nodes
            .iter()
            .filter(|n| n.key.starts_with("output:"))
            .count();
        assert_eq!(n_out, g.outputs.len());
        assert!(g.outputs.iter().all(|o| o.prob >= 0.05));
    }

    #[test]
    fn normalized_edges_sum_to_one_per_target() {
        let run = Run::load(&fixture(), &Device::Cpu).unwrap();
        let g = graph0(&run, GraphParams::default()).unwrap();
        let mut sums: std::collections::HashMap<&str, f64> = Default::default();
        for e in &g.edges {
            *sums.entry(e.tgt.as_str()).or_default() += f64::from(e.val.abs());
        }
        for (tgt, s) in sums {
            assert!((s - 1.0).abs() < 1e-4 || s == 0.0, "{tgt}: {s}");
        }
    }

    /// The app's semantics on the wire: L2 per target (each target's incoming edges have unit
    /// norm), the reference engine's edges, and other values than the seed's.
    #[test]
    fn app_semantics_with_l2_per_target() {
        use app::types::{Normalize, Semantics};
        let run = Run::load(&fixture(), &Device::Cpu).unwrap();
        let app = GraphParams {
            semantics: Semantics::App,
            normalize: Normalize::L2Target,
            ..GraphParams::default()
        };
        let g = graph0(&run, app).unwrap();
        assert_eq!(g.params.semantics, Semantics::App);
        assert!(g.total_edges <= MAX_EDGES, "the whole graph is on the wire");
        let mut sums: std::collections::HashMap<&str, f64> = Default::default();
        for e in &g.edges {
            *sums.entry(e.tgt.as_str()).or_default() += f64::from(e.val).powi(2);
        }
        for (tgt, s) in &sums {
            assert!((s - 1.0).abs() < 1e-4, "{tgt}: {s}");
        }
        let seed = graph0(&run, GraphParams::default()).unwrap();
        let seed_vals: std::collections::HashMap<(&str, &str), f32> = seed
            .edges
            .iter()
            .map(|e| ((e.src.as_str(), e.tgt.as_str()), e.val))
            .collect();
        let differ = g
            .edges
            .iter()
            .filter(|e| {
                seed_vals
                    .get(&(e.src.as_str(), e.tgt.as_str()))
                    .is_some_and(|v| (v - e.val).abs() > 1e-3)
            })
            .count();
        assert!(differ > 0, "app and seed semantics give the same values");
    }

    #[test]
    fn max_mean_ci_drops_frequent_components_and_their_edges() {
        let run = Run::load(&fixture(), &Device::Cpu).unwrap();
        let all = graph0(&run, GraphParams::default()).unwrap();
        // Pretend every c_fc component of block 0 is on half the time.
        let mean = |k: &str| k.starts_with("h.0.mlp.c_fc:").then_some(0.5);
        let params = GraphParams {
            max_mean_ci: 0.4,
            ..GraphParams::default()
        };
        let some = run
            .graph(None, &prompt0(), params, &mean, &|_, _| {})
            .unwrap();
        let is_fc = |k: &str| k.starts_with("h.0.mlp.c_fc:");
        assert!(all.nodes.iter().any(|n| is_fc(&n.key)));
        assert!(!some.nodes.iter().any(|n| is_fc(&n.key)));
        assert!(!some.edges.iter().any(|e| is_fc(&e.src) || is_fc(&e.tgt)));
        assert!(some.edges.len() < all.edges.len());
        assert_eq!(
            some.nodes.len(),
            all.nodes.len() - all.nodes.iter().filter(|n| is_fc(&n.key)).count()
        );
    }

    #[test]
    fn bad_parameters_and_tokens_are_refused() {
        let run = Run::load(&fixture(), &Device::Cpu).unwrap();
        let bad = GraphParams {
            output_prob_threshold: 2.0,
            ..GraphParams::default()
        };
        let err = graph0(&run, bad).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains("output_prob_threshold"), "{err}");
        let err = run
            .graph(
                None,
                &[5, 100_000],
                GraphParams::default(),
                &|_| None,
                &|_, _| {},
            )
            .unwrap_err();
        assert_eq!(err.status, 400, "{err}");
        assert!(
            run.tokenize("hello").is_err(),
            "the fixture has no tokenizer"
        );
    }
}
