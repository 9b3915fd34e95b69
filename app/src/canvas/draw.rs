//! Paints a graph on a 2D canvas context. Knows nothing about Leptos.

use super::layout::{LABEL_WIDTH, Layout, Point};
use crate::types::GraphData;
use wasm_bindgen::JsCast;
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement};

pub const BACKGROUND: &str = "#ffffff";
const POSITIVE: (u8, u8, u8) = (37, 99, 235);
const NEGATIVE: (u8, u8, u8) = (220, 38, 38);
const NODE: &str = "#1f2937";
const GRID: &str = "#e5e7eb";
const TEXT: &str = "#374151";
/// The faintest edge stays visible.
const MIN_ALPHA: f64 = 0.08;

/// Sizes the canvas backing store to its CSS box times the device pixel ratio, and returns the 2D
/// context scaled so that one unit is one CSS pixel, with the CSS width.
pub fn fit_canvas(
    canvas: &HtmlCanvasElement,
    css_height: f64,
) -> Option<(CanvasRenderingContext2d, f64)> {
    let dpr = web_sys::window()
        .map_or(1.0, |w| w.device_pixel_ratio())
        .max(1.0);
    let css_width = f64::from(canvas.client_width().max(320));
    canvas
        .style()
        .set_property("height", &format!("{css_height}px"))
        .ok()?;
    canvas.set_width((css_width * dpr).round() as u32);
    canvas.set_height((css_height * dpr).round() as u32);
    let ctx = canvas
        .get_context("2d")
        .ok()??
        .dyn_into::<CanvasRenderingContext2d>()
        .ok()?;
    ctx.set_transform(dpr, 0.0, 0.0, dpr, 0.0, 0.0).ok()?;
    Some((ctx, css_width))
}

/// Draws `graph` laid out by `layout`; returns the number of edges drawn.
pub fn draw(ctx: &CanvasRenderingContext2d, graph: &GraphData, layout: &Layout) -> usize {
    ctx.set_fill_style_str(BACKGROUND);
    ctx.fill_rect(0.0, 0.0, layout.width, layout.height);
    draw_grid(ctx, graph, layout);

    let max_abs = graph
        .edges
        .iter()
        .map(|e| e.val.abs())
        .fold(0.0f32, f32::max);
    let mut edges: Vec<_> = graph
        .edges
        .iter()
        .filter_map(|e| Some((layout.nodes.get(&e.src)?, layout.nodes.get(&e.tgt)?, e.val)))
        .collect();
    // Strong edges last, so they are drawn on top.
    edges.sort_by(|a, b| a.2.abs().total_cmp(&b.2.abs()));
    for &(src, tgt, val) in &edges {
        let rel = if max_abs > 0.0 {
            f64::from(val.abs() / max_abs)
        } else {
            0.0
        };
        let (r, g, b) = if val >= 0.0 { POSITIVE } else { NEGATIVE };
        let alpha = MIN_ALPHA + (1.0 - MIN_ALPHA) * rel;
        ctx.set_stroke_style_str(&format!("rgba({r},{g},{b},{alpha:.3})"));
        ctx.set_line_width(0.75 + 1.75 * rel);
        draw_edge(ctx, *src, *tgt);
    }

    ctx.set_fill_style_str(NODE);
    for p in layout.nodes.values() {
        ctx.begin_path();
        let _ = ctx.arc(p.x, p.y, layout.radius, 0.0, std::f64::consts::TAU);
        ctx.fill();
    }
    edges.len()
}

/// A vertical S-curve, so edges between neighbouring rows stay apart from the nodes between them.
fn draw_edge(ctx: &CanvasRenderingContext2d, src: Point, tgt: Point) {
    let mid = (src.y + tgt.y) / 2.0;
    ctx.begin_path();
    ctx.move_to(src.x, src.y);
    ctx.bezier_curve_to(src.x, mid, tgt.x, mid, tgt.x, tgt.y);
    ctx.stroke();
}

fn draw_grid(ctx: &CanvasRenderingContext2d, graph: &GraphData, layout: &Layout) {
    ctx.set_stroke_style_str(GRID);
    ctx.set_line_width(1.0);
    for &(_, y) in &layout.rows {
        ctx.begin_path();
        ctx.move_to(LABEL_WIDTH, y);
        ctx.line_to(layout.width, y);
        ctx.stroke();
    }

    ctx.set_fill_style_str(TEXT);
    ctx.set_font("12px system-ui, sans-serif");
    ctx.set_text_baseline("middle");
    ctx.set_text_align("right");
    for &(row, y) in &layout.rows {
        let _ = ctx.fill_text(&row.label(), LABEL_WIDTH - 10.0, y);
    }
    ctx.set_text_align("center");
    let y = layout.height - super::layout::TOKEN_HEIGHT / 2.0;
    for (token, &x) in graph.tokens.iter().zip(&layout.columns) {
        let shown = format!("{:?}", token);
        let _ = ctx.fill_text_with_max_width(&shown, x, y, layout.column_width * 0.95);
    }
}
