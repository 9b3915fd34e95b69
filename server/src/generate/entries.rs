//! Active entries: the sparse form in which the fused CUDA CI pass (`crate::cuda`) returns a batch —
//! every `(prompt, position, column, value)` at or above a threshold — and its host reference from
//! dense tensors. Plain host code, so `generate` can reduce entries and the tests can check that
//! on any machine.

use candle_core::{Result, Tensor};

/// Thresholds of the fused reduction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CiThresholds {
    /// An entry is active (and compacted) where its CI ≥ this.
    pub active: f32,
    /// A component fires where its CI > this (counted per component).
    pub firing: f32,
}

/// One active entry. `column` is `module * C + component` (module in `SpdModel::modules` order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActiveEntry {
    pub prompt: u32,
    pub position: u32,
    pub column: u32,
    pub ci: f32,
}

/// Sorts entries by (prompt, position, column).
pub fn sort_entries(entries: &mut [ActiveEntry]) {
    entries.sort_unstable_by_key(|e| (e.prompt, e.position, e.column));
}

/// The entries of `cuda::output_entries` from probabilities `[B, T, vocab]` (e.g. the CPU path's), sorted.
pub fn reference_output_entries(
    probs: &Tensor,
    lens: &[u32],
    threshold: f32,
) -> Result<Vec<ActiveEntry>> {
    let (b, t, vocab) = probs.dims3()?;
    let data: Vec<f32> = probs.flatten_all()?.to_vec1()?;
    let mut entries = vec![];
    for (p, &len) in lens.iter().enumerate().take(b) {
        for pos in 0..(len as usize).min(t) {
            let row = &data[(p * t + pos) * vocab..][..vocab];
            for (tok, &v) in row.iter().enumerate() {
                if v >= threshold {
                    entries.push(ActiveEntry {
                        prompt: p as u32,
                        position: pos as u32,
                        column: tok as u32,
                        ci: v,
                    });
                }
            }
        }
    }
    sort_entries(&mut entries);
    Ok(entries)
}

/// The entries and reductions of `cuda::ci_active_entries`, computed on the host from dense lower CI
/// (`[B, T, C]` per module, e.g. from the CPU path): the reference the fused kernels must equal.
/// Prompts are `lens` tokens long (right-padded to `T`; `None`: all `T`): padding positions give
/// no entries and count in no sum, as in the kernel.
pub fn reference_entries(
    ci: &[Tensor],
    th: CiThresholds,
    lens: Option<&[u32]>,
) -> Result<(Vec<ActiveEntry>, Vec<f32>, Vec<u32>)> {
    let mut entries = vec![];
    let (mut sums, mut fires) = (vec![], vec![]);
    let mut col0 = 0;
    for x in ci {
        let (b, t, c) = x.dims3()?;
        let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (mut s, mut f) = (vec![0f32; c], vec![0u32; c]);
        for (k, &v) in data.iter().enumerate() {
            let (row, col) = (k / c, k % c);
            if lens.is_some_and(|l| row % t >= l[row / t] as usize) {
                continue;
            }
            s[col] += v;
            f[col] += u32::from(v > th.firing);
            if v >= th.active {
                entries.push(ActiveEntry {
                    prompt: (row / t) as u32,
                    position: (row % t) as u32,
                    column: (col0 + col) as u32,
                    ci: v,
                });
            }
        }
        debug_assert_eq!(data.len(), b * t * c);
        col0 += c;
        sums.extend(s);
        fires.extend(f);
    }
    sort_entries(&mut entries);
    Ok((entries, sums, fires))
}
