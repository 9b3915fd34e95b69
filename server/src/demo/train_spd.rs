//! Stochastic parameter decomposition of the target, as the original method trains it: every
//! projection `W` gets `C` rank-one components (`V`, `U`) and a shared-MLP causal-importance function.
//! A faithfulness warm-up first fits `(V U)ᵀ` to `W`; then each step minimises
//! - stochastic reconstruction: KL from the target's output to the model with masks
//!   `CI + (1 − CI)·U(0, 1)` on a random subset of modules (and, as a second term, on all of them),
//! - importance minimality: `Σ (CI_upper + ε)^p`, `p` annealed from 2 down to `p_end`,
//! - faithfulness `‖W − (V U)ᵀ‖²` (mean over the target's decomposed weights), kept small,
//! - optionally, CI-masked reconstruction: the same KL with mask = CI on every module.

use std::collections::HashMap;

use candle_core::{D, Device, Result, Tensor, Var};

use super::train_target::batch;
use crate::model::synthetic::Rng;
use crate::model::transformer::{
    Linear, LinearHook, ModuleId, ModuleKind, PlainForward, Transformer, matmul_last,
};
use crate::nn::{self, AdamW};

#[derive(Debug, Clone)]
pub struct SpdSpec {
    pub c: usize,
    pub ci_hidden: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub faithfulness_warmup_steps: usize,
    pub faithfulness_warmup_lr: f64,
    pub faithfulness_coeff: f64,
    pub importance_coeff: f64,
    /// Coefficient of the CI-masked reconstruction (mask = CI on every module, no noise); 0 leaves it out.
    pub ci_masked_coeff: f64,
    pub p_start: f64,
    pub p_end: f64,
    pub eps: f64,
    pub seed: u64,
}

/// One decomposed projection's trainable tensors.
pub struct ModuleParams {
    pub id: ModuleId,
    /// `[d_in, C]`
    pub v: Var,
    /// `[C, d_out]`
    pub u: Var,
    /// The shared-MLP CI function: `d_in → hidden → C`, `W` as `[in, out]`.
    pub ci: [(Var, Var); 2],
}

pub struct SpdParams {
    pub modules: Vec<ModuleParams>,
}

impl SpdParams {
    pub fn init(target: &Transformer, spec: &SpdSpec, rng: &mut Rng) -> Result<Self> {
        let c = spec.c;
        let mut modules = Vec::new();
        for id in target.module_ids() {
            let lin = target.linear(id);
            let (d_in, d_out) = (lin.d_in(), lin.d_out());
            let var = |t: Tensor| Var::from_tensor(&t);
            let h = spec.ci_hidden;
            modules.push(ModuleParams {
                id,
                v: var(nn::randn(rng, &[d_in, c], 1.0 / (d_in as f64).sqrt())?)?,
                u: var(nn::randn(rng, &[c, d_out], 0.1 / (c as f64).sqrt())?)?,
                ci: [
                    (
                        var(nn::randn(rng, &[d_in, h], (2.0 / d_in as f64).sqrt())?)?,
                        var(Tensor::zeros(h, candle_core::DType::F32, &Device::Cpu)?)?,
                    ),
                    (
                        var(nn::randn(rng, &[h, c], (1.0 / h as f64).sqrt())?)?,
                        var(Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu)?)?,
                    ),
                ],
            });
        }
        Ok(Self { modules })
    }

    /// The tensors under the original checkpoint's keys (`_components.h-0-attn-q_proj.V`,
    /// `_ci_fns.h-0-attn-q_proj.layers.0.W`, …).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for m in &self.modules {
            let dash = m.id.name().replace('.', "-");
            out.insert(format!("_components.{dash}.V"), m.v.as_tensor().clone());
            out.insert(format!("_components.{dash}.U"), m.u.as_tensor().clone());
            for (i, (w, b)) in m.ci.iter().enumerate() {
                out.insert(
                    format!("_ci_fns.{dash}.layers.{}.W", 2 * i),
                    w.as_tensor().clone(),
                );
                out.insert(
                    format!("_ci_fns.{dash}.layers.{}.b", 2 * i),
                    b.as_tensor().clone(),
                );
            }
        }
        out
    }

    fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| {
                [m.v.clone(), m.u.clone()]
                    .into_iter()
                    .chain(m.ci.iter().flat_map(|(w, b)| [w.clone(), b.clone()]))
            })
            .collect()
    }

    /// The CI network's output before the sigmoid, `[B, T, C]`, from the module input.
    fn ci_pre(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let [(w0, b0), (w1, b1)] = &self.modules[i].ci;
        let h = matmul_last(x, w0)?.broadcast_add(b0)?.gelu_erf()?;
        matmul_last(&h, w1)?.broadcast_add(b1)
    }

    /// `Σ ‖W − (V U)ᵀ‖²` over modules, divided by the number of weights.
    fn faithfulness(&self, target: &Transformer) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        let mut n = 0usize;
        for m in &self.modules {
            let wt = &target.linear(m.id).wt;
            n += wt.elem_count();
            let sq = (m.v.as_tensor().matmul(m.u.as_tensor())? - wt)?
                .sqr()?
                .sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        total.expect("at least one module") / n as f64
    }
}

