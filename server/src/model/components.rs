//! The rank-one components of one decomposed Linear: `W ≈ (V U)ᵀ`, so `x Wᵀ ≈ (x V) U`.

use candle_core::{Result, Tensor};

use super::checkpoint::TensorFile;
use super::error::LoadError;
use super::gpt2_simple::matmul_last;

#[derive(Debug, Clone)]
pub struct Components {
    /// `[d_in, C]`
    pub v: Tensor,
    /// `[C, d_out]`
    pub u: Tensor,
    /// The target Linear's bias, `[d_out]`.
    pub bias: Option<Tensor>,
}

impl Components {
    /// Loads `_components.<module with dashes>.{V,U,bias}`; a missing bias falls back to the target's.
    pub fn new(
        f: &TensorFile,
        module: &str,
        d_in: usize,
        d_out: usize,
        c: usize,
        target_bias: Option<&Tensor>,
    ) -> std::result::Result<Self, LoadError> {
        let p = format!("_components.{}", module.replace('.', "-"));
        let bias_key = format!("{p}.bias");
        let bias = if f.contains(&bias_key) {
            Some(f.get(&bias_key, &[d_out])?)
        } else {
            target_bias.cloned()
        };
        Ok(Self {
            v: f.get(&format!("{p}.V"), &[d_in, c])?,
            u: f.get(&format!("{p}.U"), &[c, d_out])?,
            bias,
        })
    }

    pub fn c(&self) -> usize {
        self.v.dims()[1]
    }

    /// Component acts `a = x V` (`[…, C]`).
    pub fn inner_acts(&self, x: &Tensor) -> Result<Tensor> {
        matmul_last(x, &self.v)
    }

    /// The module's output with each component scaled by its mask: `(a ⊙ mask) U + b`.
    pub fn masked_output(&self, acts: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let y = matmul_last(&(acts * mask)?, &self.u)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
