//! Where each node of a graph goes: columns are token positions, rows are layers.
//!
//! Pure geometry in CSS pixels, so it is tested natively; `draw` only paints it.

use crate::types::{GraphData, NodeKey};
use std::collections::HashMap;

/// Space left of the first column for row labels.
pub const LABEL_WIDTH: f64 = 110.0;
/// Space below the last row for token labels.
pub const TOKEN_HEIGHT: f64 = 36.0;
pub const TOP_MARGIN: f64 = 16.0;
pub const RIGHT_MARGIN: f64 = 12.0;
pub const ROW_HEIGHT: f64 = 44.0;
pub const MAX_RADIUS: f64 = 5.0;

/// One horizontal band of the drawing; `h.{i}.attn.{q,k,v}_proj` share a band, split in three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    Wte,
    Qkv(usize),
    OProj(usize),
    CFc(usize),
    DownProj(usize),
    Output,
}

impl Row {
    /// The band index counted from the bottom: residual-stream order.
    pub fn index(self, n_blocks: usize) -> usize {
        match self {
            Row::Wte => 0,
            Row::Qkv(b) => 1 + 4 * b,
            Row::OProj(b) => 2 + 4 * b,
            Row::CFc(b) => 3 + 4 * b,
            Row::DownProj(b) => 4 + 4 * b,
            Row::Output => 1 + 4 * n_blocks,
        }
    }

    pub fn label(self) -> String {
        match self {
            Row::Wte => "wte".to_owned(),
            Row::Qkv(b) => format!("h.{b} q/k/v"),
            Row::OProj(b) => format!("h.{b} o_proj"),
            Row::CFc(b) => format!("h.{b} c_fc"),
            Row::DownProj(b) => format!("h.{b} down_proj"),
            Row::Output => "output".to_owned(),
        }
    }

    /// All rows of a model with `n_blocks` blocks, bottom to top.
    pub fn all(n_blocks: usize) -> Vec<Row> {
        let blocks =
            (0..n_blocks).flat_map(|b| [Row::Qkv(b), Row::OProj(b), Row::CFc(b), Row::DownProj(b)]);
        std::iter::once(Row::Wte)
            .chain(blocks)
            .chain(std::iter::once(Row::Output))
            .collect()
    }
}

/// The row of a layer name and its slot within the row (q=0, k=1, v=2 share the q/k/v row).
pub fn row_of(layer: &str) -> Option<(Row, usize)> {
    match layer {
        "wte" => return Some((Row::Wte, 0)),
        "output" => return Some((Row::Output, 0)),
        _ => {}
    }
    let rest = layer.strip_prefix("h.")?;
    let (block, module) = rest.split_once('.')?;
    let b: usize = block.parse().ok()?;
    match module {
        "attn.q_proj" => Some((Row::Qkv(b), 0)),
        "attn.k_proj" => Some((Row::Qkv(b), 1)),
        "attn.v_proj" => Some((Row::Qkv(b), 2)),
        "attn.o_proj" => Some((Row::OProj(b), 0)),
        "mlp.c_fc" => Some((Row::CFc(b), 0)),
        "mlp.down_proj" => Some((Row::DownProj(b), 0)),
        _ => None,
    }
}

fn slots(row: Row) -> usize {
    match row {
        Row::Qkv(_) => 3,
        _ => 1,
    }
}

/// A (row, slot within the row, position) group of nodes drawn side by side.
type Cell = (Row, usize, usize);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub width: f64,
    pub height: f64,
    pub column_width: f64,
    /// Centre x of each token column.
    pub columns: Vec<f64>,
    /// Every row with its centre y, bottom to top.
    pub rows: Vec<(Row, f64)>,
    pub radius: f64,
    /// Centre of each drawable node, by wire key. Nodes of unknown layers are left out.
    pub nodes: HashMap<String, Point>,
}

/// CSS height needed to draw a model with `n_blocks` blocks.
pub fn height_for(n_blocks: usize) -> f64 {
    TOP_MARGIN + ROW_HEIGHT * Row::all(n_blocks).len() as f64 + TOKEN_HEIGHT
}

