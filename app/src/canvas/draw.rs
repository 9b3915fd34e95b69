//! Paints a laid-out graph on a 2D canvas context. Knows nothing about Leptos.
//!
//! Edges are bucketed by sign and strength and each bucket is stroked as one path, so ten thousand
//! edges cost twenty strokes, not ten thousand.

use super::layout::{LABEL_WIDTH, Layout, Point, TOKEN_HEIGHT};
use super::scene::Scene;
use super::view::Viewport;
use crate::types::GraphData;
use wasm_bindgen::JsCast;
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement};

pub const BACKGROUND: &str = "#ffffff";
const POSITIVE: (u8, u8, u8) = (37, 99, 235);
const NEGATIVE: (u8, u8, u8) = (220, 38, 38);
const NODE: &str = "#1f2937";
const WTE: &str = "#6b7280";
const PIN: &str = "#f59e0b";
const HOVER: &str = "#111827";
const GRID: &str = "#e5e7eb";
/// The ring of a node selected for an intervention.
const SELECTED: &str = "#16a34a";
/// A supernode's box.
const GROUP: &str = "#7c3aed";
const TEXT: &str = "#374151";
/// The faintest edge stays visible.
const MIN_ALPHA: f64 = 0.08;
const BUCKETS: usize = 10;

/// What to emphasise.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Highlight {
    pub hovered_node: Option<usize>,
    pub hovered_edge: Option<usize>,
    /// Nodes of pinned components.
    pub pinned: Vec<usize>,
    /// Nodes selected for an intervention.
    pub selected: Vec<usize>,
    /// Nodes whose edges are drawn strongly while the others fade.
    pub focus: Vec<usize>,
    /// Nodes of labelled components, with the label written beside them.
    pub labels: Vec<(usize, String)>,
}

/// Sizes the canvas backing store to its CSS box times the device pixel ratio; returns the context
/// and the CSS size.
pub fn fit_canvas(
    canvas: &HtmlCanvasElement,
    css_height: f64,
) -> Option<(CanvasRenderingContext2d, f64, f64)> {
    let dpr = device_pixel_ratio();
    let css_width = f64::from(canvas.client_width().max(320));
    canvas
        .style()
        .set_property("height", &format!("{css_height}px"))
        .ok()?;
    let (w, h) = (
        (css_width * dpr).round() as u32,
        (css_height * dpr).round() as u32,
    );
    if canvas.width() != w || canvas.height() != h {
        canvas.set_width(w);
        canvas.set_height(h);
    }
    let ctx = canvas
        .get_context("2d")
        .ok()??
        .dyn_into::<CanvasRenderingContext2d>()
        .ok()?;
    Some((ctx, css_width, css_height))
}

pub fn device_pixel_ratio() -> f64 {
    web_sys::window()
        .map_or(1.0, |w| w.device_pixel_ratio())
        .max(1.0)
}

/// Green ramp for output probabilities: pale at 0, dark at 1.
pub fn prob_colour(p: f32) -> String {
    let t = f64::from(p.clamp(0.0, 1.0)).sqrt();
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "rgb({},{},{})",
        lerp(187.0, 0.0),
        lerp(228.0, 109.0),
        lerp(181.0, 44.0)
    )
}

/// Draws everything; returns the number of edges drawn.
#[allow(clippy::too_many_arguments)]
pub fn draw(
    ctx: &CanvasRenderingContext2d,
    size: (f64, f64),
    graph: &GraphData,
    scene: &Scene,
    layout: &Layout,
    view: Viewport,
    hl: &Highlight,
    output_prob: &dyn Fn(usize) -> Option<f32>,
) -> usize {
    let dpr = device_pixel_ratio();
    let _ = ctx.set_transform(dpr, 0.0, 0.0, dpr, 0.0, 0.0);
    ctx.set_fill_style_str(BACKGROUND);
    ctx.fill_rect(0.0, 0.0, size.0, size.1);
    let _ = ctx.set_transform(
        dpr * view.zoom,
        0.0,
        0.0,
        dpr * view.zoom,
        dpr * view.pan.0,
        dpr * view.pan.1,
    );
    draw_grid(ctx, graph, layout);

    let focused: Vec<bool> = {
        let mut f = vec![false; graph.nodes.len()];
        for &i in &hl.focus {
            f[i] = true;
        }
        f
    };
    let any_focus = !hl.focus.is_empty();
    let line_scale = 1.0 / view.zoom.sqrt();
    let mut faded: Vec<usize> = vec![];
    let mut strong: Vec<usize> = vec![];
    for (i, e) in scene.edges.iter().enumerate() {
        if any_focus && !(focused[e.src] || focused[e.tgt]) {
            faded.push(i);
        } else {
            strong.push(i);
        }
    }
    stroke_edges(
        ctx,
        scene,
        layout,
        &faded,
        if any_focus { 0.25 } else { 1.0 },
        line_scale,
    );
    stroke_edges(ctx, scene, layout, &strong, 1.0, line_scale);
    if let Some(i) = hl.hovered_edge
        && let Some(e) = scene.edges.get(i)
        && let (Some(a), Some(b)) = (layout.points[e.src], layout.points[e.tgt])
    {
        ctx.set_stroke_style_str(HOVER);
        ctx.set_line_width(3.0 * line_scale);
        ctx.begin_path();
        curve(ctx, a, b);
        ctx.stroke();
    }

    for (i, p) in layout.points.iter().enumerate() {
        let Some(p) = p else { continue };
        let key = &graph.nodes[i].key;
        let fill = if key.starts_with("output:") {
            prob_colour(output_prob(i).unwrap_or(graph.nodes[i].importance))
        } else if key.starts_with("wte:") {
            WTE.to_owned()
        } else {
            NODE.to_owned()
        };
        let r = layout.radii[i];
        if key.starts_with("group.") {
            // A supernode: one box for its members.
            ctx.set_fill_style_str(GROUP);
            ctx.fill_rect(p.x - r, p.y - r * 0.7, 2.0 * r, 1.4 * r);
            continue;
        }
        ctx.set_fill_style_str(&fill);
        ctx.begin_path();
        let _ = ctx.arc(p.x, p.y, r, 0.0, std::f64::consts::TAU);
        ctx.fill();
    }
    for (list, colour, width, gap) in [
        (&hl.pinned, PIN, 2.0, 2.0),
        (&hl.selected, SELECTED, 2.0, 4.5),
    ] {
        ctx.set_stroke_style_str(colour);
        ctx.set_line_width(width * line_scale);
        for &i in list {
            ring(ctx, layout, i, gap);
        }
    }
    if let Some(i) = hl.hovered_node {
        ctx.set_stroke_style_str(HOVER);
        ctx.set_line_width(2.0 * line_scale);
        ring(ctx, layout, i, 3.0);
    }
    // Labels grow slower than the zoom, as lines do, so they stay readable.
    ctx.set_fill_style_str(TEXT);
    ctx.set_font(&format!("{:.1}px sans-serif", 10.0 * line_scale));
    ctx.set_text_align("left");
    for (i, label) in &hl.labels {
        if let Some(p) = layout.points[*i] {
            let r = layout.radii[*i];
            let _ = ctx.fill_text(label, p.x + r + 2.0 * line_scale, p.y - r);
        }
    }
    scene.edges.len()
}

