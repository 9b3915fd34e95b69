//! The axum router: Leptos pages and server functions, the original tool's HTTP API, static files,
//! gzip.

use super::state::AppState;
use app::{App, shell};
use axum::Router;
use leptos::prelude::provide_context;
use leptos_axum::{LeptosRoutes, file_and_error_handler, generate_route_list};
use std::net::SocketAddr;
use tower_http::compression::CompressionLayer;

/// The whole site. Server functions find the explorer service in Leptos context.
pub fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    let explorer = state.explorer();
    Router::new()
        .merge(super::http_api::routes(state.service.clone()))
        .leptos_routes_with_context(&state, routes, move || provide_context(explorer.clone()), {
            let options = state.leptos_options.clone();
            move || shell(options.clone())
        })
        // Everything else is a file under the site root (wasm, js, css), or a 404 page.
        .fallback(file_and_error_handler::<AppState, _>(shell))
        .layer(CompressionLayer::new())
        .with_state(state)
}

/// Serves the site on `addr` until Ctrl-C.
pub async fn serve(addr: SocketAddr, state: AppState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

// Tested through the whole site in `server/tests/web_api.rs`.