/// The index of a projection among all of them (every projection is decomposed).
fn module_index(id: ModuleId) -> usize {
    id.block * ModuleKind::ALL.len() + id.kind as usize
}

/// Records every projection's input in the target forward.
struct Record(Vec<Option<Tensor>>);

impl LinearHook for Record {
    fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        self.0[module_index(id)] = Some(x.clone());
        PlainForward.linear(id, x, linear)
    }
}

/// Routes the modules that have a mask through their components, `(x V ⊙ mask) U + b`.
struct Masked<'a> {
    params: &'a SpdParams,
    masks: &'a [Option<Tensor>],
}

impl LinearHook for Masked<'_> {
    fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        let i = module_index(id);
        let Some(mask) = &self.masks[i] else {
            return PlainForward.linear(id, x, linear);
        };
        let m = &self.params.modules[i];
        let acts = matmul_last(x, m.v.as_tensor())?;
        let y = matmul_last(&(acts * mask)?, m.u.as_tensor())?;
        match &linear.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The training batch's losses at a logged step; `kl_ci_masked` and `l0` (components with CI > 0.1
/// per token, all modules) are of the model with mask = CI on every module.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SpdLogRow {
    pub step: usize,
    pub kl_subset: f64,
    pub kl_all: f64,
    pub kl_ci_masked: f64,
    pub l0: f64,
    pub importance: f64,
    pub faithfulness: f64,
    pub p: f64,
}

#[derive(Debug, Clone, Default)]
pub struct SpdReport {
    pub warmup_faithfulness: f64,
    pub curve: Vec<SpdLogRow>,
}

