//! The configs of an SPD run as the original tool writes them: the run's `final_config.yaml` and the
//! target model's `model_config.yaml`. Only the fields this tool needs are read; unknown ones are ignored
//! so newer runs still load.

use std::path::Path;

use serde::Deserialize;

use super::error::LoadError;

/// Which causal-importance network each decomposed module has.
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

/// The subset of the SPD run's `final_config.yaml` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct SpdConfig {
    #[serde(rename = "C")]
    pub c: usize,
    #[serde(alias = "gate_type")]
    pub ci_fn_type: CiFnType,
    #[serde(alias = "gate_hidden_dims")]
    pub ci_fn_hidden_dims: Vec<usize>,
    pub sigmoid_type: SigmoidType,
    #[serde(default)]
    pub sampling: Sampling,
    pub target_module_patterns: Vec<String>,
    pub pretrained_model_class: String,
    #[serde(default)]
    pub pretrained_model_name: Option<String>,
    #[serde(default)]
    pub pretrained_model_path: Option<String>,
    #[serde(default)]
    pub tokenizer_name: Option<String>,
    #[serde(default)]
    pub task_config: TaskConfig,
}

/// GPT2Simple's model config (`model_config.yaml` next to the target checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Gpt2Config {
    pub block_size: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

impl Gpt2Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
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

impl SpdConfig {
    /// The path of the target model's checkpoint as written in the config, if any.
    pub fn pretrained_location(&self) -> Option<&str> {
        self.pretrained_model_path
            .as_deref()
            .or(self.pretrained_model_name.as_deref())
            .filter(|s| !s.is_empty())
    }
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

    #[test]
    fn parses_fixture_config() {
        let cfg: SpdConfig = serde_yaml_ng::from_str(
            "C: 16\nci_fn_type: vector_mlp\nci_fn_hidden_dims: [8]\nsigmoid_type: leaky_hard\n\
             target_module_patterns: ['h.*.mlp.c_fc']\n\
             pretrained_model_class: simple_stories_train.models.gpt2_simple.GPT2Simple\n\
             pretrained_model_name: target/checkpoints/model_step_0.pt\nextra_field: 3\n",
        )
        .unwrap();
        assert_eq!(cfg.c, 16);
        assert_eq!(cfg.ci_fn_type, CiFnType::VectorMlp);
        assert_eq!(cfg.sampling, Sampling::Continuous);
        assert_eq!(
            cfg.pretrained_location(),
            Some("target/checkpoints/model_step_0.pt")
        );
    }
}
