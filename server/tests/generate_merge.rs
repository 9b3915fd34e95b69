//! `--shard i/N` runs merged with `generate merge` equal one run over the same prompts: the same
//! prompts and ids, the same rows, activation-context sums and top-k examples; and the merged
//! database resumes like that run. Merges that would lose or duplicate prompts are refused.

mod generate_support;

use std::path::{Path, PathBuf};

use generate_support::*;
use server::generate::merge::merge;
use server::generate::{self, GenerateConfig, Shard};
use server::store::contexts::decode_examples;

const MODEL: &str = "tiny_vector";

fn base(dir: &Path, db: &Path) -> GenerateConfig {
    let tok = write_tokenizer(dir);
    let corpus = dir.join("corpus.txt");
    write_text_lines(&corpus, &documents(80, 9));
    let mut cfg = config(&fixture_dir(MODEL), db, corpus_input(&corpus, &tok));
    cfg.n_prompts = Some(50);
    cfg
}

fn shards(dir: &Path, cfg: &GenerateConfig, n: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let db = dir.join(format!("shard{i}.db"));
            let mut c = cfg.clone();
            c.output = db.clone();
            c.shard = Shard { index: i, count: n };
            generate::run(&c).unwrap();
            db
        })
        .collect()
}

/// Module sums are added in another order than in one run: equal to float rounding.
fn assert_same_contexts(a: &Dump, b: &Dump) {
    assert_eq!(a.context_modules.len(), b.context_modules.len());
    for ((ma, sa, fa), (mb, sb, fb)) in a.context_modules.iter().zip(&b.context_modules) {
        assert_eq!(ma, mb);
        assert_eq!(fa, fb, "{ma}: firing counts");
        for (x, y) in sa.chunks(8).zip(sb.chunks(8)) {
            let (x, y) = (
                f64::from_le_bytes(x.try_into().unwrap()),
                f64::from_le_bytes(y.try_into().unwrap()),
            );
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{ma}: {x} vs {y}");
        }
    }
    assert_eq!(a.context_examples.len(), b.context_examples.len());
    for ((ka, ea), (kb, eb)) in a.context_examples.iter().zip(&b.context_examples) {
        assert_eq!(ka, kb);
        assert_eq!(decode_examples(ea), decode_examples(eb), "{ka}");
    }
}

#[test]
fn merged_shards_equal_a_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let single = d.join("single.db");
    let cfg = base(d, &single);
    generate::run(&cfg).unwrap();
    let parts = shards(d, &cfg, 3);
    let merged = d.join("merged.db");
    // Argument order does not matter.
    let summary = merge(
        &merged,
        &[parts[2].clone(), parts[0].clone(), parts[1].clone()],
        false,
    )
    .unwrap();
    assert_eq!(summary.prompts, 50);

    let (a, b) = (dump(&single), dump(&merged));
    assert_eq!(a.prompts, b.prompts);
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.generation, b.generation);
    assert_eq!(a.meta["wandb_path"], b.meta["wandb_path"]);
    assert_eq!(a.meta["n_blocks"], b.meta["n_blocks"]);
    assert_same_contexts(&a, &b);

    // The merged database resumes as the single run does.
    let mut more = cfg.clone();
    more.n_prompts = Some(70);
    more.output = single.clone();
    generate::run(&more).unwrap();
    more.output = merged.clone();
    let s = generate::run(&more).unwrap();
    assert_eq!((s.prompts_written, s.prompts_done), (20, 70));
    let (a, b) = (dump(&single), dump(&merged));
    assert_eq!((a.prompts, a.rows), (b.prompts, b.rows));
}

#[test]
fn merges_that_lose_or_duplicate_prompts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = base(d, &d.join("unused.db"));
    let parts = shards(d, &cfg, 3);
    let out = d.join("out.db");

    let msg = merge(&out, &parts[..2], false).unwrap_err().to_string();
    assert!(msg.contains("shard 2/3 is missing"), "{msg}");

    let msg = merge(&out, &[parts[0].clone(), parts[0].clone()], false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("both shard 0/3"), "{msg}");

    // An unfinished shard.
    let mut short = cfg.clone();
    short.n_prompts = Some(20);
    short.shard = Shard { index: 1, count: 3 };
    short.output = d.join("short.db");
    generate::run(&short).unwrap();
    let msg = merge(
        &out,
        &[parts[0].clone(), d.join("short.db"), parts[2].clone()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("rerun unfinished shards"), "{msg}");

    // Shards of different runs.
    let mut other = cfg.clone();
    other.thresholds.ci = 0.5;
    other.shard = Shard { index: 1, count: 3 };
    other.output = d.join("other.db");
    generate::run(&other).unwrap();
    let msg = merge(
        &out,
        &[parts[0].clone(), d.join("other.db"), parts[2].clone()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("not shards of one run") && msg.contains("thresholds.ci"),
        "{msg}"
    );

    // A shard killed after its last batch, before its contexts were saved.
    let stale = d.join("stale.db");
    std::fs::copy(&parts[1], &stale).unwrap();
    rusqlite::Connection::open(&stale)
        .unwrap()
        .execute("UPDATE context_state SET prompts = prompts - 1", [])
        .unwrap();
    let msg = merge(&out, &[parts[0].clone(), stale, parts[2].clone()], false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("before saving the activation contexts"),
        "{msg}"
    );

    merge(&out, &parts, false).unwrap();
    let msg = merge(&out, &parts, false).unwrap_err().to_string();
    assert!(msg.contains("--force"), "{msg}");
    merge(&out, &parts, true).unwrap();
}
