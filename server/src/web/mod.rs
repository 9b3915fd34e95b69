//! Serving: the axum router around the Leptos app, and the graph sources behind its server functions.

pub mod engine;
pub mod placeholder;
pub mod routes;
pub mod state;

pub use routes::{router, serve};
pub use state::{AppState, GraphBackend};
