//! Appending to a database: prompts with their activation rows, and the `generation` record that says
//! what the index was made from and how far it got. Callers group a batch of prompts, its context
//! updates and the progress into one transaction, so a killed process leaves only whole batches.

use std::fmt::Write as _;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::Result;

/// One component alive somewhere in a prompt: a row of `component_activations`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationRow {
    /// Index into the key table passed to [`insert_prompts`] (`"layer:c"` strings).
    pub key: u32,
    /// Max CI over the alive positions (max probability for `output:v`, 1.0 for `wte:0`).
    pub max_ci: f32,
    pub positions: Vec<u32>,
}

/// A prompt and its alive components, in the order their rows are written.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptRows {
    pub token_ids: Vec<u32>,
    pub rows: Vec<ActivationRow>,
}

/// Rows per multi-row `INSERT`: one statement step per chunk instead of per row.
const ROWS_PER_INSERT: usize = 64;

/// Appends `prompts` (ids assigned by SQLite, in order) and their rows; returns the new ids. Call it
/// inside a transaction: a batch is written whole or not at all.
pub fn insert_prompts(
    conn: &Connection,
    keys: &[String],
    prompts: &[PromptRows],
) -> Result<Vec<i64>> {
    let insert_rows = |n: usize| {
        let values = vec!["(?, ?, ?, ?)"; n].join(", ");
        format!(
            "INSERT INTO component_activations (prompt_id, component_key, max_ci, positions) \
             VALUES {values}"
        )
    };
    let mut prompt_stmt = conn.prepare_cached("INSERT INTO prompts (token_ids) VALUES (?1)")?;
    let mut chunk_stmt = conn.prepare_cached(&insert_rows(ROWS_PER_INSERT))?;
    let mut row_stmt = conn.prepare_cached(&insert_rows(1))?;
    let mut ids = Vec::with_capacity(prompts.len());
    let mut buf = String::new();
    let mut positions: Vec<String> = Vec::with_capacity(ROWS_PER_INSERT);
    for p in prompts {
        json_list(&mut buf, &p.token_ids);
        prompt_stmt.execute([&buf])?;
        let id = conn.last_insert_rowid();
        let mut chunks = p.rows.chunks_exact(ROWS_PER_INSERT);
        for chunk in chunks.by_ref() {
            positions.clear();
            positions.extend(chunk.iter().map(|r| {
                json_list(&mut buf, &r.positions);
                buf.clone()
            }));
            for (i, (r, pos)) in chunk.iter().zip(&positions).enumerate() {
                chunk_stmt.raw_bind_parameter(4 * i + 1, id)?;
                chunk_stmt.raw_bind_parameter(4 * i + 2, &keys[r.key as usize])?;
                chunk_stmt.raw_bind_parameter(4 * i + 3, r.max_ci as f64)?;
                chunk_stmt.raw_bind_parameter(4 * i + 4, pos)?;
            }
            chunk_stmt.raw_execute()?;
        }
        for r in chunks.remainder() {
            json_list(&mut buf, &r.positions);
            row_stmt.execute(params![id, keys[r.key as usize], r.max_ci as f64, buf])?;
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Writes `[a, b, c]` into `buf` (replacing its contents), spaced as Python's `json.dumps`, so rows
/// are byte-identical to the original tool's.
pub fn json_list(buf: &mut String, items: &[u32]) {
    buf.clear();
    buf.push('[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            buf.push_str(", ");
        }
        let _ = write!(buf, "{x}");
    }
    buf.push(']');
}

/// The `generation` row: what the index was made from and how far it got.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRecord {
    /// What identifies the run (written by `generate`; opaque to the store).
    pub config: Value,
    /// Prompts written so far (they are the first `prompts_done` windows of the run, in order).
    pub prompts_done: u64,
    /// Tokens in those prompts (the denominator of mean CI and firing density).
    pub tokens_done: u64,
    /// Whether the run reached its end (`--n-prompts`, or the end of the corpus).
    pub complete: bool,
}

/// The `generation` row, or `None` for a database this tool did not generate.
pub fn generation(conn: &Connection) -> Result<Option<GenerationRecord>> {
    if !super::schema::has_table(conn, "generation")? {
        return Ok(None);
    }
    let row = conn
        .query_row(
            "SELECT config, prompts_done, tokens_done, complete FROM generation WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            },
        )
        .optional()?;
    row.map(|(config, prompts_done, tokens_done, complete)| {
        let config = serde_json::from_str(&config).map_err(|e| {
            super::StoreError::Invalid(format!("the generation record is not valid JSON: {e}"))
        })?;
        Ok(GenerationRecord {
            config,
            prompts_done: prompts_done as u64,
            tokens_done: tokens_done as u64,
            complete,
        })
    })
    .transpose()
}

/// Writes the whole `generation` row.
pub fn set_generation(conn: &Connection, g: &GenerationRecord) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO generation (id, config, prompts_done, tokens_done, complete) \
         VALUES (1, ?1, ?2, ?3, ?4)",
        params![
            g.config.to_string(),
            g.prompts_done as i64,
            g.tokens_done as i64,
            g.complete
        ],
    )?;
    Ok(())
}

/// Records progress (inside the batch's transaction).
pub fn set_progress(conn: &Connection, prompts_done: u64, tokens_done: u64) -> Result<()> {
    conn.execute(
        "UPDATE generation SET prompts_done = ?1, tokens_done = ?2 WHERE id = 1",
        params![prompts_done as i64, tokens_done as i64],
    )?;
    Ok(())
}
