//! The intervention forward (SPEC §7): run the component model with chosen components kept,
//! ablated or scaled, and compare its next-token predictions with the target model's and the
//! CI-masked model's. One forward, no gradients.

use candle_core::{DType, Device, Tensor};

use crate::attribution::{Layer, PromptCi, Semantics};
use crate::model::transformer::{softmax_last, tokens_tensor};
use crate::model::{RunError, SpdModel};

/// What happens to the selected components.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Selected at mask 1, every other component at 0, no weight deltas (biases stay): the
    /// circuit alone, as SPD's app's intervention.
    Keep,
    /// Selected at 0, the rest as the graph's forward has them.
    Ablate,
    /// Selected multiplied by the factor, the rest as the graph's forward has them.
    Scale(f32),
}

impl Mode {
    /// `keep`, `ablate` or `scale` (the latter with `factor`).
    pub fn parse(name: &str, factor: Option<f32>) -> Result<Self, String> {
        match (name, factor) {
            ("keep", None) => Ok(Self::Keep),
            ("ablate", None) => Ok(Self::Ablate),
            ("scale", Some(f)) if f.is_finite() => Ok(Self::Scale(f)),
            ("scale", Some(f)) => Err(format!("the scale factor must be finite, not {f}")),
            ("scale", None) => Err("mode scale needs a factor".into()),
            ("keep" | "ablate", Some(_)) => Err(format!("mode {name} takes no factor")),
            _ => Err(format!(
                "unknown mode `{name}`: expected keep, ablate or scale"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Ablate => "ablate",
            Self::Scale(_) => "scale",
        }
    }
}

/// A selected component: module `module`'s component `c` at one position, or at every position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    pub module: usize,
    pub pos: Option<usize>,
    pub c: usize,
}

impl Selected {
    /// `layer:pos:c` (a node) or `layer:c` (the component at every position), checked against
    /// the model and a prompt of `len` tokens.
    pub fn parse(key: &str, model: &SpdModel, len: usize) -> Result<Self, String> {
        let parts: Vec<&str> = key.rsplitn(3, ':').collect();
        let (layer, pos, c) = match parts.as_slice() {
            [c, pos, layer] => (*layer, Some(*pos), *c),
            [c, layer] => (*layer, None, *c),
            _ => {
                return Err(format!(
                    "`{key}` is not a node key (layer:pos:c or layer:c)"
                ));
            }
        };
        let Some(Layer::Module(module)) = Layer::parse(layer, model) else {
            return Err(format!(
                "`{key}`: {layer} is not a decomposed module of this run"
            ));
        };
        let c: usize = c
            .parse()
            .map_err(|_| format!("`{key}`: component `{c}` is not a number"))?;
        let n_c = model.modules[module].components.c();
        if c >= n_c {
            return Err(format!("`{key}`: {layer} has {n_c} components"));
        }
        let pos = match pos {
            None | Some("*") => None,
            Some(p) => {
                let p: usize = p
                    .parse()
                    .map_err(|_| format!("`{key}`: position `{p}` is not a number"))?;
                if p >= len {
                    return Err(format!(
                        "`{key}`: position {p} is out of range for a prompt of {len} tokens"
                    ));
                }
                Some(p)
            }
        };
        Ok(Self { module, pos, c })
    }
}

/// One intervention on one prompt.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub selected: Vec<Selected>,
    pub mode: Mode,
    /// Which forward `ablate` and `scale` start from: the seed's CI-masked one (no deltas) or the
    /// app's all-ones one plus the deltas. `keep` is the same under both.
    pub semantics: Semantics,
    pub top_k: usize,
}

/// A next-token candidate at one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub token: u32,
    pub prob: f32,
    pub logit: f32,
    pub target_prob: f32,
    pub target_logit: f32,
    pub ci_masked_prob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InterventionResult {
    pub tokens: Vec<u32>,
    /// Per position, the `top_k` tokens by intervened probability (ties to the lower id).
    pub predictions: Vec<Vec<Prediction>>,
    /// Per position, `KL(target ‖ intervened)` in nats.
    pub kl: Vec<f64>,
}

/// Replaces tokens (`(position, token)`), as the app's fork does; checks positions and ids.
pub fn fork(model: &SpdModel, tokens: &[u32], swaps: &[(usize, u32)]) -> Result<Vec<u32>, String> {
    let mut out = tokens.to_vec();
    for &(pos, token) in swaps {
        if pos >= out.len() {
            return Err(format!(
                "replacement position {pos} is out of range for a prompt of {} tokens",
                out.len()
            ));
        }
        if token as usize >= model.vocab_size() {
            return Err(format!(
                "replacement token {token} is out of the vocabulary (size {})",
                model.vocab_size()
            ));
        }
        out[pos] = token;
    }
    Ok(out)
}

/// The masks of `iv` over a prompt with CI `ci` (`[module][pos][c]`), and whether the forward
/// adds the deltas.
pub fn masks(model: &SpdModel, ci: &PromptCi, iv: &Intervention) -> (Vec<Vec<Vec<f32>>>, bool) {
    let t = ci.tokens.len();
    let (mut masks, with_delta) = match (iv.mode, iv.semantics) {
        (Mode::Keep, _) => (
            model
                .modules
                .iter()
                .map(|m| vec![vec![0f32; m.components.c()]; t])
                .collect(),
            false,
        ),
        (_, Semantics::Seed) => (ci.lower.clone(), false),
        (_, Semantics::App) => (
            model
                .modules
                .iter()
                .map(|m| vec![vec![1f32; m.components.c()]; t])
                .collect::<Vec<_>>(),
            true,
        ),
    };
    for s in &iv.selected {
        let positions = match s.pos {
            Some(p) => p..p + 1,
            None => 0..t,
        };
        for p in positions {
            let m = &mut masks[s.module][p][s.c];
            *m = match iv.mode {
                Mode::Keep => 1.0,
                Mode::Ablate => 0.0,
                // A component selected twice is scaled once.
                Mode::Scale(f) => match iv.semantics {
                    Semantics::Seed => ci.lower[s.module][p][s.c] * f,
                    Semantics::App => f,
                },
            };
        }
    }
    (masks, with_delta)
}

