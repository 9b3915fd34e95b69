//! The attribution engine as a graph source: a loaded SPD run, its prompts, and the engine that turns a
//! prompt id into the graph the page draws.

use std::path::Path;

use app::api::GraphSourceError;
use app::types::{Edge as WireEdge, GraphData, Node};

use crate::attribution::{
    FastEngine, Graph, Layer, PromptCi, SourceMap, Thresholds, reference_graph,
};
use crate::model::SpdModel;

/// At most this many edges go to the browser, the strongest by |value| (as the original server).
pub const MAX_EDGES: usize = 30_000;

/// Where prompt ids come from.
pub enum Prompts {
    /// A list (e.g. a run's `prompts.json`); ids are indexes from 0.
    List(Vec<Vec<u32>>),
    /// A database written by `generate` or the original tool, opened read-only; ids are `prompts.id`.
    Db(std::sync::Mutex<rusqlite::Connection>),
}

impl Prompts {
    fn get(&self, id: u32) -> Result<Option<Vec<u32>>, String> {
        match self {
            Prompts::List(list) => Ok(list.get(id as usize).cloned()),
            Prompts::Db(conn) => {
                let conn = conn
                    .lock()
                    .map_err(|_| "the database lock is poisoned".to_owned())?;
                crate::store::queries::prompt(&conn, i64::from(id))
                    .map(|p| p.map(|p| p.token_ids))
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// A loaded run: the model, its source map, the fast engine when the model allows it, and prompts.
pub struct EngineGraphs {
    model: SpdModel,
    sources: SourceMap,
    fast: Option<FastEngine>,
    prompts: Prompts,
    tokenizer: Option<tokenizers::Tokenizer>,
    thresholds: Thresholds,
}

impl EngineGraphs {
    /// Serves `model` with `prompts`; a `tokenizer.json` in the run directory, if any, decodes token
    /// strings for display. Prompts are checked when asked for, so a bad one is an error for that id.
    pub fn new(model: SpdModel, prompts: Prompts, run_dir: &Path) -> Result<Self, String> {
        let sources = SourceMap::probe(&model).map_err(|e| e.to_string())?;
        let fast = match FastEngine::new(&model, &sources) {
            Ok(f) => Some(f),
            Err(why) => {
                tracing::warn!("{why}; graphs use the reference engine");
                None
            }
        };
        let tokenizer = tokenizers::Tokenizer::from_file(run_dir.join("tokenizer.json")).ok();
        Ok(Self {
            model,
            sources,
            fast,
            prompts,
            tokenizer,
            thresholds: Thresholds {
                ci: 0.1,
                output_prob: 0.05,
            },
        })
    }

    /// Reads prompts from a JSON file of token-id arrays (such as a run's `prompts.json`).
    pub fn read_prompts(path: &Path) -> Result<Vec<Vec<u32>>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: expected JSON arrays of token ids: {e}", path.display()))
    }

    fn token_string(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.id_to_token(id))
            .unwrap_or_else(|| format!("#{id}"))
    }

    fn compute(&self, tokens: &[u32]) -> Result<(PromptCi, Graph), String> {
        let ci = PromptCi::compute(&self.model, tokens).map_err(|e| e.to_string())?;
        let graph = match &self.fast {
            Some(f) => f.graph(&self.model, &ci, self.thresholds),
            None => reference_graph(&self.model, &self.sources, &ci, self.thresholds),
        }
        .map_err(|e| e.to_string())?;
        Ok((ci, graph))
    }
}

/// The wire form of a graph: alive nodes with their importance, and the strongest `MAX_EDGES` edges.
pub fn to_wire(
    model: &SpdModel,
    prompt_id: u32,
    tokens: Vec<String>,
    ci: &PromptCi,
    graph: &Graph,
) -> GraphData {
    let n = model.modules.len();
    let mut nodes = Vec::new();
    for layer in Layer::all(model) {
        for (s, alive) in graph.alive[layer.index(n)].iter().enumerate() {
            for &c in alive {
                let importance = match layer {
                    Layer::Wte => 1.0,
                    Layer::Module(i) => ci.lower[i][s][c as usize],
                    Layer::Output => graph.masked_probs[s][c as usize],
                };
                nodes.push(Node {
                    key: format!("{}:{s}:{c}", layer.name(model)),
                    importance,
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..graph.edges.len()).collect();
    order.sort_by(|a, b| {
        graph.edges[*b]
            .value
            .abs()
            .total_cmp(&graph.edges[*a].value.abs())
    });
    order.truncate(MAX_EDGES);
    let edges = order
        .into_iter()
        .map(|i| {
            let e = &graph.edges[i];
            WireEdge {
                src: format!("{}:{}:{}", e.source.name(model), e.s_in, e.c_in),
                tgt: format!("{}:{}:{}", e.target.name(model), e.s_out, e.c_out),
                val: e.value as f32,
            }
        })
        .collect();
    GraphData {
        prompt_id,
        tokens,
        n_blocks: model.target.blocks.len(),
        nodes,
        edges,
    }
}

impl app::api::GraphSource for EngineGraphs {
    fn graph(&self, prompt_id: u32) -> Result<GraphData, GraphSourceError> {
        let engine_error = |message| GraphSourceError::Engine { prompt_id, message };
        let tokens = self
            .prompts
            .get(prompt_id)
            .map_err(engine_error)?
            .ok_or(GraphSourceError::UnknownPrompt(prompt_id))?;
        let (ci, graph) = self.compute(&tokens).map_err(engine_error)?;
        let strings = tokens.iter().map(|t| self.token_string(*t)).collect();
        Ok(to_wire(&self.model, prompt_id, strings, &ci, &graph))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::api::GraphSource;
    use candle_core::Device;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_shared")
    }

    #[test]
    fn serves_real_graphs_of_the_run_prompts() {
        let model = SpdModel::load(&fixture(), &Device::Cpu).unwrap();
        let prompts = EngineGraphs::read_prompts(&fixture().join("prompts.json")).unwrap();
        let graphs = EngineGraphs::new(model, Prompts::List(prompts), &fixture()).unwrap();
        let g = graphs.graph(0).unwrap();
        assert_eq!(
            g.tokens,
            vec!["#35", "#3", "#51", "#25", "#55", "#8", "#68", "#19"]
        );
        assert_eq!(g.n_blocks, 2);
        // Every edge joins two listed nodes; values are sorted by |value|.
        let keys: std::collections::HashSet<_> = g.nodes.iter().map(|n| n.key.as_str()).collect();
        assert!(!g.edges.is_empty());
        for e in &g.edges {
            assert!(
                keys.contains(e.src.as_str()) && keys.contains(e.tgt.as_str()),
                "{e:?}"
            );
        }
        assert!(g.edges.windows(2).all(|w| w[0].val.abs() >= w[1].val.abs()));
        assert!(matches!(
            graphs.graph(3),
            Err(GraphSourceError::UnknownPrompt(3))
        ));
    }
}
