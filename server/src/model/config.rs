//! The configs of an SPD run as the original tool writes them: the run's `final_config.yaml` and the
//! target model's `model_config.yaml`. Only the fields inference needs are read; unknown ones are
//! ignored so newer runs still load. Three spellings of the decomposition are accepted and read into
//! one [`SpdConfig`]: the oldest (`C` + `target_module_patterns`, flat `ci_fn_type`), spd `main`
//! (`module_info: [{module_pattern, C}]`, flat `ci_fn_type`) and spd `dev` (`module_info` +
//! `ci_config: {mode, fn_type, …}`).

use std::path::Path;

use serde::Deserialize;

use super::error::LoadError;

/// A layerwise causal-importance network: one per decomposed module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CiFnType {
    /// C independent MLPs on the scalar inner act of their own component: `1 → h… → 1`.
    Mlp,
    /// C independent MLPs on the module input: `d_in → h… → 1`.
    VectorMlp,
    /// One MLP on the module input: `d_in → h… → C`.
    SharedMlp,
}

impl CiFnType {
    const NAMES: [(&'static str, CiFnType); 3] = [
        ("mlp", Self::Mlp),
        ("vector_mlp", Self::VectorMlp),
        ("shared_mlp", Self::SharedMlp),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, k)| *k == self).unwrap().0
    }
}

/// A global causal-importance network: one for all modules, reading every module's input at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalCiFnType {
    /// One MLP over the concatenated inputs → ΣC.
    SharedMlp,
    /// A bidirectional transformer over the sequence of projected, concatenated inputs.
    SharedTransformer,
    /// Block groups walked from the unembedding down, through a residual stream of its own.
    ReverseResidual,
}

impl GlobalCiFnType {
    const NAMES: [(&'static str, GlobalCiFnType); 3] = [
        ("global_shared_mlp", Self::SharedMlp),
        ("global_shared_transformer", Self::SharedTransformer),
        ("global_reverse_residual", Self::ReverseResidual),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, k)| *k == self).unwrap().0
    }
}

/// Self-attention of a global CI network (RoPE positions).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct AttnConfig {
    pub n_heads: usize,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
}

fn default_max_len() -> usize {
    2048
}

fn default_rope_base() -> f64 {
    10000.0
}

/// `simple_transformer_ci_cfg` of `global_shared_transformer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransformerCiConfig {
    pub d_model: usize,
    pub n_blocks: usize,
    pub mlp_hidden_dim: Vec<usize>,
    pub attn_config: AttnConfig,
}

/// A block group of `global_reverse_residual`: modules read and written together.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockGroup {
    pub name: String,
    pub patterns: Vec<String>,
}

/// Which CI network the run has, with what its shape needs.
#[derive(Debug, Clone, PartialEq)]
pub enum CiConfig {
    Layerwise {
        fn_type: CiFnType,
        hidden_dims: Vec<usize>,
    },
    Global(GlobalCiConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GlobalCiConfig {
    pub fn_type: GlobalCiFnType,
    pub hidden_dims: Vec<usize>,
    pub transformer: Option<TransformerCiConfig>,
    pub reader_hidden_dims: Vec<usize>,
    pub d_resid: Option<usize>,
    pub block_groups: Vec<BlockGroup>,
    pub transition_attn: Option<AttnConfig>,
    pub transition_hidden_dim: Option<usize>,
}

impl CiConfig {
    /// The spd name of the network, e.g. `shared_mlp` or `global_shared_transformer`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Layerwise { fn_type, .. } => fn_type.name(),
            Self::Global(g) => g.fn_type.name(),
        }
    }

    /// The layerwise network type, if the run has layerwise networks.
    pub fn layerwise(&self) -> Option<CiFnType> {
        match self {
            Self::Layerwise { fn_type, .. } => Some(*fn_type),
            Self::Global(_) => None,
        }
    }

    /// The widest hidden layer of the network (1 if it has none), for memory estimates.
    pub fn widest_hidden(&self) -> usize {
        let dims: Vec<usize> = match self {
            Self::Layerwise { hidden_dims, .. } => hidden_dims.clone(),
            Self::Global(g) => {
                let mut d = g.hidden_dims.clone();
                d.extend(&g.reader_hidden_dims);
                d.extend(g.d_resid);
                d.extend(g.transition_hidden_dim);
                if let Some(t) = &g.transformer {
                    d.push(t.d_model);
                    d.extend(&t.mlp_hidden_dim);
                }
                d
            }
        };
        dims.into_iter().max().unwrap_or(1).max(1)
    }
}

