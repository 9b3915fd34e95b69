//! The one CI-masked forward both fast backends start from, kept as tensors on the model's device:
//! the host backend copies them out, the tensor backend reads them where they are.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::model::transformer::{
    Linear, LinearHook, LnSite, ModuleId, PlainForward, tokens_tensor,
};
use crate::model::{RunError, SpdModel};

/// What one forward of the component model records for the local Jacobians (the CI-masked one for
/// the seed's semantics, all masks 1 plus the deltas for the app's); batch dimension dropped.
pub(super) struct Recorded {
    /// `wte[t]`, `[T, d]`
    pub embed: Tensor,
    /// Outputs of every projection (masked component outputs where decomposed), `[T, d_out]`.
    pub outputs: HashMap<ModuleId, Tensor>,
    /// Per decomposed module, `a' ⊙ mask` (component acts `x V` times the mask), `[T, C]`: the
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
    /// The forward of `tokens` with `masks` (`[1, T, C]` per module), adding every module's
    /// weight delta where `with_delta`.
    pub fn run(
        model: &SpdModel,
        masks: &[Tensor],
        with_delta: bool,
        tokens: &[u32],
    ) -> Result<Self, RunError> {
        struct Hook<'a> {
            model: &'a SpdModel,
            masks: &'a [Tensor],
            with_delta: bool,
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
                        let mut out = comps.masked_output(&acts, &self.masks[i])?;
                        if self.with_delta
                            && let Some(d) = comps.delta_output(x)?
                        {
                            out = (out + d)?;
                        }
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
            masks,
            with_delta,
            embed: None,
            outputs: HashMap::new(),
            acts: vec![None; model.modules.len()],
            residual: vec![],
            probs: vec![],
        };
        let tokens = tokens_tensor(tokens, model.device())?;
        let logits = model.target.forward(&tokens, &mut hook)?.squeeze(0)?;
        Ok(Self {
            embed: hook.embed.expect("the forward embeds"),
            outputs: hook.outputs,
            coef: hook
                .acts
                .into_iter()
                .zip(masks)
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
