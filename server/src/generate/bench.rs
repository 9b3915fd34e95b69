//! `generate bench`: tokens/s of the CI pass alone and of the whole pipeline (tokenize → CI → extract
//! → write) on the random SimpleStories-shaped model of the engine's bench
//! ([`SyntheticSpec::simple_stories_1m`]), and the latency of 3-component
//! all/any searches on a synthetic database built with the store's own writer. Not a test: it prints a
//! table to compare against the goals (pipeline within 10% of the CI pass; search under 50 ms).

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use crate::attribution::Thresholds;
use crate::model::SpdModel;
use crate::store::{queries, schema, writer};

use super::GenerateError;
use super::contexts::{ContextParams, Contexts};
use super::corpus::{self, Window};
use super::entries::{CiThresholds, reference_entries, reference_output_entries};
use super::extract::{self, EntryBatch};
use super::pipeline::{self, GenerateConfig, Input, Progress, Shard};
use super::synthetic;
use crate::model::synthetic::{Rng, SyntheticSpec, synthetic_model};

type Result<T> = std::result::Result<T, GenerateError>;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Prompts in each throughput run.
    #[arg(long, default_value_t = 128)]
    pub prompts: u64,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub n_ctx: usize,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute workers of the pipeline runs, all on --device [default: one]. On a GPU several
    /// overlap one batch's host-side extraction with the next one's CI pass.
    #[arg(long)]
    pub workers: Option<usize>,
    /// The index's CI threshold (fewer rows per prompt when higher).
    #[arg(long, default_value_t = 1e-6)]
    pub ci_threshold: f32,
    /// Prompts in the synthetic search database (0 skips the search benchmark).
    #[arg(long, default_value_t = 1_000_000)]
    pub db_prompts: u64,
    /// Component rows per prompt in the synthetic search database (besides `wte:0`).
    #[arg(long, default_value_t = 40)]
    pub db_rows: usize,
    /// Where to keep the synthetic search database; reused when it already has --db-prompts prompts.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Working directory for the random run, corpus and pipeline database [default: a new directory
    /// under the system's temporary directory, removed at the end].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Runs the benchmark and prints its table.
