//! The server's two front doors over a real run and database: the page's server functions and the
//! original tool's HTTP API, with every bad input answered by a 4xx and a JSON error.

mod generate_support;

use std::sync::OnceLock;

use app::api::{GetComponent as ComponentInfoFn, GetGraph, GetMeta, ListPrompts, SearchComponents};
use app::types::{
    ComponentInfo, GraphData, GraphParams, Meta, PromptPage, PromptRef, SearchResults,
};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use generate_support as gs;
use http_body_util::BodyExt;
use leptos::config::LeptosOptions;
use leptos::server_fn::ServerFn;
use serde_json::{Value, json};
use server::web::{AppState, Prompts, Run, Service, router};
use tower::ServiceExt;

/// The fixture run with a tokenizer next to it, and a database of 60 small documents.
struct Site {
    _dir: tempfile::TempDir,
    service: Service,
}

fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    SITE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        gs::common::copy_tree(&gs::fixture_dir("tiny_shared"), &run_dir);
        let tok = gs::write_tokenizer(&run_dir);
        let corpus = dir.path().join("corpus.jsonl");
        gs::write_jsonl(&corpus, &gs::documents(60, 7), "story");
        let db = dir.path().join("index.db");
        let mut cfg = gs::config(&run_dir, &db, gs::corpus_input(&corpus, &tok));
        cfg.thresholds.ci = 0.1;
        server::generate::run(&cfg).unwrap();
        let run = Run::load(&run_dir, &candle_core::Device::Cpu).unwrap();
        let service = Service::new(run, Prompts::open_db(&db).unwrap());
        Site { _dir: dir, service }
    })
}

fn app() -> Router {
    let options = LeptosOptions::builder().output_name("spd-explorer").build();
    router(AppState::new(options, site().service.clone()))
}

async fn send(req: Request<Body>) -> (StatusCode, String) {
    let res = app().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn get(path: &str) -> (StatusCode, Value) {
    let (status, body) = send(Request::get(path).body(Body::empty()).unwrap()).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
    (status, json)
}

/// Calls a server function with JSON arguments.
async fn call(path: &str, args: Value) -> (StatusCode, String) {
    let req = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Body::from(args.to_string()))
        .unwrap();
    send(req).await
}

async fn call_ok<T: serde::de::DeserializeOwned>(path: &str, args: Value) -> T {
    let (status, body) = call(path, args).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// A component alive in prompt 1 (a c_fc one), as `layer:c`.
async fn some_component() -> String {
    let (_, p) = get("/api/prompt/1?ci_threshold=0.1").await;
    let edge = p["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["tgt"].as_str().unwrap().contains("mlp.c_fc"))
        .expect("an edge into c_fc")
        .clone();
    let tgt = edge["tgt"].as_str().unwrap();
    let mut parts = tgt.rsplitn(3, ':');
    let c = parts.next().unwrap();
    let _seq = parts.next().unwrap();
    format!("{}:{c}", parts.next().unwrap())
}

#[tokio::test]
async fn index_page_renders_the_app_shell() {
    let (status, html) = send(Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("<canvas"), "{html}");
    assert!(html.contains("/pkg/spd-explorer.js"), "{html}");
}

#[tokio::test]
async fn responses_are_gzipped_when_asked() {
    let req = Request::get("/api/meta")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Body::empty())
        .unwrap();
    let res = app().oneshot(req).await.unwrap();
    assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
}

#[tokio::test]
async fn original_meta_prompts_and_prompt_shapes() {
    let (status, meta) = get("/api/meta").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(meta["n_blocks"], 2);
    let count = meta["prompt_count"].as_u64().unwrap();
    assert!(count > 10, "{meta}");
    assert!(meta["wandb_path"].as_str().unwrap().ends_with("run"));

    let (status, prompts) = get("/api/prompts").await;
    assert_eq!(status, StatusCode::OK);
    let prompts = prompts.as_array().unwrap();
    assert_eq!(prompts.len() as u64, count);
    assert_eq!(prompts[0]["id"], 1);
    assert_eq!(prompts[0]["tokens"].as_array().unwrap().len(), 16);
    assert!(prompts[0]["preview"].as_str().unwrap().ends_with("..."));

    let (status, p) = get("/api/prompt/1").await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["id"], 1);
    assert_eq!(p["tokens"], prompts[0]["tokens"]);
    let edges = p["edges"].as_array().unwrap();
    assert!(!edges.is_empty());
    for e in edges.iter().take(20) {
        assert!(e["src"].is_string() && e["tgt"].is_string() && e["val"].is_number());
    }
    // Normalized by default: incoming |values| of a node sum to 1.
    let tgt = edges[0]["tgt"].as_str().unwrap();
    let sum: f64 = edges
        .iter()
        .filter(|e| e["tgt"] == tgt)
        .map(|e| e["val"].as_f64().unwrap().abs())
        .sum();
    assert!((sum - 1.0).abs() < 1e-3, "{sum}");
    for (key, out) in p["outputProbs"].as_object().unwrap() {
        assert!(key.split(':').count() == 2, "{key}");
        assert!(out["prob"].as_f64().unwrap() >= 0.01 && out["token"].is_string());
    }
}