/// Decomposes `target` on windows of the token stream `train`.
pub fn train(
    spec: &SpdSpec,
    target: &Transformer,
    train: &[u32],
    log: &mut dyn FnMut(&str),
) -> Result<(SpdParams, SpdReport)> {
    let mut rng = Rng::new(spec.seed);
    let params = SpdParams::init(target, spec, &mut rng)?;
    let mut report = SpdReport::default();

    // Faithfulness warm-up: V and U only.
    let vu: Vec<(Var, f64)> = params
        .modules
        .iter()
        .flat_map(|m| [(m.v.clone(), 0.0), (m.u.clone(), 0.0)])
        .collect();
    let mut opt = AdamW::new(vu)?;
    for step in 0..spec.faithfulness_warmup_steps {
        let loss = params.faithfulness(target)?;
        opt.step(&loss.backward()?, spec.faithfulness_warmup_lr, None)?;
        if step + 1 == spec.faithfulness_warmup_steps {
            report.warmup_faithfulness = loss.to_scalar::<f32>()? as f64;
            log(&format!(
                "faithfulness warm-up: {step} steps, loss {:.3e}",
                report.warmup_faithfulness
            ));
        }
    }

    let n = params.modules.len();
    let block = target.cfg.block_size;
    let mut opt = AdamW::new(params.vars().into_iter().map(|v| (v, 0.0)).collect())?;
    for step in 0..spec.steps {
        let frac = step as f64 / spec.steps.max(1) as f64;
        let p = spec.p_start + (spec.p_end - spec.p_start) * frac;
        // Constant, then linear decay over the last fifth.
        let lr = spec.lr * ((1.0 - frac) / 0.2).clamp(0.05, 1.0);
        let (x, _) = batch(train, block, spec.batch, &mut rng)?;
        let mut rec = Record(vec![None; n]);
        let target_logp = nn::log_softmax(&target.forward(&x, &mut rec)?)?.detach();
        let inputs: Vec<Tensor> = rec
            .0
            .into_iter()
            .map(|x| x.expect("every module runs"))
            .collect();

        let mut lower = Vec::with_capacity(n);
        let mut importance: Option<Tensor> = None;
        for (i, x) in inputs.iter().enumerate() {
            let z = params.ci_pre(i, x)?;
            lower.push(nn::lower_leaky(&z)?);
            let imp = (nn::upper_leaky(&z)? + spec.eps)?
                .powf(p)?
                .sum(D::Minus1)?
                .mean_all()?;
            importance = Some(match importance {
                Some(t) => (t + imp)?,
                None => imp,
            });
        }
        let importance = importance.expect("modules");
        // KL to the target of the model whose masked modules run through their components.
        let kl_masked = |masks: &[Option<Tensor>]| -> Result<Tensor> {
            let logits = target.forward(
                &x,
                &mut Masked {
                    params: &params,
                    masks,
                },
            )?;
            nn::kl_to_target(&target_logp, &logits)
        };
        let stochastic = |subset: &[bool], rng: &mut Rng| -> Result<Tensor> {
            let masks: Vec<Option<Tensor>> = lower
                .iter()
                .zip(subset)
                .map(|(ci, &on)| {
                    on.then(|| -> Result<Tensor> {
                        let r = nn::rand_uniform(rng, ci.dims())?;
                        ci + ((1.0 - ci)? * r)?
                    })
                    .transpose()
                })
                .collect::<Result<_>>()?;
            kl_masked(&masks)
        };
        // Uniform-k subset routing: k uniform in 1..=n, then k modules at random.
        let k = 1 + rng.below(n);
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + rng.below(n - i);
            order.swap(i, j);
        }
        let mut subset = vec![false; n];
        for &i in &order[..k] {
            subset[i] = true;
        }
        let kl_subset = stochastic(&subset, &mut rng)?;
        let kl_all = stochastic(&vec![true; n], &mut rng)?;
        let faith = params.faithfulness(target)?;
        let mut loss = (((&kl_subset + &kl_all)? + (&importance * spec.importance_coeff)?)?
            + (&faith * spec.faithfulness_coeff)?)?;
        if spec.ci_masked_coeff > 0.0 {
            let masks: Vec<Option<Tensor>> = lower.iter().cloned().map(Some).collect();
            loss = (loss + (kl_masked(&masks)? * spec.ci_masked_coeff)?)?;
        }
        opt.step(&loss.backward()?, lr, Some(1.0))?;
        if (step + 1) % 50 == 0 || step + 1 == spec.steps {
            // The CI-masked model (mask = CI on every module) on this batch, and active components.
            let masks: Vec<Option<Tensor>> = lower.iter().map(|l| Some(l.detach())).collect();
            let kl_ci = nn::scalar(&kl_masked(&masks)?)?;
            let tokens = (spec.batch * block) as f64;
            let mut l0 = 0.0;
            for l in &lower {
                l0 += nn::scalar(&l.gt(0.1f32)?.to_dtype(candle_core::DType::F32)?)? / tokens;
            }
            let row = SpdLogRow {
                step: step + 1,
                kl_subset: nn::scalar(&kl_subset)?,
                kl_all: nn::scalar(&kl_all)?,
                kl_ci_masked: kl_ci,
                l0,
                importance: nn::scalar(&importance)?,
                faithfulness: nn::scalar(&faith)?,
                p,
            };
            log(&format!(
                "spd step {:>5}/{}: kl subset {:.4}, kl all {:.4}, kl ci-masked {:.4}, L0 {:.1}, importance {:.2}, faithfulness {:.2e}, p {:.2}",
                row.step,
                spec.steps,
                row.kl_subset,
                row.kl_all,
                row.kl_ci_masked,
                row.l0,
                row.importance,
                row.faithfulness,
                row.p
            ));
            report.curve.push(row);
        }
    }
    Ok((params, report))
}
