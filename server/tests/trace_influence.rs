//! Influence (issue "Reading big graphs"): the trace the fast engine folds while it computes equals
//! the whole-graph trace over the same graph's edges in memory, on random models of every family,
//! both semantics, both backends, and every kind of target (the last position's outputs, one
//! output token below the output threshold, a logit difference); and the folded selection of the
//! highest-scoring edges is the prefix of the whole graph's edges sorted by score.

use std::collections::HashMap;

use app::types::{Semantics, TraceTarget};
use server::attribution::influence::{GraphTrace, NodeIndex, Seeds};
use server::attribution::{Backend, Edge, FastEngine, Layer, PromptCi, SourceMap, Thresholds};
use server::model::synthetic::{Rng, SyntheticSpec, synthetic_model};
use server::model::transformer::Family;

type Key = (Layer, Layer, u32, u32, u32, u32);

fn key(e: &Edge) -> Key {
    (e.source, e.target, e.c_in, e.c_out, e.s_in, e.s_out)
}

#[test]
fn folded_trace_equals_the_whole_graph_trace() {
    let mut rng = Rng::new(77);
    let families = [
        Family::Gpt2Simple,
        Family::LlamaSimpleMlp,
        Family::LlamaSimple,
    ];
    let mut checked = 0;
    for case in 0..24 {
        let family = families[case % 3];
        let n_head = [1, 2][rng.below(2)];
        let spec = SyntheticSpec {
            n_layer: 1 + rng.below(2),
            n_head,
            n_embd: n_head * 4,
            family,
            n_kv_head: None,
            biases: family == Family::Gpt2Simple,
            vocab_size: 20 + rng.below(20),
            block_size: 16,
            c: 4 + rng.below(8),
            ci_hidden: vec![4],
            ci_active_frac: 0.3 + 0.3 * rng.uniform(),
            seed: rng.next_u64(),
            use_delta_component: true,
            ..SyntheticSpec::simple_stories_1m()
        };
        let model = synthetic_model(&spec).unwrap();
        let sources = SourceMap::probe(&model).unwrap();
        let len = 2 + rng.below(7);
        let tokens: Vec<u32> = (0..len)
            .map(|_| rng.below(spec.vocab_size) as u32)
            .collect();
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let th = Thresholds {
            ci: 0.05,
            output_prob: 0.05,
        };
        let semantics = if case % 4 == 3 {
            Semantics::App
        } else {
            Semantics::Seed
        };
        let backend =
            if family == Family::Gpt2Simple && case % 2 == 0 && semantics == Semantics::Seed {
                Backend::Tensor
            } else {
                Backend::Host
            };
        let engine = FastEngine::with_backend(&model, &sources, backend).unwrap();
        let pos = rng.below(len) as u32;
        let (a, b) = (
            rng.below(spec.vocab_size) as u32,
            rng.below(spec.vocab_size) as u32,
        );
        let target = match case % 3 {
            0 => TraceTarget::Last,
            1 => TraceTarget::Token { pos, token: a },
            _ if a != b => TraceTarget::Diff { pos, a, b },
            _ => TraceTarget::Last,
        };
        // Some cases hide a few components, as the server's max-mean-CI filter does.
        let hide = case % 5 == 4;
        let keep = move |e: &Edge| !hide || (e.c_in % 3 != 1 && e.c_out % 3 != 1);
        let traced = |k: usize| {
            engine.traced_graph(
                &model,
                &ci,
                th,
                semantics,
                None,
                target,
                k,
                &keep,
                &|_, _| {},
            )
        };
        let (graph, trace, total) = match traced(usize::MAX) {
            Ok(x) => x,
            // A last position without outputs above the threshold has nothing to trace.
            Err(e) => {
                assert!(matches!(target, TraceTarget::Last), "{e}");
                continue;
            }
        };
        let whole = engine
            .graph_forcing(&model, &ci, th, semantics, None, &target.needed_outputs())
            .unwrap();
        assert_eq!(whole.edges.len(), total);
        assert_eq!(whole.alive, graph.alive);
        let n = model.modules.len();
        let kept: Vec<Edge> = whole.edges.iter().filter(|e| keep(e)).copied().collect();
        let outputs = &whole.alive[whole.alive.len() - 1];
        let seeds = Seeds::resolve(target, outputs, &whole.masked_probs).unwrap();
        assert_eq!(seeds, trace.seeds);
        let want = GraphTrace::of_edges(&whole.alive, n, &kept, seeds);
        let index = NodeIndex::new(&whole.alive);
        assert_eq!(trace.node.len(), index.len());
        let scale = want.node.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, (got, want)) in trace.node.iter().zip(&want.node).enumerate() {
            assert!(
                (got - want).abs() <= 1e-9 * scale.max(1.0),
                "case {case}: node {i}: {got} vs {want}"
            );
        }
        // Every edge that carries influence, with its score.
        let want_scores: HashMap<Key, f64> = kept
            .iter()
            .zip(&want.edge)
            .filter(|(_, s)| **s > 0.0)
            .map(|(e, s)| (key(e), *s))
            .collect();
        assert_eq!(graph.edges.len(), want_scores.len(), "case {case}");
        for (e, s) in graph.edges.iter().zip(&trace.edge) {
            let w = want_scores[&key(e)];
            assert!(
                (s - w).abs() <= 1e-9 * w.max(1e-12),
                "case {case}: {s} vs {w}"
            );
        }
        assert!(trace.edge.windows(2).all(|w| w[0] >= w[1]), "by score");
        assert!(
            (trace.total_edge_score - want.total_edge_score).abs()
                <= 1e-9 * want.total_edge_score.max(1.0)
        );
        // The targets' influence is their weight; the inputs carry all of it at the bottom.
        let total_infl = trace.total_influence(&graph.alive, n);
        assert!(total_infl.is_finite() && total_infl >= 0.0);
        checked += 1;

        // A small selection is the prefix of the whole ranking.
        let k = 1 + graph.edges.len() / 3;
        let (small, small_trace, _) = traced(k).unwrap();
        assert_eq!(small.edges.len(), k.min(graph.edges.len()));
        for (j, s) in small_trace.edge.iter().enumerate() {
            assert!((s - trace.edge[j]).abs() <= 1e-9 * s.max(1e-12));
        }
    }
    assert!(checked >= 15, "only {checked} cases had something to trace");
}

