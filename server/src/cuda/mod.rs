//! The batched CI pass on CUDA with fused kernels (`ci_kernels.cu`, compiled to PTX by `build.rs`).
//!
//! Every matmul stays in candle (cuBLAS). Between and after the CI networks' matmuls, and in the
//! target forward around them, kernels replace candle's chains of element-wise ops:
//! - `bias_act_f32` (and its float4 twin): bias + exact GELU of a hidden layer, one pass instead of
//!   two; without the GELU it also adds the target projections' biases (candle's broadcasting add
//!   indexes every element and was 5 % of the pass);
//! - `ci_final_f32`: final bias + lower-leaky sigmoid + threshold test + compaction of the active
//!   entries `(prompt, position, column, CI)` into one device buffer, plus per-component CI sums and
//!   firing counts. Only that buffer's used part and the reductions cross to the host.
//! - `layer_norm_f32`: the target's LayerNorms, one warp per row instead of candle's nine ops;
//! - `probs_final_f32`: softmax of each token's logits + threshold + compaction of the output entries
//!   `(prompt, position, token, p)`, so the `[B, T, vocab]` probabilities never leave the device.

use std::sync::Arc;

use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PinnedHostSlice, PushKernelArg};
use candle_core::cuda::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail};

pub use crate::generate::entries::{
    ActiveEntry, CiThresholds, reference_entries, reference_output_entries, sort_entries,
};
use crate::model::config::{CiFnType, SigmoidType};
use crate::model::transformer::{Linear, LinearHook, LnSite, Norm, matmul_last};
use crate::model::{ModuleId, SpdModel};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ci_kernels.ptx"));
const MODULE: &str = "spd_ci_kernels";
/// Must match `FINAL_THREADS` / `FINAL_ROWS` in `ci_kernels.cu`.
const FINAL_THREADS: u32 = 256;
const FINAL_ROWS: u32 = 64;
/// Must match `LN_THREADS` in `ci_kernels.cu`.
const LN_THREADS: u32 = 256;
/// Must match `PROB_THREADS` in `ci_kernels.cu`.
const PROB_THREADS: u32 = 256;

/// What [`ci_active_entries`] brings back.
#[derive(Debug, Clone)]
pub struct FusedCi {
    /// In no particular order (blocks finish in any order); see [`sort_entries`].
    pub entries: Vec<ActiveEntry>,
    /// Per column: the sum of CI over the batch's tokens.
    pub sum_ci: Vec<f32>,
    /// Per column: how many tokens have CI > `firing`.
    pub n_firing: Vec<u32>,
    /// Per module, `[B, T, C]` on the host, when asked for (checks only).
    pub dense: Option<Vec<Tensor>>,
    /// `[B, T, vocab]`, the target model's logits, on the device.
    pub logits: Tensor,
    /// From the call to the entry count on the host (the forward and kernels done), without the
    /// copies of entries and reductions.
    pub device_time: std::time::Duration,
}

/// The CI pass of token ids `[B, T]` on a CUDA model: active entries and per-component reductions.
pub fn ci_active_entries(model: &SpdModel, tokens: &Tensor, th: CiThresholds) -> Result<FusedCi> {
    ci_pass(model, tokens, th, None, Dense::No)
}

/// Where [`ci_pass`] leaves the dense lower CI, if the kernel writes it at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dense {
    No,
    /// Copied to the host (equality checks).
    Host,
    /// Kept on the device (`generate` gathers activation-context windows from it).
    Device,
}

