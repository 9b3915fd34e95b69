//! A `generate` run: a reader thread forms prompts and batches them, compute workers (one per device
//! entry, each with its own model copy) run the CI pass and reduce it, and this thread writes, through
//! bounded channels, so compute never waits on disk and memory stays bounded.
//!
//! The writer commits batches in corpus order, one transaction per batch holding its prompts, their
//! rows and the progress. A killed run therefore leaves whole batches only, forming a prefix of the
//! run's prompts, and rerunning the same command continues after it. The activation contexts, whose
//! top-k lists change in most batches early in a run, are saved once a minute (and at the end) with
//! the count of prompts they cover; a resumed run computes the prompts written since then again, for
//! the contexts alone. The database is the same for any number of workers, and equal to that of an
//! uninterrupted run.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rusqlite::Connection;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::attribution::Thresholds;
use crate::model::SpdModel;
use crate::store::{meta, schema, writer};

use super::GenerateError;
use super::contexts::{ContextParams, Contexts};
use super::corpus::{self, Corpus, CorpusError, Window};
use super::extract::{self, Extracted, ScanMode};

type Result<T> = std::result::Result<T, GenerateError>;

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// Documents from a text, JSONL or Parquet file (or a directory of them), tokenized with the
    /// run's tokenizer, joined with EOS, cut into windows of `n_ctx` tokens, in an order set by `seed`.
    Corpus {
        path: PathBuf,
        column: Option<String>,
        tokenizer: Option<PathBuf>,
        eos_token: Option<String>,
        n_ctx: usize,
        seed: u64,
    },
    /// Prompts as token ids (a JSON array of arrays, or one array per line), used as they are.
    TokensFile {
        path: PathBuf,
        tokenizer: Option<PathBuf>,
    },
}

/// This run's share of the corpus: the windows whose index is `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `i/N` with `0 <= i < N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("invalid shard `{s}`: expected i/N with 0 <= i < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// How often a run saves its activation contexts by default.
pub const DEFAULT_CONTEXT_CHECKPOINT: Duration = Duration::from_secs(60);

/// How progress is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, periodic log lines otherwise.
    Auto,
    /// Periodic log lines on standard error.
    Log,
    Quiet,
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// The SPD run: directory, `model_<step>.pth` or `model.safetensors`.
    pub model: PathBuf,
    /// The database to write (created, or resumed).
    pub output: PathBuf,
    pub input: Input,
    /// Prompts in the whole run, over all shards (`None`: the whole corpus).
    pub n_prompts: Option<u64>,
    /// Prompts per forward pass (`None`: chosen from the model's size).
    pub batch_size: Option<usize>,
    pub thresholds: Thresholds,
    pub contexts: ContextParams,
    /// `cpu`, `cuda:N`; one worker per entry unless `workers` says otherwise.
    pub devices: Vec<String>,
    /// Compute workers, spread over `devices` in turn.
    pub workers: Option<usize>,
    /// tf32 matmuls on the CUDA devices (see [`crate::device::set_tf32`]); recorded with the run.
    pub tf32: bool,
    /// On CUDA devices, reduce with candle's element-wise ops ([`ScanMode::Device`]) instead of the
    /// fused kernels of [`crate::cuda`] (same results; for comparison). No effect on the CPU.
    pub unfused: bool,
    pub shard: Shard,
    /// Start a new database even if `output` holds another run.
    pub force_new: bool,
    /// Stored as `meta.n_blocks` (default: the model's number of blocks).
    pub n_blocks: Option<usize>,
    pub progress: Progress,
    /// How often the activation contexts are saved during the run. A killed run computes the prompts
    /// written since again (for the contexts alone) when resumed.
    pub context_checkpoint: Duration,
    /// Test hook: abort the process in the middle of writing this batch (0-based, counted in this
    /// process), as `kill -9` would.
    pub abort_in_batch: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Prompts and tokens written by this process.
    pub prompts_written: u64,
    pub tokens_written: u64,
    /// Prompts in the database's run now.
    pub prompts_done: u64,
    /// Seconds from the first batch handed out to the last commit.
    pub seconds: f64,
    /// Seconds to finish: the indexes, posting lists and `meta.activation_contexts`.
    pub finish_seconds: f64,
    pub batch_size: usize,
    /// Whether the run reached its end (then rerunning has nothing to do).
    pub complete: bool,
}

