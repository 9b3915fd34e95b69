//! The one CI-masked forward both fast backends start from, kept as tensors on the model's device:
//! the host backend copies them out, the tensor backend reads them where they are.

use std::collections::HashMap;

use candle_core::Tensor;

use super::super::prompt::PromptCi;
use crate::model::transformer::{
    Linear, LinearHook, LnSite, ModuleId, PlainForward, tokens_tensor,
};
use crate::model::{RunError, SpdModel};

/// What one CI-masked forward of the component model records for the local Jacobians; batch
/// dimension dropped.
pub(super) struct Recorded {
    /// `wte[t]`, `[T, d]`
    pub embed: Tensor,
    /// Outputs of every projection (masked component outputs where decomposed), `[T, d_out]`.
    pub outputs: HashMap<ModuleId, Tensor>,
    /// Per decomposed module, `a' ⊙ mask` (component acts `x V` times the CI mask), `[T, C]`: the
    /// factor every edge from a component source carries.
    pub coef: Vec<Tensor>,
    /// The residual stream entering each LayerNorm, `[T, d]`.
    pub residual: Vec<(LnSite, Tensor)>,
    /// Per block, attention probabilities `[H, T, T]`.
    pub probs: Vec<Tensor>,
    /// `[T, vocab]`
    pub logits: Tensor,
}

impl Recorded {
    pub fn run(model: &SpdModel, ci: &PromptCi) -> Result<Self, RunError> {
        struct Hook<'a> {
            model: &'a SpdModel,
            masks: &'a [Tensor],
            embed: Option<Tensor>,
            outputs: HashMap<ModuleId, Tensor>,
            acts: Vec<Option<Tensor>>,
            residual: Vec<(LnSite, Tensor)>,
            probs: Vec<Tensor>,
        }
        impl LinearHook for Hook<'_> {
            fn embed(&mut self, e: Tensor) -> candle_core::Result<Tensor> {
                self.embed = Some(e.squeeze(0)?);
                Ok(e)
            }
            fn linear(
                &mut self,
                id: ModuleId,
                x: &Tensor,
                linear: &Linear,
            ) -> candle_core::Result<Tensor> {
                let out = match self.model.module_index(id) {
                    Some(i) => {
                        let comps = &self.model.modules[i].components;
                        let acts = comps.inner_acts(x)?;
                        let out = comps.masked_output(&acts, &self.masks[i])?;
                        self.acts[i] = Some(acts.squeeze(0)?);
                        out
                    }
                    None => PlainForward.linear(id, x, linear)?,
                };
                self.outputs.insert(id, out.squeeze(0)?);
                Ok(out)
            }
            fn residual(&mut self, site: LnSite, x: &Tensor) -> candle_core::Result<()> {
                self.residual.push((site, x.squeeze(0)?));
                Ok(())
            }
            fn attention_probs(
                &mut self,
                _block: usize,
                probs: &Tensor,
            ) -> candle_core::Result<()> {
                self.probs.push(probs.squeeze(0)?);
                Ok(())
            }
        }
        let mut hook = Hook {
            model,
            masks: &ci.lower_tensors,
            embed: None,
            outputs: HashMap::new(),
            acts: vec![None; model.modules.len()],
            residual: vec![],
            probs: vec![],
        };
        let tokens = tokens_tensor(&ci.tokens, model.device())?;
        let logits = model.target.forward(&tokens, &mut hook)?.squeeze(0)?;
        Ok(Self {
            embed: hook.embed.expect("the forward embeds"),
            outputs: hook.outputs,
            coef: hook
                .acts
                .into_iter()
                .zip(&ci.lower_tensors)
                .map(|(a, m)| a.expect("every module runs") * m.squeeze(0)?)
                .collect::<candle_core::Result<_>>()?,
            residual: hook.residual,
            probs: hook.probs,
            logits,
        })
    }

    pub fn residual_at(&self, site: LnSite) -> &Tensor {
        at_site(&self.residual, site)
    }
}

/// The entry of `site` in a per-LayerNorm list (every LayerNorm runs, so it is there).
pub(super) fn at_site<T>(per_site: &[(LnSite, T)], site: LnSite) -> &T {
    &per_site
        .iter()
        .find(|(s, _)| *s == site)
        .expect("every LayerNorm runs")
        .1
}
