//! Reading tensors from the files the original tool writes (PyTorch zip `.pth`/`.pt` state dicts and
//! `.safetensors`), finding them inside a run directory, and renaming the old key spellings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::LoadError;

/// A named set of tensors read from one file. Lookups check shapes and report the file and key.
pub struct TensorFile {
    pub path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl TensorFile {
    /// Reads every tensor of a `.safetensors` or PyTorch zip file (as float32, on the CPU).
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let owned = path.to_owned();
        // The third-party readers may panic on corrupt input; a bad file must be an error, not a crash.
        let read =
            std::panic::catch_unwind(move || -> candle_core::Result<Vec<(String, Tensor)>> {
                if is_safetensors {
                    Ok(candle_core::safetensors::load(&owned, &Device::Cpu)?
                        .into_iter()
                        .collect())
                } else {
                    candle_core::pickle::read_all(&owned)
                }
            });
        let tensors = match read {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(LoadError::Tensors {
                    path: path.to_owned(),
                    msg: e.to_string(),
                });
            }
            Err(_) => {
                return Err(LoadError::Tensors {
                    path: path.to_owned(),
                    msg: "the file is corrupt (the reader failed)".into(),
                });
            }
        };
        if tensors.is_empty() {
            return Err(LoadError::Tensors {
                path: path.to_owned(),
                msg: "no tensors found (is this a state dict?)".into(),
            });
        }
        let mut map = HashMap::with_capacity(tensors.len());
        for (k, t) in tensors {
            let t = t.to_dtype(DType::F32).map_err(|e| LoadError::Tensors {
                path: path.to_owned(),
                msg: format!("tensor `{k}`: {e}"),
            })?;
            map.insert(k, t);
        }
        Ok(Self {
            path: path.to_owned(),
            tensors: map,
        })
    }

    pub fn from_map(path: PathBuf, tensors: HashMap<String, Tensor>) -> Self {
        Self { path, tensors }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn get_raw(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// The tensor under `key`, which must have exactly the `expected` shape.
    pub fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor, LoadError> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                key: key.to_owned(),
                expected: expected.to_vec(),
            })?;
        if t.dims() != expected {
            return Err(LoadError::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_owned(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Renames keys in place with `f` (a key mapped to `None` is kept as is).
    pub fn rename_keys(&mut self, f: impl Fn(&str) -> Option<String>) {
        let old = std::mem::take(&mut self.tensors);
        self.tensors = old
            .into_iter()
            .map(|(k, t)| (f(&k).unwrap_or(k), t))
            .collect();
    }

    /// Keeps the keys that start with `prefix`, without it.
    pub fn strip_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_owned(), t.clone())))
            .collect()
    }
}

/// Maps the key spellings of older SPD checkpoints to the current ones, as the original loader does:
/// `patched_model.` → `target_model.`, `_gates.` → `_ci_fns.`, `X.original.weight` → `X.weight`, and
/// `target_model.X.components.{U,V,bias}` → `_components.<X with dashes>.{U,V,bias}`.
pub fn normalize_spd_key(key: &str) -> Option<String> {
    let mut k = key.to_owned();
    if let Some(rest) = k.strip_prefix("patched_model.") {
        k = format!("target_model.{rest}");
    }
    if let Some(rest) = k.strip_prefix("_gates.") {
        k = format!("_ci_fns.{rest}");
    }
    if let Some(rest) = k.strip_prefix("target_model.") {
        for leaf in ["U", "V", "bias"] {
            if let Some(module) = rest.strip_suffix(&format!(".components.{leaf}")) {
                k = format!("_components.{}.{leaf}", module.replace('.', "-"));
                break;
            }
        }
    }
    for leaf in ["weight", "bias"] {
        if let Some(module) = k.strip_suffix(&format!(".original.{leaf}")) {
            k = format!("{module}.{leaf}");
        }
    }
    (k != key).then_some(k)
}

/// Maps key spellings of target-model checkpoints (`torch.compile`'s `_orig_mod.`, DDP's `module.`).
pub fn normalize_target_key(key: &str) -> Option<String> {
    let mut k = key;
    for prefix in ["_orig_mod.", "module."] {
        if let Some(rest) = k.strip_prefix(prefix) {
            k = rest;
        }
    }
    (k != key).then(|| k.to_owned())
}