impl Summary {
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens_written as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The prompts a run reads, resolved.
enum Source {
    Corpus {
        corpus: Corpus,
        tokenizer: Box<Tokenizer>,
        eos: u32,
        n_ctx: usize,
        seed: u64,
    },
    Prompts(Vec<Window>),
}

/// Identity fields that may differ between a database and the run resuming it.
pub(crate) const MAY_DIFFER: [&str; 3] = ["model.path", "input.tokenizer.path", "n_prompts"];

/// Runs (or resumes) a generation.
pub fn run(cfg: &GenerateConfig) -> Result<Summary> {
    if cfg.devices.is_empty() {
        return Err(GenerateError::Usage("--devices lists no device".into()));
    }
    let devices = cfg
        .devices
        .iter()
        .map(|d| crate::device::parse_device(d).map_err(GenerateError::Usage))
        .collect::<Result<Vec<_>>>()?;
    if cfg.tf32 {
        crate::device::enable_tf32_for(&devices).map_err(GenerateError::Usage)?;
    }
    let model = SpdModel::load(&cfg.model, &devices[0])?;
    let (source, input_identity, tokenizer) = resolve_input(cfg, &model)?;
    let mut identity = json!({
        "format": 1,
        "model": {
            "path": absolute(&cfg.model).display().to_string(),
            "sha256": sha256_file(&model.checkpoint)?,
        },
        "thresholds": {
            "ci": cfg.thresholds.ci,
            "output_prob": cfg.thresholds.output_prob,
        },
        "contexts": cfg.contexts,
        "input": input_identity,
        "shard": {"index": cfg.shard.index, "count": cfg.shard.count},
        "n_prompts": cfg.n_prompts,
    });
    // Only when on, so databases written before the flag existed still resume.
    if cfg.tf32 {
        identity["tf32"] = json!(true);
    }

    if cfg.force_new {
        remove_database(&cfg.output)?;
    }
    let mut conn = schema::open_for_writing(&cfg.output)?;
    let mut record = match writer::generation(&conn)? {
        // A run that wrote nothing (it failed on its input, say) holds nothing to keep.
        Some(g) if g.prompts_done > 0 => {
            let diffs = identity_diff(&g.config, &identity, "", &MAY_DIFFER);
            if !diffs.is_empty() {
                return Err(GenerateError::Usage(format!(
                    "{} holds another run ({}); pass --force-new to start over, or choose another --output",
                    cfg.output.display(),
                    diffs.join("; ")
                )));
            }
            g
        }
        _ => {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM prompts", [], |r| r.get(0))?;
            if n > 0 {
                return Err(GenerateError::Usage(format!(
                    "{} already holds {n} prompts not written by this tool's generate; pass \
                     --force-new to start over, or choose another --output",
                    cfg.output.display()
                )));
            }
            let g = writer::GenerationRecord {
                config: identity.clone(),
                prompts_done: 0,
                tokens_done: 0,
                complete: false,
            };
            writer::set_generation(&conn, &g)?;
            g
        }
    };
    let mut contexts = Contexts::load(&conn, model.module_layout(), cfg.contexts)?;
    if contexts.prompts > record.prompts_done {
        return Err(GenerateError::Usage(format!(
            "{}: the activation contexts cover {} prompts, the index only {}; pass --force-new",
            cfg.output.display(),
            contexts.prompts,
            record.prompts_done
        )));
    }
    let target = cfg.n_prompts.map(|n| shard_len(n, cfg.shard));
    // Prompts written since the contexts were last saved are computed again for the contexts alone.
    let contexts_behind = contexts.prompts < record.prompts_done;
    let nothing_to_do = !contexts_behind
        && match target {
            Some(t) => record.prompts_done >= t,
            None => record.complete,
        };
    // A grown --n-prompts reopens a finished run; the requested size is kept for the record.
    record.complete &= nothing_to_do;
    record.config["n_prompts"] = identity["n_prompts"].clone();
    writer::set_generation(&conn, &record)?;
    meta::set(
        &conn,
        meta::WANDB_PATH,
        &json!({"path": absolute(&cfg.model).display().to_string()}),
    )?;
    meta::set(
        &conn,
        meta::N_BLOCKS,
        &json!({"n_blocks": cfg.n_blocks.unwrap_or(model.target.cfg.n_layer)}),
    )?;

    let n_ctx = match &source {
        Source::Corpus { n_ctx, .. } => *n_ctx,
        Source::Prompts(p) => p.iter().map(|w| w.tokens.len()).max().unwrap_or(1),
    };
    let batch_size = cfg
        .batch_size
        .unwrap_or_else(|| default_batch_size(&model, n_ctx, devices[0].is_cpu()))
        .max(1);
    let mut summary = Summary {
        prompts_written: 0,
        tokens_written: 0,
        prompts_done: record.prompts_done,
        seconds: 0.0,
        finish_seconds: 0.0,
        batch_size,
        complete: record.complete,
    };
    if !nothing_to_do {
        let job = Pipeline {
            cfg,
            model: &model,
            devices: &devices,
            keys: extract::key_table(&model),
            batch_size,
            skip: contexts.prompts,
            limit: target.map(|t| t.max(record.prompts_done) - contexts.prompts),
        };
        job.run(source, &mut conn, &mut contexts, &mut record, &mut summary)?;
    }
    // The run reached its end: its target, or the end of the corpus.
    record.complete = true;
    summary.complete = true;
    let start = Instant::now();
    let tx = conn.transaction()?;
    finish(&tx, &mut contexts, &record, tokenizer.as_ref())?;
    tx.commit()?;
    summary.finish_seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Saves the activation contexts and writes them into `meta.activation_contexts`, writes the final
/// `generation` row, builds the indexes if missing and the posting lists of the new prompts. Run it
/// inside a transaction.
pub(crate) fn finish(
    conn: &Connection,
    contexts: &mut Contexts,
    record: &writer::GenerationRecord,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    // Decoded once per vocabulary entry: the examples repeat tokens millions of times.
    let vocab: Vec<String> = tokenizer.map_or_else(Vec::new, |t| {
        (0..t.get_vocab_size(true) as u32)
            .map(|id| t.decode(&[id], false).unwrap_or_else(|_| id.to_string()))
            .collect()
    });
    let token_str = |id: u32| {
        vocab
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    };
    contexts.save(conn)?;
    meta::set(
        conn,
        meta::ACTIVATION_CONTEXTS,
        &contexts.to_meta(&token_str),
    )?;
    writer::set_generation(conn, record)?;
    schema::create_indexes(conn)?;
    crate::store::postings::extend(conn)?;
    Ok(())
}

/// Windows `w < n` with `w % count == index`.
pub fn shard_len(n: u64, shard: Shard) -> u64 {
    if n > shard.index {
        (n - shard.index - 1) / shard.count + 1
    } else {
        0
    }
}

fn resolve_input(
    cfg: &GenerateConfig,
    model: &SpdModel,
) -> Result<(Source, Value, Option<Tokenizer>)> {
    let explicit = match &cfg.input {
        Input::Corpus { tokenizer, .. } | Input::TokensFile { tokenizer, .. } => tokenizer.clone(),
    };
    let tok_path = explicit.or_else(|| crate::tokenizer::find_for(model));
    let tok_identity = |p: &Path| -> Result<Value> {
        Ok(json!({"path": absolute(p).display().to_string(), "sha256": sha256_file(p)?}))
    };
    match &cfg.input {
        Input::TokensFile { path, .. } => {
            let prompts = corpus::token_prompts(path)?;
            let tokenizer = tok_path
                .as_deref()
                .map(corpus::load_tokenizer)
                .transpose()?;
            let identity = json!({
                "kind": "tokens",
                "path": absolute(path).display().to_string(),
                "bytes": file_len(path)?,
            });
            Ok((Source::Prompts(prompts), identity, tokenizer))
        }
        Input::Corpus {
            path,
            column,
            eos_token,
            n_ctx,
            seed,
            ..
        } => {
            if *n_ctx == 0 || *n_ctx > model.block_size() {
                return Err(GenerateError::Usage(format!(
                    "--n-ctx {n_ctx} must be between 1 and the model's context ({})",
                    model.block_size()
                )));
            }
            let column = column
                .clone()
                .or_else(|| model.config.task_config.column_name.clone())
                .unwrap_or_else(|| "text".into());
            let corpus = Corpus::open(path, &column)?;
            let tok_path = tok_path.ok_or_else(|| {
                GenerateError::Usage(format!(
                    "no tokenizer for the corpus: pass --tokenizer PATH/tokenizer.json (none next to \
                     the run in {}, and tokenizer_name {:?} is not a local path)",
                    model
                        .checkpoint
                        .parent()
                        .unwrap_or(Path::new("."))
                        .display(),
                    model.config.tokenizer_name
                ))
            })?;
            let tokenizer = corpus::load_tokenizer(&tok_path)?;
            let eos = corpus::eos_id(&tokenizer, eos_token.as_deref())?;
            let identity = json!({
                "kind": corpus.format,
                "path": absolute(path).display().to_string(),
                "bytes": corpus.size(),
                "column": column,
                "tokenizer": tok_identity(&tok_path)?,
                "eos": eos,
                "n_ctx": n_ctx,
                "seed": seed,
            });
            let source = Source::Corpus {
                corpus,
                tokenizer: Box::new(tokenizer.clone()),
                eos,
                n_ctx: *n_ctx,
                seed: *seed,
            };
            Ok((source, identity, Some(tokenizer)))
        }
    }
}

/// Lists the identity fields that differ (`path: database X, this run Y`), skipping the dotted
/// paths in `skip`.
pub(crate) fn identity_diff(old: &Value, new: &Value, at: &str, skip: &[&str]) -> Vec<String> {
    if skip.contains(&at) {
        return vec![];
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    identity_diff(
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        &path,
                        skip,
                    )
                })
                .collect()
        }
        (a, b) if a == b => vec![],
        (a, b) => vec![format!("{at}: database {a}, this run {b}")],
    }
}

