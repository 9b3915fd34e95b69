//! GPT2Simple (simple_stories_train's GPT-2 with separate q/k/v/o projections), line for line.
//!
//! The forward pass calls a [`LinearHook`] for every projection so the same code serves the plain
//! target forward (recording module inputs) and the component forward (replacing modules by their
//! masked components with leaf acts). Tensors are `[batch, seq, d]`.

use candle_core::{D, DType, Device, Module, Result, Tensor};

use super::checkpoint::TensorFile;
use super::config::Gpt2Config;
use super::error::LoadError;

pub const LN_EPS: f64 = 1e-5;

/// The six projection kinds of a block, in the order the model applies them (and names its modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    CFc,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 6] = [Self::Q, Self::K, Self::V, Self::O, Self::CFc, Self::Down];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::Q => "attn.q_proj",
            Self::K => "attn.k_proj",
            Self::V => "attn.v_proj",
            Self::O => "attn.o_proj",
            Self::CFc => "mlp.c_fc",
            Self::Down => "mlp.down_proj",
        }
    }
}

/// One projection in a block, e.g. `h.1.attn.o_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId {
    pub block: usize,
    pub kind: ModuleKind,
}

impl ModuleId {
    pub fn name(&self) -> String {
        format!("h.{}.{}", self.block, self.kind.suffix())
    }

    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("h.")?;
        let (block, suffix) = rest.split_once('.')?;
        let block = block.parse().ok()?;
        let kind = ModuleKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
        Some(Self { block, kind })
    }
}

