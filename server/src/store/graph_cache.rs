//! Computed graphs kept in the sidecar file (`<db>.notes.sqlite`), so a prompt opened before a
//! restart comes back without recomputation.
//!
//! Each row is one graph request of one run: `run` is the run's identity (a hash of the files the
//! model was read from and of the server binary, so a graph is never served from another checkpoint
//! or from code that computed it differently), `key` the request, `graph` the wire `GraphData` as
//! gzip-compressed JSON. The table is bounded in bytes: the least recently used rows (of any run) go
//! first. Nothing here is fatal: a row that does not decode is deleted and recomputed, a failing
//! write is logged and skipped.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use app::types::GraphData;
use rusqlite::{Connection, OptionalExtension, params};

use super::Result;
use super::notes::open_sidecar;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS graph_cache (
    -- the run's identity (see `GraphCache::open`)
    run TEXT NOT NULL,
    -- the request: prompt, parameters, semantics, optimisation, trace
    key TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    -- a counter, larger = used more recently
    used INTEGER NOT NULL,
    graph BLOB NOT NULL,
    PRIMARY KEY (run, key)
);
CREATE INDEX IF NOT EXISTS idx_graph_cache_used ON graph_cache(used);
";

/// The graph cache of one run in a sidecar file.
pub struct GraphCache {
    conn: Mutex<Connection>,
    run: String,
    budget: u64,
}

/// How many graphs, and how many bytes, a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub graphs: u64,
    pub bytes: u64,
}

fn encode(graph: &GraphData) -> std::io::Result<Vec<u8>> {
    let json = serde_json::to_vec(graph)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json)?;
    gz.finish()
}

