//! Global causal-importance networks (spd `dev`, `ci_config.mode: global`): one network reads every
//! decomposed module's input at once (from the plain target forward) and returns all modules' CI
//! before the sigmoid. Three shapes, as spd's `components.py`:
//! - `global_shared_mlp`: an MLP over the inputs concatenated in `sorted(module path)` order → ΣC.
//! - `global_shared_transformer`: each input RMS-normalised (no weight), concatenated, projected to
//!   `d_model`, then pre-norm transformer blocks with **bidirectional** RoPE self-attention (so a
//!   position's CI depends on later tokens), then a linear head → ΣC.
//! - `global_reverse_residual`: block groups (config order, from the unembedding down) add their
//!   inputs' projection to a residual stream of their own; all but the last run a transition
//!   (optional attention, then an MLP) before their reader (RMSNorm → MLP → the group's ΣC).
//!
//! All hidden activations are the exact (erf) GELU; every norm uses float32's machine epsilon, as
//! `F.rms_norm`/`nn.RMSNorm` do when no eps is given.

use candle_core::{D, Device, Result, Tensor};

use super::checkpoint::TensorFile;
use super::config::{GlobalCiConfig, GlobalCiFnType, glob_match};
use super::error::LoadError;
use super::transformer::{matmul_last, softmax_last};

/// torch's default eps for RMSNorm on float32.
const RMS_EPS: f64 = f32::EPSILON as f64;

type LoadResult<T> = std::result::Result<T, LoadError>;

/// spd's `Linear`: `x W + b` with `W [in, out]`.
#[derive(Debug, Clone)]
struct Affine {
    w: Tensor,
    b: Tensor,
}

impl Affine {
    fn load(f: &TensorFile, prefix: &str, d_in: usize, d_out: usize) -> LoadResult<Self> {
        Ok(Self {
            w: f.get(&format!("{prefix}.W"), &[d_in, d_out])?,
            b: f.get(&format!("{prefix}.b"), &[d_out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_last(x, &self.w)?.broadcast_add(&self.b)
    }

    fn to_device(&self, d: &Device) -> Result<Self> {
        Ok(Self {
            w: self.w.to_device(d)?,
            b: self.b.to_device(d)?,
        })
    }
}

/// `Sequential(Linear, GELU, …, Linear)`: Linears at even indices `{prefix}.{0,2,…}`.
#[derive(Debug, Clone)]
struct Mlp {
    layers: Vec<Affine>,
}

impl Mlp {
    fn load(f: &TensorFile, prefix: &str, dims: &[usize]) -> LoadResult<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| Affine::load(f, &format!("{prefix}.{}", 2 * i), w[0], w[1]))
            .collect::<LoadResult<_>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.gelu_erf()?;
            }
        }
        Ok(h)
    }

    fn to_device(&self, d: &Device) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.to_device(d))
                .collect::<Result<_>>()?,
        })
    }
}

/// `x · rsqrt(mean(x²) + eps)`, times `weight` where the norm has one.
fn rms_norm(x: &Tensor, weight: Option<&Tensor>) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_mul(&(ms + RMS_EPS)?.sqrt()?.recip()?)?;
    match weight {
        Some(w) => y.broadcast_mul(w),
        None => Ok(y),
    }
}

/// The CI networks' self-attention: no biases, no mask, RoPE from the stored `inv_freq`.
#[derive(Debug, Clone)]
struct SelfAttention {
    /// `[d, d]` each, transposed from nn.Linear's `[out, in]`.
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    out_t: Tensor,
    /// `[Dh / 2]`
    inv_freq: Tensor,
    n_heads: usize,
}

