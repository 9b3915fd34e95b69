//! The Trace controls: what the canvas draws (a trace of some outputs, or the strongest edges),
//! the trace's target (the last position, a clicked output node, or a typed `A - B`), and the
//! node and edge thresholds, which prune on the client without asking the server again.

use leptos::prelude::*;

use super::page::{Ctx, describe_target, server_message};
use crate::api::search_vocab;
use crate::types::{NodeKey, TraceTarget, VocabEntry};

/// The trace target of an output node's key (`output:pos:token`).
pub fn output_target(key: &str) -> Option<TraceTarget> {
    let k = NodeKey::parse(key).ok()?;
    (k.layer == "output").then_some(TraceTarget::Token {
        pos: k.seq as u32,
        token: k.c_idx as u32,
    })
}

/// The two sides of `A - B` as typed.
pub fn split_difference(text: &str) -> Option<(&str, &str)> {
    let (a, b) = text.split_once(" - ").or_else(|| text.split_once('-'))?;
    (!a.trim().is_empty() && !b.trim().is_empty()).then_some((a, b))
}

/// The vocabulary entry a typed token means: `#id`, or the word with a leading space (a word
/// inside a sentence, as byte-level vocabularies spell it), or the word alone — the first of
/// those the search found.
pub fn pick_token(typed: &str, hits: &[VocabEntry]) -> Option<u32> {
    let t = typed.trim();
    if let Some(id) = t.strip_prefix('#').and_then(|n| n.parse().ok()) {
        return Some(id);
    }
    [format!(" {t}"), t.to_owned()]
        .iter()
        .find_map(|want| hits.iter().find(|h| &h.token == want).map(|h| h.id))
}

#[component]
pub fn TracePanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let v = ctx.view;
    let tracing = move || v.with(|s| s.params.trace.is_some());
    let diff = RwSignal::new(String::new());
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let target_text = move || {
        let target = v.with(|s| s.params.trace);
        ctx.fetched.with(|g| match (g, target) {
            (_, None) => "off: the strongest edges are drawn".to_owned(),
            (Some(g), Some(t)) => describe_target(g, t),
            (None, Some(t)) => t.to_url(),
        })
    };
    let trace_diff = move || {
        let text = diff.get_untracked();
        let Some((a, b)) = split_difference(&text).map(|(a, b)| (a.to_owned(), b.to_owned()))
        else {
            error.set(Some("write two tokens as A - B, e.g. Mia - Leo".into()));
            return;
        };
        // The traced position, or the last.
        let pos = match v.with_untracked(|s| s.params.trace) {
            Some(TraceTarget::Token { pos, .. } | TraceTarget::Diff { pos, .. }) => pos,
            _ => ctx
                .fetched
                .with_untracked(|g| g.as_ref().map_or(0, |g| g.tokens.len().saturating_sub(1)))
                as u32,
        };
        leptos::task::spawn_local(async move {
            let mut ids = vec![];
            for side in [&a, &b] {
                let hits = match search_vocab(side.trim().to_owned(), 50).await {
                    Ok(h) => h,
                    Err(e) => {
                        error.set(Some(server_message(&e)));
                        return;
                    }
                };
                match pick_token(side, &hits) {
                    Some(id) => ids.push(id),
                    None => {
                        error.set(Some(format!(
                            "no token {:?} in the vocabulary",
                            side.trim()
                        )));
                        return;
                    }
                }
            }
            error.set(None);
            let (a, b) = (ids[0], ids[1]);
            if a == b {
                error.set(Some("the two sides are the same token".into()));
                return;
            }
            v.update(|s| s.params.trace = Some(TraceTarget::Diff { pos, a, b }));
        });
    };
    let slider = move |id: &'static str,
                       label: &'static str,
                       get: fn(&crate::state::ViewState) -> f64,
                       set: fn(&mut crate::state::ViewState, f64)| {
        view! {
            <label class="control slider">
                <span>{label} " " <output id=format!("{id}-value")>{move || format!("{:.2}", v.with(get))}</output></span>
                <input
                    id=id
                    type="range"
                    min="0.5"
                    max="0.99"
                    step="0.01"
                    prop:value=move || v.with(get).to_string()
                    on:input=move |ev| {
                        if let Ok(x) = event_target_value(&ev).parse::<f64>()
                            && (0.0..=1.0).contains(&x)
                        {
                            v.update(|s| set(s, x));
                        }
                    }
                />
            </label>
        }
    };
    view! {
        <section class="panel trace">
            <h2>"Trace"</h2>
            <label class="control">
                <span>"Draw"</span>
                <select
                    id="draw-mode"
                    prop:value=move || if tracing() { "trace" } else { "strongest" }
                    on:change=move |ev| {
                        let trace = event_target_value(&ev) == "trace";
                        v.update(|s| s.params.trace = trace.then_some(TraceTarget::Last));
                    }
                >
                    <option value="trace">"what drives an output (trace)"</option>
                    <option value="strongest">"the strongest edges (top-k)"</option>
                </select>
            </label>
            <p class="trace-target">"Target: " <span id="trace-target">{target_text}</span></p>
            <Show when=tracing>
                <p class="hint">"Click an output node to trace it."</p>
                {slider("node-threshold", "Nodes carrying", |s| s.node_threshold, |s, x| s.node_threshold = x)}
                {slider("edge-threshold", "Edges carrying", |s| s.edge_threshold, |s, x| s.edge_threshold = x)}
            </Show>
            <div class="buttons">
                <button id="trace-last" on:click=move |_| v.update(|s| s.params.trace = Some(TraceTarget::Last))>
                    "Trace last position"
                </button>
            </div>
            <label class="control">
                <span>"Logit difference"</span>
                <input
                    id="trace-diff"
                    type="text"
                    placeholder="A - B"
                    prop:value=move || diff.get()
                    on:input=move |ev| diff.set(event_target_value(&ev))
                    on:keydown=move |ev| if ev.key() == "Enter" { trace_diff() }
                />
            </label>
            <button id="trace-diff-go" on:click=move |_| trace_diff()>"Trace A − B"</button>
            {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
        </section>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_nodes_name_their_trace_target() {
        assert_eq!(
            output_target("output:7:412"),
            Some(TraceTarget::Token { pos: 7, token: 412 })
        );
        assert_eq!(output_target("h.0.mlp.c_fc:7:412"), None);
        assert_eq!(output_target("output:x"), None);
    }

    #[test]
    fn typed_differences_resolve_to_tokens() {
        assert_eq!(split_difference("Mia - Leo"), Some(("Mia", "Leo")));
        assert_eq!(split_difference("#5-#9"), Some(("#5", "#9")));
        assert_eq!(split_difference("Mia"), None);
        assert_eq!(split_difference(" - Leo"), None);
        let hits = [
            VocabEntry {
                id: 3,
                token: "Mia".into(),
            },
            VocabEntry {
                id: 8,
                token: " Mia".into(),
            },
        ];
        // A word inside a sentence carries its space; without one in the vocabulary, the word.
        assert_eq!(pick_token("Mia ", &hits), Some(8));
        assert_eq!(pick_token(" Mia", &hits), Some(8));
        assert_eq!(pick_token("Mia", &hits[..1]), Some(3));
        assert_eq!(pick_token("#42", &hits), Some(42));
        assert_eq!(pick_token("Leo", &hits), None);
    }
}
