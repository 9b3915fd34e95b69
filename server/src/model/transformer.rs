//! The target models SPD decomposes, as one decoder over a block description: GPT2Simple
//! (LayerNorm, learned positions, GELU MLP, biases), LlamaSimpleMLP (RMSNorm, rotary positions,
//! grouped-query attention, GELU MLP) and LlamaSimple (the same with a SwiGLU MLP). A new family is a
//! new [`TargetConfig`], not a new forward.
//!
//! The forward pass calls a [`LinearHook`] for every projection so the same code serves the plain
//! target forward (recording module inputs) and the component forward (replacing modules by their
//! masked components with leaf acts). Tensors are `[batch, seq, d]`.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use super::checkpoint::TensorFile;
use super::error::LoadError;

/// GPT2Simple's LayerNorm epsilon (torch's default).
pub const LN_EPS: f64 = 1e-5;

/// The projection kinds of a block, in the order the model applies them (and names its modules).
/// A block has either `CFc` (GELU MLP) or `Gate` + `Up` (SwiGLU) in front of `Down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    CFc,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 8] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::CFc,
        Self::Down,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::Q => "attn.q_proj",
            Self::K => "attn.k_proj",
            Self::V => "attn.v_proj",
            Self::O => "attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::CFc => "mlp.c_fc",
            Self::Down => "mlp.down_proj",
        }
    }

    /// Whether the projection reads the (normalised) residual stream.
    pub fn reads_residual(self) -> bool {
        matches!(
            self,
            Self::Q | Self::K | Self::V | Self::Gate | Self::Up | Self::CFc
        )
    }
}

/// One projection in a block, e.g. `h.1.attn.o_proj`, or the identity spd inserts in front of
/// one (`h.1.mlp.c_fc.pre_identity`, SPEC §6): a `d_in × d_in` identity that is decomposed like
/// any projection, so a run can decompose what a module reads as well as what it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId {
    pub block: usize,
    pub kind: ModuleKind,
    /// The identity in front of the projection `(block, kind)`, not the projection.
    pub pre_identity: bool,
}

impl ModuleId {
    /// The projection `kind` of `block`.
    pub fn new(block: usize, kind: ModuleKind) -> Self {
        Self {
            block,
            kind,
            pre_identity: false,
        }
    }

    /// The identity inserted in front of this projection.
    pub fn identity(self) -> Self {
        Self {
            pre_identity: true,
            ..self
        }
    }

    /// The projection itself (for an identity, the one it sits in front of).
    pub fn parent(self) -> Self {
        Self::new(self.block, self.kind)
    }

    pub fn name(&self) -> String {
        let base = format!("h.{}.{}", self.block, self.kind.suffix());
        if self.pre_identity {
            format!("{base}.pre_identity")
        } else {
            base
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        let (name, pre_identity) = match name.strip_suffix(".pre_identity") {
            Some(parent) => (parent, true),
            None => (name, false),
        };
        let rest = name.strip_prefix("h.")?;
        let (block, suffix) = rest.split_once('.')?;
        let block = block.parse().ok()?;
        let kind = ModuleKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
        Some(Self {
            block,
            kind,
            pre_identity,
        })
    }
}

/// The target families, named as spd's `pretrained_model_class` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2Simple,
    LlamaSimpleMlp,
    LlamaSimple,
}

impl Family {
    pub const SUPPORTED: &'static str = "GPT2Simple, LlamaSimpleMLP, LlamaSimple (under \
        spd.pretrain.models or simple_stories_train.models)";

    /// The family of a `pretrained_model_class` such as `spd.pretrain.models.llama_simple.LlamaSimple`.
    pub fn from_class(class: &str) -> Option<Self> {
        let (module, name) = class.rsplit_once('.').unwrap_or(("", class));
        let family = match name {
            "GPT2Simple" => Self::Gpt2Simple,
            "LlamaSimpleMLP" => Self::LlamaSimpleMlp,
            "LlamaSimple" => Self::LlamaSimple,
            _ => return None,
        };
        let known_module = module.is_empty()
            || module.starts_with("spd.pretrain.models")
            || module.starts_with("simple_stories_train.models");
        known_module.then_some(family)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gpt2Simple => "GPT2Simple",
            Self::LlamaSimpleMlp => "LlamaSimpleMLP",
            Self::LlamaSimple => "LlamaSimple",
        }
    }
}