fn ring(ctx: &CanvasRenderingContext2d, layout: &Layout, i: usize, gap: f64) {
    if let Some(p) = layout.points[i] {
        ctx.begin_path();
        let _ = ctx.arc(p.x, p.y, layout.radii[i] + gap, 0.0, std::f64::consts::TAU);
        ctx.stroke();
    }
}

/// Strokes `which` edges in buckets of sign × strength, weakest first so strong ones lie on top.
fn stroke_edges(
    ctx: &CanvasRenderingContext2d,
    scene: &Scene,
    layout: &Layout,
    which: &[usize],
    alpha_scale: f64,
    line_scale: f64,
) {
    let max = f64::from(scene.max_abs);
    let mut buckets: Vec<Vec<usize>> = vec![vec![]; 2 * BUCKETS];
    for &i in which {
        let e = scene.edges[i];
        let rel = if max > 0.0 {
            f64::from(e.val.abs()) / max
        } else {
            0.0
        };
        let b = ((rel * BUCKETS as f64) as usize).min(BUCKETS - 1);
        buckets[b * 2 + usize::from(e.val < 0.0)].push(i);
    }
    for (bi, members) in buckets.iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let rel = ((bi / 2) as f64 + 0.5) / BUCKETS as f64;
        let (r, g, b) = if bi % 2 == 1 { NEGATIVE } else { POSITIVE };
        let alpha = (MIN_ALPHA + (1.0 - MIN_ALPHA) * rel) * alpha_scale;
        ctx.set_stroke_style_str(&format!("rgba({r},{g},{b},{alpha:.3})"));
        ctx.set_line_width((0.5 + 2.0 * rel) * line_scale);
        ctx.begin_path();
        for &i in members {
            let e = scene.edges[i];
            if let (Some(a), Some(b)) = (layout.points[e.src], layout.points[e.tgt]) {
                curve(ctx, a, b);
            }
        }
        ctx.stroke();
    }
}

/// A vertical S-curve, so edges between neighbouring rows stay apart from the nodes between them
/// (`hit::curve_points` follows the same curve).
fn curve(ctx: &CanvasRenderingContext2d, a: Point, b: Point) {
    let mid = (a.y + b.y) / 2.0;
    ctx.move_to(a.x, a.y);
    ctx.bezier_curve_to(a.x, mid, b.x, mid, b.x, b.y);
}

fn draw_grid(ctx: &CanvasRenderingContext2d, graph: &GraphData, layout: &Layout) {
    ctx.set_stroke_style_str(GRID);
    ctx.set_line_width(1.0);
    ctx.begin_path();
    for &(_, y) in &layout.rows {
        ctx.move_to(LABEL_WIDTH, y);
        ctx.line_to(layout.width, y);
    }
    ctx.stroke();

    ctx.set_fill_style_str(TEXT);
    ctx.set_font("12px system-ui, sans-serif");
    ctx.set_text_baseline("middle");
    ctx.set_text_align("right");
    for &(row, y) in &layout.rows {
        let _ = ctx.fill_text(&row.label(), LABEL_WIDTH - 10.0, y);
    }
    ctx.set_text_align("center");
    let y = layout.height - TOKEN_HEIGHT / 2.0;
    for (token, &x) in graph.tokens.iter().zip(&layout.columns) {
        let shown = format!("{token:?}");
        let _ = ctx.fill_text_with_max_width(&shown, x, y, layout.column_width * 0.95);
    }
}
