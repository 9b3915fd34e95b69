//! The questions the web server asks of a database, on a read-only connection
//! ([`super::schema::open_read_only`]). Every function works on a database written by the original tool
//! as well as on one written by `generate`; the extra index and tables of the latter only make them
//! faster or richer (activation contexts).
//!
//! Component keys are `"layer:c"` strings: `"h.0.attn.q_proj:12"`, `"wte:0"`, `"output:431"`.
//! Prompt ids are the `prompts.id` values (from 1).

use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, StoreError};

pub use super::contexts::{ComponentContexts, ContextExample, component_contexts};
pub use super::meta::{get as meta, model_path, n_blocks};
pub use super::writer::{GenerationRecord, generation};

/// A stored prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: i64,
    pub token_ids: Vec<u32>,
}

/// One component's activity in one prompt (a `component_activations` row).
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub key: String,
    /// Max CI over `positions` (max probability for `output:v`, 1.0 for `wte:0`).
    pub max_ci: f32,
    /// Token positions where the component is alive, ascending.
    pub positions: Vec<u32>,
}

/// How the components of a search combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Prompts where every key is alive. Score: the smallest of their max CIs.
    All,
    /// Prompts where at least one key is alive. Score: the largest max CI among those alive.
    Any,
}

/// The order of search results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Highest score first; equal scores by prompt id.
    ScoreDesc,
    /// Ascending prompt id (corpus order).
    PromptId,
}

/// A search for prompts by the components alive in them.
#[derive(Debug, Clone)]
pub struct Search {
    /// Component keys; duplicates are ignored. Must not be empty.
    pub keys: Vec<String>,
    pub mode: Match,
    pub order: Order,
    /// The page: skip `offset` results, return at most `limit`.
    pub offset: usize,
    pub limit: usize,
}

/// One prompt found by a search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub prompt_id: i64,
    pub token_ids: Vec<u32>,
    /// See [`Match`].
    pub score: f32,
    /// The searched keys alive in this prompt, in the order of [`Search::keys`].
    pub matches: Vec<Activation>,
}

/// A page of search results.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// How many prompts match in all (not just this page).
    pub total: usize,
    pub hits: Vec<SearchHit>,
}

/// How often a component is alive across the database.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentStats {
    pub key: String,
    /// Prompts in which it is alive somewhere.
    pub n_prompts: u64,
    /// Mean over those prompts of its max CI (0 when `n_prompts` is 0).
    pub mean_max_ci: f64,
    /// The largest max CI (0 when `n_prompts` is 0).
    pub max_max_ci: f64,
}

/// Number of prompts.
pub fn prompt_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM prompts", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// The prompt with this id.
pub fn prompt(conn: &Connection, id: i64) -> Result<Option<Prompt>> {
    conn.prepare_cached("SELECT token_ids FROM prompts WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|json| {
            Ok(Prompt {
                id,
                token_ids: parse_list(&json, "prompts.token_ids")?,
            })
        })
        .transpose()
}

