//! The canvas: drawing on every change that matters, zoom (wheel) and pan (drag), hover and click.

use leptos::prelude::*;

use super::card::HoverCard;
use super::page::{Ctx, Hover};
use crate::canvas::hit;
use crate::canvas::layout::{Point, height_for};
use crate::canvas::view::Viewport;

/// Pointer travel (CSS px) below which a press and release is a click, not a drag.
const CLICK_SLOP: f64 = 4.0;

#[derive(Clone, Copy, Debug)]
struct Drag {
    start: (f64, f64),
    last: (f64, f64),
    moved: bool,
    /// Shift held at the press: the drag draws a selection box instead of panning.
    select: bool,
}

/// The corners of a drag's box, `(left, top, right, bottom)` in CSS pixels.
fn drag_box(d: &Drag) -> (f64, f64, f64, f64) {
    (
        d.start.0.min(d.last.0),
        d.start.1.min(d.last.1),
        d.start.0.max(d.last.0),
        d.start.1.max(d.last.1),
    )
}

#[component]
pub fn GraphView() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let drag: RwSignal<Option<Drag>> = RwSignal::new(None);
    let viewport = move || ctx.view.with(|v| v.viewport());

    // Keep the layout width equal to the canvas's CSS width.
    let measure = move || {
        if let Some(el) = canvas.get_untracked() {
            let w = f64::from(el.client_width().max(320));
            if (w - ctx.width.get_untracked()).abs() > 0.5 {
                ctx.width.set(w);
            }
        }
    };
    Effect::new(move || {
        canvas.track();
        measure();
    });
    let _resize = window_event_listener(leptos::ev::resize, move |_| measure());

    // Redraw when the graph, layout, view, hover, pins or selection change; nothing else paints.
    Effect::new(move || {
        let hover = ctx.hover.get();
        let (pins, selected, groups) = ctx
            .view
            .with(|v| (v.pins.clone(), v.selected.clone(), v.groups.clone()));
        let vp = viewport();
        let Some(el) = canvas.get() else { return };
        ctx.labels.with(|labels| {
            ctx.graph.with(|g| {
                ctx.scene.with(|s| {
                    ctx.layout.with(|l| {
                        if let (Some(g), Some(s), Some(l)) = (g, s, l) {
                            let marks = Marks {
                                pins: &pins,
                                selected: &selected,
                                labels,
                                groups: &groups,
                            };
                            paint(&el, g, s, l, vp, hover, &marks);
                        }
                    })
                })
            })
        });
    });

    let grid = Memo::new(move |_| ctx.layout.with(|l| l.as_ref().map(hit::NodeGrid::new)));
    let hit_test = move |x: f64, y: f64| -> Hover {
        let world = viewport().to_world(Point { x, y });
        let zoom = ctx.view.with_untracked(|v| v.zoom);
        ctx.layout.with_untracked(|l| {
            ctx.scene.with_untracked(|s| {
                let (Some(l), Some(s)) = (l, s) else {
                    return Hover::None;
                };
                let node = grid.with_untracked(|g| g.as_ref()?.node_at(l, world, 3.0 / zoom));
                if let Some(i) = node {
                    return Hover::Node(i);
                }
                match hit::edge_at(s, l, world, 3.0 / zoom) {
                    Some(e) => Hover::Edge(e),
                    None => Hover::None,
                }
            })
        })
    };

    let on_move = move |ev: leptos::ev::MouseEvent| {
        // A card taking a label holds still.
        if ctx.labelling.get_untracked() {
            return;
        }
        let (x, y) = (f64::from(ev.offset_x()), f64::from(ev.offset_y()));
        ctx.pointer.set((x, y));
        if let Some(mut d) = drag.get_untracked() {
            let (dx, dy) = (x - d.last.0, y - d.last.1);
            d.last = (x, y);
            if (x - d.start.0).abs() + (y - d.start.1).abs() > CLICK_SLOP {
                d.moved = true;
            }
            drag.set(Some(d));
            if d.moved && d.select {
                return;
            }
            if d.moved {
                ctx.view
                    .update(|v| v.set_viewport(v.viewport().pan_by(dx, dy)));
                return;
            }
        }
        let h = hit_test(x, y);
        if h != ctx.hover.get_untracked() {
            if let (Hover::Node(i), Some(key)) = (
                h,
                ctx.scene
                    .with_untracked(|s| s.as_ref().map(|s| s.component.clone())),
            ) && let Some(c) = key.get(i)
                && !c.starts_with("output:")
                && !c.starts_with("wte:")
                && !c.starts_with("group.")
            {
                ctx.want_info(c);
            }
            ctx.hover.set(h);
        }
    };
    let on_down = move |ev: leptos::ev::MouseEvent| {
        let p = (f64::from(ev.offset_x()), f64::from(ev.offset_y()));
        drag.set(Some(Drag {
            start: p,
            last: p,
            moved: false,
            select: ev.shift_key(),
        }));
    };
    let on_up = move |ev: leptos::ev::MouseEvent| {
        let Some(d) = drag.get_untracked() else {
            return;
        };
        drag.set(None);
        if d.moved && d.select {
            // Every component node inside the box joins the selection.
            let (x0, y0, x1, y1) = drag_box(&d);
            let vp = viewport();
            let inside: Vec<String> = ctx.graph.with_untracked(|g| {
                ctx.layout.with_untracked(|l| {
                    let (Some(g), Some(l)) = (g, l) else {
                        return vec![];
                    };
                    (0..g.nodes.len())
                        .filter(|&i| {
                            l.points[i].is_some_and(|p| {
                                let p = vp.to_screen(p);
                                p.x >= x0 && p.x <= x1 && p.y >= y0 && p.y <= y1
                            })
                        })
                        .map(|i| g.nodes[i].key.clone())
                        .collect()
                })
            });
            ctx.select(inside);
            return;
        }
        if d.moved {
            return;
        }
        let h = hit_test(f64::from(ev.offset_x()), f64::from(ev.offset_y()));
        let Hover::Node(i) = h else { return };
        if ev.shift_key() {
            // Shift-click selects the node for an intervention; a click pins its component.
            if let Some(key) = ctx.graph.with_untracked(|g| {
                g.as_ref()
                    .and_then(|g| g.nodes.get(i).map(|n| n.key.clone()))
            }) && super::page::selectable(&key)
            {
                ctx.toggle_selected(&key);
            }
        } else if let Some(gi) = ctx.graph.with_untracked(|g| {
            g.as_ref()
                .and_then(|g| g.nodes.get(i))
                .and_then(|n| crate::supernode::group_of(&n.key))
        }) {
            // A click on a supernode opens it: its members are drawn again.
            ctx.view.update(|v| {
                if let Some(g) = v.groups.get_mut(gi) {
                    g.open = true;
                }
            });
        } else if let Some(target) = ctx.graph.with_untracked(|g| {
            g.as_ref()
                .and_then(|g| g.nodes.get(i))
                .and_then(|n| super::trace_panel::output_target(&n.key))
        }) {
            // A click on an output traces it; on a component, pins it.
            ctx.view.update(|v| v.params.trace = Some(target));
        } else if let Some(c) = ctx
            .scene
            .with_untracked(|s| s.as_ref().and_then(|s| s.component.get(i).cloned()))
        {
            ctx.toggle_pin(&c);
        }
    };
    let on_leave = move |_| {
        drag.set(None);
        if !ctx.labelling.get_untracked() {
            ctx.hover.set(Hover::None);
        }
    };
    let on_wheel = move |ev: leptos::ev::WheelEvent| {
        ev.prevent_default();
        let at = Point {
            x: f64::from(ev.offset_x()),
            y: f64::from(ev.offset_y()),
        };
        let factor = (-ev.delta_y() * 0.0015).exp();
        ctx.view
            .update(|v| v.set_viewport(v.viewport().zoom_at(at, factor)));
    };

    let selecting = move || drag.get().filter(|d| d.select && d.moved);
    let cursor = move || match (drag.get().is_some_and(|d| d.moved), ctx.hover.get()) {
        (true, _) if selecting().is_some() => "crosshair",
        (true, _) => "grabbing",
        (false, Hover::Node(_)) => "pointer",
        _ => "grab",
    };
    let height = move || {
        ctx.graph
            .with(|g| g.as_ref().map_or(height_for(2), |g| height_for(g.n_blocks)))
    };

    view! {
        <div class="canvas-wrap">
            <canvas
                class="graph"
                node_ref=canvas
                style:height=move || format!("{}px", height())
                style:cursor=cursor
                on:mousemove=on_move
                on:mousedown=on_down
                on:mouseup=on_up
                on:mouseleave=on_leave
                on:wheel=on_wheel
            ></canvas>
            {move || selecting().map(|d| {
                let (x0, y0, x1, y1) = drag_box(&d);
                view! {
                    <div class="select-box" style=format!(
                        "left:{x0}px;top:{y0}px;width:{}px;height:{}px", x1 - x0, y1 - y0
                    )></div>
                }
            })}
            <HoverCard />
        </div>
    }
    .into_any()
}

