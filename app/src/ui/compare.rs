//! The Compare panel: a second prompt ("B") graphed with the same parameters as the drawn one
//! ("A"), and what differs between them (see [`crate::compare`]). Swapping makes B the drawn graph,
//! so either one can be traced and read on the canvas.

use leptos::prelude::*;

use super::page::{Ctx, server_message};
use crate::api::get_graph;
use crate::compare::{Comparison, ROWS, compare, describe_place};
use crate::types::{GraphData, PromptRef};

/// What the box holds: a prompt id, or text to graph.
fn parse_prompt(s: &str) -> Option<PromptRef> {
    let s = s.trim();
    if s.is_empty() {
        None
    } else if let Ok(id) = s.parse() {
        Some(PromptRef::Stored(id))
    } else {
        Some(PromptRef::Text(s.to_owned()))
    }
}

fn describe(p: &PromptRef) -> String {
    match p {
        PromptRef::Stored(id) => format!("prompt {id}"),
        PromptRef::Text(t) => format!("{t:?}"),
    }
}

fn pct(p: f32) -> String {
    format!("{:.1}%", 100.0 * p)
}

#[component]
pub fn ComparePanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let input = RwSignal::new(String::new());
    // The box shows B when the view comes from a URL.
    Effect::new(move || {
        if let Some(b) = ctx.view.with(|v| v.compare.clone()) {
            input.set(match b {
                PromptRef::Stored(id) => id.to_string(),
                PromptRef::Text(t) => t,
            });
        }
    });
    let other: RwSignal<Option<Result<GraphData, String>>> = RwSignal::new(None);
    let request = Memo::new(move |_| ctx.view.with(|v| v.compare.clone().map(|b| (b, v.params))));
    let generation = StoredValue::new(0u64);
    Effect::new(move || {
        let req = request.get();
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        other.set(None);
        let Some((b, params)) = req else { return };
        leptos::task::spawn_local(async move {
            let r = get_graph(b, params, None).await;
            if generation.get_value() == mine {
                other.set(Some(r.map_err(|e| server_message(&e))));
            }
        });
    });
    let comparison: Memo<Option<Comparison>> = Memo::new(move |_| {
        ctx.fetched.with(|a| {
            other.with(|b| match (a, b) {
                (Some(a), Some(Ok(b))) => Some(compare(a, b)),
                _ => None,
            })
        })
    });
    let submit = move || {
        if let Some(b) = parse_prompt(&input.get_untracked()) {
            ctx.view.update(|v| v.compare = Some(b));
        }
    };
    let has_b = move || ctx.view.with(|v| v.compare.is_some());
    let swap = move |_| {
        ctx.view.update(|v| {
            if let Some(b) = v.compare.take() {
                v.compare = Some(std::mem::replace(&mut v.prompt, b));
            }
            // Selected nodes name positions of the prompt they were chosen in.
            v.selected.clear();
        })
    };
    let status = move || {
        let names = ctx.view.with(|v| {
            v.compare
                .as_ref()
                .map(|b| (describe(&v.prompt), describe(b)))
        });
        let (a, b) = names?;
        Some(match other.get() {
            None => format!("Computing the graph of B ({b})…"),
            Some(Err(e)) => format!("B ({b}): {e}"),
            Some(Ok(_)) => match comparison.get() {
                None => format!("Waiting for A ({a})…"),
                Some(c) => format!(
                    "A: {a} · B: {b} · {} components alive in both, {} only in A, {} only in B",
                    c.shared,
                    c.only_a.len(),
                    c.only_b.len()
                ),
            },
        })
    };
    view! {
        <section class="panel compare" id="compare">
            <h2>"Compare with a second prompt"</h2>
            <form class="compare-form" on:submit=move |ev| { ev.prevent_default(); submit(); }>
                <input id="compare-input" type="text" placeholder="B: a prompt id or text"
                    prop:value=move || input.get()
                    on:input=move |ev| input.set(event_target_value(&ev)) />
                <button id="compare-go" type="submit">"Compare"</button>
                <Show when=has_b>
                    <button id="compare-swap" type="button" on:click=swap
                        title="Draw B on the canvas (and compare it with A)">"Swap A and B"</button>
                    <button id="compare-close" type="button"
                        on:click=move |_| ctx.view.update(|v| v.compare = None)>"Close"</button>
                </Show>
            </form>
            <p class="muted compare-status">{status}</p>
            {move || comparison.get().map(|c| comparison_view(ctx, c))}
        </section>
    }
    .into_any()
}

/// The four lists: alive only in A, alive only in B, output probabilities, edges changed most.
fn comparison_view(ctx: Ctx, c: Comparison) -> AnyView {
    let labels = ctx.labels.get_untracked();
    let only = move |rows: Vec<crate::compare::OnlyIn>, id: &'static str, caption: &'static str| {
        let labels = labels.clone();
        view! {
            <table class="data-table compare-table" id=id>
                <caption>{caption}</caption>
                <tr><th>"component"</th><th>"token"</th><th>"CI"</th></tr>
                {rows.into_iter().take(ROWS).map(|o| {
                    let label = labels.get(&o.component).cloned();
                    let key = o.component.clone();
                    view! {
                        <tr class="only" data-component=o.component.clone()
                            title="Click to pin this component"
                            on:click=move |_| ctx.toggle_pin(&key)>
                            <td class="mono">
                                {describe_place(&o.component, o.from_end)}
                                {label.map(|l| view! { <span class="label">{format!(" ({l})")}</span> })}
                            </td>
                            <td class="tok">{format!("{:?}", o.token)}</td>
                            <td>{format!("{:.2}", o.ci)}</td>
                        </tr>
                    }
                }).collect_view()}
            </table>
        }
    };
    view! {
        <div class="compare-lists">
            {only(c.only_a, "only-a", "Alive only in A")}
            {only(c.only_b, "only-b", "Alive only in B")}
            <table class="data-table compare-table" id="output-changes">
                <caption>"Output probabilities"</caption>
                <tr><th>"token"</th><th>"at"</th><th>"A"</th><th>"B"</th></tr>
                {c.outputs.into_iter().take(ROWS).map(|o| view! {
                    <tr>
                        <td class="tok">{format!("{:?}", o.token)}</td>
                        <td>{if o.from_end == 0 { "last".to_owned() } else { format!("last−{}", o.from_end) }}</td>
                        <td>{pct(o.prob_a)}</td>
                        <td>{pct(o.prob_b)}</td>
                    </tr>
                }).collect_view()}
            </table>
            <table class="data-table compare-table" id="edge-changes">
                <caption>"Edges that changed most"</caption>
                <tr><th>"source"</th><th>"target"</th><th>"A"</th><th>"B"</th></tr>
                {c.edges.into_iter().take(ROWS).map(|e| view! {
                    <tr>
                        <td class="mono">{describe_place(&e.src.0, e.src.1)}</td>
                        <td class="mono">{describe_place(&e.tgt.0, e.tgt.1)}</td>
                        <td>{format!("{:+.3}", e.val_a)}</td>
                        <td>{format!("{:+.3}", e.val_b)}</td>
                    </tr>
                }).collect_view()}
            </table>
        </div>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_reads_ids_as_stored_prompts_and_anything_else_as_text() {
        assert_eq!(parse_prompt(" 12 "), Some(PromptRef::Stored(12)));
        assert_eq!(
            parse_prompt("a boy named Leo"),
            Some(PromptRef::Text("a boy named Leo".into()))
        );
        assert_eq!(parse_prompt("   "), None);
    }
}
