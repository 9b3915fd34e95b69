//! `attribute`: one prompt's CI, output probabilities and attribution graph as one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use server::attribution::report::Made;
use server::attribution::{
    Backend, FastEngine, Normalization, PromptCi, Semantics, SourceMap, Thresholds,
    default_max_outputs, reference_graph_with, report, strongest,
};
use server::model::SpdModel;

/// Computes the attribution graph of one prompt of an SPD run and prints it as JSON.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The SPD run: its directory, a model_<step>.pth, or a model.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 3,17,5.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "text",
        required_unless_present = "text"
    )]
    tokens: Vec<u32>,
    /// Text to tokenize with --tokenizer instead of --tokens.
    #[arg(long, requires = "tokenizer")]
    text: Option<String>,
    /// A Hugging Face tokenizer.json (for --text).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Component nodes are alive where CI >= this.
    #[arg(long, default_value_t = 0.1)]
    ci_threshold: f32,
    /// Output nodes are alive where the CI-masked model's probability >= this.
    #[arg(long, default_value_t = 0.05)]
    output_prob_threshold: f32,
    /// Normalise the edges: `none`, `l1` (per target node, the seed's), `l2-target` or `l2-layer`
    /// (SPD's app: by the L2 norm of a target node's or target layer's incoming edges). A bare
    /// `--normalize` is `l1`.
    #[arg(long, num_args = 0..=1, default_missing_value = "l1", value_parser = parse_normalization)]
    normalize: Option<Normalization>,
    /// `seed` (components masked by CI, no weight deltas; alive at CI >= threshold) or `app` (SPD's
    /// app: gradients with every mask 1 plus the weight deltas; alive at CI > threshold; at most 15
    /// output nodes per position).
    #[arg(long, default_value = "seed", value_parser = parse_semantics)]
    semantics: Semantics,
    /// At most this many output nodes per position, the most probable (app default 15, seed none).
    #[arg(long, value_name = "N")]
    max_outputs_per_position: Option<usize>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `fast` (closed-form local Jacobians) or `reference` (one backward pass per target node, as the
    /// original); both give the same edges.
    #[arg(long, value_enum, default_value_t = Engine::Fast)]
    engine: Engine,
    /// Keep only the N strongest edges (by |value|, ties in the engine's order; --normalize then
    /// normalizes those), as the explorer keeps 30000. The fast engine never holds the others; the
    /// whole graph's edge count is reported as `total_edges`.
    #[arg(long, value_name = "N")]
    top: Option<usize>,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_normalization(s: &str) -> Result<Normalization, String> {
    Normalization::from_name(s)
        .ok_or_else(|| format!("`{s}`: expected none, l1, l2-target or l2-layer"))
}

fn parse_semantics(s: &str) -> Result<Semantics, String> {
    Semantics::from_name(s).ok_or_else(|| format!("`{s}`: expected seed or app"))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Fast,
    Reference,
}

fn run(args: Args) -> Result<(), String> {
    let device = server::device::parse_device(&args.device)?;
    let model = SpdModel::load(&args.model, &device).map_err(|e| e.to_string())?;
    let tokens = match (&args.text, &args.tokenizer) {
        (Some(text), Some(tok)) => server::tokenizer::encode(tok, text)?,
        _ => args.tokens.clone(),
    };
    let th = Thresholds {
        ci: args.ci_threshold,
        output_prob: args.output_prob_threshold,
    };
    let sources = SourceMap::probe(&model).map_err(|e| e.to_string())?;
    let max_outputs = args
        .max_outputs_per_position
        .or(default_max_outputs(args.semantics));
    let fast = match args.engine {
        Engine::Reference => None,
        Engine::Fast => match FastEngine::new(&model, &sources) {
            Ok(engine) if engine.computes(args.semantics) => Some(engine),
            Ok(_) => match FastEngine::with_backend(&model, &sources, Backend::Host) {
                Ok(engine) => Some(engine),
                Err(why) => {
                    eprintln!("note: {why}; using the reference engine");
                    None
                }
            },
            Err(why) => {
                eprintln!("note: {why}; using the reference engine");
                None
            }
        },
    };
    let start = Instant::now();
    let ci = PromptCi::compute(&model, &tokens).map_err(|e| e.to_string())?;
    let ci_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let (graph, total) = match (&fast, args.top) {
        (Some(engine), Some(k)) => engine.strongest_graph_with(
            &model,
            &ci,
            th,
            args.semantics,
            max_outputs,
            k,
            &|_| true,
            &|_, _| {},
        ),
        (Some(engine), None) => engine
            .graph_with(&model, &ci, th, args.semantics, max_outputs)
            .map(|g| {
                let n = g.edges.len();
                (g, n)
            }),
        (None, top) => reference_graph_with(&model, &sources, &ci, th, args.semantics, max_outputs)
            .map(|mut g| {
                let n = g.edges.len();
                if let Some(k) = top {
                    g.edges = strongest(&g.edges, |_| true, k);
                }
                (g, n)
            }),
    }
    .map_err(|e| e.to_string())?;
    let graph_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut doc = report::report(
        &model,
        &sources,
        &ci,
        &graph,
        th,
        Made {
            semantics: args.semantics,
            normalize: args.normalize.unwrap_or(Normalization::None),
        },
        report::Timing { ci_ms, graph_ms },
    );
    if let (Some(k), Some(map)) = (args.top, doc.as_object_mut()) {
        map.insert("top".into(), k.into());
        map.insert("total_edges".into(), total.into());
    }
    let text = serde_json::to_string(&doc).map_err(|e| e.to_string())?;
    match &args.out {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
