//! `bench`: times the attribution engines and the CI pass on a model shaped like the real 1.25M
//! SimpleStories decomposition (random weights, ~2% of CI values > 0), all in one process; then
//! (`--suite pile`, or `all`) on one shaped like spd's Pile LlamaSimpleMLP-4L decomposition, with a
//! layerwise CI network and with the run's global transformer CI.
//!
//! Not a test: run it on an idle machine (`make bench`) and record the machine and load average.

use std::time::Instant;

use app::types::GraphParams;
use clap::Parser;
use server::attribution::strongest;
use server::attribution::{
    Backend, FastEngine, Graph, PromptCi, Semantics, SourceMap, Thresholds, default_max_outputs,
    reference_graph, reference_graph_with,
};
use server::model::SpdModel;
use server::model::synthetic::{Rng, SyntheticSpec, synthetic_model};
use server::web::run::{Hidden, MAX_EDGES, to_wire};

/// Benchmarks the reference and fast attribution engines and the CI pass.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Prompt length for the engine comparison.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Timed repetitions of the fast engine and the CI pass (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Skip the (slow) reference engine.
    #[arg(long)]
    skip_reference: bool,
    /// Which models: the 1.25M SimpleStories shape, the Pile LlamaSimpleMLP-4L shape, or both.
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Suite {
    SimpleStories,
    Pile,
    All,
}

/// Peak resident memory since the last reset, in MiB (Linux; 0 elsewhere).
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn assert_same_edges(fast: &Graph, reference: &Graph, what: &str) {
    assert_eq!(fast.edges.len(), reference.edges.len(), "edge count");
    let scale = reference
        .edges
        .iter()
        .fold(0f64, |m, e| m.max(e.value.abs()))
        .max(1e-30);
    let mut max_rel = 0f64;
    for (a, b) in fast.edges.iter().zip(&reference.edges) {
        assert_eq!(
            (a.source, a.target, a.c_in, a.c_out, a.s_in, a.s_out),
            (b.source, b.target, b.c_in, b.c_out, b.s_in, b.s_out)
        );
        max_rel = max_rel.max((a.value - b.value).abs() / scale);
    }
    assert!(
        max_rel <= 1e-4,
        "{what}: values differ by {max_rel:e} of the largest |edge|"
    );
    println!(
        "  check: {what} ({} edges, max difference {max_rel:.1e} of max |edge|)",
        fast.edges.len()
    );
}

/// The wire form of `graph` as the server sends it (edges already selected).
fn wire(
    model: &SpdModel,
    tokens: &[u32],
    ci: &PromptCi,
    graph: &Graph,
    total: usize,
    params: GraphParams,
) -> app::types::GraphData {
    to_wire(
        model,
        None,
        vec![String::new(); tokens.len()],
        ci,
        graph,
        total,
        params,
        &Hidden::none(),
        None,
        &|t| t.to_string(),
    )
}

/// What the server does for one request once the CI pass is done.
fn view(
    fast: &FastEngine,
    model: &SpdModel,
    tokens: &[u32],
    ci: &PromptCi,
    th: Thresholds,
    params: GraphParams,
) -> app::types::GraphData {
    let (top, total) = fast
        .strongest_graph(model, ci, th, MAX_EDGES, &|_| true, &|_, _| {})
        .expect("strongest graph");
    wire(model, tokens, ci, &top, total, params)
}

