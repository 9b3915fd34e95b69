//! The rank-one components of one decomposed Linear: `W ≈ (V U)ᵀ`, so `x Wᵀ ≈ (x V) U`, and the
//! weight delta `Δ = W − (V U)ᵀ` that spd adds back where a forward asks for it.

use candle_core::{Result, Tensor};

use super::checkpoint::TensorFile;
use super::error::LoadError;
use super::transformer::{Linear, matmul_last};

#[derive(Debug, Clone)]
pub struct Components {
    /// `[d_in, C]`
    pub v: Tensor,
    /// `[C, d_out]`
    pub u: Tensor,
    /// The target Linear's bias, `[d_out]`.
    pub bias: Option<Tensor>,
    /// `Δᵀ = Wᵀ − V U`, `[d_in, d_out]`, when the run has `use_delta_component` (never stored in the
    /// checkpoint: spd recomputes it from the target's weight).
    pub delta_t: Option<Tensor>,
}

impl Components {
    /// Loads `_components.<module with dashes>.{V,U,bias}`; a missing bias falls back to the target's.
    /// `c` is the module's C from the config; a checkpoint with another C is an error naming both.
    pub fn new(
        f: &TensorFile,
        module: &str,
        target: &Linear,
        c: usize,
        with_delta: bool,
    ) -> std::result::Result<Self, LoadError> {
        let (d_in, d_out) = (target.d_in(), target.d_out());
        let p = format!("_components.{}", module.replace('.', "-"));
        let bias_key = format!("{p}.bias");
        let bias = if f.contains(&bias_key) {
            Some(f.get(&bias_key, &[d_out])?)
        } else {
            target.bias.clone()
        };
        let v_key = format!("{p}.V");
        if let Some(v) = f.get_raw(&v_key)
            && v.dims().len() == 2
            && v.dims()[0] == d_in
            && v.dims()[1] != c
        {
            return Err(LoadError::ComponentCount {
                path: f.path.clone(),
                key: v_key,
                module: module.to_owned(),
                config: c,
                shape: v.dims().to_vec(),
            });
        }
        let v = f.get(&v_key, &[d_in, c])?;
        let u = f.get(&format!("{p}.U"), &[c, d_out])?;
        let delta_t = if with_delta {
            Some((&target.wt - v.matmul(&u)?)?)
        } else {
            None
        };
        Ok(Self {
            v,
            u,
            bias,
            delta_t,
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

    /// `x Δᵀ`, the delta term of input `x` (zeros when the run has no delta).
    pub fn delta_output(&self, x: &Tensor) -> Result<Option<Tensor>> {
        self.delta_t.as_ref().map(|d| matmul_last(x, d)).transpose()
    }

    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Self {
            v: mv(&self.v)?,
            u: mv(&self.u)?,
            bias: self.bias.as_ref().map(mv).transpose()?,
            delta_t: self.delta_t.as_ref().map(mv).transpose()?,
        })
    }
}
