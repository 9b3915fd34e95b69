//! Creating and opening databases.
//!
//! The original tool's tables, exactly as it creates them (SPEC §4):
//! - `meta(key, value)`: gzip-compressed JSON values (see [`super::meta`]).
//! - `prompts(id, token_ids)`: `token_ids` a JSON array, written as Python's `json.dumps` does.
//! - `component_activations(prompt_id, component_key, max_ci, positions)`: one row per component
//!   (`"layer:c"`, `"wte:0"`, `"output:v"`) alive somewhere in the prompt; `positions` a JSON array.
//!
//! One difference in what this tool creates: its `idx_component_key` indexes
//! `(component_key, prompt_id, max_ci)`, not `component_key` alone. It serves every query the
//! original's index serves (same name, same leading column, so the original's `CREATE INDEX IF NOT
//! EXISTS` leaves it be), and searches read it alone, in prompt order, without touching the table.
//!
//! `generate` builds both indexes when a run finishes ([`create_indexes`]): kept up to date row by
//! row they would cost about three times the rest of the writing, sorted once at the end far less. A
//! database whose run was killed before its first finish lacks them until the run is resumed; it still
//! answers every query, more slowly.
//!
//! Tables this tool adds (a database without them still opens and answers queries):
//! - `generation`: one row, what the index was made from (model hash, thresholds, corpus, shard) and how
//!   far it got; `generate` resumes from it and refuses to mix runs.
//! - `context_modules`, `context_examples`, `context_state`: the activation-context accumulators (see
//!   [`super::contexts`]).
//! - `postings`, `postings_state`: packed posting lists for fast searches (see [`super::postings`]).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::{Result, StoreError};

/// The original tool's tables, as its `init_schema_simple` creates them.
macro_rules! original_tables {
    () => {
        "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_ids TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS component_activations (
    prompt_id INTEGER NOT NULL,
    component_key TEXT NOT NULL,
    max_ci REAL NOT NULL,
    positions TEXT NOT NULL,
    FOREIGN KEY (prompt_id) REFERENCES prompts(id)
);
"
    };
}

/// The original tool's schema (`init_schema_simple`).
pub const ORIGINAL_SCHEMA: &str = concat!(
    original_tables!(),
    "CREATE INDEX IF NOT EXISTS idx_component_key ON component_activations(component_key);
     CREATE INDEX IF NOT EXISTS idx_prompt_id ON component_activations(prompt_id);"
);

/// The tables this tool adds.
pub const EXTRA_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL,
    prompts_done INTEGER NOT NULL,
    tokens_done INTEGER NOT NULL,
    complete INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS context_modules (
    module TEXT PRIMARY KEY,
    sum_ci BLOB NOT NULL,
    n_firing BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS context_examples (
    component_key TEXT PRIMARY KEY,
    examples BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS context_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    prompts INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS postings (
    component_key TEXT NOT NULL,
    first_prompt INTEGER NOT NULL,
    prompt_ids BLOB NOT NULL,
    max_ci BLOB NOT NULL,
    PRIMARY KEY (component_key, first_prompt)
);

CREATE TABLE IF NOT EXISTS postings_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through INTEGER NOT NULL
);
";

/// Opens (creating if needed) a database for writing: WAL journal, the original tables (indexes come
/// at the end) and this tool's tables.
pub fn open_for_writing(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Invalid(format!(
            "{}: cannot switch the database to WAL mode (got `{mode}`)",
            path.display()
        )));
    }
    // NORMAL is crash-safe in WAL mode: a killed process loses no committed transaction.
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL; PRAGMA cache_size=-262144; PRAGMA temp_store=MEMORY;",
    )?;
    // The indexes come at the end (`create_indexes`).
    conn.execute_batch(original_tables!())?;
    conn.execute_batch(EXTRA_SCHEMA)?;
    Ok(conn)
}

/// Builds `idx_prompt_id` and this tool's `idx_component_key` (see the module documentation), each
/// unless the database has an index of that name.
pub fn create_indexes(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS idx_prompt_id ON component_activations(prompt_id);
         CREATE INDEX IF NOT EXISTS idx_component_key
             ON component_activations(component_key, prompt_id, max_ci);",
    )?;
    Ok(())
}

/// Opens an existing database read-only (as the web server does). Checks that it has the original
/// tool's tables.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(StoreError::Open {
            path: path.to_owned(),
            source: rusqlite::Error::InvalidPath(path.to_owned()),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.execute_batch("PRAGMA cache_size=-131072; PRAGMA mmap_size=4294967296;")?;
    for table in ["prompts", "component_activations"] {
        if !has_table(&conn, table)? {
            return Err(StoreError::Invalid(format!(
                "{}: not an SPD attribution database (no `{table}` table)",
                path.display()
            )));
        }
    }
    Ok(conn)
}

/// Whether the database has a table (or index) of this name.
pub fn has_table(conn: &Connection, name: &str) -> Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}