/// The trace of the last position beside the plain view (both the server's request after the CI
/// pass: engine, selection, wire form), and the page's pruning of the traced graph at the default
/// thresholds, at each prompt length.
fn trace_vs_view(fast: &FastEngine, model: &SpdModel, lens: &[usize], rng: &mut Rng, reps: usize) {
    use app::types::TraceTarget;
    let th = Thresholds {
        ci: 0.1,
        output_prob: 0.01,
    };
    let params = GraphParams {
        output_prob_threshold: 0.01,
        ..GraphParams::default()
    };
    println!(
        "
trace of the last position beside the plain view (ci_threshold 0.1):"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>11} {:>9} {:>10} {:>12}",
        "tokens", "edges", "view_s", "traced_s", "traced/view", "prune_ms", "kept", "completeness"
    );
    for &n in lens {
        let tokens: Vec<u32> = (0..n)
            .map(|_| rng.below(model.vocab_size()) as u32)
            .collect();
        let ci = PromptCi::compute(model, &tokens).expect("ci");
        let reps = if n >= 512 { 1 } else { reps };
        let mut total = 0;
        let view_s = median_secs(reps, || {
            total = view(fast, model, &tokens, &ci, th, params).total_edges;
        });
        let mut traced = None;
        let traced_s = median_secs(reps, || {
            let (g, trace, total) = fast
                .traced_graph(
                    model,
                    &ci,
                    th,
                    Semantics::Seed,
                    None,
                    TraceTarget::Last,
                    MAX_EDGES,
                    &|_| true,
                    &|_, _| {},
                )
                .expect("traced graph");
            traced = Some(to_wire(
                model,
                None,
                vec![String::new(); tokens.len()],
                &ci,
                &g,
                total,
                GraphParams {
                    trace: Some(TraceTarget::Last),
                    ..params
                },
                &Hidden::none(),
                Some(&trace),
                &|t| t.to_string(),
            ));
        });
        let traced = traced.expect("ran at least once");
        let mut pruned = None;
        let prune_s = median_secs(reps, || {
            pruned = app::trace::prune(
                &traced,
                app::trace::DEFAULT_NODE_THRESHOLD,
                app::trace::DEFAULT_EDGE_THRESHOLD,
            );
        });
        let p = pruned.expect("a traced graph");
        println!(
            "{n:>8} {total:>10} {view_s:>10.4} {traced_s:>10.4} {:>11.2} {:>9.2} {:>10} {:>12.3}",
            traced_s / view_s,
            prune_s * 1e3,
            format!("{}/{}", p.nodes.len(), traced.nodes.len()),
            p.completeness
        );
    }
}

/// The server's view under both semantics (no normalisation: the running selection), seed and app
/// side by side at each prompt length, and the ratio; with `check`, the app's whole graph from the
/// fast engine against the reference's at the first length.
fn app_vs_seed(
    fast: &FastEngine,
    model: &SpdModel,
    sources: &SourceMap,
    lens: &[usize],
    rng: &mut Rng,
    reps: usize,
    check: bool,
) {
    let th = Thresholds {
        ci: 0.1,
        output_prob: 0.01,
    };
    println!(
        "\napp semantics beside the seed's (the server's view, ci_threshold 0.1, output_prob 0.01):"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "tokens", "seed_edges", "app_edges", "seed_s", "app_s", "app/seed"
    );
    for (i, &n) in lens.iter().enumerate() {
        let tokens: Vec<u32> = (0..n)
            .map(|_| rng.below(model.vocab_size()) as u32)
            .collect();
        let ci = PromptCi::compute(model, &tokens).expect("ci");
        let run = |semantics: Semantics| {
            fast.strongest_graph_with(
                model,
                &ci,
                th,
                semantics,
                default_max_outputs(semantics),
                MAX_EDGES,
                &|_| true,
                &|_, _| {},
            )
            .expect("graph")
            .1
        };
        let (mut seed_edges, mut app_edges) = (0, 0);
        let seed_s = median_secs(reps, || seed_edges = run(Semantics::Seed));
        let app_s = median_secs(reps, || app_edges = run(Semantics::App));
        println!(
            "{n:>8} {seed_edges:>10} {app_edges:>10} {seed_s:>10.4} {app_s:>10.4} {:>10.1}",
            app_s / seed_s
        );
        if check && i == 0 {
            let cap = default_max_outputs(Semantics::App);
            let got = fast
                .graph_with(model, &ci, th, Semantics::App, cap)
                .expect("app graph");
            let t = Instant::now();
            let want = reference_graph_with(model, sources, &ci, th, Semantics::App, cap)
                .expect("reference app graph");
            println!(
                "  reference engine, app semantics: {:.2} s ({} backward passes)",
                t.elapsed().as_secs_f64(),
                want.n_backward_passes
            );
            assert_same_edges(&got, &want, "fast == reference, app semantics");
        }
    }
}