/// The squashing function applied to the CI network's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmoidType {
    Normal,
    Hard,
    LeakyHard,
    UpperLeakyHard,
    LowerLeakyHard,
    SwishHard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    #[default]
    Continuous,
    /// Adds training noise; at inference it is treated as continuous.
    Binomial,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct TaskConfig {
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    #[serde(default)]
    pub dataset_name: Option<String>,
    #[serde(default)]
    pub column_name: Option<String>,
}

/// A module pattern (fnmatch) and the number of components of the modules it matches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModuleInfo {
    pub module_pattern: String,
    #[serde(rename = "C")]
    pub c: usize,
}

/// The subset of the SPD run's `final_config.yaml` that inference needs, in one spelling.
#[derive(Debug, Clone)]
pub struct SpdConfig {
    /// Decomposed modules: the first pattern a module matches gives its C.
    pub module_info: Vec<ModuleInfo>,
    /// Identity insertions (`<module>.pre_identity`), decomposed like any module.
    pub identity_module_info: Vec<ModuleInfo>,
    pub ci: CiConfig,
    pub sigmoid_type: SigmoidType,
    pub sampling: Sampling,
    /// Whether each decomposed module carries the always-on weight delta `W − (V U)ᵀ`.
    pub use_delta_component: bool,
    pub pretrained_model_class: String,
    pub pretrained_model_name: Option<String>,
    pub pretrained_model_path: Option<String>,
    pub tokenizer_name: Option<String>,
    pub task_config: TaskConfig,
}

/// `final_config.yaml` as written, in any of the three spellings.
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(rename = "C", default)]
    c: Option<usize>,
    #[serde(default)]
    target_module_patterns: Option<Vec<String>>,
    #[serde(default)]
    identity_module_patterns: Option<Vec<String>>,
    #[serde(default)]
    module_info: Option<Vec<ModuleInfo>>,
    #[serde(default)]
    identity_module_info: Option<Vec<ModuleInfo>>,
    #[serde(default, alias = "gate_type")]
    ci_fn_type: Option<String>,
    #[serde(default, alias = "gate_hidden_dims")]
    ci_fn_hidden_dims: Option<Vec<usize>>,
    #[serde(default)]
    ci_config: Option<RawCiConfig>,
    sigmoid_type: SigmoidType,
    #[serde(default)]
    sampling: Sampling,
    #[serde(default)]
    use_delta_component: Option<bool>,
    pretrained_model_class: String,
    #[serde(default)]
    pretrained_model_name: Option<String>,
    #[serde(default)]
    pretrained_model_path: Option<String>,
    #[serde(default)]
    tokenizer_name: Option<String>,
    #[serde(default)]
    task_config: TaskConfig,
}

#[derive(Debug, Deserialize)]
struct RawCiConfig {
    #[serde(default)]
    mode: Option<String>,
    fn_type: String,
    #[serde(default)]
    hidden_dims: Option<Vec<usize>>,
    #[serde(default)]
    reader_hidden_dims: Option<Vec<usize>>,
    #[serde(default)]
    d_resid_ci_fn: Option<usize>,
    #[serde(default)]
    block_groups: Option<Vec<BlockGroup>>,
    #[serde(default)]
    transition_attn_config: Option<AttnConfig>,
    #[serde(default)]
    transition_hidden_dim: Option<usize>,
    #[serde(default)]
    simple_transformer_ci_cfg: Option<TransformerCiConfig>,
}

fn layerwise_type(name: &str) -> Result<CiFnType, String> {
    CiFnType::NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
        .ok_or_else(|| {
            let global = GlobalCiFnType::NAMES.iter().any(|(n, _)| *n == name);
            if global {
                format!(
                    "ci fn type `{name}` is global: it belongs in `ci_config` with mode: global"
                )
            } else {
                format!(
                    "unknown ci fn type `{name}` (layerwise: mlp, vector_mlp, shared_mlp; global: \
                     global_shared_mlp, global_shared_transformer, global_reverse_residual)"
                )
            }
        })
}

