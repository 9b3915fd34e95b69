//! The component model: the target GPT2Simple, plus components and a CI function for each decomposed
//! module. Loading resolves a run as the original tool lays it out on disk.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::checkpoint::{self, TensorFile};
use super::ci::{self, CiFn};
use super::components::Components;
use super::config::{Gpt2Config, SpdConfig, glob_match, read_yaml};
use super::error::{LoadError, RunError};
use super::gpt2_simple::{Gpt2Simple, Linear, LinearHook, ModuleId, PlainForward, tokens_tensor};

/// A decomposed projection: its components and CI function.
#[derive(Debug, Clone)]
pub struct DecomposedModule {
    pub id: ModuleId,
    pub name: String,
    pub components: Components,
    pub ci_fn: CiFn,
}

#[derive(Debug, Clone)]
pub struct SpdModel {
    pub config: SpdConfig,
    pub target: Gpt2Simple,
    /// In the model's module order (`h.0.attn.q_proj`, `h.0.attn.k_proj`, …).
    pub modules: Vec<DecomposedModule>,
    /// The checkpoint the model was read from (for provenance in databases and logs).
    pub checkpoint: std::path::PathBuf,
}

/// CI of every decomposed module for a batch, plus the plain target model's logits.
#[derive(Debug, Clone)]
pub struct CiOutput {
    /// Per module (in `SpdModel::modules` order): `[B, T, C]`.
    pub lower: Vec<Tensor>,
    pub upper: Vec<Tensor>,
    pub pre_sigmoid: Vec<Tensor>,
    /// `[B, T, vocab]`
    pub target_logits: Tensor,
}

/// The component forward with every module's acts cut into fresh leaves (SPEC §3.2).
pub struct LeafForward {
    /// `[1, T, d]`: the token embeddings `wte[t]` as a leaf (before `wpe` is added).
    pub wte: Var,
    /// Per module: the leaf acts `a'` that the downstream computation reads, `[1, T, C]`.
    pub leaves: Vec<Var>,
    /// Per module: the acts `x V` before the cut, still connected to upstream leaves, `[1, T, C]`.
    pub acts: Vec<Tensor>,
    /// `[1, T, vocab]`, connected to the leaves.
    pub logits: Tensor,
}

impl SpdModel {
    /// Loads a run from a run directory, a `model_<step>.pth`, or a `model.safetensors`.
    pub fn load(path: &Path, device: &Device) -> std::result::Result<Self, LoadError> {
        let loc = checkpoint::locate_run(path)?;
        let config_path = loc.run_dir.join("final_config.yaml");
        let config: SpdConfig = read_yaml(&config_path)?;
        if !config.pretrained_model_class.ends_with("GPT2Simple") {
            return Err(LoadError::UnknownModelClass {
                path: config_path,
                class: config.pretrained_model_class.clone(),
            });
        }
        let mut spd = TensorFile::read(&loc.checkpoint)?;
        spd.rename_keys(checkpoint::normalize_spd_key);

        let location = config
            .pretrained_location()
            .ok_or_else(|| LoadError::Config {
                path: config_path.clone(),
                msg: "neither pretrained_model_path nor pretrained_model_name is set".into(),
            })?;
        let (target_ckpt, model_config_path) = checkpoint::locate_target(&loc.run_dir, location)?;
        let gpt_cfg: Gpt2Config = read_yaml(&model_config_path)?;
        // The SPD state dict carries the target's weights under `target_model.`; they win over the
        // pretrained checkpoint (as `load_state_dict` on the original's ComponentModel does).
        let embedded = spd.strip_prefix("target_model.");
        let target_file = if embedded.contains_key("wpe.weight") {
            TensorFile::from_map(loc.checkpoint.clone(), embedded)
        } else {
            let mut f = TensorFile::read(&target_ckpt)?;
            f.rename_keys(checkpoint::normalize_target_key);
            f
        };
        let target = Gpt2Simple::new(gpt_cfg, &target_file)?;

        let mut modules = Vec::new();
        for id in target.module_ids() {
            let name = id.name();
            if !config
                .target_module_patterns
                .iter()
                .any(|p| glob_match(p, &name))
            {
                continue;
            }
            let lin = target.linear(id);
            let components = Components::new(
                &spd,
                &name,
                lin.d_in(),
                lin.d_out(),
                config.c,
                lin.bias.as_ref(),
            )?;
            let ci_fn = CiFn::new(
                &spd,
                &name,
                config.ci_fn_type,
                &config.ci_fn_hidden_dims,
                lin.d_in(),
                config.c,
            )?;
            modules.push(DecomposedModule {
                id,
                name,
                components,
                ci_fn,
            });
        }
        if modules.is_empty() {
            return Err(LoadError::Config {
                path: config_path,
                msg: format!(
                    "target_module_patterns {:?} match no module of the model",
                    config.target_module_patterns
                ),
            });
        }
        let model = Self {
            config,
            target,
            modules,
            checkpoint: loc.checkpoint,
        };
        if device.same_device(&Device::Cpu) {
            Ok(model)
        } else {
            Ok(model.into_device(device)?)
        }
    }

