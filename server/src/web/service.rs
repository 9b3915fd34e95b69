//! The explorer service: everything the page's server functions and the original-compatible HTTP
//! API answer, over one loaded run and one read-only database.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use app::api::{ApiError, Explorer, GraphFuture};
use app::types::{
    ComponentInfo, ComponentMatch, ContextSnippet, GraphData, GraphParams, Meta, Normalize,
    OptimLoss, OptimMask, OptimizeSpec, PromptPage, PromptRef, PromptSummary, SearchHit,
    SearchResults, Semantics, TraceTarget,
};
use rusqlite::Connection;

use super::jobs::{GraphJobs, Source};
use super::run::Run;
use crate::store::graph_cache::GraphCache;
use crate::store::notes::Notes;
use crate::store::queries;

/// Longest page of prompts or search results one request returns.
pub const MAX_PAGE: usize = 10_000;
/// A text search reads at most this many prompts per request, then says where to go on.
const SCAN_LIMIT: usize = 100_000;

/// Where stored prompts come from.
pub enum Prompts {
    /// A list (e.g. a run's `prompts.json`); ids are indexes from 0.
    List(Vec<Vec<u32>>),
    /// A database written by `generate` or the original tool; ids are `prompts.id`.
    Db {
        conn: Mutex<Connection>,
        path: PathBuf,
    },
}

