//! Which layers feed which (SPEC §3.4), found by probing gradients through the leaf forward rather than
//! hard-coded, so any choice of decomposed modules gets the right map.

use candle_core::{D, Tensor};

use super::layer::Layer;
use crate::model::SpdModel;

/// A source layer of a target, and whether its edges cross positions (attention lies between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub layer: Layer,
    pub cross_seq: bool,
}

/// `sources_by_target`, in the original's order: targets that read the embedding (residual readers and
/// `output`) first, then the rest, each group in model order; sources in model order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMap {
    pub targets: Vec<(Layer, Vec<Source>)>,
}

impl SourceMap {
    /// Probes the model: a leaf forward with all masks 1 on a short prompt, one backward per target
    /// layer from the sum of its acts (which leaves get gradient), one from its last position (which
    /// leaves get gradient at earlier positions: those edges cross positions).
    pub fn probe(model: &SpdModel) -> candle_core::Result<Self> {
        let t = model.block_size().min(4);
        let tokens: Vec<u32> = (0..t as u32)
            .map(|i| i % model.vocab_size() as u32)
            .collect();
        let fwd = model.leaf_forward(&tokens, &model.ones_masks(t)?)?;
        let leaf = |l: Layer| -> &Tensor {
            match l {
                Layer::Wte => fwd.wte.as_tensor(),
                Layer::Module(i) => fwd.leaves[i].as_tensor(),
                Layer::Output => unreachable!("output is never a source"),
            }
        };
        let nonzero = |g: &Tensor| -> candle_core::Result<bool> {
            Ok(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0)
        };
        let mut targets = Vec::new();
        for target in Layer::all(model).skip(1) {
            let act = match target {
                Layer::Module(i) => &fwd.acts[i],
                _ => &fwd.logits,
            };
            let all = act.sum_all()?.backward()?;
            let last = act.narrow(1, t - 1, 1)?.sum_all()?.backward()?;
            let mut sources = Vec::new();
            for src in Layer::all(model).take_while(|l| *l != Layer::Output) {
                let Some(g) = all.get(leaf(src)) else {
                    continue;
                };
                if !nonzero(g)? {
                    continue;
                }
                let cross_seq = match last.get(leaf(src)) {
                    Some(g) if t > 1 => nonzero(&g.narrow(1, 0, t - 1)?.sum_keepdim(D::Minus1)?)?,
                    _ => false,
                };
                sources.push(Source {
                    layer: src,
                    cross_seq,
                });
            }
            if !sources.is_empty() {
                targets.push((target, sources));
            }
        }
        // Residual readers (and `output`) before the in-block targets, as the original lists them.
        targets
            .sort_by_key(|(tgt, srcs)| (srcs.first().map(|s| s.layer) != Some(Layer::Wte), *tgt));
        Ok(Self { targets })
    }

    pub fn sources_of(&self, target: Layer) -> Option<&[Source]> {
        self.targets
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, s)| s.as_slice())
    }
}