pub fn run(args: &BenchArgs) -> Result<()> {
    let (dir, remove) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("spd-generate-bench-{}", std::process::id())),
            true,
        ),
    };
    let result = run_in(args, &dir);
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(args: &BenchArgs, dir: &Path) -> Result<()> {
    let spec = SyntheticSpec::simple_stories_1m();
    let run_dir = dir.join("run");
    synthetic::write_run(&synthetic_model(&spec)?, &run_dir)?;
    let words: Vec<String> = (2..spec.vocab_size).map(|i| format!("w{i}")).collect();
    std::fs::write(
        run_dir.join("tokenizer.json"),
        synthetic::word_level_tokenizer(&words),
    )
    .map_err(|source| GenerateError::Io {
        path: run_dir.clone(),
        source,
    })?;
    let corpus_path = dir.join("corpus.txt");
    write_corpus(&corpus_path, &words, args.prompts as usize * args.n_ctx * 2)?;

    let device = crate::device::parse_device(&args.device).map_err(GenerateError::Usage)?;
    let model = SpdModel::load(&run_dir, &device)?;
    let tokenizer = corpus::load_tokenizer(&run_dir.join("tokenizer.json"))?;
    let eos = corpus::eos_id(&tokenizer, None)?;
    let corpus = corpus::Corpus::open(&corpus_path, "text")?;
    let windows: Vec<Vec<u32>> = corpus::windows(
        corpus::shuffle(corpus.documents(), 42),
        tokenizer,
        eos,
        args.n_ctx,
    )
    .take(args.prompts as usize)
    .map(|w| w.map(|w| w.tokens))
    .collect::<std::result::Result<_, _>>()?;
    let n_tokens = (windows.len() * args.n_ctx) as f64;

    println!(
        "model: {spec:?}\ndevice {} ({} pipeline worker(s)); {} prompts x {} tokens, batch {}, ci \
         threshold {}",
        args.device,
        args.workers.unwrap_or(1),
        windows.len(),
        args.n_ctx,
        args.batch_size,
        args.ci_threshold
    );
    let ci_only = time_ci_pass(&model, &windows, args.batch_size, |tokens, _| {
        extract::forward(&model, tokens).map(drop)
    })?;
    let engine_ci = time_ci_pass(&model, &windows, args.batch_size, |tokens, _| {
        model.ci(tokens).map(drop)
    })?;
    let th = Thresholds {
        ci: args.ci_threshold,
        output_prob: 0.01,
    };
    // Context floors rise as in a run, so the extraction gathers what a run would.
    let contexts = RefCell::new(Contexts::new(
        model.module_layout(),
        ContextParams::default(),
    ));
    let floors = contexts.borrow().floors();
    let (extract_s, extract_n) = (Cell::new(0.0), Cell::new(0usize));
    let ci_extract = time_ci_pass(&model, &windows, args.batch_size, |tokens, batch| {
        let (ci, probs) = extract::forward(&model, tokens)?;
        let batch = as_windows(batch);
        let mode = extract::ScanMode::for_device(model.device());
        let start = Instant::now();
        let ex = extract::extract(
            &ci,
            &probs,
            &batch,
            th,
            &ContextParams::default(),
            &floors,
            mode,
        )?;
        extract_s.set(extract_s.get() + start.elapsed().as_secs_f64());
        extract_n.set(extract_n.get() + 1);
        contexts.borrow_mut().add(ex.contexts);
        Ok(())
    })?;

    // The host side of the fused CUDA path: the same batches as entries (on a GPU from the fused
    // kernels; elsewhere from their host reference, untimed), reduced by `extract_entries`.
    let entries_s = Cell::new(0.0);
    time_ci_pass(&model, &windows, args.batch_size, |tokens, batch| {
        let windows = as_windows(batch);
        let ctx = ContextParams::default();
        let lens: Vec<u32> = batch.iter().map(|t| t.len() as u32).collect();
        let th_entries = CiThresholds {
            active: EntryBatch::active_threshold(th, &ctx),
            firing: ctx.threshold,
        };
        let (entries, ci) = entry_batch(&model, tokens, th_entries, th.output_prob, &lens)?;
        let start = Instant::now();
        extract::extract_entries(
            entries,
            &ci,
            model.vocab_size(),
            &windows,
            th,
            &ctx,
            &floors,
            extract::ScanMode::for_device(model.device()),
        )?;
        entries_s.set(entries_s.get() + start.elapsed().as_secs_f64());
        Ok(())
    })?;

    let db_path = dir.join("pipeline.db");
    let cfg = GenerateConfig {
        model: run_dir.clone(),
        output: db_path.clone(),
        input: Input::Corpus {
            path: corpus_path,
            column: None,
            tokenizer: None,
            eos_token: None,
            n_ctx: args.n_ctx,
            seed: 42,
        },
        n_prompts: Some(args.prompts),
        batch_size: Some(args.batch_size),
        thresholds: th,
        contexts: ContextParams::default(),
        devices: vec![args.device.clone()],
        workers: args.workers,
        tf32: false,
        unfused: false,
        shard: Shard::default(),
        force_new: true,
        n_blocks: None,
        progress: Progress::Quiet,
        context_checkpoint: pipeline::DEFAULT_CONTEXT_CHECKPOINT,
        abort_in_batch: None,
    };
    let summary = pipeline::run(&cfg)?;
    // The same without context examples: what their writes cost in a short run, where most
    // components still improve their top-k every batch.
    let mut no_examples = cfg.clone();
    no_examples.output = dir.join("no-examples.db");
    no_examples.contexts.top_k = 0;
    let no_examples = pipeline::run(&no_examples)?.tokens_per_second();
    let conn = schema::open_read_only(&db_path)?;
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM component_activations", [], |r| {
        r.get(0)
    })?;
    let pipe = summary.tokens_per_second();
    println!();
    println!("| stage | tokens/s | vs CI pass |");
    println!("|---|---:|---:|");
    println!(
        "| CI pass alone (generate's lower-CI forward) | {:.0} | 100% |",
        n_tokens / ci_only
    );
    println!(
        "| CI pass alone (SpdModel::ci, all three CI kinds) | {:.0} | {:.0}% |",
        n_tokens / engine_ci,
        100.0 * ci_only / engine_ci
    );
    println!(
        "| CI pass + extraction (no writing; extraction alone {:.0} ms per batch) | {:.0} | {:.0}% |",
        1e3 * extract_s.get() / extract_n.get().max(1) as f64,
        n_tokens / ci_extract,
        100.0 * ci_only / ci_extract
    );
    println!(
        "| extraction alone from entries (the fused CUDA path's host side): {:.0} ms per batch | | |",
        1e3 * entries_s.get() / extract_n.get().max(1) as f64,
    );
    let write_s = time_writer(&db_path, &dir.join("rewrite.db"), &model, args.batch_size)?;
    println!(
        "| writing the same rows alone (one transaction per batch) | {:.0} | {:.0}% |",
        n_tokens / write_s,
        100.0 * ci_only / write_s
    );
    println!(
        "| pipeline: tokenize → CI → extract → write | {pipe:.0} | {:.0}% |",
        100.0 * pipe / (n_tokens / ci_only)
    );
    println!(
        "| pipeline without context examples (top-k 0) | {no_examples:.0} | {:.0}% |",
        100.0 * no_examples / (n_tokens / ci_only)
    );
    println!(
        "index rows per prompt: {:.0} ({:.0} rows/s written alone); database {:.1} MB; finishing \
         (indexes, posting lists, contexts) {:.2} s after the pipeline",
        rows as f64 / summary.prompts_written.max(1) as f64,
        rows as f64 / write_s,
        file_mb(&db_path),
        summary.finish_seconds
    );

    if args.db_prompts > 0 {
        let db = args.db.clone().unwrap_or_else(|| dir.join("search.db"));
        search_bench(&db, args.db_prompts, args.db_rows, &model)?;
    }
    Ok(())
}

