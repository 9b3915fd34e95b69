//! The `meta` table: one gzip-compressed JSON value per key, as the original tool stores them.
//!
//! Keys written by `generate`: `wandb_path` (`{"path": …}`, here a local run path), `n_blocks`
//! (`{"n_blocks": N}`) and `activation_contexts` (`{module: [per-component object, …]}`, see
//! [`super::contexts`]).

use std::io::{Read, Write};

use rusqlite::{Connection, OptionalExtension};
use serde_json::Value;

use super::{Result, StoreError};

pub const WANDB_PATH: &str = "wandb_path";
pub const N_BLOCKS: &str = "n_blocks";
pub const ACTIVATION_CONTEXTS: &str = "activation_contexts";

/// Stores `value` under `key` (replacing any previous value).
pub fn set(conn: &Connection, key: &str, value: &Value) -> Result<()> {
    let bad = |msg: String| StoreError::Meta {
        key: key.to_owned(),
        msg,
    };
    let json = serde_json::to_vec(value).map_err(|e| bad(e.to_string()))?;
    // Fast compression: activation contexts run to tens of megabytes of JSON.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).map_err(|e| bad(e.to_string()))?;
    let blob = gz.finish().map_err(|e| bad(e.to_string()))?;
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        rusqlite::params![key, blob],
    )?;
    Ok(())
}

/// The value under `key`, or `None` when the key (or the `meta` table) is absent.
pub fn get(conn: &Connection, key: &str) -> Result<Option<Value>> {
    if !super::schema::has_table(conn, "meta")? {
        return Ok(None);
    }
    let blob: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?;
    let Some(blob) = blob else {
        return Ok(None);
    };
    let bad = |msg: String| StoreError::Meta {
        key: key.to_owned(),
        msg,
    };
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("not gzip-compressed JSON: {e}")))?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| bad(format!("not valid JSON: {e}")))
}

/// The model location recorded under `wandb_path` (`{"path": …}`).
pub fn model_path(conn: &Connection) -> Result<Option<String>> {
    Ok(get(conn, WANDB_PATH)?.and_then(|v| v.get("path")?.as_str().map(str::to_owned)))
}

/// The number of blocks recorded under `n_blocks` (`{"n_blocks": N}`).
pub fn n_blocks(conn: &Connection) -> Result<Option<u64>> {
    Ok(get(conn, N_BLOCKS)?.and_then(|v| v.get("n_blocks")?.as_u64()))
}