/// The intervention forward's latency and one optimisation step's time (CE on the last position's
/// most probable token, CI masks, the app's settings) at each prompt length.
fn circuit(model: &SpdModel, what: &str, lens: &[usize], rng: &mut Rng, reps: usize) {
    use server::circuit::{
        Intervention, Mode, OptimConfig, Selected, intervene, intervene_with, optimize,
    };
    println!(
        "\n{what}: intervention forward (keep 5 nodes, top 10; with the CI-masked probabilities \
         given, as a graph has them, and computed) and CI optimisation steps:"
    );
    println!(
        "{:>8} {:>16} {:>16} {:>14} {:>10}",
        "tokens", "intervention_ms", "+ci_masked_ms", "optim_step_ms", "alive"
    );
    for &n in lens {
        let n = n.min(model.block_size());
        let tokens: Vec<u32> = (0..n)
            .map(|_| rng.below(model.vocab_size()) as u32)
            .collect();
        let ci = PromptCi::compute(model, &tokens).expect("ci");
        let selected: Vec<Selected> = (0..5)
            .map(|i| Selected {
                module: i % model.modules.len(),
                pos: Some(i % n),
                c: i,
            })
            .collect();
        let iv = Intervention {
            selected,
            mode: Mode::Keep,
            semantics: Semantics::Seed,
            top_k: 10,
        };
        let tok = server::model::transformer::tokens_tensor(&tokens, model.device()).expect("t");
        let masked: Vec<Vec<f32>> = server::model::transformer::softmax_last(
            &model
                .masked_logits(&tok, &ci.lower_tensors, false)
                .expect("masked"),
        )
        .and_then(|p| p.squeeze(0)?.to_vec2())
        .expect("probs");
        let iv_s = median_secs(reps, || {
            intervene_with(model, &ci, &iv, Some(&masked)).expect("intervention");
        });
        let full_s = median_secs(reps, || {
            intervene(model, &ci, &iv).expect("intervention");
        });
        let last = &ci.target_probs[n - 1];
        let label = (0..last.len())
            .max_by(|a, b| last[*a].total_cmp(&last[*b]))
            .unwrap_or(0) as u32;
        let steps = 10;
        let cfg = OptimConfig::ce(n - 1, label, steps, 1e-3, 0.3);
        let step_s = median_secs(reps.min(3), || {
            optimize(model, &ci, &cfg, &mut |_| {
                std::ops::ControlFlow::Continue(())
            })
            .expect("optimize");
        }) / steps as f64;
        let alive: usize = ci
            .lower
            .iter()
            .flatten()
            .map(|r| r.iter().filter(|v| **v > 0.0).count())
            .sum();
        println!(
            "{n:>8} {:>16.2} {:>16.2} {:>14.2} {alive:>10}",
            iv_s * 1e3,
            full_s * 1e3,
            step_s * 1e3
        );
    }
}

fn main() {
    let args = Args::parse();
    if args.suite != Suite::Pile {
        simple_stories(&args);
    }
    if args.suite != Suite::SimpleStories {
        pile(&args);
    }
}