/// Removes a database and its WAL files.
pub(crate) fn remove_database(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(GenerateError::Io {
                    path: p.into(),
                    source,
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

fn file_len(p: &Path) -> Result<u64> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(|source| GenerateError::Io {
            path: p.to_owned(),
            source,
        })
}

/// SHA-256 of a file's bytes, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| GenerateError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A batch size that keeps one forward pass within a memory budget (512 MiB on the CPU, 8 GiB on a
/// GPU): every module's CI and the output probabilities are held until the batch is reduced, plus
/// the largest CI network's hidden activations.
pub fn default_batch_size(model: &SpdModel, n_ctx: usize, cpu: bool) -> usize {
    use crate::model::config::{CiConfig, CiFnType};
    let hidden = model.config.ci.widest_hidden();
    let network = match &model.config.ci {
        CiConfig::Layerwise {
            fn_type: CiFnType::SharedMlp,
            ..
        } => hidden + model.max_c(),
        CiConfig::Layerwise { .. } => model.max_c() * (hidden + 1),
        // A global network holds every module's input and its hidden layers at once.
        CiConfig::Global(_) => {
            model
                .modules
                .iter()
                .map(|m| m.components.v.dims()[0])
                .sum::<usize>()
                + 4 * hidden
        }
    };
    let d = model.target.cfg.n_embd;
    let floats_per_token = model.total_c() + 3 * model.vocab_size() + network + 16 * d;
    let budget: usize = if cpu { 512 << 20 } else { 8 << 30 };
    (budget / (4 * floats_per_token * n_ctx.max(1))).clamp(1, 1024)
}

/// The threads of one run.
struct Pipeline<'a> {
    cfg: &'a GenerateConfig,
    model: &'a SpdModel,
    devices: &'a [Device],
    keys: Vec<String>,
    batch_size: usize,
    /// This shard's windows already written.
    skip: u64,
    /// This shard's windows still to write (`None`: to the end of the corpus).
    limit: Option<u64>,
}

struct Job {
    seq: u64,
    windows: Vec<Window>,
}

struct Done {
    seq: u64,
    extracted: Extracted,
}

impl Pipeline<'_> {
    fn run(
        &self,
        source: Source,
        conn: &mut Connection,
        contexts: &mut Contexts,
        record: &mut writer::GenerationRecord,
        summary: &mut Summary,
    ) -> Result<()> {
        let n_workers = self.cfg.workers.unwrap_or(self.devices.len()).max(1);
        let floors = contexts.floors();
        std::thread::scope(|s| {
            let (job_tx, job_rx) = sync_channel::<Result<Job>>(2 * n_workers);
            let (done_tx, done_rx) = sync_channel::<Result<Done>>(2 * n_workers + 2);
            s.spawn(move || self.read(source, job_tx));
            let job_rx = Arc::new(Mutex::new(job_rx));
            for w in 0..n_workers {
                let (job_rx, done_tx, floors) = (job_rx.clone(), done_tx.clone(), floors.clone());
                let device = &self.devices[w % self.devices.len()];
                s.spawn(move || self.work(device, job_rx, done_tx, floors));
            }
            drop(done_tx);
            self.write(done_rx, conn, contexts, record, summary)
        })
    }

    /// Forms this shard's remaining prompts and hands them out in batches.
    fn read(&self, source: Source, tx: SyncSender<Result<Job>>) {
        let windows: Box<dyn Iterator<Item = corpus::Result<Window>>> = match source {
            Source::Corpus {
                corpus,
                tokenizer,
                eos,
                n_ctx,
                seed,
            } => Box::new(corpus::windows(
                corpus::shuffle(corpus.documents(), seed),
                *tokenizer,
                eos,
                n_ctx,
            )),
            Source::Prompts(p) => Box::new(p.into_iter().map(Ok)),
        };
        let shard = self.cfg.shard;
        let (mut skip, mut left) = (self.skip, self.limit);
        let (mut seq, mut batch) = (0u64, Vec::with_capacity(self.batch_size));
        for w in windows {
            if left == Some(0) {
                break;
            }
            let w = match w {
                Ok(w) if w.index % shard.count != shard.index => continue,
                Ok(w) => w,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if let Err(e) = self.model.check_tokens(&w.tokens) {
                let _ = tx.send(Err(GenerateError::Corpus(CorpusError::Tokenizer(format!(
                    "prompt {} does not fit the model: {e} (does the tokenizer match the model?)",
                    w.index
                )))));
                return;
            }
            left = left.map(|l| l - 1);
            batch.push(w);
            if batch.len() == self.batch_size {
                let job = Job {
                    seq,
                    windows: std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size)),
                };
                if tx.send(Ok(job)).is_err() {
                    return;
                }
                seq += 1;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(Job {
                seq,
                windows: batch,
            }));
        }
    }

    /// Runs batches on one device until the jobs run out or the writer stops.
    fn work(
        &self,
        device: &Device,
        jobs: Arc<Mutex<Receiver<Result<Job>>>>,
        tx: SyncSender<Result<Done>>,
        floors: Arc<Vec<AtomicU32>>,
    ) {
        let own;
        let model = if device.same_device(self.model.device()) {
            self.model
        } else {
            match SpdModel::load(&self.cfg.model, device) {
                Ok(m) => {
                    own = m;
                    &own
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            }
        };
        let mode = ScanMode::for_device(device);
        loop {
            let job = jobs.lock().expect("a worker panicked").recv();
            let done = match job {
                Err(_) => return,
                Ok(Err(e)) => Err(e),
                Ok(Ok(job)) => self
                    .compute(model, &job, &floors, mode)
                    .map(|extracted| Done {
                        seq: job.seq,
                        extracted,
                    }),
            };
            let failed = done.is_err();
            if tx.send(done).is_err() || failed {
                return;
            }
        }
    }

    fn compute(
        &self,
        model: &SpdModel,
        job: &Job,
        floors: &[AtomicU32],
        mode: ScanMode,
    ) -> Result<Extracted> {
        let t = job
            .windows
            .iter()
            .map(|w| w.tokens.len())
            .max()
            .unwrap_or(0);
        let ids: Vec<u32> = job
            .windows
            .iter()
            .flat_map(|w| {
                w.tokens
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, t - w.tokens.len()))
            })
            .collect();
        let tokens = Tensor::from_vec(ids, (job.windows.len(), t), model.device())?;
        #[cfg(feature = "cuda")]
        if !self.cfg.unfused && model.device().is_cuda() && model.global_ci.is_none() {
            return self.compute_fused(model, job, &tokens, floors, mode);
        }
        let lens: Vec<usize> = job.windows.iter().map(|w| w.tokens.len()).collect();
        let (ci, probs) = extract::forward_padded(model, &tokens, &lens)?;
        Ok(extract::extract(
            &ci,
            &probs,
            &job.windows,
            self.cfg.thresholds,
            &self.cfg.contexts,
            floors,
            mode,
        )?)
    }

    /// [`Self::compute`] with the fused CUDA kernels: only active entries and the reductions come
    /// to the host; the dense CI stays on the device for the context windows.
    #[cfg(feature = "cuda")]
    fn compute_fused(
        &self,
        model: &SpdModel,
        job: &Job,
        tokens: &Tensor,
        floors: &[AtomicU32],
        mode: ScanMode,
    ) -> Result<Extracted> {
        use super::entries::CiThresholds;
        use super::extract::EntryBatch;
        use crate::cuda::{Dense, ci_pass, output_entries};
        let th = self.cfg.thresholds;
        let lens: Vec<u32> = job.windows.iter().map(|w| w.tokens.len() as u32).collect();
        let fused = ci_pass(
            model,
            tokens,
            CiThresholds {
                active: EntryBatch::active_threshold(th, &self.cfg.contexts),
                firing: self.cfg.contexts.threshold,
            },
            Some(&lens),
            Dense::Device,
        )?;
        let outputs = output_entries(&fused.logits, &lens, th.output_prob)?;
        let dense = fused.dense.unwrap_or_default();
        let batch = EntryBatch {
            ci: fused.entries,
            outputs,
            sum_ci: fused.sum_ci,
            n_firing: fused.n_firing,
        };
        Ok(extract::extract_entries(
            batch,
            &dense,
            model.vocab_size(),
            &job.windows,
            th,
            &self.cfg.contexts,
            floors,
            mode,
        )?)
    }

    /// Commits finished batches in order, one transaction each.
    fn write(
        &self,
        rx: Receiver<Result<Done>>,
        conn: &mut Connection,
        contexts: &mut Contexts,
        record: &mut writer::GenerationRecord,
        summary: &mut Summary,
    ) -> Result<()> {
        let mut progress = Reporter::new(self.cfg.progress, record.prompts_done, self.limit);
        let start = Instant::now();
        let mut saved = Instant::now();
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        // Prompts in the database that this run computes again for the activation contexts alone.
        let mut replay = record.prompts_done - contexts.prompts;
        for done in rx {
            let done = done?;
            pending.insert(done.seq, done.extracted);
            while let Some(ex) = pending.remove(&next) {
                let seen = (replay as usize).min(ex.prompts.len());
                replay -= seen as u64;
                let new = &ex.prompts[seen..];
                let new_tokens: u64 = new.iter().map(|p| p.token_ids.len() as u64).sum();
                let tx = conn.transaction()?;
                if self.cfg.abort_in_batch == Some(next) {
                    writer::insert_prompts(&tx, &self.keys, &new[..new.len() / 2])?;
                    std::process::abort();
                }
                writer::insert_prompts(&tx, &self.keys, new)?;
                contexts.add(ex.contexts);
                if saved.elapsed() >= self.cfg.context_checkpoint {
                    contexts.save(&tx)?;
                    saved = Instant::now();
                }
                record.prompts_done += new.len() as u64;
                record.tokens_done += new_tokens;
                writer::set_progress(&tx, record.prompts_done, record.tokens_done)?;
                tx.commit()?;
                summary.prompts_written += new.len() as u64;
                summary.tokens_written += new_tokens;
                summary.prompts_done = record.prompts_done;
                summary.seconds = start.elapsed().as_secs_f64();
                progress.update(summary);
                next += 1;
            }
        }
        progress.finish(summary);
        if !pending.is_empty() {
            return Err(GenerateError::Usage(format!(
                "internal error: batch {next} never arrived"
            )));
        }
        Ok(())
    }
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    log: bool,
    last_log: Instant,
    start_done: u64,
    limit: Option<u64>,
}

