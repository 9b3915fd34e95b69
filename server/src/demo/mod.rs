//! The built-in demo: a story corpus generated here, a word-level tokenizer, a small GPT2Simple trained
//! on the stories, and its SPD decomposition, all from fixed seeds, written as an ordinary SPD run
//! directory (`server/demo/run`) that the normal loader reads. `demo_model` regenerates it.

pub mod corpus;
pub mod eval;
pub mod export;
pub mod tokenizer;
pub mod train_spd;
pub mod train_target;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::model::SpdModel;
use crate::model::checkpoint::TensorFile;
use crate::model::transformer::Gpt2Config;
use crate::model::transformer::{TargetConfig, Transformer};
use train_spd::SpdSpec;
use train_target::TargetSpec;

/// Everything that determines the demo.
#[derive(Debug, Clone)]
pub struct DemoSpec {
    pub train_seed: u64,
    pub n_train_stories: usize,
    /// The held-out stories (`corpus.txt`) come from their own seed; none repeats a training story.
    pub demo_seed: u64,
    pub n_demo_stories: usize,
    /// Held-out windows used for the figures.
    pub n_eval_windows: usize,
    pub target: TargetSpec,
    pub spd: SpdSpec,
}

impl Default for DemoSpec {
    fn default() -> Self {
        Self {
            train_seed: 1,
            n_train_stories: 20_000,
            demo_seed: 2,
            n_demo_stories: 3_000,
            n_eval_windows: 256,
            target: TargetSpec {
                cfg: Gpt2Config {
                    block_size: 64,
                    vocab_size: 0,
                    n_layer: 2,
                    n_head: 4,
                    n_embd: 64,
                },
                steps: 4000,
                batch: 32,
                lr: 3e-3,
                warmup: 100,
                weight_decay: 0.1,
                seed: 3,
            },
            spd: SpdSpec {
                c: 128,
                ci_hidden: 64,
                steps: 2000,
                batch: 8,
                lr: 2e-3,
                faithfulness_warmup_steps: 400,
                faithfulness_warmup_lr: 3e-3,
                faithfulness_coeff: 1.0,
                importance_coeff: 5e-4,
                ci_masked_coeff: 1.0,
                p_start: 2.0,
                p_end: 0.3,
                eps: 1e-12,
                seed: 4,
            },
        }
    }
}

impl DemoSpec {
    /// A few seconds' worth of everything, to check the pipeline end to end.
    pub fn quick() -> Self {
        let d = Self::default();
        Self {
            n_train_stories: 2_000,
            n_demo_stories: 200,
            n_eval_windows: 16,
            target: TargetSpec {
                steps: 60,
                warmup: 10,
                ..d.target
            },
            spd: SpdSpec {
                steps: 20,
                faithfulness_warmup_steps: 20,
                ..d.spd
            },
            ..d
        }
    }
}

/// Where the demo lives in the repository.
pub fn default_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo")
}

/// The training and held-out stories. Held-out stories equal to a training story are skipped.
pub fn stories(spec: &DemoSpec) -> (Vec<String>, Vec<String>) {
    let train = corpus::stories(spec.train_seed, spec.n_train_stories);
    let seen: HashSet<&String> = train.iter().collect();
    let mut rng = crate::model::synthetic::Rng::new(spec.demo_seed);
    let mut demo = Vec::with_capacity(spec.n_demo_stories);
    while demo.len() < spec.n_demo_stories {
        let s = corpus::story(&mut rng);
        if !seen.contains(&s) {
            demo.push(s);
        }
    }
    (train, demo)
}

/// The stories' token ids joined with EOS, as `generate` joins documents.
pub fn token_stream(tok: &tokenizers::Tokenizer, stories: &[String]) -> Result<Vec<u32>, String> {
    let eos = tok
        .token_to_id(tokenizer::EOS)
        .ok_or("the tokenizer has no EOS")?;
    let mut out = Vec::new();
    for (i, s) in stories.iter().enumerate() {
        if i > 0 {
            out.push(eos);
        }
        let enc = tok.encode(s.as_str(), false).map_err(|e| e.to_string())?;
        out.extend_from_slice(enc.get_ids());
    }
    Ok(out)
}

/// Which stages to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stages {
    /// Corpus, tokenizer, target, SPD, evaluation.
    All,
    /// Only the decomposition and evaluation, from the target already written under `out/run`.
    Spd,
    /// Only the evaluation of the run under `out/run` (keeps the SPD curve of `out/report.json`).
    Eval,
}

