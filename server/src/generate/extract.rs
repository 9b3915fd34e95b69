//! The batched CI pass and what the index keeps of it.
//!
//! [`forward`] runs the target model on a batch `[B, T]` and computes each decomposed module's
//! lower-leaky CI as soon as its input is known. [`extract`] then reduces CI and output probabilities
//! to what crosses to the host: per prompt and component the max value, the positions at or above the
//! threshold (as bit masks), and the first position of the max; per component the batch's CI sum and
//! firing count; and the few context windows that can still enter a top-k. Two ways to reduce, with
//! equal results: [`ScanMode::Host`] reads CPU tensors in place in one pass, [`ScanMode::Device`]
//! reduces with tensor ops on the device and copies only the reductions.

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::{DType, Device, Result, Storage, Tensor};

use crate::attribution::Thresholds;
use crate::model::ci::lower_ci;
use crate::model::spd::layerwise_pre_sigmoid;
use crate::model::transformer::{Linear, LinearHook, PlainForward, softmax_last};
use crate::model::{ModuleId, SpdModel};
use crate::store::contexts::ContextExample;
use crate::store::writer::{ActivationRow, PromptRows};

use super::contexts::{BatchContexts, ContextParams};
use super::corpus::Window;
use super::entries::ActiveEntry;

/// The lower-leaky CI of every module (`[B, T, C]`, model order) and the target model's output
/// probabilities (`[B, T, vocab]`) for token ids `[B, T]`.
pub fn forward(model: &SpdModel, tokens: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
    /// Layerwise runs compute each module's CI as soon as its input is known (so inputs are not
    /// kept); a global network needs every input first.
    struct LowerCi<'a> {
        model: &'a SpdModel,
        ci: Vec<Option<Tensor>>,
        inputs: Vec<Option<Tensor>>,
    }
    impl LinearHook for LowerCi<'_> {
        fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
            if let Some(i) = self.model.module_index(id) {
                if self.model.global_ci.is_some() {
                    self.inputs[i] = Some(x.clone());
                } else {
                    let z = layerwise_pre_sigmoid(&self.model.modules[i], x)?;
                    self.ci[i] = Some(lower_ci(self.model.config.sigmoid_type, &z)?);
                }
            }
            PlainForward.linear(id, x, linear)
        }
    }
    let n = model.modules.len();
    let mut hook = LowerCi {
        model,
        ci: vec![None; n],
        inputs: vec![None; n],
    };
    let logits = model.target.forward(tokens, &mut hook)?;
    let ci = if model.global_ci.is_some() {
        let inputs: Vec<Tensor> = hook
            .inputs
            .into_iter()
            .map(|x| x.expect("every decomposed module runs in the forward pass"))
            .collect();
        model
            .ci_pre_sigmoid(&inputs)?
            .iter()
            .map(|z| lower_ci(model.config.sigmoid_type, z))
            .collect::<Result<_>>()?
    } else {
        hook.ci
            .into_iter()
            .map(|c| c.expect("every decomposed module runs in the forward pass"))
            .collect()
    };
    Ok((ci, softmax_last(&logits)?))
}

