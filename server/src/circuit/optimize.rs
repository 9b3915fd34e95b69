//! CI optimised for one prediction (SPEC §7, spd's `optim_cis.py`): starting from the model's own
//! CI on a prompt, the pre-sigmoid CI of every (position, component) pair alive at the start
//! (CI > 0) is optimised so that a label token stays predicted at one position (cross-entropy) or
//! the target's distribution there is kept (KL), with as few components as the importance-
//! minimality term allows. Pairs not alive at the start stay at pre-sigmoid 0, i.e. off.
//!
//! AdamW at a constant learning rate: the original builds its config with `lr_schedule =
//! "cosine"` and a warm-up, but its loop never applies a schedule, so every step runs at `lr`. The
//! gradient comes from candle's autograd through the CI-masked forward (no deltas for `ci` masks;
//! spd's stochastic masks with deltas for `stochastic`).

use std::ops::ControlFlow;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};

use crate::attribution::PromptCi;
use crate::model::synthetic::Rng;
use crate::model::transformer::{softmax_last, tokens_tensor};
use crate::model::{RunError, SpdModel};
use crate::nn::{AdamW, log_softmax, lower_leaky, upper_leaky};

/// `eps` of spd's importance-minimality loss.
const IMP_MIN_EPS: f64 = 1e-12;

/// What the reconstruction term asks of the position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Recon {
    /// Cross-entropy of this token.
    Ce { label: u32 },
    /// `KL(target ‖ masked)` of the distributions.
    Kl,
}

/// Which masks the reconstruction forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskType {
    /// The CI itself (lower leaky), no deltas.
    Ci,
    /// `ci + (1 − ci)·u`, `u ~ U(0, 1)` per entry, plus each module's delta scaled by a `U(0, 1)`
    /// per position (spd's continuous stochastic masks).
    Stochastic,
}

/// Where the adversary's sources start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgdInit {
    Random,
    Ones,
    Zeroes,
}

/// The adversary (spd's `AdvPGDConfig`): sources `s ∈ [0, 1]` on alive pairs, masks
/// `ci + (1 − ci)·s`, `n_steps` of signed gradient ascent of the reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pgd {
    pub n_steps: usize,
    pub step_size: f64,
    pub init: PgdInit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    /// The position whose prediction is kept.
    pub position: usize,
    pub recon: Recon,
    pub loss_coeff: f64,
    pub imp_min_coeff: f64,
    pub pnorm: f64,
    pub beta: f64,
    pub steps: usize,
    pub lr: f64,
    pub mask_type: MaskType,
    pub pgd: Option<Pgd>,
    /// Seeds the stochastic masks and the adversary's random start.
    pub seed: u64,
}

impl OptimConfig {
    /// The original app's settings for a CE graph: lr 1e-2, loss coefficient 1, β 0, CI masks.
    pub fn ce(position: usize, label: u32, steps: usize, imp_min_coeff: f64, pnorm: f64) -> Self {
        Self {
            position,
            recon: Recon::Ce { label },
            loss_coeff: 1.0,
            imp_min_coeff,
            pnorm,
            beta: 0.0,
            steps,
            lr: 1e-2,
            mask_type: MaskType::Ci,
            pgd: None,
            seed: 0,
        }
    }

    /// Refuses what the original refuses, and what would make the loss meaningless.
    pub fn check(&self, model: &SpdModel, len: usize) -> Result<(), String> {
        if self.position >= len {
            return Err(format!(
                "loss position {} is out of range for a prompt of {len} tokens",
                self.position
            ));
        }
        if let Recon::Ce { label } = self.recon
            && label as usize >= model.vocab_size()
        {
            return Err(format!(
                "label token {label} is out of the vocabulary (size {})",
                model.vocab_size()
            ));
        }
        if self.steps == 0 || self.steps > 100_000 {
            return Err(format!("steps must be in 1..=100000, not {}", self.steps));
        }
        let finite = [
            ("loss_coeff", self.loss_coeff, false),
            ("imp_min_coeff", self.imp_min_coeff, true),
            ("pnorm", self.pnorm, false),
            ("beta", self.beta, true),
            ("lr", self.lr, false),
        ];
        for (name, v, zero_ok) in finite {
            if !v.is_finite() || v < 0.0 || (v == 0.0 && !zero_ok) {
                return Err(format!(
                    "{name} must be finite and {}, not {v}",
                    if zero_ok { "≥ 0" } else { "> 0" }
                ));
            }
        }
        if let Some(p) = &self.pgd
            && (p.n_steps == 0 || !p.step_size.is_finite() || p.step_size <= 0.0)
        {
            return Err("PGD needs n_steps > 0 and a finite step size > 0".into());
        }
        Ok(())
    }
}