    fn into_device(self, device: &Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        let mvl = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                wt: mv(&l.wt)?,
                bias: l.bias.as_ref().map(mv).transpose()?,
            })
        };
        let mut target = self.target.clone();
        target.wte = mv(&target.wte)?;
        target.wpe = mv(&target.wpe)?;
        target.lm_head_t = mv(&target.lm_head_t)?;
        target.ln_f.weight = mv(&target.ln_f.weight)?;
        target.ln_f.bias = mv(&target.ln_f.bias)?;
        for b in &mut target.blocks {
            for ln in [&mut b.ln_1, &mut b.ln_2] {
                ln.weight = mv(&ln.weight)?;
                ln.bias = mv(&ln.bias)?;
            }
            for l in &mut b.linears {
                *l = mvl(l)?;
            }
        }
        let modules = self
            .modules
            .iter()
            .map(|m| -> Result<DecomposedModule> {
                let mut m = m.clone();
                m.components.v = mv(&m.components.v)?;
                m.components.u = mv(&m.components.u)?;
                m.components.bias = m.components.bias.as_ref().map(mv).transpose()?;
                for (w, b) in &mut m.ci_fn.layers {
                    *w = mv(w)?;
                    *b = mv(b)?;
                }
                Ok(m)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: self.config,
            target,
            modules,
            checkpoint: self.checkpoint,
        })
    }

    pub fn device(&self) -> &Device {
        self.target.device()
    }

    pub fn c(&self) -> usize {
        self.config.c
    }

    pub fn vocab_size(&self) -> usize {
        self.target.cfg.vocab_size
    }

    pub fn block_size(&self) -> usize {
        self.target.cfg.block_size
    }

    pub fn module_index(&self, id: ModuleId) -> Option<usize> {
        self.modules.iter().position(|m| m.id == id)
    }

    /// Checks a prompt against the model: non-empty, within the context, every id in the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> std::result::Result<(), RunError> {
        if tokens.is_empty() {
            return Err(RunError::EmptyPrompt);
        }
        if tokens.len() > self.block_size() {
            return Err(RunError::TooLong {
                len: tokens.len(),
                block_size: self.block_size(),
            });
        }
        if let Some((position, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.vocab_size())
        {
            return Err(RunError::TokenOutOfVocab {
                token,
                position,
                vocab_size: self.vocab_size(),
            });
        }
        Ok(())
    }

    /// The target forward of token ids `[B, T]`, recording each decomposed module's input, then the CI
    /// of every module from those inputs.
    pub fn ci(&self, tokens: &Tensor) -> Result<CiOutput> {
        struct Record<'a> {
            model: &'a SpdModel,
            inputs: Vec<Option<Tensor>>,
        }
        impl LinearHook for Record<'_> {
            fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
                if let Some(i) = self.model.module_index(id) {
                    self.inputs[i] = Some(x.clone());
                }
                PlainForward.linear(id, x, linear)
            }
        }
        let mut rec = Record {
            model: self,
            inputs: vec![None; self.modules.len()],
        };
        let target_logits = self.target.forward(tokens, &mut rec)?;
        let (mut lower, mut upper, mut pre) = (vec![], vec![], vec![]);
        for (m, x) in self.modules.iter().zip(rec.inputs) {
            let x = x.expect("every decomposed module runs in the forward pass");
            let (b, t, d_in) = x.dims3()?;
            let x = x.reshape((b * t, d_in))?;
            let acts = m.components.inner_acts(&x)?;
            let z = m.ci_fn.pre_sigmoid(&x, &acts)?;
            let shape = (b, t, m.components.c());
            lower.push(ci::lower_ci(self.config.sigmoid_type, &z)?.reshape(shape)?);
            upper.push(ci::upper_ci(self.config.sigmoid_type, &z)?.reshape(shape)?);
            pre.push(z.reshape(shape)?);
        }
        Ok(CiOutput {
            lower,
            upper,
            pre_sigmoid: pre,
            target_logits,
        })
    }

    /// The component forward of one prompt with masks `masks[i]` (`[1, T, C]`, usually the lower CI):
    /// every decomposed module computes `a = x V`, and the rest of the model reads a fresh leaf `a'`.
    pub fn leaf_forward(&self, tokens: &[u32], masks: &[Tensor]) -> Result<LeafForward> {
        struct Leaves<'a> {
            model: &'a SpdModel,
            masks: &'a [Tensor],
            wte: Option<Var>,
            leaves: Vec<Option<Var>>,
            acts: Vec<Option<Tensor>>,
        }
        impl LinearHook for Leaves<'_> {
            fn embed(&mut self, e: Tensor) -> Result<Tensor> {
                let leaf = Var::from_tensor(&e.detach())?;
                let out = leaf.as_tensor().clone();
                self.wte = Some(leaf);
                Ok(out)
            }
            fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
                let Some(i) = self.model.module_index(id) else {
                    return PlainForward.linear(id, x, linear);
                };
                let comps = &self.model.modules[i].components;
                let acts = comps.inner_acts(x)?;
                let leaf = Var::from_tensor(&acts.detach())?;
                let out = comps.masked_output(leaf.as_tensor(), &self.masks[i])?;
                self.leaves[i] = Some(leaf);
                self.acts[i] = Some(acts);
                Ok(out)
            }
        }
        let n = self.modules.len();
        let mut hook = Leaves {
            model: self,
            masks,
            wte: None,
            leaves: vec![None; n],
            acts: vec![None; n],
        };
        let tokens = tokens_tensor(tokens, self.device())?;
        let logits = self.target.forward(&tokens, &mut hook)?;
        Ok(LeafForward {
            wte: hook.wte.expect("the forward embeds the tokens"),
            leaves: hook
                .leaves
                .into_iter()
                .map(|l| l.expect("every module runs"))
                .collect(),
            acts: hook
                .acts
                .into_iter()
                .map(|a| a.expect("every module runs"))
                .collect(),
            logits,
        })
    }

    /// Masks of all ones for every module, `[1, T, C]`.
    pub fn ones_masks(&self, t: usize) -> Result<Vec<Tensor>> {
        self.modules
            .iter()
            .map(|m| Tensor::ones((1, t, m.components.c()), DType::F32, self.device()))
            .collect()
    }
}