impl Prompts {
    /// Opens `path` read-only.
    pub fn open_db(path: &Path) -> Result<Self, String> {
        let conn = crate::store::schema::open_read_only(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Prompts::Db {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// Reads prompts from a JSON file of token-id arrays (such as a run's `prompts.json`).
    pub fn read_list(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map(Prompts::List)
            .map_err(|e| format!("{}: expected JSON arrays of token ids: {e}", path.display()))
    }
}

/// The name a run goes by: its directory's (a checkpoint file's directory), not a path of this
/// machine.
pub fn run_name(path: &std::path::Path) -> String {
    let dir = if path.is_file() {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    // `canonicalize` turns `.` or a trailing `..` into a name.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A graph request as the cache and the worker know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct GraphKey {
    prompt: PromptRef,
    /// `GraphParams` with floats as bits, so equal requests hash equally.
    params: [u32; 3],
    normalize: Normalize,
    semantics: Semantics,
    /// The optimisation of an optimised graph, its floats as bits.
    optim: Option<OptimKey>,
    trace: Option<TraceTarget>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
struct OptimKey {
    loss: OptimLoss,
    mask: OptimMask,
    /// label, position, steps, PGD steps
    ints: [u64; 4],
    /// imp_min_coeff, pnorm, beta, PGD step size
    floats: [u32; 4],
}

impl OptimKey {
    fn new(s: &OptimizeSpec) -> Self {
        OptimKey {
            loss: s.loss,
            mask: s.mask,
            ints: [
                u64::from(s.label),
                s.position as u64,
                s.steps as u64,
                s.pgd_steps as u64,
            ],
            floats: [
                s.imp_min_coeff.to_bits(),
                s.pnorm.to_bits(),
                s.beta.to_bits(),
                s.pgd_step_size.to_bits(),
            ],
        }
    }

    fn spec(&self) -> OptimizeSpec {
        OptimizeSpec {
            loss: self.loss,
            mask: self.mask,
            label: self.ints[0] as u32,
            position: self.ints[1] as usize,
            steps: self.ints[2] as usize,
            pgd_steps: self.ints[3] as usize,
            imp_min_coeff: f32::from_bits(self.floats[0]),
            pnorm: f32::from_bits(self.floats[1]),
            beta: f32::from_bits(self.floats[2]),
            pgd_step_size: f32::from_bits(self.floats[3]),
        }
    }
}

impl GraphKey {
    fn new(prompt: PromptRef, p: GraphParams) -> Self {
        GraphKey {
            prompt,
            params: [
                p.ci_threshold.to_bits(),
                p.output_prob_threshold.to_bits(),
                p.max_mean_ci.to_bits(),
            ],
            normalize: p.normalize,
            semantics: p.semantics,
            optim: None,
            trace: p.trace,
        }
    }

    fn params(&self) -> GraphParams {
        GraphParams {
            ci_threshold: f32::from_bits(self.params[0]),
            output_prob_threshold: f32::from_bits(self.params[1]),
            max_mean_ci: f32::from_bits(self.params[2]),
            normalize: self.normalize,
            semantics: self.semantics,
            trace: self.trace,
        }
    }
}

/// Bytes of compressed graphs the sidecar keeps unless told otherwise (`--graph-cache-mb`).
pub const GRAPH_CACHE_BYTES: u64 = 256 << 20;

/// What identifies the graphs a server computes: the bytes of every file the model was made of, and
/// the server binary that computed them (a rebuilt server may compute different numbers).
pub fn run_identity(model: &crate::model::SpdModel) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in &model.files {
        let sha = crate::generate::pipeline::sha256_file(f).map_err(|e| e.to_string())?;
        h.update(sha.as_bytes());
    }
    let exe = std::env::current_exe().and_then(std::fs::metadata);
    match exe {
        Ok(m) => {
            h.update(m.len().to_le_bytes());
            if let Ok(t) = m
                .modified()
                .map(|t| t.duration_since(std::time::UNIX_EPOCH))
            {
                h.update(t.unwrap_or_default().as_nanos().to_le_bytes());
            }
        }
        Err(e) => return Err(format!("cannot read the server binary's metadata: {e}")),
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The key a graph is kept under in the sidecar: the request and the prompt's tokens (a database
/// rebuilt at the same path may hold other tokens under the same id).
fn disk_key(key: &GraphKey, tokens: &[u32]) -> String {
    serde_json::json!({ "request": key, "tokens": tokens }).to_string()
}

/// The run, the prompts, and the graph worker.
#[derive(Clone)]
pub struct Service {
    data: Arc<Data>,
    jobs: GraphJobs<GraphKey>,
}

/// What both request handlers and the graph worker read.
pub struct Data {
    pub run: Run,
    pub prompts: Prompts,
    /// Mean CI per component key (`"layer:c"`), read from the database on first use.
    mean_ci: OnceLock<HashMap<String, f64>>,
    /// The sidecar notes file beside the database (in memory without one).
    pub notes: Mutex<Notes>,
    /// Every token's string, made on the first vocabulary search.
    pub(super) vocab: OnceLock<Vec<String>>,
    /// Computed graphs in the sidecar (none without a database, or with a budget of 0).
    graphs_on_disk: Option<GraphCache>,
}

/// The graph cache in the sidecar beside the database, if there is a database and a budget; a
/// sidecar that cannot be used is said in the log and graphs are then computed every restart.
fn open_graph_cache(prompts: &Prompts, run: &Run, budget: u64) -> Option<GraphCache> {
    let Prompts::Db { path, .. } = prompts else {
        return None;
    };
    if budget == 0 {
        return None;
    }
    let opened = run_identity(&run.model).and_then(|id| {
        let sidecar = crate::store::notes::sidecar_path(path);
        GraphCache::open(&sidecar, &id, budget).map_err(|e| e.to_string())
    });
    match opened {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("{e}; computed graphs are not kept across restarts");
            None
        }
    }
}

/// The notes beside the database: `<db>.notes.sqlite`; in memory without a database, or where the
/// file cannot be written (said in the log).
fn open_notes(prompts: &Prompts) -> Notes {
    if let Prompts::Db { path, .. } = prompts {
        let sidecar = crate::store::notes::sidecar_path(path);
        match Notes::open(&sidecar) {
            Ok(n) => return n,
            Err(e) => tracing::warn!("{e}; intervention runs are kept in memory only"),
        }
    }
    Notes::in_memory().expect("an in-memory SQLite database opens")
}

impl Service {
    /// The service over `run` and `prompts`, keeping up to [`GRAPH_CACHE_BYTES`] of graphs in the
    /// sidecar.
    pub fn new(run: Run, prompts: Prompts) -> Self {
        Self::with_graph_cache(run, prompts, GRAPH_CACHE_BYTES)
    }

    /// As [`Self::new`], with the sidecar's graph cache bounded to `bytes` (0: none).
    pub fn with_graph_cache(run: Run, prompts: Prompts, bytes: u64) -> Self {
        let notes = Mutex::new(open_notes(&prompts));
        let graphs_on_disk = open_graph_cache(&prompts, &run, bytes);
        let data = Arc::new(Data {
            run,
            prompts,
            mean_ci: OnceLock::new(),
            notes,
            vocab: OnceLock::new(),
            graphs_on_disk,
        });
        let worker_data = Arc::clone(&data);
        let store_data = Arc::clone(&data);
        let jobs = GraphJobs::start_with(
            Arc::new(move |key: &GraphKey, progress: &dyn Fn(usize, usize)| {
                worker_data.compute(key, progress)
            }),
            Arc::new(move |key: &GraphKey, graph: &Arc<GraphData>| {
                store_data.keep_on_disk(key, graph)
            }),
        );
        Service { data, jobs }
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Refuses a database indexed for another model: a different number of blocks, or component
    /// keys (among the first rows) that name modules or indices this model does not have.
    pub fn check_database(&self) -> Result<(), String> {
        let Prompts::Db { path, .. } = &self.data.prompts else {
            return Ok(());
        };
        let d = &self.data;
        let conn = d.db().map_err(|e| e.message)?;
        let other = |why: String| {
            format!(
                "{} was not made for the model {}: {why}",
                path.display(),
                d.run.model_path.display()
            )
        };
        let blocks = d.run.model.target.blocks.len();
        if let Some(n) = queries::n_blocks(&conn).map_err(|e| e.to_string())?
            && n as usize != blocks
        {
            return Err(other(format!(
                "it records {n} blocks, the model has {blocks}"
            )));
        }
        let mut stmt = conn
            .prepare("SELECT DISTINCT component_key FROM (SELECT component_key FROM component_activations LIMIT 5000)")
            .map_err(|e| e.to_string())?;
        let keys = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| e.to_string())?;
        for key in keys {
            let key = key.map_err(|e| e.to_string())?;
            if let Err(e) = d.check_component(&key) {
                return Err(other(e.message));
            }
        }
        Ok(())
    }

    /// The graph of `prompt`, shared with identical requests and cached.
    pub async fn graph_of(
        &self,
        prompt: PromptRef,
        params: GraphParams,
        ticket: Option<u64>,
    ) -> Result<Arc<GraphData>, ApiError> {
        self.graph_from(prompt, params, ticket)
            .await
            .map(|(g, _)| g)
    }

    /// As [`Self::graph_of`], saying where the graph came from.
    pub async fn graph_from(
        &self,
        prompt: PromptRef,
        params: GraphParams,
        ticket: Option<u64>,
    ) -> Result<(Arc<GraphData>, Source), ApiError> {
        params.check().map_err(ApiError::bad_request)?;
        if let PromptRef::Text(text) = &prompt {
            // Refuse bad text now, not after waiting in the queue.
            self.data.run.tokenize(text)?;
        }
        self.served(GraphKey::new(prompt, params), ticket).await
    }

    /// The graph of `key`: this process's cache, then the sidecar's, then the worker.
    async fn served(
        &self,
        key: GraphKey,
        ticket: Option<u64>,
    ) -> Result<(Arc<GraphData>, Source), ApiError> {
        if let Some(g) = self.jobs.cached_graph(&key, ticket) {
            return Ok((g, Source::Memory));
        }
        if self.data.graphs_on_disk.is_some() {
            let data = Arc::clone(&self.data);
            let k = key.clone();
            let found = tokio::task::spawn_blocking(move || data.graph_on_disk(&k))
                .await
                .ok()
                .flatten();
            if let Some(g) = found {
                let g = Arc::new(g);
                self.jobs.insert(key, Arc::clone(&g), ticket);
                return Ok((g, Source::Disk));
            }
        }
        let (outcome, source) = self.jobs.get_from(key, ticket).await;
        outcome.map(|g| (g, source))
    }

    /// The graph of `prompt`'s CI optimised for `spec`, shared and cached like the others.
    pub async fn optimized_graph_of(
        &self,
        prompt: PromptRef,
        params: GraphParams,
        spec: OptimizeSpec,
        ticket: Option<u64>,
    ) -> Result<Arc<GraphData>, ApiError> {
        params.check().map_err(ApiError::bad_request)?;
        let tokens = self.data.tokens_of(&prompt)?;
        // Refuse a bad optimisation now, not after waiting in the queue.
        self.data
            .optim_config(&spec)
            .check(&self.data.run.model, tokens.len())
            .map_err(ApiError::bad_request)?;
        let key = GraphKey {
            optim: Some(OptimKey::new(&spec)),
            ..GraphKey::new(prompt, params)
        };
        self.served(key, ticket).await.map(|(g, _)| g)
    }

    /// Progress of the computation named `ticket`.
    pub fn progress(&self, ticket: u64) -> Option<super::jobs::Watch> {
        self.jobs.watch(ticket)
    }
}

impl Data {
    /// Every component of `layer` (the first decomposed one when empty) with its statistics over
    /// the database's activation contexts, in component order.
    pub fn layer_components(&self, layer: &str) -> Result<app::types::LayerComponents, ApiError> {
        let model = &self.run.model;
        let layers: Vec<String> = model.modules.iter().map(|m| m.name.clone()).collect();
        let module = if layer.is_empty() {
            model.modules.first()
        } else {
            model.modules.iter().find(|m| m.name == layer)
        }
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown layer {layer:?}: this run decomposes {}",
                layers.join(", ")
            ))
        })?;
        // Mean CI from the one map the hover cards use (it also reads the original tool's
        // `activation_contexts`); density from this tool's per-module firing counts.
        let means = self.mean_ci();
        let density = match &self.prompts {
            Prompts::Db { .. } => {
                let conn = self.db()?;
                let (_, n_tokens) =
                    crate::store::contexts::read_state(&conn).map_err(store_error)?;
                crate::store::contexts::read_module_sums(&conn)
                    .map_err(store_error)?
                    .into_iter()
                    .find(|m| m.module == module.name)
                    .map(|m| (m.n_firing, n_tokens.max(1) as f64))
            }
            Prompts::List(_) => None,
        };
        let rows = (0..module.components.c())
            .map(|c| app::types::ComponentRow {
                c,
                mean_ci: means.get(&format!("{}:{c}", module.name)).copied(),
                density: density
                    .as_ref()
                    .and_then(|(n, total)| n.get(c).map(|&x| x as f64 / total)),
            })
            .collect();
        Ok(app::types::LayerComponents {
            layer: module.name.clone(),
            layers,
            rows,
        })
    }

    /// The CI (lower leaky, as thresholds use it) of component `key` on every token of `text`.
    pub fn probe(&self, text: &str, key: &str) -> Result<app::types::Probe, ApiError> {
        self.check_component(key)?;
        let (layer, c) = key.rsplit_once(':').unwrap_or((key, "0"));
        let c: usize = c.parse().unwrap_or(0);
        let module = self
            .run
            .model
            .modules
            .iter()
            .position(|m| m.name == layer)
            .ok_or_else(|| {
                ApiError::bad_request(format!("{key:?} is not a decomposed component"))
            })?;
        let tokens = self.run.tokenize(text)?;
        let ci = crate::attribution::PromptCi::compute(&self.run.model, &tokens)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(app::types::Probe {
            key: key.to_owned(),
            tokens: tokens.iter().map(|&t| self.run.token_string(t)).collect(),
            ci: ci.lower[module].iter().map(|pos| pos[c]).collect(),
        })
    }

    /// The sidecar's graph for `key`, if it has one.
    fn graph_on_disk(&self, key: &GraphKey) -> Option<GraphData> {
        let cache = self.graphs_on_disk.as_ref()?;
        let tokens = self.tokens_of(&key.prompt).ok()?;
        cache.get(&disk_key(key, &tokens))
    }

    /// Writes a computed graph to the sidecar (on the worker thread, after it was delivered).
    fn keep_on_disk(&self, key: &GraphKey, graph: &GraphData) {
        let Some(cache) = &self.graphs_on_disk else {
            return;
        };
        let kept = self
            .tokens_of(&key.prompt)
            .map_err(|e| e.message)
            .and_then(|t| {
                cache
                    .put(&disk_key(key, &t), graph)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = kept {
            tracing::warn!("graph cache: not kept: {e}");
        }
    }

    fn compute(
        &self,
        key: &GraphKey,
        progress: &dyn Fn(usize, usize),
    ) -> Result<GraphData, ApiError> {
        let id = match &key.prompt {
            PromptRef::Stored(id) => Some(*id),
            PromptRef::Text(_) => None,
        };
        let tokens = self.tokens_of(&key.prompt)?;
        let params = key.params();
        let means = if params.max_mean_ci < 1.0 {
            Some(self.mean_ci())
        } else {
            None
        };
        let mean = |k: &str| means.and_then(|m| m.get(k).copied());
        match &key.optim {
            None => self.run.graph(id, &tokens, params, &mean, progress),
            Some(o) => self.optimized(id, &tokens, params, &o.spec(), &mean, progress),
        }
    }

    fn db(&self) -> Result<std::sync::MutexGuard<'_, Connection>, ApiError> {
        match &self.prompts {
            Prompts::Db { conn, .. } => Ok(conn.lock().unwrap_or_else(|e| e.into_inner())),
            Prompts::List(_) => Err(ApiError::bad_request(
                "the server was started without a database (--db), so it cannot search components",
            )),
        }
    }

    /// Token ids of a stored prompt or of typed text.
    pub fn tokens_of(&self, prompt: &PromptRef) -> Result<Vec<u32>, ApiError> {
        match prompt {
            PromptRef::Stored(id) => self.prompt_tokens(*id),
            PromptRef::Text(text) => self.run.tokenize(text),
        }
    }

    /// Token ids of stored prompt `id`; 404 when there is none.
    pub fn prompt_tokens(&self, id: i64) -> Result<Vec<u32>, ApiError> {
        let found = match &self.prompts {
            Prompts::List(list) => usize::try_from(id).ok().and_then(|i| list.get(i).cloned()),
            Prompts::Db { .. } => queries::prompt(&*self.db()?, id)
                .map_err(store_error)?
                .map(|p| p.token_ids),
        };
        found.ok_or_else(|| ApiError::not_found(format!("Prompt {id} not found")))
    }

    fn summary(&self, id: i64, tokens: &[u32]) -> PromptSummary {
        PromptSummary {
            id,
            text: self.run.text(tokens),
            n_tokens: tokens.len(),
        }
    }

    /// Mean CI of every component the database has activation contexts for.
    pub fn mean_ci(&self) -> &HashMap<String, f64> {
        self.mean_ci.get_or_init(|| match self.db() {
            Ok(conn) => read_mean_ci(&conn).unwrap_or_else(|e| {
                tracing::warn!("cannot read mean CIs from the database: {e}");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        })
    }

    /// Checks a component key `"layer:c"` against the model: a decomposed module with `c < C`,
    /// `wte:0`, or `output:v` with `v` in the vocabulary.
    pub fn check_component(&self, key: &str) -> Result<(), ApiError> {
        let bad = || {
            ApiError::bad_request(format!(
                "unknown component key {key:?}: expected \"layer:c\" with a layer of this model"
            ))
        };
        let (layer, c) = key.rsplit_once(':').ok_or_else(bad)?;
        let c: usize = c.parse().map_err(|_| bad())?;
        let model = &self.run.model;
        let ok = match layer {
            "wte" => c == 0,
            "output" => c < model.vocab_size(),
            _ => model
                .modules
                .iter()
                .any(|m| m.name == layer && c < m.components.c()),
        };
        if ok { Ok(()) } else { Err(bad()) }
    }

    /// Prompts where all (or any) of the component keys are alive, best first, with their token ids;
    /// both the page's search and the original API's `/api/search` format these.
    pub fn search_hits(
        &self,
        keys: &[String],
        all: bool,
        limit: usize,
    ) -> Result<queries::SearchResult, ApiError> {
        let limit = page_limit(limit)?;
        if keys.is_empty() {
            return Err(ApiError::bad_request("No components specified"));
        }
        for k in keys {
            self.check_component(k)?;
        }
        let conn = self.db()?;
        let search = queries::Search {
            keys: keys.to_vec(),
            mode: if all {
                queries::Match::All
            } else {
                queries::Match::Any
            },
            order: queries::Order::ScoreDesc,
            offset: 0,
            limit,
        };
        queries::search_prompts(&conn, &search).map_err(store_error)
    }

    /// The prompts of a database, for the original API's `/api/prompts`.
    pub fn all_prompts(&self) -> Result<Vec<(i64, Vec<u32>)>, ApiError> {
        match &self.prompts {
            Prompts::List(list) => Ok(list
                .iter()
                .enumerate()
                .map(|(i, t)| (i as i64, t.clone()))
                .collect()),
            Prompts::Db { .. } => {
                let conn = self.db()?;
                let mut out = Vec::new();
                let mut after = 0;
                loop {
                    let page = queries::list_prompts(&conn, after, 10_000).map_err(store_error)?;
                    let Some(last) = page.last() else { break };
                    after = last.id;
                    out.extend(page.into_iter().map(|p| (p.id, p.token_ids)));
                }
                Ok(out)
            }
        }
    }

    /// The `activation_contexts` meta value as stored (the original tool's layout).
    pub fn activation_contexts(&self) -> Result<Option<serde_json::Value>, ApiError> {
        let conn = self.db()?;
        queries::meta(&conn, crate::store::meta::ACTIVATION_CONTEXTS).map_err(store_error)
    }
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::internal(format!("database: {e}"))
}

/// Mean CIs from `generate`'s accumulators, or from the `activation_contexts` meta of a database
/// written by the original tool.
fn read_mean_ci(conn: &Connection) -> Result<HashMap<String, f64>, crate::store::StoreError> {
    let mut out = HashMap::new();
    if crate::store::schema::has_table(conn, "context_modules")? {
        let (_, n_tokens) = crate::store::contexts::read_state(conn)?;
        for m in crate::store::contexts::read_module_sums(conn)? {
            for (c, s) in m.sum_ci.iter().enumerate() {
                out.insert(format!("{}:{c}", m.module), s / n_tokens.max(1) as f64);
            }
        }
        return Ok(out);
    }
    if let Some(serde_json::Value::Object(layers)) =
        queries::meta(conn, crate::store::meta::ACTIVATION_CONTEXTS)?
    {
        for (layer, comps) in layers {
            for comp in comps.as_array().into_iter().flatten() {
                if let (Some(c), Some(m)) = (
                    comp.get("subcomponent_idx").and_then(|v| v.as_u64()),
                    comp.get("mean_ci").and_then(|v| v.as_f64()),
                ) {
                    out.insert(format!("{layer}:{c}"), m);
                }
            }
        }
    }
    Ok(out)
}

fn page_limit(limit: usize) -> Result<usize, ApiError> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        )));
    }
    Ok(limit)
}

