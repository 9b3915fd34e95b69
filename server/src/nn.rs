//! The training pieces the demo's two stages and the CI optimiser share: AdamW, the losses, the
//! lower-leaky hard sigmoid with the original's backward, and seeded initialisation.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Layout, Result, Shape, Tensor, Var};

use crate::model::synthetic::Rng;

/// Leak slope of the leaky hard sigmoids (as the original and `model::ci`).
pub const ALPHA: f64 = 0.01;

/// `N(0, std²)` values as a tensor, from `rng`.
pub fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// `U(0, 1)` values as a tensor, from `rng`.
pub fn rand_uniform(rng: &mut Rng, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// AdamW (decoupled weight decay), one decay rate per variable.
pub struct AdamW {
    vars: Vec<(Var, f64)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    /// `vars` with their weight decay.
    pub fn new(vars: Vec<(Var, f64)>) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(|(v, _)| zeros(v)).collect::<Result<_>>()?;
        let v = vars.iter().map(|(v, _)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One update with learning rate `lr`, after scaling all gradients so their global norm is at
    /// most `clip` (if given). Returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: Option<f64>) -> Result<f64> {
        self.t += 1;
        let mut sq = 0f64;
        for (var, _) in &self.vars {
            if let Some(g) = grads.get(var) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        let scale = match clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, (var, wd)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            // Detached, or each step's moments would keep every earlier step's graph alive.
            let g = (g.detach() * scale)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?.detach();
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let step = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.eps)?)?;
            let w = var.as_tensor().detach();
            let w = ((&w * (1.0 - lr * wd))? - (step * lr)?)?;
            var.set(&w)?;
        }
        Ok(norm)
    }
}

/// Log-softmax over the last dim.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits` (`[B, T, V]`) against token ids `targets` (`[B, T]`, u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logp = log_softmax(&logits.reshape(((), v))?)?;
    let idx = targets.flatten_all()?.unsqueeze(1)?;
    logp.gather(&idx, 1)?.neg()?.mean_all()
}

/// Mean over positions of `KL(target ‖ model)`, from the target's log-probabilities (constants) and
/// the model's logits.
pub fn kl_to_target(target_logp: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logp = log_softmax(&logits.reshape(((), v))?)?;
    let t = target_logp.reshape(((), v))?;
    (t.exp()? * (&t - logp)?)?.sum(1)?.mean_all()
}

/// The lower-leaky hard sigmoid: `clamp(z, 0, 1)` forward; backward (as the original's
/// `LowerLeakyHardSigmoid`) `α·g` where `z ≤ 0` and `g < 0`, `g` where `0 < z ≤ 1`, else 0, so a
/// closed component can be reopened by the loss but is never pushed further shut.
pub struct LowerLeaky;

impl CustomOp1 for LowerLeaky {
    fn name(&self) -> &'static str {
        "lower-leaky-hard-sigmoid"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("lower-leaky: expected f32 values");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("lower-leaky: expected a contiguous input");
        };
        let out: Vec<f32> = data[start..end].iter().map(|z| z.clamp(0.0, 1.0)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, z: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let zeros = g.zeros_like()?;
        let closed = g.lt(0f32)?.where_cond(&(g * ALPHA)?, &zeros)?;
        let open = z.le(1f32)?.where_cond(g, &zeros)?;
        Ok(Some(z.le(0f32)?.where_cond(&closed, &open)?))
    }
}

pub fn lower_leaky(z: &Tensor) -> Result<Tensor> {
    z.contiguous()?.apply_op1(LowerLeaky)
}

/// The upper-leaky hard sigmoid, `z > 1 ? 1 + α(z − 1) : clamp(z, 0, 1)`, by plain autograd.
pub fn upper_leaky(z: &Tensor) -> Result<Tensor> {
    z.relu()? - ((z - 1.0)?.relu()? * (1.0 - ALPHA))?
}

/// Sum of all elements as an `f64` (for logging).
pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_leaky_backward_follows_the_original() {
        let z = Var::new(&[-1.0f32, -1.0, 0.5, 0.5, 2.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[-2.0f32, 3.0, -2.0, 3.0, 5.0], &Device::Cpu).unwrap();
        let y = lower_leaky(z.as_tensor()).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, 0.0, 0.5, 0.5, 1.0]);
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dz = grads.get(&z).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dz, vec![-0.02, 0.0, -2.0, 3.0, 0.0]);
    }

    #[test]
    fn upper_leaky_matches_the_inference_formula() {
        let z = Tensor::new(&[-2.0f32, 0.3, 1.0, 2.0, 11.0], &Device::Cpu).unwrap();
        let ours = upper_leaky(&z).unwrap().to_vec1::<f32>().unwrap();
        let theirs = crate::model::ci::upper_ci(crate::model::config::SigmoidType::LeakyHard, &z)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{ours:?} vs {theirs:?}");
        }
    }
}