/// Regenerates the demo under `out` (`corpus.txt`, `run/`, `report.json`), logging progress.
pub fn regenerate(
    spec: &DemoSpec,
    out: &Path,
    stages: Stages,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let err = |e: candle_core::Error| e.to_string();
    let t0 = Instant::now();
    let (train, demo) = stories(spec);
    let all: Vec<String> = train.iter().chain(&demo).cloned().collect();
    let (tok_json, tok) = tokenizer::build(&all).map_err(|e| e.to_string())?;
    let train_stream = token_stream(&tok, &train)?;
    let demo_stream = token_stream(&tok, &demo)?;
    let vocab = tok.get_vocab_size(true);
    log(&format!(
        "corpus: {} training stories ({} tokens), {} held-out ({} tokens), vocabulary {vocab}; {:.1} s",
        train.len(),
        train_stream.len(),
        demo.len(),
        demo_stream.len(),
        t0.elapsed().as_secs_f64()
    ));
    let mut tspec = spec.target.clone();
    tspec.cfg.vocab_size = vocab;
    let block = tspec.cfg.block_size;
    let heldout = train_target::eval_windows(&demo_stream, block, spec.n_eval_windows);
    let run_dir = out.join("run");
    let report_path = out.join("report.json");

    if stages == Stages::All {
        export::write_text(&out.join("corpus.txt"), &(demo.join("\n") + "\n"))?;
        let t1 = Instant::now();
        let (params, _) = train_target::train(&tspec, &train_stream, &heldout, log).map_err(err)?;
        export::write_target(&run_dir, &tspec.cfg, &params.tensors())?;
        log(&format!(
            "target trained in {:.0} s",
            t1.elapsed().as_secs_f64()
        ));
    }
    let spd_json = if stages == Stages::Eval {
        let old = std::fs::read_to_string(&report_path)
            .map_err(|e| format!("{}: {e}", report_path.display()))?;
        let old: serde_json::Value = serde_json::from_str(&old).map_err(|e| e.to_string())?;
        old["spd"].clone()
    } else {
        // The SPD stage reads the target as it was written.
        let t2 = Instant::now();
        let file = TensorFile::read(&run_dir.join("target/model.safetensors"))
            .map_err(|e| e.to_string())?;
        let target = Transformer::new(TargetConfig::gpt2_simple(tspec.cfg), &file)
            .map_err(|e| e.to_string())?;
        let (spd, r) = train_spd::train(&spec.spd, &target, &train_stream, log).map_err(err)?;
        export::write_run(&run_dir, &spec.spd, block, &spd.tensors(), &tok_json)?;
        log(&format!(
            "SPD trained in {:.0} s",
            t2.elapsed().as_secs_f64()
        ));
        json!({"warmup_faithfulness": r.warmup_faithfulness, "curve": r.curve})
    };

    let t3 = Instant::now();
    let model = SpdModel::load(&run_dir, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    let metrics = eval::evaluate(&model, &heldout).map_err(err)?;
    // The target's figures from the written files, so every stage writes the same report.
    let train_windows = train_target::eval_windows(&train_stream, block, spec.n_eval_windows);
    let target_json = json!({
        "train_loss": train_target::eval_loss(&model.target, &train_windows).map_err(err)?,
        "heldout_loss": metrics.target_ce,
    });
    log(&format!(
        "held-out: target CE {:.4}, masked CE {:.4}, KL {:.4}, accuracy target {:.3} masked {:.3}, L0 {:.1}; {:.0} s",
        metrics.target_ce,
        metrics.masked_ce,
        metrics.kl,
        metrics.target_accuracy,
        metrics.masked_accuracy,
        metrics.l0_total,
        t3.elapsed().as_secs_f64()
    ));
    for m in &metrics.modules {
        log(&format!(
            "  {:<20} L0 {:>6.2}  dead {:>3}",
            m.module, m.l0, m.dead
        ));
    }
    let report = json!({
        "corpus": {"train_stories": train.len(), "train_tokens": train_stream.len(),
                   "heldout_stories": demo.len(), "heldout_tokens": demo_stream.len(), "vocab_size": vocab},
        "target": target_json,
        "spd": spd_json,
        "heldout_eval": metrics,
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    export::write_text(&report_path, &(text + "\n"))?;
    log(&format!("total {:.0} s", t0.elapsed().as_secs_f64()));
    Ok(())
}