/// `y = x Wᵀ + b`, with `Wᵀ` stored contiguous so the matmul reads it row-major.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[d_in, d_out]`
    pub wt: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn d_in(&self) -> usize {
        self.wt.dims()[0]
    }

    pub fn d_out(&self) -> usize {
        self.wt.dims()[1]
    }

    fn load(
        f: &TensorFile,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> std::result::Result<Self, LoadError> {
        let w = f.get(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let bias = if bias {
            Some(f.get(&format!("{prefix}.bias"), &[d_out])?)
        } else {
            None
        };
        Ok(Self {
            wt: w.t()?.contiguous()?,
            bias,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_last(x, &self.wt)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x @ w` over the last dim of `x` for any leading dims.
pub fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let d_in = *dims.last().expect("matmul of a scalar");
    let rows = x.elem_count() / d_in.max(1);
    let y = x.reshape((rows, d_in))?.matmul(w)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = w.dims()[1];
    y.reshape(out_dims)
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    fn load(f: &TensorFile, prefix: &str, d: usize) -> std::result::Result<Self, LoadError> {
        Ok(Self {
            weight: f.get(&format!("{prefix}.weight"), &[d])?,
            bias: f.get(&format!("{prefix}.bias"), &[d])?,
        })
    }
}

impl Module for LayerNorm {
    /// Mean and biased variance over the last dim, as `torch.nn.LayerNorm`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub ln_2: LayerNorm,
    /// Indexed by `ModuleKind as usize`.
    pub linears: [Linear; 6],
}

/// The LayerNorm in front of a residual-stream reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnSite {
    /// `h.{i}.ln_1`, read by q/k/v.
    Attn(usize),
    /// `h.{i}.ln_2`, read by c_fc.
    Mlp(usize),
    /// `ln_f`, read by `lm_head`.
    Final,
}

/// Called for every projection of the forward pass; returns the projection's output. The other
/// methods observe intermediate values (for engines that need them) and default to nothing.
pub trait LinearHook {
    /// The token embeddings `wte[t]` (`[B, T, d]`) before `wpe` is added.
    fn embed(&mut self, e: Tensor) -> Result<Tensor> {
        Ok(e)
    }
    fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor>;
    /// The residual stream `[B, T, d]` as it enters the LayerNorm at `site`.
    fn residual(&mut self, _site: LnSite, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// The LayerNorm at `site` of the residual stream `x` (which `residual` saw first). The fused
    /// CUDA pass computes it in one kernel instead of candle's chain of nine.
    fn layer_norm(&mut self, _site: LnSite, x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        ln.forward(x)
    }
    /// Attention probabilities `[B, H, T, T]` of a block.
    fn attention_probs(&mut self, _block: usize, _probs: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// The hook of the plain target model.
pub struct PlainForward;

impl LinearHook for PlainForward {
    fn linear(&mut self, _id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        linear.forward(x)
    }
}

#[derive(Debug, Clone)]
pub struct Gpt2Simple {
    pub cfg: Gpt2Config,
    /// `[vocab, d]`
    pub wte: Tensor,
    /// `[block_size, d]`
    pub wpe: Tensor,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// `lm_head.weightᵀ`, `[d, vocab]`
    pub lm_head_t: Tensor,
}

impl Gpt2Simple {
    /// Loads the target model from a state dict with GPT2Simple's key names (`wte.weight`, …). A missing
    /// `lm_head.weight` is taken from the tied `wte.weight`, and the other way round.
    pub fn new(cfg: Gpt2Config, f: &TensorFile) -> std::result::Result<Self, LoadError> {
        let Gpt2Config {
            vocab_size: v,
            n_embd: d,
            block_size,
            n_layer,
            n_head,
        } = cfg;
        if n_head == 0 || d % n_head != 0 {
            return Err(LoadError::Layout {
                path: f.path.clone(),
                msg: format!("n_embd {d} is not divisible by n_head {n_head}"),
            });
        }
        let tied = if f.contains("wte.weight") {
            "wte.weight"
        } else {
            "lm_head.weight"
        };
        let wte = f.get(tied, &[v, d])?;
        let lm_head = if f.contains("lm_head.weight") {
            f.get("lm_head.weight", &[v, d])?
        } else {
            wte.clone()
        };
        let wpe = f.get("wpe.weight", &[block_size, d])?;
        let mut blocks = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("h.{i}");
            let lin = |kind: ModuleKind, d_in, d_out| {
                Linear::load(f, &format!("{p}.{}", kind.suffix()), d_in, d_out, true)
            };
            blocks.push(Block {
                ln_1: LayerNorm::load(f, &format!("{p}.ln_1"), d)?,
                ln_2: LayerNorm::load(f, &format!("{p}.ln_2"), d)?,
                linears: [
                    lin(ModuleKind::Q, d, d)?,
                    lin(ModuleKind::K, d, d)?,
                    lin(ModuleKind::V, d, d)?,
                    lin(ModuleKind::O, d, d)?,
                    lin(ModuleKind::CFc, d, 4 * d)?,
                    lin(ModuleKind::Down, 4 * d, d)?,
                ],
            });
        }
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f: LayerNorm::load(f, "ln_f", d)?,
            lm_head_t: lm_head.t()?.contiguous()?,
        })
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    pub fn layer_norm(&self, site: LnSite) -> &LayerNorm {
        match site {
            LnSite::Attn(i) => &self.blocks[i].ln_1,
            LnSite::Mlp(i) => &self.blocks[i].ln_2,
            LnSite::Final => &self.ln_f,
        }
    }

    pub fn linear(&self, id: ModuleId) -> &Linear {
        &self.blocks[id.block].linears[id.kind as usize]
    }

    pub fn module_ids(&self) -> impl Iterator<Item = ModuleId> + '_ {
        (0..self.blocks.len()).flat_map(|block| {
            ModuleKind::ALL
                .into_iter()
                .map(move |kind| ModuleId { block, kind })
        })
    }

    /// Logits `[B, T, vocab]` of token ids `[B, T]` (u32), with every projection routed through `hook`.
    pub fn forward(&self, tokens: &Tensor, hook: &mut impl LinearHook) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let e = self
            .wte
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, self.cfg.n_embd))?;
        let e = hook.embed(e)?;
        let mut x = e.broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, x.device())?;
        for (i, block) in self.blocks.iter().enumerate() {
            hook.residual(LnSite::Attn(i), &x)?;
            let h = hook.layer_norm(LnSite::Attn(i), &x, &block.ln_1)?;
            x = (x + self.attention(i, &h, &mask, hook)?)?;
            hook.residual(LnSite::Mlp(i), &x)?;
            let h = hook.layer_norm(LnSite::Mlp(i), &x, &block.ln_2)?;
            x = (x + self.mlp(i, &h, hook)?)?;
        }
        hook.residual(LnSite::Final, &x)?;
        let x = hook.layer_norm(LnSite::Final, &x, &self.ln_f)?;
        matmul_last(&x, &self.lm_head_t)
    }

    fn attention(
        &self,
        block: usize,
        h: &Tensor,
        mask: &Tensor,
        hook: &mut impl LinearHook,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let (nh, hd) = (self.cfg.n_head, self.cfg.head_dim());
        let mut proj = |kind| {
            let id = ModuleId { block, kind };
            hook.linear(id, h, self.linear(id))
        };
        let heads = |x: Tensor| x.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous();
        let q = heads(proj(ModuleKind::Q)?)?;
        let k = heads(proj(ModuleKind::K)?)?;
        let v = heads(proj(ModuleKind::V)?)?;
        let att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let att = softmax_last(&att.broadcast_add(mask)?)?;
        hook.attention_probs(block, &att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let id = ModuleId {
            block,
            kind: ModuleKind::O,
        };
        hook.linear(id, &y, self.linear(id))
    }

    fn mlp(&self, block: usize, h: &Tensor, hook: &mut impl LinearHook) -> Result<Tensor> {
        let id = ModuleId {
            block,
            kind: ModuleKind::CFc,
        };
        let a = hook.linear(id, h, self.linear(id))?.gelu()?;
        let id = ModuleId {
            block,
            kind: ModuleKind::Down,
        };
        hook.linear(id, &a, self.linear(id))
    }
}

/// `[T, T]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Softmax over the last dim; the max is detached (softmax is shift-invariant) so gradients stay exact.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Token ids as a `[1, T]` u32 tensor.
pub fn tokens_tensor(tokens: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(tokens, (1, tokens.len()), device)?.to_dtype(DType::U32)
}
