//! `generate`: index a corpus into an SQLite database, merge shard databases, or benchmark.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use server::attribution::Thresholds;
use server::generate::contexts::ContextParams;
use server::generate::{self, GenerateConfig, Input, Progress, Shard, bench, merge};

/// Runs the CI pass of an SPD run over a corpus and writes which components fire on which prompts,
/// where and how strongly, into an SQLite database that this explorer and the original tool read.
/// Rerunning the same command resumes an interrupted run.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Combine the databases of `--shard i/N` runs into one, as if made by a single run.
    Merge {
        /// The database to create.
        out: PathBuf,
        /// The shard databases.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print tokens/s of the CI pass alone and of the whole pipeline on a random model of the bench
    /// shape, and search latency on a synthetic database.
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The SPD run: its directory, a model_<step>.pth, or a model.safetensors.
    #[arg(long, alias = "wandb_path", required = true)]
    model: Option<PathBuf>,
    /// The database to write; an existing one of the same run is resumed.
    #[arg(long, alias = "output_path", required = true)]
    output: Option<PathBuf>,
    /// The corpus: a text file (one document per line, or blank-line separated), a JSONL file, a
    /// Parquet file, or a directory of such files.
    #[arg(
        long,
        conflicts_with = "tokens_file",
        required_unless_present = "tokens_file"
    )]
    dataset: Option<PathBuf>,
    /// The JSONL key or Parquet column holding the text [default: the run's task_config.column_name,
    /// else `text`].
    #[arg(long, alias = "column_name")]
    column: Option<String>,
    /// Prompts as token ids instead of a corpus: a JSON array of arrays, or one array per line.
    #[arg(long, alias = "tokens_file")]
    tokens_file: Option<PathBuf>,
    /// The Hugging Face tokenizer.json [default: next to the run, or the run's tokenizer_name when it
    /// is a local path].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The token that joins documents [default: the first of <|endoftext|>, [EOS], </s>, … the
    /// tokenizer knows].
    #[arg(long)]
    eos_token: Option<String>,
    /// Prompts in the whole run, over all shards [default: the whole corpus].
    #[arg(long, alias = "n_prompts")]
    n_prompts: Option<u64>,
    /// Tokens per prompt (corpus windows).
    #[arg(long, alias = "n_ctx", default_value_t = 32)]
    n_ctx: usize,
    /// Prompts per forward pass [default: chosen from the model's size].
    #[arg(long, alias = "batch_size")]
    batch_size: Option<usize>,
    /// A component is alive at a position where its CI >= this.
    #[arg(long, alias = "ci_threshold", default_value_t = 1e-6)]
    ci_threshold: f32,
    /// An output token is alive at a position where the target model's probability >= this.
    #[arg(long, alias = "output_prob_threshold", default_value_t = 0.01)]
    output_prob_threshold: f32,
    /// Seed of the document order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Devices, one compute worker each: e.g. cpu, or cuda:0,cuda:1.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Compute workers, spread over --devices in turn [default: one per device].
    #[arg(long)]
    workers: Option<usize>,
    /// Let cuBLAS use tf32 for float32 matmuls on the CUDA devices: faster on recent cards, a little
    /// less exact (needs the `cuda` feature; recorded with the run).
    #[arg(long)]
    tf32: bool,
    /// On CUDA devices, reduce with candle's element-wise ops instead of the fused kernels (same
    /// results; for comparison and as a fallback).
    #[arg(long)]
    unfused: bool,
    /// Use GPUs cuda:0 … cuda:N-1 (the original's flag; same as --devices).
    #[arg(long, alias = "n_gpus", conflicts_with = "devices")]
    n_gpus: Option<usize>,
    /// Process only this share of the prompts: every N-th window from the i-th (0 <= i < N). Combine
    /// the shard databases with `generate merge`.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Start a new database even if --output holds another run (it is deleted).
    #[arg(long)]
    force_new: bool,
    /// Stored as meta n_blocks for the original tool [default: the model's number of blocks].
    #[arg(long, alias = "n_blocks")]
    n_blocks: Option<usize>,
    /// Activation contexts: examples kept per component.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Activation contexts: a component fires on a token where its CI > this.
    #[arg(long, alias = "act_ctx_importance_threshold", default_value_t = 0.1)]
    context_threshold: f32,
    /// Save the activation contexts at most this often; a killed run computes the prompts written
    /// since again, for the contexts alone, when resumed.
    #[arg(long, default_value_t = 60.0)]
    context_checkpoint_secs: f64,
    /// Log lines instead of a progress bar.
    #[arg(long)]
    no_progress_bar: bool,
}

/// Test hook: abort the process in the middle of writing this batch (counted from 0 in this process),
/// as `kill -9` would.
const ABORT_ENV: &str = "SPD_GENERATE_ABORT_IN_BATCH";

fn config(a: RunArgs) -> Result<GenerateConfig, String> {
    let (Some(model), Some(output)) = (a.model, a.output) else {
        return Err("--model and --output are required".into());
    };
    let input = match (a.dataset, a.tokens_file) {
        (Some(path), None) => Input::Corpus {
            path,
            column: a.column,
            tokenizer: a.tokenizer,
            eos_token: a.eos_token,
            n_ctx: a.n_ctx,
            seed: a.seed,
        },
        (None, Some(path)) => Input::TokensFile {
            path,
            tokenizer: a.tokenizer,
        },
        _ => return Err("pass either --dataset PATH or --tokens-file PATH".into()),
    };
    let devices = match a.n_gpus {
        Some(n) => (0..n).map(|i| format!("cuda:{i}")).collect(),
        None => a.devices,
    };
    let abort_in_batch = match std::env::var(ABORT_ENV) {
        Ok(v) => Some(
            v.parse()
                .map_err(|_| format!("{ABORT_ENV}={v}: not a number"))?,
        ),
        Err(_) => None,
    };
    Ok(GenerateConfig {
        model,
        output,
        input,
        n_prompts: a.n_prompts,
        batch_size: a.batch_size,
        thresholds: Thresholds {
            ci: a.ci_threshold,
            output_prob: a.output_prob_threshold,
        },
        contexts: ContextParams {
            top_k: a.top_k,
            threshold: a.context_threshold,
            ..ContextParams::default()
        },
        devices,
        workers: a.workers,
        tf32: a.tf32,
        unfused: a.unfused,
        shard: a.shard,
        force_new: a.force_new,
        n_blocks: a.n_blocks,
        progress: if a.no_progress_bar {
            Progress::Log
        } else {
            Progress::Auto
        },
        context_checkpoint: Duration::from_secs_f64(a.context_checkpoint_secs),
        abort_in_batch,
    })
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Some(Command::Merge { out, inputs, force }) => {
            let s = merge::merge(&out, &inputs, force).map_err(|e| e.to_string())?;
            eprintln!(
                "merged {} databases into {}: {} prompts",
                inputs.len(),
                out.display(),
                s.prompts
            );
            Ok(())
        }
        Some(Command::Bench(args)) => bench::run(&args).map_err(|e| e.to_string()),
        None => {
            let cfg = config(cli.run)?;
            let s = generate::run(&cfg).map_err(|e| e.to_string())?;
            eprintln!(
                "{}: {} prompts ({} written now, {:.0} tokens/s, batch size {})",
                cfg.output.display(),
                s.prompts_done,
                s.prompts_written,
                s.tokens_per_second(),
                s.batch_size
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
