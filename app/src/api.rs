//! Server functions. Their bodies run only on the server and reach the engine through context.

use crate::types::GraphData;
use leptos::prelude::*;

/// The attribution graph of a stored prompt.
#[server]
pub async fn get_graph(prompt_id: u32) -> Result<GraphData, ServerFnError> {
    let Graphs(source) = use_context::<Graphs>()
        .ok_or_else(|| ServerFnError::new("the server placed no graph source in context"))?;
    // Graph computation is CPU-bound; keep it off the async workers.
    tokio::task::spawn_blocking(move || source.graph(prompt_id))
        .await
        .map_err(|e| ServerFnError::new(format!("graph task failed: {e}")))?
        .map_err(|e| ServerFnError::new(e.to_string()))
}

#[cfg(feature = "ssr")]
pub use backend::{GraphSource, GraphSourceError, Graphs};

#[cfg(feature = "ssr")]
mod backend {
    use crate::types::GraphData;
    use std::sync::Arc;

    /// Whatever produces graphs on the server: a placeholder, or the attribution engine.
    pub trait GraphSource: Send + Sync + 'static {
        fn graph(&self, prompt_id: u32) -> Result<GraphData, GraphSourceError>;
    }

    #[derive(Debug, thiserror::Error)]
    pub enum GraphSourceError {
        #[error("no prompt with id {0}")]
        UnknownPrompt(u32),
        #[error("computing the graph of prompt {prompt_id} failed: {message}")]
        Engine { prompt_id: u32, message: String },
    }

    /// The graph source as the server provides it in Leptos context.
    #[derive(Clone)]
    pub struct Graphs(pub Arc<dyn GraphSource>);
}
