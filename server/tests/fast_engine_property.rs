//! Property test: on random small models of every family (GPT2Simple, LlamaSimpleMLP, LlamaSimple:
//! LayerNorm or RMSNorm, learned or rotary positions, GELU or SwiGLU, shared K/V heads, biases or
//! none), random shapes, a C per module, all three layerwise CI-fn types and the global shared MLP /
//! transformer, random prompts and thresholds, the fast engine gives the reference engine's edges:
//! same set, same order, values within 1e-4 of the largest |edge|; with identities inserted in front
//! of some projections too. Both backends on GPT2Simple; the host backend on the Llama families and
//! on models with identities (the tensor backend refuses them).

use server::attribution::{
    Backend, Edge, FastEngine, Graph, Layer, PromptCi, Semantics, SourceMap, Thresholds,
    reference_graph, reference_graph_with, strongest,
};
use server::model::config::{
    AttnConfig, CiFnType, GlobalCiConfig, GlobalCiFnType, TransformerCiConfig,
};
use server::model::synthetic::{Rng, SyntheticSpec, synthetic_model};
use server::model::transformer::Family;

#[test]
fn fast_engine_equals_reference_on_random_models() {
    let mut rng = Rng::new(2024);
    let kinds = [CiFnType::SharedMlp, CiFnType::VectorMlp, CiFnType::Mlp];
    let mut total_edges = 0;
    let mut identity_edges = 0;
    let mut app_edges = 0;
    let families = [
        Family::Gpt2Simple,
        Family::LlamaSimpleMlp,
        Family::LlamaSimple,
    ];
    for case in 0..60 {
        let n_head = [1, 2, 4][rng.below(3)];
        let family = families[case % 3];
        let n_kv_head = [1, 2, 4]
            .into_iter()
            .filter(|k| n_head % k == 0)
            .nth(rng.below(2));
        let spec = SyntheticSpec {
            n_layer: 1 + rng.below(2),
            n_head,
            n_embd: n_head * [2, 4, 8][rng.below(3)],
            family,
            n_kv_head,
            biases: family == Family::Gpt2Simple || rng.below(2) == 0,
            vocab_size: 20 + rng.below(30),
            block_size: 16,
            c: 3 + rng.below(10),
            ci_fn_type: kinds[case % 3],
            ci_hidden: (0..1 + rng.below(2)).map(|_| 2 + rng.below(5)).collect(),
            ci_active_frac: 0.2 + 0.4 * rng.uniform(),
            seed: rng.next_u64(),
            // Mostly with deltas, whose paths the app's semantics follow.
            use_delta_component: case % 4 != 2,
            module_c: (case % 2 == 1).then(|| (0..14).map(|_| 2 + rng.below(9)).collect()),
            global_ci: match case % 7 {
                3 => Some(global(GlobalCiFnType::SharedMlp, &mut rng)),
                4 => Some(global(GlobalCiFnType::SharedTransformer, &mut rng)),
                _ => None,
            },
            // Identities in front of residual readers, o_proj and down_proj.
            identities: match case % 5 {
                1 => vec!["h.0.attn.*".into(), "h.*.mlp.down_proj".into()],
                3 => vec!["h.*.attn.o_proj".into(), "h.0.attn.k_proj".into()],
                _ => vec![],
            },
        };
        let model = synthetic_model(&spec).unwrap();
        let sources = SourceMap::probe(&model).unwrap();
        let len = 1 + rng.below(10);
        let tokens: Vec<u32> = (0..len)
            .map(|_| rng.below(spec.vocab_size) as u32)
            .collect();
        let th = Thresholds {
            ci: [0.0, 1e-6, 0.05, 0.3][rng.below(4)],
            output_prob: [0.01, 0.05, 0.2][rng.below(3)],
        };
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let want = reference_graph(&model, &sources, &ci, th).unwrap();
        let cap = [None, Some(1), Some(3)][rng.below(3)];
        let want_app =
            reference_graph_with(&model, &sources, &ci, th, Semantics::App, cap).unwrap();
        app_edges += want_app.edges.len();
        let backends: &[Backend] = if family == Family::Gpt2Simple && spec.identities.is_empty() {
            &[Backend::Host, Backend::Tensor]
        } else {
            assert!(FastEngine::with_backend(&model, &sources, Backend::Tensor).is_err());
            &[Backend::Host]
        };
        for &backend in backends {
            let fast = FastEngine::with_backend(&model, &sources, backend).unwrap();
            let got = fast.graph(&model, &ci, th).unwrap();
            // The server's selection from the engine equals selecting from the whole graph.
            let keep = |e: &Edge| e.c_in % 3 != 1 || e.source == Layer::Wte;
            for k in [0, 1, 7, 100, got.edges.len() + 1] {
                let (top, total) = fast
                    .strongest_graph(&model, &ci, th, k, &keep, &|_, _| {})
                    .unwrap();
                assert_eq!(total, got.edges.len());
                assert_eq!(
                    top.edges,
                    strongest(&got.edges, keep, k),
                    "case {case} k {k}"
                );
            }
            let what = format!("case {case} {backend:?}: {spec:?} tokens {tokens:?} {th:?}");
            assert_same(&got, &want, &what);
            // The app's semantics: the host backend computes it, the tensor backend refuses.
            let got_app = fast.graph_with(&model, &ci, th, Semantics::App, cap);
            match backend {
                Backend::Host => assert_same(&got_app.unwrap(), &want_app, &format!("{what} app")),
                Backend::Tensor => assert!(got_app.is_err()),
            }
        }
        total_edges += want.edges.len();
        let is_identity =
            |l: Layer| matches!(l, Layer::Module(i) if model.modules[i].id.pre_identity);
        identity_edges += want
            .edges
            .iter()
            .filter(|e| is_identity(e.source) || is_identity(e.target))
            .count();
    }
    assert!(app_edges > 1000, "app semantics: {app_edges} edges");
    assert!(
        identity_edges > 200,
        "the cases should exercise identities, got {identity_edges} edges"
    );
    assert!(
        total_edges > 1000,
        "the cases should exercise many edges, got {total_edges}"
    );
}