/// GPT2Simple's `model_config.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Gpt2Config {
    pub block_size: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

/// LlamaSimpleMLP's and LlamaSimple's `model_config.yaml` (defaults as spd's config classes).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct LlamaConfig {
    pub block_size: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_intermediate: usize,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attn_bias: bool,
    #[serde(default)]
    pub rotary_adjacent_pairs: bool,
    #[serde(default = "default_rotary_base")]
    pub rotary_base: f64,
    pub n_ctx: usize,
    pub n_key_value_heads: usize,
    #[serde(default = "default_true")]
    pub use_grouped_query_attention: bool,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
}

fn default_rotary_base() -> f64 {
    10000.0
}

fn default_true() -> bool {
    true
}

fn default_rms_eps() -> f64 {
    1e-6
}

/// How a block normalises the residual stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// Mean and biased variance, weight and bias.
    LayerNorm { eps: f64 },
    /// `w · x · rsqrt(mean(x²) + eps)`, no bias.
    Rms { eps: f64 },
}

/// Where positions enter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Positions {
    /// `wpe[0..T]` added to the token embeddings.
    Learned,
    /// Rotary embeddings on q and k over the whole head dim; positions clamped to `n_ctx − 1`.
    Rotary {
        base: f64,
        n_ctx: usize,
        adjacent_pairs: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(gelu_tanh(c_fc(x)))`
    Gelu,
    /// `down(silu(gate(x)) · up(x))`
    SwiGlu,
}

/// The description of a target model: everything the forward needs besides the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetConfig {
    pub family: Family,
    pub vocab_size: usize,
    /// The longest prompt the model takes.
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// K/V heads; each serves `n_head / n_kv_head` query heads (repeat-interleaved).
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// Width of the MLP's hidden layer.
    pub d_mlp: usize,
    pub norm: NormKind,
    pub positions: Positions,
    pub mlp: MlpKind,
    pub attn_bias: bool,
    pub mlp_bias: bool,
}

impl TargetConfig {
    pub fn gpt2_simple(c: Gpt2Config) -> Self {
        Self {
            family: Family::Gpt2Simple,
            vocab_size: c.vocab_size,
            block_size: c.block_size,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_kv_head: c.n_head,
            n_embd: c.n_embd,
            d_mlp: 4 * c.n_embd,
            norm: NormKind::LayerNorm { eps: LN_EPS },
            positions: Positions::Learned,
            mlp: MlpKind::Gelu,
            attn_bias: true,
            mlp_bias: true,
        }
    }

    pub fn llama(family: Family, c: LlamaConfig) -> Self {
        let n_kv_head = if c.use_grouped_query_attention {
            c.n_key_value_heads
        } else {
            c.n_head
        };
        Self {
            family,
            vocab_size: c.vocab_size,
            block_size: c.block_size,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_kv_head,
            n_embd: c.n_embd,
            d_mlp: c.n_intermediate,
            norm: NormKind::Rms {
                eps: c.rms_norm_eps,
            },
            positions: Positions::Rotary {
                base: c.rotary_base,
                n_ctx: c.n_ctx,
                adjacent_pairs: c.rotary_adjacent_pairs,
            },
            mlp: if family == Family::LlamaSimple {
                MlpKind::SwiGlu
            } else {
                MlpKind::Gelu
            },
            attn_bias: c.attn_bias,
            mlp_bias: c.mlp_bias,
        }
    }

    /// Reads the target's `model_config.yaml` for `family`.
    pub fn read(family: Family, path: &std::path::Path) -> std::result::Result<Self, LoadError> {
        Ok(match family {
            Family::Gpt2Simple => Self::gpt2_simple(super::config::read_yaml(path)?),
            _ => Self::llama(family, super::config::read_yaml(path)?),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The projections of one block, in forward order.
    pub fn kinds(&self) -> &'static [ModuleKind] {
        match self.mlp {
            MlpKind::Gelu => &[
                ModuleKind::Q,
                ModuleKind::K,
                ModuleKind::V,
                ModuleKind::O,
                ModuleKind::CFc,
                ModuleKind::Down,
            ],
            MlpKind::SwiGlu => &[
                ModuleKind::Q,
                ModuleKind::K,
                ModuleKind::V,
                ModuleKind::O,
                ModuleKind::Gate,
                ModuleKind::Up,
                ModuleKind::Down,
            ],
        }
    }

    /// `(d_in, d_out)` of a projection.
    pub fn dims(&self, kind: ModuleKind) -> (usize, usize) {
        let (d, kv) = (self.n_embd, self.n_kv_head * self.head_dim());
        match kind {
            ModuleKind::Q | ModuleKind::O => (d, d),
            ModuleKind::K | ModuleKind::V => (d, kv),
            ModuleKind::Gate | ModuleKind::Up | ModuleKind::CFc => (d, self.d_mlp),
            ModuleKind::Down => (self.d_mlp, d),
        }
    }

    pub fn has_bias(&self, kind: ModuleKind) -> bool {
        match kind {
            ModuleKind::Q | ModuleKind::K | ModuleKind::V | ModuleKind::O => self.attn_bias,
            _ => self.mlp_bias,
        }
    }

    /// The block's norm names in the state dict.
    fn norm_names(&self) -> (&'static str, &'static str) {
        match self.norm {
            NormKind::LayerNorm { .. } => ("ln_1", "ln_2"),
            NormKind::Rms { .. } => ("rms_1", "rms_2"),
        }
    }

    fn check(&self, path: &std::path::Path) -> std::result::Result<(), LoadError> {
        let bad = |msg: String| {
            Err(LoadError::Layout {
                path: path.to_owned(),
                msg,
            })
        };
        let (d, h, kv) = (self.n_embd, self.n_head, self.n_kv_head);
        if h == 0 || d % h != 0 {
            return bad(format!("n_embd {d} is not divisible by n_head {h}"));
        }
        if kv == 0 || h % kv != 0 {
            return bad(format!(
                "n_head {h} is not a multiple of n_key_value_heads {kv}"
            ));
        }
        if matches!(self.positions, Positions::Rotary { .. }) && !self.head_dim().is_multiple_of(2)
        {
            return bad(format!(
                "rotary embeddings need an even head dim, found {}",
                self.head_dim()
            ));
        }
        Ok(())
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

/// A LayerNorm (weight and bias) or an RMSNorm (weight only).
#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: Tensor,
    /// `Some` for LayerNorm.
    pub bias: Option<Tensor>,
}

impl Norm {
    fn load(
        f: &TensorFile,
        prefix: &str,
        d: usize,
        kind: NormKind,
    ) -> std::result::Result<Self, LoadError> {
        let bias = match kind {
            NormKind::LayerNorm { .. } => Some(f.get(&format!("{prefix}.bias"), &[d])?),
            NormKind::Rms { .. } => None,
        };
        Ok(Self {
            kind,
            weight: f.get(&format!("{prefix}.weight"), &[d])?,
            bias,
        })
    }

    pub fn is_layer_norm(&self) -> bool {
        matches!(self.kind, NormKind::LayerNorm { .. })
    }

    pub fn eps(&self) -> f64 {
        match self.kind {
            NormKind::LayerNorm { eps } | NormKind::Rms { eps } => eps,
        }
    }
}

impl Module for Norm {
    /// LayerNorm: mean and biased variance over the last dim, as `torch.nn.LayerNorm`. RMSNorm: as
    /// spd's `LlamaRMSNorm` in float32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xn = match self.kind {
            NormKind::LayerNorm { eps } => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + eps)?.sqrt()?)?
            }
            NormKind::Rms { eps } => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
            }
        };
        let y = xn.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Rotary tables `[n_ctx, head_dim]` as spd's `calculate_sin_cos_rotary` builds them.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub adjacent_pairs: bool,
    pub n_ctx: usize,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        n_ctx: usize,
        base: f64,
        adjacent_pairs: bool,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // freq_i = base^(i / half) in float32, as the original; then repeated to the full head dim.
        let freqs: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf(i as f32 / half as f32))
            .collect();
        let freq_at = |j: usize| {
            if adjacent_pairs {
                freqs[j / 2]
            } else {
                freqs[j % half]
            }
        };
        let mut cos = Vec::with_capacity(n_ctx * head_dim);
        let mut sin = Vec::with_capacity(n_ctx * head_dim);
        for p in 0..n_ctx {
            for j in 0..head_dim {
                let angle = p as f32 / freq_at(j);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n_ctx, head_dim), device)?,
            sin: Tensor::from_vec(sin, (n_ctx, head_dim), device)?,
            adjacent_pairs,
            n_ctx,
        })
    }

    /// `rotate_every_two` of the original: half-split `[-x₂, x₁]`, or adjacent pairs `(-x₂ᵢ₊₁, x₂ᵢ)`.
    fn rotate(&self, x: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        if self.adjacent_pairs {
            let dims = x.dims().to_vec();
            let mut pairs = dims[..dims.len() - 1].to_vec();
            pairs.extend([hd / 2, 2]);
            let xp = x.reshape(pairs)?;
            let even = xp.narrow(D::Minus1, 0, 1)?;
            let odd = xp.narrow(D::Minus1, 1, 1)?;
            Tensor::cat(&[&odd.neg()?, &even], D::Minus1)?.reshape(dims)
        } else {
            let n = hd / 2;
            let x1 = x.narrow(D::Minus1, 0, n)?;
            let x2 = x.narrow(D::Minus1, n, hd - n)?;
            Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
        }
    }

    /// Rotates `x` (`[B, H, T, hd]`) at positions `0..T` (clamped to `n_ctx − 1`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        let (cos, sin) = self.tables(t)?;
        x.broadcast_mul(&cos)? + self.rotate(x)?.broadcast_mul(&sin)?
    }

    /// `cos`, `sin` rows for positions `0..t`, `[t, hd]`.
    pub fn tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        if t <= self.n_ctx {
            return Ok((self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?));
        }
        let idx: Vec<u32> = (0..t).map(|p| p.min(self.n_ctx - 1) as u32).collect();
        let idx = Tensor::from_vec(idx, t, self.cos.device())?;
        Ok((
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub norm_1: Norm,
    pub norm_2: Norm,
    /// Indexed by `ModuleKind as usize`; `None` for kinds the family does not have.
    pub linears: [Option<Linear>; 8],
    /// The identities inserted in front of projections (same index), as `Linear`s with weight
    /// `I`: the plain forward multiplies by `I`, which is exact, and every hook sees them as it
    /// sees any projection.
    pub identities: [Option<Linear>; 8],
}

/// The norm in front of a residual-stream reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnSite {
    /// `h.{i}.ln_1` / `rms_1`, read by q/k/v.
    Attn(usize),
    /// `h.{i}.ln_2` / `rms_2`, read by the MLP's input projections.
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
    /// The residual stream `[B, T, d]` as it enters the norm at `site`.
    fn residual(&mut self, _site: LnSite, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// The norm at `site` of the residual stream `x` (which `residual` saw first). The fused CUDA
    /// pass computes LayerNorms in one kernel instead of candle's chain of nine.
    fn norm(&mut self, _site: LnSite, x: &Tensor, norm: &Norm) -> Result<Tensor> {
        norm.forward(x)
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
pub struct Transformer {
    pub cfg: TargetConfig,
    /// `[vocab, d]`
    pub wte: Tensor,
    /// `[block_size, d]` for learned positions.
    pub wpe: Option<Tensor>,
    pub rope: Option<Rope>,
    pub blocks: Vec<Block>,
    pub ln_f: Norm,
    /// `lm_head.weightᵀ`, `[d, vocab]`
    pub lm_head_t: Tensor,
}

impl Transformer {
    /// Loads the target model from a state dict with spd's key names (`wte.weight`, `h.0.ln_1.weight`
    /// or `h.0.rms_1.weight`, …). A missing `lm_head.weight` is taken from the tied `wte.weight`, and
    /// the other way round.
    pub fn new(cfg: TargetConfig, f: &TensorFile) -> std::result::Result<Self, LoadError> {
        cfg.check(&f.path)?;
        let (v, d) = (cfg.vocab_size, cfg.n_embd);
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
        let (wpe, rope) = match cfg.positions {
            Positions::Learned => (Some(f.get("wpe.weight", &[cfg.block_size, d])?), None),
            Positions::Rotary {
                base,
                n_ctx,
                adjacent_pairs,
            } => (
                None,
                Some(Rope::new(
                    cfg.head_dim(),
                    n_ctx.max(1),
                    base,
                    adjacent_pairs,
                    &Device::Cpu,
                )?),
            ),
        };
        let (n1, n2) = cfg.norm_names();
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            let mut linears: [Option<Linear>; 8] = Default::default();
            for &kind in cfg.kinds() {
                let (d_in, d_out) = cfg.dims(kind);
                linears[kind as usize] = Some(Linear::load(
                    f,
                    &format!("{p}.{}", kind.suffix()),
                    d_in,
                    d_out,
                    cfg.has_bias(kind),
                )?);
            }
            blocks.push(Block {
                norm_1: Norm::load(f, &format!("{p}.{n1}"), d, cfg.norm)?,
                norm_2: Norm::load(f, &format!("{p}.{n2}"), d, cfg.norm)?,
                linears,
                identities: Default::default(),
            });
        }
        Ok(Self {
            cfg,
            wte,
            wpe,
            rope,
            blocks,
            ln_f: Norm::load(f, "ln_f", d, cfg.norm)?,
            lm_head_t: lm_head.t()?.contiguous()?,
        })
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    pub fn norm(&self, site: LnSite) -> &Norm {
        match site {
            LnSite::Attn(i) => &self.blocks[i].norm_1,
            LnSite::Mlp(i) => &self.blocks[i].norm_2,
            LnSite::Final => &self.ln_f,
        }
    }

    /// The projection `id`; panics for a kind the family does not have (ids come from
    /// [`Transformer::module_ids`]).
    pub fn linear(&self, id: ModuleId) -> &Linear {
        let b = &self.blocks[id.block];
        let table = if id.pre_identity {
            &b.identities
        } else {
            &b.linears
        };
        table[id.kind as usize]
            .as_ref()
            .expect("a projection of this family")
    }

    /// Every projection and inserted identity in forward order (an identity just before the
    /// projection it feeds).
    pub fn module_ids(&self) -> impl Iterator<Item = ModuleId> + '_ {
        (0..self.blocks.len()).flat_map(move |block| {
            self.cfg.kinds().iter().flat_map(move |&kind| {
                let id = ModuleId::new(block, kind);
                let identity = self.blocks[block].identities[kind as usize]
                    .is_some()
                    .then(|| id.identity());
                identity.into_iter().chain([id])
            })
        })
    }

    /// Inserts an identity in front of the projection `parent` (spd's
    /// `insert_identity_operations_`): the projection then reads the identity's output.
    pub fn insert_identity(&mut self, parent: ModuleId) -> Result<()> {
        let d_in = self.linear(parent.parent()).d_in();
        let eye = Tensor::eye(d_in, DType::F32, self.device())?;
        self.blocks[parent.block].identities[parent.kind as usize] = Some(Linear {
            wt: eye,
            bias: None,
        });
        Ok(())
    }

    /// The projection `id` of `x` through `hook`, behind its inserted identity if it has one.
    fn project(&self, id: ModuleId, x: &Tensor, hook: &mut impl LinearHook) -> Result<Tensor> {
        if self.blocks[id.block].identities[id.kind as usize].is_some() {
            let ident = id.identity();
            let y = hook.linear(ident, x, self.linear(ident))?;
            hook.linear(id, &y, self.linear(id))
        } else {
            hook.linear(id, x, self.linear(id))
        }
    }

    /// Every tensor of the model moved to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        let mv_norm = |n: &Norm| -> Result<Norm> {
            Ok(Norm {
                kind: n.kind,
                weight: mv(&n.weight)?,
                bias: n.bias.as_ref().map(mv).transpose()?,
            })
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| -> Result<Block> {
                let mv_all = |from: &[Option<Linear>; 8]| -> Result<[Option<Linear>; 8]> {
                    let mut to: [Option<Linear>; 8] = Default::default();
                    for (dst, src) in to.iter_mut().zip(from) {
                        if let Some(l) = src {
                            *dst = Some(Linear {
                                wt: mv(&l.wt)?,
                                bias: l.bias.as_ref().map(mv).transpose()?,
                            });
                        }
                    }
                    Ok(to)
                };
                Ok(Block {
                    norm_1: mv_norm(&b.norm_1)?,
                    norm_2: mv_norm(&b.norm_2)?,
                    linears: mv_all(&b.linears)?,
                    identities: mv_all(&b.identities)?,
                })
            })
            .collect::<Result<_>>()?;
        let rope = match &self.rope {
            Some(r) => Some(Rope {
                cos: mv(&r.cos)?,
                sin: mv(&r.sin)?,
                ..r.clone()
            }),
            None => None,
        };
        Ok(Self {
            cfg: self.cfg,
            wte: mv(&self.wte)?,
            wpe: self.wpe.as_ref().map(mv).transpose()?,
            rope,
            blocks,
            ln_f: mv_norm(&self.ln_f)?,
            lm_head_t: mv(&self.lm_head_t)?,
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
        let mut x = match &self.wpe {
            Some(wpe) => e.broadcast_add(&wpe.narrow(0, 0, t)?)?,
            None => e,
        };
        let mask = causal_mask(t, x.device())?;
        for (i, block) in self.blocks.iter().enumerate() {
            hook.residual(LnSite::Attn(i), &x)?;
            let h = hook.norm(LnSite::Attn(i), &x, &block.norm_1)?;
            x = (x + self.attention(i, &h, &mask, hook)?)?;
            hook.residual(LnSite::Mlp(i), &x)?;
            let h = hook.norm(LnSite::Mlp(i), &x, &block.norm_2)?;
            x = (x + self.mlp(i, &h, hook)?)?;
        }
        hook.residual(LnSite::Final, &x)?;
        let x = hook.norm(LnSite::Final, &x, &self.ln_f)?;
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
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim());
        let mut proj = |kind| self.project(ModuleId::new(block, kind), h, hook);
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        let mut q = heads(proj(ModuleKind::Q)?, nh)?;
        let mut k = heads(proj(ModuleKind::K)?, nkv)?;
        let mut v = heads(proj(ModuleKind::V)?, nkv)?;
        if let Some(rope) = &self.rope {
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        if nkv != nh {
            k = repeat_kv(&k, nh / nkv)?;
            v = repeat_kv(&v, nh / nkv)?;
        }
        let att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let att = softmax_last(&att.broadcast_add(mask)?)?;
        hook.attention_probs(block, &att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.project(ModuleId::new(block, ModuleKind::O), &y, hook)
    }

    fn mlp(&self, block: usize, h: &Tensor, hook: &mut impl LinearHook) -> Result<Tensor> {
        let id = |kind| ModuleId::new(block, kind);
        let a = match self.cfg.mlp {
            MlpKind::Gelu => self.project(id(ModuleKind::CFc), h, hook)?.gelu()?,
            MlpKind::SwiGlu => {
                let gate = self.project(id(ModuleKind::Gate), h, hook)?;
                let up = self.project(id(ModuleKind::Up), h, hook)?;
                (silu(&gate)? * up)?
            }
        };
        self.project(id(ModuleKind::Down), &a, hook)
    }
}

/// `x · σ(x)` from elementary ops, so the reference engine's autograd differentiates it like the
/// rest of the forward.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x * (x.neg()?.exp()? + 1.0)?.recip()?
}

/// K/V heads `[B, n_kv, T, hd]` repeated to `[B, n_kv·r, T, hd]`, each `r` times in a row
/// (`repeat_interleave` over the head dim).
pub fn repeat_kv(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, n, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n, r, t, hd))?
        .contiguous()?
        .reshape((b, n * r, t, hd))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_spd_class_names() {
        for (class, family) in [
            (
                "spd.pretrain.models.gpt2_simple.GPT2Simple",
                Family::Gpt2Simple,
            ),
            (
                "simple_stories_train.models.gpt2_simple.GPT2Simple",
                Family::Gpt2Simple,
            ),
            (
                "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
                Family::LlamaSimpleMlp,
            ),
            (
                "spd.pretrain.models.llama_simple.LlamaSimple",
                Family::LlamaSimple,
            ),
        ] {
            assert_eq!(Family::from_class(class), Some(family), "{class}");
        }
        assert_eq!(Family::from_class("transformers.GPT2LMHeadModel"), None);
        assert_eq!(Family::from_class("other.pkg.LlamaSimple"), None);
    }

    /// Rotary embedding against its definition in float64: half-split pairs `(j, j + hd/2)` rotate by
    /// `pos / base^(j / (hd/2))`; adjacent pairs `(2i, 2i+1)` by `pos / base^(i / (hd/2))`.
    #[test]
    fn rope_rotates_pairs_as_defined() {
        let (hd, t) = (8usize, 5usize);
        let vals: Vec<f32> = (0..t * hd)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let x = Tensor::from_vec(vals.clone(), (1, 1, t, hd), &Device::Cpu).unwrap();
        for adjacent in [false, true] {
            let rope = Rope::new(hd, 4, 10000.0, adjacent, &Device::Cpu).unwrap();
            let y: Vec<f32> = rope
                .apply(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let half = hd / 2;
            for p in 0..t {
                let pos = p.min(3) as f64; // clamped to n_ctx − 1
                for i in 0..half {
                    let (a, b) = if adjacent {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let angle = pos / 10000f64.powf(i as f64 / half as f64);
                    let (xa, xb) = (vals[p * hd + a] as f64, vals[p * hd + b] as f64);
                    let ya = xa * angle.cos() - xb * angle.sin();
                    let yb = xb * angle.cos() + xa * angle.sin();
                    assert!(
                        (y[p * hd + a] as f64 - ya).abs() < 1e-5,
                        "{adjacent} {p} {i}"
                    );
                    assert!(
                        (y[p * hd + b] as f64 - yb).abs() < 1e-5,
                        "{adjacent} {p} {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn repeat_kv_interleaves_heads() {
        let x = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 1))
            .unwrap();
        let y: Vec<f32> = repeat_kv(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]);
    }

    #[test]
    fn rms_norm_matches_its_formula() {
        let x = Tensor::new(&[[1f32, -2.0, 3.0, 0.5]], &Device::Cpu).unwrap();
        let norm = Norm {
            kind: NormKind::Rms { eps: 1e-6 },
            weight: Tensor::new(&[1f32, 2.0, 0.5, -1.0], &Device::Cpu).unwrap(),
            bias: None,
        };
        let y: Vec<f32> = norm
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs = [1f64, -2.0, 3.0, 0.5];
        let w = [1f64, 2.0, 0.5, -1.0];
        let r = 1.0 / (xs.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((y[i] as f64 - w[i] * xs[i] * r).abs() < 1e-6);
        }
    }
}
