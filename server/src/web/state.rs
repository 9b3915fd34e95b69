//! What the server holds while it runs, and the graph source its server functions reach.

use super::placeholder;
use app::api::{GraphSource, GraphSourceError, Graphs};
use axum::extract::FromRef;
use leptos::config::LeptosOptions;
use std::sync::Arc;

/// The ways the server can produce graphs. The attribution engine joins as another variant.
pub enum GraphBackend {
    /// A small deterministic made-up graph, for working on the front end without a model.
    Placeholder,
    /// The attribution engine on a loaded SPD run.
    Engine(Box<super::engine::EngineGraphs>),
}

impl GraphSource for GraphBackend {
    fn graph(&self, prompt_id: u32) -> Result<app::types::GraphData, GraphSourceError> {
        match self {
            GraphBackend::Placeholder => placeholder::graph(prompt_id),
            GraphBackend::Engine(engine) => engine.graph(prompt_id),
        }
    }
}

/// The axum router state; server functions get `graphs` through Leptos context.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub graphs: Graphs,
}

impl AppState {
    pub fn new(leptos_options: LeptosOptions, backend: GraphBackend) -> Self {
        AppState {
            leptos_options,
            graphs: Graphs(Arc::new(backend)),
        }
    }
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}