/// One optimisation step, as reported while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    /// Σ over modules of the mean number of components with CI > 0 per position.
    pub l0: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// The label's probability under the optimised CI mask (CE only).
    pub ci_masked_label_prob: Option<f32>,
    /// Under one stochastic mask (CE only).
    pub stoch_masked_label_prob: Option<f32>,
    /// Under the adversary's mask, where PGD is configured (CE only).
    pub adv_pgd_label_prob: Option<f32>,
    pub l0_total: f64,
}

#[derive(Debug, Clone)]
pub struct Optimized {
    /// `[module][position][c]`, as [`PromptCi`]'s.
    pub pre_sigmoid: Vec<Vec<Vec<f32>>>,
    pub lower: Vec<Vec<Vec<f32>>>,
    pub upper: Vec<Vec<Vec<f32>>>,
    /// `[module][position]`: pairs alive at the start (the optimised ones).
    pub alive_counts: Vec<Vec<usize>>,
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{0}")]
    Config(String),
    #[error("the optimisation was cancelled at step {0}")]
    Cancelled(usize),
    #[error(transparent)]
    Run(#[from] RunError),
}

impl From<candle_core::Error> for OptimError {
    fn from(e: candle_core::Error) -> Self {
        Self::Run(RunError::Candle(e))
    }
}

/// Optimises the CI of the prompt `ci` was computed on. `progress` sees every step and may stop
/// the run (`ControlFlow::Break`).
pub fn optimize(
    model: &SpdModel,
    ci: &PromptCi,
    cfg: &OptimConfig,
    progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
) -> Result<Optimized, OptimError> {
    let t = ci.tokens.len();
    cfg.check(model, t).map_err(OptimError::Config)?;
    if !model.device().is_cpu() {
        // The lower-leaky sigmoid's backward is a CPU op.
        return Err(OptimError::Config(
            "CI optimisation runs on CPU models".into(),
        ));
    }
    let dev = Device::Cpu;
    let tokens = tokens_tensor(&ci.tokens, &dev)?;
    let mut rng = Rng::new(cfg.seed);
    let dense = |rows: &[Vec<f32>]| -> candle_core::Result<Tensor> {
        let c = rows.first().map_or(0, Vec::len);
        Tensor::from_vec(rows.concat(), (1, t, c), &dev)
    };
    // Only pairs alive at the start can be on, so everything runs on each module's alive columns
    // (a column alive at some position; column 0 where none is, so no tensor is empty): the
    // variables, the masks and the CI forward's products. The other columns stay at pre-sigmoid
    // 0, whose only trace is a constant in the importance-minimality term.
    let cols: Vec<Vec<usize>> = ci
        .lower
        .iter()
        .map(|m| {
            let c = m.first().map_or(0, Vec::len);
            let on: Vec<usize> = (0..c)
                .filter(|&j| m.iter().any(|row| row[j] > 0.0))
                .collect();
            if on.is_empty() { vec![0] } else { on }
        })
        .collect();
    let subsets = model.column_subsets(&cols)?;
    let gather = |rows: &[Vec<f32>], cols: &[usize]| -> Vec<Vec<f32>> {
        rows.iter()
            .map(|r| cols.iter().map(|&j| r[j]).collect())
            .collect()
    };
    // Alive pairs as 0/1 masks; the variables start at the model's pre-sigmoid CI there, 0 off.
    let mut alive = Vec::new();
    let mut vars = Vec::new();
    for ((lower, pre), cols) in ci.lower.iter().zip(&ci.pre_sigmoid).zip(&cols) {
        let on: Vec<Vec<f32>> = gather(lower, cols)
            .iter()
            .map(|r| r.iter().map(|v| f32::from(*v > 0.0)).collect())
            .collect();
        let start: Vec<Vec<f32>> = gather(pre, cols)
            .iter()
            .zip(&on)
            .map(|(p, o)| p.iter().zip(o).map(|(p, o)| p * o).collect())
            .collect();
        alive.push(dense(&on)?);
        vars.push(Var::from_tensor(&dense(&start)?)?);
    }
    // What the columns left out add to the importance-minimality term: per column a mean of
    // `ε^p` (and its β part).
    let left_out: f64 = {
        let e = IMP_MIN_EPS.powf(cfg.pnorm);
        let per_column = e + cfg.beta * e * (1.0 + t as f64 * e).log2();
        model
            .modules
            .iter()
            .zip(&cols)
            .map(|(m, c)| (m.components.c() - c.len()) as f64 * per_column)
            .sum()
    };
    // The CI-masked forward of masks on the alive columns.
    let ci_logits = |masks: &[Tensor]| -> candle_core::Result<Tensor> {
        let on: Vec<Option<Tensor>> = masks.iter().map(|m| Some(m.clone())).collect();
        model.subset_logits(&tokens, &subsets, &on)
    };
    // Masks on the alive columns spread over every column (zeros elsewhere).
    let spread = |masks: &[Tensor]| -> candle_core::Result<Vec<Tensor>> {
        masks
            .iter()
            .zip(&subsets)
            .zip(&model.modules)
            .map(|((m, s), module)| {
                let s = s.as_ref().expect("every module has a column");
                Tensor::zeros((1, t, module.components.c()), DType::F32, &dev)?
                    .index_add(&s.index, m, 2)
            })
            .collect()
    };
    let target_logp = log_softmax(&dense(&ci.target_logits)?.i((0, cfg.position))?)?;
    let mut opt = AdamW::new(vars.iter().map(|v| (v.clone(), 0.0)).collect())?;
    // The adversary's masks `ci + (1 − ci)·s` for the CI `lower`.
    let adversarial = |pgd: &Pgd, lower: &[Tensor], rng: &mut Rng| {
        let sources = adversary(&ci_logits, lower, &alive, pgd, cfg, &target_logp, rng)?;
        interpolate(lower, &sources)
    };
    // The variables' pre-sigmoid CI (0 off the alive pairs) and its lower and upper leaky CI.
    type Ci = (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>);
    let ci_of = |vars: &[Var]| -> candle_core::Result<Ci> {
        let pre = vars
            .iter()
            .zip(&alive)
            .map(|(v, a)| v.as_tensor() * a)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lower = pre
            .iter()
            .map(lower_leaky)
            .collect::<candle_core::Result<_>>()?;
        let upper = pre
            .iter()
            .map(upper_leaky)
            .collect::<candle_core::Result<_>>()?;
        Ok((pre, lower, upper))
    };
    for step in 0..cfg.steps {
        let (_, lower, upper) = ci_of(&vars)?;
        let logits = match cfg.mask_type {
            MaskType::Ci => ci_logits(&lower)?,
            MaskType::Stochastic => stochastic_logits(model, &tokens, &spread(&lower)?, &mut rng)?,
        };
        let recon = recon_loss(&logits, cfg, &target_logp)?;
        let imp = (importance_minimality(&upper, cfg.pnorm, cfg.beta)? + left_out)?;
        let mut total = ((recon * cfg.loss_coeff)? + (imp * cfg.imp_min_coeff)?)?;
        if let Some(pgd) = &cfg.pgd {
            let masks = adversarial(pgd, &lower, &mut rng)?;
            let adv = recon_loss(&ci_logits(&masks)?, cfg, &target_logp)?;
            total = (total + (adv * cfg.loss_coeff)?)?;
        }
        let report = Progress {
            step,
            steps: cfg.steps,
            loss: total.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            l0: l0_total(&lower)?,
        };
        if progress(report).is_break() {
            return Err(OptimError::Cancelled(step));
        }
        let grads = total.backward()?;
        opt.step(&grads, cfg.lr, None)?;
    }

    let (pre, lower, upper) = ci_of(&vars)?;
    let label_prob = |logits: &Tensor| -> candle_core::Result<Option<f32>> {
        match cfg.recon {
            Recon::Ce { label } => Ok(Some(
                softmax_last(&logits.i((0, cfg.position))?)?
                    .i(label as usize)?
                    .to_scalar::<f32>()?,
            )),
            Recon::Kl => Ok(None),
        }
    };
    let ci_masked_label_prob = label_prob(&ci_logits(&lower)?)?;
    let stoch_masked_label_prob = label_prob(&stochastic_logits(
        model,
        &tokens,
        &spread(&lower)?,
        &mut rng,
    )?)?;
    let adv_pgd_label_prob = match &cfg.pgd {
        Some(pgd) => label_prob(&ci_logits(&adversarial(pgd, &lower, &mut rng)?)?)?,
        None => None,
    };
    let host = |ts: &[Tensor]| -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
        spread(ts)?
            .iter()
            .map(|t| t.squeeze(0)?.to_vec2())
            .collect()
    };
    let alive_counts = host(&alive)?
        .iter()
        .map(|m| {
            m.iter()
                .map(|r| r.iter().filter(|v| **v > 0.0).count())
                .collect()
        })
        .collect();
    Ok(Optimized {
        metrics: Metrics {
            ci_masked_label_prob,
            stoch_masked_label_prob,
            adv_pgd_label_prob,
            l0_total: l0_total(&lower)?,
        },
        pre_sigmoid: host(&pre)?,
        lower: host(&lower)?,
        upper: host(&upper)?,
        alive_counts,
    })
}

