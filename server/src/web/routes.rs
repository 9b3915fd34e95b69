//! The axum router: Leptos pages and server functions, static files, gzip.

use super::state::AppState;
use app::{App, shell};
use axum::Router;
use leptos::prelude::provide_context;
use leptos_axum::{LeptosRoutes, file_and_error_handler, generate_route_list};
use std::net::SocketAddr;
use tower_http::compression::CompressionLayer;

/// The whole site. Server functions find the graph source in Leptos context.
pub fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    let graphs = state.graphs.clone();
    Router::new()
        .leptos_routes_with_context(&state, routes, move || provide_context(graphs.clone()), {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::GraphBackend;
    use app::api::GetGraph;
    use app::types::GraphData;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use http_body_util::BodyExt;
    use leptos::config::LeptosOptions;
    use leptos::server_fn::ServerFn;
    use tower::ServiceExt;

    fn app() -> Router {
        let options = LeptosOptions::builder().output_name("spd-explorer").build();
        router(AppState::new(options, GraphBackend::Placeholder))
    }

    async fn body_text(res: axum::response::Response) -> String {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn index_renders_the_canvas_and_status() {
        let res = app()
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let html = body_text(res).await;
        assert!(html.contains("<canvas"), "{html}");
        assert!(html.contains("Prompt 0: 8 tokens"), "{html}");
        assert!(html.contains("/pkg/spd-explorer.js"), "{html}");
    }

    #[tokio::test]
    async fn get_graph_answers_with_the_placeholder() {
        let req = Request::post(GetGraph::PATH)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("prompt_id=2"))
            .unwrap();
        let res = app().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let graph: GraphData = serde_json::from_str(&body_text(res).await).unwrap();
        assert_eq!(graph, crate::web::placeholder::graph(2).unwrap());
    }

    #[tokio::test]
    async fn get_graph_reports_unknown_prompts() {
        let req = Request::post(GetGraph::PATH)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("prompt_id=99"))
            .unwrap();
        let res = app().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body_text(res).await.contains("no prompt with id 99"));
    }

    #[tokio::test]
    async fn responses_are_gzipped_when_asked() {
        let req = Request::get("/")
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(Body::empty())
            .unwrap();
        let res = app().oneshot(req).await.unwrap();
        assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
    }
}
