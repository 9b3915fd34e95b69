//! `demo_model`: regenerates the built-in demo (corpus, tokenizer, target model, SPD run) from its
//! seeds, bit for bit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use server::demo::{self, DemoSpec, Stages};

/// Generates the story corpus, builds the tokenizer, trains the target GPT2Simple and decomposes it
/// with SPD, writing an SPD run directory and the held-out corpus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Output directory (gets corpus.txt, run/, report.json).
    #[arg(long, default_value_os_t = demo::default_dir())]
    out: PathBuf,
    /// A few seconds' run with tiny settings, to check the pipeline (not the shipped demo).
    #[arg(long)]
    quick: bool,
    /// Redo only the decomposition (and the figures) from the target already in OUT/run/target.
    #[arg(long, conflicts_with = "eval_only")]
    spd_only: bool,
    /// Recompute only the held-out figures in OUT/report.json from the run in OUT/run.
    #[arg(long)]
    eval_only: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Matmuls split work by thread count; a fixed count keeps the results bit for bit.
    if std::env::var("RAYON_NUM_THREADS").as_deref() != Ok("2") {
        eprintln!(
            "error: run with RAYON_NUM_THREADS=2 (the results depend on the thread count; `make demo-model` sets it)"
        );
        return ExitCode::from(2);
    }
    let spec = if args.quick {
        DemoSpec::quick()
    } else {
        DemoSpec::default()
    };
    let stages = match (args.spd_only, args.eval_only) {
        (true, _) => Stages::Spd,
        (_, true) => Stages::Eval,
        _ => Stages::All,
    };
    let start = std::time::Instant::now();
    let mut log = |msg: &str| eprintln!("[{:>6.1} s] {msg}", start.elapsed().as_secs_f64());
    match demo::regenerate(&spec, &args.out, stages, &mut log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