#[tokio::test]
async fn original_search_and_activation_contexts() {
    let key = some_component().await;
    let (status, found) = get(&format!("/api/search?components={key},wte:0&mode=all")).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["query"]["mode"], "all");
    assert_eq!(found["query"]["components"], json!([key.clone(), "wte:0"]));
    let count = found["count"].as_u64().unwrap();
    assert!(count >= 1);
    let ids: Vec<u64> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&1), "{found}");
    let (_, any) = get(&format!("/api/search?components={key}&mode=any")).await;
    assert_eq!(any["count"].as_u64().unwrap(), count);

    let (status, all) = get("/api/activation_contexts").await;
    assert_eq!(status, StatusCode::OK);
    let (layer, c) = key.rsplit_once(':').unwrap();
    assert!(all[layer].is_array());
    let (status, summary) = get("/api/activation_contexts/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert!(summary[layer][0]["mean_ci"].is_number());
    let (status, detail) = get(&format!("/api/activation_contexts/{layer}/{c}")).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["subcomponent_idx"].as_u64().unwrap().to_string(), c);
}

#[tokio::test]
async fn every_bad_input_is_a_4xx_with_a_json_error() {
    let cases = [
        ("/api/prompt/999999", StatusCode::NOT_FOUND, "not found"),
        ("/api/prompt/abc", StatusCode::BAD_REQUEST, "integer"),
        (
            "/api/prompt/1?ci_threshold=-1",
            StatusCode::BAD_REQUEST,
            "ci_threshold",
        ),
        (
            "/api/prompt/1?ci_threshold=x",
            StatusCode::BAD_REQUEST,
            "ci_threshold",
        ),
        (
            "/api/prompt/1?output_prob_threshold=1.5",
            StatusCode::BAD_REQUEST,
            "output_prob_threshold",
        ),
        (
            "/api/prompt/1?max_mean_ci=2",
            StatusCode::BAD_REQUEST,
            "max_mean_ci",
        ),
        (
            "/api/prompt/1?normalize=maybe",
            StatusCode::BAD_REQUEST,
            "normalize",
        ),
        (
            "/api/prompt/1?semantics=mine",
            StatusCode::BAD_REQUEST,
            "semantics must be seed or app",
        ),
        (
            "/api/search?components=",
            StatusCode::BAD_REQUEST,
            "No components",
        ),
        (
            "/api/search?components=wte:0&mode=some",
            StatusCode::BAD_REQUEST,
            "mode",
        ),
        (
            "/api/search?components=h.9.mlp.c_fc:1",
            StatusCode::BAD_REQUEST,
            "unknown component",
        ),
        (
            "/api/search?components=h.0.mlp.c_fc:999",
            StatusCode::BAD_REQUEST,
            "unknown component",
        ),
        (
            "/api/search?components=nonsense",
            StatusCode::BAD_REQUEST,
            "unknown component",
        ),
        (
            "/api/activation_contexts/h.0.mlp.c_fc/x",
            StatusCode::BAD_REQUEST,
            "integer",
        ),
        (
            "/api/activation_contexts/h.7.mlp.c_fc/1",
            StatusCode::NOT_FOUND,
            "not found",
        ),
        ("/api/progress/x", StatusCode::BAD_REQUEST, "ticket"),
        ("/api/nope", StatusCode::NOT_FOUND, "no such"),
    ];
    for (path, status, words) in cases {
        let (got, body) = get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: {body}"));
        assert!(
            msg.to_lowercase().contains(&words.to_lowercase()),
            "{path}: {msg}"
        );
    }
}

