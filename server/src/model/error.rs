//! Errors of loading a run and of running the model. Every message names what was expected, what was
//! found, and where (file and tensor key), so a researcher can fix the run without reading our code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: cannot read tensors: {msg}", path.display())]
    Tensors { path: PathBuf, msg: String },
    #[error("{}: missing tensor `{key}` (expected shape {expected:?})", path.display())]
    MissingTensor {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{}: unsupported pretrained_model_class `{class}` (supported: {})",
        path.display(),
        crate::model::transformer::Family::SUPPORTED
    )]
    UnknownModelClass { path: PathBuf, class: String },
    #[error(
        "{}: tensor `{key}` has shape {shape:?} ({} components), but the config gives {module} \
         C = {config} (expected [{}, {config}])",
        path.display(),
        shape[1],
        shape[0]
    )]
    ComponentCount {
        path: PathBuf,
        key: String,
        module: String,
        config: usize,
        shape: Vec<usize>,
    },
    #[error("{}: {msg}", path.display())]
    Layout { path: PathBuf, msg: String },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// Errors of running a loaded model on a prompt.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt has {len} tokens, longer than the model's context of {block_size}")]
    TooLong { len: usize, block_size: usize },
    #[error("token id {token} at position {position} is out of the vocabulary (size {vocab_size})")]
    TokenOutOfVocab {
        token: u32,
        position: usize,
        vocab_size: usize,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Unsupported(String),
}
