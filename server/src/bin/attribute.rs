//! `attribute`: one prompt's CI, output probabilities and attribution graph as one JSON object; or
//! an intervention on it (`--intervene`), or its CI optimised for a prediction (`--optimize`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde_json::{Value, json};
use server::attribution::report::Made;
use server::attribution::{
    Backend, FastEngine, Normalization, PromptCi, Semantics, SourceMap, Thresholds,
    default_max_outputs, reference_graph_with, report, strongest,
};
use server::circuit::{
    Intervention, MaskType, Mode, OptimConfig, Pgd, PgdInit, Recon, Selected, fork, intervene,
    optimize, optimized_prompt,
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

    /// Run the intervention forward instead of a graph: `keep` (the --nodes only, every other
    /// component off, no deltas), `ablate` (the --nodes off) or `scale` (the --nodes times
    /// --factor), the rest as the --semantics' graph forward has them.
    #[arg(long, value_name = "MODE", help_heading = "Interventions")]
    intervene: Option<String>,
    /// Nodes `layer:pos:c`, or `layer:c` for a component at every position.
    #[arg(long, value_delimiter = ',', help_heading = "Interventions")]
    nodes: Vec<String>,
    /// The factor of `--intervene scale`.
    #[arg(long, help_heading = "Interventions", allow_hyphen_values = true)]
    factor: Option<f32>,
    /// Next tokens listed per position.
    #[arg(long, default_value_t = 10, help_heading = "Interventions")]
    top_k: usize,
    /// Fork the prompt first: `POS:TOKEN` replacements.
    #[arg(long, value_delimiter = ',', value_parser = parse_replacement, help_heading = "Interventions")]
    replace: Vec<(usize, u32)>,

    /// Optimise the CI for a prediction, then print the optimised CI, its metrics and the graph of
    /// the tokens up to --position (use --semantics app --ci-threshold 0 --output-prob-threshold
    /// 0.01 for SPD's app's optimised graph).
    #[arg(long, help_heading = "Optimised CI")]
    optimize: bool,
    /// The token whose cross-entropy is the loss (`--loss ce`).
    #[arg(long, help_heading = "Optimised CI")]
    label_token: Option<u32>,
    /// The position whose prediction is kept.
    #[arg(long, help_heading = "Optimised CI")]
    position: Option<usize>,
    #[arg(long, help_heading = "Optimised CI")]
    steps: Option<usize>,
    /// Coefficient of the importance-minimality (sparsity) term.
    #[arg(long, help_heading = "Optimised CI")]
    imp_min_coeff: Option<f64>,
    /// Its p-norm.
    #[arg(long, help_heading = "Optimised CI")]
    pnorm: Option<f64>,
    #[arg(long, default_value_t = 0.0, help_heading = "Optimised CI")]
    beta: f64,
    /// `ci` (the CI as masks) or `stochastic` (spd's sampled masks plus deltas).
    #[arg(long, value_enum, default_value_t = MaskArg::Ci, help_heading = "Optimised CI")]
    mask_type: MaskArg,
    /// `ce` (the label token) or `kl` (the target's distribution at the position).
    #[arg(long, value_enum, default_value_t = Loss::Ce, help_heading = "Optimised CI")]
    loss: Loss,
    #[arg(long, default_value_t = 1.0, help_heading = "Optimised CI")]
    loss_coeff: f64,
    #[arg(long, default_value_t = 1e-2, help_heading = "Optimised CI")]
    lr: f64,
    /// Adversarial PGD steps per optimisation step (with --pgd-step-size).
    #[arg(long, help_heading = "Optimised CI")]
    pgd_steps: Option<usize>,
    #[arg(long, help_heading = "Optimised CI")]
    pgd_step_size: Option<f64>,
    /// Seeds the stochastic masks and PGD's random start.
    #[arg(long, default_value_t = 0, help_heading = "Optimised CI")]
    seed: u64,
}

