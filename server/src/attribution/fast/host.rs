//! Plain row-major matrices on the host and the few kernels the fast engine needs.

use candle_core::{Device, Tensor};

#[derive(Debug, Clone, Default)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// Copies a 2-D tensor (or `[1, R, C]`) to the host.
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let t = if t.rank() == 3 {
            t.squeeze(0)?
        } else {
            t.clone()
        };
        let (rows, cols) = t.dims2()?;
        let data = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        Ok(Self { rows, cols, data })
    }

    #[inline]
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    #[inline]
    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    pub fn transpose(&self) -> Self {
        let mut data = vec![0.0; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Self {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }
}

/// Dot product in eight independent lanes, so the compiler vectorizes it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Derivative of the tanh-approximation GELU.
#[inline]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    const A: f32 = 0.044_715;
    let u = K * (x + A * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * A * x * x)
}

/// Backward of LayerNorm at one position: given the input row `x`, the LN weight `w` and the gradient
/// `g` of the LN output, writes the gradient of the input into `out`.
/// With `x̂ = (x − μ)/σ` and `g̃ = g ⊙ w`: `∂x = (g̃ − mean(g̃) − x̂·mean(g̃ ⊙ x̂)) / σ`.
pub struct LnBackward {
    xhat: Vec<f32>,
    inv_sigma: f32,
}

impl LnBackward {
    pub fn new(x: &[f32], eps: f64) -> Self {
        let d = x.len() as f64;
        let mean = x.iter().map(|v| *v as f64).sum::<f64>() / d;
        let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / d;
        let inv_sigma = 1.0 / (var + eps).sqrt();
        Self {
            xhat: x
                .iter()
                .map(|v| ((*v as f64 - mean) * inv_sigma) as f32)
                .collect(),
            inv_sigma: inv_sigma as f32,
        }
    }

    pub fn apply(&self, g: &[f32], w: &[f32], out: &mut [f32]) {
        let d = g.len() as f32;
        let mut m1 = 0f32;
        let mut m2 = 0f32;
        for (((o, gi), wi), xh) in out.iter_mut().zip(g).zip(w).zip(&self.xhat) {
            let gt = gi * wi;
            *o = gt;
            m1 += gt;
            m2 += gt * xh;
        }
        let (m1, m2) = (m1 / d, m2 / d);
        for (o, xh) in out.iter_mut().zip(&self.xhat) {
            *o = (*o - m1 - xh * m2) * self.inv_sigma;
        }
    }
}

/// Backward of RMSNorm at one position: with `r = (mean(x²) + eps)^-½` and `g̃ = g ⊙ w`,
/// `∂x = r·g̃ − r³·x·(g̃·x)/d`.
pub struct RmsBackward {
    x: Vec<f32>,
    r: f32,
}

impl RmsBackward {
    pub fn new(x: &[f32], eps: f64) -> Self {
        let d = x.len() as f64;
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d;
        Self {
            x: x.to_vec(),
            r: (1.0 / (ms + eps).sqrt()) as f32,
        }
    }

    pub fn apply(&self, g: &[f32], w: &[f32], out: &mut [f32]) {
        let d = g.len() as f32;
        let mut gx = 0f32;
        for (((o, gi), wi), xi) in out.iter_mut().zip(g).zip(w).zip(&self.x) {
            let gt = gi * wi;
            *o = gt;
            gx += gt * xi;
        }
        let (r, k) = (self.r, self.r * self.r * self.r * gx / d);
        for (o, xi) in out.iter_mut().zip(&self.x) {
            *o = r * *o - k * xi;
        }
    }
}

/// The backward of a block's norm, LayerNorm or RMSNorm.
pub enum NormBackward {
    Layer(LnBackward),
    Rms(RmsBackward),
}

impl NormBackward {
    pub fn new(kind: crate::model::transformer::NormKind, x: &[f32]) -> Self {
        use crate::model::transformer::NormKind;
        match kind {
            NormKind::LayerNorm { eps } => Self::Layer(LnBackward::new(x, eps)),
            NormKind::Rms { eps } => Self::Rms(RmsBackward::new(x, eps)),
        }
    }

    pub fn apply(&self, g: &[f32], w: &[f32], out: &mut [f32]) {
        match self {
            Self::Layer(b) => b.apply(g, w, out),
            Self::Rms(b) => b.apply(g, w, out),
        }
    }
}

/// `σ(x)` and `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`.
#[inline]
pub fn silu_and_grad(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-x).exp());
    (x * s, s * (1.0 + x * (1.0 - s)))
}

/// Rotary tables on the host, `[n_ctx][hd]`, and the rotation of one head's vector at a position
/// (`R_p x`) and its transpose (`R_pᵀ x`), in the model's pairing.
pub struct HostRope {
    cos: Mat,
    sin: Mat,
    adjacent_pairs: bool,
}

impl HostRope {
    pub fn new(rope: &crate::model::transformer::Rope) -> candle_core::Result<Self> {
        Ok(Self {
            cos: Mat::from_tensor(&rope.cos)?,
            sin: Mat::from_tensor(&rope.sin)?,
            adjacent_pairs: rope.adjacent_pairs,
        })
    }