/// The Pile-shaped model: CI pass and the server's view (strongest 30,000 edges) at 32 / 128 / 512
/// tokens with peak memory; then the CI pass alone with the global transformer CI.
fn pile(args: &Args) {
    let spec = SyntheticSpec::pile_llama_mlp_4l();
    println!("\nPile-shaped model: {spec:?}");
    reset_peak();
    let t = Instant::now();
    let model = synthetic_model(&spec).expect("build the Pile-shaped model");
    let sources = SourceMap::probe(&model).expect("probe sources");
    let fast = FastEngine::new(&model, &sources).expect("fast engine");
    println!(
        "built in {:.1} s ({} components, {:.0} MiB peak); backend {:?}",
        t.elapsed().as_secs_f64(),
        model.total_c(),
        peak_mib(),
        fast.backend()
    );
    let mut rng = Rng::new(11);
    let th = Thresholds {
        ci: 0.1,
        output_prob: 0.01,
    };
    let params = GraphParams {
        output_prob_threshold: 0.01,
        ..GraphParams::default()
    };
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "tokens", "alive", "edges", "ci_pass_s", "view_s", "peak_MiB"
    );
    for n in [32usize, 128, 512] {
        let tokens: Vec<u32> = (0..n).map(|_| rng.below(spec.vocab_size) as u32).collect();
        let reps = if n >= 512 { 1 } else { args.reps.min(3) };
        reset_peak();
        let ci_s = median_secs(reps, || {
            PromptCi::compute(&model, &tokens).expect("ci");
        });
        let ci = PromptCi::compute(&model, &tokens).expect("ci");
        let alive: usize = ci
            .lower
            .iter()
            .flatten()
            .map(|row| row.iter().filter(|v| **v >= th.ci).count())
            .sum();
        let mut edges = 0;
        let view_s = median_secs(reps, || {
            edges = view(&fast, &model, &tokens, &ci, th, params).total_edges;
        }) + ci_s;
        println!(
            "{n:>8} {alive:>10} {edges:>10} {ci_s:>10.4} {view_s:>10.4} {:>9.0}",
            peak_mib()
        );
    }
    app_vs_seed(
        &fast,
        &model,
        &sources,
        &[32, 128],
        &mut rng,
        args.reps.min(3),
        false,
    );
    trace_vs_view(&fast, &model, &[32, 128, 512], &mut rng, args.reps.min(3));
    drop((fast, model));

    let spec = SyntheticSpec::pile_transformer_ci();
    println!("\nthe same model with a global shared-transformer CI (d_model 2048, 8 blocks):");
    let t = Instant::now();
    let model = synthetic_model(&spec).expect("build the transformer-CI model");
    println!("built in {:.1} s", t.elapsed().as_secs_f64());
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>9}",
        "tokens", "ci_pass_s", "target_s", "ci/target", "peak_MiB"
    );
    for n in [32usize, 128, 512] {
        let tokens: Vec<u32> = (0..n).map(|_| rng.below(spec.vocab_size) as u32).collect();
        let tok = server::model::transformer::tokens_tensor(&tokens, model.device()).expect("t");
        let reps = if n >= 512 { 1 } else { args.reps.min(3) };
        reset_peak();
        let ci_s = median_secs(reps, || {
            model.ci(&tok).expect("ci");
        });
        let target_s = median_secs(reps, || {
            model
                .target
                .forward(&tok, &mut server::model::transformer::PlainForward)
                .expect("forward");
        });
        println!(
            "{n:>8} {ci_s:>12.4} {target_s:>12.4} {:>12.1} {:>9.0}",
            ci_s / target_s,
            peak_mib()
        );
    }
}

