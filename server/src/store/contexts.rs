//! Activation contexts: per component, its mean CI over every indexed token, how often it fires, and
//! its top-k examples (a few tokens either side of where it fires hardest, with its CI at each).
//!
//! Stored as accumulators, so a resumed run and a merge of shards continue them exactly:
//! - `context_modules(module, sum_ci, n_firing)`: per decomposed module, little-endian `f64` sums of CI
//!   and `u64` counts of firing tokens, one per component;
//! - `context_examples(component_key, examples)`: the top-k examples, in a small binary encoding;
//! - `context_state(prompts, tokens)`: how many of the run's first prompts, and tokens, they cover.
//!
//! They are saved every so often during a run and at its end, when `generate` also writes them into
//! `meta.activation_contexts` in the original tool's layout.

use std::cmp::Ordering;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, StoreError};

/// One example of a component firing: tokens around the position of a prompt where its CI is highest.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextExample {
    /// The corpus window (prompt) it comes from, counted from 0 in the run's order.
    pub window: u64,
    /// The firing position within that prompt.
    pub position: u32,
    /// Index of the firing token within `tokens`.
    pub active: u32,
    pub tokens: Vec<u32>,
    /// The component's CI at each of `tokens`.
    pub ci: Vec<f32>,
}

impl ContextExample {
    /// The CI at the firing token (what examples are ranked by).
    pub fn active_ci(&self) -> f32 {
        self.ci[self.active as usize]
    }
}

/// The ranking of examples: higher CI first, then the earlier window, then the earlier position. A
/// total order, so the top-k is the same however the corpus was batched or sharded.
pub fn example_order(a: &ContextExample, b: &ContextExample) -> Ordering {
    b.active_ci()
        .total_cmp(&a.active_ci())
        .then(a.window.cmp(&b.window))
        .then(a.position.cmp(&b.position))
}

/// Per-component sums of one decomposed module.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSums {
    pub module: String,
    /// Sum of CI over every indexed token, per component.
    pub sum_ci: Vec<f64>,
    /// Tokens where the CI exceeded the context threshold, per component.
    pub n_firing: Vec<u64>,
}

/// The activation contexts of one component, ready to show.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentContexts {
    pub key: String,
    /// Tokens indexed (the denominator of `mean_ci` and `density`).
    pub n_tokens: u64,
    pub mean_ci: f64,
    pub n_firing: u64,
    /// `n_firing / n_tokens`.
    pub density: f64,
    /// Best first (see [`example_order`]).
    pub examples: Vec<ContextExample>,
}

pub fn write_module_sums(conn: &Connection, m: &ModuleSums) -> Result<()> {
    let sums: Vec<u8> = m.sum_ci.iter().flat_map(|x| x.to_le_bytes()).collect();
    let counts: Vec<u8> = m.n_firing.iter().flat_map(|x| x.to_le_bytes()).collect();
    conn.prepare_cached(
        "INSERT OR REPLACE INTO context_modules (module, sum_ci, n_firing) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![m.module, sums, counts])?;
    Ok(())
}

/// Every module's sums (none for a database without the table).
pub fn read_module_sums(conn: &Connection) -> Result<Vec<ModuleSums>> {
    if !super::schema::has_table(conn, "context_modules")? {
        return Ok(vec![]);
    }
    let mut stmt = conn.prepare("SELECT module, sum_ci, n_firing FROM context_modules")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    let mut out = vec![];
    for row in rows {
        let (module, sums, counts) = row?;
        if sums.len() % 8 != 0 || sums.len() != counts.len() {
            return Err(StoreError::Invalid(format!(
                "context_modules `{module}`: blobs of {} and {} bytes, expected equal multiples of 8",
                sums.len(),
                counts.len()
            )));
        }
        out.push(ModuleSums {
            module,
            sum_ci: sums
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            n_firing: counts
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        });
    }
    Ok(out)
}

pub fn write_examples(conn: &Connection, key: &str, examples: &[ContextExample]) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO context_examples (component_key, examples) VALUES (?1, ?2)",
    )?
    .execute(params![key, encode_examples(examples)])?;
    Ok(())
}

/// Every component's examples (none for a database without the table).
pub fn read_all_examples(conn: &Connection) -> Result<Vec<(String, Vec<ContextExample>)>> {
    if !super::schema::has_table(conn, "context_examples")? {
        return Ok(vec![]);
    }
    let mut stmt = conn.prepare("SELECT component_key, examples FROM context_examples")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    rows.map(|row| {
        let (key, blob) = row?;
        let examples = decode_examples(&blob).ok_or_else(|| {
            StoreError::Invalid(format!("context_examples `{key}`: corrupt encoding"))
        })?;
        Ok((key, examples))
    })
    .collect()
}

