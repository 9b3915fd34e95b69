//! The shipped demo run: it loads through the normal loader, its CI-masked component model predicts
//! held-out stories about as well as the target, and its graphs show attention copying a name.

use std::path::PathBuf;

use app::canvas::scene::Scene;
use app::state::DEFAULT_TOP_K;
use app::types::{GraphParams, NodeKey};
use candle_core::Device;
use server::attribution::{FastEngine, Layer, PromptCi, SourceMap, Thresholds};
use server::demo::{self, DemoSpec, corpus, eval, train_target};
use server::model::{ModuleKind, SpdModel};
use server::web::Run;

fn run_dir() -> PathBuf {
    demo::default_dir().join("run")
}

fn load() -> SpdModel {
    SpdModel::load(&run_dir(), &Device::Cpu).unwrap()
}

#[test]
fn ci_masked_model_predicts_heldout_stories_about_as_well_as_the_target() {
    let model = load();
    assert_eq!(
        model.modules.len(),
        12,
        "all six projections of both blocks"
    );
    let spec = DemoSpec::default();
    let (_, heldout) = demo::stories(&spec);
    let tok = tokenizers::Tokenizer::from_file(run_dir().join("tokenizer.json")).unwrap();
    let stream = demo::token_stream(&tok, &heldout).unwrap();
    let windows = train_target::eval_windows(&stream, model.block_size(), 64);
    let m = eval::evaluate(&model, &windows).unwrap();
    eprintln!(
        "target acc {:.3}, masked acc {:.3}, KL {:.4}, L0 {:.1}",
        m.target_accuracy, m.masked_accuracy, m.kl, m.l0_total
    );
    assert!(
        m.target_accuracy > 0.5,
        "target accuracy {}",
        m.target_accuracy
    );
    assert!(
        m.masked_accuracy > m.target_accuracy - 0.05,
        "CI-masked accuracy {} vs target {}",
        m.masked_accuracy,
        m.target_accuracy
    );
}

/// The prompt's tokens, and the positions of `name` in it.
fn prompt(text: &str, name: &str) -> (Vec<u32>, u32, Vec<usize>) {
    let tok = tokenizers::Tokenizer::from_file(run_dir().join("tokenizer.json")).unwrap();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let name_id = tok.token_to_id(name).unwrap();
    let at = (0..ids.len()).filter(|&i| ids[i] == name_id).collect();
    (ids, name_id, at)
}

