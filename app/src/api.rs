//! Server functions. Their bodies run only on the server and reach the explorer service through
//! context; the original tool's HTTP API (in `server/src/web/http_api.rs`) calls the same service.

use crate::types::{
    ComponentInfo, GraphData, GraphParams, InterventionParams, InterventionRun, LayerComponents,
    Meta, OptimizeSpec, Probe, PromptPage, PromptRef, SearchResults, VocabEntry,
};
use leptos::prelude::*;
use leptos::server_fn::codec::Json;

/// The served run and database.
#[server(prefix = "/fn", input = Json)]
pub async fn get_meta() -> Result<Meta, ServerFnError> {
    let service = service()?;
    blocking(move || service.meta()).await
}

/// A page of stored prompts in id order, after id `after`; with `query`, only prompts whose decoded
/// text contains it (case-insensitive).
#[server(prefix = "/fn", input = Json)]
pub async fn list_prompts(
    query: String,
    after: Option<i64>,
    limit: usize,
) -> Result<PromptPage, ServerFnError> {
    let service = service()?;
    blocking(move || service.prompts(&query, after, limit)).await
}

/// The attribution graph of a stored prompt or of typed text. `ticket` names the computation so that
/// `/api/progress/{ticket}` can stream its progress.
#[server(prefix = "/fn", input = Json)]
pub async fn get_graph(
    prompt: PromptRef,
    params: GraphParams,
    ticket: Option<u64>,
) -> Result<GraphData, ServerFnError> {
    let service = service()?;
    let graph = service.graph(prompt, params, ticket).await;
    respond(graph.map(|g| (*g).clone()))
}

/// The graph of CI optimised for `spec` (SPEC §7) over the prompt's tokens up to its position,
/// with the optimisation's metrics; progress streams at `/api/progress/{ticket}` as for graphs.
#[server(prefix = "/fn", input = Json)]
pub async fn get_optimized_graph(
    prompt: PromptRef,
    params: GraphParams,
    spec: OptimizeSpec,
    ticket: Option<u64>,
) -> Result<GraphData, ServerFnError> {
    let service = service()?;
    let graph = service.optimized_graph(prompt, params, spec, ticket).await;
    respond(graph.map(|g| (*g).clone()))
}

/// Prompts in which all (or any) of the component keys (`"layer:c"`) are alive, best first.
#[server(prefix = "/fn", input = Json)]
pub async fn search_components(
    keys: Vec<String>,
    all: bool,
    limit: usize,
) -> Result<SearchResults, ServerFnError> {
    let service = service()?;
    blocking(move || service.search(&keys, all, limit)).await
}

/// Mean CI, density and top activation contexts of a component (`"layer:c"`).
#[server(prefix = "/fn", input = Json)]
pub async fn get_component(key: String) -> Result<ComponentInfo, ServerFnError> {
    let service = service()?;
    blocking(move || service.component(&key)).await
}

/// Runs an intervention on a prompt (or its fork) and keeps it in the prompt's run history.
#[server(prefix = "/fn", input = Json)]
pub async fn run_intervention(
    params: InterventionParams,
) -> Result<InterventionRun, ServerFnError> {
    let service = service()?;
    blocking(move || service.intervene(params)).await
}

/// The intervention runs kept for a prompt, oldest first.
#[server(prefix = "/fn", input = Json)]
pub async fn list_interventions(prompt: PromptRef) -> Result<Vec<InterventionRun>, ServerFnError> {
    let service = service()?;
    blocking(move || service.interventions(&prompt)).await
}

/// Deletes a kept intervention run.
#[server(prefix = "/fn", input = Json)]
pub async fn delete_intervention(id: i64) -> Result<(), ServerFnError> {
    let service = service()?;
    blocking(move || service.delete_intervention(id)).await
}

/// Vocabulary entries whose text contains `query` (case-insensitive; `#id` finds an id), shortest
/// first.
#[server(prefix = "/fn", input = Json)]
pub async fn search_vocab(query: String, limit: usize) -> Result<Vec<VocabEntry>, ServerFnError> {
    let service = service()?;
    blocking(move || service.vocab(&query, limit)).await
}

/// Every component of `layer` (the first decomposed layer when empty) with its mean CI and firing
/// density over the database.
#[server(prefix = "/fn", input = Json)]
pub async fn get_layer_components(layer: String) -> Result<LayerComponents, ServerFnError> {
    let service = service()?;
    blocking(move || service.layer_components(&layer)).await
}

/// The CI of component `key` (`layer:c`) on every token of `text`.
#[server(prefix = "/fn", input = Json)]
pub async fn probe_component(text: String, key: String) -> Result<Probe, ServerFnError> {
    let service = service()?;
    blocking(move || service.probe(&text, &key)).await
}

