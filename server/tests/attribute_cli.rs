//! The `attribute` binary: its JSON contract, and clean failures with exit code 2.

mod common;

use std::process::Command;

use common::{compare_edges, expected, fixture_dir};
use serde_json::Value;

fn attribute(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_attribute"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn prints_the_fixture_graph_as_json() {
    let exp = expected("tiny_vector");
    let p = &exp["prompts"][0];
    let tokens: Vec<String> = p["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let dir = fixture_dir("tiny_vector");
    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--ci-threshold",
        "0.1",
        "--output-prob-threshold",
        "0.05",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "tokens",
        "ci",
        "ci_upper_leaky",
        "masked_output_probs",
        "target_output_probs",
        "sources_by_target",
        "edges",
        "active",
        "timing_ms",
    ] {
        assert!(doc.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(doc["sources_by_target"], exp["meta"]["sources_by_target"]);
    assert_eq!(
        doc["n_backward_passes"], 0,
        "the fast engine is the default"
    );
    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--engine",
        "reference",
    ]);
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reference["n_backward_passes"].as_u64().unwrap() > 0);
    compare_edges(
        &reference["edges"],
        &p["attr"]["ci0.1_out0.05"]["edges"],
        1e-4,
        "attribute cli reference engine",
    );
    compare_edges(
        &doc["edges"],
        &p["attr"]["ci0.1_out0.05"]["edges"],
        1e-4,
        "attribute cli",
    );

    // --top: the strongest edges of the whole graph, in strength order (ties in engine order), on
    // both engines.
    let all = doc["edges"].as_array().unwrap();
    let mut want: Vec<&Value> = all.iter().collect();
    want.sort_by(|a, b| {
        let v = |e: &Value| e[6].as_f64().unwrap().abs();
        v(b).total_cmp(&v(a))
    });
    for engine in ["fast", "reference"] {
        let out = attribute(&[
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &tokens.join(","),
            "--engine",
            engine,
            "--top",
            "25",
        ]);
        let top: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(top["total_edges"], all.len(), "{engine}");
        let got = top["edges"].as_array().unwrap();
        assert_eq!(got.len(), 25.min(all.len()), "{engine}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g.as_array().unwrap()[..6],
                w.as_array().unwrap()[..6],
                "{engine}"
            );
        }
    }

    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--normalize",
    ]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    compare_edges(
        &doc["edges"],
        &p["attr"]["ci0.1_out0.05"]["edges_normalized"],
        1e-4,
        "attribute cli normalized",
    );
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let dir = fixture_dir("tiny_mlp");
    let dir = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--model", "/no/such/run", "--tokens", "1,2"],
            "/no/such/run",
        ),
        (
            vec!["--model", dir, "--tokens", "1,2,500"],
            "out of the vocabulary",
        ),
        (vec!["--model", dir, "--tokens", "1,x"], "invalid value"),
        (
            vec!["--model", dir, "--tokens", "1", "--device", "tpu"],
            "expected `cpu` or `cuda:N`",
        ),
        (vec!["--model", dir], "--tokens"),
    ] {
        let out = attribute(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn text_is_tokenized_with_a_local_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":5,"cat":17,"sat":3},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let run = fixture_dir("tiny_mlp");
    let out = attribute(&[
        "--model",
        run.to_str().unwrap(),
        "--text",
        "the cat sat",
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["tokens"], serde_json::json!([5, 17, 3]));
}

/// Every v2 run (spd's Feb 2026 formats and families) through the command line: the JSON keys of
/// today, module paths as layer names, CI equal to the original's, and the same edges from both
/// engines.
#[test]
fn v2_runs_print_ci_and_graphs() {
    for name in [
        "llama_mlp_layerwise",
        "llama_glu_global",
        "gpt2_transformer_ci",
        "gpt2_main_format",
    ] {
        let exp = expected(&format!("v2/{name}"));
        let p = &exp["prompts"][1];
        let tokens: Vec<String> = p["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let dir = fixture_dir(&format!("v2/{name}"));
        let run = |engine: &str| -> Value {
            let out = attribute(&[
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                &tokens.join(","),
                "--engine",
                engine,
            ]);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap()
        };
        let (fast, reference) = (run("fast"), run("reference"));
        for key in [
            "ci",
            "ci_upper_leaky",
            "ci_pre_sigmoid",
            "target_output_probs",
            "masked_output_probs",
            "sources_by_target",
            "edges",
        ] {
            assert!(fast.get(key).is_some(), "{name}: missing key {key}");
        }
        for (module, rows) in p["ci_lower_leaky"].as_object().unwrap() {
            let ours = &fast["ci"][module];
            assert!(ours.is_array(), "{name}: no CI for {module}");
            let d = common::max_abs_diff_2d(
                &serde_json::from_value::<Vec<Vec<f32>>>(ours.clone()).unwrap(),
                rows,
            );
            assert!(d <= 1e-5, "{name} {module}: CI off by {d:e}");
        }
        let layers: std::collections::BTreeSet<&str> = fast["edges"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| [e[0].as_str().unwrap(), e[1].as_str().unwrap()])
            .collect();
        assert!(
            layers.contains("wte") && layers.contains("output"),
            "{name}"
        );
        let glu = name == "llama_glu_global";
        assert_eq!(
            layers.contains("h.0.mlp.gate_proj"),
            glu,
            "{name}: {layers:?}"
        );
        assert_eq!(fast["n_backward_passes"], 0, "{name}: fast engine used");
        compare_edges(&fast["edges"], &reference["edges"], 1e-4, name);
    }
}

/// `--semantics app` with the app's normalisations: the JSON names both, its edges are the app's
/// raw graph (CI threshold 0) normalised, from the fast engine as from the reference, and a bare
/// `--normalize` is L1.
#[test]
fn app_semantics_and_normalisations_from_the_command_line() {
    let name = "v2/llama_mlp_layerwise";
    let exp = expected(name);
    let p = &exp["prompts"][0];
    let tokens: Vec<String> = p["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let dir = fixture_dir(name);
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["--model", dir.to_str().unwrap(), "--tokens"];
        let joined = tokens.join(",");
        args.push(&joined);
        args.extend_from_slice(extra);
        let out = attribute(&args);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let app = &[
        "--semantics",
        "app",
        "--ci-threshold",
        "0",
        "--output-prob-threshold",
        "0.01",
    ];
    let raw = run(app);
    assert_eq!(
        (raw["semantics"].as_str(), raw["normalize"].as_str()),
        (Some("app"), Some("none"))
    );
    // The app's raw graph, names aside: same number of edges (the fixture test compares each).
    assert_eq!(
        raw["edges"].as_array().unwrap().len(),
        p["modes"]["fp32"]["graph"]["out0.01"]["edges"]
            .as_array()
            .unwrap()
            .len()
    );
    // The fast engine computes it (the default engine): no backward passes, the reference's edges.
    assert_eq!(raw["n_backward_passes"], 0);
    let reference = run(&[app.as_slice(), &["--engine", "reference"]].concat());
    assert!(reference["n_backward_passes"].as_u64().unwrap() > 0);
    compare_edges(&raw["edges"], &reference["edges"], 1e-4, "app semantics");
    for norm in ["l2-target", "l2-layer"] {
        let doc = run(&[app.as_slice(), &["--normalize", norm]].concat());
        assert_eq!(doc["normalize"], norm);
        let max = doc["edges"]
            .as_array()
            .unwrap()
            .iter()
            .fold(0f64, |m, e| m.max(e[6].as_f64().unwrap().abs()));
        assert!(max <= 1.0 + 1e-9 && max > 0.5, "{norm}: max {max}");
    }
    let bare = run(&["--normalize"]);
    assert_eq!(
        (bare["normalize"].as_str(), bare["semantics"].as_str()),
        (Some("l1"), Some("seed"))
    );
    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--semantics",
        "mine",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected seed or app"));
}

/// `--intervene keep --nodes …` prints the app's intervention table; `--replace` forks the prompt;
/// bad nodes and replacements exit 2 with a message.
#[test]
fn interventions_from_the_command_line() {
    let name = "v2/gpt2_transformer_ci";
    let exp = expected(name);
    let p = &exp["prompts"][2];
    let iv = &p["modes"]["fp32"]["intervention"];
    let tokens: Vec<String> = p["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let nodes: Vec<String> = iv["active_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{}:{}:{}", n[0].as_str().unwrap(), n[1], n[2]))
        .collect();
    let dir = fixture_dir(name);
    let joined = tokens.join(",");
    let nodes = nodes.join(",");
    let base = [
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &joined,
        "--nodes",
        &nodes,
    ];
    let run = |extra: &[&str]| {
        let out = attribute(&[base.as_slice(), extra].concat());
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, doc, err) = run(&["--intervene", "keep"]);
    assert_eq!(code, Some(0), "{err}");
    let ours = doc["predictions_per_position"].as_array().unwrap();
    let theirs = iv["predictions_per_position"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        for (o, t) in o.as_array().unwrap().iter().zip(t.as_array().unwrap()) {
            // Token display strings, ids and the four numbers.
            assert_eq!(o[0], t[0]);
            assert_eq!(o[1], t[1]);
            for i in 2..6 {
                let (a, b) = (o[i].as_f64().unwrap(), t[i].as_f64().unwrap());
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{o} vs {t}");
            }
        }
    }
    assert_eq!(
        doc["kl_per_position"].as_array().unwrap().len(),
        tokens.len()
    );
    let first = tokens[0].parse::<u32>().unwrap();
    let swap = format!("1:{}", (first + 1) % 96);
    let (code, forked, err) = run(&["--intervene", "ablate", "--replace", &swap]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(forked["tokens"][1], (first + 1) % 96);
    assert_eq!(forked["mode"], "ablate");
    for (extra, msg) in [
        (&["--intervene", "scale"][..], "needs a factor"),
        (
            &["--intervene", "keep", "--replace", "99:1"][..],
            "out of range",
        ),
        (
            &["--intervene", "keep", "--nodes", "h.0.attn.q_proj:0:99"][..],
            "components",
        ),
        (&["--intervene", "boost"][..], "unknown mode"),
    ] {
        let (code, _, err) = run(extra);
        assert_eq!(code, Some(2), "{extra:?}");
        assert!(err.contains(msg), "{extra:?}: {err}");
    }
}

/// `--optimize` prints the optimised CI, its metrics and the app's optimised graph (with the app's
/// graph flags), as SPD's app computed them on the fixture.
#[test]
fn optimised_ci_from_the_command_line() {
    let name = "v2/llama_glu_global";
    let exp = expected(name);
    let o = &exp["optimized"];
    let m = &o["modes"]["fp32"];
    let p = &exp["prompts"][o["prompt_index"].as_u64().unwrap() as usize];
    let tokens: Vec<String> = p["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let dir = fixture_dir(name);
    let (label, position) = (o["label_token"].to_string(), o["position"].to_string());
    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--optimize",
        "--label-token",
        &label,
        "--position",
        &position,
        "--steps",
        "30",
        "--imp-min-coeff",
        "1e-3",
        "--pnorm",
        "0.3",
        "--semantics",
        "app",
        "--ci-threshold",
        "0",
        "--output-prob-threshold",
        "0.01",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["ci_masked_label_prob", "l0_total"] {
        let (a, b) = (
            doc["metrics"][key].as_f64().unwrap(),
            m["metrics"][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 1e-3, "{key}: {a} vs {b}");
    }
    for (module, rows) in m["ci_pre_sigmoid"].as_object().unwrap() {
        let ours: Vec<Vec<f32>> =
            serde_json::from_value(doc["ci_pre_sigmoid"][module].clone()).unwrap();
        assert!(common::max_abs_diff_2d(&ours, rows) <= 1e-3, "{module}");
    }
    let names = common::canonical_names(&exp);
    let theirs: Vec<Value> = m["graph"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.as_array().unwrap().clone();
            e[0] = serde_json::json!(names(e[0].as_str().unwrap()));
            e[1] = serde_json::json!(names(e[1].as_str().unwrap()));
            Value::Array(e)
        })
        .collect();
    compare_edges(
        &doc["edges"],
        &Value::Array(theirs),
        1e-3,
        "optimised graph",
    );
    let out = attribute(&[
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--optimize",
        "--position",
        &position,
        "--steps",
        "3",
        "--imp-min-coeff",
        "1e-3",
        "--pnorm",
        "0.3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--label-token"));
}