/// The activation contexts of `key` (`"h.0.mlp.c_fc:12"`), or `None` when the database has none for
/// it (not a decomposed component, never seen, or a database without context tables).
pub fn component_contexts(conn: &Connection, key: &str) -> Result<Option<ComponentContexts>> {
    let Some((module, c)) = key
        .rsplit_once(':')
        .and_then(|(m, c)| Some((m, c.parse::<usize>().ok()?)))
    else {
        return Ok(None);
    };
    if !super::schema::has_table(conn, "context_modules")? {
        return Ok(None);
    }
    let sums: Option<(Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT substr(sum_ci, ?2, 8), substr(n_firing, ?2, 8) FROM context_modules \
             WHERE module = ?1",
            params![module, (c * 8 + 1) as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((sum, count)) = sums else {
        return Ok(None);
    };
    let (Ok(sum), Ok(count)) = (
        <[u8; 8]>::try_from(&sum[..]),
        <[u8; 8]>::try_from(&count[..]),
    ) else {
        return Ok(None);
    };
    let (sum, n_firing) = (f64::from_le_bytes(sum), u64::from_le_bytes(count));
    let (_, n_tokens) = read_state(conn)?;
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT examples FROM context_examples WHERE component_key = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?;
    let examples = match blob {
        Some(b) => decode_examples(&b).ok_or_else(|| {
            StoreError::Invalid(format!("context_examples `{key}`: corrupt encoding"))
        })?,
        None => vec![],
    };
    let per_token = |x: f64| {
        if n_tokens == 0 {
            0.0
        } else {
            x / n_tokens as f64
        }
    };
    Ok(Some(ComponentContexts {
        key: key.to_owned(),
        n_tokens,
        mean_ci: per_token(sum),
        n_firing,
        density: per_token(n_firing as f64),
        examples,
    }))
}

/// Records that the accumulators cover the run's first `prompts` prompts (`tokens` tokens).
pub fn write_state(conn: &Connection, prompts: u64, tokens: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO context_state (id, prompts, tokens) VALUES (1, ?1, ?2)",
    )?
    .execute(params![prompts as i64, tokens as i64])?;
    Ok(())
}

/// `(prompts, tokens)` the accumulators cover (zeros without them).
pub fn read_state(conn: &Connection) -> Result<(u64, u64)> {
    if !super::schema::has_table(conn, "context_state")? {
        return Ok((0, 0));
    }
    let state: Option<(i64, i64)> = conn
        .query_row(
            "SELECT prompts, tokens FROM context_state WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(state.map_or((0, 0), |(p, t)| (p as u64, t as u64)))
}

const ENCODING_VERSION: u8 = 1;

/// `[version u8][count u16]` then per example `[window u64][position u32][active u16][len u16]`,
/// `len` token ids (`u32`) and `len` CI values (`f32`), all little-endian.
pub fn encode_examples(examples: &[ContextExample]) -> Vec<u8> {
    let mut out = vec![ENCODING_VERSION];
    out.extend_from_slice(&(examples.len() as u16).to_le_bytes());
    for e in examples {
        out.extend_from_slice(&e.window.to_le_bytes());
        out.extend_from_slice(&e.position.to_le_bytes());
        out.extend_from_slice(&(e.active as u16).to_le_bytes());
        out.extend_from_slice(&(e.tokens.len() as u16).to_le_bytes());
        for t in &e.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for v in &e.ci {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

pub fn decode_examples(blob: &[u8]) -> Option<Vec<ContextExample>> {
    struct Cursor<'a>(&'a [u8]);
    impl Cursor<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_at_checked(N)?;
            self.0 = rest;
            head.try_into().ok()
        }
    }
    let mut cur = Cursor(blob);
    if cur.take::<1>()?[0] != ENCODING_VERSION {
        return None;
    }
    let n = u16::from_le_bytes(cur.take()?);
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let window = u64::from_le_bytes(cur.take()?);
        let position = u32::from_le_bytes(cur.take()?);
        let active = u16::from_le_bytes(cur.take()?) as u32;
        let len = u16::from_le_bytes(cur.take()?) as usize;
        let tokens = (0..len)
            .map(|_| cur.take().map(u32::from_le_bytes))
            .collect::<Option<Vec<_>>>()?;
        let ci = (0..len)
            .map(|_| cur.take().map(f32::from_le_bytes))
            .collect::<Option<Vec<_>>>()?;
        if active as usize >= len {
            return None;
        }
        out.push(ContextExample {
            window,
            position,
            active,
            tokens,
            ci,
        });
    }
    cur.0.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_round_trip_and_reject_corruption() {
        let ex = vec![
            ContextExample {
                window: 7,
                position: 3,
                active: 2,
                tokens: vec![1, 2, 3, 4],
                ci: vec![0.0, 0.5, 0.9, 0.1],
            },
            ContextExample {
                window: 1 << 40,
                position: 0,
                active: 0,
                tokens: vec![9],
                ci: vec![1.0],
            },
        ];
        let blob = encode_examples(&ex);
        assert_eq!(decode_examples(&blob), Some(ex));
        assert_eq!(decode_examples(&blob[..blob.len() - 1]), None);
        assert_eq!(decode_examples(&[]), None);
        assert_eq!(decode_examples(&encode_examples(&[])), Some(vec![]));
    }

    #[test]
    fn order_is_ci_then_window_then_position() {
        let ex = |window, position, ci| ContextExample {
            window,
            position,
            active: 0,
            tokens: vec![0],
            ci: vec![ci],
        };
        let mut v = [ex(5, 0, 0.5), ex(1, 2, 0.9), ex(1, 1, 0.9), ex(0, 0, 0.5)];
        v.sort_by(example_order);
        let order: Vec<_> = v.iter().map(|e| (e.window, e.position)).collect();
        assert_eq!(order, vec![(1, 1), (1, 2), (0, 0), (5, 0)]);
    }
}