/// The same output probabilities, the same edges in the same order, values within 1e-4 of the
/// largest |edge|.
fn assert_same(got: &Graph, want: &Graph, what: &str) {
    assert_eq!(got.masked_probs, want.masked_probs, "{what}");
    assert_eq!(got.alive, want.alive, "{what}");
    assert_eq!(got.edges.len(), want.edges.len(), "{what}");
    let scale = want
        .edges
        .iter()
        .fold(0f64, |m, e| m.max(e.value.abs()))
        .max(1e-12);
    for (g, w) in got.edges.iter().zip(&want.edges) {
        let key = |e: &Edge| {
            (
                e.source,
                e.target,
                e.c_in,
                e.c_out,
                e.s_in,
                e.s_out,
                e.is_cross_seq,
            )
        };
        assert_eq!(key(g), key(w), "{what}");
        // Plus float32 noise in absolute terms: in an RMSNorm model a `wte` edge into block 0 is
        // exactly zero (the norm is scale-invariant and the residual there is the embedding), so
        // a graph of only such edges has no scale of its own.
        assert!(
            (g.value - w.value).abs() <= 1e-4 * scale + 1e-6,
            "{what}: {g:?} vs {w:?}"
        );
    }
}

/// Without deltas the app's semantics differ from the seed's only in the forward they
/// differentiate (all masks 1, not the CI), the alive rule and the output cap: with every CI at 1,
/// no cap and a threshold no value sits on, the two graphs are the same.
#[test]
fn without_deltas_the_app_semantics_reduce_to_the_seeds() {
    for family in [
        Family::Gpt2Simple,
        Family::LlamaSimpleMlp,
        Family::LlamaSimple,
    ] {
        let spec = SyntheticSpec {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            vocab_size: 30,
            block_size: 16,
            c: 6,
            ci_hidden: vec![4],
            family,
            use_delta_component: false,
            ..SyntheticSpec::simple_stories_1m()
        };
        let model = synthetic_model(&spec).unwrap();
        let sources = SourceMap::probe(&model).unwrap();
        let mut ci = PromptCi::compute(&model, &[3, 1, 4, 1, 5, 9, 2, 6]).unwrap();
        for m in &mut ci.lower {
            for row in m.iter_mut() {
                row.fill(1.0);
            }
        }
        ci.lower_tensors = model.ones_masks(8).unwrap();
        let th = Thresholds {
            ci: 0.5,
            output_prob: 0.031,
        };
        let fast = FastEngine::with_backend(&model, &sources, Backend::Host).unwrap();
        let seed = fast.graph(&model, &ci, th).unwrap();
        let app = fast
            .graph_with(&model, &ci, th, Semantics::App, None)
            .unwrap();
        assert!(seed.edges.len() > 100, "{family:?}");
        assert_same(&app, &seed, &format!("{family:?}"));
    }
}

/// A prompt filling the whole context runs through both engines; one token more is refused.
#[test]
fn full_context_prompt_runs_and_longer_is_refused() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_mlp");
    let model = server::model::SpdModel::load(&dir, &candle_core::Device::Cpu).unwrap();
    let sources = SourceMap::probe(&model).unwrap();
    let tokens: Vec<u32> = (0..model.block_size() as u32)
        .map(|i| (i * 7) % 96)
        .collect();
    let ci = PromptCi::compute(&model, &tokens).unwrap();
    let th = Thresholds {
        ci: 0.5,
        output_prob: 0.2,
    };
    let reference = reference_graph(&model, &sources, &ci, th).unwrap();
    for backend in [Backend::Host, Backend::Tensor] {
        let fast = FastEngine::with_backend(&model, &sources, backend)
            .unwrap()
            .graph(&model, &ci, th)
            .unwrap();
        assert_eq!(fast.edges.len(), reference.edges.len(), "{backend:?}");
        assert!(
            fast.edges
                .iter()
                .any(|e| e.s_out == 63 && e.s_in < 63 && e.is_cross_seq)
        );
    }
    let mut longer = tokens.clone();
    longer.push(1);
    let err = PromptCi::compute(&model, &longer).unwrap_err().to_string();
    assert!(
        err.contains("longer than the model's context of 64"),
        "{err}"
    );
}

fn global(fn_type: GlobalCiFnType, rng: &mut Rng) -> GlobalCiConfig {
    GlobalCiConfig {
        fn_type,
        hidden_dims: vec![4 + rng.below(8)],
        transformer: Some(TransformerCiConfig {
            d_model: 8,
            n_blocks: 1 + rng.below(2),
            mlp_hidden_dim: vec![6],
            attn_config: AttnConfig {
                n_heads: 2,
                max_len: 64,
                rope_base: 10000.0,
            },
        }),
        reader_hidden_dims: vec![],
        d_resid: None,
        block_groups: vec![],
        transition_attn: None,
        transition_hidden_dim: None,
    }
}
