//! JSON endpoints for testing a circuit from scripts: `POST /api/intervention` (one forward with
//! chosen components kept, ablated or scaled, on a stored prompt, typed text or token ids, forked
//! with token replacements) and `POST /api/graphs/optimized` (also at the original's
//! `/api/graphs/optimized/stream`): CI optimised for a label, streamed as the original's
//! server-sent `{"type": "progress" | "complete" | "error"}` messages. Bad input is a 4xx JSON
//! error before anything runs; a client that goes away cancels the optimisation.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ops::ControlFlow;

use app::api::ApiError;
use app::types::{GraphParams, Normalize, Semantics};
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http_api::JsonError;
use super::service::{Data, Service};
use crate::attribution::PromptCi;
use crate::circuit::report::{intervention_json, optimization_json};
use crate::circuit::{
    Intervention, InterventionResult, MaskType, Mode, OptimConfig, Pgd, PgdInit, Recon, Selected,
    fork, intervene, optimize, optimized_prompt,
};

pub fn routes<S>(service: Service) -> Router<S> {
    Router::new()
        .route("/api/intervention", post(intervention))
        .route("/api/graphs/optimized", post(optimized))
        .route("/api/graphs/optimized/stream", post(optimized))
        .with_state(service)
}

/// The body of `POST /api/intervention`: one of `prompt_id`, `text`, `tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionRequest {
    pub prompt_id: Option<i64>,
    pub text: Option<String>,
    pub tokens: Option<Vec<u32>>,
    /// `layer:pos:c`, or `layer:c` for a component at every position.
    pub nodes: Vec<String>,
    #[serde(default = "keep")]
    pub mode: String,
    pub factor: Option<f32>,
    #[serde(default = "ten")]
    pub top_k: usize,
    /// `[[pos, token_id], …]`: the fork's swaps.
    #[serde(default)]
    pub token_replacements: Vec<(usize, u32)>,
    /// The graph forward `ablate` and `scale` start from (default `seed`).
    pub semantics: Option<Semantics>,
}

fn keep() -> String {
    "keep".into()
}

fn ten() -> usize {
    10
}

impl Data {
    /// The prompt a request names by exactly one of its id, its text or its token ids.
    pub fn request_tokens(
        &self,
        prompt_id: Option<i64>,
        text: Option<&str>,
        tokens: Option<&[u32]>,
    ) -> Result<Vec<u32>, ApiError> {
        let tokens = match (prompt_id, text, tokens) {
            (Some(id), None, None) => self.prompt_tokens(id)?,
            (None, Some(text), None) => self.run.tokenize(text)?,
            (None, None, Some(t)) => t.to_vec(),
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of prompt_id, text and tokens",
                ));
            }
        };
        self.run
            .model
            .check_tokens(&tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(tokens)
    }

    /// Runs one intervention on `tokens` forked with `replacements`; the result and the forked
    /// prompt's CI. Every bad input is a 400 naming it.
    pub fn run_intervention(
        &self,
        tokens: &[u32],
        nodes: &[String],
        mode: Mode,
        top_k: usize,
        replacements: &[(usize, u32)],
        semantics: Semantics,
    ) -> Result<(InterventionResult, PromptCi), ApiError> {
        let model = &self.run.model;
        let tokens = fork(model, tokens, replacements).map_err(ApiError::bad_request)?;
        let selected = nodes
            .iter()
            .map(|k| Selected::parse(k, model, tokens.len()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::bad_request)?;
        if top_k == 0 || top_k > model.vocab_size() {
            return Err(ApiError::bad_request(format!(
                "top_k must be in 1..={}, not {top_k}",
                model.vocab_size(),
            )));
        }
        let internal = |e: crate::model::RunError| ApiError::internal(e.to_string());
        let ci = PromptCi::compute(model, &tokens).map_err(internal)?;
        let iv = Intervention {
            selected,
            mode,
            semantics,
            top_k,
        };
        let out = intervene(model, &ci, &iv).map_err(internal)?;
        Ok((out, ci))
    }

    /// Runs one intervention; the JSON of [`intervention_json`] plus the request's settings.
    pub fn intervention(&self, req: &InterventionRequest) -> Result<Value, ApiError> {
        let tokens =
            self.request_tokens(req.prompt_id, req.text.as_deref(), req.tokens.as_deref())?;
        let mode = Mode::parse(&req.mode, req.factor).map_err(ApiError::bad_request)?;
        let semantics = req.semantics.unwrap_or_default();
        let (out, _) = self.run_intervention(
            &tokens,
            &req.nodes,
            mode,
            req.top_k,
            &req.token_replacements,
            semantics,
        )?;
        let mut doc = intervention_json(&out, mode, &|t| self.run.token_string(t));
        let map = doc.as_object_mut().expect("an object");
        map.insert("nodes".into(), json!(req.nodes));
        map.insert("token_replacements".into(), json!(req.token_replacements));
        map.insert("semantics".into(), json!(semantics.name()));
        map.insert("top_k".into(), json!(req.top_k));
        Ok(doc)
    }
}

