//! The original tool's HTTP API, same paths, parameters and JSON shapes, so existing scripts keep
//! working; and the progress stream of graph computations. Every failure is a JSON `{"error": …}`
//! with a 4xx status naming the problem (5xx only for the server's own faults).
//!
//! Differences from the original, all deliberate: `/api/prompt/{id}` graphs the whole prompt (the
//! original clamped it to 6 tokens), `max_mean_ci` filters (the original ignored it), `outputProbs`
//! lists the alive output tokens only (the original listed the whole vocabulary at every position),
//! and responses add `total_edges`/`edge_cap` so a client can tell when the cap cut edges.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use app::api::{ApiError, Explorer};
use app::types::{GraphParams, Normalize, PromptRef, Semantics, TraceTarget};
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::service::Service;

/// The API routes, to be merged into the site's router.
pub fn routes<S>(service: Service) -> Router<S> {
    Router::new()
        .merge(super::circuit_api::routes(service.clone()))
        .route("/api/meta", get(meta))
        .route("/api/activation_contexts", get(activation_contexts))
        .route("/api/activation_contexts/summary", get(contexts_summary))
        .route(
            "/api/activation_contexts/{layer}/{idx}",
            get(context_detail),
        )
        .route("/api/prompts", get(prompts))
        .route("/api/prompt/{id}", get(prompt))
        .route("/api/search", get(search))
        .route("/api/progress/{ticket}", get(progress))
        .route("/api/{*rest}", get(not_found))
        .with_state(service)
}

/// An error response in the original's shape.
pub struct JsonError(ApiError);

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.0.message }))).into_response()
    }
}

impl From<ApiError> for JsonError {
    fn from(e: ApiError) -> Self {
        JsonError(e)
    }
}

type ApiResult = Result<Json<Value>, JsonError>;
type Params = Query<HashMap<String, String>>;

/// Runs blocking service code off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, JsonError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("task failed: {e}"))))
        .map_err(JsonError)
}

async fn not_found() -> JsonError {
    JsonError(ApiError::not_found("no such API endpoint"))
}

async fn meta(State(s): State<Service>) -> ApiResult {
    let m = blocking(move || s.meta()).await?;
    Ok(Json(json!({
        "wandb_path": m.model_path,
        "n_blocks": m.n_blocks,
        "prompt_count": m.prompt_count,
    })))
}

async fn stored_contexts(s: Service) -> Result<serde_json::Map<String, Value>, JsonError> {
    let found = blocking(move || s.data().activation_contexts()).await?;
    match found {
        Some(Value::Object(layers)) => Ok(layers),
        _ => Err(JsonError(ApiError::not_found(
            "No activation contexts found",
        ))),
    }
}

async fn activation_contexts(State(s): State<Service>) -> ApiResult {
    Ok(Json(Value::Object(stored_contexts(s).await?)))
}

async fn contexts_summary(State(s): State<Service>) -> ApiResult {
    let layers = stored_contexts(s).await?;
    let summary: serde_json::Map<String, Value> = layers
        .into_iter()
        .map(|(layer, comps)| {
            let short: Vec<Value> = comps
                .as_array()
                .into_iter()
                .flatten()
                .map(
                    |c| json!({"subcomponent_idx": c["subcomponent_idx"], "mean_ci": c["mean_ci"]}),
                )
                .collect();
            (layer, Value::Array(short))
        })
        .collect();
    Ok(Json(Value::Object(summary)))
}

async fn context_detail(
    State(s): State<Service>,
    Path((layer, idx)): Path<(String, String)>,
) -> ApiResult {
    let idx: u64 = idx.parse().map_err(|_| {
        ApiError::bad_request(format!("component index must be an integer, got {idx:?}"))
    })?;
    let mut layers = stored_contexts(s).await?;
    let comps = layers
        .remove(&layer)
        .ok_or_else(|| ApiError::not_found(format!("Layer '{layer}' not found")))?;
    comps
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["subcomponent_idx"].as_u64() == Some(idx))
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            JsonError(ApiError::not_found(format!(
                "Component {idx} not found in layer '{layer}'"
            )))
        })
}

/// `{id, tokens, preview}` as the original lists prompts.
fn prompt_entry(s: &Service, id: i64, tokens: &[u32]) -> Value {
    let strings: Vec<String> = tokens
        .iter()
        .map(|&t| s.data().run.token_string(t))
        .collect();
    let mut preview: String = strings.iter().take(10).map(String::as_str).collect();
    if strings.len() > 10 {
        preview.push_str("...");
    }
    json!({"id": id, "tokens": strings, "preview": preview})
}

async fn prompts(State(s): State<Service>) -> ApiResult {
    let list = blocking(move || {
        let all = s.data().all_prompts()?;
        Ok(all
            .iter()
            .map(|(id, t)| prompt_entry(&s, *id, t))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(Value::Array(list)))
}

fn number<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name} must be a number, got {v:?}")))
        })
        .transpose()
}