/// [`forward`] of right-padded prompts of `lens` tokens. A CI network that reads other positions
/// (a global transformer attends both ways) would read the padding too, so such a batch runs one
/// prompt length at a time; each group's CI and probabilities are padded back with zeros (padding
/// positions are never read) and the rows returned in the batch's order.
pub fn forward_padded(
    model: &SpdModel,
    tokens: &Tensor,
    lens: &[usize],
) -> Result<(Vec<Tensor>, Tensor)> {
    let (b, t) = tokens.dims2()?;
    if !model.ci_reads_other_positions() || lens.iter().all(|&l| l == t) {
        return forward(model, tokens);
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
    for (row, &len) in lens.iter().enumerate() {
        groups.entry(len).or_default().push(row as u32);
    }
    let pad = |x: Tensor, len: usize| -> Result<Tensor> {
        if len == t {
            return Ok(x);
        }
        let (g, _, c) = x.dims3()?;
        let zeros = Tensor::zeros((g, t - len, c), x.dtype(), x.device())?;
        Tensor::cat(&[&x, &zeros], 1)
    };
    let (mut ci_parts, mut prob_parts, mut order) = (vec![], vec![], vec![]);
    for (len, rows) in groups {
        let idx = Tensor::new(rows.as_slice(), tokens.device())?;
        let sub = tokens.index_select(&idx, 0)?.narrow(1, 0, len.max(1))?;
        let (ci, probs) = forward(model, &sub)?;
        ci_parts.push(
            ci.into_iter()
                .map(|x| pad(x, len.max(1)))
                .collect::<Result<Vec<_>>>()?,
        );
        prob_parts.push(pad(probs, len.max(1))?);
        order.extend(rows);
    }
    // Row `order[k]` of the batch is row `k` of the concatenated groups.
    let mut inverse = vec![0u32; b];
    for (k, &row) in order.iter().enumerate() {
        inverse[row as usize] = k as u32;
    }
    let inverse = Tensor::new(inverse.as_slice(), tokens.device())?;
    let n_modules = model.modules.len();
    let ci = (0..n_modules)
        .map(|m| {
            let parts: Vec<&Tensor> = ci_parts.iter().map(|p| &p[m]).collect();
            Tensor::cat(&parts, 0)?.index_select(&inverse, 0)
        })
        .collect::<Result<_>>()?;
    let probs = Tensor::cat(&prob_parts, 0)?.index_select(&inverse, 0)?;
    Ok((ci, probs))
}

/// The key of every column the index can hold, by key id: `wte:0`, then each module's components in
/// model order, then `output:v` for the vocabulary. Rows refer to keys by id.
pub fn key_table(model: &SpdModel) -> Vec<String> {
    let mut keys = vec!["wte:0".to_owned()];
    for m in &model.modules {
        keys.extend((0..m.components.c()).map(|c| format!("{}:{c}", m.name)));
    }
    keys.extend((0..model.vocab_size()).map(|v| format!("output:{v}")));
    keys
}

/// How [`extract`] reduces a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// Read CPU tensors in place, one pass over each.
    Host,
    /// Reduce with tensor ops where the tensors are and copy the reductions (any device).
    Device,
}

impl ScanMode {
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Host
        } else {
            Self::Device
        }
    }
}

/// What the index and the activation contexts take from one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// Per prompt, its rows (key ids from [`key_table`]) in the order of the original's extraction.
    pub prompts: Vec<PromptRows>,
    /// CI columns: module `i`'s components in a row after those of the modules before it.
    pub contexts: BatchContexts,
}

/// Reductions of a batch, on the host. Columns: CI columns, then the vocabulary.
struct Scan {
    n_cols: usize,
    n_ci: usize,
    /// `[B, n_cols]`: max over the prompt's positions (−∞ for an empty prompt).
    max: Vec<f32>,
    /// `[B, n_ci]`: the first position holding that max.
    argmax: Vec<u32>,
    /// `[B, n_chunks, n_cols]`: bit `p % chunk` of word `p / chunk` is set where the value at position
    /// `p` is at or above the column's threshold.
    bits: Vec<u64>,
    chunk: usize,
    n_chunks: usize,
    sum_ci: Vec<f32>,
    n_firing: Vec<u32>,
}

/// Reduces one batch: `ci` and `probs` from [`forward`] of `windows` (right-padded to the longest).
pub fn extract(
    ci: &[Tensor],
    probs: &Tensor,
    windows: &[Window],
    th: Thresholds,
    ctx: &ContextParams,
    floors: &[AtomicU32],
    mode: ScanMode,
) -> Result<Extracted> {
    let lens: Vec<usize> = windows.iter().map(|w| w.tokens.len()).collect();
    let scan = match mode {
        ScanMode::Host => scan_host(ci, probs, &lens, th, ctx.threshold)?,
        ScanMode::Device => scan_device(ci, probs, &lens, th, ctx.threshold)?,
    };
    finish(scan, ci, windows, th, ctx, floors, mode)
}