async fn intervention(State(s): State<Service>, Json(body): Json<Value>) -> Response {
    let req: InterventionRequest = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => {
            return JsonError::from(ApiError::bad_request(format!("bad request body: {e}")))
                .into_response();
        }
    };
    match tokio::task::spawn_blocking(move || s.data().intervention(&req)).await {
        Ok(Ok(doc)) => Json(doc).into_response(),
        Ok(Err(e)) => JsonError::from(e).into_response(),
        Err(e) => JsonError::from(ApiError::internal(format!("task failed: {e}"))).into_response(),
    }
}

/// An optimisation as the original's query string spells it.
#[derive(Debug, Clone)]
pub struct OptimizedRequest {
    pub prompt_id: i64,
    pub cfg: OptimConfig,
    pub params: GraphParams,
}

fn parse_optimized(
    q: &HashMap<String, String>,
    data: &Data,
) -> Result<(OptimizedRequest, Vec<u32>), ApiError> {
    let get = |name: &str| q.get(name).map(String::as_str);
    let req = |name: &str| {
        get(name).ok_or_else(|| ApiError::bad_request(format!("missing parameter {name}")))
    };
    fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ApiError> {
        v.parse()
            .map_err(|_| ApiError::bad_request(format!("{name} must be a number, got {v:?}")))
    }
    let prompt_id: i64 = num("prompt_id", req("prompt_id")?)?;
    let tokens = data.request_tokens(Some(prompt_id), None, None)?;
    let recon = match req("loss_type")? {
        "ce" => Recon::Ce {
            label: num(
                "label_token",
                get("label_token")
                    .ok_or_else(|| ApiError::bad_request("label_token is required for CE loss"))?,
            )?,
        },
        "kl" => Recon::Kl,
        other => {
            return Err(ApiError::bad_request(format!(
                "loss_type must be ce or kl, got {other:?}"
            )));
        }
    };
    let mask_type = match get("mask_type").unwrap_or("ci") {
        "ci" => MaskType::Ci,
        "stochastic" => MaskType::Stochastic,
        other => {
            return Err(ApiError::bad_request(format!(
                "mask_type must be ci or stochastic, got {other:?}"
            )));
        }
    };
    let pgd = match (get("adv_pgd_n_steps"), get("adv_pgd_step_size")) {
        (Some(n), Some(s)) => Some(Pgd {
            n_steps: num("adv_pgd_n_steps", n)?,
            step_size: num("adv_pgd_step_size", s)?,
            init: PgdInit::Random,
        }),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "adv_pgd_n_steps and adv_pgd_step_size go together",
            ));
        }
    };
    let cfg = OptimConfig {
        position: num("loss_position", req("loss_position")?)?,
        recon,
        loss_coeff: num("loss_coeff", get("loss_coeff").unwrap_or("1"))?,
        imp_min_coeff: num("imp_min_coeff", req("imp_min_coeff")?)?,
        pnorm: num("pnorm", req("pnorm")?)?,
        beta: num("beta", get("beta").unwrap_or("0"))?,
        steps: num("steps", req("steps")?)?,
        lr: 1e-2,
        mask_type,
        pgd,
        seed: 0,
    };
    cfg.check(&data.run.model, tokens.len())
        .map_err(ApiError::bad_request)?;
    let params = GraphParams {
        ci_threshold: num("ci_threshold", get("ci_threshold").unwrap_or("0"))?,
        output_prob_threshold: 0.01,
        normalize: match get("normalize") {
            None => Normalize::None,
            Some(v) => Normalize::from_name(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "normalize must be none, l1, l2-target or l2-layer, got {v:?}"
                ))
            })?,
        },
        semantics: match get("semantics") {
            None => Semantics::App,
            Some(v) => Semantics::from_name(v).ok_or_else(|| {
                ApiError::bad_request(format!("semantics must be seed or app, got {v:?}"))
            })?,
        },
        max_mean_ci: 1.0,
        trace: None,
    };
    params.check().map_err(ApiError::bad_request)?;
    Ok((
        OptimizedRequest {
            prompt_id,
            cfg,
            params,
        },
        tokens,
    ))
}

