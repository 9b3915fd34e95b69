//! The per-prompt numbers every view starts from: CI of each module and the output probabilities, as
//! plain host vectors.

use candle_core::{Device, Tensor};

use crate::model::transformer::{softmax_last, tokens_tensor};
use crate::model::{RunError, SpdModel};

#[derive(Debug, Clone)]
pub struct PromptCi {
    pub tokens: Vec<u32>,
    /// `[module][position][component]`: lower-leaky CI (the one masks and thresholds use).
    pub lower: Vec<Vec<Vec<f32>>>,
    pub upper: Vec<Vec<Vec<f32>>>,
    pub pre_sigmoid: Vec<Vec<Vec<f32>>>,
    /// `[position][vocab]` of the plain target model.
    pub target_logits: Vec<Vec<f32>>,
    pub target_probs: Vec<Vec<f32>>,
    /// The same tensors on the model's device, `[1, T, C]`, for the masked forward.
    pub lower_tensors: Vec<Tensor>,
}

impl PromptCi {
    /// Runs the target forward and the CI functions on one prompt.
    pub fn compute(model: &SpdModel, tokens: &[u32]) -> Result<Self, RunError> {
        model.check_tokens(tokens)?;
        let tok = tokens_tensor(tokens, model.device())?;
        let out = model.ci(&tok)?;
        let host = |ts: &[Tensor]| -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
            ts.iter()
                .map(|t| t.squeeze(0)?.to_device(&Device::Cpu)?.to_vec2())
                .collect()
        };
        let probs = softmax_last(&out.target_logits)?;
        Ok(Self {
            tokens: tokens.to_vec(),
            lower: host(&out.lower)?,
            upper: host(&out.upper)?,
            pre_sigmoid: host(&out.pre_sigmoid)?,
            target_logits: out
                .target_logits
                .squeeze(0)?
                .to_device(&Device::Cpu)?
                .to_vec2()?,
            target_probs: probs.squeeze(0)?.to_device(&Device::Cpu)?.to_vec2()?,
            lower_tensors: out.lower,
        })
    }
}