#[tokio::test]
async fn server_functions_answer_the_page() {
    let meta: Meta = call_ok(GetMeta::PATH, json!({})).await;
    assert_eq!(meta.n_blocks, 2);
    assert!(meta.has_contexts && meta.can_tokenize);
    assert!(meta.db_bytes > 0);

    let page: PromptPage = call_ok(
        ListPrompts::PATH,
        json!({"query": "", "after": null, "limit": 5}),
    )
    .await;
    assert_eq!(page.prompts.len(), 5);
    assert_eq!(page.next_after, Some(5));
    let next: PromptPage = call_ok(
        ListPrompts::PATH,
        json!({"query": "", "after": 5, "limit": 5}),
    )
    .await;
    assert_eq!(next.prompts[0].id, 6);
    // Text search over decoded prompts.
    let word = page.prompts[2].text.split(' ').nth(3).unwrap().to_owned();
    let found: PromptPage = call_ok(
        ListPrompts::PATH,
        json!({"query": word.to_uppercase(), "after": null, "limit": 100}),
    )
    .await;
    assert!(found.prompts.iter().any(|p| p.id == 3));
    assert!(found.prompts.iter().all(|p| p.text.contains(&word)));

    let graph: GraphData = call_ok(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Stored(2), "params": GraphParams::default(), "ticket": 77}),
    )
    .await;
    assert_eq!(graph.prompt_id, Some(2));
    assert_eq!(graph.tokens.len(), 16);
    assert!(!graph.nodes.is_empty() && !graph.edges.is_empty());

    let typed: GraphData = call_ok(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Text("w5 w6 w7 w5".into()), "params": GraphParams::default(), "ticket": null}),
    )
    .await;
    assert_eq!(typed.prompt_id, None);
    assert_eq!(typed.tokens, vec!["w5", "w6", "w7", "w5"]);

    let key = some_component().await;
    let info: ComponentInfo = call_ok(ComponentInfoFn::PATH, json!({"key": key})).await;
    assert!(info.n_prompts >= 1);
    assert!(info.mean_ci.unwrap() > 0.0 && info.density.unwrap() > 0.0);
    assert!(!info.examples.is_empty());
    let ex = &info.examples[0];
    assert_eq!(ex.tokens.len(), ex.ci.len());
    assert!(ex.ci[ex.active] >= 0.1);

    let hits: SearchResults = call_ok(
        SearchComponents::PATH,
        json!({"keys": [key], "all": true, "limit": 10}),
    )
    .await;
    assert!(hits.total >= 1);
    assert!(hits.hits.iter().any(|h| h.prompt.id == 1));
    assert!(!hits.hits[0].matches[0].positions.is_empty());
}

