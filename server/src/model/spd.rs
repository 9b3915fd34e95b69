//! The component model: the target model, plus components for each decomposed module and the
//! CI networks (one per module, or one global network). Loading resolves a run as the original tool
//! lays it out on disk.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::checkpoint::{self, TensorFile};
use super::ci::{self, CiFn};
use super::components::Components;
use super::config::{CiConfig, SpdConfig};
use super::error::{LoadError, RunError};
use super::global_ci::{GlobalCiFn, ModuleShape};
use super::transformer::{
    Family, Linear, LinearHook, ModuleId, PlainForward, TargetConfig, Transformer, tokens_tensor,
};

/// A decomposed projection: its components and, for layerwise runs, its CI network.
#[derive(Debug, Clone)]
pub struct DecomposedModule {
    pub id: ModuleId,
    pub name: String,
    pub components: Components,
    /// `None` when the run has a global CI network ([`SpdModel::global_ci`]).
    pub ci_fn: Option<CiFn>,
}

#[derive(Debug, Clone)]
pub struct SpdModel {
    pub config: SpdConfig,
    pub target: Transformer,
    /// In the model's module order (`h.0.attn.q_proj`, `h.0.attn.k_proj`, …).
    pub modules: Vec<DecomposedModule>,
    /// The one CI network of a global run.
    pub global_ci: Option<GlobalCiFn>,
    /// The checkpoint the model was read from (for provenance in databases and logs).
    pub checkpoint: std::path::PathBuf,
    /// Every file whose bytes the model was made of (config, checkpoint, the target's weights and
    /// config when they are separate): what identifies the run to caches.
    pub files: Vec<std::path::PathBuf>,
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

/// The key prefix under which a checkpoint keeps its CI networks: spd `dev` nests them in `ci_fn.`.
fn ci_prefix(f: &TensorFile, leaf: &str) -> String {
    let nested = format!("ci_fn.{leaf}");
    if f.keys().any(|k| k.starts_with(&nested)) {
        nested
    } else {
        leaf.to_owned()
    }
}

impl SpdModel {
    /// Loads a run from a run directory, a `model_<step>.pth`, or a `model.safetensors`.
    pub fn load(path: &Path, device: &Device) -> std::result::Result<Self, LoadError> {
        let loc = checkpoint::locate_run(path)?;
        let config_path = loc.run_dir.join("final_config.yaml");
        let config = SpdConfig::read(&config_path)?;
        let family = Family::from_class(&config.pretrained_model_class).ok_or_else(|| {
            LoadError::UnknownModelClass {
                path: config_path.clone(),
                class: config.pretrained_model_class.clone(),
            }
        })?;
        let mut spd = TensorFile::read(&loc.checkpoint)?;
        spd.rename_keys(checkpoint::normalize_spd_key);

        let location = config
            .pretrained_location()
            .ok_or_else(|| LoadError::Config {
                path: config_path.clone(),
                msg: "neither pretrained_model_path nor pretrained_model_name is set".into(),
            })?;
        let (target_ckpt, model_config_path) = checkpoint::locate_target(&loc.run_dir, location)?;
        let target_cfg = TargetConfig::read(family, &model_config_path)?;
        // The SPD state dict carries the target's weights under `target_model.`; they win over the
        // pretrained checkpoint (as `load_state_dict` on the original's ComponentModel does).
        let embedded = spd.strip_prefix("target_model.");
        let target_file =
            if embedded.contains_key("wte.weight") || embedded.contains_key("lm_head.weight") {
                TensorFile::from_map(loc.checkpoint.clone(), embedded)
            } else {
                let mut f = TensorFile::read(&target_ckpt)?;
                f.rename_keys(checkpoint::normalize_target_key);
                f
            };
        let target = Transformer::new(target_cfg, &target_file)?;
        let mut model = Self::build(config, &config_path, target, &spd)?;
        model.files.push(model_config_path);
        if target_file.path != loc.checkpoint {
            model.files.push(target_file.path.clone());
        }
        if device.same_device(&Device::Cpu) {
            Ok(model)
        } else {
            Ok(model.into_device(device)?)
        }
    }