/// Token lists as the windows `extract` takes (their corpus index does not matter here).
fn as_windows(batch: &[Vec<u32>]) -> Vec<Window> {
    batch
        .iter()
        .map(|t| Window {
            index: 0,
            tokens: t.clone(),
        })
        .collect()
}

/// A batch as entries and its dense lower CI: from the fused kernels on a CUDA device, from their
/// host reference elsewhere.
fn entry_batch(
    model: &SpdModel,
    tokens: &Tensor,
    th: CiThresholds,
    output_prob: f32,
    lens: &[u32],
) -> candle_core::Result<(EntryBatch, Vec<Tensor>)> {
    #[cfg(feature = "cuda")]
    if model.device().is_cuda() {
        use crate::cuda::{Dense, ci_pass, output_entries};
        let fused = ci_pass(model, tokens, th, Some(lens), Dense::Device)?;
        let outputs = output_entries(&fused.logits, lens, output_prob)?;
        let batch = EntryBatch {
            ci: fused.entries,
            outputs,
            sum_ci: fused.sum_ci,
            n_firing: fused.n_firing,
        };
        return Ok((batch, fused.dense.unwrap_or_default()));
    }
    let (ci, probs) = extract::forward(model, tokens)?;
    let (entries, sum_ci, n_firing) = reference_entries(&ci, th, Some(lens))?;
    let outputs = reference_output_entries(&probs, lens, output_prob)?;
    let batch = EntryBatch {
        ci: entries,
        outputs,
        sum_ci,
        n_firing,
    };
    Ok((batch, ci))
}

