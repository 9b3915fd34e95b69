//! Compatibility with the original tool's databases, both ways: one built here with plain SQL exactly
//! as SPEC §4 describes (gzip-JSON meta) opens and answers every query; one written by `generate`
//! answers the original tool's own SQL and holds its meta layout.

mod generate_support;

use std::io::Write;
use std::path::Path;

use generate_support::*;
use rusqlite::Connection;
use serde_json::{Value, json};
use server::generate;
use server::store::queries::{self, Activation, Match, Order, Search};
use server::store::schema;

fn gzip_json(v: &Value) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(v.to_string().as_bytes()).unwrap();
    gz.finish().unwrap()
}

/// A `component_activations` row: key, max_ci, positions.
type Row<'a> = (&'a str, f64, &'a str);

/// The original tool's `init_schema_simple`, `set_meta` and `add_prompt_simple`, in plain SQL.
fn write_original(path: &Path) {
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS prompts (id INTEGER PRIMARY KEY AUTOINCREMENT, token_ids TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS component_activations (
             prompt_id INTEGER NOT NULL, component_key TEXT NOT NULL, max_ci REAL NOT NULL,
             positions TEXT NOT NULL, FOREIGN KEY (prompt_id) REFERENCES prompts(id));
         CREATE INDEX IF NOT EXISTS idx_component_key ON component_activations(component_key);
         CREATE INDEX IF NOT EXISTS idx_prompt_id ON component_activations(prompt_id);",
    )
    .unwrap();
    let meta = [
        (
            "wandb_path",
            json!({"path": "wandb:goodfire/spd/runs/abc123"}),
        ),
        ("n_blocks", json!({"n_blocks": 4})),
        (
            "activation_contexts",
            json!({"h.0.mlp.c_fc": [{"subcomponent_idx": 3, "mean_ci": 0.12,
                "example_tokens": [["the", " cat"]], "example_ci": [[0.5, 0.9]],
                "example_active_pos": [1], "example_active_ci": [0.9],
                "pr_tokens": [], "pr_recalls": [], "pr_precisions": []}]}),
        ),
    ];
    for (k, v) in meta {
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            rusqlite::params![k, gzip_json(&v)],
        )
        .unwrap();
    }
    let prompts: [(&str, &[Row]); 4] = [
        (
            "[5, 6, 7]",
            &[
                ("wte:0", 1.0, "[0, 1, 2]"),
                ("h.0.mlp.c_fc:3", 0.9, "[1, 2]"),
                ("output:7", 0.2, "[0]"),
            ],
        ),
        (
            "[8, 9]",
            &[("wte:0", 1.0, "[0, 1]"), ("h.0.mlp.c_fc:3", 0.4, "[0]")],
        ),
        (
            "[1, 2, 3, 4]",
            &[
                ("wte:0", 1.0, "[0, 1, 2, 3]"),
                ("h.0.mlp.c_fc:3", 0.7, "[3]"),
                ("output:7", 0.6, "[1, 2]"),
            ],
        ),
        ("[4]", &[("wte:0", 1.0, "[0]"), ("output:7", 0.05, "[0]")]),
    ];
    for (tokens, rows) in prompts {
        conn.execute("INSERT INTO prompts (token_ids) VALUES (?)", [tokens])
            .unwrap();
        let id = conn.last_insert_rowid();
        for (key, max, pos) in rows {
            conn.execute(
                "INSERT INTO component_activations (prompt_id, component_key, max_ci, positions) \
                 VALUES (?, ?, ?, ?)",
                rusqlite::params![id, key, max, pos],
            )
            .unwrap();
        }
    }
}

fn act(key: &str, max_ci: f32, positions: &[u32]) -> Activation {
    Activation {
        key: key.into(),
        max_ci,
        positions: positions.to_vec(),
    }
}

fn search(keys: &[&str], mode: Match, order: Order, offset: usize, limit: usize) -> Search {
    Search {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        mode,
        order,
        offset,
        limit,
    }
}