/// Runs `iv` on the prompt whose CI is `ci`.
pub fn intervene(
    model: &SpdModel,
    ci: &PromptCi,
    iv: &Intervention,
) -> Result<InterventionResult, RunError> {
    intervene_with(model, ci, iv, None)
}

/// [`intervene`], with the CI-masked model's probabilities (`[position][vocab]`) given where the
/// caller has them (a graph's `masked_probs`), which saves a forward.
pub fn intervene_with(
    model: &SpdModel,
    ci: &PromptCi,
    iv: &Intervention,
    ci_masked: Option<&[Vec<f32>]>,
) -> Result<InterventionResult, RunError> {
    let t = ci.tokens.len();
    let device = model.device();
    let tokens = tokens_tensor(&ci.tokens, device)?;
    let rows = |x: Tensor| -> candle_core::Result<Vec<Vec<f32>>> {
        x.squeeze(0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2()
    };
    let (masks, with_delta) = masks(model, ci, iv);
    let logits = if with_delta {
        let to_tensor = |m: &Vec<Vec<f32>>| -> candle_core::Result<Tensor> {
            let c = m.first().map_or(0, Vec::len);
            Tensor::from_vec(m.concat(), (1, t, c), &Device::Cpu)?.to_device(device)
        };
        let masks: Vec<Tensor> = masks
            .iter()
            .map(to_tensor)
            .collect::<candle_core::Result<_>>()?;
        model.masked_logits(&tokens, &masks, true)?
    } else {
        sparse_logits(model, &tokens, &masks)?
    };
    let probs = rows(softmax_last(&logits)?)?;
    let logits = rows(logits)?;
    let computed;
    let ci_masked = match ci_masked {
        Some(p) => p,
        None => {
            computed = rows(softmax_last(&sparse_logits(model, &tokens, &ci.lower)?)?)?;
            &computed[..]
        }
    };
    let mut predictions = Vec::with_capacity(t);
    let mut kl = Vec::with_capacity(t);
    for s in 0..t {
        let p = &probs[s];
        let mut order: Vec<u32> = (0..p.len() as u32).collect();
        let k = iv.top_k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |a, b| {
                p[*b as usize].total_cmp(&p[*a as usize]).then(a.cmp(b))
            });
        }
        order.truncate(k);
        order.sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]).then(a.cmp(b)));
        predictions.push(
            order
                .into_iter()
                .map(|id| {
                    let i = id as usize;
                    Prediction {
                        token: id,
                        prob: p[i],
                        logit: logits[s][i],
                        target_prob: ci.target_probs[s][i],
                        target_logit: ci.target_logits[s][i],
                        ci_masked_prob: ci_masked[s][i],
                    }
                })
                .collect(),
        );
        kl.push(kl_divergence(&ci.target_logits[s], &logits[s]));
    }
    Ok(InterventionResult {
        tokens: ci.tokens.clone(),
        predictions,
        kl,
    })
}

/// The masked forward without deltas of `masks` (`[module][pos][c]`), touching only the columns
/// some position turns on: a kept circuit, or the CI (which is mostly 0), costs a few dot
/// products per module instead of two `[T, d] × [d, C]` products.
fn sparse_logits(
    model: &SpdModel,
    tokens: &Tensor,
    masks: &[Vec<Vec<f32>>],
) -> candle_core::Result<Tensor> {
    let device = model.device();
    let cols: Vec<Vec<usize>> = masks
        .iter()
        .map(|m| {
            let c = m.first().map_or(0, Vec::len);
            (0..c)
                .filter(|&j| m.iter().any(|row| row[j] != 0.0))
                .collect()
        })
        .collect();
    // Where most columns are on somewhere (the CI of a long prompt), the plain products win.
    let (on, total) = cols.iter().zip(masks).fold((0, 0), |(a, b), (c, m)| {
        (a + c.len(), b + m.first().map_or(0, Vec::len))
    });
    if 2 * on > total {
        let dense = masks
            .iter()
            .map(|m| {
                let c = m.first().map_or(0, Vec::len);
                Tensor::from_vec(m.concat(), (1, m.len(), c), &Device::Cpu)?.to_device(device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        return model.masked_logits(tokens, &dense, false);
    }
    let subsets = model.column_subsets(&cols)?;
    let on = masks
        .iter()
        .zip(&cols)
        .map(|(m, cols)| {
            if cols.is_empty() {
                return Ok(None);
            }
            let data: Vec<f32> = m
                .iter()
                .flat_map(|row| cols.iter().map(|&j| row[j]))
                .collect();
            Tensor::from_vec(data, (1, m.len(), cols.len()), device).map(Some)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    model.subset_logits(tokens, &subsets, &on)
}

/// `KL(softmax(p) ‖ softmax(q))` of two logit rows, in float64 from log-softmax (so tokens the
/// intervened model gives probability 0 in float32 do not make it infinite).
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
        let z = x.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|v| *v as f64 - z).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}
