//! Trains the target GPT2Simple on the story corpus: GPT-2 initialisation, AdamW with warm-up and
//! cosine decay, random windows of the EOS-joined token stream. The forward is `model::transformer`'s
//! own, run on tensors that are views of the trained variables.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Result, Tensor, Var};

use crate::model::checkpoint::TensorFile;
use crate::model::synthetic::Rng;
use crate::model::transformer::Gpt2Config;
use crate::model::transformer::{ModuleKind, PlainForward, TargetConfig, Transformer};
use crate::nn::{self, AdamW};

#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub cfg: Gpt2Config,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub seed: u64,
}

/// The target's parameters under GPT2Simple's state-dict names (`wte.weight`, `h.0.attn.q_proj.weight`, …).
pub struct TargetParams {
    pub cfg: Gpt2Config,
    pub vars: Vec<(String, Var)>,
}

impl TargetParams {
    /// GPT-2's initialisation: N(0, 0.02²), residual projections scaled by 1/√(2·n_layer), zero
    /// biases, unit LayerNorms. `lm_head` is tied to `wte`.
    pub fn init(cfg: Gpt2Config, rng: &mut Rng) -> Result<Self> {
        let d = cfg.n_embd;
        let mut vars = Vec::new();
        let mut add = |name: String, t: Tensor| -> Result<()> {
            vars.push((name, Var::from_tensor(&t)?));
            Ok(())
        };
        add(
            "wte.weight".into(),
            nn::randn(rng, &[cfg.vocab_size, d], 0.02)?,
        )?;
        add(
            "wpe.weight".into(),
            nn::randn(rng, &[cfg.block_size, d], 0.01)?,
        )?;
        let resid_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let ones = Tensor::ones(d, candle_core::DType::F32, &Device::Cpu)?;
        let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu);
        for i in 0..cfg.n_layer {
            for ln in ["ln_1", "ln_2"] {
                add(format!("h.{i}.{ln}.weight"), ones.clone())?;
                add(format!("h.{i}.{ln}.bias"), zeros(d)?)?;
            }
            for kind in ModuleKind::ALL {
                let (d_in, d_out) = match kind {
                    ModuleKind::CFc => (d, 4 * d),
                    ModuleKind::Down => (4 * d, d),
                    _ => (d, d),
                };
                let std = match kind {
                    ModuleKind::O | ModuleKind::Down => resid_std,
                    _ => 0.02,
                };
                let p = format!("h.{i}.{}", kind.suffix());
                add(format!("{p}.weight"), nn::randn(rng, &[d_out, d_in], std)?)?;
                add(format!("{p}.bias"), zeros(d_out)?)?;
            }
        }
        add("ln_f.weight".into(), ones)?;
        add("ln_f.bias".into(), zeros(d)?)?;
        Ok(Self { cfg, vars })
    }

    /// The current values by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// A GPT2Simple whose weights are (differentiable) views of the variables.
    pub fn model(&self) -> Result<Transformer> {
        let f = TensorFile::from_map(PathBuf::from("<training>"), self.tensors());
        Transformer::new(TargetConfig::gpt2_simple(self.cfg), &f).map_err(candle_core::Error::wrap)
    }
}

/// Random training windows of `block_size + 1` tokens: inputs and next-token targets, `[B, T]` each.
pub fn batch(
    stream: &[u32],
    block_size: usize,
    n: usize,
    rng: &mut Rng,
) -> Result<(Tensor, Tensor)> {
    let (mut x, mut y) = (
        Vec::with_capacity(n * block_size),
        Vec::with_capacity(n * block_size),
    );
    for _ in 0..n {
        let s = rng.below(stream.len() - block_size - 1);
        x.extend_from_slice(&stream[s..s + block_size]);
        y.extend_from_slice(&stream[s + 1..s + block_size + 1]);
    }
    Ok((
        Tensor::from_vec(x, (n, block_size), &Device::Cpu)?,
        Tensor::from_vec(y, (n, block_size), &Device::Cpu)?,
    ))
}

/// Consecutive held-out windows (inputs, targets) of a token stream, at most `max` of them.
pub fn eval_windows(stream: &[u32], block_size: usize, max: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..max)
        .map(|i| i * block_size)
        .take_while(|s| s + block_size < stream.len())
        .map(|s| {
            (
                stream[s..s + block_size].to_vec(),
                stream[s + 1..s + block_size + 1].to_vec(),
            )
        })
        .collect()
}

/// Mean next-token loss of `model` over `windows`, in batches.
pub fn eval_loss(model: &Transformer, windows: &[(Vec<u32>, Vec<u32>)]) -> Result<f64> {
    let t = model.cfg.block_size;
    let mut total = 0.0;
    for chunk in windows.chunks(32) {
        let x: Vec<u32> = chunk.iter().flat_map(|w| w.0.clone()).collect();
        let y: Vec<u32> = chunk.iter().flat_map(|w| w.1.clone()).collect();
        let x = Tensor::from_vec(x, (chunk.len(), t), &Device::Cpu)?;
        let y = Tensor::from_vec(y, (chunk.len(), t), &Device::Cpu)?;
        let logits = model.forward(&x, &mut PlainForward)?;
        total += nn::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / windows.len() as f64)
}

/// What training reports.
#[derive(Debug, Clone, Default)]
pub struct TargetReport {
    /// Mean training loss over the last 50 steps.
    pub train_loss: f64,
    pub heldout_loss: f64,
    /// `(step, train loss of the step, held-out loss)` at every evaluation.
    pub curve: Vec<(usize, f64, f64)>,
}

/// Trains a target on `train` (an EOS-joined token stream), evaluating on `heldout` windows.
pub fn train(
    spec: &TargetSpec,
    train: &[u32],
    heldout: &[(Vec<u32>, Vec<u32>)],
    log: &mut dyn FnMut(&str),
) -> Result<(TargetParams, TargetReport)> {
    let mut rng = Rng::new(spec.seed);
    let params = TargetParams::init(spec.cfg, &mut rng)?;
    // Decay matrices only, as GPT-2 training does.
    let vars = params
        .vars
        .iter()
        .map(|(_, v)| {
            let wd = if v.as_tensor().rank() == 2 {
                spec.weight_decay
            } else {
                0.0
            };
            (v.clone(), wd)
        })
        .collect();
    let mut opt = AdamW::new(vars)?;
    opt.beta2 = 0.99;
    let mut report = TargetReport::default();
    let mut recent = Vec::new();
    for step in 0..spec.steps {
        let lr = lr_at(step, spec.steps, spec.warmup, spec.lr);
        let (x, y) = batch(train, spec.cfg.block_size, spec.batch, &mut rng)?;
        let model = params.model()?;
        let loss = nn::cross_entropy(&model.forward(&x, &mut PlainForward)?, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads, lr, Some(1.0))?;
        let l = loss.to_scalar::<f32>()? as f64;
        recent.push(l);
        if recent.len() > 50 {
            recent.remove(0);
        }
        if (step + 1) % 250 == 0 || step + 1 == spec.steps {
            let held = eval_loss(&params.model()?, heldout)?;
            report.curve.push((step + 1, l, held));
            log(&format!(
                "target step {:>5}/{}: train {l:.4}, held-out {held:.4}, lr {lr:.2e}",
                step + 1,
                spec.steps
            ));
        }
    }
    report.train_loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
    report.heldout_loss = report.curve.last().map_or(f64::NAN, |c| c.2);
    Ok((params, report))
}

/// Linear warm-up to `peak`, then cosine decay to a tenth of it.
pub fn lr_at(step: usize, steps: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let frac = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
    peak * (0.1 + 0.9 * cos)
}