/// A batch as the fused CUDA pass returns it (see `crate::cuda::ci_pass`), without padding
/// positions: what [`extract_entries`] reduces.
#[derive(Debug, Clone)]
pub struct EntryBatch {
    /// CI entries at or above [`EntryBatch::active_threshold`]; columns `module * C + component`.
    pub ci: Vec<ActiveEntry>,
    /// Output entries (probability ≥ the output threshold); columns are token ids.
    pub outputs: Vec<ActiveEntry>,
    /// Per CI column: the sum of CI over the batch's tokens, and how many have CI > the context
    /// threshold.
    pub sum_ci: Vec<f32>,
    pub n_firing: Vec<u32>,
}

impl EntryBatch {
    /// The CI threshold entries must be taken at: rows need values ≥ `th.ci`, context candidates
    /// values > `ctx.threshold`.
    pub fn active_threshold(th: Thresholds, ctx: &ContextParams) -> f32 {
        th.ci.min(ctx.threshold)
    }
}

/// [`extract`] for a batch already reduced to entries; `ci` is the dense lower CI (on any device)
/// from which the context windows are read, `vocab` the vocabulary size. Equal to [`extract`] on
/// the same batch.
#[allow(clippy::too_many_arguments)]
pub fn extract_entries(
    batch: EntryBatch,
    ci: &[Tensor],
    vocab: usize,
    windows: &[Window],
    th: Thresholds,
    ctx: &ContextParams,
    floors: &[AtomicU32],
    mode: ScanMode,
) -> Result<Extracted> {
    let lens: Vec<usize> = windows.iter().map(|w| w.tokens.len()).collect();
    let t = ci.first().map_or(0, |x| x.dims()[1]);
    let n_ci: usize = ci.iter().map(|x| x.dims()[2]).sum();
    let scan = scan_entries(batch, n_ci, vocab, t, &lens)?;
    finish(scan, ci, windows, th, ctx, floors, mode)
}

/// Rows, context candidates and their windows from a batch's reductions.
fn finish(
    scan: Scan,
    ci: &[Tensor],
    windows: &[Window],
    th: Thresholds,
    ctx: &ContextParams,
    floors: &[AtomicU32],
    mode: ScanMode,
) -> Result<Extracted> {
    let lens: Vec<usize> = windows.iter().map(|w| w.tokens.len()).collect();

    // Prompts' rows and columns' context picks are independent: both are split over threads (the
    // host side of a GPU batch is otherwise slower than the GPU's CI pass), and joined in order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let prompts: Vec<PromptRows> = in_parallel(windows.len(), threads, |range| {
        range
            .map(|b| prompt_rows(&scan, b, &windows[b], th))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();

    // Context candidates: per column the batch's best prompts that beat the column's current floor,
    // by (max desc, prompt), the first `top_k` of them.
    let picked: Vec<(u32, usize, std::ops::Range<usize>)> =
        in_parallel(scan.n_ci, threads, |cols| {
            let mut picked = vec![];
            let mut cands: Vec<(f32, usize)> = vec![];
            for col in cols {
                let floor = f32::from_bits(floors[col].load(Ordering::Relaxed));
                cands.clear();
                for b in 0..windows.len() {
                    let m = scan.max[b * scan.n_cols + col];
                    if m > ctx.threshold && m >= floor {
                        cands.push((m, b));
                    }
                }
                cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                for &(_, b) in cands.iter().take(ctx.top_k) {
                    let p = scan.argmax[b * scan.n_ci + col] as usize;
                    let range = p.saturating_sub(ctx.radius)..(p + ctx.radius + 1).min(lens[b]);
                    picked.push((col as u32, b, range));
                }
            }
            picked
        })
        .into_iter()
        .flatten()
        .collect();
    let values = gather(ci, &picked, mode)?;
    let mut examples = Vec::with_capacity(picked.len());
    for ((col, b, range), ci) in picked.into_iter().zip(values) {
        let p = scan.argmax[b * scan.n_ci + col as usize];
        examples.push((
            col,
            ContextExample {
                window: windows[b].index,
                position: p,
                active: p - range.start as u32,
                tokens: windows[b].tokens[range].to_vec(),
                ci,
            },
        ));
    }
    Ok(Extracted {
        prompts,
        contexts: BatchContexts {
            prompts: windows.len() as u64,
            tokens: lens.iter().sum::<usize>() as u64,
            sum_ci: scan.sum_ci,
            n_firing: scan.n_firing,
            examples,
        },
    })
}