/// The file `<prefix><n><suffix>` in `dir` with the largest step number `n`, if any.
fn newest_numbered(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Option<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step: u64 = name
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p))
}

/// Where a run's files are: the run directory and the SPD checkpoint inside it.
#[derive(Debug, Clone)]
pub struct RunLocation {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
}

/// Resolves `path` (a run directory, a `model_*.pth`, or a `.safetensors`) to the checkpoint and its
/// run directory. In a directory the newest `model_<step>.pth` wins, else `model.safetensors`.
pub fn locate_run(path: &Path) -> Result<RunLocation, LoadError> {
    if path.is_dir() {
        let newest_pth =
            newest_numbered(path, "model_", ".pth").map_err(|source| LoadError::Io {
                path: path.to_owned(),
                source,
            })?;
        let checkpoint = match newest_pth {
            Some(p) => p,
            None => {
                let st = path.join("model.safetensors");
                if !st.is_file() {
                    return Err(LoadError::Layout {
                        path: path.to_owned(),
                        msg: "no model_<step>.pth or model.safetensors in this run directory"
                            .into(),
                    });
                }
                st
            }
        };
        Ok(RunLocation {
            run_dir: path.to_owned(),
            checkpoint,
        })
    } else if path.is_file() {
        let run_dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let run_dir = if run_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            run_dir
        };
        Ok(RunLocation {
            run_dir,
            checkpoint: path.to_owned(),
        })
    } else {
        Err(LoadError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        })
    }
}

/// Finds the target model's checkpoint and its `model_config.yaml` from the location in the SPD config
/// (relative to the run directory, or absolute). A directory is searched for `model.safetensors` or the
/// newest `checkpoints/model_step_<n>.pt`; the yaml is looked for next to the checkpoint and one level up.
pub fn locate_target(run_dir: &Path, location: &str) -> Result<(PathBuf, PathBuf), LoadError> {
    let p = Path::new(location);
    let p = if p.is_absolute() {
        p.to_owned()
    } else {
        run_dir.join(p)
    };
    let checkpoint = if p.is_dir() {
        let st = p.join("model.safetensors");
        if st.is_file() {
            st
        } else {
            let ckpt_dir = p.join("checkpoints");
            let newest = newest_numbered(&ckpt_dir, "model_step_", ".pt").unwrap_or_default();
            newest.ok_or_else(|| LoadError::Layout {
                path: p.clone(),
                msg: "no model.safetensors or checkpoints/model_step_<n>.pt in the target model directory"
                    .into(),
            })?
        }
    } else {
        p.clone()
    };
    let dir = checkpoint.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("model_config.yaml"),
        dir.parent()
            .map(|d| d.join("model_config.yaml"))
            .unwrap_or_default(),
    ];
    let config = candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .ok_or_else(|| LoadError::Layout {
            path: checkpoint.clone(),
            msg: format!(
                "no model_config.yaml next to the target checkpoint (looked in {} and its parent)",
                dir.display()
            ),
        })?;
    Ok((checkpoint, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_old_key_spellings() {
        assert_eq!(
            normalize_spd_key("patched_model.h.0.attn.q_proj.original.weight").as_deref(),
            Some("target_model.h.0.attn.q_proj.weight")
        );
        assert_eq!(
            normalize_spd_key("patched_model.h.0.mlp.c_fc.components.V").as_deref(),
            Some("_components.h-0-mlp-c_fc.V")
        );
        assert_eq!(
            normalize_spd_key("_gates.h-0-mlp-c_fc.layers.0.W").as_deref(),
            Some("_ci_fns.h-0-mlp-c_fc.layers.0.W")
        );
        assert_eq!(normalize_spd_key("_components.h-0-mlp-c_fc.V"), None);
        assert_eq!(
            normalize_target_key("_orig_mod.h.0.ln_1.weight").as_deref(),
            Some("h.0.ln_1.weight")
        );
    }
}