fn simple_stories(args: &Args) {
    let spec = SyntheticSpec::simple_stories_1m();
    println!("bench model: {spec:?}");
    let t = Instant::now();
    let model: SpdModel = synthetic_model(&spec).expect("build the bench model");
    let sources = SourceMap::probe(&model).expect("probe sources");
    let fast = FastEngine::with_backend(&model, &sources, Backend::Host).expect("fast engine");
    // The GPU's backend, run here on the CPU: how much the batching costs where it is not needed.
    let tensor =
        FastEngine::with_backend(&model, &sources, Backend::Tensor).expect("tensor backend");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "built in {:.1} s; {threads} threads",
        t.elapsed().as_secs_f64()
    );
    let mut rng = Rng::new(7);
    let prompt = |n: usize, rng: &mut Rng| -> Vec<u32> {
        (0..n).map(|_| rng.below(spec.vocab_size) as u32).collect()
    };
    let tokens = prompt(args.tokens, &mut rng);

    println!(
        "\n{:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>9} {:>9}",
        "ci_thr",
        "tokens",
        "edges",
        "ci_pass_s",
        "fast_s",
        "tensor_s",
        "ref_s",
        "ref/fast",
        "edges/s",
        "peak_MiB"
    );
    for ci_thr in [0.1f32, 1e-6] {
        let th = Thresholds {
            ci: ci_thr,
            output_prob: 0.01,
        };
        reset_peak();
        let ci_s = median_secs(args.reps, || {
            PromptCi::compute(&model, &tokens).expect("ci");
        });
        let ci = PromptCi::compute(&model, &tokens).expect("ci");
        let mut graph = None;
        let fast_s = median_secs(args.reps, || {
            graph = Some(fast.graph(&model, &ci, th).expect("fast graph"))
        });
        let graph = graph.expect("ran at least once");
        let fast_peak = peak_mib();
        let mut on_tensors = None;
        let tensor_s = median_secs(args.reps, || {
            on_tensors = Some(tensor.graph(&model, &ci, th).expect("tensor graph"))
        });
        assert_same_edges(
            &on_tensors.expect("ran at least once"),
            &graph,
            "tensor backend == host backend",
        );
        let (ref_s, ratio) = if args.skip_reference {
            (f64::NAN, f64::NAN)
        } else {
            let t = Instant::now();
            let reference = reference_graph(&model, &sources, &ci, th).expect("reference graph");
            let s = t.elapsed().as_secs_f64();
            println!(
                "  reference: {} backward passes",
                reference.n_backward_passes
            );
            assert_same_edges(&graph, &reference, "fast == reference");
            (s, s / fast_s)
        };
        let params = GraphParams {
            ci_threshold: ci_thr,
            output_prob_threshold: 0.01,
            ..GraphParams::default()
        };
        // The server's request: the strongest 30,000 edges to the wire form, from the whole graph
        // computed above (what it did before) and from the engine's running selection (what it
        // does now); both must give the same page.
        let mut from_whole = None;
        let whole_s = median_secs(args.reps, || {
            let mut top = graph.clone();
            top.edges = strongest(&graph.edges, |_| true, MAX_EDGES);
            from_whole = Some(wire(&model, &tokens, &ci, &top, graph.edges.len(), params));
        }) + fast_s;
        let mut from_engine = None;
        let view_s = median_secs(args.reps, || {
            from_engine = Some(view(&fast, &model, &tokens, &ci, th, params));
        });
        assert_eq!(from_whole, from_engine, "the server's graph");
        println!(
            "  the server's view (CI-masked forward, edges, strongest 30,000, wire form): {view_s:.4} s \
             (whole graph, then select: {whole_s:.4} s)"
        );
        let n_edges = graph.edges.len();
        let cross = graph.edges.iter().filter(|e| e.is_cross_seq).count();
        println!(
            "{:>10} {:>8} {:>10} {:>10.4} {:>10.4} {:>10.4} {:>8.2} {:>12.1} {:>9.2e} {:>9.0}",
            ci_thr,
            tokens.len(),
            n_edges,
            ci_s,
            fast_s,
            tensor_s,
            ref_s,
            ratio,
            n_edges as f64 / fast_s,
            fast_peak
        );
        println!("  ({cross} cross-position edges)");
    }

    println!("\nfast engine at longer prompts (ci_threshold 0.1, output_prob 0.01):");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9}",
        "tokens", "edges", "ci_pass_s", "fast_s", "peak_MiB", "view_s", "peak_MiB"
    );
    for n in [128usize, spec.block_size] {
        let tokens = prompt(n, &mut rng);
        let th = Thresholds {
            ci: 0.1,
            output_prob: 0.01,
        };
        reset_peak();
        let ci_s = median_secs(args.reps.min(3), || {
            PromptCi::compute(&model, &tokens).expect("ci");
        });
        let ci = PromptCi::compute(&model, &tokens).expect("ci");
        let params = GraphParams {
            output_prob_threshold: 0.01,
            ..GraphParams::default()
        };
        reset_peak();
        let view_s = median_secs(args.reps.min(3), || {
            view(&fast, &model, &tokens, &ci, th, params);
        });
        let view_peak = peak_mib();
        reset_peak();
        let mut n_edges = 0;
        let fast_s = median_secs(args.reps.min(3), || {
            n_edges = fast.graph(&model, &ci, th).expect("graph").edges.len()
        });
        println!(
            "{:>8} {:>10} {:>10.4} {:>10.4} {:>9.0} {:>10.4} {:>9.0}",
            n,
            n_edges,
            ci_s,
            fast_s,
            peak_mib(),
            view_s,
            view_peak
        );
    }
    app_vs_seed(
        &fast,
        &model,
        &sources,
        &[32, 128],
        &mut rng,
        args.reps,
        !args.skip_reference,
    );
    trace_vs_view(&fast, &model, &[32, 128, 512], &mut rng, args.reps.min(3));
    circuit(&model, "1.25M bench model", &[16, 32], &mut rng, args.reps);
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/run");
    match SpdModel::load(&demo, &candle_core::Device::Cpu) {
        Ok(m) => circuit(&m, "demo model", &[16, 32], &mut rng, args.reps),
        Err(e) => println!("demo model not loaded ({e})"),
    }
}
