//! `generate merge`: the databases of `--shard i/N` runs combined into the database one run over the
//! same prompts would have written. Shard `i` holds windows `i, i + N, i + 2N, …` in order, so the
//! merge interleaves them back (prompt ids renumbered to the corpus order), adds the activation-context
//! sums and keeps the best examples across shards.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, Statement, params};
use serde_json::json;

use crate::store::{meta, schema, writer};

use super::GenerateError;
use super::contexts::{ContextParams, Contexts};
use super::pipeline::{self, MAY_DIFFER, Shard, shard_len};

type Result<T> = std::result::Result<T, GenerateError>;

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub prompts: u64,
}

/// Prompts copied per transaction.
const PROMPTS_PER_TRANSACTION: u64 = 1000;

struct Part {
    path: PathBuf,
    conn: Connection,
    record: writer::GenerationRecord,
    shard: Shard,
}

/// Merges shard databases into `out` (which must not exist unless `force`).
pub fn merge(out: &Path, inputs: &[PathBuf], force: bool) -> Result<MergeSummary> {
    let usage = |msg: String| GenerateError::Usage(msg);
    let mut parts = vec![];
    for path in inputs {
        let conn = schema::open_read_only(path)?;
        let record = writer::generation(&conn)?.ok_or_else(|| {
            usage(format!(
                "{}: not written by generate (no generation record), so its activation contexts \
                 cannot be merged",
                path.display()
            ))
        })?;
        let shard = Shard {
            index: record.config["shard"]["index"].as_u64().unwrap_or(0),
            count: record.config["shard"]["count"].as_u64().unwrap_or(1),
        };
        parts.push(Part {
            path: path.clone(),
            conn,
            record,
            shard,
        });
    }
    let Some(first) = parts.first() else {
        return Err(usage("nothing to merge".into()));
    };
    let skip: Vec<&str> = MAY_DIFFER.iter().copied().chain(["shard.index"]).collect();
    for p in &parts[1..] {
        let diffs = pipeline::identity_diff(&first.record.config, &p.record.config, "", &skip);
        if !diffs.is_empty() {
            return Err(usage(format!(
                "{} and {} are not shards of one run: {}",
                first.path.display(),
                p.path.display(),
                diffs.join("; ")
            )));
        }
    }
    let n = first.shard.count;
    let mut by_index: Vec<Option<usize>> = vec![None; n as usize];
    for (i, p) in parts.iter().enumerate() {
        if let Some(j) = by_index[p.shard.index as usize].replace(i) {
            return Err(usage(format!(
                "{} and {} are both shard {}/{n}",
                parts[j].path.display(),
                p.path.display(),
                p.shard.index
            )));
        }
    }
    // The shards must hold exactly the first `total` windows of the run.
    let total: u64 = parts.iter().map(|p| p.record.prompts_done).sum();
    let mut problems = vec![];
    for (index, part) in by_index.iter().enumerate() {
        let want = shard_len(
            total,
            Shard {
                index: index as u64,
                count: n,
            },
        );
        match part {
            None if want > 0 => problems.push(format!("shard {index}/{n} is missing")),
            Some(i) if parts[*i].record.prompts_done != want => problems.push(format!(
                "{} (shard {index}/{n}) has {} prompts, {want} expected",
                parts[*i].path.display(),
                parts[*i].record.prompts_done
            )),
            _ => {}
        }
    }
    for p in &parts {
        let (covered, _) = crate::store::contexts::read_state(&p.conn)?;
        if covered != p.record.prompts_done {
            problems.push(format!(
                "{} was stopped before saving the activation contexts of its last prompts",
                p.path.display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(usage(format!(
            "the shards do not add up to one run's first {total} prompts: {}; rerun unfinished \
             shards to completion first",
            problems.join("; ")
        )));
    }

    if out.exists() {
        if !force {
            return Err(usage(format!(
                "{} exists; pass --force to replace it",
                out.display()
            )));
        }
        pipeline::remove_database(out)?;
    }
    let mut dst = schema::open_for_writing(out)?;
    copy_prompts(&mut dst, &parts, &by_index, total)?;

    // Activation contexts: the module layout of the first shard that has one.
    let layout = parts
        .iter()
        .map(|p| crate::store::contexts::read_module_sums(&p.conn))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let modules: Vec<(String, usize)> = layout
        .iter()
        .find(|l| !l.is_empty())
        .map(|l| {
            l.iter()
                .map(|m| (m.module.clone(), m.sum_ci.len()))
                .collect()
        })
        .unwrap_or_default();
    let params: ContextParams = serde_json::from_value(first.record.config["contexts"].clone())
        .map_err(|e| usage(format!("{}: generation record: {e}", first.path.display())))?;
    let mut contexts = Contexts::new(modules.clone(), params);
    for p in &parts {
        contexts.merge(&Contexts::load(&p.conn, modules.clone(), params)?);
    }
    let mut config = first.record.config.clone();
    config["shard"] = json!({"index": 0, "count": 1});
    let record = writer::GenerationRecord {
        config,
        prompts_done: total,
        tokens_done: parts.iter().map(|p| p.record.tokens_done).sum(),
        complete: parts.iter().all(|p| p.record.complete),
    };
    let tx = dst.transaction()?;
    for key in [meta::WANDB_PATH, meta::N_BLOCKS] {
        if let Some(v) = meta::get(&first.conn, key)? {
            meta::set(&tx, key, &v)?;
        }
    }
    let tokenizer = first.record.config["input"]["tokenizer"]["path"]
        .as_str()
        .and_then(|p| super::corpus::load_tokenizer(Path::new(p)).ok());
    pipeline::finish(&tx, &mut contexts, &record, tokenizer.as_ref())?;
    tx.commit()?;
    Ok(MergeSummary { prompts: total })
}

/// Copies prompts and their rows in corpus order: window `w` is the next prompt of shard `w % N`.
fn copy_prompts(
    dst: &mut Connection,
    parts: &[Part],
    by_index: &[Option<usize>],
    total: u64,
) -> Result<()> {
    let mut prompt_stmts: Vec<Statement> = parts
        .iter()
        .map(|p| {
            p.conn
                .prepare("SELECT id, token_ids FROM prompts ORDER BY id")
        })
        .collect::<rusqlite::Result<_>>()?;
    let mut row_stmts: Vec<Statement> = parts
        .iter()
        .map(|p| {
            p.conn.prepare(
                "SELECT prompt_id, component_key, max_ci, positions FROM component_activations \
                 ORDER BY prompt_id, rowid",
            )
        })
        .collect::<rusqlite::Result<_>>()?;
    let mut prompts: Vec<_> = prompt_stmts
        .iter_mut()
        .map(|s| s.query([]))
        .collect::<rusqlite::Result<_>>()?;
    let mut rows: Vec<_> = row_stmts
        .iter_mut()
        .map(|s| s.query([]))
        .collect::<rusqlite::Result<_>>()?;
    // The next unconsumed row of each part: (prompt_id, key, max_ci, positions).
    let mut peeked: Vec<Option<(i64, String, f64, String)>> = vec![None; parts.len()];
    let n = by_index.len() as u64;
    let mut w = 0;
    while w < total {
        let tx = dst.transaction()?;
        {
            let mut ins_prompt =
                tx.prepare_cached("INSERT INTO prompts (token_ids) VALUES (?1)")?;
            let mut ins_row = tx.prepare_cached(
                "INSERT INTO component_activations (prompt_id, component_key, max_ci, positions) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            let end = (w + PROMPTS_PER_TRANSACTION).min(total);
            for window in w..end {
                let i = by_index[(window % n) as usize]
                    .expect("checked: every needed shard is present");
                let row = prompts[i].next()?.ok_or_else(|| {
                    GenerateError::Usage(format!(
                        "{}: fewer prompts than its generation record says",
                        parts[i].path.display()
                    ))
                })?;
                let (src_id, token_ids): (i64, String) = (row.get(0)?, row.get(1)?);
                ins_prompt.execute([&token_ids])?;
                let id = tx.last_insert_rowid();
                loop {
                    if peeked[i].is_none() {
                        peeked[i] = match rows[i].next()? {
                            Some(r) => Some((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                            None => None,
                        };
                    }
                    match &peeked[i] {
                        Some((pid, ..)) if *pid == src_id => {
                            let (_, key, max_ci, positions) =
                                peeked[i].take().expect("just matched");
                            ins_row.execute(params![id, key, max_ci, positions])?;
                        }
                        // Rows of no prompt (a foreign database's leftovers) are dropped.
                        Some((pid, ..)) if *pid < src_id => peeked[i] = None,
                        _ => break,
                    }
                }
            }
            w = end;
        }
        tx.commit()?;
    }
    Ok(())
}