impl SelfAttention {
    fn load(f: &TensorFile, prefix: &str, d: usize, n_heads: usize) -> LoadResult<Self> {
        if n_heads == 0 || !d.is_multiple_of(n_heads) || !(d / n_heads).is_multiple_of(2) {
            return Err(LoadError::Layout {
                path: f.path.clone(),
                msg: format!(
                    "{prefix}: width {d} does not split into {n_heads} heads of even size"
                ),
            });
        }
        let w = |name: &str| -> LoadResult<Tensor> {
            Ok(f.get(&format!("{prefix}.{name}.weight"), &[d, d])?
                .t()?
                .contiguous()?)
        };
        Ok(Self {
            q_t: w("q_proj")?,
            k_t: w("k_proj")?,
            v_t: w("v_proj")?,
            out_t: w("out_proj")?,
            inv_freq: f.get(&format!("{prefix}.rope.inv_freq"), &[d / n_heads / 2])?,
            n_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let (h, dh) = (self.n_heads, d / self.n_heads);
        let heads = |w: &Tensor| -> Result<Tensor> {
            matmul_last(x, w)?
                .reshape((b, s, h, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(&self.q_t)?, heads(&self.k_t)?, heads(&self.v_t)?);
        // angle[p, i] = p · inv_freq[i]; cos/sin repeated over both halves (rotate_half layout).
        let pos = Tensor::arange(0u32, s as u32, x.device())?.to_dtype(candle_core::DType::F32)?;
        let ang = pos
            .unsqueeze(1)?
            .broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let cos = Tensor::cat(&[&ang.cos()?, &ang.cos()?], 1)?;
        let sin = Tensor::cat(&[&ang.sin()?, &ang.sin()?], 1)?;
        let rope = |t: &Tensor| -> Result<Tensor> {
            let half = dh / 2;
            let rot = Tensor::cat(
                &[
                    &t.narrow(D::Minus1, half, half)?.neg()?,
                    &t.narrow(D::Minus1, 0, half)?,
                ],
                D::Minus1,
            )?;
            t.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
        };
        let (q, k) = (rope(&q)?, rope(&k)?);
        let att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
        let y = softmax_last(&att)?.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, s, d))?;
        matmul_last(&y, &self.out_t)
    }

    fn to_device(&self, d: &Device) -> Result<Self> {
        Ok(Self {
            q_t: self.q_t.to_device(d)?,
            k_t: self.k_t.to_device(d)?,
            v_t: self.v_t.to_device(d)?,
            out_t: self.out_t.to_device(d)?,
            inv_freq: self.inv_freq.to_device(d)?,
            n_heads: self.n_heads,
        })
    }
}

#[derive(Debug, Clone)]
struct TransformerBlock {
    attn: SelfAttention,
    mlp: Mlp,
}

/// One block group of the reverse-residual network.
#[derive(Debug, Clone)]
struct Group {
    /// Indices into the model's modules, in the group's order.
    modules: Vec<usize>,
    inp_projector: Affine,
    /// `(norm weight, attention)`, for all groups but the last when the config has attention.
    attn: Option<(Tensor, SelfAttention)>,
    /// `(norm weight, transition)`, for all groups but the last.
    transition: Option<(Tensor, Mlp)>,
    reader_norm: Tensor,
    reader: Mlp,
}

#[derive(Debug, Clone)]
enum Network {
    SharedMlp(Mlp),
    SharedTransformer {
        input_projector: Affine,
        blocks: Vec<TransformerBlock>,
        output_head: Affine,
    },
    ReverseResidual {
        d_resid: usize,
        groups: Vec<Group>,
    },
}

/// What a global network needs to know of one decomposed module.
pub struct ModuleShape<'a> {
    pub name: &'a str,
    pub d_in: usize,
    pub c: usize,
}

#[derive(Debug, Clone)]
pub struct GlobalCiFn {
    pub kind: GlobalCiFnType,
    /// Module indices in `sorted(module path)` order (the concatenation and split order of the
    /// shared networks).
    sorted: Vec<usize>,
    /// C of every module, in model order.
    cs: Vec<usize>,
    network: Network,
}

impl GlobalCiFn {
    /// Loads `<prefix>*` (`ci_fn._global_ci_fn.` in `dev` checkpoints). `modules` is in model order;
    /// `config_order` lists the same modules in the config's order (pattern by pattern), which is
    /// the order of modules inside a reverse-residual block group.
    pub fn new(
        f: &TensorFile,
        prefix: &str,
        cfg: &GlobalCiConfig,
        modules: &[ModuleShape<'_>],
        config_order: &[usize],
    ) -> LoadResult<Self> {
        let mut sorted: Vec<usize> = (0..modules.len()).collect();
        sorted.sort_by(|&a, &b| modules[a].name.as_bytes().cmp(modules[b].name.as_bytes()));
        let sum_in: usize = modules.iter().map(|m| m.d_in).sum();
        let sum_c: usize = modules.iter().map(|m| m.c).sum();
        let layout = |msg: String| LoadError::Layout {
            path: f.path.clone(),
            msg,
        };
        let network = match cfg.fn_type {
            GlobalCiFnType::SharedMlp => {
                let mut dims = vec![sum_in];
                dims.extend(&cfg.hidden_dims);
                dims.push(sum_c);
                Network::SharedMlp(Mlp::load(f, &format!("{prefix}layers"), &dims)?)
            }
            GlobalCiFnType::SharedTransformer => {
                let t = cfg
                    .transformer
                    .as_ref()
                    .ok_or_else(|| layout("global_shared_transformer without its config".into()))?;
                let d = t.d_model;
                let mut mlp_dims = vec![d];
                mlp_dims.extend(&t.mlp_hidden_dim);
                mlp_dims.push(d);
                let blocks = (0..t.n_blocks)
                    .map(|i| -> LoadResult<TransformerBlock> {
                        let p = format!("{prefix}_blocks.{i}");
                        Ok(TransformerBlock {
                            attn: SelfAttention::load(
                                f,
                                &format!("{p}.attn"),
                                d,
                                t.attn_config.n_heads,
                            )?,
                            mlp: Mlp::load(f, &format!("{p}.mlp"), &mlp_dims)?,
                        })
                    })
                    .collect::<LoadResult<_>>()?;
                Network::SharedTransformer {
                    input_projector: Affine::load(
                        f,
                        &format!("{prefix}_input_projector"),
                        sum_in,
                        d,
                    )?,
                    blocks,
                    output_head: Affine::load(f, &format!("{prefix}_output_head"), d, sum_c)?,
                }
            }
            GlobalCiFnType::ReverseResidual => {
                let d = cfg.d_resid.ok_or_else(|| {
                    layout("global_reverse_residual without d_resid_ci_fn".into())
                })?;
                let groups = reverse_groups(cfg, modules, config_order).map_err(layout)?;
                let n = groups.len();
                let mut loaded = Vec::with_capacity(n);
                for (gi, (name, members)) in groups.into_iter().enumerate() {
                    let safe = name.replace('.', "-");
                    let g_in: usize = members.iter().map(|&m| modules[m].d_in).sum();
                    let g_c: usize = members.iter().map(|&m| modules[m].c).sum();
                    let norm = |what: &str| f.get(&format!("{prefix}{what}.{safe}.weight"), &[d]);
                    let last = gi + 1 == n;
                    let attn = match (&cfg.transition_attn, last) {
                        (Some(a), false) => Some((
                            norm("_attn_norms")?,
                            SelfAttention::load(
                                f,
                                &format!("{prefix}_attn_transitions.{safe}"),
                                d,
                                a.n_heads,
                            )?,
                        )),
                        _ => None,
                    };
                    let transition = if last {
                        None
                    } else {
                        let p = format!("{prefix}_transitions.{safe}");
                        let mlp = match cfg.transition_hidden_dim {
                            Some(h) => Mlp::load(f, &p, &[d, h, d])?,
                            None => Mlp {
                                layers: vec![Affine::load(f, &p, d, d)?],
                            },
                        };
                        Some((norm("_transition_norms")?, mlp))
                    };
                    let mut reader_dims = vec![d];
                    reader_dims.extend(&cfg.reader_hidden_dims);
                    reader_dims.push(g_c);
                    loaded.push(Group {
                        inp_projector: Affine::load(
                            f,
                            &format!("{prefix}_inp_projectors.{safe}"),
                            g_in,
                            d,
                        )?,
                        attn,
                        transition,
                        reader_norm: norm("_reader_norms")?,
                        reader: Mlp::load(f, &format!("{prefix}_readers.{safe}"), &reader_dims)?,
                        modules: members,
                    });
                }
                Network::ReverseResidual {
                    d_resid: d,
                    groups: loaded,
                }
            }
        };
        Ok(Self {
            kind: cfg.fn_type,
            sorted,
            cs: modules.iter().map(|m| m.c).collect(),
            network,
        })
    }

    /// Whether the network attends over the sequence (so a position's CI depends on the others).
    pub fn reads_other_positions(&self) -> bool {
        match &self.network {
            Network::SharedMlp(_) => false,
            Network::SharedTransformer { .. } => true,
            Network::ReverseResidual { groups, .. } => groups.iter().any(|g| g.attn.is_some()),
        }
    }

    /// Every module's CI before the sigmoid (`[B, T, C_i]`, model order) from every module's input
    /// (`[B, T, d_in_i]`, model order).
    pub fn pre_sigmoid(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; inputs.len()];
        let mut split_into = |order: &[usize], y: &Tensor| -> Result<()> {
            let mut at = 0;
            for &m in order {
                out[m] = Some(y.narrow(D::Minus1, at, self.cs[m])?.contiguous()?);
                at += self.cs[m];
            }
            Ok(())
        };
        match &self.network {
            Network::SharedMlp(mlp) => {
                let x = concat(inputs, &self.sorted, |t| Ok(t.clone()))?;
                split_into(&self.sorted, &mlp.forward(&x)?)?;
            }
            Network::SharedTransformer {
                input_projector,
                blocks,
                output_head,
            } => {
                let x = concat(inputs, &self.sorted, |t| rms_norm(t, None))?;
                let mut h = input_projector.forward(&x)?;
                for block in blocks {
                    h = (&h + block.attn.forward(&rms_norm(&h, None)?)?)?;
                    h = (&h + block.mlp.forward(&rms_norm(&h, None)?)?)?;
                }
                split_into(&self.sorted, &output_head.forward(&h)?)?;
            }
            Network::ReverseResidual { d_resid, groups } => {
                let (b, t, _) = inputs[0].dims3()?;
                let mut resid =
                    Tensor::zeros((b, t, *d_resid), inputs[0].dtype(), inputs[0].device())?;
                for g in groups {
                    let x = concat(inputs, &g.modules, |t| Ok(t.clone()))?;
                    resid = (resid + g.inp_projector.forward(&x)?)?;
                    if let Some((w, attn)) = &g.attn {
                        resid = (&resid + attn.forward(&rms_norm(&resid, Some(w))?)?)?;
                    }
                    if let Some((w, mlp)) = &g.transition {
                        resid = (&resid + mlp.forward(&rms_norm(&resid, Some(w))?)?)?;
                    }
                    let ci = g.reader.forward(&rms_norm(&resid, Some(&g.reader_norm))?)?;
                    split_into(&g.modules, &ci)?;
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every module is in the network's output"))
            .collect())
    }

    /// Adds `shifts[m]` to the output bias of every module `m` (model order): how synthetic models
    /// are made as sparse as trained ones.
    pub fn shift_output_bias(&mut self, shifts: &[f32]) -> Result<()> {
        let shift = |b: &Tensor, order: &[usize]| -> Result<Tensor> {
            let v: Vec<f32> = order
                .iter()
                .flat_map(|&m| std::iter::repeat_n(shifts[m], self.cs[m]))
                .collect();
            b + Tensor::from_vec(v, b.dims(), b.device())?
        };
        match &mut self.network {
            Network::SharedMlp(mlp) => {
                let last = mlp.layers.last_mut().expect("at least one layer");
                last.b = shift(&last.b, &self.sorted)?;
            }
            Network::SharedTransformer { output_head, .. } => {
                output_head.b = shift(&output_head.b, &self.sorted)?;
            }
            Network::ReverseResidual { groups, .. } => {
                for g in groups {
                    let last = g.reader.layers.last_mut().expect("at least one layer");
                    last.b = shift(&last.b, &g.modules)?;
                }
            }
        }
        Ok(())
    }

    pub fn to_device(&self, d: &Device) -> Result<Self> {
        let network = match &self.network {
            Network::SharedMlp(m) => Network::SharedMlp(m.to_device(d)?),
            Network::SharedTransformer {
                input_projector,
                blocks,
                output_head,
            } => Network::SharedTransformer {
                input_projector: input_projector.to_device(d)?,
                blocks: blocks
                    .iter()
                    .map(|b| {
                        Ok(TransformerBlock {
                            attn: b.attn.to_device(d)?,
                            mlp: b.mlp.to_device(d)?,
                        })
                    })
                    .collect::<Result<_>>()?,
                output_head: output_head.to_device(d)?,
            },
            Network::ReverseResidual { d_resid, groups } => Network::ReverseResidual {
                d_resid: *d_resid,
                groups: groups
                    .iter()
                    .map(|g| {
                        Ok(Group {
                            modules: g.modules.clone(),
                            inp_projector: g.inp_projector.to_device(d)?,
                            attn: match &g.attn {
                                Some((w, a)) => Some((w.to_device(d)?, a.to_device(d)?)),
                                None => None,
                            },
                            transition: match &g.transition {
                                Some((w, m)) => Some((w.to_device(d)?, m.to_device(d)?)),
                                None => None,
                            },
                            reader_norm: g.reader_norm.to_device(d)?,
                            reader: g.reader.to_device(d)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            },
        };
        Ok(Self {
            kind: self.kind,
            sorted: self.sorted.clone(),
            cs: self.cs.clone(),
            network,
        })
    }
}

/// `cat([f(inputs[m]) for m in order], -1)`
fn concat(
    inputs: &[Tensor],
    order: &[usize],
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let parts = order
        .iter()
        .map(|&m| f(&inputs[m]))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, D::Minus1)
}

/// The reverse-residual block groups as module indices: per group (config order), per pattern
/// (pattern order), the modules it matches in the config's module order. Every module must be in
/// exactly one group.
fn reverse_groups(
    cfg: &GlobalCiConfig,
    modules: &[ModuleShape<'_>],
    config_order: &[usize],
) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
    let mut owner: Vec<Option<&str>> = vec![None; modules.len()];
    let mut groups = Vec::with_capacity(cfg.block_groups.len());
    for g in &cfg.block_groups {
        let mut members = Vec::new();
        for pat in &g.patterns {
            let matched: Vec<usize> = config_order
                .iter()
                .copied()
                .filter(|&m| glob_match(pat, modules[m].name))
                .collect();
            if matched.is_empty() {
                return Err(format!(
                    "block group `{}`: pattern `{pat}` matches no decomposed module",
                    g.name
                ));
            }
            for m in matched {
                if let Some(other) = owner[m] {
                    return Err(format!(
                        "module {} is in block groups `{other}` and `{}`",
                        modules[m].name, g.name
                    ));
                }
                owner[m] = Some(&g.name);
                members.push(m);
            }
        }
        groups.push((g.name.clone(), members));
    }
    if let Some(m) = owner.iter().position(Option::is_none) {
        return Err(format!(
            "module {} is in no block group of the global_reverse_residual CI",
            modules[m].name
        ));
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    //! The reverse-residual network against a float64 reimplementation written from spd's
    //! description (no fixture run has one): block groups in config order, transitions with
    //! attention, readers after the transition, outputs split back per module.
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;
    use crate::model::config::{AttnConfig, BlockGroup};
    use crate::model::synthetic::Rng;

    type M = Vec<Vec<f64>>;

    fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.7) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn mat(t: &Tensor) -> M {
        let t = t.to_dtype(candle_core::DType::F64).unwrap();
        match t.rank() {
            1 => vec![t.to_vec1().unwrap()],
            _ => t.to_vec2().unwrap(),
        }
    }

    /// `x W + b` row by row.
    fn affine(x: &M, w: &M, b: &[f64]) -> M {
        x.iter()
            .map(|r| {
                (0..w[0].len())
                    .map(|j| b[j] + r.iter().zip(w).map(|(a, wr)| a * wr[j]).sum::<f64>())
                    .collect()
            })
            .collect()
    }

    fn erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let y = 1.0
            - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736)
                * t
                + 0.254_829_592)
                * t
                * (-x * x).exp();
        y.copysign(x)
    }

    fn gelu(x: &M) -> M {
        x.iter()
            .map(|r| {
                r.iter()
                    .map(|v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())))
                    .collect()
            })
            .collect()
    }

