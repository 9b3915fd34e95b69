//! Resuming: a run killed at any moment (an abort in the middle of a batch's transaction, or `kill -9`
//! from outside) leaves a database that opens and holds whole batches only; rerunning the command
//! continues it to the database of an uninterrupted run. Worker counts do not change the result, and
//! a database of another run is refused unless `--force-new`.

mod generate_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use generate_support::*;
use server::generate::{self, GenerateError};
use server::store::{queries, schema};

const MODEL: &str = "tiny_shared";
const BATCH: usize = 4;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    corpus: PathBuf,
    tokenizer: PathBuf,
}

fn setup(n_docs: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let tokenizer = write_tokenizer(&d);
    let corpus = d.join("corpus.jsonl");
    write_jsonl(&corpus, &documents(n_docs, 3), "story");
    Setup {
        _dir: dir,
        dir: d,
        corpus,
        tokenizer,
    }
}

/// The `generate` command of this run, as a researcher would type it.
fn command(s: &Setup, db: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_generate"));
    c.arg("--model")
        .arg(fixture_dir(MODEL))
        .arg("--output")
        .arg(db)
        .arg("--dataset")
        .arg(&s.corpus)
        .args(["--column", "story", "--n-ctx", "16"])
        .arg("--batch-size")
        .arg(BATCH.to_string())
        .arg("--tokenizer")
        .arg(&s.tokenizer)
        .arg("--no-progress-bar");
    c
}