impl Reporter {
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn new(mode: Progress, start_done: u64, limit: Option<u64>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (mode == Progress::Auto && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(limit.unwrap_or(0));
            let template = if limit.is_some() {
                "{elapsed_precise} {wide_bar} {pos}/{len} prompts, {msg}, ETA {eta}"
            } else {
                "{elapsed_precise} {spinner} {pos} prompts, {msg}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            log: bar.is_none() && mode != Progress::Quiet,
            bar,
            last_log: Instant::now(),
            start_done,
            limit,
        }
    }

    fn update(&mut self, s: &Summary) {
        if let Some(bar) = &self.bar {
            bar.set_position(s.prompts_written);
            bar.set_message(format!("{:.0} tokens/s", s.tokens_per_second()));
        } else if self.log && self.last_log.elapsed() >= Self::LOG_EVERY {
            self.last_log = Instant::now();
            eprintln!("generate: {}", self.line(s));
        }
    }

    fn line(&self, s: &Summary) -> String {
        let rate = s.prompts_written as f64 / s.seconds.max(1e-9);
        let eta = self
            .limit
            .map(|l| {
                let secs = l.saturating_sub(s.prompts_written) as f64 / rate.max(1e-9);
                format!(", ETA {}", format_duration(secs))
            })
            .unwrap_or_default();
        format!(
            "{} prompts in the database ({} this run{}), {:.0} tokens/s{eta}",
            s.prompts_done,
            s.prompts_written,
            self.limit.map(|l| format!(" of {l}")).unwrap_or_default(),
            s.tokens_per_second()
        )
    }

    fn finish(&mut self, s: &Summary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.log || self.start_done > 0 {
            eprintln!("generate: {}", self.line(s));
        }
    }
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_windows_evenly() {
        let s = |i, n| Shard { index: i, count: n };
        assert_eq!(shard_len(10, s(0, 1)), 10);
        assert_eq!(
            (0..3).map(|i| shard_len(10, s(i, 3))).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(shard_len(2, s(3, 4)), 0);
        assert_eq!("1/4".parse::<Shard>(), Ok(s(1, 4)));
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }

    #[test]
    fn identity_diff_names_fields_and_skips_paths() {
        let a = json!({"model": {"path": "/a", "sha256": "1"}, "thresholds": {"ci": 0.1}, "n_prompts": 5});
        let b = json!({"model": {"path": "/b", "sha256": "1"}, "thresholds": {"ci": 0.2}, "n_prompts": 9});
        assert_eq!(
            identity_diff(&a, &b, "", &MAY_DIFFER),
            vec!["thresholds.ci: database 0.1, this run 0.2".to_owned()]
        );
    }
}
