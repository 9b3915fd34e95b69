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
    /// The MLP's input projections: `c_fc`, or `gate_proj` and `up_proj` side by side.
    MlpIn(usize),
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
            Row::MlpIn(b) => 3 + 4 * b,
            Row::DownProj(b) => 4 + 4 * b,
            Row::Output => 1 + 4 * n_blocks,
        }
    }

    pub fn label(self) -> String {
        match self {
            Row::Wte => "wte".to_owned(),
            Row::Qkv(b) => format!("h.{b} q/k/v"),
            Row::OProj(b) => format!("h.{b} o_proj"),
            Row::MlpIn(b) => format!("h.{b} mlp in"),
            Row::DownProj(b) => format!("h.{b} down_proj"),
            Row::Output => "output".to_owned(),
        }
    }

    /// All rows of a model with `n_blocks` blocks, bottom to top.
    pub fn all(n_blocks: usize) -> Vec<Row> {
        let blocks = (0..n_blocks)
            .flat_map(|b| [Row::Qkv(b), Row::OProj(b), Row::MlpIn(b), Row::DownProj(b)]);
        std::iter::once(Row::Wte)
            .chain(blocks)
            .chain(std::iter::once(Row::Output))
            .collect()
    }
}

/// The row of a layer name and its slot within the row (q=0, k=1, v=2 share the q/k/v row;
/// gate=0, up=1 the MLP-input row). An identity inserted in front of a projection
/// (`….pre_identity`) is in its projection's row and slot.
pub fn row_of(layer: &str) -> Option<(Row, usize)> {
    row_slots(layer).map(|(row, slot, _, _)| (row, slot))
}

/// [`row_of`] with the number of slots the layer's row is split into, and whether the layer is an
/// inserted identity.
fn row_slots(layer: &str) -> Option<(Row, usize, usize, bool)> {
    if let Some(parent) = layer.strip_suffix(".pre_identity") {
        return projection_slots(parent).map(|(row, slot, n)| (row, slot, n, true));
    }
    projection_slots(layer).map(|(row, slot, n)| (row, slot, n, false))
}

fn projection_slots(layer: &str) -> Option<(Row, usize, usize)> {
    match layer {
        "wte" => return Some((Row::Wte, 0, 1)),
        "output" => return Some((Row::Output, 0, 1)),
        _ => {}
    }
    let rest = layer.strip_prefix("h.")?;
    let (block, module) = rest.split_once('.')?;
    let b: usize = block.parse().ok()?;
    match module {
        "attn.q_proj" => Some((Row::Qkv(b), 0, 3)),
        "attn.k_proj" => Some((Row::Qkv(b), 1, 3)),
        "attn.v_proj" => Some((Row::Qkv(b), 2, 3)),
        "attn.o_proj" => Some((Row::OProj(b), 0, 1)),
        "mlp.c_fc" => Some((Row::MlpIn(b), 0, 1)),
        "mlp.gate_proj" => Some((Row::MlpIn(b), 0, 2)),
        "mlp.up_proj" => Some((Row::MlpIn(b), 1, 2)),
        "mlp.down_proj" => Some((Row::DownProj(b), 0, 1)),
        _ => None,
    }
}

/// A (row, slot within the row, position, slots of the row) group of nodes drawn side by side.
type Cell = (Row, usize, usize, usize);

/// How nodes sharing a cell (layer row × token column) are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayoutMode {
    /// By component index, each node nudged up or down so that edges fan out.
    Jittered,
    /// In a seeded random order, to break up coincidental alignments.
    Shuffled,
    /// Most important (highest CI / probability) first, from the left.
    Importance,
}

