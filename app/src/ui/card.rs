//! The hover card: what a researcher wants to know about the node or edge under the pointer.

use leptos::prelude::*;

use super::page::{Ctx, Hover};
use crate::types::{ComponentInfo, GraphData, NodeKey};

/// Strongest edges listed per direction.
const EDGES_SHOWN: usize = 5;
/// Example contexts listed.
const EXAMPLES_SHOWN: usize = 4;

#[component]
pub fn HoverCard() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let style = move || {
        let (x, y) = ctx.pointer.get();
        let w = ctx.width.get();
        // Keep the card inside the canvas: left of the pointer on the right half.
        let left = if x > w / 2.0 { x - 340.0 } else { x + 16.0 };
        format!("left:{:.0}px;top:{:.0}px", left.max(0.0), y + 12.0)
    };
    (move || {
        let hover = ctx.hover.get();
        let body = ctx.graph.with(|g| {
            let g = g.as_ref()?;
            ctx.scene.with(|s| {
                let s = s.as_ref()?;
                match hover {
                    Hover::None => None,
                    Hover::Edge(e) => {
                        let e = s.edges.get(e)?;
                        Some(view! {
                            <div class="card-title">"Edge"</div>
                            <div class="mono">{g.nodes[e.src].key.clone()}" → "{g.nodes[e.tgt].key.clone()}</div>
                            <div>"value "<b>{format!("{:+.4}", e.val)}</b></div>
                        }.into_any())
                    }
                    Hover::Node(i) => Some(node_card(ctx, g, s, i)),
                }
            })
        })?;
        Some(view! { <div class="card" style=style>{body}</div> })
    })
    .into_any()
}

fn node_card(ctx: Ctx, g: &GraphData, s: &crate::canvas::scene::Scene, i: usize) -> AnyView {
    let key = g.nodes[i].key.clone();
    let Ok(k) = NodeKey::parse(&key) else {
        return view! { <div>{key}</div> }.into_any();
    };
    let token = g.tokens.get(k.seq).cloned().unwrap_or_default();
    let edge_rows = |list: &[usize], incoming: bool| {
        list.iter()
            .take(EDGES_SHOWN)
            .map(|&e| {
                let e = s.edges[e];
                let other = if incoming { e.src } else { e.tgt };
                let class = if e.val >= 0.0 { "pos" } else { "neg" };
                view! {
                    <li><span class="mono">{g.nodes[other].key.clone()}</span>" "
                    <span class=class>{format!("{:+.3}", e.val)}</span></li>
                }
            })
            .collect_view()
    };
    let ins = edge_rows(&s.incoming[i], true);
    let outs = edge_rows(&s.outgoing[i], false);
    let group = crate::supernode::group_of(&key)
        .and_then(|gi| ctx.view.with_untracked(|v| v.groups.get(gi).cloned()));
    let head = match (group, k.layer) {
        (Some(group), _) => {
            let members = group.members.join(", ");
            view! {
                <div class="card-title">"Supernode "<span class="label">{group.label}</span></div>
                <div>{group.members.len()}" members: "<span class="mono">{members}</span></div>
                <div class="muted">"edges are the sums of the members' edges · click to open"</div>
            }
            .into_any()
        }
        (None, "output") => {
            let prob = g
                .outputs
                .iter()
                .find(|o| o.key == key)
                .map_or(g.nodes[i].importance, |o| o.prob);
            let predicted = g
                .outputs
                .iter()
                .find(|o| o.key == key)
                .map(|o| o.token.clone())
                .unwrap_or_default();
            view! {
                <div class="card-title">"Output at "{k.seq}" ("{format!("{token:?}")}")"</div>
                <div>"predicts "<b>{format!("{predicted:?}")}</b>" with probability "<b>{format!("{prob:.3}")}</b></div>
            }
            .into_any()
        }
        (None, "wte") => view! {
            <div class="card-title">"Embedding of "{format!("{token:?}")}" at "{k.seq}</div>
        }
        .into_any(),
        (None, _) => {
            let component = s.component[i].clone();
            let ci = g.nodes[i].importance;
            let label = ctx.labels.with(|m| m.get(&component).cloned());
            let info = move || ctx.infos.with(|m| m.get(&component).cloned());
            view! {
                <div class="card-title mono">{key.clone()}</div>
                {label.map(|l| view! { <div class="label">{l}</div> })}
                <div>"CI "<b>{format!("{ci:.3}")}</b>" at "{k.seq}" ("{format!("{token:?}")}")"</div>
                {move || info().map(info_view)}
            }
            .into_any()
        }
    };
    // In trace mode: the share of the targets' influence this node carries.
    let influence = g.trace.as_ref().and_then(|t| t.influence.get(i)).map(|x| {
        view! { <div class="influence">"influence on the trace "<b>{format!("{:.1}%", 100.0 * x)}</b></div> }
    });
    view! {
        {head}
        {label_box(ctx, &key)}
        {influence}
        <div class="card-edges">
            <div><div class="muted">"strongest in"</div><ul>{ins}</ul></div>
            <div><div class="muted">"strongest out"</div><ul>{outs}</ul></div>
        </div>
    }
    .into_any()
}

/// While labelling (`l`), a box for the label of the node's component or supernode: Enter keeps
/// it, Escape drops it.
fn label_box(ctx: Ctx, key: &str) -> Option<AnyView> {
    if !ctx.labelling.get() {
        return None;
    }
    let current = match crate::supernode::group_of(key) {
        Some(gi) => ctx
            .view
            .with_untracked(|v| v.groups.get(gi).map(|g| g.label.clone())),
        None => ctx
            .labels
            .with_untracked(|m| m.get(&crate::canvas::scene::component_of(key)).cloned()),
    }
    .unwrap_or_default();
    let input = NodeRef::<leptos::html::Input>::new();
    Effect::new(move || {
        if let Some(el) = input.get() {
            let _ = el.focus();
        }
    });
    let key = key.to_owned();
    Some(
        view! {
            <input class="card-label" type="text" node_ref=input prop:value=current
                placeholder="label (Enter keeps it, Esc drops it)"
                on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                    if ev.key() == "Enter" {
                        ctx.label_node(&key, &event_target_value(&ev));
                        ctx.labelling.set(false);
                    }
                } />
        }
        .into_any(),
    )
}

/// Mean CI, density and example contexts with the firing token marked.
pub fn info_view(info: ComponentInfo) -> impl IntoView {
    let stats = match (info.mean_ci, info.density) {
        (Some(m), Some(d)) => format!(
            "mean CI {m:.4} · fires on {:.2}% of tokens · in {} prompts",
            d * 100.0,
            info.n_prompts
        ),
        (Some(m), None) => format!("mean CI {m:.4} · in {} prompts", info.n_prompts),
        _ => format!("in {} prompts", info.n_prompts),
    };
    let examples = info
        .examples
        .into_iter()
        .take(EXAMPLES_SHOWN)
        .map(|ex| {
            let spans = ex
                .tokens
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    let ci = ex.ci.get(j).copied().unwrap_or(0.0).clamp(0.0, 1.0);
                    let style = format!("background: rgba(245,158,11,{:.2})", ci * 0.6);
                    let class = if j == ex.active { "tok active" } else { "tok" };
                    view! { <span class=class style=style>{t.clone()}</span> }
                })
                .collect_view();
            view! { <div class="example">{spans}</div> }
        })
        .collect_view();
    view! {
        <div class="muted">{stats}</div>
        <div class="examples">{examples}</div>
    }
}