#[test]
fn a_database_of_the_original_tool_answers_every_query() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("original.db");
    write_original(&path);
    let conn = schema::open_read_only(&path).unwrap();

    assert_eq!(queries::prompt_count(&conn).unwrap(), 4);
    assert_eq!(
        queries::prompt(&conn, 2).unwrap().unwrap().token_ids,
        vec![8, 9]
    );
    assert_eq!(queries::prompt(&conn, 99).unwrap(), None);
    let page = queries::list_prompts(&conn, 0, 3).unwrap();
    assert_eq!(page.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    let page = queries::list_prompts(&conn, 3, 3).unwrap();
    assert_eq!(page.iter().map(|p| p.id).collect::<Vec<_>>(), vec![4]);
    assert_eq!(
        queries::prompt_activations(&conn, 1).unwrap(),
        vec![
            act("wte:0", 1.0, &[0, 1, 2]),
            act("h.0.mlp.c_fc:3", 0.9, &[1, 2]),
            act("output:7", 0.2, &[0])
        ]
    );

    // All: prompts 1 and 3; score = the weaker of the two, best first.
    let r = queries::search_prompts(
        &conn,
        &search(
            &["output:7", "h.0.mlp.c_fc:3"],
            Match::All,
            Order::ScoreDesc,
            0,
            10,
        ),
    )
    .unwrap();
    assert_eq!(r.total, 2);
    let ids: Vec<_> = r.hits.iter().map(|h| (h.prompt_id, h.score)).collect();
    assert_eq!(ids, vec![(3, 0.6), (1, 0.2)]);
    assert_eq!(r.hits[0].token_ids, vec![1, 2, 3, 4]);
    assert_eq!(
        r.hits[0].matches,
        vec![
            act("output:7", 0.6, &[1, 2]),
            act("h.0.mlp.c_fc:3", 0.7, &[3])
        ]
    );
    // Any: all four; score = the stronger; paged.
    let any = |offset, limit, order| {
        queries::search_prompts(
            &conn,
            &search(
                &["h.0.mlp.c_fc:3", "output:7"],
                Match::Any,
                order,
                offset,
                limit,
            ),
        )
        .unwrap()
    };
    let r = any(0, 10, Order::ScoreDesc);
    assert_eq!(r.total, 4);
    let ids: Vec<_> = r.hits.iter().map(|h| (h.prompt_id, h.score)).collect();
    assert_eq!(ids, vec![(1, 0.9), (3, 0.7), (2, 0.4), (4, 0.05)]);
    assert_eq!(r.hits[2].matches, vec![act("h.0.mlp.c_fc:3", 0.4, &[0])]);
    let r = any(1, 2, Order::PromptId);
    assert_eq!(
        (
            r.total,
            r.hits.iter().map(|h| h.prompt_id).collect::<Vec<_>>()
        ),
        (4, vec![2, 3])
    );
    let r = queries::search_prompts(
        &conn,
        &search(&["nope:1"], Match::All, Order::ScoreDesc, 0, 5),
    )
    .unwrap();
    assert_eq!((r.total, r.hits.len()), (0, 0));
    assert!(
        queries::search_prompts(&conn, &search(&[], Match::Any, Order::PromptId, 0, 5)).is_err()
    );

    let s = queries::component_stats(&conn, "output:7").unwrap();
    assert_eq!(s.n_prompts, 3);
    assert!((s.mean_max_ci - 0.85 / 3.0).abs() < 1e-7 && (s.max_max_ci - 0.6).abs() < 1e-7);
    assert_eq!(
        queries::component_stats(&conn, "nope:0").unwrap().n_prompts,
        0
    );
    assert_eq!(
        queries::component_keys(&conn).unwrap(),
        vec!["h.0.mlp.c_fc:3", "output:7", "wte:0"]
    );
    assert_eq!(
        queries::model_path(&conn).unwrap().as_deref(),
        Some("wandb:goodfire/spd/runs/abc123")
    );
    assert_eq!(queries::n_blocks(&conn).unwrap(), Some(4));
    assert_eq!(
        queries::meta(&conn, "activation_contexts")
            .unwrap()
            .unwrap()["h.0.mlp.c_fc"][0]["mean_ci"],
        json!(0.12)
    );
    assert_eq!(queries::generation(&conn).unwrap(), None);
    assert_eq!(
        queries::component_contexts(&conn, "h.0.mlp.c_fc:3").unwrap(),
        None
    );
}