/// As [`ci_active_entries`], for prompts of `lens` tokens (right-padded to `T`; `None`: all `T`)
/// and with the dense lower CI where `dense` says. Padding positions give no entries and count in
/// no sum.
pub fn ci_pass(
    model: &SpdModel,
    tokens: &Tensor,
    th: CiThresholds,
    lens: Option<&[u32]>,
    dense: Dense,
) -> Result<FusedCi> {
    let start = std::time::Instant::now();
    if model.global_ci.is_some() {
        bail!(
            "the fused CI kernels run layerwise CI networks; {} runs on candle's ops (--unfused)",
            model.ci_kind()
        );
    }
    let dev = model.device().as_cuda_device()?.clone();
    let kind = sigmoid_kind(model.config.sigmoid_type);
    let offsets = model.component_offsets();
    let (b, t) = tokens.dims2()?;
    let lens = match lens {
        Some(l) if l.len() != b || l.iter().any(|&n| n as usize > t) => {
            bail!(
                "fused CI: {} lengths for {b} prompts of {t} tokens",
                l.len()
            )
        }
        Some(l) => l.to_vec(),
        None => vec![t as u32; b],
    };
    let lens = dev.clone_htod(&lens)?;
    let n_cols = model.total_c();
    // Room for ~3% active entries; a fuller batch reruns with the exact count.
    let mut cap = ((b * t * n_cols) / 32).max(1 << 16);
    loop {
        let mut bufs = Buffers::new(&dev, n_cols, cap)?;
        let mut hook = FusedHook {
            model,
            dev: &dev,
            kind,
            th,
            seq_len: t,
            lens: &lens,
            keep_dense: dense,
            bufs: &mut bufs,
            dense: vec![None; model.modules.len()],
            offsets: &offsets,
        };
        let logits = model.target.forward(tokens, &mut hook)?;
        let dense_ci = hook.dense;
        let count = dev.clone_dtoh(&bufs.counter)?[0] as usize;
        let device_time = start.elapsed();
        if count > cap {
            cap = count;
            continue;
        }
        let entries = read_entries(&dev, &bufs.entries, count)?;
        let dense = if dense != Dense::No {
            Some(
                dense_ci
                    .into_iter()
                    .map(|d| d.expect("every decomposed module runs in the forward pass"))
                    .collect(),
            )
        } else {
            None
        };
        return Ok(FusedCi {
            entries,
            sum_ci: dev.clone_dtoh(&bufs.sums)?,
            n_firing: dev.clone_dtoh(&bufs.fires)?,
            dense,
            logits,
            device_time,
        });
    }
}