    /// The component model of `target` with the components and CI networks in `spd` (a state dict
    /// with the current key spellings), as `config` describes them.
    pub fn build(
        config: SpdConfig,
        config_path: &Path,
        target: Transformer,
        spd: &TensorFile,
    ) -> std::result::Result<Self, LoadError> {
        let bad_config = |msg: String| LoadError::Config {
            path: config_path.to_owned(),
            msg,
        };
        // Identities first (spd inserts them before it expands the module patterns), so that
        // `module_ids` lists each one in front of the projection it feeds.
        let mut target = target;
        let mut identity_matched = vec![false; config.identity_module_info.len()];
        let parents: Vec<ModuleId> = target.module_ids().collect();
        for &parent in &parents {
            let hits = config.identity_matching(&parent.name());
            if hits.is_empty() {
                continue;
            }
            for &i in &hits {
                identity_matched[i] = true;
            }
            target.insert_identity(parent)?;
        }
        if let Some(i) = identity_matched.iter().position(|m| !m) {
            return Err(bad_config(format!(
                "identity pattern `{}` matches no projection of the {} target",
                config.identity_module_info[i].module_pattern,
                target.cfg.family.name(),
            )));
        }
        // C per module from the first pattern it matches; patterns that disagree are an error, as
        // spd refuses a module matched twice. `found` holds (id, path, C, config order): module
        // patterns first, then identity patterns.
        let mut found = Vec::new();
        let mut matched = vec![false; config.module_info.len()];
        for id in target.module_ids() {
            let name = id.name();
            if id.pre_identity {
                if let Some(&i) = config.matching(&name).first() {
                    return Err(bad_config(format!(
                        "{name} matches module pattern `{}` and is an identity insertion too",
                        config.module_info[i].module_pattern
                    )));
                }
                let hits = config.identity_matching(&id.parent().name());
                let c = config.identity_module_info[hits[0]].c;
                if let Some(&other) = hits
                    .iter()
                    .find(|&&i| config.identity_module_info[i].c != c)
                {
                    return Err(bad_config(format!(
                        "{name} matches identity patterns `{}` (C = {c}) and `{}` (C = {})",
                        config.identity_module_info[hits[0]].module_pattern,
                        config.identity_module_info[other].module_pattern,
                        config.identity_module_info[other].c
                    )));
                }
                found.push((id, name, c, config.module_info.len() + hits[0]));
                continue;
            }
            let hits = config.matching(&name);
            let Some(&first) = hits.first() else {
                continue;
            };
            let c = config.module_info[first].c;
            if let Some(&other) = hits.iter().find(|&&i| config.module_info[i].c != c) {
                return Err(bad_config(format!(
                    "{name} matches module patterns `{}` (C = {c}) and `{}` (C = {})",
                    config.module_info[first].module_pattern,
                    config.module_info[other].module_pattern,
                    config.module_info[other].c
                )));
            }
            for &i in &hits {
                matched[i] = true;
            }
            found.push((id, name, c, first));
        }
        if let Some(i) = matched.iter().position(|m| !m) {
            return Err(bad_config(format!(
                "module pattern `{}` matches no projection of the {} target (decomposable: \
                 h.N.attn.{{q,k,v,o}}_proj and the MLP's {})",
                config.module_info[i].module_pattern,
                target.cfg.family.name(),
                match target.cfg.mlp {
                    super::transformer::MlpKind::Gelu => "mlp.c_fc, mlp.down_proj",
                    super::transformer::MlpKind::SwiGlu =>
                        "mlp.gate_proj, mlp.up_proj, mlp.down_proj",
                }
            )));
        }
        let layerwise_prefix = ci_prefix(spd, "_ci_fns.");
        let mut modules = Vec::with_capacity(found.len());
        for (id, name, c, _) in &found {
            let lin = target.linear(*id);
            let components = Components::new(spd, name, lin, *c, config.use_delta_component)?;
            let ci_fn = match &config.ci {
                CiConfig::Layerwise {
                    fn_type,
                    hidden_dims,
                } => Some(CiFn::new(
                    spd,
                    &layerwise_prefix,
                    name,
                    *fn_type,
                    hidden_dims,
                    lin.d_in(),
                    *c,
                )?),
                CiConfig::Global(_) => None,
            };
            modules.push(DecomposedModule {
                id: *id,
                name: name.clone(),
                components,
                ci_fn,
            });
        }
        let global_ci = match &config.ci {
            CiConfig::Layerwise { .. } => None,
            CiConfig::Global(g) => {
                let shapes: Vec<ModuleShape<'_>> = modules
                    .iter()
                    .map(|m| ModuleShape {
                        name: &m.name,
                        d_in: m.components.v.dims()[0],
                        c: m.components.c(),
                    })
                    .collect();
                // spd's module order: pattern by pattern, model order within a pattern.
                let mut config_order: Vec<usize> = (0..found.len()).collect();
                config_order.sort_by_key(|&i| found[i].3);
                Some(GlobalCiFn::new(
                    spd,
                    &ci_prefix(spd, "_global_ci_fn."),
                    g,
                    &shapes,
                    &config_order,
                )?)
            }
        };
        Ok(Self {
            config,
            target,
            modules,
            global_ci,
            checkpoint: spd.path.clone(),
            files: vec![config_path.to_owned(), spd.path.clone()],
        })
    }

