//! Helpers of the `generate_*` tests: a word-level tokenizer over the fixtures' 96-token vocabulary,
//! a small corpus in every format, default configs, and whole-database dumps to compare runs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::Value;
use server::attribution::Thresholds;
use server::generate::contexts::ContextParams;
use server::generate::{GenerateConfig, Input, Progress, Shard};
use server::store::{meta, schema};

#[path = "../common/mod.rs"]
pub mod common;
pub use common::fixture_dir;

/// Words `w2` … `w95`: ids 2 … 95 of the test tokenizer (0 is `[EOS]`, 1 `[UNK]`).
pub fn words() -> Vec<String> {
    (2..96).map(|i| format!("w{i}")).collect()
}

/// Writes the test tokenizer to `dir/tokenizer.json`.
pub fn write_tokenizer(dir: &Path) -> PathBuf {
    let path = dir.join("tokenizer.json");
    std::fs::write(
        &path,
        server::generate::synthetic::word_level_tokenizer(&words()),
    )
    .unwrap();
    path
}

/// `n` documents of 3–30 random words.
pub fn documents(n: usize, seed: u64) -> Vec<String> {
    server::generate::synthetic::random_documents(&words(), n, 28, seed)
}

/// One document per line.
pub fn write_text_lines(path: &Path, docs: &[String]) {
    std::fs::write(path, docs.join("\n") + "\n").unwrap();
}

/// Blank-line separated documents, each broken over two lines.
pub fn write_text_paragraphs(path: &Path, docs: &[String]) {
    let paras: Vec<String> = docs
        .iter()
        .map(|d| {
            let words: Vec<&str> = d.split(' ').collect();
            let mid = words.len() / 2;
            format!("{}\n{}", words[..mid].join(" "), words[mid..].join(" "))
        })
        .collect();
    std::fs::write(path, paras.join("\n\n") + "\n").unwrap();
}

pub fn write_jsonl(path: &Path, docs: &[String], column: &str) {
    let lines: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| serde_json::json!({"id": i, column: d}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// A Parquet file with a text column and an integer column, in two row groups.
pub fn write_parquet(path: &Path, docs: &[String], column: &str) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = Arc::new(
        parse_message_type(&format!(
            "message schema {{ REQUIRED INT64 id; REQUIRED BYTE_ARRAY {column} (UTF8); }}"
        ))
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let half = docs.len() / 2;
    for (start, part) in [(0, &docs[..half]), (half, &docs[half..])] {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ids: Vec<i64> = (start..start + part.len()).map(|i| i as i64).collect();
        col.typed::<Int64Type>()
            .write_batch(&ids, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = part.iter().map(|d| ByteArray::from(d.as_str())).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// A config for `model` over `input` with small batches and quiet progress.
pub fn config(model: &Path, output: &Path, input: Input) -> GenerateConfig {
    GenerateConfig {
        model: model.to_owned(),
        output: output.to_owned(),
        input,
        n_prompts: None,
        batch_size: Some(4),
        thresholds: Thresholds {
            ci: 1e-6,
            output_prob: 0.01,
        },
        contexts: ContextParams::default(),
        devices: vec!["cpu".into()],
        workers: None,
        tf32: false,
        unfused: false,
        shard: Shard::default(),
        force_new: false,
        n_blocks: None,
        progress: Progress::Quiet,
        context_checkpoint: server::generate::pipeline::DEFAULT_CONTEXT_CHECKPOINT,
        abort_in_batch: None,
    }
}

pub fn corpus_input(path: &Path, tokenizer: &Path) -> Input {
    Input::Corpus {
        path: path.to_owned(),
        column: Some("story".into()),
        tokenizer: Some(tokenizer.to_owned()),
        eos_token: None,
        n_ctx: 16,
        seed: 42,
    }
}

/// Everything a database holds, in a comparable form.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    /// `(id, token_ids)`
    pub prompts: Vec<(i64, String)>,
    /// `(prompt_id, key, max_ci, positions)` by prompt, then in written order.
    pub rows: Vec<(i64, String, f64, String)>,
    pub meta: BTreeMap<String, Value>,
    /// `(config, prompts_done, tokens_done, complete)`
    pub generation: Option<(Value, i64, i64, bool)>,
    pub context_modules: Vec<(String, Vec<u8>, Vec<u8>)>,
    pub context_examples: Vec<(String, Vec<u8>)>,
    /// `(prompts, tokens)` the activation contexts cover.
    pub context_state: Option<(i64, i64)>,
}

pub fn dump(path: &Path) -> Dump {
    let conn = schema::open_read_only(path).unwrap();
    dump_conn(&conn)
}

pub fn dump_conn(conn: &Connection) -> Dump {
    let all = |sql: &str| -> Vec<Vec<rusqlite::types::Value>> {
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                .collect()
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    use rusqlite::types::Value as V;
    let int = |v: &V| match v {
        V::Integer(i) => *i,
        other => panic!("not an integer: {other:?}"),
    };
    let text = |v: &V| match v {
        V::Text(s) => s.clone(),
        other => panic!("not text: {other:?}"),
    };
    let blob = |v: &V| match v {
        V::Blob(b) => b.clone(),
        other => panic!("not a blob: {other:?}"),
    };
    let real = |v: &V| match v {
        V::Real(x) => *x,
        other => panic!("not a real: {other:?}"),
    };
    let meta = all("SELECT key FROM meta ORDER BY key")
        .iter()
        .map(|r| {
            let k = text(&r[0]);
            let v = meta::get(conn, &k).unwrap().unwrap();
            (k, v)
        })
        .collect();
    let has = |t: &str| schema::has_table(conn, t).unwrap();
    Dump {
        prompts: all("SELECT id, token_ids FROM prompts ORDER BY id")
            .iter()
            .map(|r| (int(&r[0]), text(&r[1])))
            .collect(),
        rows: all(
            "SELECT prompt_id, component_key, max_ci, positions FROM component_activations \
             ORDER BY prompt_id, rowid",
        )
        .iter()
        .map(|r| (int(&r[0]), text(&r[1]), real(&r[2]), text(&r[3])))
        .collect(),
        meta,
        generation: if has("generation") {
            all("SELECT config, prompts_done, tokens_done, complete FROM generation")
                .first()
                .map(|r| {
                    (
                        serde_json::from_str(&text(&r[0])).unwrap(),
                        int(&r[1]),
                        int(&r[2]),
                        int(&r[3]) != 0,
                    )
                })
        } else {
            None
        },
        context_modules: if has("context_modules") {
            all("SELECT module, sum_ci, n_firing FROM context_modules ORDER BY module")
                .iter()
                .map(|r| (text(&r[0]), blob(&r[1]), blob(&r[2])))
                .collect()
        } else {
            vec![]
        },
        context_state: if has("context_state") {
            all("SELECT prompts, tokens FROM context_state")
                .first()
                .map(|r| (int(&r[0]), int(&r[1])))
        } else {
            None
        },
        context_examples: if has("context_examples") {
            all("SELECT component_key, examples FROM context_examples ORDER BY component_key")
                .iter()
                .map(|r| (text(&r[0]), blob(&r[1])))
                .collect()
        } else {
            vec![]
        },
    }
}