/// The original server's defaults: every component above 1e-6 and outputs above 1%.
fn graph_params(q: &HashMap<String, String>) -> Result<GraphParams, ApiError> {
    let params = GraphParams {
        ci_threshold: number(q, "ci_threshold")?.unwrap_or(1e-6),
        output_prob_threshold: number(q, "output_prob_threshold")?.unwrap_or(0.01),
        normalize: match q.get("normalize") {
            None => Normalize::L1,
            Some(v) => Normalize::from_name(&v.to_ascii_lowercase()).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "normalize must be true, false, none, l1, l2-target or l2-layer, got {v:?}"
                ))
            })?,
        },
        semantics: match q.get("semantics") {
            None => Semantics::Seed,
            Some(v) => Semantics::from_name(v).ok_or_else(|| {
                ApiError::bad_request(format!("semantics must be seed or app, got {v:?}"))
            })?,
        },
        max_mean_ci: number(q, "max_mean_ci")?.unwrap_or(1.0),
        trace: match q.get("trace") {
            None => None,
            Some(v) => Some(TraceTarget::from_url(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "trace must be last, POS:TOKEN or POS:A-B, got {v:?}"
                ))
            })?),
        },
    };
    params.check().map_err(ApiError::bad_request)?;
    Ok(params)
}

/// A prompt's graph in the original's JSON; the `x-graph-cache` header says whether it was
/// `computed`, or came from this process's cache (`memory`) or the sidecar's (`disk`).
async fn prompt(
    State(s): State<Service>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<([(&'static str, &'static str); 1], Json<Value>), JsonError> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("prompt id must be an integer, got {id:?}")))?;
    let params = graph_params(&q)?;
    let (graph, source) = s.graph_from(PromptRef::Stored(id), params, None).await?;
    let edges: Vec<Value> = graph
        .edges
        .iter()
        .map(|e| json!({"src": e.src, "tgt": e.tgt, "val": e.val}))
        .collect();
    let output_probs: serde_json::Map<String, Value> = graph
        .outputs
        .iter()
        .map(|o| {
            let key = o.key.strip_prefix("output:").unwrap_or(&o.key).to_owned();
            let prob = (f64::from(o.prob) * 1e6).round() / 1e6;
            (key, json!({"prob": prob, "token": o.token}))
        })
        .collect();
    let mut body = json!({
        "id": id,
        "tokens": graph.tokens,
        "edges": edges,
        "outputProbs": output_probs,
        "total_edges": graph.total_edges,
        "edge_cap": graph.edge_cap,
        "semantics": graph.params.semantics.name(),
        "normalize": graph.params.normalize.name(),
    });
    // A traced graph's edges are the highest-scoring; each node's influence and each edge's score
    // come beside them.
    if let (Some(t), Some(target)) = (&graph.trace, graph.params.trace) {
        let influence: serde_json::Map<String, Value> = graph
            .nodes
            .iter()
            .zip(&t.influence)
            .filter(|(_, v)| **v > 0.0)
            .map(|(n, v)| (n.key.clone(), json!(v)))
            .collect();
        body["trace"] = json!({
            "target": target.to_url(),
            "targets": t.targets,
            "influence": influence,
            "edge_scores": t.edge_scores,
            "total_influence": t.total_influence,
            "total_edge_score": t.total_edge_score,
        });
    }
    Ok(([("x-graph-cache", source.name())], Json(body)))
}

async fn search(State(s): State<Service>, Query(q): Params) -> ApiResult {
    let components: Vec<String> = q
        .get("components")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    let mode = q.get("mode").map_or("all", String::as_str).to_owned();
    let all = match mode.as_str() {
        "all" => true,
        "any" => false,
        other => {
            return Err(JsonError(ApiError::bad_request(format!(
                "mode must be all or any, got {other:?}"
            ))));
        }
    };
    let limit = number(&q, "limit")?.unwrap_or(super::service::MAX_PAGE);
    let (total, results) = {
        let components = components.clone();
        blocking(move || {
            let found = s.data().search_hits(&components, all, limit)?;
            let results: Vec<Value> = found
                .hits
                .iter()
                .map(|h| {
                    let mut entry = prompt_entry(&s, h.prompt_id, &h.token_ids);
                    entry["score"] = json!(h.score);
                    entry["matches"] = json!(
                        h.matches
                            .iter()
                            .map(|m| json!({"key": m.key, "max_ci": m.max_ci, "positions": m.positions}))
                            .collect::<Vec<_>>()
                    );
                    entry
                })
                .collect();
            Ok((found.total, results))
        })
        .await?
    };
    Ok(Json(json!({
        "query": {"components": components, "mode": mode},
        "count": total,
        "results": results,
    })))
}

/// Server-sent events with the status of the graph computation started with `ticket`, until it
/// ends. The page opens this alongside its graph request, so it may arrive first: it waits a little
/// for the ticket to appear.
async fn progress(State(s): State<Service>, Path(ticket): Path<String>) -> Response {
    let Ok(ticket) = ticket.parse::<u64>() else {
        return JsonError(ApiError::bad_request("ticket must be an integer")).into_response();
    };
    let mut rx = None;
    for _ in 0..100 {
        if let Some(r) = s.progress(ticket) {
            rx = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let Some(rx) = rx else {
        return JsonError(ApiError::not_found(format!(
            "no graph computation with ticket {ticket}"
        )))
        .into_response();
    };
    let stream =
        futures_util::stream::unfold((rx, true, false), |(mut rx, first, finished)| async move {
            if finished || (!first && rx.changed().await.is_err()) {
                return None;
            }
            let (status, outcome) = rx.borrow_and_update().clone();
            let event = Event::default()
                .json_data(&status)
                .unwrap_or_else(|_| Event::default().data("{}"));
            Some((Ok::<_, Infallible>(event), (rx, false, outcome.is_some())))
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
