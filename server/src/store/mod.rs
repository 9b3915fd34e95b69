//! The SQLite database of a generated corpus index (SPEC §4): which prompts each component fires on,
//! where, and how strongly; plus the per-component activation contexts.
//!
//! The tables of the original tool (`meta`, `prompts`, `component_activations` and their indexes) are
//! kept exactly, so a database written by either tool opens in the other. What this tool adds lives in
//! tables of its own (see [`schema`]); a database without them still answers every query.
//!
//! - [`schema`]: creating and opening databases.
//! - [`meta`]: the gzip-JSON `meta` table.
//! - [`writer`]: appending prompts with their activations, one transaction per batch.
//! - [`contexts`]: the activation-context tables (mean CI, firing density, top-k examples).
//! - [`postings`]: packed posting lists that make searches for popular components fast.
//! - [`queries`]: the read-only questions the web server asks.
//! - [`notes`]: the sidecar notes file (intervention runs, labels) beside a database.
//! - [`graph_cache`]: computed graphs kept in the sidecar, bounded in bytes.
pub mod contexts;
pub mod graph_cache;
pub mod meta;
pub mod notes;
pub mod postings;
pub mod queries;
pub mod schema;
pub mod writer;

use std::path::PathBuf;

/// Errors of reading or writing a database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: cannot open the database: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("meta `{key}`: {msg}")]
    Meta { key: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;