impl RawCiConfig {
    fn resolve(self) -> Result<CiConfig, String> {
        let global = GlobalCiFnType::NAMES
            .iter()
            .find(|(n, _)| *n == self.fn_type)
            .map(|(_, k)| *k);
        let mode = self.mode.as_deref().unwrap_or(if global.is_some() {
            "global"
        } else {
            "layerwise"
        });
        match mode {
            "layerwise" => Ok(CiConfig::Layerwise {
                fn_type: layerwise_type(&self.fn_type)?,
                hidden_dims: self
                    .hidden_dims
                    .ok_or("ci_config: layerwise CI needs hidden_dims")?,
            }),
            "global" => {
                let fn_type = global.ok_or_else(|| {
                    format!(
                        "unknown global ci fn type `{}` (global_shared_mlp, \
                         global_shared_transformer, global_reverse_residual)",
                        self.fn_type
                    )
                })?;
                let need = |what: &str| format!("ci_config: {} needs {what}", fn_type.name());
                match fn_type {
                    GlobalCiFnType::SharedMlp if self.hidden_dims.is_none() => {
                        return Err(need("hidden_dims"));
                    }
                    GlobalCiFnType::SharedTransformer
                        if self.simple_transformer_ci_cfg.is_none() =>
                    {
                        return Err(need("simple_transformer_ci_cfg"));
                    }
                    GlobalCiFnType::ReverseResidual => {
                        if self.d_resid_ci_fn.is_none() {
                            return Err(need("d_resid_ci_fn"));
                        }
                        if self.block_groups.as_ref().is_none_or(|g| g.is_empty()) {
                            return Err(need("block_groups"));
                        }
                        if self.reader_hidden_dims.is_none() {
                            return Err(need("reader_hidden_dims"));
                        }
                    }
                    _ => {}
                }
                Ok(CiConfig::Global(GlobalCiConfig {
                    fn_type,
                    hidden_dims: self.hidden_dims.unwrap_or_default(),
                    transformer: self.simple_transformer_ci_cfg,
                    reader_hidden_dims: self.reader_hidden_dims.unwrap_or_default(),
                    d_resid: self.d_resid_ci_fn,
                    block_groups: self.block_groups.unwrap_or_default(),
                    transition_attn: self.transition_attn_config,
                    transition_hidden_dim: self.transition_hidden_dim,
                }))
            }
            other => Err(format!(
                "ci_config: unknown mode `{other}` (layerwise or global)"
            )),
        }
    }
}

impl RawConfig {
    fn resolve(self) -> Result<SpdConfig, String> {
        let module_info = match (self.module_info, self.target_module_patterns) {
            (Some(info), _) => info,
            (None, Some(patterns)) => {
                let c = self
                    .c
                    .ok_or("target_module_patterns is set but C is missing")?;
                patterns
                    .into_iter()
                    .map(|module_pattern| ModuleInfo { module_pattern, c })
                    .collect()
            }
            (None, None) => {
                return Err("neither module_info nor target_module_patterns is set".into());
            }
        };
        if let Some(bad) = module_info.iter().find(|m| m.c == 0) {
            return Err(format!("module pattern `{}` has C = 0", bad.module_pattern));
        }
        let identity_module_info = match (self.identity_module_info, self.identity_module_patterns)
        {
            (Some(info), _) => info,
            (None, Some(patterns)) => {
                let c = self
                    .c
                    .ok_or("identity_module_patterns is set but C is missing")?;
                patterns
                    .into_iter()
                    .map(|module_pattern| ModuleInfo { module_pattern, c })
                    .collect()
            }
            (None, None) => vec![],
        };
        let ci = match (self.ci_config, self.ci_fn_type) {
            (Some(ci), _) => ci.resolve()?,
            (None, Some(name)) => CiConfig::Layerwise {
                fn_type: layerwise_type(&name)?,
                hidden_dims: self
                    .ci_fn_hidden_dims
                    .ok_or("ci_fn_type is set but ci_fn_hidden_dims is missing")?,
            },
            (None, None) => return Err("neither ci_config nor ci_fn_type is set".into()),
        };
        Ok(SpdConfig {
            module_info,
            identity_module_info,
            ci,
            sigmoid_type: self.sigmoid_type,
            sampling: self.sampling,
            use_delta_component: self.use_delta_component.unwrap_or(false),
            pretrained_model_class: self.pretrained_model_class,
            pretrained_model_name: self.pretrained_model_name,
            pretrained_model_path: self.pretrained_model_path,
            tokenizer_name: self.tokenizer_name,
            task_config: self.task_config,
        })
    }
}

impl SpdConfig {
    /// Parses `final_config.yaml` text in any of the three spellings.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        raw.resolve()
    }

    /// Reads and parses a run's `final_config.yaml`, naming the file in every error.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|msg| LoadError::Config {
            path: path.to_owned(),
            msg,
        })
    }

    /// The path of the target model's checkpoint as written in the config, if any.
    pub fn pretrained_location(&self) -> Option<&str> {
        self.pretrained_model_path
            .as_deref()
            .or(self.pretrained_model_name.as_deref())
            .filter(|s| !s.is_empty())
    }

    /// The indexes of the `module_info` patterns a module path matches, in config order.
    pub fn matching(&self, module: &str) -> Vec<usize> {
        (0..self.module_info.len())
            .filter(|&i| glob_match(&self.module_info[i].module_pattern, module))
            .collect()
    }

    /// The indexes of the `identity_module_info` patterns that insert an identity in front of the
    /// projection `module` (spd matches them against the projection's path), in config order.
    pub fn identity_matching(&self, module: &str) -> Vec<usize> {
        (0..self.identity_module_info.len())
            .filter(|&i| glob_match(&self.identity_module_info[i].module_pattern, module))
            .collect()
    }

    /// C of a module path, from the first pattern it matches (`None`: not decomposed).
    pub fn c_of(&self, module: &str) -> Option<usize> {
        self.matching(module)
            .first()
            .map(|&i| self.module_info[i].c)
    }
}