#[test]
fn a_generated_database_reads_as_the_original_tool_expects() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = write_tokenizer(d);
    write_text_lines(&d.join("c.txt"), &documents(40, 4));
    let db = d.join("gen.db");
    generate::run(&config(
        &fixture_dir("tiny_shared"),
        &db,
        corpus_input(&d.join("c.txt"), &tok),
    ))
    .unwrap();
    let conn = Connection::open(&db).unwrap();

    let columns = |table: &str| -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("PRAGMA table_info({table})"))
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(columns("meta"), vec!["key", "value"]);
    assert_eq!(columns("prompts"), vec!["id", "token_ids"]);
    assert_eq!(
        columns("component_activations"),
        vec!["prompt_id", "component_key", "max_ci", "positions"]
    );
    let index_columns = |index: &str| -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("PRAGMA index_info({index})"))
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(2))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(index_columns("idx_component_key")[0], "component_key");
    assert_eq!(index_columns("idx_prompt_id"), vec!["prompt_id"]);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    // The original's queries, verbatim.
    let keys = ["h.0.attn.q_proj:1", "output:5"];
    let all: Vec<i64> = conn
        .prepare(
            "SELECT prompt_id FROM component_activations WHERE component_key IN (?,?) \
             GROUP BY prompt_id HAVING COUNT(DISTINCT component_key) = ?",
        )
        .unwrap()
        .query_map(rusqlite::params![keys[0], keys[1], 2], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ours = queries::search_prompts(
        &conn,
        &search(&keys, Match::All, Order::PromptId, 0, usize::MAX),
    )
    .unwrap();
    assert_eq!(
        ours.hits.iter().map(|h| h.prompt_id).collect::<Vec<_>>(),
        all
    );
    let (token_ids,): (String,) = conn
        .query_row("SELECT id, token_ids FROM prompts WHERE id = ?", [1], |r| {
            Ok((r.get(1)?,))
        })
        .unwrap();
    let ids: Vec<u32> = serde_json::from_str(&token_ids).unwrap();
    assert_eq!(ids.len(), 16);
    assert!(token_ids.starts_with('[') && token_ids.contains(", "));

    let meta = |key: &str| -> Value {
        let blob: Vec<u8> = conn
            .query_row("SELECT value FROM meta WHERE key = ?", [key], |r| r.get(0))
            .unwrap();
        serde_json::from_reader(flate2::read::GzDecoder::new(&blob[..])).unwrap()
    };
    assert!(
        meta("wandb_path")["path"]
            .as_str()
            .unwrap()
            .ends_with("tiny_shared")
    );
    assert_eq!(meta("n_blocks"), json!({"n_blocks": 2}));
    let contexts = meta("activation_contexts");
    let layer = contexts["h.1.mlp.c_fc"].as_array().unwrap();
    assert!(!layer.is_empty());
    for field in [
        "subcomponent_idx",
        "mean_ci",
        "example_tokens",
        "example_ci",
        "example_active_pos",
        "example_active_ci",
        "pr_tokens",
        "pr_recalls",
        "pr_precisions",
    ] {
        assert!(layer[0].get(field).is_some(), "{field}");
    }
    let tokens = layer[0]["example_tokens"][0].as_array().unwrap();
    assert!(tokens[0].as_str().unwrap().starts_with('w') || tokens[0] == "[EOS]");
    let means: Vec<f64> = layer
        .iter()
        .map(|c| c["mean_ci"].as_f64().unwrap())
        .collect();
    assert!(means.windows(2).all(|w| w[0] >= w[1]), "sorted by mean CI");

    // Our own view of the same contexts.
    let c = queries::component_contexts(&conn, "h.1.mlp.c_fc:3")
        .unwrap()
        .unwrap();
    assert_eq!(c.n_tokens, 16 * queries::prompt_count(&conn).unwrap());
    assert!(c.examples.len() <= 10 && c.density <= 1.0 && c.mean_ci >= 0.0);
    for e in &c.examples {
        assert!(e.tokens.len() <= 11 && e.ci.len() == e.tokens.len());
        let p = queries::prompt(&conn, e.window as i64 + 1)
            .unwrap()
            .unwrap();
        let start = e.position as usize - e.active as usize;
        assert_eq!(p.token_ids[start..start + e.tokens.len()], e.tokens[..]);
    }
    let examples: Vec<f32> = c.examples.iter().map(|e| e.active_ci()).collect();
    assert!(examples.windows(2).all(|w| w[0] >= w[1]));
}

