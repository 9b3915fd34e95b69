//! Posting lists: for each component key, the prompts where it is alive and its max CI there, packed
//! into blobs, so a search reads a popular component's million prompts in a few milliseconds instead of
//! stepping through a million index entries.
//!
//! `postings(component_key, first_prompt, prompt_ids, max_ci)` holds one chunk per key and extension:
//! `prompt_ids` are LEB128 varints of the gaps between ascending ids (the first from 0), `max_ci`
//! little-endian `f32`s. `postings_state.through` says every prompt up to that id is in the chunks;
//! [`read`] takes later prompts from `component_activations` itself, so it is exact on any database,
//! also one written by the original tool (which has no chunks) or one whose run was killed.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, StoreError};

/// The prompt id up to which the chunks are complete (0 without chunks).
pub fn through(conn: &Connection) -> Result<i64> {
    if !super::schema::has_table(conn, "postings_state")? {
        return Ok(0);
    }
    Ok(conn
        .query_row("SELECT through FROM postings_state WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// `(prompt id, max CI)` of every prompt where `key` is alive, by prompt id.
pub fn read(conn: &Connection, key: &str) -> Result<Vec<(i64, f32)>> {
    let through = through(conn)?;
    let mut out: Vec<(i64, f32)> = Vec::new();
    if through > 0 {
        let mut stmt = conn.prepare_cached(
            "SELECT prompt_ids, max_ci FROM postings WHERE component_key = ?1 ORDER BY first_prompt",
        )?;
        let mut rows = stmt.query([key])?;
        while let Some(r) = rows.next()? {
            let corrupt = || StoreError::Invalid(format!("postings of `{key}`: corrupt chunk"));
            let ids = r.get_ref(0)?.as_blob().map_err(|_| corrupt())?;
            let cis = r.get_ref(1)?.as_blob().map_err(|_| corrupt())?;
            decode(ids, cis, &mut out).ok_or_else(corrupt)?;
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT prompt_id, max_ci FROM component_activations \
         WHERE component_key = ?1 AND prompt_id > ?2 ORDER BY prompt_id",
    )?;
    let mut rows = stmt.query(params![key, through])?;
    while let Some(r) = rows.next()? {
        let (id, ci): (i64, f64) = (r.get(0)?, r.get(1)?);
        // A key appears once per prompt; keep the larger value should a foreign database repeat it.
        match out.last_mut() {
            Some(last) if last.0 == id => last.1 = last.1.max(ci as f32),
            _ => out.push((id, ci as f32)),
        }
    }
    Ok(out)
}

/// Adds a chunk per key for the prompts written since the last extension, and moves `through` to the
/// last prompt. Run it inside a transaction.
pub fn extend(conn: &Connection) -> Result<()> {
    let from = through(conn)?;
    let last: Option<i64> = conn.query_row(
        "SELECT MAX(prompt_id) FROM component_activations",
        [],
        |r| r.get(0),
    )?;
    let Some(last) = last.filter(|&l| l > from) else {
        return Ok(());
    };
    let mut tail = conn.prepare_cached(
        "SELECT prompt_id, max_ci FROM component_activations \
         WHERE component_key = ?1 AND prompt_id > ?2 AND prompt_id <= ?3 ORDER BY prompt_id",
    )?;
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO postings (component_key, first_prompt, prompt_ids, max_ci) \
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    let (mut ids, mut cis) = (Vec::new(), Vec::new());
    for key in super::queries::component_keys(conn)? {
        ids.clear();
        cis.clear();
        let (mut prev, mut first) = (0i64, None);
        let mut rows = tail.query(params![key, from, last])?;
        while let Some(r) = rows.next()? {
            let (id, ci): (i64, f64) = (r.get(0)?, r.get(1)?);
            if id == prev && first.is_some() {
                continue;
            }
            first.get_or_insert(id);
            put_varint(&mut ids, (id - prev) as u64);
            cis.extend_from_slice(&(ci as f32).to_le_bytes());
            prev = id;
        }
        if let Some(first) = first {
            insert.execute(params![key, first, ids, cis])?;
        }
    }
    conn.execute(
        "INSERT OR REPLACE INTO postings_state (id, through) VALUES (1, ?1)",
        [last],
    )?;
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// Appends a chunk's `(prompt id, max CI)` pairs to `out`; `None` if the blobs disagree.
fn decode(ids: &[u8], cis: &[u8], out: &mut Vec<(i64, f32)>) -> Option<()> {
    out.reserve(cis.len() / 4);
    let mut cis = cis.chunks_exact(4);
    let (mut id, mut x, mut shift) = (0i64, 0u64, 0u32);
    for &b in ids {
        x |= u64::from(b & 0x7f) << shift;
        if b & 0x80 != 0 {
            shift += 7;
            if shift > 63 {
                return None;
            }
            continue;
        }
        id += x as i64;
        let ci = f32::from_le_bytes(cis.next()?.try_into().ok()?);
        out.push((id, ci));
        (x, shift) = (0, 0);
    }
    (cis.next().is_none() && shift == 0).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip() {
        let pairs = [(1i64, 0.5f32), (2, 1.0), (300, 0.25), (1 << 40, 0.0)];
        let (mut ids, mut cis, mut prev) = (vec![], vec![], 0);
        for (id, ci) in pairs {
            put_varint(&mut ids, (id - prev) as u64);
            cis.extend_from_slice(&ci.to_le_bytes());
            prev = id;
        }
        let mut out = vec![];
        decode(&ids, &cis, &mut out).unwrap();
        assert_eq!(out, pairs);
        assert!(decode(&ids[..ids.len() - 1], &cis, &mut vec![]).is_none());
        assert!(decode(&ids, &cis[..4], &mut vec![]).is_none());
    }
}