    fn add(a: &M, b: &M) -> M {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
            .collect()
    }

    fn rms(x: &M, w: &[f64]) -> M {
        x.iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                let k = 1.0 / (ms + f32::EPSILON as f64).sqrt();
                r.iter().zip(w).map(|(v, wi)| v * k * wi).collect()
            })
            .collect()
    }

    /// Bidirectional attention with RoPE from `inv_freq`, weights `[out, in]`.
    fn attention(x: &M, q: &M, k: &M, v: &M, o: &M, inv_freq: &[f64], heads: usize) -> M {
        let lin = |x: &M, w: &M| -> M {
            x.iter()
                .map(|r| {
                    w.iter()
                        .map(|wr| r.iter().zip(wr).map(|(a, b)| a * b).sum())
                        .collect()
                })
                .collect()
        };
        let (s, d) = (x.len(), x[0].len());
        let dh = d / heads;
        let rope = |m: M| -> M {
            m.into_iter()
                .enumerate()
                .map(|(p, r)| {
                    let mut out = r.clone();
                    for h in 0..heads {
                        for (i, f) in inv_freq.iter().enumerate().take(dh / 2) {
                            let (a, b) = (h * dh + i, h * dh + i + dh / 2);
                            let ang = p as f64 * f;
                            out[a] = r[a] * ang.cos() - r[b] * ang.sin();
                            out[b] = r[b] * ang.cos() + r[a] * ang.sin();
                        }
                    }
                    out
                })
                .collect()
        };
        let (qs, ks, vs) = (rope(lin(x, q)), rope(lin(x, k)), lin(x, v));
        let mut y = vec![vec![0.0; d]; s];
        for h in 0..heads {
            let r = h * dh..(h + 1) * dh;
            for i in 0..s {
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        qs[i][r.clone()]
                            .iter()
                            .zip(&ks[j][r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..s {
                    for c in r.clone() {
                        y[i][c] += e[j] / z * vs[j][c];
                    }
                }
            }
        }
        lin(&y, o)
    }

    #[test]
    fn reverse_residual_equals_a_float64_reimplementation() {
        let mut rng = Rng::new(3);
        // Three modules; groups: `c.*` first (the unembedding end), then `b.*` and `a.*`.
        let names = ["a.x", "b.y", "c.z"];
        let (d_ins, cs) = ([3usize, 2, 4], [2usize, 3, 1]);
        let (d, th, rh, heads, s) = (4usize, 6usize, 5usize, 2usize, 3usize);
        let groups = [("last.g", vec![2usize]), ("first", vec![1, 0])];
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let p = "ci_fn._global_ci_fn.";
        for (gi, (g, members)) in groups.iter().enumerate() {
            let safe = g.replace('.', "-");
            let g_in: usize = members.iter().map(|&m| d_ins[m]).sum();
            let g_c: usize = members.iter().map(|&m| cs[m]).sum();
            t.insert(
                format!("{p}_inp_projectors.{safe}.W"),
                rand(&mut rng, &[g_in, d]),
            );
            t.insert(format!("{p}_inp_projectors.{safe}.b"), rand(&mut rng, &[d]));
            t.insert(
                format!("{p}_reader_norms.{safe}.weight"),
                rand(&mut rng, &[d]),
            );
            t.insert(format!("{p}_readers.{safe}.0.W"), rand(&mut rng, &[d, rh]));
            t.insert(format!("{p}_readers.{safe}.0.b"), rand(&mut rng, &[rh]));
            t.insert(
                format!("{p}_readers.{safe}.2.W"),
                rand(&mut rng, &[rh, g_c]),
            );
            t.insert(format!("{p}_readers.{safe}.2.b"), rand(&mut rng, &[g_c]));
            if gi == 0 {
                for (k, shape) in [
                    ("0.W", vec![d, th]),
                    ("0.b", vec![th]),
                    ("2.W", vec![th, d]),
                    ("2.b", vec![d]),
                ] {
                    t.insert(
                        format!("{p}_transitions.{safe}.{k}"),
                        rand(&mut rng, &shape),
                    );
                }
                t.insert(
                    format!("{p}_transition_norms.{safe}.weight"),
                    rand(&mut rng, &[d]),
                );
                t.insert(
                    format!("{p}_attn_norms.{safe}.weight"),
                    rand(&mut rng, &[d]),
                );
                for w in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    t.insert(
                        format!("{p}_attn_transitions.{safe}.{w}.weight"),
                        rand(&mut rng, &[d, d]),
                    );
                }
                let dh = d / heads;
                let inv: Vec<f32> = (0..dh / 2)
                    .map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / dh as f32))
                    .collect();
                t.insert(
                    format!("{p}_attn_transitions.{safe}.rope.inv_freq"),
                    Tensor::new(inv.as_slice(), &Device::Cpu).unwrap(),
                );
            }
        }
        let cfg = GlobalCiConfig {
            fn_type: GlobalCiFnType::ReverseResidual,
            hidden_dims: vec![],
            transformer: None,
            reader_hidden_dims: vec![rh],
            d_resid: Some(d),
            block_groups: vec![
                BlockGroup {
                    name: "last.g".into(),
                    patterns: vec!["c.*".into()],
                },
                BlockGroup {
                    name: "first".into(),
                    patterns: vec!["b.*".into(), "a.*".into()],
                },
            ],
            transition_attn: Some(AttnConfig {
                n_heads: heads,
                max_len: 64,
                rope_base: 100.0,
            }),
            transition_hidden_dim: Some(th),
        };
        let shapes: Vec<ModuleShape<'_>> = (0..3)
            .map(|i| ModuleShape {
                name: names[i],
                d_in: d_ins[i],
                c: cs[i],
            })
            .collect();
        let f = TensorFile::from_map(PathBuf::from("<test>"), t.clone());
        let net = GlobalCiFn::new(&f, p, &cfg, &shapes, &[0, 1, 2]).unwrap();
        assert!(net.reads_other_positions());
        let inputs: Vec<Tensor> = d_ins
            .iter()
            .map(|&di| rand(&mut rng, &[1, s, di]))
            .collect();
        let ours = net.pre_sigmoid(&inputs).unwrap();

        let get = |k: &str| mat(&t[&format!("{p}{k}")]);
        let vec1 = |k: &str| get(k).remove(0);
        let x: Vec<M> = inputs.iter().map(|x| mat(&x.squeeze(0).unwrap())).collect();
        let mut resid: M = vec![vec![0.0; d]; s];
        let mut want: Vec<Option<M>> = vec![None; 3];
        for (gi, (g, members)) in groups.iter().enumerate() {
            let safe = g.replace('.', "-");
            let cat: M = (0..s)
                .map(|r| members.iter().flat_map(|&m| x[m][r].clone()).collect())
                .collect();
            resid = add(
                &resid,
                &affine(
                    &cat,
                    &get(&format!("_inp_projectors.{safe}.W")),
                    &vec1(&format!("_inp_projectors.{safe}.b")),
                ),
            );
            if gi + 1 < groups.len() {
                let a = format!("_attn_transitions.{safe}");
                let normed = rms(&resid, &vec1(&format!("_attn_norms.{safe}.weight")));
                resid = add(
                    &resid,
                    &attention(
                        &normed,
                        &get(&format!("{a}.q_proj.weight")),
                        &get(&format!("{a}.k_proj.weight")),
                        &get(&format!("{a}.v_proj.weight")),
                        &get(&format!("{a}.out_proj.weight")),
                        &vec1(&format!("{a}.rope.inv_freq")),
                        heads,
                    ),
                );
                let tr = format!("_transitions.{safe}");
                let h = gelu(&affine(
                    &rms(&resid, &vec1(&format!("_transition_norms.{safe}.weight"))),
                    &get(&format!("{tr}.0.W")),
                    &vec1(&format!("{tr}.0.b")),
                ));
                resid = add(
                    &resid,
                    &affine(&h, &get(&format!("{tr}.2.W")), &vec1(&format!("{tr}.2.b"))),
                );
            }
            let rd = format!("_readers.{safe}");
            let h = gelu(&affine(
                &rms(&resid, &vec1(&format!("_reader_norms.{safe}.weight"))),
                &get(&format!("{rd}.0.W")),
                &vec1(&format!("{rd}.0.b")),
            ));
            let out = affine(&h, &get(&format!("{rd}.2.W")), &vec1(&format!("{rd}.2.b")));
            let mut at = 0;
            for &m in members {
                want[m] = Some(out.iter().map(|r| r[at..at + cs[m]].to_vec()).collect());
                at += cs[m];
            }
        }
        for m in 0..3 {
            let got = mat(&ours[m].squeeze(0).unwrap());
            let want = want[m].as_ref().unwrap();
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "module {m}: {a} vs {b}");
            }
        }
    }
}