fn parse_replacement(s: &str) -> Result<(usize, u32), String> {
    let (p, t) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected POS:TOKEN"))?;
    Ok((
        p.parse().map_err(|_| format!("`{s}`: bad position"))?,
        t.parse().map_err(|_| format!("`{s}`: bad token id"))?,
    ))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    Ce,
    Kl,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[value(name = "mask")]
enum MaskArg {
    Ci,
    Stochastic,
}

impl From<MaskArg> for MaskType {
    fn from(m: MaskArg) -> Self {
        match m {
            MaskArg::Ci => MaskType::Ci,
            MaskArg::Stochastic => MaskType::Stochastic,
        }
    }
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
    let doc = match (&args.intervene, args.optimize) {
        (Some(_), true) => return Err("--intervene and --optimize are separate runs".into()),
        (Some(mode), false) => intervention(&args, &model, &tokens, mode)?,
        (None, true) => optimization(&args, &model, &tokens)?,
        (None, false) => {
            let start = Instant::now();
            let ci = PromptCi::compute(&model, &tokens).map_err(|e| e.to_string())?;
            let ci_ms = start.elapsed().as_secs_f64() * 1e3;
            graph_report(&args, &model, &ci, ci_ms)?
        }
    };
    let text = serde_json::to_string(&doc).map_err(|e| e.to_string())?;
    match &args.out {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

/// The graph of `ci`'s prompt as the flags ask, as the report the fixtures' keys spell.
fn graph_report(args: &Args, model: &SpdModel, ci: &PromptCi, ci_ms: f64) -> Result<Value, String> {
    let th = Thresholds {
        ci: args.ci_threshold,
        output_prob: args.output_prob_threshold,
    };
    let sources = SourceMap::probe(model).map_err(|e| e.to_string())?;
    let max_outputs = args
        .max_outputs_per_position
        .or(default_max_outputs(args.semantics));
    let fast = match args.engine {
        Engine::Reference => None,
        Engine::Fast => match FastEngine::new(model, &sources) {
            Ok(engine) if engine.computes(args.semantics) => Some(engine),
            Ok(_) => match FastEngine::with_backend(model, &sources, Backend::Host) {
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
    let (graph, total) = match (&fast, args.top) {
        (Some(engine), Some(k)) => engine.strongest_graph_with(
            model,
            ci,
            th,
            args.semantics,
            max_outputs,
            k,
            &|_| true,
            &|_, _| {},
        ),
        (Some(engine), None) => engine
            .graph_with(model, ci, th, args.semantics, max_outputs)
            .map(|g| {
                let n = g.edges.len();
                (g, n)
            }),
        (None, top) => reference_graph_with(model, &sources, ci, th, args.semantics, max_outputs)
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
        model,
        &sources,
        ci,
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
    Ok(doc)
}

/// The tokenizer that names tokens in the output: `--tokenizer`, or the run's own.
fn token_names(args: &Args, model: &SpdModel) -> impl Fn(u32) -> String {
    let path = args
        .tokenizer
        .clone()
        .or_else(|| server::tokenizer::find_for(model));
    let tok = path.and_then(|p| tokenizers::Tokenizer::from_file(p).ok());
    move |id| server::tokenizer::token_string(tok.as_ref(), id)
}

/// `--intervene`: the intervention forward on the prompt, or on its fork with `--replace`.
fn intervention(
    args: &Args,
    model: &SpdModel,
    tokens: &[u32],
    mode: &str,
) -> Result<Value, String> {
    model.check_tokens(tokens).map_err(|e| e.to_string())?;
    let mode = Mode::parse(mode, args.factor)?;
    let tokens = fork(model, tokens, &args.replace)?;
    let selected = args
        .nodes
        .iter()
        .map(|k| Selected::parse(k, model, tokens.len()))
        .collect::<Result<Vec<_>, _>>()?;
    if selected.is_empty() && mode == Mode::Keep {
        eprintln!("note: keeping no component runs the model with every mask at 0");
    }
    let start = Instant::now();
    let ci = PromptCi::compute(model, &tokens).map_err(|e| e.to_string())?;
    let iv = Intervention {
        selected,
        mode,
        semantics: args.semantics,
        top_k: args.top_k,
    };
    let out = intervene(model, &ci, &iv).map_err(|e| e.to_string())?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let name = token_names(args, model);
    let mut doc = server::circuit::report::intervention_json(&out, mode, &name);
    let map = doc.as_object_mut().expect("an object");
    map.insert("semantics".into(), json!(args.semantics.name()));
    map.insert("nodes".into(), json!(args.nodes));
    map.insert("replacements".into(), json!(args.replace));
    map.insert("top_k".into(), json!(args.top_k));
    map.insert("timing_ms".into(), json!(ms));
    Ok(doc)
}

/// `--optimize`: CI optimised for the label (or the target's distribution) at `--position`, then
/// the graph of the tokens up to it under the optimised CI, as the other flags ask.
fn optimization(args: &Args, model: &SpdModel, tokens: &[u32]) -> Result<Value, String> {
    let need = |v: Option<f64>, flag: &str| v.ok_or(format!("--optimize needs {flag}"));
    let position = args.position.ok_or("--optimize needs --position")?;
    let recon = match args.loss {
        Loss::Ce => Recon::Ce {
            label: args.label_token.ok_or("--loss ce needs --label-token")?,
        },
        Loss::Kl => Recon::Kl,
    };
    let pgd = match (args.pgd_steps, args.pgd_step_size) {
        (Some(n_steps), Some(step_size)) => Some(Pgd {
            n_steps,
            step_size,
            init: PgdInit::Random,
        }),
        (None, None) => None,
        _ => return Err("PGD needs both --pgd-steps and --pgd-step-size".into()),
    };
    let cfg = OptimConfig {
        position,
        recon,
        loss_coeff: args.loss_coeff,
        imp_min_coeff: need(args.imp_min_coeff, "--imp-min-coeff")?,
        pnorm: need(args.pnorm, "--pnorm")?,
        beta: args.beta,
        steps: args.steps.ok_or("--optimize needs --steps")?,
        lr: args.lr,
        mask_type: args.mask_type.into(),
        pgd,
        seed: args.seed,
    };
    let ci = PromptCi::compute(model, tokens).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let opt = optimize(model, &ci, &cfg, &mut |_| ControlFlow::Continue(()))
        .map_err(|e| e.to_string())?;
    let optim_ms = start.elapsed().as_secs_f64() * 1e3;
    let prompt = optimized_prompt(model, &ci, &opt, position).map_err(|e| e.to_string())?;
    let mut doc = graph_report(args, model, &prompt, 0.0)?;
    let map = doc.as_object_mut().expect("a report is an object");
    // The optimised CI of the whole prompt (the graph's are its first `position + 1` rows).
    map.insert("tokens".into(), json!(tokens));
    map.insert("ci".into(), report::per_module(model, &opt.lower));
    map.insert(
        "ci_upper_leaky".into(),
        report::per_module(model, &opt.upper),
    );
    map.insert(
        "ci_pre_sigmoid".into(),
        report::per_module(model, &opt.pre_sigmoid),
    );
    let alive: serde_json::Map<String, Value> = model
        .modules
        .iter()
        .zip(&opt.alive_counts)
        .map(|(m, c)| (m.name.clone(), json!(c)))
        .collect();
    map.insert("alive_counts".into(), Value::Object(alive));
    map.insert(
        "metrics".into(),
        server::circuit::report::metrics_json(&opt.metrics),
    );
    map.insert(
        "optimization".into(),
        server::circuit::report::optimization_json(&cfg, &opt.metrics, &token_names(args, model)),
    );
    map.insert("graph_tokens".into(), json!(prompt.tokens.len()));
    map.insert("optimization_ms".into(), json!(optim_ms));
    Ok(doc)
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