fn run_to_end(s: &Setup, db: &Path) {
    let out = command(s, db).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A killed run's database: opens, answers queries, and holds whole batches only.
fn check_interrupted(db: &Path) -> i64 {
    let d = dump(db);
    let n = d.prompts.len();
    assert_eq!(n % BATCH, 0, "{n} prompts: not whole batches");
    let (_, done, _, complete) = d.generation.clone().unwrap();
    assert_eq!(done as usize, n);
    assert!(!complete);
    assert!(d.rows.iter().all(|r| r.0 as usize <= n));
    if n > 0 {
        let conn = schema::open_read_only(db).unwrap();
        assert_eq!(queries::prompt_count(&conn).unwrap(), n as u64);
        assert!(
            !queries::prompt_activations(&conn, n as i64)
                .unwrap()
                .is_empty()
        );
        let every = queries::Search {
            keys: vec!["wte:0".into()],
            mode: queries::Match::Any,
            order: queries::Order::ScoreDesc,
            offset: 0,
            limit: 3,
        };
        assert_eq!(queries::search_prompts(&conn, &every).unwrap().total, n);
    }
    n as i64
}

#[test]
fn abort_inside_a_batch_then_resume_equals_an_uninterrupted_run() {
    let s = setup(40);
    let whole = s.dir.join("whole.db");
    run_to_end(&s, &whole);

    // Contexts saved with every batch, or (the default, 60 s) never before the kill: then the resumed
    // run computes the written prompts again for them.
    for (secs, contexts_saved) in [("0", 3 * BATCH as i64), ("60", 0)] {
        let db = s.dir.join(format!("resumed-{secs}.db"));
        let out = command(&s, &db)
            .args(["--context-checkpoint-secs", secs])
            .env("SPD_GENERATE_ABORT_IN_BATCH", "3")
            .output()
            .unwrap();
        assert!(!out.status.success(), "the hook should abort the process");
        assert_eq!(check_interrupted(&db), 3 * BATCH as i64);
        assert_eq!(dump(&db).context_state.map_or(0, |s| s.0), contexts_saved);

        run_to_end(&s, &db);
        assert_eq!(dump(&db), dump(&whole), "checkpoints every {secs} s");
    }
    let db = s.dir.join("resumed-0.db");
    // A finished run has nothing left to do.
    let out = command(&s, &db).output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("0 written now"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dump(&db), dump(&whole));
}

#[test]
fn kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run() {
    let s = setup(1500);
    let whole = s.dir.join("whole.db");
    run_to_end(&s, &whole);
    let total = dump(&whole).prompts.len();

    // Kill at a few moments: as soon as something is written, and later on.
    let db = s.dir.join("killed.db");
    for wait_for in [1, 12 * BATCH as i64, 60 * BATCH as i64] {
        let mut child = command(&s, &db).spawn().unwrap();
        let start = Instant::now();
        loop {
            let n = schema::open_read_only(&db)
                .ok()
                .and_then(|c| queries::prompt_count(&c).ok())
                .unwrap_or(0) as i64;
            if n >= wait_for
                || child.try_wait().unwrap().is_some()
                || start.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = check_interrupted(&db) as usize;
        assert!(n < total, "the run finished before it was killed");
    }
    run_to_end(&s, &db);
    assert_eq!(dump(&db), dump(&whole));
}

#[test]
fn workers_do_not_change_the_database() {
    let s = setup(40);
    let input = corpus_input(&s.corpus, &s.tokenizer);
    let one = s.dir.join("one.db");
    generate::run(&config(&fixture_dir(MODEL), &one, input.clone())).unwrap();
    let three = s.dir.join("three.db");
    let mut cfg = config(&fixture_dir(MODEL), &three, input);
    cfg.workers = Some(3);
    cfg.devices = vec!["cpu".into(), "cpu".into()];
    generate::run(&cfg).unwrap();
    assert_eq!(dump(&one), dump(&three));
}

#[test]
fn growing_n_prompts_continues_the_run() {
    let s = setup(40);
    let input = corpus_input(&s.corpus, &s.tokenizer);
    let direct = s.dir.join("direct.db");
    let mut cfg = config(&fixture_dir(MODEL), &direct, input.clone());
    cfg.n_prompts = Some(20);
    generate::run(&cfg).unwrap();

    let grown = s.dir.join("grown.db");
    let mut cfg = config(&fixture_dir(MODEL), &grown, input);
    cfg.n_prompts = Some(8);
    let first = generate::run(&cfg).unwrap();
    assert_eq!((first.prompts_done, first.complete), (8, true));
    cfg.n_prompts = Some(20);
    let second = generate::run(&cfg).unwrap();
    assert_eq!((second.prompts_written, second.prompts_done), (12, 20));
    assert_eq!(dump(&grown), dump(&direct));
}

#[test]
fn another_run_is_refused_unless_force_new() {
    let s = setup(20);
    let db = s.dir.join("db.db");
    let input = corpus_input(&s.corpus, &s.tokenizer);
    let cfg = config(&fixture_dir(MODEL), &db, input.clone());
    generate::run(&cfg).unwrap();

    let mut other = cfg.clone();
    other.thresholds.ci = 0.1;
    let e = generate::run(&other).unwrap_err();
    assert!(matches!(e, GenerateError::Usage(_)));
    let msg = e.to_string();
    assert!(
        msg.contains("thresholds.ci") && msg.contains("--force-new"),
        "{msg}"
    );

    let mut other_model = cfg.clone();
    other_model.model = fixture_dir("tiny_mlp");
    let msg = generate::run(&other_model).unwrap_err().to_string();
    assert!(msg.contains("model.sha256"), "{msg}");

    other.force_new = true;
    generate::run(&other).unwrap();
    let (identity, ..) = dump(&db).generation.unwrap();
    assert!((identity["thresholds"]["ci"].as_f64().unwrap() - 0.1).abs() < 1e-6);

    // A database of prompts that generate did not write.
    let foreign = s.dir.join("foreign.db");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    conn.execute_batch(server::store::schema::ORIGINAL_SCHEMA)
        .unwrap();
    conn.execute("INSERT INTO prompts (token_ids) VALUES ('[1, 2]')", [])
        .unwrap();
    drop(conn);
    let msg = generate::run(&config(&fixture_dir(MODEL), &foreign, input))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("1 prompts not written by") && msg.contains("--force-new"),
        "{msg}"
    );
}

#[test]
fn a_grown_run_killed_midway_is_not_complete() {
    let s = setup(40);
    let db = s.dir.join("db.db");
    let out = command(&s, &db)
        .args(["--n-prompts", "8"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (_, done, _, complete) = dump(&db).generation.unwrap();
    assert_eq!((done, complete), (8, true));
    let out = command(&s, &db)
        .args(["--n-prompts", "40"])
        .env("SPD_GENERATE_ABORT_IN_BATCH", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (_, done, _, complete) = dump(&db).generation.unwrap();
    assert_eq!((done, complete), (12, false));
}