impl Data {
    /// Optimises the CI of a stored prompt and returns its graph (the wire form, up to the loss
    /// position) with an `optimization` object; `progress` sees each step and may cancel.
    pub fn optimized_graph(
        &self,
        req: &OptimizedRequest,
        tokens: &[u32],
        progress: &mut dyn FnMut(Value) -> ControlFlow<()>,
    ) -> Result<Value, ApiError> {
        let cfg = &req.cfg;
        // Both stages report on the one stream.
        let progress = std::cell::RefCell::new(progress);
        let (graph, opt, _) = self.optimize_then_graph(
            Some(req.prompt_id),
            tokens,
            cfg,
            req.params,
            &|_| None,
            &mut |p| {
                (progress.borrow_mut())(json!({
                    "type": "progress",
                    "current": p.step,
                    "total": p.steps,
                    "stage": "optimizing",
                    "loss": p.loss,
                    "l0": p.l0,
                }))
            },
            &mut || {
                let _ = (progress.borrow_mut())(
                    json!({"type": "progress", "current": 0, "total": 1, "stage": "graph"}),
                );
            },
        )?;
        let mut doc =
            serde_json::to_value(&graph).map_err(|e| ApiError::internal(e.to_string()))?;
        doc["graphType"] = json!("optimized");
        doc["optimization"] = optimization_json(cfg, &opt.metrics, &|t| self.run.token_string(t));
        Ok(doc)
    }