    /// The pairs `(a, b)` rotated together: `y_a = x_a cos − x_b sin`, `y_b = x_b cos + x_a sin`.
    fn pairs(&self, hd: usize) -> impl Iterator<Item = (usize, usize)> + use<> {
        let adjacent = self.adjacent_pairs;
        (0..hd / 2).map(move |i| {
            if adjacent {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + hd / 2)
            }
        })
    }

    /// Writes `R_p x` (or `R_pᵀ x` with `transpose`) into `out`.
    pub fn rotate(&self, x: &[f32], p: usize, transpose: bool, out: &mut [f32]) {
        let p = p.min(self.cos.rows - 1);
        let (cos, sin) = (self.cos.row(p), self.sin.row(p));
        let sign = if transpose { -1.0 } else { 1.0 };
        for (a, b) in self.pairs(x.len()) {
            // Both members of a pair share one angle (the tables repeat it).
            let (c, s) = (cos[a], sign * sin[a]);
            out[a] = x[a] * c - x[b] * s;
            out[b] = x[b] * c + x[a] * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32).sin()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4);
    }

    /// Finite differences in float64 against the closed forms.
    #[test]
    fn closed_form_derivatives_match_finite_differences() {
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        for x in [-3.0, -0.7, 0.0, 0.4, 2.5] {
            let fd = (gelu(x + 1e-6) - gelu(x - 1e-6)) / 2e-6;
            assert!((gelu_tanh_grad(x as f32) as f64 - fd).abs() < 1e-4, "{x}");
        }
        let x = [0.3f32, -1.2, 2.0, 0.7, -0.1];
        let w = [1.5f32, -0.5, 0.8, 1.1, 0.9];
        let g = [0.2f32, 0.9, -0.4, 1.0, -0.3];
        let ln = |x: &[f64]| -> Vec<f64> {
            let d = x.len() as f64;
            let m = x.iter().sum::<f64>() / d;
            let v = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / d;
            x.iter()
                .zip(&w)
                .map(|(xi, wi)| (xi - m) / (v + 1e-5).sqrt() * *wi as f64)
                .collect()
        };
        let mut out = [0f32; 5];
        LnBackward::new(&x, 1e-5).apply(&g, &w, &mut out);
        for i in 0..5 {
            let mut hi: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let mut lo = hi.clone();
            hi[i] += 1e-6;
            lo[i] -= 1e-6;
            let f = |y: Vec<f64>| y.iter().zip(&g).map(|(a, b)| a * *b as f64).sum::<f64>();
            let fd = (f(ln(&hi)) - f(ln(&lo))) / 2e-6;
            assert!((out[i] as f64 - fd).abs() < 1e-4, "{i}: {} vs {fd}", out[i]);
        }
        let rms = |x: &[f64]| -> Vec<f64> {
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-6).sqrt();
            x.iter()
                .zip(&w)
                .map(|(xi, wi)| xi * r * *wi as f64)
                .collect()
        };
        RmsBackward::new(&x, 1e-6).apply(&g, &w, &mut out);
        for i in 0..5 {
            let mut hi: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let mut lo = hi.clone();
            hi[i] += 1e-6;
            lo[i] -= 1e-6;
            let f = |y: Vec<f64>| y.iter().zip(&g).map(|(a, b)| a * *b as f64).sum::<f64>();
            let fd = (f(rms(&hi)) - f(rms(&lo))) / 2e-6;
            assert!(
                (out[i] as f64 - fd).abs() < 1e-4,
                "rms {i}: {} vs {fd}",
                out[i]
            );
        }
        let silu = |x: f64| x / (1.0 + (-x).exp());
        for x in [-4.0, -0.5, 0.0, 0.3, 3.0] {
            let fd = (silu(x + 1e-6) - silu(x - 1e-6)) / 2e-6;
            let (v, d) = silu_and_grad(x as f32);
            assert!(
                (v as f64 - silu(x)).abs() < 1e-6 && (d as f64 - fd).abs() < 1e-4,
                "{x}"
            );
        }
    }

    /// `R_pᵀ` undoes `R_p`, and `R_p` equals the model's rotary embedding.
    #[test]
    fn host_rope_matches_the_model_and_inverts() {
        use crate::model::transformer::Rope;
        for adjacent in [false, true] {
            let rope = Rope::new(6, 8, 10000.0, adjacent, &Device::Cpu).unwrap();
            let host = HostRope::new(&rope).unwrap();
            let x: Vec<f32> = (0..6).map(|i| (i as f32 * 0.7).sin()).collect();
            let t = Tensor::from_vec(
                (0..8).flat_map(|_| x.clone()).collect::<Vec<_>>(),
                (1, 1, 8, 6),
                &Device::Cpu,
            )
            .unwrap();
            let want = Mat::from_tensor(&rope.apply(&t).unwrap().squeeze(0).unwrap()).unwrap();
            let (mut y, mut back) = (vec![0f32; 6], vec![0f32; 6]);
            for p in 0..8 {
                host.rotate(&x, p, false, &mut y);
                for (a, b) in y.iter().zip(want.row(p)) {
                    assert!((a - b).abs() < 1e-6, "{adjacent} {p}");
                }
                host.rotate(&y, p, true, &mut back);
                for (a, b) in back.iter().zip(&x) {
                    assert!((a - b).abs() < 1e-5);
                }
            }
        }
    }
}
