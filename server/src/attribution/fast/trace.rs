//! A trace folded while the engine computes: every node's influence on the seeds and the edges
//! that carry the most of it, without holding the graph (a 512-token prompt of the bench model has
//! tens of millions of edges). `super::super::influence` computes the same over edges in memory.
//!
//! Target layers run from the last down, one layer's units over all threads at a time: a layer's
//! nodes only feed later layers, so when its turn comes their influence is complete. A work unit
//! holds every incoming edge of its target nodes (both backends plan them so), which gives each
//! target's Σ |incoming| within the unit. Each thread adds what flows into sources to its own
//! dense table; a layer's entries are summed across threads just before that layer is processed.

use std::sync::Mutex;

use super::fill::fold_units;
use super::{Units, available_threads, unit_starts};
use crate::attribution::graph::Edge;
use crate::attribution::influence::{NodeIndex, Seeds, split_difference};
use crate::attribution::layer::Layer;
use crate::attribution::strongest::TopK;

/// What a traced run returns: the `k` highest-scoring edges with their scores, every node's
/// influence in [`NodeIndex`] order, and Σ score over the whole graph.
pub struct Folded {
    pub edges: Vec<(f64, Edge)>,
    pub node: Vec<f64>,
    pub total_edge_score: f64,
}

/// One thread's state, kept across layers.
struct State {
    buf: Vec<Edge>,
    /// What flowed into each node from this thread's units.
    acc: Vec<f64>,
    /// Σ |incoming| of the targets of the current unit (reset after it).
    rowsum: Vec<f64>,
    touched: Vec<usize>,
    top: TopK,
    total: f64,
}

/// Runs every unit, last target layer first, folding the trace of `seeds` over the nodes `alive`
/// (dense layer index, `n` modules). `keep` drops edges from the graph (hidden components).
#[allow(clippy::too_many_arguments)]
pub(super) fn trace_units(
    units: &impl Units,
    alive: &[Vec<Vec<u32>>],
    n: usize,
    seeds: &Seeds,
    k: usize,
    keep: &(dyn Fn(&Edge) -> bool + Sync),
    progress: &dyn Fn(usize, usize),
) -> Folded {
    let index = NodeIndex::new(alive);
    let lens = units.lens();
    let first = unit_starts(lens);
    let longest = lens.iter().copied().max().unwrap_or(0);
    let node_of = |layer: Layer, s: u32, c: u32| index.get(alive, layer.index(n), s, c);

    let mut infl = vec![0.0f64; index.len()];
    for t in seeds.targets() {
        if let Some(i) = node_of(t.0, t.1, t.2) {
            infl[i] = seeds.weight(t);
        }
    }
    let mut layers: Vec<Layer> = (0..lens.len()).map(|i| units.target(i)).collect();
    layers.sort_unstable();
    layers.dedup();
    let new_state = || State {
        buf: Vec::with_capacity(longest),
        acc: vec![0.0; index.len()],
        rowsum: vec![0.0; index.len()],
        touched: Vec::new(),
        top: TopK::new(k),
        total: 0.0,
    };
    let pool: Mutex<Vec<State>> = Mutex::new(Vec::new());
    let mut merged = vec![false; n + 2];
    let merge = |infl: &mut [f64], layer: usize, pool: &Mutex<Vec<State>>| {
        let range = index.layer(layer);
        for st in pool.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (x, a) in infl[range.clone()].iter_mut().zip(&st.acc[range.clone()]) {
                *x += a;
            }
        }
    };
    let n_units = lens.len();
    let mut done = 0usize;
    for &layer in layers.iter().rev() {
        let li = layer.index(n);
        merge(&mut infl, li, &pool);
        merged[li] = true;
        let mine: Vec<usize> = (0..n_units).filter(|&i| units.target(i) == layer).collect();
        let offset = done;
        let report = |d: usize, _: usize| progress(offset + d, n_units);
        if let (Seeds::Diff { pos, a, b }, Layer::Output) = (seeds, layer) {
            let mut st = pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(new_state);
            difference(
                units,
                &mine,
                &first,
                (*pos, *a, *b),
                keep,
                &node_of,
                &mut st,
            );
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(st);
            report(mine.len(), n_units);
        } else {
            let infl = &infl;
            let states = fold_units(
                mine.len(),
                available_threads(),
                || {
                    pool.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop()
                        .unwrap_or_else(new_state)
                },
                |j, st: &mut State| {
                    let i = mine[j];
                    st.buf.clear();
                    units.write(i, &mut st.buf);
                    fold_unit(st, first[i], infl, keep, &node_of);
                },
                &report,
            );
            pool.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(states);
        }
        done += mine.len();
    }
    // Layers that are never targets (wte): their influence is complete now.
    for (li, was) in merged.iter().enumerate() {
        if !was && li < alive.len() {
            merge(&mut infl, li, &pool);
        }
    }
    let mut top = TopK::new(k);
    let mut total = 0.0;
    for st in pool.into_inner().unwrap_or_else(|p| p.into_inner()) {
        total += st.total;
        top.merge(st.top);
    }
    Folded {
        edges: top.into_ranked(),
        node: infl,
        total_edge_score: total,
    }
}