impl LayoutMode {
    pub const ALL: [LayoutMode; 3] = [
        LayoutMode::Jittered,
        LayoutMode::Shuffled,
        LayoutMode::Importance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LayoutMode::Jittered => "jittered",
            LayoutMode::Shuffled => "shuffled",
            LayoutMode::Importance => "importance",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A deterministic hash of a key and seed in [0, 1) (FNV-1a; `std`'s hasher is randomly seeded).
fn unit_hash(key: &str, seed: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

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
    /// The largest node radius; a node's own radius grows with its importance up to this.
    pub radius: f64,
    /// Centre of each node of the graph, in the graph's node order; `None` for nodes of unknown
    /// layers or positions.
    pub points: Vec<Option<Point>>,
    /// Radius of each node.
    pub radii: Vec<f64>,
}

/// CSS height needed to draw a model with `n_blocks` blocks.
pub fn height_for(n_blocks: usize) -> f64 {
    TOP_MARGIN + ROW_HEIGHT * Row::all(n_blocks).len() as f64 + TOKEN_HEIGHT
}

/// Largest vertical nudge of the jittered layout, as a fraction of the row height. Rows stay apart.
const JITTER: f64 = 0.25;

impl Layout {
    pub fn new(graph: &GraphData, width: f64, mode: LayoutMode, seed: u64) -> Layout {
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

        // A row holding an inserted identity splits each slot in two: the identity left of the
        // projection it feeds.
        let with_identity: std::collections::HashSet<Row> = graph
            .nodes
            .iter()
            .filter_map(|n| NodeKey::parse(&n.key).ok())
            .filter_map(|k| row_slots(k.layer))
            .filter(|s| s.3)
            .map(|s| s.0)
            .collect();
        // Group nodes by (row, slot, seq) and spread each group evenly over its cell.
        let mut cells: HashMap<Cell, Vec<usize>> = HashMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            let Ok(key) = NodeKey::parse(&node.key) else {
                continue;
            };
            let Some((row, slot, n_slots, identity)) = row_slots(key.layer) else {
                continue;
            };
            let (slot, n_slots) = if with_identity.contains(&row) {
                (2 * slot + usize::from(!identity), 2 * n_slots)
            } else {
                (slot, n_slots)
            };
            if key.seq >= n_cols || !row_y.contains_key(&row) {
                continue;
            }
            cells
                .entry((row, slot, key.seq, n_slots))
                .or_default()
                .push(i);
        }

        let c_idx = |i: usize| NodeKey::parse(&graph.nodes[i].key).map_or(0, |k| k.c_idx);
        let mut radius = MAX_RADIUS;
        let mut points = vec![None; graph.nodes.len()];
        let mut cell_list: Vec<_> = cells.into_iter().collect();
        cell_list.sort_unstable_by_key(|(cell, _)| *cell);
        for ((row, slot, seq, n_slots), mut members) in cell_list {
            match mode {
                LayoutMode::Jittered => members.sort_by_key(|&i| c_idx(i)),
                LayoutMode::Shuffled => members.sort_by(|&a, &b| {
                    unit_hash(&graph.nodes[a].key, seed)
                        .total_cmp(&unit_hash(&graph.nodes[b].key, seed))
                        .then(a.cmp(&b))
                }),
                LayoutMode::Importance => members.sort_by(|&a, &b| {
                    graph.nodes[b]
                        .importance
                        .total_cmp(&graph.nodes[a].importance)
                        .then(c_idx(a).cmp(&c_idx(b)))
                }),
            }
            let slot_width = column_width * 0.9 / n_slots as f64;
            let left = columns[seq] - column_width * 0.45 + slot_width * slot as f64;
            let step = slot_width / members.len() as f64;
            radius = radius.min(step * 0.4);
            for (k, i) in members.into_iter().enumerate() {
                let x = left + step * (k as f64 + 0.5);
                let dy = match mode {
                    LayoutMode::Jittered => {
                        (unit_hash(&graph.nodes[i].key, seed) - 0.5) * 2.0 * JITTER * ROW_HEIGHT
                    }
                    _ => 0.0,
                };
                points[i] = Some(Point {
                    x,
                    y: row_y[&row] + dy,
                });
            }
        }
        let radius = radius.max(1.0);
        let radii = graph
            .nodes
            .iter()
            .map(|n| radius * (0.45 + 0.55 * f64::from(n.importance).clamp(0.0, 1.0)))
            .collect();

        Layout {
            width,
            height,
            column_width,
            columns,
            rows,
            radius,
            points,
            radii,
        }
    }

    /// The position of the node with `key`, if drawn (linear; for tests and one-off lookups).
    pub fn point_of(&self, graph: &GraphData, key: &str) -> Option<Point> {
        graph
            .nodes
            .iter()
            .position(|n| n.key == key)
            .and_then(|i| self.points[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(keys: &[&str]) -> GraphData {
        crate::types::test_graph(3, 2, keys, 1.0, &[])
    }

    #[test]
    fn rows_follow_the_residual_stream_upwards() {
        let g = graph(&[
            "wte:0:0",
            "h.0.attn.q_proj:0:3",
            "h.1.mlp.down_proj:0:1",
            "output:0:9",
        ]);
        let l = Layout::new(&g, 800.0, LayoutMode::Importance, 0);
        let y = |k: &str| l.point_of(&g, k).unwrap().y;
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
        let l = Layout::new(&g, 800.0, LayoutMode::Importance, 0);
        for s in 0..3 {
            assert_eq!(
                l.point_of(&g, &format!("wte:{s}:0")).unwrap().x,
                l.columns[s]
            );
        }
        let half = l.column_width / 2.0;
        for k in ["h.0.attn.k_proj:1:7", "h.0.attn.v_proj:1:2"] {
            assert!(
                (l.point_of(&g, k).unwrap().x - l.columns[1]).abs() < half,
                "{k} left its column"
            );
        }
        // q, k and v share a row, in that order from left to right.
        let x = |k: &str| l.point_of(&g, k).unwrap().x;
        assert!(x("h.0.attn.k_proj:1:7") < x("h.0.attn.v_proj:1:2"));
    }

    #[test]
    fn an_inserted_identity_sits_left_of_its_projection_in_the_same_row() {
        let g = graph(&[
            "h.0.mlp.c_fc.pre_identity:1:3",
            "h.0.mlp.c_fc:1:4",
            "h.0.attn.q_proj:1:0",
        ]);
        let l = Layout::new(&g, 800.0, LayoutMode::Importance, 0);
        let p = |k: &str| l.point_of(&g, k).unwrap();
        let (ident, fc) = (p("h.0.mlp.c_fc.pre_identity:1:3"), p("h.0.mlp.c_fc:1:4"));
        assert_eq!(ident.y, fc.y);
        assert!(ident.x < fc.x);
        assert!((fc.x - l.columns[1]).abs() < l.column_width / 2.0);
        // Rows without identities keep their slots.
        assert_eq!(p("h.0.attn.q_proj:1:0").x, {
            let g = graph(&["h.0.attn.q_proj:1:0"]);
            Layout::new(&g, 800.0, LayoutMode::Importance, 0)
                .point_of(&g, "h.0.attn.q_proj:1:0")
                .unwrap()
                .x
        });
    }

    #[test]
    fn crowded_cells_shrink_the_radius_and_keep_nodes_apart() {
        let keys: Vec<String> = (0..40).map(|c| format!("h.0.mlp.c_fc:0:{c}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let g = graph(&refs);
        let l = Layout::new(&g, 400.0, LayoutMode::Importance, 0);
        let mut xs: Vec<f64> = keys.iter().map(|k| l.point_of(&g, k).unwrap().x).collect();
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
        let l = Layout::new(&g, 800.0, LayoutMode::Importance, 0);
        assert_eq!(l.points.iter().flatten().count(), 1);
        assert_eq!(row_of("h.3.mlp.c_fc"), Some((Row::MlpIn(3), 0)));
        assert_eq!(row_of("h.3.mlp.gate_proj"), Some((Row::MlpIn(3), 0)));
        assert_eq!(row_of("h.3.mlp.up_proj"), Some((Row::MlpIn(3), 1)));
        assert_eq!(row_of("h.x.mlp.c_fc"), None);
        assert_eq!(
            row_of("h.3.mlp.up_proj.pre_identity"),
            Some((Row::MlpIn(3), 1))
        );
    }

    /// A crowded random graph: many nodes per cell, importances spread over [0, 1].
    fn crowded() -> GraphData {
        let layers = [
            "h.0.attn.q_proj",
            "h.0.attn.k_proj",
            "h.0.attn.v_proj",
            "h.0.attn.o_proj",
            "h.0.mlp.c_fc",
            "h.1.mlp.down_proj",
            "output",
        ];
        let mut keys = vec![];
        for s in 0..3 {
            keys.push(format!("wte:{s}:0"));
            for (li, l) in layers.iter().enumerate() {
                for c in 0..(3 + (s * 7 + li * 5) % 17) {
                    keys.push(format!("{l}:{s}:{}", c * 3 + li));
                }
            }
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut g = graph(&refs);
        for (i, n) in g.nodes.iter_mut().enumerate() {
            n.importance = unit_hash(&n.key, 99 + i as u64) as f32;
        }
        g
    }

    #[test]
    fn every_mode_is_deterministic_per_seed_and_modes_differ() {
        let g = crowded();
        for mode in LayoutMode::ALL {
            let a = Layout::new(&g, 900.0, mode, 7);
            assert_eq!(a, Layout::new(&g, 900.0, mode, 7), "{mode:?}");
            assert_eq!(LayoutMode::from_name(mode.name()), Some(mode));
        }
        let shuffled = |seed| Layout::new(&g, 900.0, LayoutMode::Shuffled, seed).points;
        assert_ne!(shuffled(1), shuffled(2), "the seed changes the shuffle");
        assert_ne!(
            Layout::new(&g, 900.0, LayoutMode::Jittered, 0).points,
            Layout::new(&g, 900.0, LayoutMode::Importance, 0).points
        );
    }

    #[test]
    fn no_two_nodes_overlap_in_any_mode() {
        let g = crowded();
        for mode in LayoutMode::ALL {
            for seed in 0..3 {
                let l = Layout::new(&g, 700.0, mode, seed);
                let drawn: Vec<(Point, f64)> = l
                    .points
                    .iter()
                    .zip(&l.radii)
                    .filter_map(|(p, r)| Some(((*p)?, *r)))
                    .collect();
                assert_eq!(drawn.len(), g.nodes.len());
                for (i, (a, ra)) in drawn.iter().enumerate() {
                    for (b, rb) in &drawn[i + 1..] {
                        let d = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
                        assert!(
                            d >= ra + rb,
                            "{mode:?} seed {seed}: overlap at {a:?} / {b:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn importance_orders_cells_and_sizes_nodes() {
        let g = crowded();
        let l = Layout::new(&g, 900.0, LayoutMode::Importance, 0);
        let cell: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| g.nodes[i].key.starts_with("h.0.mlp.c_fc:1:"))
            .collect();
        let mut by_x = cell.clone();
        by_x.sort_by(|&a, &b| l.points[a].unwrap().x.total_cmp(&l.points[b].unwrap().x));
        let imps: Vec<f32> = by_x.iter().map(|&i| g.nodes[i].importance).collect();
        assert!(imps.windows(2).all(|w| w[0] >= w[1]), "{imps:?}");
        // Bigger importance, bigger node; never beyond the cell's radius.
        let (lo, hi) = (by_x[by_x.len() - 1], by_x[0]);
        assert!(l.radii[hi] > l.radii[lo]);
        assert!(l.radii.iter().all(|r| *r <= l.radius + 1e-12));
    }
}
