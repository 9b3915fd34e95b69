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
    }
}