/// Folds one unit's edges (in `st.buf`, the first at engine index `base`): each target's
/// influence flows to its sources in proportion to their |values|.
fn fold_unit(
    st: &mut State,
    base: usize,
    infl: &[f64],
    keep: &(dyn Fn(&Edge) -> bool + Sync),
    node_of: &(dyn Fn(Layer, u32, u32) -> Option<usize> + Sync),
) {
    let State {
        buf,
        acc,
        rowsum,
        touched,
        top,
        total,
    } = st;
    // A unit's edges come grouped by target, so its index is looked up once per run of them.
    let mut last: Option<(u32, u32)> = None;
    let mut t_idx = 0;
    let mut target_of = |e: &Edge| {
        if last != Some((e.s_out, e.c_out)) {
            last = Some((e.s_out, e.c_out));
            t_idx = node_of(e.target, e.s_out, e.c_out).expect("an edge's target is alive");
        }
        t_idx
    };
    for e in buf.iter() {
        if keep(e) {
            let t = target_of(e);
            if rowsum[t] == 0.0 {
                touched.push(t);
            }
            rowsum[t] += e.value.abs();
        }
    }
    for (j, e) in buf.iter().enumerate() {
        if !keep(e) {
            continue;
        }
        let t = target_of(e);
        let (mine, sum) = (infl[t], rowsum[t]);
        if mine == 0.0 || sum == 0.0 {
            continue;
        }
        let score = mine * (e.value.abs() / sum);
        if score > 0.0 {
            debug_assert!(e.source < e.target, "edges run forward in model order");
            let s = node_of(e.source, e.s_in, e.c_in).expect("an edge's source is alive");
            acc[s] += score;
            *total += score;
            top.offer_by(score, base + j, e);
        }
    }
    for &t in touched.iter() {
        rowsum[t] = 0.0;
    }
    touched.clear();
}

/// The output layer of a difference `a − b` at `pos`: the edges into both sides, paired by
/// source, carry the difference's influence back ([`split_difference`]).
fn difference(
    units: &impl Units,
    mine: &[usize],
    first: &[usize],
    (pos, a, b): (u32, u32, u32),
    keep: &(dyn Fn(&Edge) -> bool + Sync),
    node_of: &(dyn Fn(Layer, u32, u32) -> Option<usize> + Sync),
    st: &mut State,
) {
    // Per source, in first-seen order: its edges into a and b, and where they are.
    let mut sources: Vec<usize> = Vec::new();
    let mut pairs: Vec<(f64, f64)> = Vec::new();
    let mut at: Vec<[Option<(usize, Edge)>; 2]> = Vec::new();
    let mut slot: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for &i in mine {
        st.buf.clear();
        units.write(i, &mut st.buf);
        for (j, e) in st.buf.iter().enumerate() {
            let side = match (e.s_out == pos, e.c_out) {
                (true, c) if c == a => 0,
                (true, c) if c == b => 1,
                _ => continue,
            };
            if !keep(e) {
                continue;
            }
            let src = node_of(e.source, e.s_in, e.c_in).expect("an edge's source is alive");
            let k = *slot.entry(src).or_insert_with(|| {
                sources.push(src);
                pairs.push((0.0, 0.0));
                at.push([None, None]);
                sources.len() - 1
            });
            if side == 0 {
                pairs[k].0 += e.value;
            } else {
                pairs[k].1 += e.value;
            }
            at[k][side] = Some((first[i] + j, *e));
        }
    }
    for ((src, (share, sa, sb)), edges) in sources.iter().zip(split_difference(&pairs)).zip(&at) {
        st.acc[*src] += share;
        for (edge, score) in edges.iter().zip([sa, sb]) {
            if let Some((index, e)) = edge
                && score > 0.0
            {
                st.total += score;
                st.top.offer_by(score, *index, e);
            }
        }
    }
}
