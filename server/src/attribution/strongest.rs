//! The strongest edges of a graph: what the explorer draws.
//!
//! The original server sorts all edges by |value| (a stable sort, so ties keep the engine's order)
//! and keeps the first 30,000. A graph has millions of edges; selecting before sorting, or keeping a
//! running selection while the engine produces them, gives the same edges in the same order.

use std::cmp::Ordering;

use super::graph::Edge;

/// Strength order: larger |value| first, then earlier in the engine's order (`index`). `NaN` counts
/// as the strongest, as `f64::total_cmp` has it.
fn stronger(a: (f64, usize), b: (f64, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The `k` strongest of the `keep` edges, in strength order: the prefix of a stable sort by
/// descending |value|.
pub fn strongest(edges: &[Edge], keep: impl Fn(&Edge) -> bool, k: usize) -> Vec<Edge> {
    let mut top = TopK::new(k);
    for (i, e) in edges.iter().enumerate() {
        if keep(e) {
            top.offer(i, e);
        }
    }
    top.into_sorted()
}

/// A running selection of the `k` strongest edges offered, by engine index. Offers are cheap once
/// it is full: most edges fall below the current floor and are dropped with one comparison.
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    items: Vec<(f64, usize, Edge)>,
    /// The weakest kept item after the last pruning; anything not stronger is dropped.
    floor: Option<(f64, usize)>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::new(),
            floor: None,
        }
    }

    /// Offers the edge at engine position `index`.
    #[inline]
    pub fn offer(&mut self, index: usize, e: &Edge) {
        self.offer_by(e.value.abs(), index, e);
    }

    /// Offers the edge at engine position `index` ranked by `score` instead of its |value| (a
    /// trace's edges by the influence they carry).
    #[inline]
    pub fn offer_by(&mut self, score: f64, index: usize, e: &Edge) {
        let key = (score, index);
        if self.k == 0
            || self
                .floor
                .is_some_and(|f| stronger(key, f) != Ordering::Less)
        {
            return;
        }
        self.items.push((key.0, key.1, *e));
        if self.items.len() >= self.k.saturating_mul(2).max(4096) {
            self.prune();
        }
    }

    /// Keeps the `k` strongest items and remembers the weakest of them as the floor.
    fn prune(&mut self) {
        if self.items.len() > self.k {
            self.items
                .select_nth_unstable_by(self.k - 1, |a, b| stronger((a.0, a.1), (b.0, b.1)));
            self.items.truncate(self.k);
            self.floor = self
                .items
                .iter()
                .map(|x| (x.0, x.1))
                .max_by(|a, b| stronger(*a, *b));
        }
    }

    /// Folds in another selection (e.g. another thread's), keeping its ranking.
    pub fn merge(&mut self, other: TopK) {
        for (key, i, e) in other.items {
            self.offer_by(key, i, &e);
        }
    }

    /// The selection in strength order.
    pub fn into_sorted(self) -> Vec<Edge> {
        self.into_ranked().into_iter().map(|x| x.1).collect()
    }

    /// The selection in rank order, with each edge's ranking key (|value| or score).
    pub fn into_ranked(mut self) -> Vec<(f64, Edge)> {
        self.prune();
        self.items
            .sort_unstable_by(|a, b| stronger((a.0, a.1), (b.0, b.1)));
        self.items.into_iter().map(|x| (x.0, x.2)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Layer;
    use crate::model::synthetic::Rng;

    fn edges(n: usize, seed: u64) -> Vec<Edge> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|i| Edge {
                source: Layer::Wte,
                target: Layer::Output,
                c_in: i as u32,
                c_out: 0,
                s_in: 0,
                s_out: 0,
                // Few distinct magnitudes: ties everywhere, zeros included.
                value: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0][rng.below(7)]
                    * (1 + rng.below(3)) as f64,
                is_cross_seq: false,
            })
            .collect()
    }

    fn stable_sort_prefix(edges: &[Edge], keep: impl Fn(&Edge) -> bool, k: usize) -> Vec<Edge> {
        let mut want: Vec<Edge> = edges.iter().filter(|e| keep(e)).copied().collect();
        want.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
        want.truncate(k);
        want
    }

    #[test]
    fn strongest_is_the_stable_sort_prefix() {
        let edges = edges(20_000, 5);
        let keep = |e: &Edge| e.c_in % 7 != 3;
        for k in [
            0,
            1,
            17,
            1000,
            4096,
            9000,
            17_142,
            17_143,
            30_000,
            usize::MAX,
        ] {
            assert_eq!(
                strongest(&edges, keep, k),
                stable_sort_prefix(&edges, keep, k),
                "k = {k}"
            );
        }
    }

    /// Split into interleaved parts offered in any order and merged: the same selection.
    #[test]
    fn merged_parts_equal_one_selection() {
        let edges = edges(30_000, 9);
        for k in [1, 500, 10_000] {
            let mut parts: Vec<TopK> = (0..3).map(|_| TopK::new(k)).collect();
            for (i, e) in edges.iter().enumerate().rev() {
                parts[i % 3].offer(i, e);
            }
            let mut all = TopK::new(k);
            for p in parts {
                all.merge(p);
            }
            assert_eq!(
                all.into_sorted(),
                stable_sort_prefix(&edges, |_| true, k),
                "k = {k}"
            );
        }
    }
}
