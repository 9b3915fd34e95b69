//! What the shipped run does on held-out stories, measured through the normal loader: the target's
//! and the CI-masked component model's loss and next-token accuracy, the KL between them, how many
//! components are active per token, and which never are.

use candle_core::{D, Device, Result, Tensor};
use serde::Serialize;

use crate::model::SpdModel;
use crate::model::transformer::{Linear, LinearHook, ModuleId, PlainForward};
use crate::nn;

/// A component counts as active on a token where its CI exceeds this (the graphs' default threshold).
pub const ACTIVE_CI: f32 = 0.1;

#[derive(Debug, Clone, Serialize)]
pub struct ModuleStats {
    pub module: String,
    /// Mean number of components with CI > 0.1 per token.
    pub l0: f64,
    /// Components whose CI never exceeds 0.1 on the evaluation tokens.
    pub dead: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub n_tokens: usize,
    pub target_ce: f64,
    pub masked_ce: f64,
    /// Mean `KL(target ‖ CI-masked model)` per token.
    pub kl: f64,
    pub target_accuracy: f64,
    pub masked_accuracy: f64,
    /// How often the two models' top predictions agree.
    pub top1_agreement: f64,
    pub l0_total: f64,
    pub modules: Vec<ModuleStats>,
}

/// The component model with masks `masks[i]` on every decomposed module.
struct MaskedForward<'a> {
    model: &'a SpdModel,
    masks: &'a [Tensor],
}

impl LinearHook for MaskedForward<'_> {
    fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        let Some(i) = self.model.module_index(id) else {
            return PlainForward.linear(id, x, linear);
        };
        let comps = &self.model.modules[i].components;
        comps.masked_output(&comps.inner_acts(x)?, &self.masks[i])
    }
}

/// Logits `[B, T, vocab]` of the component model with mask = lower CI on every module, and the CI.
pub fn ci_masked_logits(
    model: &SpdModel,
    tokens: &Tensor,
) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
    let ci = model.ci(tokens)?;
    let logits = model.target.forward(
        tokens,
        &mut MaskedForward {
            model,
            masks: &ci.lower,
        },
    )?;
    Ok((logits, ci.target_logits, ci.lower))
}

fn argmax_hits(logits: &Tensor, targets: &Tensor) -> Result<Vec<bool>> {
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
    let want: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    Ok(pred.iter().zip(&want).map(|(a, b)| a == b).collect())
}

/// Evaluates `model` on `(inputs, next tokens)` windows.
pub fn evaluate(model: &SpdModel, windows: &[(Vec<u32>, Vec<u32>)]) -> Result<Metrics> {
    let n_mod = model.modules.len();
    let (mut ce_t, mut ce_m, mut kl) = (0.0, 0.0, 0.0);
    let (mut hit_t, mut hit_m, mut agree, mut n_tok) = (0usize, 0usize, 0usize, 0usize);
    let mut active = vec![0u64; n_mod];
    let mut ever: Vec<Vec<bool>> = model.cs().into_iter().map(|c| vec![false; c]).collect();
    for chunk in windows.chunks(16) {
        let t = chunk[0].0.len();
        let x: Vec<u32> = chunk.iter().flat_map(|w| w.0.clone()).collect();
        let y: Vec<u32> = chunk.iter().flat_map(|w| w.1.clone()).collect();
        let x = Tensor::from_vec(x, (chunk.len(), t), &Device::Cpu)?;
        let y = Tensor::from_vec(y, (chunk.len(), t), &Device::Cpu)?;
        let (masked, target, lower) = ci_masked_logits(model, &x)?;
        let n = chunk.len() * t;
        ce_t += nn::cross_entropy(&target, &y)?.to_scalar::<f32>()? as f64 * n as f64;
        ce_m += nn::cross_entropy(&masked, &y)?.to_scalar::<f32>()? as f64 * n as f64;
        let target_logp = nn::log_softmax(&target)?;
        kl += nn::kl_to_target(&target_logp, &masked)?.to_scalar::<f32>()? as f64 * n as f64;
        let ht = argmax_hits(&target, &y)?;
        let hm = argmax_hits(&masked, &y)?;
        hit_t += ht.iter().filter(|h| **h).count();
        hit_m += hm.iter().filter(|h| **h).count();
        let pt: Vec<u32> = target.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
        let pm: Vec<u32> = masked.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
        agree += pt.iter().zip(&pm).filter(|(a, b)| a == b).count();
        n_tok += n;
        for (i, ci) in lower.iter().enumerate() {
            let rows: Vec<Vec<f32>> = ci.reshape((n, ci.dim(2)?))?.to_vec2()?;
            for row in rows {
                for (j, v) in row.iter().enumerate() {
                    if *v > ACTIVE_CI {
                        active[i] += 1;
                        ever[i][j] = true;
                    }
                }
            }
        }
    }
    let nt = n_tok as f64;
    let modules: Vec<ModuleStats> = model
        .modules
        .iter()
        .enumerate()
        .map(|(i, m)| ModuleStats {
            module: m.name.clone(),
            l0: active[i] as f64 / nt,
            dead: ever[i].iter().filter(|e| !**e).count(),
        })
        .collect();
    Ok(Metrics {
        n_tokens: n_tok,
        target_ce: ce_t / nt,
        masked_ce: ce_m / nt,
        kl: kl / nt,
        target_accuracy: hit_t as f64 / nt,
        masked_accuracy: hit_m as f64 / nt,
        top1_agreement: agree as f64 / nt,
        l0_total: modules.iter().map(|m| m.l0).sum(),
        modules,
    })
}
