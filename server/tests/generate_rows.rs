//! The batched pass of `generate` against the per-prompt engine and the original implementation: the
//! lower-CI forward equals `SpdModel::ci`, the host and device reductions agree, and the database rows
//! equal `extract_active` and the original `generate`'s `active` for the same prompts.

mod generate_support;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;

use candle_core::{Device, Tensor};
use generate_support::*;
use server::attribution::{PromptCi, Thresholds, extract_active};
use server::generate::contexts::ContextParams;
use server::generate::corpus::Window;
use server::generate::entries::{CiThresholds, reference_entries, reference_output_entries};
use server::generate::extract::{self, EntryBatch, ScanMode};
use server::generate::{self, Input};
use server::model::SpdModel;
use server::model::synthetic::Rng;
use server::model::transformer::softmax_last;
use server::store::{queries, schema};

/// The original tool's runs, with the original `generate`'s output for them.
const FIXTURES: [&str; 3] = ["tiny_shared", "tiny_vector", "tiny_mlp"];
/// Those and spd's Feb 2026 runs (a C per module, global CI networks, the Llama families).
const ALL_RUNS: [&str; 7] = [
    "tiny_shared",
    "tiny_vector",
    "tiny_mlp",
    "v2/llama_mlp_layerwise",
    "v2/llama_glu_global",
    "v2/gpt2_transformer_ci",
    "v2/gpt2_main_format",
];

fn load(name: &str) -> SpdModel {
    SpdModel::load(&fixture_dir(name), &Device::Cpu).unwrap()
}

fn fixture_prompts(name: &str) -> Vec<Vec<u32>> {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("prompts.json")).unwrap())
        .unwrap()
}

/// The fixture prompts and `n` random prompts of 1–40 tokens (at most the model's context).
fn prompts(name: &str, n: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(5);
    let mut p = fixture_prompts(name);
    let longest = load(name).block_size().min(40);
    p.extend((0..n).map(|_| {
        let len = 1 + rng.below(longest);
        (0..len).map(|_| rng.below(96) as u32).collect()
    }));
    p
}

