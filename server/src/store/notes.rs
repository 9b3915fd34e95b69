//! The sidecar notes file (`<db>.notes.sqlite` beside the corpus database, which stays read-only):
//! what a researcher adds while exploring, kept per model: the intervention runs of each prompt
//! and the labels given to components (and, in [`super::graph_cache`], computed graphs). Its tables
//! are this tool's own, created on first open.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, StoreError};

/// The notes file that belongs to a corpus database or prompts file.
pub fn sidecar_path(corpus: &Path) -> PathBuf {
    let mut name = corpus.as_os_str().to_owned();
    name.push(".notes.sqlite");
    PathBuf::from(name)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS intervention_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- the model the run belongs to (its run directory), so one notes file can serve several
    model TEXT NOT NULL,
    -- `id:<prompt id>` or `text:<typed text>`
    prompt TEXT NOT NULL,
    created_at REAL NOT NULL,
    request TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_intervention_runs_prompt ON intervention_runs(model, prompt, id);
CREATE TABLE IF NOT EXISTS labels (
    model TEXT NOT NULL,
    -- a component, `layer:c`
    key TEXT NOT NULL,
    label TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (model, key)
);
";

/// Seconds since the epoch.
pub(super) fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open notes file.
pub struct Notes {
    conn: Connection,
    pub path: PathBuf,
}

/// A stored intervention run: the request and the result as the JSON the server sent.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    pub id: i64,
    pub created_at: f64,
    pub request: String,
    pub result: String,
}

/// Whether `e` says the file is not a readable SQLite database (garbage, or damaged pages).
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Opens the sidecar at `path` with `schema` applied. A file SQLite cannot read is moved aside to
/// `<path>.corrupt-<unix seconds>` (kept, so nothing a researcher wrote is destroyed) and a fresh one
/// is made in its place, with a log line: a damaged sidecar never stops the server.
pub fn open_sidecar(path: &Path, schema: &str) -> Result<Connection> {
    let open = || -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Only takes effect on a new file: pages freed by the graph cache's evictions are then
        // returned to the file system by `PRAGMA incremental_vacuum`.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")?;
        conn.execute_batch(schema)?;
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })?;
        Ok(conn)
    };
    let failed = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    match open() {
        Ok(conn) => Ok(conn),
        Err(e) if is_corrupt(&e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".corrupt-{}", now() as u64));
            let aside = PathBuf::from(aside);
            std::fs::rename(path, &aside).map_err(|io| {
                StoreError::Invalid(format!(
                    "{} is not a readable SQLite file ({e}) and cannot be moved aside: {io}",
                    path.display()
                ))
            })?;
            tracing::warn!(
                "{} is not a readable SQLite file ({e}); moved it to {} and started a new one",
                path.display(),
                aside.display()
            );
            open().map_err(failed)
        }
        Err(e) => Err(failed(e)),
    }
}

impl Notes {
    /// Opens (creating it and its tables if needed) the notes file at `path`; see [`open_sidecar`].
    pub fn open(path: &Path) -> Result<Self> {
        let conn = open_sidecar(path, SCHEMA)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// An in-memory notes file (for servers without a corpus file, and tests).
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn,
            path: PathBuf::from(":memory:"),
        })
    }

    pub fn add_run(&self, model: &str, prompt: &str, request: &str, result: &str) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO intervention_runs (model, prompt, created_at, request, result)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![model, prompt, now(), request, result],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The runs of one prompt, oldest first.
    pub fn runs(&self, model: &str, prompt: &str) -> Result<Vec<StoredRun>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, created_at, request, result FROM intervention_runs
             WHERE model = ?1 AND prompt = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![model, prompt], |r| {
            Ok(StoredRun {
                id: r.get(0)?,
                created_at: r.get(1)?,
                request: r.get(2)?,
                result: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes run `id` of `model`; whether there was one.
    pub fn delete_run(&self, model: &str, id: i64) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM intervention_runs WHERE id = ?1 AND model = ?2",
            params![id, model],
        )?;
        Ok(n > 0)
    }

    /// Sets the label of `key` for `model`; an empty label removes it.
    pub fn set_label(&self, model: &str, key: &str, label: &str) -> Result<()> {
        if label.is_empty() {
            self.conn.execute(
                "DELETE FROM labels WHERE model = ?1 AND key = ?2",
                params![model, key],
            )?;
        } else {
            self.conn.execute(
                "INSERT INTO labels (model, key, label, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (model, key) DO UPDATE SET label = ?3, updated_at = ?4",
                params![model, key, label, now()],
            )?;
        }
        Ok(())
    }

    /// Every label of `model`, by key.
    pub fn labels(&self, model: &str) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, label FROM labels WHERE model = ?1 ORDER BY key")?;
        let rows = stmt.query_map(params![model], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Run `id` of `model`, if there is one.
    pub fn run(&self, model: &str, id: i64) -> Result<Option<StoredRun>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, created_at, request, result FROM intervention_runs
                 WHERE id = ?1 AND model = ?2",
                params![id, model],
                |r| {
                    Ok(StoredRun {
                        id: r.get(0)?,
                        created_at: r.get(1)?,
                        request: r.get(2)?,
                        result: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_kept_per_model_and_prompt_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("corpus.db");
        let path = sidecar_path(&db);
        assert_eq!(path, dir.path().join("corpus.db.notes.sqlite"));
        let notes = Notes::open(&path).unwrap();
        let a = notes.add_run("m", "id:1", "{\"a\":1}", "{}").unwrap();
        let b = notes.add_run("m", "id:1", "{\"a\":2}", "{}").unwrap();
        notes.add_run("m", "id:2", "{}", "{}").unwrap();
        notes.add_run("other", "id:1", "{}", "{}").unwrap();
        drop(notes);
        let notes = Notes::open(&path).unwrap();
        let runs = notes.runs("m", "id:1").unwrap();
        assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(runs[1].request, "{\"a\":2}");
        assert!(!notes.delete_run("other", a).unwrap(), "another model's id");
        assert!(notes.delete_run("m", a).unwrap());
        assert!(!notes.delete_run("m", a).unwrap());
        assert_eq!(notes.runs("m", "id:1").unwrap().len(), 1);
        assert_eq!(notes.run("m", b).unwrap().unwrap().id, b);
        assert!(!db.exists(), "the corpus database is never touched");
    }

    #[test]
    fn labels_are_kept_per_model_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.notes.sqlite");
        let notes = Notes::open(&path).unwrap();
        notes.set_label("m", "h.0.mlp.c_fc:3", "names").unwrap();
        notes
            .set_label("m", "h.0.mlp.c_fc:3", "girls' names")
            .unwrap();
        notes.set_label("m", "h.1.attn.q_proj:9", "plural").unwrap();
        notes.set_label("other", "h.0.mlp.c_fc:3", "x").unwrap();
        drop(notes);
        let notes = Notes::open(&path).unwrap();
        assert_eq!(
            notes.labels("m").unwrap(),
            vec![
                ("h.0.mlp.c_fc:3".to_owned(), "girls' names".to_owned()),
                ("h.1.attn.q_proj:9".to_owned(), "plural".to_owned()),
            ]
        );
        notes.set_label("m", "h.1.attn.q_proj:9", "").unwrap();
        assert_eq!(notes.labels("m").unwrap().len(), 1);
        assert_eq!(notes.labels("other").unwrap().len(), 1);
    }
}