/// A page of prompts in id order: at most `limit` prompts with id greater than `after_id` (pass 0 for
/// the first page, then the last id of the previous page). Cost does not grow with the page number.
pub fn list_prompts(conn: &Connection, after_id: i64, limit: usize) -> Result<Vec<Prompt>> {
    let mut stmt = conn
        .prepare_cached("SELECT id, token_ids FROM prompts WHERE id > ?1 ORDER BY id LIMIT ?2")?;
    let rows = stmt.query_map(params![after_id, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|row| {
        let (id, json) = row?;
        Ok(Prompt {
            id,
            token_ids: parse_list(&json, "prompts.token_ids")?,
        })
    })
    .collect()
}

/// Every component alive in a prompt, in the order they were written (model order for `generate`).
pub fn prompt_activations(conn: &Connection, prompt_id: i64) -> Result<Vec<Activation>> {
    let mut stmt = conn.prepare_cached(
        "SELECT component_key, max_ci, positions FROM component_activations \
         WHERE prompt_id = ?1 ORDER BY rowid",
    )?;
    let rows = stmt.query_map([prompt_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, f64>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    rows.map(|row| {
        let (key, max_ci, positions) = row?;
        Ok(Activation {
            key,
            max_ci: max_ci as f32,
            positions: parse_list(&positions, "component_activations.positions")?,
        })
    })
    .collect()
}

/// How often `key` is alive, over all prompts.
pub fn component_stats(conn: &Connection, key: &str) -> Result<ComponentStats> {
    let list = super::postings::read(conn, key)?;
    let n = list.len();
    let sum: f64 = list.iter().map(|&(_, ci)| ci as f64).sum();
    let max = list.iter().map(|&(_, ci)| ci as f64).fold(0.0, f64::max);
    Ok(ComponentStats {
        key: key.to_owned(),
        n_prompts: n as u64,
        mean_max_ci: if n == 0 { 0.0 } else { sum / n as f64 },
        max_max_ci: max,
    })
}

/// Every distinct component key in the index, sorted. Jumps from key to key through the index, so it
/// costs one lookup per distinct key, not one per row.
pub fn component_keys(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE k(key) AS (
             SELECT MIN(component_key) FROM component_activations
             UNION ALL
             SELECT (SELECT MIN(component_key) FROM component_activations WHERE component_key > k.key)
             FROM k WHERE k.key IS NOT NULL
         )
         SELECT key FROM k WHERE key IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Prompts in which all (or any) of a set of components are alive, with where and how strongly,
/// sorted and paged.
pub fn search_prompts(conn: &Connection, search: &Search) -> Result<SearchResult> {
    let mut keys: Vec<&str> = vec![];
    for k in &search.keys {
        if !keys.contains(&k.as_str()) {
            keys.push(k);
        }
    }
    if keys.is_empty() {
        return Err(StoreError::Invalid(
            "a search needs at least one component key".into(),
        ));
    }
    let mut lists = keys
        .iter()
        .map(|k| super::postings::read(conn, k))
        .collect::<Result<Vec<_>>>()?;
    // (prompt id, score), by prompt id.
    let mut found: Vec<(i64, f32)> = match search.mode {
        Match::All => {
            lists.sort_by_key(Vec::len);
            let mut acc = std::mem::take(&mut lists[0]);
            for other in &lists[1..] {
                acc = merge(&acc, other, false);
            }
            acc
        }
        Match::Any => lists
            .into_iter()
            .reduce(|a, b| merge(&a, &b, true))
            .unwrap_or_default(),
    };
    let total = found.len();
    let end = search.offset.saturating_add(search.limit).min(total);
    if search.order == Order::ScoreDesc && end > 0 {
        let best_first = |a: &(i64, f32), b: &(i64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Only the results up to the page's end need sorting.
        if end < total {
            found.select_nth_unstable_by(end - 1, best_first);
            found.truncate(end);
        }
        found.sort_by(best_first);
    }
    let mut hits = vec![];
    for &(prompt_id, score) in found.iter().take(end).skip(search.offset) {
        let token_ids = prompt(conn, prompt_id)?.map_or_else(Vec::new, |p| p.token_ids);
        let mut matches = vec![];
        for key in &keys {
            if let Some(a) = activation(conn, prompt_id, key)? {
                matches.push(a);
            }
        }
        hits.push(SearchHit {
            prompt_id,
            token_ids,
            score,
            matches,
        });
    }
    Ok(SearchResult { total, hits })
}

/// Two lists sorted by prompt id merged: the union scored by the larger value, or the intersection
/// scored by the smaller.
fn merge(a: &[(i64, f32)], b: &[(i64, f32)], union: bool) -> Vec<(i64, f32)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(if union {
        a.len() + b.len()
    } else {
        a.len().min(b.len())
    });
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => {
                if union {
                    out.push(a[i]);
                }
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                if union {
                    out.push(b[j]);
                }
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let ci = if union {
                    a[i].1.max(b[j].1)
                } else {
                    a[i].1.min(b[j].1)
                };
                out.push((a[i].0, ci));
                i += 1;
                j += 1;
            }
        }
    }
    if union {
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
    }
    out
}

/// The row of `key` in a prompt, if alive there.
fn activation(conn: &Connection, prompt_id: i64, key: &str) -> Result<Option<Activation>> {
    conn.prepare_cached(
        "SELECT max_ci, positions FROM component_activations \
         WHERE component_key = ?1 AND prompt_id = ?2 LIMIT 1",
    )?
    .query_row(params![key, prompt_id], |r| {
        Ok((r.get::<_, f64>(0)?, r.get::<_, String>(1)?))
    })
    .optional()?
    .map(|(max_ci, positions)| {
        Ok(Activation {
            key: key.to_owned(),
            max_ci: max_ci as f32,
            positions: parse_list(&positions, "component_activations.positions")?,
        })
    })
    .transpose()
}

fn parse_list(json: &str, what: &str) -> Result<Vec<u32>> {
    serde_json::from_str(json).map_err(|e| {
        StoreError::Invalid(format!(
            "{what}: expected a JSON array of non-negative integers, found `{}…`: {e}",
            json.chars().take(40).collect::<String>()
        ))
    })
}