impl Explorer for Service {
    fn meta(&self) -> Result<Meta, ApiError> {
        let d = &self.data;
        let (prompt_count, db_bytes, has_contexts) = match &d.prompts {
            Prompts::List(list) => (list.len() as u64, 0, false),
            Prompts::Db { path, .. } => {
                let conn = d.db()?;
                let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                (
                    queries::prompt_count(&conn).map_err(store_error)?,
                    size(path) + size(&wal),
                    crate::store::schema::has_table(&conn, "context_modules")
                        .map_err(store_error)?,
                )
            }
        };
        Ok(Meta {
            model_path: d.run.model_path.display().to_string(),
            run_name: run_name(&d.run.model_path),
            n_blocks: d.run.model.target.blocks.len(),
            n_ctx: d.run.model.block_size(),
            family: d.run.model.target.cfg.family.name().to_owned(),
            ci_kind: d.run.model.ci_kind().to_owned(),
            prompt_count,
            db_bytes,
            has_contexts,
            can_tokenize: d.run.can_tokenize(),
        })
    }

    fn prompts(
        &self,
        query: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<PromptPage, ApiError> {
        let limit = page_limit(limit)?;
        let d = &self.data;
        let needle = query.trim().to_lowercase();
        let matches = |text: &str| needle.is_empty() || text.to_lowercase().contains(&needle);
        let mut prompts = Vec::new();
        let mut scanned = 0;
        let mut cursor = after.unwrap_or(-1);
        let next_after = match &d.prompts {
            Prompts::List(list) => {
                let start = usize::try_from(cursor + 1).unwrap_or(0);
                let mut next = None;
                for (i, tokens) in list.iter().enumerate().skip(start) {
                    let s = d.summary(i as i64, tokens);
                    if matches(&s.text) {
                        prompts.push(s);
                    }
                    if prompts.len() == limit {
                        next = (i + 1 < list.len()).then_some(i as i64);
                        break;
                    }
                }
                next
            }
            Prompts::Db { .. } => {
                let conn = d.db()?;
                loop {
                    let chunk = if needle.is_empty() { limit } else { 1000 };
                    let page =
                        queries::list_prompts(&conn, cursor.max(0), chunk).map_err(store_error)?;
                    if page.is_empty() {
                        break None;
                    }
                    let mut full = false;
                    for p in &page {
                        cursor = p.id;
                        scanned += 1;
                        let s = d.summary(p.id, &p.token_ids);
                        if matches(&s.text) {
                            prompts.push(s);
                        }
                        if prompts.len() == limit {
                            full = true;
                            break;
                        }
                    }
                    if full || scanned >= SCAN_LIMIT {
                        break Some(cursor);
                    }
                    if page.len() < chunk {
                        break None;
                    }
                }
            }
        };
        Ok(PromptPage {
            prompts,
            next_after,
        })
    }

    fn graph(&self, prompt: PromptRef, params: GraphParams, ticket: Option<u64>) -> GraphFuture {
        // The future owns what it uses: the service is two `Arc`s.
        let this = self.clone();
        Box::pin(async move { this.graph_of(prompt, params, ticket).await })
    }

    fn optimized_graph(
        &self,
        prompt: PromptRef,
        params: GraphParams,
        spec: OptimizeSpec,
        ticket: Option<u64>,
    ) -> GraphFuture {
        let this = self.clone();
        Box::pin(async move { this.optimized_graph_of(prompt, params, spec, ticket).await })
    }

    fn search(&self, keys: &[String], all: bool, limit: usize) -> Result<SearchResults, ApiError> {
        let d = &self.data;
        let found = d.search_hits(keys, all, limit)?;
        Ok(SearchResults {
            total: found.total,
            hits: found
                .hits
                .into_iter()
                .map(|h| SearchHit {
                    prompt: d.summary(h.prompt_id, &h.token_ids),
                    score: h.score,
                    matches: h
                        .matches
                        .into_iter()
                        .map(|a| ComponentMatch {
                            key: a.key,
                            max_ci: a.max_ci,
                            positions: a.positions,
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    fn intervene(
        &self,
        params: app::types::InterventionParams,
    ) -> Result<app::types::InterventionRun, ApiError> {
        self.data.intervene(params)
    }

    fn interventions(
        &self,
        prompt: &PromptRef,
    ) -> Result<Vec<app::types::InterventionRun>, ApiError> {
        self.data.interventions(prompt)
    }

    fn delete_intervention(&self, id: i64) -> Result<(), ApiError> {
        self.data.delete_intervention(id)
    }

    fn vocab(&self, query: &str, limit: usize) -> Result<Vec<app::types::VocabEntry>, ApiError> {
        self.data.vocab(query, limit)
    }

    fn labels(&self) -> Result<Vec<(String, String)>, ApiError> {
        self.data.labels()
    }

    fn set_label(&self, key: &str, label: &str) -> Result<(), ApiError> {
        self.data.set_label(key, label)
    }

    fn layer_components(&self, layer: &str) -> Result<app::types::LayerComponents, ApiError> {
        self.data.layer_components(layer)
    }

    fn probe(&self, text: &str, key: &str) -> Result<app::types::Probe, ApiError> {
        self.data.probe(text, key)
    }

    fn component(&self, key: &str) -> Result<ComponentInfo, ApiError> {
        let d = &self.data;
        d.check_component(key)?;
        let mut info = ComponentInfo {
            key: key.to_owned(),
            ..ComponentInfo::default()
        };
        let Prompts::Db { .. } = &d.prompts else {
            return Ok(info);
        };
        let mean = d.mean_ci().get(key).copied();
        let conn = d.db()?;
        info.n_prompts = queries::component_stats(&conn, key)
            .map_err(store_error)?
            .n_prompts;
        match queries::component_contexts(&conn, key).map_err(store_error)? {
            Some(ctx) => {
                info.mean_ci = Some(ctx.mean_ci);
                info.density = Some(ctx.density);
                info.examples = ctx
                    .examples
                    .iter()
                    .map(|e| ContextSnippet {
                        tokens: e.tokens.iter().map(|&t| d.run.token_string(t)).collect(),
                        ci: e.ci.clone(),
                        active: e.active as usize,
                    })
                    .collect();
            }
            None => info.mean_ci = mean,
        }
        Ok(info)
    }
}