/// What the researcher marked: pinned components, selected nodes, labels, supernodes.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
struct Marks<'a> {
    pins: &'a [String],
    selected: &'a [String],
    labels: &'a std::collections::HashMap<String, String>,
    groups: &'a [crate::supernode::Group],
}

#[cfg(feature = "hydrate")]
fn paint(
    el: &leptos::web_sys::HtmlCanvasElement,
    g: &crate::types::GraphData,
    s: &crate::canvas::scene::Scene,
    l: &crate::canvas::layout::Layout,
    vp: Viewport,
    hover: Hover,
    marks: &Marks<'_>,
) {
    let Marks {
        pins,
        selected,
        labels,
        groups,
    } = *marks;
    use crate::canvas::draw;
    let clock = leptos::web_sys::window().and_then(|w| w.performance());
    let started = clock.as_ref().map(|c| c.now());
    let Some((ctx2d, w, h)) = draw::fit_canvas(el, l.height) else {
        leptos::logging::error!("the graph canvas has no 2D context");
        return;
    };
    let pinned = s.nodes_of(pins);
    let selected: Vec<usize> = selected
        .iter()
        .filter_map(|k| s.index.get(k).copied())
        .collect();
    let mut hl = draw::Highlight {
        pinned: pinned.clone(),
        selected: selected.clone(),
        labels: (0..s.component.len())
            .filter_map(|i| {
                let group =
                    crate::supernode::group_of(&g.nodes[i].key).and_then(|gi| groups.get(gi));
                match group {
                    Some(group) => Some((i, group.label.clone())),
                    None => labels.get(&s.component[i]).map(|l| (i, l.clone())),
                }
            })
            .collect(),
        ..Default::default()
    };
    match hover {
        Hover::Node(i) => {
            hl.hovered_node = Some(i);
            hl.focus = vec![i];
            // Hovering a pinned node highlights the edges of every node of its component.
            if pinned.contains(&i) {
                hl.focus = s.nodes_of(&[s.component[i].clone()]);
            }
        }
        Hover::Edge(e) => hl.hovered_edge = Some(e),
        Hover::None => {}
    }
    let probs: std::collections::HashMap<&str, f32> =
        g.outputs.iter().map(|o| (o.key.as_str(), o.prob)).collect();
    let prob = |i: usize| probs.get(g.nodes[i].key.as_str()).copied();
    let drawn = draw::draw(&ctx2d, (w, h), g, s, l, vp, &hl, &prob);
    let _ = el.set_attribute("data-drawn", &drawn.to_string());
    let _ = el.set_attribute("data-nodes", &g.nodes.len().to_string());
    // Screen positions of a few component nodes and of every node of a pinned component, for
    // end-to-end tests to hover and click.
    let on_screen = |i: usize| {
        let p = vp.to_screen(l.points[i]?);
        (p.x >= 0.0 && p.y >= 0.0 && p.x <= w && p.y <= h)
            .then(|| format!("[\"{}\",{:.1},{:.1}]", g.nodes[i].key, p.x, p.y))
    };
    let probe: Vec<String> = (0..g.nodes.len())
        .filter(|&i| !g.nodes[i].key.starts_with("wte:") && !g.nodes[i].key.starts_with("output:"))
        .filter_map(on_screen)
        .take(20)
        .chain(pinned.iter().filter_map(|&i| on_screen(i)))
        .collect();
    let _ = el.set_attribute(
        "data-selected",
        &format!(
            "[{}]",
            selected
                .iter()
                .filter_map(|&i| on_screen(i))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    let _ = el.set_attribute("data-probe", &format!("[{}]", probe.join(",")));
    let outputs: Vec<String> = (0..g.nodes.len())
        .filter(|&i| g.nodes[i].key.starts_with("output:"))
        .filter_map(on_screen)
        .collect();
    let _ = el.set_attribute("data-outputs", &format!("[{}]", outputs.join(",")));
    let supernodes: Vec<String> = (0..g.nodes.len())
        .filter(|&i| crate::supernode::group_of(&g.nodes[i].key).is_some())
        .filter_map(on_screen)
        .collect();
    let _ = el.set_attribute("data-groups", &format!("[{}]", supernodes.join(",")));
    // How long this frame's painting took on the main thread, for the end-to-end timing spec.
    if let (Some(c), Some(t0)) = (clock, started) {
        let _ = el.set_attribute("data-paint-ms", &format!("{:.2}", c.now() - t0));
    }
}

#[cfg(not(feature = "hydrate"))]
fn paint<A, B, C, D>(_: &A, _: &B, _: &C, _: &D, _: Viewport, _: Hover, _: &Marks<'_>) {}