/// Protagonist recall: after `There was a little girl named Mia. She had a big red ball.` the next
/// sentence of every story starts with the character's name, which only the prompt can supply (the
/// 16 names of each gender are equally likely). For every name, in two introductions, both models
/// must predict it, and the graph a researcher sees on opening the prompt (default thresholds,
/// normalized, the strongest [`DEFAULT_TOP_K`] edges drawn) must carry it: an edge from a `k_proj` or
/// `v_proj` node at the name's position into an `o_proj` node at the last position, i.e. attention
/// reading the name (through its value, or through where it looks).
#[test]
fn name_copying_prompts_draw_a_kv_to_o_edge_from_the_name_to_the_last_position() {
    let run = Run::load(&run_dir(), &Device::Cpu).unwrap();
    let mut cases = vec![];
    for (names, kind, pronoun) in [(corpus::GIRLS, "girl", "She"), (corpus::BOYS, "boy", "He")] {
        for name in names {
            cases.push((
                format!("There was a little {kind} named {name}. {pronoun} had a big red ball."),
                format!(" {name}"),
            ));
            cases.push((
                format!(
                    "One day, a {kind} named {name} went to the park. {pronoun} had a small blue kite."
                ),
                format!(" {name}"),
            ));
        }
    }
    let mut failures = vec![];
    let mut ranks = vec![];
    let mut through_v = 0;
    for (text, name) in &cases {
        let (tokens, name_id, name_at) = prompt(text, name);
        assert_eq!(name_at.len(), 1, "{text}");
        let last = tokens.len() - 1;
        let ci = PromptCi::compute(&run.model, &tokens).unwrap();
        let graph = run
            .graph(None, &tokens, GraphParams::default(), &|_| None, &|_, _| ())
            .unwrap();
        let target = argmax(&ci.target_probs[last]);
        let masked = graph
            .outputs
            .iter()
            .filter(|o| NodeKey::parse(&o.key).unwrap().seq == last)
            .max_by(|a, b| a.prob.total_cmp(&b.prob))
            .map(|o| o.token.clone());
        if target != name_id || masked.as_deref() != Some(name.as_str()) {
            failures.push(format!(
                "{text} predicted {:?} (target), {masked:?} (CI-masked)",
                run.token_string(target)
            ));
            continue;
        }
        let scene = Scene::new(&graph, DEFAULT_TOP_K);
        let key = |i: usize| NodeKey::parse(&graph.nodes[i].key).unwrap();
        let copies = |suffixes: &[&str]| {
            scene.edges.iter().position(|e| {
                let (src, tgt) = (key(e.src), key(e.tgt));
                suffixes.iter().any(|s| src.layer.ends_with(s))
                    && tgt.layer.ends_with("attn.o_proj")
                    && src.seq == name_at[0]
                    && tgt.seq == last
            })
        };
        through_v += usize::from(copies(&["attn.v_proj"]).is_some());
        let copy = copies(&["attn.k_proj", "attn.v_proj"]);
        match copy {
            Some(rank) => {
                let e = scene.edges[rank];
                eprintln!(
                    "{text}: drawn edge {rank} of {} (graph: {} edges): {} -> {} = {:.3}",
                    scene.edges.len(),
                    graph.total_edges,
                    graph.nodes[e.src].key,
                    graph.nodes[e.tgt].key,
                    e.val
                );
                ranks.push(rank);
            }
            None => failures.push(format!(
                "{text}: none of the {} drawn edges (of {}) goes from a k/v node at{name} to an \
                 o_proj node at the last position",
                scene.edges.len(),
                graph.total_edges
            )),
        }
    }
    ranks.sort_unstable();
    eprintln!(
        "copy edge drawn in {} of {} prompts ({through_v} from v_proj); rank among drawn edges: \
         median {:?}, worst {:?}",
        ranks.len(),
        cases.len(),
        ranks.get(ranks.len() / 2),
        ranks.last()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap() as u32
}

/// Gender travels too: after `… a girl named Mia.` both models predict ` She` (` He` for a boy), and
/// the graph has cross-position edges from a `v_proj` component at ` girl`/` boy` into `o_proj`
/// components at later positions.
#[test]
fn pronoun_prompt_has_cross_position_v_to_o_edges_from_the_character_noun() {
    let model = load();
    let sources = SourceMap::probe(&model).unwrap();
    let engine = FastEngine::new(&model, &sources).unwrap();
    for (text, noun, pronoun) in [
        ("There was a little girl named Mia.", " girl", " She"),
        ("There was a little boy named Leo.", " boy", " He"),
    ] {
        let (tokens, _, noun_at) = prompt(text, noun);
        let (_, pron, _) = prompt(text, pronoun);
        let last = tokens.len() - 1;
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let th = Thresholds {
            ci: 0.1,
            output_prob: 0.05,
        };
        let graph = engine.graph(&model, &ci, th).unwrap();
        assert!(ci.target_probs[last][pron as usize] > 0.9, "{text}: target");
        assert!(
            graph.masked_probs[last][pron as usize] > 0.9,
            "{text}: CI-masked model"
        );
        let mut edges = graph.edges.clone();
        edges.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
        let kind = |l: Layer| match l {
            Layer::Module(i) => Some(model.modules[i].id.kind),
            _ => None,
        };
        let rank = edges
            .iter()
            .position(|e| {
                e.is_cross_seq
                    && e.s_in < e.s_out
                    && kind(e.source) == Some(ModuleKind::V)
                    && kind(e.target) == Some(ModuleKind::O)
                    && e.s_in as usize == noun_at[0]
            })
            .expect("no v → o edge from the character noun to a later position");
        eprintln!(
            "{text}: strongest v -> o edge from{noun} is number {rank} of {}",
            edges.len()
        );
    }
}
