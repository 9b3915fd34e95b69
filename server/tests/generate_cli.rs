//! The `generate` command line: documented flags, the original tool's snake_case spellings, `merge`,
//! and errors as one line with exit status 2.

mod generate_support;

use std::process::{Command, Output};

use generate_support::*;

fn generate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_documents_the_flags() {
    let out = generate(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--output",
        "--dataset",
        "--column",
        "--tokens-file",
        "--tokenizer",
        "--n-prompts",
        "--n-ctx",
        "--batch-size",
        "--ci-threshold",
        "--output-prob-threshold",
        "--seed",
        "--devices",
        "--workers",
        "--shard",
        "--force-new",
        "merge",
        "bench",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn original_spellings_shards_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts: Vec<Vec<u32>> = (0..9).map(|i| (i..i + 12).collect()).collect();
    let tokens = d.join("prompts.json");
    std::fs::write(&tokens, serde_json::to_string(&prompts).unwrap()).unwrap();
    let model = fixture_dir("tiny_mlp");
    let (model, tokens) = (model.to_str().unwrap(), tokens.to_str().unwrap());
    let db = |name: &str| d.join(name).to_str().unwrap().to_owned();

    let whole = db("whole.db");
    let out = generate(&[
        "--wandb_path",
        model,
        "--output_path",
        &whole,
        "--tokens_file",
        tokens,
        "--n_prompts",
        "9",
        "--ci_threshold",
        "0.1",
        "--output_prob_threshold",
        "0.05",
        "--batch_size",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut shards = vec![];
    for i in 0..2 {
        let path = db(&format!("s{i}.db"));
        let out = generate(&[
            "--model",
            model,
            "--output",
            &path,
            "--tokens-file",
            tokens,
            "--n-prompts",
            "9",
            "--ci-threshold",
            "0.1",
            "--output-prob-threshold",
            "0.05",
            "--batch-size",
            "2",
            "--shard",
            &format!("{i}/2"),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        shards.push(path);
    }
    let merged = db("merged.db");
    let out = generate(&["merge", &merged, &shards[1], &shards[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("9 prompts"), "{}", stderr(&out));
    let (a, b) = (
        dump(d.join("whole.db").as_path()),
        dump(d.join("merged.db").as_path()),
    );
    assert_eq!((a.prompts, a.rows), (b.prompts, b.rows));
}

#[test]
fn errors_are_one_line_with_status_2() {
    let out = generate(&[
        "--model",
        "/nonexistent",
        "--output",
        "/tmp/x.db",
        "--tokens-file",
        "/x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("/nonexistent"),
        "{err}"
    );
    let out = generate(&[
        "--model",
        "m",
        "--output",
        "o",
        "--dataset",
        "d",
        "--shard",
        "2/2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("0 <= i < N"), "{}", stderr(&out));
    // tf32 only means something for CUDA matmuls: refused before anything is read.
    let out = generate(&["--model", "m", "--output", "o", "--dataset", "d", "--tf32"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--tf32") && err.contains("cuda"), "{err}");
    assert!(!std::path::Path::new("o").exists());
}