/// One prompt's index rows: `wte:0` at every position, then each column whose max reaches its
/// threshold, in column order.
fn prompt_rows(scan: &Scan, b: usize, w: &Window, th: Thresholds) -> PromptRows {
    let len = w.tokens.len() as u32;
    let mut rows = vec![ActivationRow {
        key: 0,
        max_ci: 1.0,
        positions: (0..len).collect(),
    }];
    for col in 0..scan.n_cols {
        let max = scan.max[b * scan.n_cols + col];
        let thr = if col < scan.n_ci {
            th.ci
        } else {
            th.output_prob
        };
        if max >= thr {
            rows.push(ActivationRow {
                key: col as u32 + 1,
                max_ci: max,
                positions: scan.positions(b, col),
            });
        }
    }
    PromptRows {
        token_ids: w.tokens.clone(),
        rows,
    }
}

/// `work` over `0..n` split into one contiguous range per thread (at most `threads`); the results
/// in range order.
fn in_parallel<R: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let per = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let work = &work;
                scope.spawn(move || work(start..(start + per).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

impl Scan {
    fn positions(&self, b: usize, col: usize) -> Vec<u32> {
        let mut out = vec![];
        for j in 0..self.n_chunks {
            let mut word = self.bits[(b * self.n_chunks + j) * self.n_cols + col];
            while word != 0 {
                let bit = word.trailing_zeros();
                out.push((j * self.chunk) as u32 + bit);
                word &= word - 1;
            }
        }
        out
    }
}

/// The [`Scan`] of a batch given as entries: columns without an entry keep a max of −∞, which no
/// threshold passes, exactly as their true max (below every entry threshold) fails them.
fn scan_entries(
    batch: EntryBatch,
    n_ci: usize,
    vocab: usize,
    t: usize,
    lens: &[usize],
) -> Result<Scan> {
    let b = lens.len();
    let n_cols = n_ci + vocab;
    let n_chunks = t.div_ceil(64).max(1);
    if batch.sum_ci.len() != n_ci || batch.n_firing.len() != n_ci {
        candle_core::bail!(
            "entry batch: reductions for {} columns, the model has {n_ci}",
            batch.sum_ci.len()
        );
    }
    let mut s = Scan {
        n_cols,
        n_ci,
        max: vec![f32::NEG_INFINITY; b * n_cols],
        argmax: vec![0; b * n_ci],
        bits: vec![0; b * n_chunks * n_cols],
        chunk: 64,
        n_chunks,
        sum_ci: batch.sum_ci,
        n_firing: batch.n_firing,
    };
    for (entries, col0, limit) in [(&batch.ci, 0, n_ci), (&batch.outputs, n_ci, vocab)] {
        for e in entries {
            let (p, pos, col) = (e.prompt as usize, e.position as usize, e.column as usize);
            if p >= b || pos >= lens[p] || col >= limit {
                candle_core::bail!(
                    "entry batch: entry {e:?} outside {b} prompts of lengths {lens:?} × {limit} columns"
                );
            }
            let col = col0 + col;
            s.bits[(p * n_chunks + pos / 64) * n_cols + col] |= 1u64 << (pos % 64);
            let max = &mut s.max[p * n_cols + col];
            if col < n_ci {
                // The first position holding the max, as the dense scans.
                let arg = &mut s.argmax[p * n_ci + col];
                if e.ci > *max || (e.ci == *max && (pos as u32) < *arg) {
                    *max = e.ci;
                    *arg = pos as u32;
                }
            } else {
                *max = max.max(e.ci);
            }
        }
    }
    Ok(s)
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, in place.
fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("host scan of a tensor on {:?}", t.device().location());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("host scan of a non-contiguous tensor");
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

fn scan_host(
    ci: &[Tensor],
    probs: &Tensor,
    lens: &[usize],
    th: Thresholds,
    ctx_threshold: f32,
) -> Result<Scan> {
    let b = lens.len();
    let t = probs.dims()[1];
    let n_ci: usize = ci.iter().map(|x| x.dims()[2]).sum();
    let n_cols = n_ci + probs.dims()[2];
    let n_chunks = t.div_ceil(64).max(1);
    let mut s = Scan {
        n_cols,
        n_ci,
        max: vec![f32::NEG_INFINITY; b * n_cols],
        argmax: vec![0; b * n_ci],
        bits: vec![0; b * n_chunks * n_cols],
        chunk: 64,
        n_chunks,
        sum_ci: vec![0.0; n_ci],
        n_firing: vec![0; n_ci],
    };
    let mut col0 = 0;
    for x in ci.iter().chain(std::iter::once(probs)) {
        let x = x.contiguous()?;
        let w = x.dims()[2];
        let is_ci = col0 < n_ci;
        let thr = if is_ci { th.ci } else { th.output_prob };
        with_cpu_slice(&x, |data| {
            for (bi, &len) in lens.iter().enumerate() {
                for ti in 0..len {
                    let row = &data[(bi * t + ti) * w..][..w];
                    let word = &mut s.bits[(bi * n_chunks + ti / 64) * n_cols + col0..][..w];
                    let bit = 1u64 << (ti % 64);
                    for (wd, &v) in word.iter_mut().zip(row) {
                        *wd |= if v >= thr { bit } else { 0 };
                    }
                    let max = &mut s.max[bi * n_cols + col0..][..w];
                    if is_ci {
                        let arg = &mut s.argmax[bi * n_ci + col0..][..w];
                        // Branch-free, so the compiler vectorizes it.
                        for ((m, a), &v) in max.iter_mut().zip(arg.iter_mut()).zip(row) {
                            let above = v > *m;
                            *m = if above { v } else { *m };
                            *a = if above { ti as u32 } else { *a };
                        }
                        let sum = &mut s.sum_ci[col0..col0 + w];
                        let fire = &mut s.n_firing[col0..col0 + w];
                        for ((acc, n), &v) in sum.iter_mut().zip(fire.iter_mut()).zip(row) {
                            *acc += v;
                            *n += u32::from(v > ctx_threshold);
                        }
                    } else {
                        for (m, &v) in max.iter_mut().zip(row) {
                            *m = m.max(v);
                        }
                    }
                }
            }
        })?;
        col0 += w;
    }
    Ok(s)
}

/// Positions per bit-mask word on the device: sums of distinct powers of two stay exact in f64 up to
/// 2^53.
const DEVICE_CHUNK: usize = 52;

fn scan_device(
    ci: &[Tensor],
    probs: &Tensor,
    lens: &[usize],
    th: Thresholds,
    ctx_threshold: f32,
) -> Result<Scan> {
    let dev = probs.device();
    let (b, t) = (lens.len(), probs.dims()[1]);
    let n_chunks = t.div_ceil(DEVICE_CHUNK).max(1);
    let padded = n_chunks * DEVICE_CHUNK;
    // Positions past a prompt's end (right padding) read as −∞: never alive, never the max.
    let valid = if lens.iter().all(|&l| l == t) {
        None
    } else {
        let mask: Vec<u8> = lens
            .iter()
            .flat_map(|&l| (0..t).map(move |i| u8::from(i < l)))
            .collect();
        Some(Tensor::from_vec(mask, (b, t, 1), dev)?)
    };
    let pow2: Vec<f64> = (0..DEVICE_CHUNK).map(|i| (1u64 << i) as f64).collect();
    let pow2 = Tensor::from_vec(pow2, (1, 1, DEVICE_CHUNK, 1), dev)?;
    // (T − t) for t in 0..T: the largest where the max sits marks its first position.
    let rev: Vec<f32> = (0..t).map(|i| (t - i) as f32).collect();
    let rev = Tensor::from_vec(rev, (1, t, 1), dev)?;

    let (mut maxes, mut bits, mut firsts, mut sums, mut fires) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (i, x) in ci.iter().chain(std::iter::once(probs)).enumerate() {
        let is_ci = i < ci.len();
        let thr = if is_ci { th.ci } else { th.output_prob };
        let w = x.dims()[2];
        let xm = match &valid {
            Some(v) => {
                let neg = Tensor::full(f32::NEG_INFINITY, x.shape(), dev)?;
                v.broadcast_as(x.shape())?.where_cond(x, &neg)?
            }
            None => x.clone(),
        };
        let max = xm.max(1)?;
        let alive = xm.ge(thr)?.to_dtype(DType::F64)?;
        let alive = if padded > t {
            alive.pad_with_zeros(1, 0, padded - t)?
        } else {
            alive
        };
        bits.push(
            alive
                .reshape((b, n_chunks, DEVICE_CHUNK, w))?
                .broadcast_mul(&pow2)?
                .sum(2)?,
        );
        if is_ci {
            let at_max = xm.broadcast_eq(&max.unsqueeze(1)?)?.to_dtype(DType::F32)?;
            let first = (at_max.broadcast_mul(&rev)?.max(1)?.affine(-1.0, t as f64))?;
            firsts.push(first);
            let xs = match &valid {
                Some(v) => x.broadcast_mul(&v.to_dtype(DType::F32)?)?,
                None => x.clone(),
            };
            sums.push(xs.sum((0, 1))?);
            fires.push(xm.gt(ctx_threshold)?.to_dtype(DType::F32)?.sum((0, 1))?);
        }
        maxes.push(max);
    }
    let n_ci: usize = ci.iter().map(|x| x.dims()[2]).sum();
    let n_cols = n_ci + probs.dims()[2];
    let flat_f32 = |ts: &[Tensor], dim: usize| -> Result<Vec<f32>> {
        Tensor::cat(ts, dim)?.flatten_all()?.to_vec1::<f32>()
    };
    let bits: Vec<u64> = Tensor::cat(&bits, 2)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|x| x as u64)
        .collect();
    let (argmax, sum_ci, n_firing) = if ci.is_empty() {
        (vec![], vec![], vec![])
    } else {
        (
            flat_f32(&firsts, 1)?
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            flat_f32(&sums, 0)?,
            flat_f32(&fires, 0)?.into_iter().map(|x| x as u32).collect(),
        )
    };
    Ok(Scan {
        n_cols,
        n_ci,
        max: flat_f32(&maxes, 1)?,
        argmax,
        bits,
        chunk: DEVICE_CHUNK,
        n_chunks,
        sum_ci,
        n_firing,
    })
}

/// The CI values of each picked `(column, prompt, positions)`, from the module tensors `[B, T, C]`.
fn gather(
    ci: &[Tensor],
    picked: &[(u32, usize, std::ops::Range<usize>)],
    mode: ScanMode,
) -> Result<Vec<Vec<f32>>> {
    if picked.is_empty() {
        return Ok(vec![]);
    }
    let t = ci[0].dims()[1];
    let mut offsets = vec![0usize];
    for x in ci {
        offsets.push(offsets.last().copied().unwrap_or(0) + x.dims()[2]);
    }
    // (module, index into its flat `[B, T, C]` data) of a column at prompt `b`, position `p`.
    let locate = |col: u32, b: usize, p: usize| {
        let col = col as usize;
        let m = offsets.partition_point(|&o| o <= col) - 1;
        let c = offsets[m + 1] - offsets[m];
        (m, (b * t + p) * c + col - offsets[m])
    };
    match mode {
        ScanMode::Host => picked
            .iter()
            .map(|(col, b, range)| {
                let m = locate(*col, *b, 0).0;
                with_cpu_slice(&ci[m], |data| {
                    range.clone().map(|p| data[locate(*col, *b, p).1]).collect()
                })
            })
            .collect(),
        ScanMode::Device => {
            // One index_select per module, then one copy.
            let mut parts = vec![];
            for (m, x) in ci.iter().enumerate() {
                let idx: Vec<u32> = picked
                    .iter()
                    .filter(|(col, b, _)| locate(*col, *b, 0).0 == m)
                    .flat_map(|(col, b, range)| range.clone().map(|p| locate(*col, *b, p).1 as u32))
                    .collect();
                if !idx.is_empty() {
                    let n = idx.len();
                    let idx = Tensor::from_vec(idx, n, x.device())?;
                    parts.push(x.flatten_all()?.index_select(&idx, 0)?);
                }
            }
            let mut values = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?.into_iter();
            // `picked` is sorted by column, so module order is pick order.
            Ok(picked
                .iter()
                .map(|(_, _, range)| values.by_ref().take(range.len()).collect())
                .collect())
        }
    }
}