fn batch(windows: &[Window]) -> Tensor {
    let t = windows.iter().map(|w| w.tokens.len()).max().unwrap();
    let ids: Vec<u32> = windows
        .iter()
        .flat_map(|w| {
            let mut v = w.tokens.clone();
            v.resize(t, 0);
            v
        })
        .collect();
    Tensor::from_vec(ids, (windows.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn lower_ci_forward_equals_the_engine_ci() {
    for name in ALL_RUNS {
        let model = load(name);
        let windows: Vec<Window> = prompts(name, 3)[3..]
            .iter()
            .map(|t| Window {
                index: 0,
                tokens: t.iter().copied().cycle().take(20).collect(),
            })
            .collect();
        let tokens = batch(&windows);
        let (ci, probs) = extract::forward(&model, &tokens).unwrap();
        let engine = model.ci(&tokens).unwrap();
        for (a, b) in ci.iter().zip(&engine.lower) {
            assert_eq!(
                a.to_vec3::<f32>().unwrap(),
                b.to_vec3::<f32>().unwrap(),
                "{name}"
            );
        }
        let want = softmax_last(&engine.target_logits).unwrap();
        assert_eq!(
            probs.to_vec3::<f32>().unwrap(),
            want.to_vec3::<f32>().unwrap()
        );
    }
}

#[test]
fn host_and_device_reductions_agree() {
    let ctx = ContextParams {
        top_k: 3,
        radius: 2,
        threshold: 0.1,
    };
    let th = Thresholds {
        ci: 1e-6,
        output_prob: 0.01,
    };
    for name in ALL_RUNS {
        let model = load(name);
        let all: Vec<Window> = prompts(name, 9)
            .into_iter()
            .enumerate()
            .map(|(i, tokens)| Window {
                index: i as u64,
                tokens,
            })
            .collect();
        // Mixed lengths (right padding) and one batch of equal lengths.
        let equal: Vec<Window> = all
            .iter()
            .map(|w| Window {
                index: w.index,
                tokens: w
                    .tokens
                    .iter()
                    .copied()
                    .cycle()
                    .take(model.block_size().min(57))
                    .collect(),
            })
            .collect();
        for windows in [&all[..], &equal[..]] {
            let (ci, probs) = extract::forward(&model, &batch(windows)).unwrap();
            let floors: Vec<AtomicU32> = (0..model.total_c()).map(|_| AtomicU32::new(0)).collect();
            let run =
                |mode| extract::extract(&ci, &probs, windows, th, &ctx, &floors, mode).unwrap();
            let (host, device) = (run(ScanMode::Host), run(ScanMode::Device));
            // The fused CUDA pass's form: entries (here from the host reference of its kernels).
            let lens: Vec<u32> = windows.iter().map(|w| w.tokens.len() as u32).collect();
            let th_entries = CiThresholds {
                active: EntryBatch::active_threshold(th, &ctx),
                firing: ctx.threshold,
            };
            let (ci_entries, sum_ci, n_firing) =
                reference_entries(&ci, th_entries, Some(&lens)).unwrap();
            let outputs = reference_output_entries(&probs, &lens, th.output_prob).unwrap();
            let batch = EntryBatch {
                ci: ci_entries,
                outputs,
                sum_ci,
                n_firing,
            };
            let fused = extract::extract_entries(
                batch,
                &ci,
                model.vocab_size(),
                windows,
                th,
                &ctx,
                &floors,
                ScanMode::Host,
            )
            .unwrap();
            assert_eq!(host.prompts, fused.prompts, "{name}: from entries");
            assert_eq!(host.contexts, fused.contexts, "{name}: from entries");
            assert_eq!(host.prompts, device.prompts, "{name}");
            assert_eq!(host.contexts.n_firing, device.contexts.n_firing, "{name}");
            assert_eq!(host.contexts.examples, device.contexts.examples, "{name}");
            assert!(
                !host.contexts.examples.is_empty(),
                "{name}: no context examples"
            );
            for (a, b) in host.contexts.sum_ci.iter().zip(&device.contexts.sum_ci) {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
            assert_eq!(
                host.contexts.tokens,
                windows.iter().map(|w| w.tokens.len() as u64).sum::<u64>()
            );
        }
    }
}

type ActiveMap = BTreeMap<String, (f64, Vec<u32>)>;

fn db_active(conn: &rusqlite::Connection, id: i64) -> ActiveMap {
    queries::prompt_activations(conn, id)
        .unwrap()
        .into_iter()
        .map(|a| (a.key, (a.max_ci as f64, a.positions)))
        .collect()
}

fn assert_same_active(ours: &ActiveMap, theirs: &ActiveMap, what: &str) {
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{what}: keys"
    );
    for (k, (max, pos)) in theirs {
        let (m, p) = &ours[k];
        assert_eq!(p, pos, "{what}: positions of {k}");
        assert!((m - max).abs() <= 1e-5, "{what}: max of {k}: {m} vs {max}");
    }
}

/// Rows written by a batched run, checked prompt by prompt against the engine's `extract_active`.
#[test]
fn database_rows_equal_the_reference_extraction() {
    let dir = tempfile::tempdir().unwrap();
    for name in ALL_RUNS {
        let model = load(name);
        let prompts = prompts(name, 21);
        let file = name.replace('/', "_");
        let tokens_file = dir.path().join(format!("{file}.json"));
        std::fs::write(&tokens_file, serde_json::to_string(&prompts).unwrap()).unwrap();
        let db = dir.path().join(format!("{file}.db"));
        let cfg = config(
            &fixture_dir(name),
            &db,
            Input::TokensFile {
                path: tokens_file,
                tokenizer: None,
            },
        );
        let s = generate::run(&cfg).unwrap();
        assert_eq!(s.prompts_done, prompts.len() as u64);
        let conn = schema::open_read_only(&db).unwrap();
        let names: Vec<&str> = model.modules.iter().map(|m| m.name.as_str()).collect();
        for (i, tokens) in prompts.iter().enumerate() {
            let id = i as i64 + 1;
            assert_eq!(
                queries::prompt(&conn, id).unwrap().unwrap().token_ids,
                *tokens
            );
            let ci = PromptCi::compute(&model, tokens).unwrap();
            let reference: ActiveMap =
                extract_active(&names, &ci.lower, &ci.target_probs, cfg.thresholds)
                    .into_iter()
                    .map(|(k, e)| (k, (e.max as f64, e.positions)))
                    .collect();
            assert_same_active(
                &db_active(&conn, id),
                &reference,
                &format!("{name} prompt {i}"),
            );
        }
    }
}

/// The fixtures' `active` is what the original `generate` stored for their prompts.
#[test]
fn database_rows_equal_the_original_generate() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let f = std::fs::File::open(fixture_dir(name).join("expected.json.gz")).unwrap();
        let expected: serde_json::Value =
            serde_json::from_reader(flate2::read::GzDecoder::new(f)).unwrap();
        for run in ["ci0.1_out0.05", "ci1e-06_out0.01"] {
            let prompts: Vec<(Vec<u32>, &serde_json::Value)> = expected["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| {
                    let active = p["attr"].get(run)?.get("active")?;
                    Some((serde_json::from_value(p["tokens"].clone()).unwrap(), active))
                })
                .collect();
            if prompts.is_empty() {
                continue;
            }
            let a = &expected["prompts"][0]["attr"][run];
            let th = Thresholds {
                ci: a["ci_threshold"].as_f64().unwrap() as f32,
                output_prob: a["output_prob_threshold"].as_f64().unwrap() as f32,
            };
            let tokens_file = dir.path().join(format!("{name}-{run}.json"));
            let ids: Vec<&Vec<u32>> = prompts.iter().map(|(t, _)| t).collect();
            std::fs::write(&tokens_file, serde_json::to_string(&ids).unwrap()).unwrap();
            let db = dir.path().join(format!("{name}-{run}.db"));
            let mut cfg = config(
                &fixture_dir(name),
                &db,
                Input::TokensFile {
                    path: tokens_file,
                    tokenizer: None,
                },
            );
            cfg.thresholds = th;
            generate::run(&cfg).unwrap();
            let conn = schema::open_read_only(&db).unwrap();
            for (i, (_, active)) in prompts.iter().enumerate() {
                let theirs: ActiveMap = active
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            (
                                v[0].as_f64().unwrap(),
                                serde_json::from_value(v[1].clone()).unwrap(),
                            ),
                        )
                    })
                    .collect();
                assert_same_active(
                    &db_active(&conn, i as i64 + 1),
                    &theirs,
                    &format!("{name} {run} prompt {i}"),
                );
            }
        }
    }
}