    fn into_device(self, device: &Device) -> Result<Self> {
        let modules = self
            .modules
            .iter()
            .map(|m| -> Result<DecomposedModule> {
                Ok(DecomposedModule {
                    id: m.id,
                    name: m.name.clone(),
                    components: m.components.to_device(device)?,
                    ci_fn: m.ci_fn.as_ref().map(|f| f.to_device(device)).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            target: self.target.to_device(device)?,
            modules,
            global_ci: self
                .global_ci
                .as_ref()
                .map(|g| g.to_device(device))
                .transpose()?,
            config: self.config,
            checkpoint: self.checkpoint,
            files: self.files,
        })
    }

    pub fn device(&self) -> &Device {
        self.target.device()
    }

    /// C of every module, in model order.
    pub fn cs(&self) -> Vec<usize> {
        self.modules.iter().map(|m| m.components.c()).collect()
    }

    /// `(module path, C)` of every module, in model order.
    pub fn module_layout(&self) -> Vec<(String, usize)> {
        self.modules
            .iter()
            .map(|m| (m.name.clone(), m.components.c()))
            .collect()
    }

    /// The total number of components over all modules.
    pub fn total_c(&self) -> usize {
        self.modules.iter().map(|m| m.components.c()).sum()
    }

    /// The largest C of any module.
    pub fn max_c(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.components.c())
            .max()
            .unwrap_or(0)
    }

    /// Where each module's components start in a flat table of all components (model order), and
    /// the total at the end: `offsets[i]..offsets[i + 1]` are module `i`'s.
    pub fn component_offsets(&self) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(self.modules.len() + 1);
        let mut at = 0;
        offsets.push(0);
        for m in &self.modules {
            at += m.components.c();
            offsets.push(at);
        }
        offsets
    }

    /// Whether a position's CI depends on other positions (a global network with attention), so
    /// padding a batch would change it.
    pub fn ci_reads_other_positions(&self) -> bool {
        self.global_ci
            .as_ref()
            .is_some_and(GlobalCiFn::reads_other_positions)
    }

    /// `shared_mlp`, `global_shared_transformer`, …: the CI network kind, for logs and the page.
    pub fn ci_kind(&self) -> &'static str {
        self.config.ci.name()
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