fn decode(blob: &[u8]) -> std::result::Result<GraphData, String> {
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(blob)
        .read_to_end(&mut json)
        .map_err(|e| format!("not gzip-compressed: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("not a graph: {e}"))
}

impl GraphCache {
    /// Opens the cache of the run with identity `run` in the sidecar at `path`, holding at most
    /// `budget` bytes of compressed graphs. Graphs of other runs in the file are left alone (said in
    /// the log) until the budget evicts them.
    pub fn open(path: &Path, run: &str, budget: u64) -> Result<Self> {
        let conn = open_sidecar(path, SCHEMA)?;
        let (others, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), COALESCE(SUM(bytes), 0) FROM graph_cache WHERE run != ?1",
            [run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if others > 0 {
            tracing::info!(
                "{}: {others} cached graphs ({:.1} MB) belong to another run or server build; \
                 they are not used",
                path.display(),
                bytes as f64 / 1e6
            );
        }
        let cache = GraphCache {
            conn: Mutex::new(conn),
            run: run.to_owned(),
            budget,
        };
        cache.evict(&cache.lock())?;
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The graph stored under `key`, marked as just used. A row that does not decode is deleted
    /// (the caller recomputes it); a database error is logged and reads as a miss.
    pub fn get(&self, key: &str) -> Option<GraphData> {
        let conn = self.lock();
        let found = conn
            .query_row(
                "SELECT graph FROM graph_cache WHERE run = ?1 AND key = ?2",
                params![self.run, key],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional();
        let blob = match found {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!("graph cache: reading {key}: {e}");
                return None;
            }
        };
        match decode(&blob) {
            Ok(graph) => {
                if let Err(e) = conn.execute(
                    "UPDATE graph_cache SET used = (SELECT COALESCE(MAX(used), 0) + 1 FROM graph_cache)
                     WHERE run = ?1 AND key = ?2",
                    params![self.run, key],
                ) {
                    tracing::warn!("graph cache: {e}");
                }
                Some(graph)
            }
            Err(why) => {
                tracing::warn!(
                    "graph cache: the graph stored for {key} is damaged ({why}); recomputing it"
                );
                let _ = conn.execute(
                    "DELETE FROM graph_cache WHERE run = ?1 AND key = ?2",
                    params![self.run, key],
                );
                None
            }
        }
    }

    /// Stores `graph` under `key`, then evicts the least recently used graphs beyond the budget
    /// (a graph larger than the whole budget is not stored).
    pub fn put(&self, key: &str, graph: &GraphData) -> Result<()> {
        let blob = encode(graph).map_err(|e| super::StoreError::Invalid(e.to_string()))?;
        if blob.len() as u64 > self.budget {
            return Ok(());
        }
        let conn = self.lock();
        conn.execute(
            "INSERT INTO graph_cache (run, key, bytes, used, graph)
             VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(used), 0) + 1 FROM graph_cache), ?4)
             ON CONFLICT (run, key) DO UPDATE SET bytes = ?3, used = excluded.used, graph = ?4",
            params![self.run, key, blob.len() as i64, blob],
        )?;
        self.evict(&conn)
    }

    /// Deletes the least recently used rows until the rest fit the budget.
    fn evict(&self, conn: &Connection) -> Result<()> {
        let n = conn.execute(
            "DELETE FROM graph_cache WHERE rowid IN (
                 SELECT rowid FROM (
                     SELECT rowid, SUM(bytes) OVER (ORDER BY used DESC) AS newer
                     FROM graph_cache)
                 WHERE newer > ?1)",
            [self.budget as i64],
        )?;
        if n > 0 {
            conn.execute_batch("PRAGMA incremental_vacuum;")?;
        }
        Ok(())
    }

    /// What the whole file's cache holds (every run).
    pub fn usage(&self) -> Result<Usage> {
        let conn = self.lock();
        let (graphs, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), COALESCE(SUM(bytes), 0) FROM graph_cache",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Usage {
            graphs: graphs as u64,
            bytes: bytes as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(id: i64, n_tokens: usize) -> GraphData {
        GraphData {
            prompt_id: Some(id),
            // Distinct words, so compression cannot make the sizes equal.
            tokens: (0..n_tokens).map(|i| format!("t{id}-{i}")).collect(),
            n_blocks: 2,
            ..GraphData::default()
        }
    }

    #[test]
    fn graphs_survive_reopening_per_run_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db.notes.sqlite");
        let cache = GraphCache::open(&path, "run-a", 1 << 20).unwrap();
        assert!(cache.get("k1").is_none());
        cache.put("k1", &graph(1, 4)).unwrap();
        cache.put("k2", &graph(2, 4)).unwrap();
        drop(cache);
        let cache = GraphCache::open(&path, "run-a", 1 << 20).unwrap();
        assert_eq!(cache.get("k1").unwrap(), graph(1, 4));
        assert_eq!(cache.get("k2").unwrap().prompt_id, Some(2));
        let other = GraphCache::open(&path, "run-b", 1 << 20).unwrap();
        assert!(
            other.get("k1").is_none(),
            "another run's graphs are not served"
        );
        assert_eq!(other.usage().unwrap().graphs, 2);
        // Notes in the same file are untouched by the cache.
        let notes = super::super::notes::Notes::open(&path).unwrap();
        notes.set_label("m", "h.0.mlp.c_fc:1", "x").unwrap();
        cache.put("k3", &graph(3, 4)).unwrap();
        assert_eq!(notes.labels("m").unwrap().len(), 1);
    }

    #[test]
    fn the_least_recently_used_graphs_go_when_over_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.notes.sqlite");
        let one = encode(&graph(1, 200)).unwrap().len() as u64;
        // Room for three graphs of this size, not four.
        let cache = GraphCache::open(&path, "r", one * 3 + one / 2).unwrap();
        for id in 1..=3 {
            cache.put(&format!("k{id}"), &graph(id, 200)).unwrap();
        }
        assert!(
            cache.get("k1").is_some(),
            "k1 is now the most recently used"
        );
        cache.put("k4", &graph(4, 200)).unwrap();
        let kept: Vec<bool> = (1..=4)
            .map(|id| cache.get(&format!("k{id}")).is_some())
            .collect();
        assert_eq!(kept, vec![true, false, true, true]);
        let usage = cache.usage().unwrap();
        assert_eq!(usage.graphs, 3);
        assert!(usage.bytes <= one * 3 + one / 2);
        // A smaller budget at the next start evicts down to it; one larger than any graph stores nothing.
        let cache = GraphCache::open(&path, "r", one + one / 2).unwrap();
        assert_eq!(cache.usage().unwrap().graphs, 1);
        let tiny = GraphCache::open(&path, "r", 10).unwrap();
        assert_eq!(tiny.usage().unwrap().graphs, 0);
        tiny.put("k9", &graph(9, 200)).unwrap();
        assert!(tiny.get("k9").is_none());
    }

    #[test]
    fn a_damaged_row_is_dropped_and_a_damaged_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.notes.sqlite");
        let cache = GraphCache::open(&path, "r", 1 << 20).unwrap();
        cache.put("k", &graph(1, 3)).unwrap();
        cache
            .lock()
            .execute("UPDATE graph_cache SET graph = x'1f8b0000'", [])
            .unwrap();
        assert!(cache.get("k").is_none(), "a damaged row reads as a miss");
        assert_eq!(cache.usage().unwrap().graphs, 0, "and is deleted");
        drop(cache);

        std::fs::write(
            &path,
            b"this is not an SQLite file, it is forty-odd bytes of text",
        )
        .unwrap();
        let cache = GraphCache::open(&path, "r", 1 << 20).unwrap();
        cache.put("k", &graph(2, 3)).unwrap();
        assert_eq!(cache.get("k").unwrap().prompt_id, Some(2));
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(
            aside.len(),
            1,
            "the damaged file is kept beside the new one"
        );
        assert!(
            std::fs::read(aside[0].path())
                .unwrap()
                .starts_with(b"this is not")
        );
    }
}
