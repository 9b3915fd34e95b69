//! Hit-testing: which node or edge is under the pointer, through a uniform grid over node
//! positions, so hovering stays instant with tens of thousands of nodes and edges.

use super::layout::{Layout, Point};
use super::scene::Scene;

/// Grid cell size in layout pixels.
const CELL: f64 = 12.0;

#[derive(Clone, Debug, PartialEq)]
pub struct NodeGrid {
    cols: usize,
    rows: usize,
    /// Node indices per cell.
    cells: Vec<Vec<u32>>,
}

impl NodeGrid {
    pub fn new(layout: &Layout) -> NodeGrid {
        let cols = (layout.width / CELL).ceil().max(1.0) as usize;
        let rows = (layout.height / CELL).ceil().max(1.0) as usize;
        let mut cells = vec![vec![]; cols * rows];
        for (i, p) in layout.points.iter().enumerate() {
            if let Some(p) = p {
                let (c, r) = Self::cell(p, cols, rows);
                cells[r * cols + c].push(i as u32);
            }
        }
        NodeGrid { cols, rows, cells }
    }

    fn cell(p: &Point, cols: usize, rows: usize) -> (usize, usize) {
        let c = (p.x / CELL).floor().clamp(0.0, (cols - 1) as f64) as usize;
        let r = (p.y / CELL).floor().clamp(0.0, (rows - 1) as f64) as usize;
        (c, r)
    }

    /// The node nearest to `p` (layout coordinates) within `slack` of its rim.
    pub fn node_at(&self, layout: &Layout, p: Point, slack: f64) -> Option<usize> {
        let reach = layout.radius + slack;
        let span = (reach / CELL).ceil() as isize;
        let (c0, r0) = Self::cell(&p, self.cols, self.rows);
        let mut best: Option<(f64, usize)> = None;
        for dr in -span..=span {
            for dc in -span..=span {
                let (c, r) = (c0 as isize + dc, r0 as isize + dr);
                if c < 0 || r < 0 || c >= self.cols as isize || r >= self.rows as isize {
                    continue;
                }
                for &i in &self.cells[r as usize * self.cols + c as usize] {
                    let i = i as usize;
                    let Some(q) = layout.points[i] else { continue };
                    let d = ((q.x - p.x).powi(2) + (q.y - p.y).powi(2)).sqrt();
                    if d <= layout.radii[i] + slack && best.is_none_or(|(bd, _)| d < bd) {
                        best = Some((d, i));
                    }
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

/// Points along the S-curve drawn for an edge from `a` to `b` (see `draw`).
pub fn curve_points(a: Point, b: Point, n: usize) -> impl Iterator<Item = Point> {
    let mid = (a.y + b.y) / 2.0;
    (0..=n).map(move |k| {
        let t = k as f64 / n as f64;
        let u = 1.0 - t;
        // Cubic Bézier with control points (a.x, mid) and (b.x, mid).
        let x = u * u * u * a.x + 3.0 * u * u * t * a.x + 3.0 * u * t * t * b.x + t * t * t * b.x;
        let y = u * u * u * a.y + 3.0 * u * u * t * mid + 3.0 * u * t * t * mid + t * t * t * b.y;
        Point { x, y }
    })
}

fn segment_distance(p: Point, a: Point, b: Point) -> f64 {
    let (dx, dy) = (b.x - a.x, b.y - a.y);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.x - a.x) * dx + (p.y - a.y) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((p.x - a.x - t * dx).powi(2) + (p.y - a.y - t * dy).powi(2)).sqrt()
}

/// The drawn edge nearest to `p` within `tolerance` (layout pixels); the strongest wins ties.
pub fn edge_at(scene: &Scene, layout: &Layout, p: Point, tolerance: f64) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for (i, e) in scene.edges.iter().enumerate() {
        let (Some(a), Some(b)) = (layout.points[e.src], layout.points[e.tgt]) else {
            continue;
        };
        // Cheap rejection by bounding box.
        if p.x < a.x.min(b.x) - tolerance
            || p.x > a.x.max(b.x) + tolerance
            || p.y < a.y.min(b.y) - tolerance
            || p.y > a.y.max(b.y) + tolerance
        {
            continue;
        }
        let pts: Vec<Point> = curve_points(a, b, 12).collect();
        let d = pts
            .windows(2)
            .map(|w| segment_distance(p, w[0], w[1]))
            .fold(f64::INFINITY, f64::min);
        if d <= tolerance && best.is_none_or(|(bd, _)| d < bd - 1e-9) {
            best = Some((d, i));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canvas::layout::LayoutMode;
    use crate::types::GraphData;

    fn graph() -> GraphData {
        let keys = ["wte:0:0", "wte:1:0", "h.0.mlp.c_fc:1:3", "output:1:7"];
        let edges = [
            ("wte:1:0", "h.0.mlp.c_fc:1:3", 0.5),
            ("h.0.mlp.c_fc:1:3", "output:1:7", -0.2),
        ];
        crate::types::test_graph(2, 1, &keys, 1.0, &edges)
    }

    #[test]
    fn finds_the_node_under_the_pointer_and_nothing_elsewhere() {
        let g = graph();
        let l = Layout::new(&g, 600.0, LayoutMode::Importance, 0);
        let grid = NodeGrid::new(&l);
        for (i, p) in l.points.iter().enumerate() {
            let p = p.unwrap();
            let near = Point {
                x: p.x + 1.0,
                y: p.y - 1.0,
            };
            assert_eq!(grid.node_at(&l, near, 2.0), Some(i));
        }
        assert_eq!(grid.node_at(&l, Point { x: 5.0, y: 5.0 }, 2.0), None);
    }

    #[test]
    fn finds_edges_along_their_curve() {
        let g = graph();
        let l = Layout::new(&g, 600.0, LayoutMode::Importance, 0);
        let scene = Scene::new(&g, usize::MAX);
        for (i, e) in scene.edges.iter().enumerate() {
            let (a, b) = (l.points[e.src].unwrap(), l.points[e.tgt].unwrap());
            let mid = curve_points(a, b, 2).nth(1).unwrap();
            assert_eq!(edge_at(&scene, &l, mid, 3.0), Some(i));
        }
        assert_eq!(edge_at(&scene, &l, Point { x: 1.0, y: 1.0 }, 3.0), None);
    }
}