    /// Every module's CI before the sigmoid (`[B, T, C]`, model order) from every module's input in
    /// the plain target forward (`[B, T, d_in]`, model order).
    pub fn ci_pre_sigmoid(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        if let Some(global) = &self.global_ci {
            return global.pre_sigmoid(inputs);
        }
        self.modules
            .iter()
            .zip(inputs)
            .map(|(m, x)| layerwise_pre_sigmoid(m, x))
            .collect()
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
        let inputs: Vec<Tensor> = rec
            .inputs
            .into_iter()
            .map(|x| x.expect("every decomposed module runs in the forward pass"))
            .collect();
        let pre = self.ci_pre_sigmoid(&inputs)?;
        let kind = self.config.sigmoid_type;
        Ok(CiOutput {
            lower: pre
                .iter()
                .map(|z| ci::lower_ci(kind, z))
                .collect::<Result<_>>()?,
            upper: pre
                .iter()
                .map(|z| ci::upper_ci(kind, z))
                .collect::<Result<_>>()?,
            pre_sigmoid: pre,
            target_logits,
        })
    }

    /// The component forward of one prompt with masks `masks[i]` (`[1, T, C]`, usually the lower CI):
    /// every decomposed module computes `a = x V`, and the rest of the model reads a fresh leaf `a'`.
    /// No weight deltas (the seed's semantics).
    pub fn leaf_forward(&self, tokens: &[u32], masks: &[Tensor]) -> Result<LeafForward> {
        self.leaf_forward_with(tokens, masks, false)
    }

    /// [`Self::leaf_forward`], with `with_delta` adding every module's weight delta `x Δᵀ` from its
    /// *connected* input: the component acts are still cut, but gradient flows on through the
    /// deltas (SPD's app's gradient forward, with all-ones masks).
    pub fn leaf_forward_with(
        &self,
        tokens: &[u32],
        masks: &[Tensor],
        with_delta: bool,
    ) -> Result<LeafForward> {
        struct Leaves<'a> {
            model: &'a SpdModel,
            with_delta: bool,
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
                let mut out = comps.masked_output(leaf.as_tensor(), &self.masks[i])?;
                if self.with_delta
                    && let Some(d) = comps.delta_output(x)?
                {
                    out = (out + d)?;
                }
                self.leaves[i] = Some(leaf);
                self.acts[i] = Some(acts);
                Ok(out)
            }
        }
        let n = self.modules.len();
        let mut hook = Leaves {
            model: self,
            with_delta,
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

    /// Logits `[B, T, vocab]` of the component model with masks `masks[i]` (`[B, T, C]`, or
    /// broadcastable), no leaves; with `with_delta` every module adds its weight delta `x Δᵀ`
    /// (so all-ones masks plus deltas reproduce the target model).
    pub fn masked_logits(
        &self,
        tokens: &Tensor,
        masks: &[Tensor],
        with_delta: bool,
    ) -> Result<Tensor> {
        self.component_logits(tokens, masks, with_delta.then_some(Deltas::On))
    }

    /// [`Self::masked_logits`] with each module's delta scaled per position by
    /// `delta_masks[i]` (`[B, T, 1]`), as spd's stochastic masks sample it.
    pub fn masked_logits_scaled_deltas(
        &self,
        tokens: &Tensor,
        masks: &[Tensor],
        delta_masks: &[Tensor],
    ) -> Result<Tensor> {
        self.component_logits(tokens, masks, Some(Deltas::Scaled(delta_masks)))
    }

    fn component_logits(
        &self,
        tokens: &Tensor,
        masks: &[Tensor],
        deltas: Option<Deltas<'_>>,
    ) -> Result<Tensor> {
        struct Masked<'a> {
            model: &'a SpdModel,
            masks: &'a [Tensor],
            deltas: Option<Deltas<'a>>,
        }
        impl LinearHook for Masked<'_> {
            fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
                let Some(i) = self.model.module_index(id) else {
                    return PlainForward.linear(id, x, linear);
                };
                let comps = &self.model.modules[i].components;
                let out = comps.masked_output(&comps.inner_acts(x)?, &self.masks[i])?;
                let Some(deltas) = self.deltas else {
                    return Ok(out);
                };
                match (deltas, comps.delta_output(x)?) {
                    (Deltas::On, Some(d)) => out + d,
                    (Deltas::Scaled(m), Some(d)) => out + d.broadcast_mul(&m[i])?,
                    (_, None) => Ok(out),
                }
            }
        }
        self.target.forward(
            tokens,
            &mut Masked {
                model: self,
                masks,
                deltas,
            },
        )
    }

    /// Each module's components restricted to `cols[i]` (`None` where that is empty), for
    /// [`Self::subset_logits`].
    pub fn column_subsets(&self, cols: &[Vec<usize>]) -> Result<Vec<Option<ColumnSubset>>> {
        self.modules
            .iter()
            .zip(cols)
            .map(|(m, cols)| {
                if cols.is_empty() {
                    return Ok(None);
                }
                let idx: Vec<u32> = cols.iter().map(|c| *c as u32).collect();
                let idx = Tensor::from_vec(idx, cols.len(), self.device())?;
                Ok(Some(ColumnSubset {
                    cols: cols.clone(),
                    index: idx.clone(),
                    v: m.components.v.index_select(&idx, 1)?,
                    u: m.components.u.index_select(&idx, 0)?,
                }))
            })
            .collect()
    }

    /// Logits `[B, T, vocab]` of the component model whose masks are zero outside each module's
    /// subset, `masks[i]` (`[B, T, k_i]`) on it; no deltas. Only the subset's columns are
    /// computed, which for a sparse mask (a kept circuit, the alive pairs of an optimisation) is a
    /// fraction of the two `[T, d] × [d, C]` products per module.
    pub fn subset_logits(
        &self,
        tokens: &Tensor,
        subsets: &[Option<ColumnSubset>],
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        struct Subset<'a> {
            model: &'a SpdModel,
            subsets: &'a [Option<ColumnSubset>],
            masks: &'a [Option<Tensor>],
        }
        impl LinearHook for Subset<'_> {
            fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
                let Some(i) = self.model.module_index(id) else {
                    return PlainForward.linear(id, x, linear);
                };
                let comps = &self.model.modules[i].components;
                let out = match (&self.subsets[i], &self.masks[i]) {
                    (Some(sub), Some(mask)) => {
                        (x.broadcast_matmul(&sub.v)? * mask)?.broadcast_matmul(&sub.u)?
                    }
                    _ => {
                        let (b, t, _) = x.dims3()?;
                        Tensor::zeros((b, t, comps.u.dim(1)?), x.dtype(), x.device())?
                    }
                };
                match &comps.bias {
                    Some(bias) => out.broadcast_add(bias),
                    None => Ok(out),
                }
            }
        }
        self.target.forward(
            tokens,
            &mut Subset {
                model: self,
                subsets,
                masks,
            },
        )
    }

    /// Masks of all ones for every module, `[1, T, C]`.
    pub fn ones_masks(&self, t: usize) -> Result<Vec<Tensor>> {
        self.modules
            .iter()
            .map(|m| Tensor::ones((1, t, m.components.c()), DType::F32, self.device()))
            .collect()
    }
}