/// The difference `a − b`: a source whose edges into both sides are equal has no influence.
#[test]
fn a_logit_difference_cancels_what_both_sides_share() {
    use server::attribution::influence::trace;
    let edge = |src: (Layer, u32), tgt: u32, value: f64| Edge {
        source: src.0,
        target: Layer::Output,
        c_in: src.1,
        c_out: tgt,
        s_in: 0,
        s_out: 0,
        value,
        is_cross_seq: false,
    };
    let (x, y) = ((Layer::Module(0), 1), (Layer::Module(0), 2));
    let into_x = |v: f64| Edge {
        source: Layer::Wte,
        target: Layer::Module(0),
        c_in: 0,
        c_out: 1,
        s_in: 0,
        s_out: 0,
        value: v,
        is_cross_seq: false,
    };
    let edges = vec![
        into_x(2.0),
        edge(x, 5, 2.0),
        edge(x, 6, 2.0), // x moves both logits alike
        edge(y, 5, 3.0),
        edge(y, 6, -1.0), // y: a difference of 4
    ];
    let t = trace(&edges, &Seeds::Diff { pos: 0, a: 5, b: 6 });
    assert_eq!(t.influence.get(&(Layer::Module(0), 0, 1)).copied(), None);
    assert!((t.influence[&(Layer::Module(0), 0, 2)] - 1.0).abs() < 1e-12);
    assert_eq!(t.influence.get(&(Layer::Wte, 0, 0)), None);
    // y's score splits 3 : 1 between its two edges; x's edges carry nothing.
    assert_eq!(&t.scores[1..], &[0.0, 0.0, 0.75, 0.25]);
    // One side only: both sources count, by |value|.
    let t = trace(&edges, &Seeds::Nodes(vec![((Layer::Output, 0, 5), 1.0)]));
    assert!((t.influence[&(Layer::Module(0), 0, 1)] - 0.4).abs() < 1e-12);
    assert!((t.influence[&(Layer::Module(0), 0, 2)] - 0.6).abs() < 1e-12);
    assert!((t.influence[&(Layer::Wte, 0, 0)] - 0.4).abs() < 1e-12);
}

/// A chain passes everything down; a diamond splits and joins again.
#[test]
fn chains_pass_everything_and_diamonds_add_up() {
    use server::attribution::influence::trace;
    let e = |s: (Layer, u32), t: (Layer, u32), v: f64| Edge {
        source: s.0,
        target: t.0,
        c_in: s.1,
        c_out: t.1,
        s_in: 0,
        s_out: 0,
        value: v,
        is_cross_seq: false,
    };
    let w = (Layer::Wte, 0);
    let (m0, m1, m2) = (
        (Layer::Module(0), 0),
        (Layer::Module(1), 0),
        (Layer::Module(2), 0),
    );
    let out = (Layer::Output, 7);
    let chain = [e(w, m0, -3.0), e(m0, m1, 0.5), e(m1, out, 2.0)];
    let t = trace(&chain, &Seeds::Nodes(vec![((Layer::Output, 0, 7), 1.0)]));
    for n in [w, m0, m1] {
        assert!((t.influence[&(n.0, 0, n.1)] - 1.0).abs() < 1e-12);
    }
    assert_eq!(t.scores, vec![1.0, 1.0, 1.0]);
    // w → m0 → m2, w → m1 → m2 with shares 1/4 and 3/4 at m2, then m2 → out.
    let diamond = [
        e(w, m0, 1.0),
        e(w, m1, 1.0),
        e(m0, m2, -1.0),
        e(m1, m2, 3.0),
        e(m2, out, 1.0),
    ];
    let t = trace(&diamond, &Seeds::Nodes(vec![((Layer::Output, 0, 7), 0.5)]));
    assert!((t.influence[&(Layer::Module(0), 0, 0)] - 0.125).abs() < 1e-12);
    assert!((t.influence[&(Layer::Module(1), 0, 0)] - 0.375).abs() < 1e-12);
    assert!((t.influence[&(Layer::Wte, 0, 0)] - 0.5).abs() < 1e-12);
}