/// The output entries of logits `[B, T, vocab]` on a CUDA device: every `(prompt, position, token)`
/// whose softmax probability is ≥ `threshold`, with `column` the token id, for positions below
/// `lens[prompt]` (the rest is padding). In no particular order; see [`sort_entries`].
pub fn output_entries(logits: &Tensor, lens: &[u32], threshold: f32) -> Result<Vec<ActiveEntry>> {
    let dev = logits.device().as_cuda_device()?.clone();
    let (b, t, vocab) = logits.dims3()?;
    if lens.len() != b || lens.iter().any(|&l| l as usize > t) {
        bail!(
            "output entries: {} lengths for {b} prompts of {t} tokens",
            lens.len()
        );
    }
    let logits = logits.contiguous()?;
    let (ls, ll) = logits.storage_and_layout();
    let view = cuda_view(&ls, ll)?;
    let lens_dev = dev.clone_htod(lens)?;
    let func = dev.get_or_load_custom_func("probs_final_f32", MODULE, PTX)?;
    let n = b * t;
    // A probability ≥ threshold takes at least that share of its row, so a row has at most
    // 1 / threshold entries; the first try assumes far fewer.
    let mut cap = (n * 4).max(1 << 12);
    loop {
        // SAFETY: the kernel writes entries before anything reads them; only the counted prefix is
        // copied back.
        let mut entries = unsafe { dev.alloc::<u32>(4 * cap) }?;
        let mut counter = dev.alloc_zeros::<u64>(1)?;
        let (n32, v32, t32, cap64) = (n as u32, vocab as u32, t as u32, cap as u64);
        let mut lb = func.builder();
        lb.arg(&view)
            .arg(&n32)
            .arg(&v32)
            .arg(&t32)
            .arg(&lens_dev)
            .arg(&threshold)
            .arg(&mut entries)
            .arg(&cap64)
            .arg(&mut counter);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (PROB_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `probs_final_f32`; it reads n × vocab logits and
        // b lengths, and writes at most cap entries.
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        let count = dev.clone_dtoh(&counter)?[0] as usize;
        if count > cap {
            cap = count;
            continue;
        }
        return read_entries(&dev, &entries, count);
    }
}

thread_local! {
    /// Page-locked staging for the entries this thread reads back, kept between passes. Copying
    /// into a fresh pageable `Vec` made the driver stage through its own buffer and the kernel
    /// fault in every 4 KiB page, and the words were then laid out into a second `Vec`: at batch
    /// 4096 × 32 on an H200 (73M entries, 1.2 GB) that took 1.4 s after a 0.28 s pass.
    static STAGE: std::cell::RefCell<Option<PinnedHostSlice<u32>>> =
        const { std::cell::RefCell::new(None) };
}

/// A stage up to 4 × this many words (64 MiB) is kept whatever the batch.
const STAGE_KEEP_WORDS: usize = 1 << 22;

/// Below this many entries one thread lays them out (spawning costs more).
const PARALLEL_ENTRIES: usize = 1 << 18;

/// The first `count` entries of a kernel's entry buffer (4 words each: prompt, position, column,
/// value bits), copied to the host.
fn read_entries(
    dev: &CudaDevice,
    entries: &CudaSlice<u32>,
    count: usize,
) -> Result<Vec<ActiveEntry>> {
    if count == 0 {
        return Ok(vec![]);
    }
    let stream = dev.cuda_stream();
    let words = 4 * count;
    STAGE.with_borrow_mut(|stage| {
        // Reused while big enough and not far bigger than needed (page-locked memory is taken
        // from the whole machine: one huge batch should not pin gigabytes for the small ones).
        let fits = stage.as_ref().is_some_and(|s| {
            s.len() >= words
                && s.len() <= 4 * words.max(STAGE_KEEP_WORDS)
                && Arc::ptr_eq(s.context(), stream.context())
        });
        if !fits {
            *stage = None; // free the old one first
            // SAFETY: plain page-locked host memory (flags 0: cached, readable by the CPU, unlike
            // cudarc's write-combined default); every word read below is first written by the copy.
            let fresh = unsafe { stream.context().alloc_pinned_with_flags::<u32>(words, 0) };
            *stage = Some(fresh.w()?);
        }
        let stage = stage.as_mut().expect("allocated above");
        // Exactly 4 × count words: cudarc copies as many elements as the destination holds, so
        // the (possibly larger) stage itself must not be the destination.
        let dst = &mut stage.as_mut_slice().w()?[..words];
        stream.memcpy_dtoh(&entries.slice(..words), dst).w()?;
        // Into page-locked memory the copy is asynchronous, and cudarc does not wait for a plain
        // slice destination.
        stream.synchronize().w()?;
        Ok(lay_out_entries(dst))
    })
}

/// Entries from their 4-word form, in order, on all cores for large counts.
fn lay_out_entries(words: &[u32]) -> Vec<ActiveEntry> {
    let count = words.len() / 4;
    let entry = |w: &[u32]| ActiveEntry {
        prompt: w[0],
        position: w[1],
        column: w[2],
        ci: f32::from_bits(w[3]),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if count < PARALLEL_ENTRIES || threads == 1 {
        return words.chunks_exact(4).map(entry).collect();
    }
    let mut out = Vec::with_capacity(count);
    let per = count.div_ceil(threads);
    std::thread::scope(|scope| {
        for (dst, src) in out.spare_capacity_mut()[..count]
            .chunks_mut(per)
            .zip(words.chunks(4 * per))
        {
            scope.spawn(move || {
                for (d, w) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    d.write(entry(w));
                }
            });
        }
    });
    // SAFETY: the chunks cover the first `count` slots and every thread wrote all of its chunk
    // (a panicking thread propagates out of the scope before this line).
    unsafe { out.set_len(count) };
    out
}

fn sigmoid_kind(s: SigmoidType) -> i32 {
    // ci.rs: lower_ci
    match s {
        SigmoidType::Hard | SigmoidType::LowerLeakyHard | SigmoidType::LeakyHard => 0,
        SigmoidType::Normal => 1,
        SigmoidType::SwishHard => 2,
        SigmoidType::UpperLeakyHard => 3,
    }
}

/// The device buffers one pass writes its reductions into.
struct Buffers {
    entries: CudaSlice<u32>,
    cap: u64,
    counter: CudaSlice<u64>,
    sums: CudaSlice<f32>,
    fires: CudaSlice<u32>,
}

impl Buffers {
    fn new(dev: &CudaDevice, n_cols: usize, cap: usize) -> Result<Self> {
        Ok(Self {
            // SAFETY: the kernel writes entries before anything reads them; only the counted
            // prefix is copied back.
            entries: unsafe { dev.alloc::<u32>(4 * cap) }?,
            cap: cap as u64,
            counter: dev.alloc_zeros::<u64>(1)?,
            sums: dev.alloc_zeros::<f32>(n_cols)?,
            fires: dev.alloc_zeros::<u32>(n_cols)?,
        })
    }
}

struct FusedHook<'a> {
    model: &'a SpdModel,
    dev: &'a CudaDevice,
    kind: i32,
    th: CiThresholds,
    seq_len: usize,
    lens: &'a CudaSlice<u32>,
    keep_dense: Dense,
    bufs: &'a mut Buffers,
    dense: Vec<Option<Tensor>>,
    /// The first column of each module's components.
    offsets: &'a [usize],
}