#[tokio::test]
async fn server_functions_refuse_bad_input_with_4xx() {
    let bad_graphs = [
        (
            json!(PromptRef::Stored(123456)),
            GraphParams::default(),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            json!(PromptRef::Text("   ".into())),
            GraphParams::default(),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            json!(PromptRef::Text(vec!["w5"; 600].join(" "))),
            GraphParams::default(),
            StatusCode::BAD_REQUEST,
            "at most",
        ),
        (
            json!(PromptRef::Stored(1)),
            GraphParams {
                ci_threshold: -0.5,
                ..GraphParams::default()
            },
            StatusCode::BAD_REQUEST,
            "ci_threshold",
        ),
    ];
    for (prompt, params, status, words) in bad_graphs {
        let (got, body) = call(
            GetGraph::PATH,
            json!({"prompt": prompt, "params": params, "ticket": null}),
        )
        .await;
        assert_eq!(got, status, "{prompt}: {body}");
        assert!(body.to_lowercase().contains(words), "{prompt}: {body}");
    }
    let (got, body) = call(
        SearchComponents::PATH,
        json!({"keys": ["h.0.attn.q_proj:99"], "all": true, "limit": 10}),
    )
    .await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{body}");
    let (got, _) = call(ComponentInfoFn::PATH, json!({"key": "output:-1"})).await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    let (got, _) = call(
        ListPrompts::PATH,
        json!({"query": "", "after": null, "limit": 0}),
    )
    .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn progress_streams_until_the_graph_is_done() {
    let ticket = 4242u64;
    let graph = call(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Stored(3), "params": GraphParams::default(), "ticket": ticket}),
    );
    let stream = async {
        let req = Request::get(format!("/api/progress/{ticket}"))
            .body(Body::empty())
            .unwrap();
        let res = app().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    };
    let ((g_status, _), (status, events)) = tokio::join!(graph, stream);
    assert_eq!(g_status, StatusCode::OK);
    assert_eq!(status, StatusCode::OK);
    assert!(events.contains(r#""state":"done""#), "{events}");
}

#[test]
fn a_database_of_another_model_is_refused_with_a_clear_message() {
    let site = site();
    let Prompts::Db { path, .. } = &site.service.data().prompts else {
        panic!("the test site has a database")
    };
    assert_eq!(site.service.check_database(), Ok(()));
    // tiny_mlp has one block; the database was indexed with the two-block tiny_shared.
    let run = Run::load(&gs::fixture_dir("tiny_mlp"), &candle_core::Device::Cpu).unwrap();
    let other = Service::new(run, Prompts::open_db(path).unwrap());
    let err = other.check_database().unwrap_err();
    assert!(err.contains("was not made for the model"), "{err}");
    assert!(err.contains("2 blocks, the model has 1"), "{err}");
}

/// A run of today's spd (LlamaSimple, SwiGLU, a global CI network, a C per module) serves graphs
/// with gate/up nodes, names its family and CI network, and checks component keys against each
/// module's own C.
#[tokio::test]
async fn a_llama_glu_run_with_global_ci_serves_graphs() {
    use app::api::Explorer;
    let dir = gs::fixture_dir("v2/llama_glu_global");
    let run = Run::load(&dir, &candle_core::Device::Cpu).unwrap();
    let service = Service::new(run, Prompts::read_list(&dir.join("prompts.json")).unwrap());
    let meta = service.meta().unwrap();
    assert_eq!(
        (meta.family.as_str(), meta.ci_kind.as_str(), meta.n_blocks),
        ("LlamaSimple", "global_shared_mlp", 2)
    );
    let graph = service
        .graph(PromptRef::Stored(1), GraphParams::default(), None)
        .await
        .unwrap();
    assert_eq!(graph.tokens.len(), 11);
    let layers: std::collections::BTreeSet<&str> = graph
        .nodes
        .iter()
        .map(|n| n.key.rsplitn(3, ':').nth(2).unwrap())
        .collect();
    for layer in [
        "wte",
        "h.0.mlp.gate_proj",
        "h.1.mlp.up_proj",
        "h.1.mlp.down_proj",
        "output",
    ] {
        assert!(layers.contains(layer), "{layer} in {layers:?}");
    }
    assert!(!graph.edges.is_empty());
    // k_proj has C = 6, up_proj C = 14.
    assert!(service.data().check_component("h.0.attn.k_proj:5").is_ok());
    assert!(service.data().check_component("h.0.attn.k_proj:6").is_err());
    assert!(service.data().check_component("h.0.mlp.up_proj:13").is_ok());
}

/// The original API with SPD's app's semantics and an L2 normalisation: every target's incoming
/// edges have unit norm, and the values differ from the seed's.
#[tokio::test]
async fn the_http_api_serves_app_semantics() {
    let (status, app) =
        get("/api/prompt/1?ci_threshold=0.1&semantics=app&normalize=l2-target").await;
    assert_eq!(status, StatusCode::OK, "{app}");
    assert_eq!(
        (app["semantics"].as_str(), app["normalize"].as_str()),
        (Some("app"), Some("l2-target"))
    );
    let (_, seed) = get("/api/prompt/1?ci_threshold=0.1").await;
    let edges = |v: &Value| -> std::collections::HashMap<(String, String), f64> {
        v["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    (
                        e["src"].as_str().unwrap().to_owned(),
                        e["tgt"].as_str().unwrap().to_owned(),
                    ),
                    e["val"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, s) = (edges(&app), edges(&seed));
    assert!(!a.is_empty());
    let mut norms: std::collections::HashMap<&str, f64> = Default::default();
    for ((_, tgt), v) in &a {
        *norms.entry(tgt).or_default() += v * v;
    }
    assert!(norms.values().all(|n| (n - 1.0).abs() < 1e-3), "{norms:?}");
    assert!(
        a.iter()
            .any(|(k, v)| s.get(k).is_some_and(|w| (v - w).abs() > 1e-3))
    );
}

async fn post_json(path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = call(path, body).await;
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
    (status, json)
}

#[tokio::test]
async fn interventions_over_http() {
    let (status, doc) = post_json(
        "/api/intervention",
        json!({"prompt_id": 1, "nodes": ["h.0.mlp.c_fc:0:1", "h.1.attn.o_proj:2"], "top_k": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["mode"], "keep");
    let rows = doc["predictions_per_position"].as_array().unwrap();
    assert_eq!(rows.len(), doc["tokens"].as_array().unwrap().len());
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 5));
    assert_eq!(rows[0][0].as_array().unwrap().len(), 6);
    assert_eq!(doc["kl_per_position"].as_array().unwrap().len(), rows.len());

    let tokens = doc["tokens"].clone();
    let first = tokens[0].as_u64().unwrap();
    let (status, forked) = post_json(
        "/api/intervention",
        json!({"tokens": tokens, "nodes": ["h.0.mlp.c_fc:0:1"], "mode": "scale", "factor": 3.0,
               "token_replacements": [[0, (first + 1) % 50]]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{forked}");
    assert_eq!(forked["tokens"][0], (first + 1) % 50);
    assert_eq!(forked["factor"], 3.0);

    for (body, msg) in [
        (
            json!({"prompt_id": 1, "nodes": ["h.0.mlp.c_fc:0:999"]}),
            "components",
        ),
        (
            json!({"prompt_id": 1, "nodes": ["h.9.mlp.c_fc:0:1"]}),
            "not a decomposed module",
        ),
        (
            json!({"prompt_id": 1, "nodes": ["h.0.mlp.c_fc:999:1"]}),
            "out of range",
        ),
        (
            json!({"prompt_id": 1, "text": "a", "nodes": []}),
            "exactly one",
        ),
        (json!({"prompt_id": 1, "nodes": [], "top_k": 0}), "top_k"),
        (
            json!({"prompt_id": 1, "nodes": [], "mode": "scale"}),
            "factor",
        ),
        (
            json!({"prompt_id": 1, "nodes": [], "colour": "red"}),
            "unknown field",
        ),
        (json!({"prompt_id": 99999, "nodes": []}), "not found"),
        (json!({"tokens": [1, 999999], "nodes": []}), "vocabulary"),
        (
            json!({"prompt_id": 1, "nodes": [], "token_replacements": [[0, 999999]]}),
            "vocabulary",
        ),
    ] {
        let (status, err) = post_json("/api/intervention", body.clone()).await;
        assert!(status.is_client_error(), "{body}: {status} {err}");
        assert!(
            err["error"].as_str().unwrap().contains(msg),
            "{body}: {err}"
        );
    }
}

#[tokio::test]
async fn optimized_graphs_stream_progress_then_the_graph() {
    let path = "/api/graphs/optimized?prompt_id=1&loss_type=ce&label_token=3&loss_position=2\
                &steps=6&imp_min_coeff=1e-3&pnorm=0.3&normalize=l2-target";
    let (status, body) = send(Request::post(path).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let messages: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let steps: Vec<u64> = messages
        .iter()
        .filter(|m| m["type"] == "progress" && m["stage"] == "optimizing")
        .map(|m| m["current"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..6).collect::<Vec<_>>());
    let done = messages.last().unwrap();
    assert_eq!(done["type"], "complete", "{done}");
    let data = &done["data"];
    assert_eq!(data["graphType"], "optimized");
    assert_eq!(data["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(data["params"]["semantics"], "app");
    let opt = &data["optimization"];
    assert_eq!(opt["loss"]["label_token"], 3);
    let p = opt["metrics"]["ci_masked_label_prob"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert!(!data["edges"].as_array().unwrap().is_empty());

    for (query, msg) in [
        (
            "loss_type=ce&loss_position=2&steps=5&imp_min_coeff=1e-3&pnorm=0.3",
            "label_token",
        ),
        (
            "loss_type=ce&label_token=3&loss_position=2&steps=0&imp_min_coeff=1e-3&pnorm=0.3",
            "steps",
        ),
        (
            "loss_type=ce&label_token=999999&loss_position=2&steps=5&imp_min_coeff=1e-3&pnorm=0.3",
            "vocabulary",
        ),
        (
            "loss_type=ce&label_token=3&loss_position=999&steps=5&imp_min_coeff=1e-3&pnorm=0.3",
            "out of range",
        ),
        (
            "loss_type=ce&label_token=3&loss_position=2&steps=5&imp_min_coeff=inf&pnorm=0.3",
            "imp_min_coeff",
        ),
        (
            "loss_type=mse&loss_position=2&steps=5&imp_min_coeff=1e-3&pnorm=0.3",
            "loss_type",
        ),
    ] {
        let path = format!("/api/graphs/optimized?prompt_id=1&{query}");
        let (status, body) = send(Request::post(path.as_str()).body(Body::empty()).unwrap()).await;
        assert!(status.is_client_error(), "{query}: {status} {body}");
        assert!(body.contains(msg), "{query}: {body}");
    }
}

/// The page's intervention server functions: a run is kept in the notes file beside the database
/// (never in the database), listed per prompt, deleted; the vocabulary search finds tokens.
#[tokio::test]
async fn intervention_runs_are_kept_beside_the_database() {
    use app::api::{DeleteIntervention, ListInterventions, RunIntervention, SearchVocab};
    use app::types::{InterventionMode, InterventionParams, InterventionRun, VocabEntry};
    let prompt = PromptRef::Stored(4);
    let before: Vec<InterventionRun> =
        call_ok(ListInterventions::PATH, json!({"prompt": prompt})).await;
    let params = InterventionParams {
        prompt: prompt.clone(),
        nodes: vec!["h.0.mlp.c_fc:1:2".into(), "h.1.attn.v_proj:0".into()],
        mode: InterventionMode::Ablate,
        factor: 1.0,
        top_k: 3,
        replacements: vec![(0, 5)],
        semantics: app::types::Semantics::Seed,
    };
    let run: InterventionRun = call_ok(RunIntervention::PATH, json!({"params": params})).await;
    let id = run.id.expect("kept");
    assert_eq!(run.params, params);
    assert_eq!(run.rows[0].len(), 3);
    assert_eq!(run.rows.len(), run.tokens.len());
    assert_eq!(run.target_top.len(), run.tokens.len());
    let after: Vec<InterventionRun> =
        call_ok(ListInterventions::PATH, json!({"prompt": prompt})).await;
    assert_eq!(after.len(), before.len() + 1);
    assert_eq!(after.last().unwrap(), &run);
    // Other prompts do not see it.
    let other: Vec<InterventionRun> = call_ok(
        ListInterventions::PATH,
        json!({"prompt": PromptRef::Stored(5)}),
    )
    .await;
    assert!(other.iter().all(|r| r.id != Some(id)));
    // The notes file sits beside the database.
    let Prompts::Db { path, .. } = &site().service.data().prompts else {
        panic!("a database")
    };
    assert!(server::store::notes::sidecar_path(path).exists());

    let () = call_ok(DeleteIntervention::PATH, json!({"id": id})).await;
    let (status, _) = call(DeleteIntervention::PATH, json!({"id": id})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let bad = InterventionParams {
        nodes: vec!["h.0.mlp.c_fc:99:0".into()],
        ..params
    };
    let (status, body) = call(RunIntervention::PATH, json!({"params": bad})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("out of range"), "{body}");

    let tokens = &run.tokens;
    let word = tokens
        .iter()
        .find(|t| t.trim().len() > 2)
        .unwrap()
        .trim()
        .to_owned();
    let hits: Vec<VocabEntry> = call_ok(
        SearchVocab::PATH,
        json!({"query": word.to_uppercase(), "limit": 10}),
    )
    .await;
    assert!(
        hits.iter().any(|h| h.token.trim() == word),
        "{word}: {hits:?}"
    );
    let by_id: Vec<VocabEntry> =
        call_ok(SearchVocab::PATH, json!({"query": "#3", "limit": 10})).await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].id, 3);
}

/// The page's optimised graph: CI optimised for a label, its graph over the tokens up to the
/// position, the metrics beside it; bad optimisations are 400s.
#[tokio::test]
async fn optimized_graphs_for_the_page() {
    use app::api::GetOptimizedGraph;
    use app::types::OptimizeSpec;
    let spec = OptimizeSpec {
        label: 3,
        position: 2,
        steps: 8,
        ..OptimizeSpec::default()
    };
    let params = GraphParams {
        ci_threshold: 0.0,
        ..GraphParams::default()
    };
    let g: GraphData = call_ok(
        GetOptimizedGraph::PATH,
        json!({"prompt": PromptRef::Stored(2), "params": params, "spec": spec, "ticket": null}),
    )
    .await;
    assert_eq!(g.tokens.len(), 3);
    let info = g.optimization.expect("an optimised graph says so");
    assert_eq!(info.spec, spec);
    assert!(info.l0_total <= info.l0_before, "{info:?}");
    assert!((0.0..=1.0).contains(&info.ci_masked_label_prob.unwrap()));
    let standard: GraphData = call_ok(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Stored(2), "params": params, "ticket": null}),
    )
    .await;
    assert!(standard.optimization.is_none());
    for bad in [
        OptimizeSpec { steps: 0, ..spec },
        OptimizeSpec {
            position: 999,
            ..spec
        },
        OptimizeSpec {
            label: 999_999,
            ..spec
        },
        OptimizeSpec {
            imp_min_coeff: -1.0,
            ..spec
        },
    ] {
        let (status, body) = call(
            GetOptimizedGraph::PATH,
            json!({"prompt": PromptRef::Stored(2), "params": params, "spec": bad, "ticket": null}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
    }
}

/// A traced graph over both doors: the edges are the highest-scoring, every node has an influence,
/// the app's page prunes them; bad targets are 4xx.
#[tokio::test]
async fn traced_graphs_carry_influence_and_refuse_bad_targets() {
    let (status, v) = get("/api/prompt/1?ci_threshold=0.1&trace=last").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let t = &v["trace"];
    assert_eq!(t["target"], "last");
    let scores: Vec<f64> = t["edge_scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), v["edges"].as_array().unwrap().len());
    assert!(!scores.is_empty() && scores.windows(2).all(|w| w[0] >= w[1]));
    let targets = t["targets"].as_array().unwrap();
    assert!(!targets.is_empty());
    let last = v["tokens"].as_array().unwrap().len() - 1;
    for k in targets {
        assert!(k.as_str().unwrap().starts_with(&format!("output:{last}:")));
    }
    // The wte nodes carry every path's influence at the bottom: together, all of it.
    let wte: f64 = t["influence"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("wte:"))
        .map(|(_, v)| v.as_f64().unwrap())
        .sum();
    assert!((wte - 1.0).abs() < 1e-3, "wte carries {wte}");

    // The page's server function: the same graph, pruned by the page's function.
    let params = GraphParams {
        ci_threshold: 0.1,
        trace: Some(app::types::TraceTarget::Last),
        ..GraphParams::default()
    };
    let g: GraphData = call_ok(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Stored(1), "params": params, "ticket": null}),
    )
    .await;
    let trace = g.trace.as_ref().unwrap();
    assert_eq!(trace.influence.len(), g.nodes.len());
    let full = app::trace::prune(&g, 1.0, 1.0).unwrap();
    let small = app::trace::prune(&g, 0.5, 0.5).unwrap();
    assert!(small.nodes.len() < full.nodes.len());
    assert!(small.completeness < full.completeness);
    if g.edges.len() < g.edge_cap {
        assert!(
            (full.completeness - 1.0).abs() < 1e-4,
            "{}",
            full.completeness
        );
    }

    // One output below the threshold becomes a node; a difference of two.
    let (status, v) = get(&format!("/api/prompt/1?ci_threshold=0.1&trace={last}:3")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["trace"]["targets"], json!([format!("output:{last}:3")]));
    let (status, v) = get(&format!("/api/prompt/1?ci_threshold=0.1&trace={last}:3-5")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["trace"]["targets"].as_array().unwrap().len(), 2);

    for (bad, why) in [
        ("x", "trace must be"),
        ("99:1", "outside the prompt"),
        ("0:999999", "out of the vocabulary"),
        ("0:4-4", "two different tokens"),
    ] {
        let (status, v) = get(&format!("/api/prompt/1?trace={bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{bad}: {v}");
    }
}

/// Labels: kept in the notes file beside the database (so a new server on it finds them), refused
/// for unknown components and overlong text.
#[tokio::test]
async fn component_labels_persist_in_the_notes_file() {
    use app::api::{GetLabels, SetLabel};
    let key = some_component().await;
    let (status, body) = call(SetLabel::PATH, json!({"key": key, "label": "  names  "})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let labels: Vec<(String, String)> = call_ok(GetLabels::PATH, json!({})).await;
    assert!(
        labels.contains(&(key.clone(), "names".to_owned())),
        "{labels:?}"
    );
    // A second service over the same database (a restarted server) reads them back.
    let d = site().service.data();
    let crate_db = match &d.prompts {
        Prompts::Db { path, .. } => path.clone(),
        _ => unreachable!("the site serves a database"),
    };
    let run = Run::load(&d.run.model_path, &candle_core::Device::Cpu).unwrap();
    let again = Service::new(run, Prompts::open_db(&crate_db).unwrap());
    assert!(
        again
            .data()
            .labels()
            .unwrap()
            .contains(&(key.clone(), "names".to_owned()))
    );
    for (k, label, why) in [
        ("h.9.mlp.c_fc:1", "x", "unknown component"),
        (key.as_str(), &"x".repeat(201), "at most 200"),
    ] {
        let (status, body) = call(SetLabel::PATH, json!({"key": k, "label": label})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains(why), "{body}");
    }
    let (status, _) = call(SetLabel::PATH, json!({"key": key, "label": ""})).await;
    assert_eq!(status, StatusCode::OK);
    let labels: Vec<(String, String)> = call_ok(GetLabels::PATH, json!({})).await;
    assert!(!labels.iter().any(|(k, _)| *k == key));
}

/// Graphs are kept in the sidecar: a restarted server (a new service on the same database) serves a
/// graph computed before from disk, byte for byte as computed, and says so in `x-graph-cache`; a
/// server started with no cache budget computes it again.
#[tokio::test]
async fn computed_graphs_come_back_from_the_sidecar_after_a_restart() {
    async fn fetch(service: &Service, path: &str) -> (String, String) {
        let options = LeptosOptions::builder().output_name("spd-explorer").build();
        let app = router(AppState::new(options, service.clone()));
        let res = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let source = res.headers()["x-graph-cache"].to_str().unwrap().to_owned();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (source, String::from_utf8(bytes.to_vec()).unwrap())
    }
    // Parameters no other test asks for, so the first request computes.
    let path = "/api/prompt/2?ci_threshold=0.137&normalize=l2-layer";
    let first = site().service.clone();
    let (source, computed) = fetch(&first, path).await;
    assert_eq!(source, "computed");
    assert_eq!(
        fetch(&first, path).await,
        ("memory".to_owned(), computed.clone())
    );

    let d = first.data();
    let db = match &d.prompts {
        Prompts::Db { path, .. } => path.clone(),
        _ => unreachable!("the site serves a database"),
    };
    let restart = |budget| {
        let run = Run::load(&d.run.model_path, &candle_core::Device::Cpu).unwrap();
        Service::with_graph_cache(run, Prompts::open_db(&db).unwrap(), budget)
    };
    // The worker writes the sidecar after the response: wait for the row (keyed by the request,
    // whose threshold is kept as its bits).
    let sidecar = server::store::notes::sidecar_path(&db);
    let bits = format!("{}", 0.137f32.to_bits());
    let stored = || {
        let conn = rusqlite::Connection::open(&sidecar).unwrap();
        conn.query_row(
            "SELECT count(*) FROM graph_cache WHERE instr(key, ?1) > 0",
            [&bits],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
    };
    for _ in 0..100 {
        if stored() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored(), 1);
    let again = fetch(&restart(server::web::service::GRAPH_CACHE_BYTES), path).await;
    assert_eq!(again, ("disk".to_owned(), computed.clone()));
    let uncached = fetch(&restart(0), path).await;
    assert_eq!(uncached, ("computed".to_owned(), computed));
}

/// The component browser's two calls: a layer's components with the database's statistics (the
/// same mean CI the hover card gives), and one component's CI on every token of a text, equal to
/// the CI the graph's nodes carry.
#[tokio::test]
async fn the_component_browser_lists_a_layer_and_probes_a_text() {
    use app::api::{GetLayerComponents, ProbeComponent};
    use app::types::{LayerComponents, Probe};
    let first: LayerComponents = call_ok(GetLayerComponents::PATH, json!({"layer": ""})).await;
    let d = site().service.data();
    let m = &d.run.model.modules[0];
    assert_eq!(first.layer, m.name);
    assert_eq!(first.layers.len(), d.run.model.modules.len());
    assert_eq!(first.rows.len(), m.components.c());
    let key = some_component().await;
    let (layer, c) = key.rsplit_once(':').unwrap();
    let c: usize = c.parse().unwrap();
    let listed: LayerComponents = call_ok(GetLayerComponents::PATH, json!({"layer": layer})).await;
    let info: ComponentInfo = call_ok(ComponentInfoFn::PATH, json!({"key": key})).await;
    let row = &listed.rows[c];
    assert_eq!(row.c, c);
    let (Some(mean), Some(card)) = (row.mean_ci, info.mean_ci) else {
        panic!("the database has activation contexts: {row:?} {info:?}");
    };
    assert!((mean - card).abs() < 1e-9, "{mean} vs {card}");
    assert!(row.density.unwrap() > 0.0);
    let (status, body) = call(GetLayerComponents::PATH, json!({"layer": "h.9.mlp.c_fc"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("unknown layer"), "{body}");

    // Probe the component on a text and compare with its node in the same text's graph.
    let text = "w5 w6 w7 w5";
    let probe: Probe = call_ok(ProbeComponent::PATH, json!({"text": text, "key": key})).await;
    assert_eq!(probe.tokens.len(), 4);
    let graph: GraphData = call_ok(
        GetGraph::PATH,
        json!({"prompt": PromptRef::Text(text.into()), "params": GraphParams { ci_threshold: 0.0, ..GraphParams::default() }, "ticket": null}),
    )
    .await;
    for (pos, ci) in probe.ci.iter().enumerate() {
        let node = graph
            .nodes
            .iter()
            .find(|n| n.key == format!("{layer}:{pos}:{c}"));
        match node {
            Some(n) => assert!(
                (n.importance - ci).abs() < 1e-6,
                "{pos}: {} vs {ci}",
                n.importance
            ),
            None => assert!(*ci <= 0.0, "{pos}: CI {ci} but no node"),
        }
    }
    for (args, why) in [
        (
            json!({"text": text, "key": "h.9.mlp.c_fc:1"}),
            "unknown component",
        ),
        (
            json!({"text": text, "key": "wte:0"}),
            "not a decomposed component",
        ),
        (json!({"text": "  ", "key": key}), "empty"),
    ] {
        let (status, body) = call(ProbeComponent::PATH, args).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains(why), "{body}");
    }
}