/// Reads and parses a YAML file, naming the file in every error.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_yaml_ng::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_owned(),
        msg: e.to_string(),
    })
}

/// Matches a module name against a glob pattern of the original config (`*` matches any run of
/// characters, including dots, as Python's `fnmatch` does).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((b'?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_fnmatch() {
        assert!(glob_match("h.*.attn.q_proj", "h.0.attn.q_proj"));
        assert!(glob_match("h.*.attn.q_proj", "h.12.attn.q_proj"));
        assert!(!glob_match("h.*.attn.q_proj", "h.0.attn.k_proj"));
        assert!(glob_match("*", "h.0.mlp.c_fc"));
        assert!(glob_match("h.?.mlp.*", "h.1.mlp.down_proj"));
        assert!(!glob_match("h.?.mlp.*", "h.10.mlp.down_proj"));
    }

    const TAIL: &str = "sigmoid_type: leaky_hard\n\
        pretrained_model_class: simple_stories_train.models.gpt2_simple.GPT2Simple\n\
        pretrained_model_name: target/checkpoints/model_step_0.pt\nextra_field: 3\n";

    #[test]
    fn parses_the_oldest_spelling() {
        let cfg = SpdConfig::parse(&format!(
            "C: 16\nci_fn_type: vector_mlp\nci_fn_hidden_dims: [8]\n\
             target_module_patterns: ['h.*.mlp.c_fc']\n{TAIL}"
        ))
        .unwrap();
        assert_eq!(cfg.c_of("h.3.mlp.c_fc"), Some(16));
        assert_eq!(cfg.c_of("h.3.mlp.down_proj"), None);
        assert_eq!(
            cfg.ci,
            CiConfig::Layerwise {
                fn_type: CiFnType::VectorMlp,
                hidden_dims: vec![8]
            }
        );
        assert_eq!(cfg.sampling, Sampling::Continuous);
        assert!(!cfg.use_delta_component);
        assert_eq!(
            cfg.pretrained_location(),
            Some("target/checkpoints/model_step_0.pt")
        );
    }

    #[test]
    fn parses_main_and_dev_spellings_with_per_module_c() {
        let info = "module_info:\n- module_pattern: h.0.attn.q_proj\n  C: 8\n\
                    - module_pattern: h.*.attn.q_proj\n  C: 9\nuse_delta_component: true\n";
        let main = SpdConfig::parse(&format!(
            "{info}ci_fn_type: shared_mlp\nci_fn_hidden_dims: [4]\n{TAIL}"
        ))
        .unwrap();
        assert_eq!(main.c_of("h.0.attn.q_proj"), Some(8), "first pattern wins");
        assert_eq!(main.c_of("h.1.attn.q_proj"), Some(9));
        assert!(main.use_delta_component);
        let dev = SpdConfig::parse(&format!(
            "{info}ci_config:\n  mode: global\n  fn_type: global_shared_transformer\n  \
             hidden_dims: null\n  simple_transformer_ci_cfg:\n    d_model: 16\n    n_blocks: 1\n    \
             mlp_hidden_dim: [24]\n    attn_config:\n      n_heads: 2\n      max_len: 64\n      \
             rope_base: 10000.0\n{TAIL}"
        ))
        .unwrap();
        let CiConfig::Global(g) = &dev.ci else {
            panic!("global")
        };
        assert_eq!(g.fn_type, GlobalCiFnType::SharedTransformer);
        assert_eq!(g.transformer.as_ref().unwrap().attn_config.n_heads, 2);
        assert_eq!(dev.ci.name(), "global_shared_transformer");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = SpdConfig::parse(&format!(
            "C: 4\nci_fn_type: transformer_mlp\nci_fn_hidden_dims: [8]\n\
             target_module_patterns: ['*']\n{TAIL}"
        ))
        .unwrap_err();
        assert!(
            err.contains("unknown ci fn type `transformer_mlp`"),
            "{err}"
        );
        let err = SpdConfig::parse(&format!(
            "module_info: []\nci_config:\n  mode: global\n  fn_type: global_reverse_residual\n{TAIL}"
        ))
        .unwrap_err();
        assert!(err.contains("needs d_resid_ci_fn"), "{err}");
        let err = SpdConfig::parse(&format!("ci_fn_type: mlp\nci_fn_hidden_dims: [2]\n{TAIL}"))
            .unwrap_err();
        assert!(err.contains("neither module_info"), "{err}");
    }
}