/// Every component label of the served run: `(layer:c, label)`.
#[server(prefix = "/fn", input = Json)]
pub async fn get_labels() -> Result<Vec<(String, String)>, ServerFnError> {
    let service = service()?;
    blocking(move || service.labels()).await
}

/// Labels a component (`layer:c`); an empty label removes it. Kept in the notes file beside the
/// database, per model.
#[server(prefix = "/fn", input = Json)]
pub async fn set_label(key: String, label: String) -> Result<(), ServerFnError> {
    let service = service()?;
    blocking(move || service.set_label(&key, &label)).await
}

#[cfg(feature = "ssr")]
pub use backend::{ApiError, Explorer, ExplorerHandle, GraphFuture};

#[cfg(feature = "ssr")]
fn service() -> Result<std::sync::Arc<dyn Explorer>, ServerFnError> {
    use_context::<ExplorerHandle>()
        .map(|h| h.0)
        .ok_or_else(|| ServerFnError::new("the server placed no explorer service in context"))
}

/// Runs a blocking service call (database, tokenizer) off the async workers.
#[cfg(feature = "ssr")]
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ServerFnError> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("task failed: {e}"))));
    respond(result)
}

/// Bad input answers with a 4xx status, like the HTTP API; the message names the problem.
#[cfg(feature = "ssr")]
fn respond<T>(result: Result<T, ApiError>) -> Result<T, ServerFnError> {
    result.map_err(|e| {
        if let Some(opts) = use_context::<leptos_axum::ResponseOptions>() {
            opts.set_status(
                axum::http::StatusCode::from_u16(e.status())
                    .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
            );
        }
        ServerFnError::new(e.message)
    })
}

#[cfg(feature = "ssr")]
mod backend {
    use crate::types::{
        ComponentInfo, GraphData, GraphParams, InterventionParams, InterventionRun,
        LayerComponents, Meta, OptimizeSpec, Probe, PromptPage, PromptRef, SearchResults,
        VocabEntry,
    };
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    /// A graph on its way: computed by the server's graph worker, or taken from its cache.
    pub type GraphFuture = Pin<Box<dyn Future<Output = Result<Arc<GraphData>, ApiError>> + Send>>;

    /// Everything the page and the HTTP API ask of the server. Blocking methods are called off the
    /// async runtime.
    pub trait Explorer: Send + Sync + 'static {
        fn meta(&self) -> Result<Meta, ApiError>;
        fn prompts(
            &self,
            query: &str,
            after: Option<i64>,
            limit: usize,
        ) -> Result<PromptPage, ApiError>;
        fn graph(&self, prompt: PromptRef, params: GraphParams, ticket: Option<u64>)
        -> GraphFuture;
        fn optimized_graph(
            &self,
            prompt: PromptRef,
            params: GraphParams,
            spec: OptimizeSpec,
            ticket: Option<u64>,
        ) -> GraphFuture;
        fn search(
            &self,
            keys: &[String],
            all: bool,
            limit: usize,
        ) -> Result<SearchResults, ApiError>;
        fn component(&self, key: &str) -> Result<ComponentInfo, ApiError>;
        fn intervene(&self, params: InterventionParams) -> Result<InterventionRun, ApiError>;
        fn interventions(&self, prompt: &PromptRef) -> Result<Vec<InterventionRun>, ApiError>;
        fn delete_intervention(&self, id: i64) -> Result<(), ApiError>;
        fn vocab(&self, query: &str, limit: usize) -> Result<Vec<VocabEntry>, ApiError>;
        fn labels(&self) -> Result<Vec<(String, String)>, ApiError>;
        fn layer_components(&self, layer: &str) -> Result<LayerComponents, ApiError>;
        fn probe(&self, text: &str, key: &str) -> Result<Probe, ApiError>;
        fn set_label(&self, key: &str, label: &str) -> Result<(), ApiError>;
    }

    /// The service as the server provides it in Leptos context.
    #[derive(Clone)]
    pub struct ExplorerHandle(pub Arc<dyn Explorer>);

    /// A request the service cannot answer, with the HTTP status that says why.
    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("{message}")]
    pub struct ApiError {
        pub status: u16,
        pub message: String,
    }

    impl ApiError {
        pub fn bad_request(message: impl Into<String>) -> Self {
            ApiError {
                status: 400,
                message: message.into(),
            }
        }
        pub fn not_found(message: impl Into<String>) -> Self {
            ApiError {
                status: 404,
                message: message.into(),
            }
        }
        pub fn busy(message: impl Into<String>) -> Self {
            ApiError {
                status: 503,
                message: message.into(),
            }
        }
        pub fn internal(message: impl Into<String>) -> Self {
            ApiError {
                status: 500,
                message: message.into(),
            }
        }
        pub fn status(&self) -> u16 {
            self.status
        }
    }
}
