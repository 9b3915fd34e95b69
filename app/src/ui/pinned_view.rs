//! The pinned subgraph's small canvas beside the pins: the pinned components' nodes and every edge
//! among them, drawn with the main canvas's geometry and painter, scaled to fit.

use leptos::prelude::*;

use super::page::Ctx;
use crate::pinned::pinned_subgraph;

#[component]
pub fn PinnedGraph() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let sub = Memo::new(move |_| {
        let pins = ctx.view.with(|v| v.pins.clone());
        ctx.fetched
            .with(|g| g.as_ref().and_then(|g| pinned_subgraph(g, &pins)))
    });
    Effect::new(move || {
        let Some(el) = canvas.get() else { return };
        ctx.labels.with(|labels| {
            sub.with(|s| {
                if let Some(s) = s {
                    paint(&el, s, labels);
                }
            })
        });
    });
    let summary = move || {
        sub.with(|s| {
            s.as_ref().map(|s| {
                format!(
                    "{} nodes of the pinned components, {} edges among them, over {} positions",
                    s.nodes.len(),
                    s.edges.len(),
                    s.tokens.len()
                )
            })
        })
    };
    view! {
        <Show when=move || sub.with(Option::is_some)>
            <div class="pinned-graph-wrap">
                <p class="muted pinned-summary">{summary}</p>
                <canvas class="pinned-graph" node_ref=canvas></canvas>
            </div>
        </Show>
    }
    .into_any()
}

#[cfg(feature = "hydrate")]
fn paint(
    el: &leptos::web_sys::HtmlCanvasElement,
    g: &crate::types::GraphData,
    labels: &std::collections::HashMap<String, String>,
) {
    use crate::canvas::{draw, layout::Layout, layout::LayoutMode, scene::Scene, view::Viewport};
    /// Tallest the small canvas gets, in CSS pixels; taller graphs are scaled down.
    const MAX_HEIGHT: f64 = 320.0;
    let css_width = f64::from(el.client_width().max(240));
    let full = crate::canvas::layout::height_for(g.n_blocks);
    let zoom = (MAX_HEIGHT / full).min(1.0);
    let layout = Layout::new(g, css_width / zoom, LayoutMode::Importance, 0);
    let scene = Scene::new(g, usize::MAX);
    let Some((ctx2d, w, h)) = draw::fit_canvas(el, full * zoom) else {
        return;
    };
    let hl = draw::Highlight {
        labels: (0..g.nodes.len())
            .filter_map(|i| labels.get(&scene.component[i]).map(|l| (i, l.clone())))
            .collect(),
        ..Default::default()
    };
    let probs: std::collections::HashMap<&str, f32> =
        g.outputs.iter().map(|o| (o.key.as_str(), o.prob)).collect();
    let prob = |i: usize| probs.get(g.nodes[i].key.as_str()).copied();
    let vp = Viewport {
        zoom,
        pan: (0.0, 0.0),
    };
    let drawn = draw::draw(&ctx2d, (w, h), g, &scene, &layout, vp, &hl, &prob);
    let _ = el.set_attribute("data-drawn", &drawn.to_string());
    let _ = el.set_attribute("data-nodes", &g.nodes.len().to_string());
}

#[cfg(not(feature = "hydrate"))]
fn paint<A, B, C>(_: &A, _: &B, _: &C) {}
