//! The JSON of interventions and optimised CI, as `attribute` prints it and the HTTP API returns
//! it: SPD's app's tuples where it has them, so scripts written against one read the other.

use serde_json::{Value, json};

use super::intervention::{InterventionResult, Mode, Prediction};
use super::optimize::{Metrics, OptimConfig, Recon};

/// `predictions_per_position` as `[token, id, prob, logit, target_prob, target_logit]` rows (the
/// app's), the CI-masked probabilities beside them, and `KL(target ‖ intervened)` per position.
pub fn intervention_json(
    out: &InterventionResult,
    mode: Mode,
    token: &dyn Fn(u32) -> String,
) -> Value {
    let rows = |f: &dyn Fn(&Prediction) -> Value| -> Value {
        json!(
            out.predictions
                .iter()
                .map(|row| row.iter().map(f).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        )
    };
    json!({
        "tokens": out.tokens,
        "input_tokens": out.tokens.iter().map(|t| token(*t)).collect::<Vec<_>>(),
        "mode": mode.name(),
        "factor": match mode {
            Mode::Scale(f) => json!(f),
            _ => Value::Null,
        },
        "predictions_per_position": rows(&|p| json!([
            token(p.token),
            p.token,
            p.prob,
            p.logit,
            p.target_prob,
            p.target_logit
        ])),
        "ci_masked_probs_per_position": rows(&|p| json!(p.ci_masked_prob)),
        "kl_per_position": out.kl,
    })
}

/// The optimisation's settings and final metrics, as the app's `OptimizationResult`.
pub fn optimization_json(
    cfg: &OptimConfig,
    metrics: &Metrics,
    token: &dyn Fn(u32) -> String,
) -> Value {
    let loss = match cfg.recon {
        Recon::Ce { label } => json!({
            "type": "ce",
            "coeff": cfg.loss_coeff,
            "position": cfg.position,
            "label_token": label,
            "label_str": token(label),
        }),
        Recon::Kl => json!({"type": "kl", "coeff": cfg.loss_coeff, "position": cfg.position}),
    };
    json!({
        "imp_min_coeff": cfg.imp_min_coeff,
        "steps": cfg.steps,
        "pnorm": cfg.pnorm,
        "beta": cfg.beta,
        "mask_type": match cfg.mask_type {
            super::MaskType::Ci => "ci",
            super::MaskType::Stochastic => "stochastic",
        },
        "loss": loss,
        "adv_pgd_n_steps": cfg.pgd.map(|p| p.n_steps),
        "adv_pgd_step_size": cfg.pgd.map(|p| p.step_size),
        "metrics": metrics_json(metrics),
    })
}

pub fn metrics_json(m: &Metrics) -> Value {
    json!({
        "ci_masked_label_prob": m.ci_masked_label_prob,
        "stoch_masked_label_prob": m.stoch_masked_label_prob,
        "adv_pgd_label_prob": m.adv_pgd_label_prob,
        "l0_total": m.l0_total,
    })
}