/// Seconds for the batches of `windows` through `pass` (after one warm-up batch).
fn time_ci_pass(
    model: &SpdModel,
    windows: &[Vec<u32>],
    batch_size: usize,
    pass: impl Fn(&Tensor, &[Vec<u32>]) -> candle_core::Result<()>,
) -> Result<f64> {
    let batches: Vec<(Tensor, &[Vec<u32>])> = windows
        .chunks(batch_size)
        .map(|b| {
            let ids: Vec<u32> = b.concat();
            Ok((
                Tensor::from_vec(ids, (b.len(), b[0].len()), model.device())?,
                b,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    if let Some((t, b)) = batches.first() {
        pass(t, b)?;
    }
    model.device().synchronize()?;
    let start = Instant::now();
    for (t, b) in &batches {
        pass(t, b)?;
    }
    model.device().synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds to write the prompts and rows of the database `src` again into a new `dst`, in
/// transactions of `batch_size` prompts.
fn time_writer(src: &Path, dst: &Path, model: &SpdModel, batch_size: usize) -> Result<f64> {
    let keys = extract::key_table(model);
    let id_of: std::collections::HashMap<&str, u32> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i as u32))
        .collect();
    let conn = schema::open_read_only(src)?;
    let mut prompts = vec![];
    for p in queries::list_prompts(&conn, 0, usize::MAX)? {
        let rows = queries::prompt_activations(&conn, p.id)?
            .into_iter()
            .map(|a| writer::ActivationRow {
                key: id_of[a.key.as_str()],
                max_ci: a.max_ci,
                positions: a.positions,
            })
            .collect();
        prompts.push(writer::PromptRows {
            token_ids: p.token_ids,
            rows,
        });
    }
    pipeline::remove_database(dst)?;
    let mut out = schema::open_for_writing(dst)?;
    let start = Instant::now();
    for batch in prompts.chunks(batch_size) {
        let tx = out.transaction()?;
        writer::insert_prompts(&tx, &keys, batch)?;
        tx.commit()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Random documents of 20–200 words, enough for `min_words` words.
fn write_corpus(path: &Path, words: &[String], min_words: usize) -> Result<()> {
    let io = |source| GenerateError::Io {
        path: path.to_owned(),
        source,
    };
    let mut rng = Rng::new(3);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let mut written = 0;
    while written < min_words {
        let n = 20 + rng.below(181);
        let doc: Vec<&str> = (0..n)
            .map(|_| words[rng.below(words.len())].as_str())
            .collect();
        writeln!(out, "{}", doc.join(" ")).map_err(io)?;
        written += n;
    }
    out.flush().map_err(io)
}

fn file_mb(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1e6)
}

/// Builds (or reuses) a synthetic database of `n` prompts and times 3-key searches on it.
fn search_bench(db: &Path, n: u64, rows_per_prompt: usize, model: &SpdModel) -> Result<()> {
    let keys = extract::key_table(model);
    // Component keys (not wte, not outputs) with Zipf(1) popularity: rank r drawn ∝ 1 / (r + 1).
    let n_comp = model.total_c();
    let have = schema::open_read_only(db)
        .ok()
        .and_then(|c| queries::prompt_count(&c).ok());
    if have != Some(n) {
        let start = Instant::now();
        build_search_db(db, n, rows_per_prompt, &keys, n_comp, model.vocab_size())?;
        println!(
            "\nbuilt a {n}-prompt database ({rows_per_prompt} component rows + wte:0 per prompt) in \
             {:.0} s: {:.0} MB",
            start.elapsed().as_secs_f64(),
            file_mb(db)
        );
    } else {
        // Posting lists are a no-op when already there.
        let mut conn = schema::open_for_writing(db)?;
        let start = Instant::now();
        let tx = conn.transaction()?;
        schema::create_indexes(&tx)?;
        crate::store::postings::extend(&tx)?;
        tx.commit()?;
        println!(
            "\nreusing {} ({n} prompts, {:.0} MB; posting lists checked in {:.0} s)",
            db.display(),
            file_mb(db),
            start.elapsed().as_secs_f64()
        );
    }
    let conn = schema::open_read_only(db)?;
    println!();
    println!(
        "| keys (Zipf ranks) | prompts per key | all: matches | all: ms | any: matches | any: ms |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for ranks in [[0, 1, 2], [10, 20, 30], [100, 200, 300], [1000, 2000, 3000]] {
        let ks: Vec<String> = ranks.iter().map(|&r| keys[1 + r].clone()).collect();
        let per_key: Vec<String> = ks
            .iter()
            .map(|k| queries::component_stats(&conn, k).map(|s| s.n_prompts.to_string()))
            .collect::<std::result::Result<_, _>>()?;
        let mut cells = vec![];
        for mode in [queries::Match::All, queries::Match::Any] {
            let search = queries::Search {
                keys: ks.clone(),
                mode,
                order: queries::Order::ScoreDesc,
                offset: 0,
                limit: 50,
            };
            queries::search_prompts(&conn, &search)?;
            let mut times = vec![];
            let mut total = 0;
            for _ in 0..5 {
                let start = Instant::now();
                total = queries::search_prompts(&conn, &search)?.total;
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            cells.push(format!("{total} | {:.1}", times[2]));
        }
        println!(
            "| {ranks:?} | {} | {} | {} |",
            per_key.join(", "),
            cells[0],
            cells[1]
        );
    }
    Ok(())
}

fn build_search_db(
    db: &Path,
    n: u64,
    rows_per_prompt: usize,
    keys: &[String],
    n_comp: usize,
    vocab: usize,
) -> Result<()> {
    pipeline::remove_database(db)?;
    let mut conn = schema::open_for_writing(db)?;
    let cdf: Vec<f64> = (0..n_comp)
        .scan(0.0, |acc, r| {
            *acc += 1.0 / (r + 1) as f64;
            Some(*acc)
        })
        .collect();
    let total = *cdf.last().expect("the model has components");
    let mut rng = Rng::new(11);
    let n_ctx = 32u32;
    let mut written = 0;
    while written < n {
        let batch = (n - written).min(10_000);
        let mut prompts = Vec::with_capacity(batch as usize);
        for _ in 0..batch {
            let mut cols: Vec<usize> = Vec::with_capacity(rows_per_prompt);
            while cols.len() < rows_per_prompt.min(n_comp) {
                let u = rng.uniform() * total;
                let r = cdf.partition_point(|&c| c < u).min(n_comp - 1);
                if !cols.contains(&r) {
                    cols.push(r);
                }
            }
            cols.sort_unstable();
            let mut rows = vec![writer::ActivationRow {
                key: 0,
                max_ci: 1.0,
                positions: (0..n_ctx).collect(),
            }];
            for r in cols {
                let start = rng.below(n_ctx as usize) as u32;
                let len = 1 + rng.below(3) as u32;
                rows.push(writer::ActivationRow {
                    key: 1 + r as u32,
                    max_ci: rng.uniform() as f32,
                    positions: (start..(start + len).min(n_ctx)).collect(),
                });
            }
            prompts.push(writer::PromptRows {
                token_ids: (0..n_ctx).map(|_| rng.below(vocab) as u32).collect(),
                rows,
            });
        }
        let tx = conn.transaction()?;
        writer::insert_prompts(&tx, keys, &prompts)?;
        tx.commit()?;
        written += batch;
    }
    let tx = conn.transaction()?;
    schema::create_indexes(&tx)?;
    crate::store::postings::extend(&tx)?;
    tx.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(())
}