impl Layout {
    pub fn new(graph: &GraphData, width: f64) -> Layout {
        let n_blocks = graph.n_blocks;
        let height = height_for(n_blocks);
        let n_cols = graph.tokens.len().max(1);
        let column_width = ((width - LABEL_WIDTH - RIGHT_MARGIN) / n_cols as f64).max(1.0);
        let columns: Vec<f64> = (0..n_cols)
            .map(|s| LABEL_WIDTH + column_width * (s as f64 + 0.5))
            .collect();
        let bottom = height - TOKEN_HEIGHT;
        let rows: Vec<(Row, f64)> = Row::all(n_blocks)
            .into_iter()
            .map(|r| (r, bottom - ROW_HEIGHT * (r.index(n_blocks) as f64 + 0.5)))
            .collect();
        let row_y: HashMap<Row, f64> = rows.iter().copied().collect();

        // Group nodes by (row, slot, seq) and spread each group evenly over its cell, ordered by cIdx.
        let mut cells: HashMap<Cell, Vec<(usize, &str)>> = HashMap::new();
        for node in &graph.nodes {
            let Ok(key) = NodeKey::parse(&node.key) else {
                continue;
            };
            let Some((row, slot)) = row_of(key.layer) else {
                continue;
            };
            if key.seq >= n_cols || !row_y.contains_key(&row) {
                continue;
            }
            cells
                .entry((row, slot, key.seq))
                .or_default()
                .push((key.c_idx, &node.key));
        }

        let mut radius = MAX_RADIUS;
        let mut nodes = HashMap::new();
        for ((row, slot, seq), mut members) in cells {
            members.sort_unstable();
            let slot_width = column_width * 0.9 / slots(row) as f64;
            let left = columns[seq] - column_width * 0.45 + slot_width * slot as f64;
            let step = slot_width / members.len() as f64;
            radius = radius.min(step * 0.4);
            for (i, (_, key)) in members.into_iter().enumerate() {
                let x = left + step * (i as f64 + 0.5);
                nodes.insert(key.to_owned(), Point { x, y: row_y[&row] });
            }
        }

        Layout {
            width,
            height,
            column_width,
            columns,
            rows,
            radius: radius.max(1.0),
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Node;

    fn graph(keys: &[&str]) -> GraphData {
        GraphData {
            prompt_id: 0,
            tokens: vec!["a".into(), "b".into(), "c".into()],
            n_blocks: 2,
            nodes: keys
                .iter()
                .map(|k| Node {
                    key: (*k).into(),
                    importance: 1.0,
                })
                .collect(),
            edges: vec![],
        }
    }

    #[test]
    fn rows_follow_the_residual_stream_upwards() {
        let g = graph(&[
            "wte:0:0",
            "h.0.attn.q_proj:0:3",
            "h.1.mlp.down_proj:0:1",
            "output:0:9",
        ]);
        let l = Layout::new(&g, 800.0);
        let y = |k: &str| l.nodes[k].y;
        assert!(y("wte:0:0") > y("h.0.attn.q_proj:0:3"));
        assert!(y("h.0.attn.q_proj:0:3") > y("h.1.mlp.down_proj:0:1"));
        assert!(y("h.1.mlp.down_proj:0:1") > y("output:0:9"));
        assert_eq!(l.rows.len(), 10);
        assert_eq!(l.height, height_for(2));
    }

    #[test]
    fn columns_follow_positions_and_nodes_stay_in_their_column() {
        let g = graph(&[
            "wte:0:0",
            "wte:1:0",
            "wte:2:0",
            "h.0.attn.k_proj:1:7",
            "h.0.attn.v_proj:1:2",
        ]);
        let l = Layout::new(&g, 800.0);
        for s in 0..3 {
            assert_eq!(l.nodes[&format!("wte:{s}:0")].x, l.columns[s]);
        }
        let half = l.column_width / 2.0;
        for k in ["h.0.attn.k_proj:1:7", "h.0.attn.v_proj:1:2"] {
            assert!(
                (l.nodes[k].x - l.columns[1]).abs() < half,
                "{k} left its column"
            );
        }
        // q, k and v share a row, in that order from left to right.
        assert!(l.nodes["h.0.attn.k_proj:1:7"].x < l.nodes["h.0.attn.v_proj:1:2"].x);
    }

    #[test]
    fn crowded_cells_shrink_the_radius_and_keep_nodes_apart() {
        let keys: Vec<String> = (0..40).map(|c| format!("h.0.mlp.c_fc:0:{c}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let l = Layout::new(&graph(&refs), 400.0);
        let mut xs: Vec<f64> = keys.iter().map(|k| l.nodes[k].x).collect();
        xs.sort_by(f64::total_cmp);
        let min_gap = xs
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(f64::INFINITY, f64::min);
        assert!(2.0 * l.radius <= min_gap + 1e-9 || l.radius == 1.0);
    }

    #[test]
    fn unknown_layers_and_bad_keys_are_skipped() {
        let g = graph(&["h.0.attn.rotary:0:0", "nonsense", "wte:9:0", "wte:0:0"]);
        let l = Layout::new(&g, 800.0);
        assert_eq!(l.nodes.len(), 1);
        assert_eq!(row_of("h.3.mlp.c_fc"), Some((Row::CFc(3), 0)));
        assert_eq!(row_of("h.x.mlp.c_fc"), None);
    }
}