/// Searches and stats (posting-list chunks of two runs, then none) equal a brute-force scan of the rows.
#[test]
fn searches_agree_with_a_brute_force_scan() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = write_tokenizer(d);
    write_text_lines(&d.join("c.txt"), &documents(60, 5));
    let db = d.join("gen.db");
    let mut cfg = config(
        &fixture_dir("tiny_vector"),
        &db,
        corpus_input(&d.join("c.txt"), &tok),
    );
    cfg.thresholds.ci = 0.2;
    cfg.n_prompts = Some(12);
    generate::run(&cfg).unwrap();
    cfg.n_prompts = Some(40);
    generate::run(&cfg).unwrap();

    let rows = dump(&db).rows;
    let mut by_key: BTreeMap<String, BTreeMap<i64, f32>> = BTreeMap::new();
    for (id, key, max, _) in &rows {
        by_key
            .entry(key.clone())
            .or_default()
            .insert(*id, *max as f32);
    }
    let keys: Vec<&String> = by_key.keys().collect();
    let sets: Vec<Vec<&str>> = (0..keys.len().min(40))
        .step_by(3)
        .map(|i| {
            vec![
                keys[i].as_str(),
                keys[(i * 7 + 1) % keys.len()].as_str(),
                "output:3",
            ]
        })
        .collect();
    let check = |conn: &Connection| {
        for set in &sets {
            for mode in [Match::All, Match::Any] {
                let mut want: BTreeMap<i64, f32> = BTreeMap::new();
                let lists: Vec<BTreeMap<i64, f32>> = set
                    .iter()
                    .map(|k| by_key.get(*k).cloned().unwrap_or_default())
                    .collect();
                for list in &lists {
                    for (&id, &ci) in list {
                        let in_all = lists.iter().all(|l| l.contains_key(&id));
                        if mode == Match::Any || in_all {
                            let e = want.entry(id).or_insert(ci);
                            *e = if mode == Match::Any {
                                e.max(ci)
                            } else {
                                e.min(ci)
                            };
                        }
                    }
                }
                let mut best: Vec<(i64, f32)> = want.clone().into_iter().collect();
                best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                for (order, expected) in [
                    (
                        Order::PromptId,
                        want.clone().into_iter().collect::<Vec<_>>(),
                    ),
                    (Order::ScoreDesc, best),
                ] {
                    let got =
                        queries::search_prompts(conn, &search(set, mode, order, 0, 1000)).unwrap();
                    let got: Vec<(i64, f32)> =
                        got.hits.iter().map(|h| (h.prompt_id, h.score)).collect();
                    assert_eq!(got, expected, "{set:?} {mode:?} {order:?}");
                    let page =
                        queries::search_prompts(conn, &search(set, mode, order, 2, 3)).unwrap();
                    assert_eq!(page.total, expected.len());
                    let page: Vec<(i64, f32)> =
                        page.hits.iter().map(|h| (h.prompt_id, h.score)).collect();
                    assert_eq!(
                        page,
                        expected.iter().skip(2).take(3).copied().collect::<Vec<_>>()
                    );
                }
            }
        }
        for key in keys.iter().take(50) {
            let s = queries::component_stats(conn, key).unwrap();
            let list = &by_key[*key];
            assert_eq!(s.n_prompts as usize, list.len());
            let mean = list.values().map(|&x| x as f64).sum::<f64>() / list.len() as f64;
            assert!((s.mean_max_ci - mean).abs() < 1e-9);
        }
    };
    let conn = Connection::open(&db).unwrap();
    let chunks: i64 = conn
        .query_row(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM postings GROUP BY component_key)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(chunks, 2, "one chunk per key and run");
    check(&conn);
    // Without chunks (a killed run, or the original tool's database) the rows answer alone.
    conn.execute("DELETE FROM postings_state", []).unwrap();
    conn.execute("DELETE FROM postings", []).unwrap();
    check(&conn);
}