/// CE of the label at the position, or `KL(target ‖ masked)` there.
fn recon_loss(
    logits: &Tensor,
    cfg: &OptimConfig,
    target_logp: &Tensor,
) -> candle_core::Result<Tensor> {
    let logp = log_softmax(&logits.i((0, cfg.position))?)?;
    match cfg.recon {
        Recon::Ce { label } => logp.i(label as usize)?.neg(),
        Recon::Kl => (target_logp.exp()? * (target_logp - logp)?)?.sum_all(),
    }
}

/// spd's importance minimality: per module, per component the mean over positions of
/// `(upper + ε)^p`, plus `β · mean · log2(1 + sum)`, summed over components and modules.
fn importance_minimality(upper: &[Tensor], pnorm: f64, beta: f64) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for u in upper {
        let n = u.dims()[..u.rank() - 1].iter().product::<usize>() as f64;
        let sums = (u + IMP_MIN_EPS)?.powf(pnorm)?.sum(0)?.sum(0)?;
        let mean = (&sums / n)?;
        let mut layer = mean.sum_all()?;
        if beta != 0.0 {
            let log2 = ((sums + 1.0)?.log()? / std::f64::consts::LN_2)?;
            layer = (layer + ((mean * log2)?.sum_all()? * beta)?)?;
        }
        total = Some(match total {
            Some(t) => (t + layer)?,
            None => layer,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("no decomposed modules".into()))
}

/// Σ over modules of the mean over positions of the number of components with CI > 0, of CI as
/// [`PromptCi`] holds it (`[module][position][c]`).
pub fn l0(lower: &[Vec<Vec<f32>>]) -> f64 {
    lower
        .iter()
        .map(|m| {
            m.iter()
                .map(|r| r.iter().filter(|v| **v > 0.0).count() as f64)
                .sum::<f64>()
                / m.len().max(1) as f64
        })
        .sum()
}

/// [`l0`] of CI tensors (`[1, T, C]` per module).
fn l0_total(lower: &[Tensor]) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for l in lower {
        let on = l.detach().gt(0f32)?.to_dtype(DType::F64)?;
        total += on.sum(D::Minus1)?.mean_all()?.to_scalar::<f64>()?;
    }
    Ok(total)
}

