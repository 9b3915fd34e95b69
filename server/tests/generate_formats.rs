//! `generate` on a fixture model over the same small corpus in every input format: plain text (lines
//! and blank-line paragraphs), JSONL, Parquet, a directory of files, and the tokens file of the
//! resulting prompts. All give the same prompts and index; errors name the file and what to change.

mod generate_support;

use std::path::{Path, PathBuf};

use generate_support::*;
use server::generate::{self, GenerateError, Input};
use server::store::{queries, schema};

const MODEL: &str = "tiny_vector";
const N_CTX: usize = 16;

/// Prompts, rows and activation contexts: what must not depend on the input format.
fn content(path: &Path) -> (Dump, serde_json::Value) {
    let mut d = dump(path);
    let contexts = d.meta.remove("activation_contexts").unwrap();
    d.meta.clear();
    d.generation = None;
    (d, contexts)
}

fn run(dir: &Path, name: &str, input: Input) -> PathBuf {
    let db = dir.join(format!("{name}.db"));
    generate::run(&config(&fixture_dir(MODEL), &db, input)).unwrap();
    db
}

#[test]
fn every_input_format_gives_the_same_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = write_tokenizer(d);
    let docs = documents(60, 1);
    write_text_lines(&d.join("lines.txt"), &docs);
    write_text_paragraphs(&d.join("paragraphs.txt"), &docs);
    write_jsonl(&d.join("docs.jsonl"), &docs, "story");
    write_parquet(&d.join("docs.parquet"), &docs, "story");
    std::fs::create_dir(d.join("parts")).unwrap();
    write_parquet(&d.join("parts/train-0.parquet"), &docs[..25], "story");
    write_parquet(&d.join("parts/train-1.parquet"), &docs[25..], "story");
    std::fs::write(d.join("parts/README.md"), "not a corpus file").unwrap();

    let base = run(d, "lines", corpus_input(&d.join("lines.txt"), &tok));
    let (want, want_ctx) = content(&base);
    let n_tokens: usize = docs.iter().map(|s| s.split(' ').count()).sum::<usize>() + docs.len() - 1;
    assert_eq!(
        want.prompts.len(),
        n_tokens / N_CTX,
        "every full window, no partial one"
    );
    let conn = schema::open_read_only(&base).unwrap();
    let prompts = queries::list_prompts(&conn, 0, 1000).unwrap();
    assert!(prompts.iter().all(|p| p.token_ids.len() == N_CTX));
    let eos = prompts
        .iter()
        .flat_map(|p| &p.token_ids)
        .filter(|&&t| t == 0)
        .count();
    assert!(
        eos > 0 && eos < docs.len(),
        "documents joined with EOS ({eos})"
    );
    assert!(
        want_ctx["h.0.attn.q_proj"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "activation contexts for the first module"
    );

    for (name, path) in [
        ("paragraphs", d.join("paragraphs.txt")),
        ("jsonl", d.join("docs.jsonl")),
        ("parquet", d.join("docs.parquet")),
        ("directory", d.join("parts")),
    ] {
        let db = run(d, name, corpus_input(&path, &tok));
        let (got, ctx) = content(&db);
        assert_eq!(got, want, "{name}");
        assert_eq!(ctx, want_ctx, "{name}");
    }

    // The same prompts as a tokens file (JSON lines) give the same rows.
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::to_string(&p.token_ids).unwrap())
        .collect();
    std::fs::write(d.join("tokens.jsonl"), lines.join("\n")).unwrap();
    let db = run(
        d,
        "tokens",
        Input::TokensFile {
            path: d.join("tokens.jsonl"),
            tokenizer: Some(tok.clone()),
        },
    );
    let (got, _) = content(&db);
    assert_eq!(got.prompts, want.prompts);
    assert_eq!(got.rows, want.rows);
}

#[test]
fn another_seed_orders_documents_differently() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = write_tokenizer(d);
    write_text_lines(&d.join("c.txt"), &documents(60, 1));
    let a = run(d, "a", corpus_input(&d.join("c.txt"), &tok));
    let mut input = corpus_input(&d.join("c.txt"), &tok);
    if let Input::Corpus { seed, .. } = &mut input {
        *seed = 7;
    }
    let b = run(d, "b", input);
    let (a, b) = (dump(&a), dump(&b));
    assert_eq!(a.prompts.len(), b.prompts.len());
    assert_ne!(a.prompts, b.prompts);
}

fn error(input: Input, dir: &Path) -> String {
    let db = dir.join("err.db");
    let e = generate::run(&config(&fixture_dir(MODEL), &db, input)).unwrap_err();
    e.to_string()
}

#[test]
fn input_errors_say_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = write_tokenizer(d);
    let docs = documents(5, 2);

    write_jsonl(&d.join("t.jsonl"), &docs, "text");
    let msg = error(corpus_input(&d.join("t.jsonl"), &tok), d);
    assert!(
        msg.contains("t.jsonl:1") && msg.contains("no key `story`") && msg.contains("--column"),
        "{msg}"
    );

    write_parquet(&d.join("t.parquet"), &docs, "text");
    let msg = error(corpus_input(&d.join("t.parquet"), &tok), d);
    assert!(msg.contains("columns: id, text"), "{msg}");

    let msg = error(
        Input::Corpus {
            path: d.join("t.jsonl"),
            column: Some("text".into()),
            tokenizer: None,
            eos_token: None,
            n_ctx: N_CTX,
            seed: 0,
        },
        d,
    );
    assert!(msg.contains("--tokenizer"), "{msg}");

    let mut input = corpus_input(&d.join("t.jsonl"), &tok);
    if let Input::Corpus { n_ctx, .. } = &mut input {
        *n_ctx = 65;
    }
    assert!(error(input, d).contains("--n-ctx 65"));

    std::fs::write(d.join("bad.json"), "[[1, 2, 500]]").unwrap();
    let msg = error(
        Input::TokensFile {
            path: d.join("bad.json"),
            tokenizer: None,
        },
        d,
    );
    assert!(msg.contains("prompt 0") && msg.contains("500"), "{msg}");

    std::fs::write(d.join("bad.jsonl"), "[1, 2]\n[3, x]\n").unwrap();
    let msg = error(
        Input::TokensFile {
            path: d.join("bad.jsonl"),
            tokenizer: None,
        },
        d,
    );
    assert!(msg.contains("bad.jsonl:2"), "{msg}");
    let e = generate::run(&config(
        &fixture_dir(MODEL),
        &d.join("x.db"),
        corpus_input(&d.join("missing.txt"), &tok),
    ))
    .unwrap_err();
    assert!(matches!(e, GenerateError::Corpus(_)), "{e}");
}