/// A module's components restricted to some of them (see [`SpdModel::subset_logits`]).
#[derive(Debug, Clone)]
pub struct ColumnSubset {
    pub cols: Vec<usize>,
    /// `cols` as a `u32` tensor on the model's device, to gather masks with.
    pub index: Tensor,
    /// `V[:, cols]`, `[d_in, k]`
    v: Tensor,
    /// `U[cols, :]`, `[k, d_out]`
    u: Tensor,
}

/// How a component forward adds the weight deltas.
#[derive(Clone, Copy)]
enum Deltas<'a> {
    On,
    /// Scaled per position by a mask per module, `[B, T, 1]`.
    Scaled(&'a [Tensor]),
}

/// A layerwise module's CI before the sigmoid, `[B, T, C]`, from its input `[B, T, d_in]`.
pub fn layerwise_pre_sigmoid(m: &DecomposedModule, x: &Tensor) -> Result<Tensor> {
    let ci_fn = m
        .ci_fn
        .as_ref()
        .expect("a layerwise run has a CI network per module");
    let (b, t, d_in) = x.dims3()?;
    let flat = x.reshape((b * t, d_in))?;
    let acts = m.components.inner_acts(&flat)?;
    ci_fn
        .pre_sigmoid(&flat, &acts)?
        .reshape((b, t, m.components.c()))
}