/// The reconstruction forward under one of spd's continuous stochastic masks.
fn stochastic_logits(
    model: &SpdModel,
    tokens: &Tensor,
    lower: &[Tensor],
    rng: &mut Rng,
) -> candle_core::Result<Tensor> {
    let mut masks = Vec::with_capacity(lower.len());
    let mut delta_masks = Vec::with_capacity(lower.len());
    for l in lower {
        let u = crate::nn::rand_uniform(rng, l.dims())?;
        masks.push((l + ((1.0 - l)? * u)?)?);
        let (b, t, _) = l.dims3()?;
        delta_masks.push(crate::nn::rand_uniform(rng, &[b, t, 1])?);
    }
    model.masked_logits_scaled_deltas(tokens, &masks, &delta_masks)
}

/// `ci + (1 − ci)·s`.
fn interpolate(lower: &[Tensor], sources: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
    lower
        .iter()
        .zip(sources)
        .map(|(l, s)| l + ((1.0 - l)? * s)?)
        .collect()
}

/// spd's `_run_adv_pgd`: sources on alive pairs that maximise the reconstruction loss under
/// `ci + (1 − ci)·s` (CI detached), by `n_steps` of `s ← clamp(s + step·sign(∇), 0, 1)`;
/// `forward` is the masked forward (no deltas).
fn adversary(
    forward: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    lower: &[Tensor],
    alive: &[Tensor],
    pgd: &Pgd,
    cfg: &OptimConfig,
    target_logp: &Tensor,
    rng: &mut Rng,
) -> candle_core::Result<Vec<Tensor>> {
    let lower: Vec<Tensor> = lower.iter().map(Tensor::detach).collect();
    let mut sources = Vec::with_capacity(lower.len());
    for (l, a) in lower.iter().zip(alive) {
        let s = match pgd.init {
            PgdInit::Random => crate::nn::rand_uniform(rng, l.dims())?,
            PgdInit::Ones => l.ones_like()?,
            PgdInit::Zeroes => l.zeros_like()?,
        };
        sources.push(Var::from_tensor(&(s * a)?)?);
    }
    for _ in 0..pgd.n_steps {
        let s: Vec<Tensor> = sources.iter().map(|v| v.as_tensor().clone()).collect();
        let masks = interpolate(&lower, &s)?;
        let loss = recon_loss(&forward(&masks)?, cfg, target_logp)?;
        let grads = loss.backward()?;
        for (v, a) in sources.iter().zip(alive) {
            let Some(g) = grads.get(v) else { continue };
            let next =
                (v.as_tensor().detach() + (g.sign()? * pgd.step_size)?)?.clamp(0f32, 1f32)?;
            v.set(&(next * a)?)?;
        }
    }
    Ok(sources.iter().map(|v| v.as_tensor().detach()).collect())
}

/// The prompt as the optimised graph sees it: the tokens up to `position` with the optimised CI
/// in place of the model's (later tokens cannot reach the loss position).
pub fn optimized_prompt(
    model: &SpdModel,
    ci: &PromptCi,
    opt: &Optimized,
    position: usize,
) -> candle_core::Result<PromptCi> {
    let n = position + 1;
    let cut =
        |x: &[Vec<Vec<f32>>]| -> Vec<Vec<Vec<f32>>> { x.iter().map(|m| m[..n].to_vec()).collect() };
    let lower = cut(&opt.lower);
    let lower_tensors = lower
        .iter()
        .map(|m| {
            let c = m.first().map_or(0, Vec::len);
            Tensor::from_vec(m.concat(), (1, n, c), &Device::Cpu)?.to_device(model.device())
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(PromptCi {
        tokens: ci.tokens[..n].to_vec(),
        lower,
        upper: cut(&opt.upper),
        pre_sigmoid: cut(&opt.pre_sigmoid),
        target_logits: ci.target_logits[..n].to_vec(),
        target_probs: ci.target_probs[..n].to_vec(),
        lower_tensors,
    })
}
