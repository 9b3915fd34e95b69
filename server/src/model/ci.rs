//! Causal-importance functions: a small MLP per decomposed module that says, per token, how much each
//! component matters, followed by the configured sigmoid. Three network shapes, as in the original:
//! `shared_mlp` (one MLP `d_in → … → C`), `vector_mlp` (C MLPs `d_in → … → 1`) and `mlp` (C MLPs on the
//! component's own scalar act `1 → … → 1`). Hidden layers use the exact (erf) GELU.

use candle_core::{D, Result, Tensor};

use super::checkpoint::TensorFile;
use super::config::{CiFnType, SigmoidType};
use super::error::LoadError;
use super::transformer::matmul_last;

/// Leak slope of the leaky hard sigmoids.
const ALPHA: f64 = 0.01;

#[derive(Debug, Clone)]
pub struct CiFn {
    pub kind: CiFnType,
    /// `(W, b)` per Linear. shared: `W [in, out]`, `b [out]`; vector/mlp: `W [C, in, out]`, `b [C, 1, out]`.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl CiFn {
    /// Loads `<prefix><module with dashes>.layers.{0,2,…}.{W,b}` (prefix `_ci_fns.` for the oldest
    /// and `main` checkpoints, `ci_fn._ci_fns.` for `dev`) and checks every shape against the config.
    pub fn new(
        f: &TensorFile,
        prefix: &str,
        module: &str,
        kind: CiFnType,
        hidden: &[usize],
        d_in: usize,
        c: usize,
    ) -> std::result::Result<Self, LoadError> {
        let p = format!("{prefix}{}.layers", module.replace('.', "-"));
        let (first, last) = match kind {
            CiFnType::SharedMlp => (d_in, c),
            CiFnType::VectorMlp => (d_in, 1),
            CiFnType::Mlp => (1, 1),
        };
        let mut dims = vec![first];
        dims.extend_from_slice(hidden);
        dims.push(last);
        let mut layers = Vec::with_capacity(dims.len() - 1);
        for (i, w) in dims.windows(2).enumerate() {
            let (wk, bk) = (format!("{p}.{}.W", 2 * i), format!("{p}.{}.b", 2 * i));
            let layer = match kind {
                CiFnType::SharedMlp => (f.get(&wk, &[w[0], w[1]])?, f.get(&bk, &[w[1]])?),
                CiFnType::VectorMlp | CiFnType::Mlp => {
                    let b = f.get(&bk, &[c, w[1]])?.unsqueeze(1)?;
                    (f.get(&wk, &[c, w[0], w[1]])?, b)
                }
            };
            layers.push(layer);
        }
        Ok(Self { kind, layers })
    }

    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            kind: self.kind,
            layers: self
                .layers
                .iter()
                .map(|(w, b)| Ok((w.to_device(device)?, b.to_device(device)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The network's output before the sigmoid, `[N, C]`, from the module input `x` (`[N, d_in]`) and
    /// the component acts `acts = x V` (`[N, C]`).
    pub fn pre_sigmoid(&self, x: &Tensor, acts: &Tensor) -> Result<Tensor> {
        let n_layers = self.layers.len();
        match self.kind {
            CiFnType::SharedMlp => {
                let mut h = x.clone();
                for (i, (w, b)) in self.layers.iter().enumerate() {
                    h = matmul_last(&h, w)?.broadcast_add(b)?;
                    if i + 1 < n_layers {
                        h = h.gelu_erf()?;
                    }
                }
                Ok(h)
            }
            CiFnType::VectorMlp | CiFnType::Mlp => {
                let c = self.layers[0].0.dims()[0];
                // Run the C networks as one batched matmul over a leading component axis: [C, N, h].
                let mut h = match self.kind {
                    CiFnType::VectorMlp => x
                        .unsqueeze(0)?
                        .broadcast_as((c, x.dims()[0], x.dims()[1]))?
                        .contiguous()?,
                    _ => acts.t()?.unsqueeze(2)?.contiguous()?,
                };
                for (i, (w, b)) in self.layers.iter().enumerate() {
                    h = h.matmul(w)?.broadcast_add(b)?;
                    if i + 1 < n_layers {
                        h = h.gelu_erf()?;
                    }
                }
                h.squeeze(D::Minus1)?.t()?.contiguous()
            }
        }
    }
}

/// `1 / (1 + e^{-x})`
fn logistic(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// `z > 1 ? 1 + α(z − 1) : clamp(z, 0, 1)`
fn upper_leaky_hard(z: &Tensor) -> Result<Tensor> {
    let over = (z - 1.0)?.relu()?;
    z.clamp(0f32, 1f32)? + (over * ALPHA)?
}

/// Swish-built smooth hard sigmoid of the original (beta 10, scale 0.5, shifts 0.5).
fn swish_hard(z: &Tensor) -> Result<Tensor> {
    let (beta, scale, yshift) = (10.0, 0.5, 0.5);
    let x = (z - 0.5)?;
    let swish = |x: &Tensor| x * logistic(&(x * beta)?)?;
    let upside_down = |x: &Tensor| x * logistic(&(x * -beta)?)?;
    let left = (upside_down(&(&x - scale)?)? - swish(&x)?)?;
    let right = (swish(&(&x + scale)?)? - upside_down(&x)?)?;
    (left + right)? + yshift
}

fn apply_sigmoid(kind: SigmoidType, z: &Tensor) -> Result<Tensor> {
    match kind {
        SigmoidType::Normal => logistic(z),
        SigmoidType::Hard | SigmoidType::LowerLeakyHard => z.clamp(0f32, 1f32),
        // Standalone `leaky_hard` (never used for CI: the config value selects the lower/upper pair).
        SigmoidType::LeakyHard => {
            let pos = z.clamp(0f32, 1f32)?;
            let neg = (z.minimum(0f32)? * ALPHA)?;
            pos + neg
        }
        SigmoidType::UpperLeakyHard => upper_leaky_hard(z),
        SigmoidType::SwishHard => swish_hard(z),
    }
}

/// The lower-leaky CI: what masks and thresholds use. For `leaky_hard` its forward is `clamp(z, 0, 1)`
/// (the leak only changes gradients); other types use their sigmoid for both.
pub fn lower_ci(kind: SigmoidType, z: &Tensor) -> Result<Tensor> {
    match kind {
        SigmoidType::LeakyHard => z.clamp(0f32, 1f32),
        other => apply_sigmoid(other, z),
    }
}

/// The upper-leaky CI: `|upper_leaky_hard(z)|` for `leaky_hard`, `|sigmoid(z)|` otherwise.
pub fn upper_ci(kind: SigmoidType, z: &Tensor) -> Result<Tensor> {
    match kind {
        SigmoidType::LeakyHard => upper_leaky_hard(z)?.abs(),
        other => apply_sigmoid(other, z)?.abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn apply(f: impl Fn(&Tensor) -> Result<Tensor>, xs: &[f32]) -> Vec<f32> {
        let t = Tensor::new(xs, &Device::Cpu).unwrap();
        f(&t).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn sigmoids_follow_the_original_formulas() {
        let xs = [-2.0f32, -0.5, 0.0, 0.3, 1.0, 2.0, 11.0];
        let lower = apply(|z| lower_ci(SigmoidType::LeakyHard, z), &xs);
        assert_eq!(lower, vec![0.0, 0.0, 0.0, 0.3, 1.0, 1.0, 1.0]);
        let upper = apply(|z| upper_ci(SigmoidType::LeakyHard, z), &xs);
        assert_eq!(upper, vec![0.0, 0.0, 0.0, 0.3, 1.0, 1.01, 1.1]);
        let normal = apply(|z| lower_ci(SigmoidType::Normal, z), &xs);
        for (x, y) in xs.iter().zip(normal) {
            assert!((y - 1.0 / (1.0 + (-x).exp())).abs() < 1e-6);
        }
        let leaky = apply(|z| apply_sigmoid(SigmoidType::LeakyHard, z), &xs);
        assert!((leaky[0] + 0.02).abs() < 1e-7 && leaky[3] == 0.3 && leaky[6] == 1.0);
        // swish_hard in float64 from its definition.
        let sw = apply(|z| lower_ci(SigmoidType::SwishHard, z), &xs);
        for (x, y) in xs.iter().zip(sw) {
            let s = |v: f64, b: f64| v / (1.0 + (-b * v).exp());
            let x = *x as f64 - 0.5;
            let want = 0.5 + (s(x - 0.5, -10.0) - s(x, 10.0)) + (s(x + 0.5, 10.0) - s(x, -10.0));
            assert!((y as f64 - want).abs() < 1e-5, "{x}: {y} vs {want}");
        }
    }
}
