//! Work units over threads: [`fold_units`] folds them into per-thread states (the server's running
//! selection of edges); [`fill_units`] writes one output vector, each unit into its own slice.
//!
//! A 32-token graph of the bench-shaped model has 1.2M edges, 77 MB: on a 2-core box merely
//! touching that memory for the first time from one thread took 29 ms, a third of the whole graph.
//! Both fast backends know every unit's edge count before computing it, so the vector is allocated
//! once and each unit writes its edges in place, in parallel, already in the final order — no
//! per-unit vectors joined afterwards.

use std::mem::MaybeUninit;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where a work unit puts what it produces.
pub trait Sink<T> {
    fn push(&mut self, item: T);
}

impl<T> Sink<T> for Vec<T> {
    #[inline]
    fn push(&mut self, item: T) {
        Vec::push(self, item);
    }
}

/// A unit's slots in the output, filled front to back.
pub struct Slots<'a, T> {
    slots: &'a mut [MaybeUninit<T>],
    filled: usize,
}

impl<T> Sink<T> for Slots<'_, T> {
    /// Writes the next item. Panics when the unit writes more than it announced (a bug).
    #[inline]
    fn push(&mut self, item: T) {
        self.slots[self.filled].write(item);
        self.filled += 1;
    }
}

/// Runs units `0..n` on up to `threads` threads, each thread folding the units it takes into its
/// own state (made by `init`); returns the states. `progress(done, n)` is called on this thread as
/// units finish.
pub fn fold_units<S: Send>(
    n: usize,
    threads: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(usize, &mut S) + Sync,
    progress: &dyn Fn(usize, usize),
) -> Vec<S> {
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, n.max(1));
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let tx = tx.clone();
                let (next, init, work) = (&next, &init, &work);
                scope.spawn(move || {
                    let mut state = init();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        work(i, &mut state);
                        let _ = tx.send(());
                    }
                    state
                })
            })
            .collect();
        drop(tx);
        for (done, ()) in rx.iter().enumerate() {
            progress(done + 1, n);
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Fills `lens.iter().sum()` items on up to `threads` threads: unit `i` (run as `fill(i, slots)`)
/// writes exactly `lens[i]` items, which land after those of the units before it. `progress(done,
/// total)` is called on this thread as units finish. Panics if a unit writes fewer or more items
/// than `lens` says (a bug in the caller's counting), before anything is exposed.
pub fn fill_units<T: Send>(
    lens: &[usize],
    threads: usize,
    fill: impl Fn(usize, &mut Slots<T>) + Sync,
    progress: &dyn Fn(usize, usize),
) -> Vec<T> {
    let total: usize = lens.iter().sum();
    let mut out = Vec::with_capacity(total);
    let mut rest = &mut out.spare_capacity_mut()[..total];
    let mut slices = Vec::with_capacity(lens.len());
    for &len in lens {
        let (head, tail) = rest.split_at_mut(len);
        slices.push(Mutex::new(Some(head)));
        rest = tail;
    }
    // Per thread: items written by its units, and the units that wrote a wrong number.
    let counts = fold_units(
        lens.len(),
        threads,
        || (0usize, Vec::new()),
        |i, (written, wrong): &mut (usize, Vec<(usize, usize, usize)>)| {
            let Some(slots) = slices[i].lock().ok().and_then(|mut s| s.take()) else {
                return;
            };
            let len = slots.len();
            let mut slots = Slots { slots, filled: 0 };
            fill(i, &mut slots);
            if slots.filled == len {
                *written += len;
            } else {
                wrong.push((i, slots.filled, len));
            }
        },
        progress,
    );
    let written: usize = counts.iter().map(|c| c.0).sum();
    let wrong: Vec<_> = counts.into_iter().flat_map(|c| c.1).collect();
    assert!(
        wrong.is_empty(),
        "work units wrote a wrong number of items (unit, wrote, announced): {wrong:?}"
    );
    // Every unit ran to completion (a panic in one would have propagated out of `fold_units`) and
    // wrote exactly its `len` slots, which tile `0..total`.
    assert_eq!(written, total);
    // SAFETY: the first `total` slots of `out`'s spare capacity are initialized (just checked) and
    // `total` ≤ capacity.
    unsafe { out.set_len(total) };
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_land_in_order_whatever_the_threads() {
        let lens = [3usize, 0, 5, 1, 0, 7, 2];
        let want: Vec<(usize, usize)> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| (0..n).map(move |k| (i, k)))
            .collect();
        for threads in [1, 2, 3, 16] {
            let seen = Mutex::new(Vec::new());
            let got = fill_units(
                &lens,
                threads,
                |i, slots| {
                    for k in 0..lens[i] {
                        slots.push((i, k));
                    }
                },
                &|done, total| seen.lock().unwrap().push((done, total)),
            );
            assert_eq!(got, want, "{threads} threads");
            let seen = seen.into_inner().unwrap();
            assert_eq!(seen.last(), Some(&(lens.len(), lens.len())));
            assert_eq!(seen.len(), lens.len());
        }
        assert!(fill_units::<u8>(&[], 4, |_, _| {}, &|_, _| {}).is_empty());
    }

    #[test]
    fn folded_units_cover_every_unit_once() {
        for threads in [1, 3, 16] {
            let states = fold_units(
                100,
                threads,
                Vec::new,
                |i, seen: &mut Vec<usize>| seen.push(i),
                &|_, _| {},
            );
            let mut all: Vec<usize> = states.into_iter().flatten().collect();
            all.sort_unstable();
            assert_eq!(all, (0..100).collect::<Vec<_>>());
        }
    }

    #[test]
    #[should_panic(expected = "wrote a wrong number of items")]
    fn a_short_unit_is_caught() {
        fill_units(&[2, 2], 2, |i, s| s.push(i), &|_, _| {});
    }
}