impl LinearHook for FusedHook<'_> {
    fn norm(&mut self, _site: LnSite, x: &Tensor, norm: &Norm) -> Result<Tensor> {
        match &norm.bias {
            Some(bias) if norm.is_layer_norm() => x.contiguous()?.apply_op3_no_bwd(
                &norm.weight,
                bias,
                &LayerNormOp {
                    eps: norm.eps() as f32,
                },
            ),
            // RMSNorm: candle's ops (no kernel of its own yet).
            _ => candle_core::Module::forward(norm, x),
        }
    }

    fn linear(&mut self, id: ModuleId, x: &Tensor, linear: &Linear) -> Result<Tensor> {
        if let Some(i) = self.model.module_index(id) {
            self.module_ci(i, x)?;
        }
        let y = matmul_last(x, &linear.wt)?;
        match &linear.bias {
            Some(b) => {
                let rows = y.elem_count() / linear.d_out().max(1);
                y.contiguous()?.apply_op2_no_bwd(
                    b,
                    &BiasAct {
                        group_rows: rows,
                        gelu: false,
                    },
                )
            }
            None => Ok(y),
        }
    }
}

impl FusedHook<'_> {
    /// Module `i`'s CI network on its input `x` (`[B, T, d_in]`), ending in the fused final kernel.
    fn module_ci(&mut self, i: usize, x: &Tensor) -> Result<()> {
        let m = &self.model.modules[i];
        let (b, t, d_in) = x.dims3()?;
        let (n, c) = (b * t, m.components.c());
        let flat = x.reshape((n, d_in))?.contiguous()?;
        let Some(ci_fn) = &m.ci_fn else {
            bail!("{} has no layerwise CI network", m.name);
        };
        let layers = &ci_fn.layers;
        let Some(((w_last, b_last), hidden)) = layers.split_last() else {
            bail!("CI network of {} has no layers", m.name);
        };
        let gelu = BiasAct {
            group_rows: n,
            gelu: true,
        };
        // z as [N, C] (shared) or [C, N, 1] (one network per component), with its strides.
        let (z, row_stride, col_stride) = match ci_fn.kind {
            CiFnType::SharedMlp => {
                let mut h = flat;
                for (w, bias) in hidden {
                    h = h.matmul(w)?.apply_op2_no_bwd(bias, &gelu)?;
                }
                (h.matmul(w_last)?, c, 1)
            }
            CiFnType::VectorMlp | CiFnType::Mlp => {
                let mut h = match ci_fn.kind {
                    CiFnType::VectorMlp => flat.unsqueeze(0)?.broadcast_as((c, n, d_in))?,
                    _ => m.components.inner_acts(&flat)?.t()?.unsqueeze(2)?,
                }
                .contiguous()?;
                for (w, bias) in hidden {
                    h = h.matmul(w)?.apply_op2_no_bwd(bias, &gelu)?;
                }
                (h.matmul(w_last)?, 1, n)
            }
        };
        let col0 = self.offsets[i];
        let dense = self.final_kernel(&z, b_last, n, c, row_stride, col_stride, col0)?;
        self.dense[i] = match (self.keep_dense, dense) {
            (Dense::No, _) | (_, None) => None,
            (Dense::Host, Some(d)) => Some(Tensor::from_vec(
                self.dev.clone_dtoh(&d)?,
                (b, t, c),
                &candle_core::Device::Cpu,
            )?),
            (Dense::Device, Some(d)) => Some(Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(d, self.dev.clone())),
                (b, t, c),
                candle_core::op::BackpropOp::none(),
                false,
            )),
        };
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn final_kernel(
        &mut self,
        z: &Tensor,
        bias: &Tensor,
        n: usize,
        c: usize,
        row_stride: usize,
        col_stride: usize,
        col0: usize,
    ) -> Result<Option<CudaSlice<f32>>> {
        let z = z.contiguous()?;
        let bias = bias.contiguous()?;
        if bias.elem_count() != c || z.elem_count() != n * c {
            bail!(
                "fused CI: expected z of {} and bias of {c} values, found {} and {}",
                n * c,
                z.elem_count(),
                bias.elem_count()
            );
        }
        let (zs, zl) = z.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let z_view = cuda_view(&zs, zl)?;
        let b_view = cuda_view(&bs, bl)?;
        let mut ci_out = self
            .dev
            .alloc_zeros::<f32>(if self.keep_dense == Dense::No {
                1
            } else {
                n * c
            })?;
        let func = self
            .dev
            .get_or_load_custom_func("ci_final_f32", MODULE, PTX)?;
        let (n32, c32, rs32, cs32, t32) = (
            n as u32,
            c as u32,
            row_stride as u32,
            col_stride as u32,
            self.seq_len as u32,
        );
        let (col0, write) = (col0 as u32, i32::from(self.keep_dense != Dense::No));
        let mut sums = self.bufs.sums.slice_mut(col0 as usize..col0 as usize + c);
        let mut fires = self.bufs.fires.slice_mut(col0 as usize..col0 as usize + c);
        let mut lb = func.builder();
        lb.arg(&z_view)
            .arg(&b_view)
            .arg(&n32)
            .arg(&c32)
            .arg(&rs32)
            .arg(&cs32)
            .arg(&t32)
            .arg(self.lens)
            .arg(&self.kind)
            .arg(&self.th.active)
            .arg(&self.th.firing)
            .arg(&col0)
            .arg(&mut ci_out)
            .arg(&write)
            .arg(&mut sums)
            .arg(&mut fires)
            .arg(&mut self.bufs.entries)
            .arg(&self.bufs.cap)
            .arg(&mut self.bufs.counter);
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(FINAL_ROWS as usize) as u32,
                c.div_ceil(FINAL_THREADS as usize) as u32,
                1,
            ),
            block_dim: (FINAL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `ci_final_f32`; every index the kernel computes is
        // bounded by n, c and cap, the lengths of the buffers passed, and n / seq_len (< B, the
        // length of lens).
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        Ok((self.keep_dense != Dense::No).then_some(ci_out))
    }
}

