//! `generate`: index a corpus into the SQLite database (SPEC §4) with a batched CI pass.
//!
//! - [`corpus`]: documents from text, JSONL or Parquet files, tokenized and cut into prompts.
//! - [`extract`]: the batched CI pass and the reduction of its outputs to index rows on the device.
//! - [`contexts`]: activation-context accumulators (mean CI, firing density, top-k examples).
//! - [`pipeline`]: reader thread → compute workers (one model copy per device) → one writer thread,
//!   through bounded channels; resumable, shardable.
//! - [`merge`]: combining the databases of shards.
//! - [`synthetic`], [`bench`]: a random model of a given shape, and the throughput benchmark.
pub mod bench;
pub mod contexts;
pub mod corpus;
pub mod entries;
pub mod extract;
pub mod merge;
pub mod pipeline;
pub mod synthetic;

pub use pipeline::{GenerateConfig, Input, Progress, Shard, Summary, run};

use crate::model::LoadError;
use crate::store::StoreError;
use corpus::CorpusError;

/// Errors of a `generate` run or merge.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Flags or databases that do not fit together; the message says what to change.
    #[error("{0}")]
    Usage(String),
}

impl From<rusqlite::Error> for GenerateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::Sqlite(e))
    }
}