    /// The optimisation of `cfg` on `tokens` (each step seen by `on_step`, which may stop it),
    /// then, after `on_graph`, the graph of the tokens up to the position under the optimised CI;
    /// with the optimisation and the model's own CI. Both the HTTP API and the page use it.
    #[allow(clippy::too_many_arguments)]
    pub fn optimize_then_graph(
        &self,
        prompt_id: Option<i64>,
        tokens: &[u32],
        cfg: &OptimConfig,
        params: GraphParams,
        mean_ci: &dyn Fn(&str) -> Option<f64>,
        on_step: &mut dyn FnMut(crate::circuit::Progress) -> ControlFlow<()>,
        on_graph: &mut dyn FnMut(),
    ) -> Result<(app::types::GraphData, crate::circuit::Optimized, PromptCi), ApiError> {
        let model = &self.run.model;
        model
            .check_tokens(tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let internal = |e: String| ApiError::internal(e);
        let ci = PromptCi::compute(model, tokens).map_err(|e| internal(e.to_string()))?;
        let opt = optimize(model, &ci, cfg, on_step).map_err(|e| match e {
            crate::circuit::OptimError::Config(m) => ApiError::bad_request(m),
            e => internal(e.to_string()),
        })?;
        on_graph();
        let prompt = optimized_prompt(model, &ci, &opt, cfg.position)
            .map_err(|e| internal(e.to_string()))?;
        let graph = self
            .run
            .graph_of_ci(prompt_id, &prompt, params, mean_ci, &|_, _| {})?;
        Ok((graph, opt, ci))
    }
}

async fn optimized(State(s): State<Service>, Query(q): Query<HashMap<String, String>>) -> Response {
    let parsed = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || parse_optimized(&q, s.data())).await
    };
    let (req, tokens) = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return JsonError::from(e).into_response(),
        Err(e) => {
            return JsonError::from(ApiError::internal(format!("task failed: {e}")))
                .into_response();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::task::spawn_blocking(move || {
        let mut send = |v: Value| {
            if tx.send(v).is_ok() {
                ControlFlow::Continue(())
            } else {
                // The client went away: stop.
                ControlFlow::Break(())
            }
        };
        let done = s.data().optimized_graph(&req, &tokens, &mut send);
        let last = match done {
            Ok(data) => json!({"type": "complete", "data": data}),
            Err(e) => json!({"type": "error", "error": e.message}),
        };
        let _ = tx.send(last);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let event = Event::default()
            .json_data(&v)
            .unwrap_or_else(|_| Event::default().data("{}"));
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

impl Data {
    /// The optimiser's configuration for the page's request (the app's learning rate, loss
    /// coefficient 1, seed 0, PGD from a random start).
    pub fn optim_config(&self, spec: &app::types::OptimizeSpec) -> OptimConfig {
        use app::types::{OptimLoss, OptimMask};
        OptimConfig {
            position: spec.position,
            recon: match spec.loss {
                OptimLoss::Ce => Recon::Ce { label: spec.label },
                OptimLoss::Kl => Recon::Kl,
            },
            loss_coeff: 1.0,
            imp_min_coeff: f64::from(spec.imp_min_coeff),
            pnorm: f64::from(spec.pnorm),
            beta: f64::from(spec.beta),
            steps: spec.steps,
            lr: 1e-2,
            mask_type: match spec.mask {
                OptimMask::Ci => MaskType::Ci,
                OptimMask::Stochastic => MaskType::Stochastic,
            },
            pgd: (spec.pgd_steps > 0).then_some(Pgd {
                n_steps: spec.pgd_steps,
                step_size: f64::from(spec.pgd_step_size),
                init: PgdInit::Random,
            }),
            seed: 0,
        }
    }

    /// The page's optimised graph: the optimisation (its steps reported as progress), then the
    /// graph of the tokens up to the position under the optimised CI, with the metrics.
    pub fn optimized(
        &self,
        prompt_id: Option<i64>,
        tokens: &[u32],
        params: GraphParams,
        spec: &app::types::OptimizeSpec,
        mean_ci: &dyn Fn(&str) -> Option<f64>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<app::types::GraphData, ApiError> {
        let cfg = self.optim_config(spec);
        let (mut graph, opt, ci) = self.optimize_then_graph(
            prompt_id,
            tokens,
            &cfg,
            params,
            mean_ci,
            &mut |p| {
                progress(p.step, p.steps);
                ControlFlow::Continue(())
            },
            &mut || {},
        )?;
        let l0_before = crate::circuit::optimize::l0(&ci.lower);
        graph.optimization = Some(app::types::OptimizationInfo {
            spec: *spec,
            label_str: self.run.token_string(spec.label),
            ci_masked_label_prob: opt.metrics.ci_masked_label_prob,
            stoch_masked_label_prob: opt.metrics.stoch_masked_label_prob,
            adv_pgd_label_prob: opt.metrics.adv_pgd_label_prob,
            l0_total: opt.metrics.l0_total,
            l0_before,
        });
        Ok(graph)
    }
}