/// The f32 device view of a contiguous CUDA tensor's storage.
fn cuda_view<'a>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<candle_core::cuda::cudarc::driver::CudaView<'a, f32>> {
    let Storage::Cuda(s) = storage else {
        bail!("fused CI: expected a CUDA tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fused CI: expected a contiguous tensor");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// `gelu_erf(x + bias)` (or `x + bias` without `gelu`) for `x` `[…, rows, h]` and a bias row per
/// `group_rows` rows (`[h]` or `[G, 1, h]`).
struct BiasAct {
    group_rows: usize,
    gelu: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias_act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("bias_act is a CUDA kernel; on the CPU use broadcast_add and gelu_erf")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device.clone();
        let (Some((x0, x1)), Some((b0, b1))) = (xl.contiguous_offsets(), bl.contiguous_offsets())
        else {
            bail!("bias_act: expected contiguous inputs");
        };
        let h = *xl.shape().dims().last().unwrap_or(&1);
        let len = x1 - x0;
        let rows = len / h.max(1);
        if self.group_rows == 0
            || !rows.is_multiple_of(self.group_rows)
            || b1 - b0 != rows / self.group_rows * h
        {
            bail!(
                "bias_act: {rows} rows of {h} in groups of {} do not fit a bias of {}",
                self.group_rows,
                b1 - b0
            );
        }
        let x = xs.as_cuda_slice::<f32>()?.slice(x0..x1);
        let b = bs.as_cuda_slice::<f32>()?.slice(b0..b1);
        // SAFETY: the kernel writes every element of `out`.
        let mut out = unsafe { dev.alloc::<f32>(len) }?;
        // float4 loads and stores where every row starts 16-byte aligned (allocations are
        // 256-byte aligned, so the element offsets decide).
        let vec4 = h.is_multiple_of(4) && x0.is_multiple_of(4) && b0.is_multiple_of(4);
        let (name, width) = if vec4 {
            ("bias_act_f32x4", h / 4)
        } else {
            ("bias_act_f32", h)
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let (rows32, w32, g32, gelu) = (
            rows as u32,
            width as u32,
            self.group_rows as u32,
            i32::from(self.gelu),
        );
        let mut lb = func.builder();
        lb.arg(&x)
            .arg(&b)
            .arg(&mut out)
            .arg(&rows32)
            .arg(&w32)
            .arg(&g32)
            .arg(&gelu);
        // Column blocks across a row; rows strided over at most 65,535 row blocks (the y limit).
        let cfg = LaunchConfig {
            grid_dim: (
                width.div_ceil(256).max(1) as u32,
                rows.clamp(1, 65_535) as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `bias_act_f32` / `bias_act_f32x4` (float4
        // pointers over the same buffers, 16-byte aligned as checked above); it reads rows × h
        // values and the bias and writes rows × h.
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// LayerNorm over the last dim of `x` with weight and bias `[d]` (biased variance, as
/// `transformer::Norm`).
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("layer_norm is a CUDA kernel; on the CPU use transformer::Norm")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device.clone();
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            xl.contiguous_offsets(),
            wl.contiguous_offsets(),
            bl.contiguous_offsets(),
        ) else {
            bail!("layer_norm: expected contiguous inputs");
        };
        let d = *xl.shape().dims().last().unwrap_or(&1);
        if d == 0 || w1 - w0 != d || b1 - b0 != d {
            bail!(
                "layer_norm: rows of {d} with a weight of {} and a bias of {}",
                w1 - w0,
                b1 - b0
            );
        }
        let len = x1 - x0;
        let rows = len / d;
        let x = xs.as_cuda_slice::<f32>()?.slice(x0..x1);
        let w = ws.as_cuda_slice::<f32>()?.slice(w0..w1);
        let b = bs.as_cuda_slice::<f32>()?.slice(b0..b1);
        // SAFETY: the kernel writes every element of `out`.
        let mut out = unsafe { dev.alloc::<f32>(len) }?;
        let func = dev.get_or_load_custom_func("layer_norm_f32", MODULE, PTX)?;
        let (rows32, d32) = (rows as u32, d as u32);
        let mut lb = func.builder();
        lb.arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&mut out)
            .arg(&rows32)
            .arg(&d32)
            .arg(&self.eps);
        let per_block = (LN_THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(per_block).max(1) as u32, 1, 1),
            block_dim: (LN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `layer_norm_f32`; it reads rows × d values and
        // d weights and biases, and writes rows × d.
        unsafe { lb.launch(cfg) }.w()?;
        drop(lb);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}
