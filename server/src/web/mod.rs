//! Serving: the axum router around the Leptos app, the original tool's HTTP API, and the explorer
//! service behind both.

pub mod circuit_api;
pub mod history;
pub mod http_api;
pub mod jobs;
pub mod routes;
pub mod run;
pub mod service;
pub mod state;

pub use routes::{router, serve};
pub use run::Run;
pub use service::{Prompts, Service};
pub use state::AppState;
