//! The fast engine's closed forms as batched tensor ops on the model's device, for GPUs.
//!
//! The host backend walks (target, position) units and touches only alive rows; on a GPU that
//! is thousands of tiny launches. Here each target layer's alive nodes become the rows of a few
//! dense products instead: for every alive target row `(s, c_out)` the local Jacobian is applied
//! to *all* of a source's components (same-position sources: `[rows, C]`) or to all of its alive
//! `(s_in, c_in)` pairs (attention's `k`/`v`: `[rows, pairs]`), and the entries that are edges are
//! gathered on the device by index. Every gathered piece is concatenated and read back once; the
//! host only lays the values out as [`Edge`]s in the reference engine's order.
//!
//! The math is the host backend's (see its doc comments); only the batching differs, so results
//! agree to float rounding. Rows are processed in chunks so that no intermediate exceeds
//! [`CHUNK_ELEMS`], which keeps 512-token prompts within a few hundred MiB of device memory.

use candle_core::{DType, Device, Tensor};

use super::fill::Sink;
use super::record::Recorded;
use super::{Collect, Collected, Step, TargetPlan, Units, collect_units};
use crate::attribution::graph::Edge;
use crate::attribution::influence::Seeds;
use crate::attribution::layer::Layer;
use crate::attribution::prompt::PromptCi;
use crate::model::transformer::{LN_EPS, ModuleId, ModuleKind};
use crate::model::{RunError, SpdModel};

/// Upper bound on the elements of one dense intermediate (64 MiB of f32).
const CHUNK_ELEMS: usize = 1 << 24;

/// Device copies, laid out for the products below.
pub struct TensorWeights {
    /// Per decomposed module: `U` `[C, d_out]`, `Uᵀ` `[d_out, C]`, `Vᵀ` `[C, d_in]`.
    u: Vec<Tensor>,
    ut: Vec<Tensor>,
    vt: Vec<Tensor>,
    /// `[vocab, d]`
    lm_head: Tensor,
    /// Per plan: the LayerNorm weight `[d]` of a residual reader.
    ln: Vec<Option<Tensor>>,
    ids: Vec<ModuleId>,
    n_head: usize,
    head_dim: usize,
    /// [`CHUNK_ELEMS`]; smaller in tests, to exercise chunking on tiny models.
    chunk_elems: usize,
}

impl TensorWeights {
    pub(super) fn new(model: &SpdModel, plans: &[TargetPlan]) -> candle_core::Result<Self> {
        let mut u = Vec::new();
        let mut ut = Vec::new();
        let mut vt = Vec::new();
        for m in &model.modules {
            u.push(m.components.u.contiguous()?);
            ut.push(m.components.u.t()?.contiguous()?);
            vt.push(m.components.v.t()?.contiguous()?);
        }
        let ln = plans
            .iter()
            .map(|p| match p.step {
                Step::Residual { site, .. } => {
                    model.target.norm(site).weight.flatten_all().map(Some)
                }
                _ => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            u,
            ut,
            vt,
            lm_head: model.target.lm_head_t.t()?.contiguous()?,
            ln,
            ids: model.modules.iter().map(|m| m.id).collect(),
            n_head: model.target.cfg.n_head,
            head_dim: model.target.cfg.head_dim(),
            chunk_elems: CHUNK_ELEMS,
        })
    }
}

/// Alive `(position, index)` pairs of one layer in `(s, c)` order; `start[s]` is the first pair at
/// position `s` (`start[T]` = the count), so the pairs at positions `≤ s` are `..start[s + 1]`.
struct Pairs {
    s: Vec<u32>,
    c: Vec<u32>,
    start: Vec<usize>,
}

impl Pairs {
    fn new(alive: &[Vec<u32>]) -> Self {
        let mut p = Pairs {
            s: vec![],
            c: vec![],
            start: vec![0],
        };
        for (s, cs) in alive.iter().enumerate() {
            p.s.extend(std::iter::repeat_n(s as u32, cs.len()));
            p.c.extend(cs);
            p.start.push(p.c.len());
        }
        p
    }

    fn len(&self) -> usize {
        self.c.len()
    }

    fn at(&self, s: usize) -> &[u32] {
        &self.c[self.start[s]..self.start[s + 1]]
    }
}

/// `index_select` and `matmul` on contiguous operands only: CUDA's refuse (or restrict) other
/// layouts while the CPU's accept any, so the CPU tests would not notice. Checked in debug builds,
/// which is how the tests run.
trait Contiguous {
    fn select_rows(&self, ids: &Tensor, dim: usize) -> candle_core::Result<Tensor>;
    fn mm(&self, rhs: &Tensor) -> candle_core::Result<Tensor>;
}

impl Contiguous for Tensor {
    fn mm(&self, rhs: &Tensor) -> candle_core::Result<Tensor> {
        debug_assert!(
            self.is_contiguous() && rhs.is_contiguous(),
            "matmul operands {:?} × {:?} are not contiguous",
            self.shape(),
            rhs.shape()
        );
        self.matmul(rhs)
    }

    fn select_rows(&self, ids: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
        debug_assert!(
            self.is_contiguous(),
            "index_select source {:?} is not contiguous",
            self.shape()
        );
        self.index_select(ids, dim)
    }
}

fn u32s(v: &[u32], dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, v.len(), dev)
}

/// `dense.flatten()[idx]`, or nothing when no entry is wanted.
fn gather(dense: &Tensor, idx: &[u32]) -> candle_core::Result<Option<Tensor>> {
    if idx.is_empty() {
        return Ok(None);
    }
    let ids = u32s(idx, dense.device())?;
    Ok(Some(dense.flatten_all()?.select_rows(&ids, 0)?))
}

/// Derivative of the tanh-approximation GELU, element-wise (the host's `gelu_tanh_grad`).
fn gelu_tanh_grad(x: &Tensor) -> candle_core::Result<Tensor> {
    const K: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)
    const A: f64 = 0.044_715;
    let x2 = x.sqr()?;
    let t = (x * x2.affine(A, 1.0)?)?.affine(K, 0.0)?.tanh()?;
    let left = t.affine(0.5, 0.5)?;
    let right =
        ((x * t.sqr()?.affine(-1.0, 1.0)?)? * x2.affine(3.0 * A, 1.0)?)?.affine(0.5 * K, 0.0)?;
    left + right
}

/// `[r, H·hd] → [H, r, hd]`
fn heads(x: &Tensor, nh: usize, hd: usize) -> candle_core::Result<Tensor> {
    let r = x.dim(0)?;
    x.reshape((r, nh, hd))?.transpose(0, 1)?.contiguous()
}

/// One chunk of a plan's target rows, on the host and on the device.
struct Chunk<'a> {
    s: &'a [u32],
    rs: Tensor,
    rc: Tensor,
}

impl Chunk<'_> {
    fn n(&self) -> usize {
        self.s.len()
    }

    /// Indices into a `[rows, C]` product of the same-position pairs `(row, c_in)`.
    fn same_position(&self, pairs: &Pairs, width: usize) -> Vec<u32> {
        let mut idx = Vec::new();
        for (i, &s) in self.s.iter().enumerate() {
            idx.extend(pairs.at(s as usize).iter().map(|&c| (i * width) as u32 + c));
        }
        idx
    }

    /// Indices into a `[rows, pairs]` product of the causal pairs (`s_in ≤ s_out`).
    fn causal(&self, pairs: &Pairs) -> Vec<u32> {
        let width = pairs.len();
        let mut idx = Vec::new();
        for (i, &s) in self.s.iter().enumerate() {
            let base = (i * width) as u32;
            idx.extend((0..pairs.start[s as usize + 1] as u32).map(|p| base + p));
        }
        idx
    }
}

/// The edges of one prompt, in the reference engine's order: `(plan, s_out, c_out, source, s_in,
/// c_in)`. `progress(done, total)` counts (target, position) units, like the host backend.
#[allow(clippy::too_many_arguments)]
pub(super) fn edges(
    plans: &[TargetPlan],
    w: &TensorWeights,
    ci: &PromptCi,
    rec: &Recorded,
    alive: &[Vec<Vec<u32>>],
    collect: Collect,
    seeds: Option<&Seeds>,
    progress: &dyn Fn(usize, usize),
) -> Result<(Collected, usize), RunError> {
    let dev = rec.logits.device().clone();
    let t = ci.tokens.len();
    let n = w.u.len();
    let pairs: Vec<Pairs> = (0..n)
        .map(|j| Pairs::new(&alive[Layer::Module(j).index(n)]))
        .collect();
    let coef = &rec.coef;
    // Each plan's target rows: its alive (position, component) pairs.
    let rows: Vec<Pairs> = plans
        .iter()
        .map(|p| Pairs::new(&alive[p.target.index(n)]))
        .collect();
    let mut pieces = Vec::new();
    for ((p_idx, plan), rows) in plans.iter().enumerate().zip(&rows) {
        let mut per_source: Vec<Vec<Tensor>> = vec![Vec::new(); plan.sources.len()];
        if rows.len() > 0 {
            plan_pieces(
                w,
                rec,
                coef,
                &pairs,
                p_idx,
                plan,
                rows,
                &dev,
                &mut per_source,
            )?;
        }
        pieces.extend(per_source.into_iter().flatten());
        progress((p_idx + 1) * t, plans.len() * t);
    }
    let values: Vec<f32> = if pieces.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(&pieces, 0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1()?
    };
    let layout = Layout::new(plans, &rows, &pairs, &values)?;
    let collected = collect_units(&layout, collect, alive, n, seeds, &|_, _| {});
    Ok((collected, values.len()))
}

/// Computes one plan's values: per source, pieces ordered by target row, then source pair.
#[allow(clippy::too_many_arguments)]
fn plan_pieces(
    w: &TensorWeights,
    rec: &Recorded,
    coef: &[Tensor],
    pairs: &[Pairs],
    p_idx: usize,
    plan: &TargetPlan,
    rows: &Pairs,
    dev: &Device,
    out: &mut [Vec<Tensor>],
) -> candle_core::Result<()> {
    let (nh, hd) = (w.n_head, w.head_dim);
    let t = rec.logits.dim(0)?;
    let module = |l: Layer| match l {
        Layer::Module(j) => j,
        _ => unreachable!("planned as a module"),
    };
    let c_max =
        w.u.iter()
            .map(|u| u.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
    let c_max = c_max.into_iter().max().unwrap_or(1);
    // The widest intermediate per row decides the chunk.
    let width = match &plan.step {
        Step::Residual { .. } => c_max.max(w.lm_head.dim(1)?),
        Step::Attention { .. } => {
            let widest_pairs = plan
                .sources
                .iter()
                .map(|s| pairs[module(s.layer)].len())
                .max()
                .unwrap_or(0);
            (nh * t.max(widest_pairs)).max(c_max)
        }
        Step::Mlp { .. } | Step::Glu { .. } => c_max.max(
            rec.outputs
                .values()
                .map(|o| o.dim(1).unwrap_or(0))
                .max()
                .unwrap_or(0),
        ),
        Step::Identity => unreachable!("the tensor backend does not cover inserted identities"),
    };
    let per_chunk = (w.chunk_elems / width.max(1)).max(1);
    let chunks = (0..rows.len()).step_by(per_chunk).map(|r0| {
        let r1 = (r0 + per_chunk).min(rows.len());
        Ok::<_, candle_core::Error>(Chunk {
            s: &rows.s[r0..r1],
            rs: u32s(&rows.s[r0..r1], dev)?,
            rc: u32s(&rows.c[r0..r1], dev)?,
        })
    });
    // Same-position module source: `dense[row, c_in]` scaled by `coef[s(row), c_in]`, gathered.
    let same_position =
        |chunk: &Chunk, j: usize, dense: Tensor| -> candle_core::Result<Option<Tensor>> {
            let dense = (dense * coef[j].select_rows(&chunk.rs, 0)?)?;
            gather(&dense, &chunk.same_position(&pairs[j], coef[j].dim(1)?))
        };
    match &plan.step {
        Step::Residual { site, .. } => {
            // LayerNorm backward: ∂x = (g̃ − mean(g̃) − x̂·mean(g̃ ⊙ x̂)) / σ with g̃ = column ⊙ w.
            // Statistics in float64 as the host backend (a near-constant row loses digits in f32).
            let x = rec.residual_at(*site).to_dtype(DType::F64)?;
            let xc = x.broadcast_sub(&x.mean_keepdim(1)?)?;
            let inv_sigma = xc
                .sqr()?
                .mean_keepdim(1)?
                .affine(1.0, LN_EPS)?
                .sqrt()?
                .recip()?;
            let xhat = xc.broadcast_mul(&inv_sigma)?.to_dtype(DType::F32)?;
            let inv_sigma = inv_sigma.to_dtype(DType::F32)?;
            let ln_w = w.ln[p_idx]
                .as_ref()
                .expect("residual plans have a LayerNorm");
            let columns = match plan.target {
                Layer::Module(i) => &w.vt[i],
                _ => &w.lm_head,
            };
            for chunk in chunks {
                let chunk = chunk?;
                let gt = columns.select_rows(&chunk.rc, 0)?.broadcast_mul(ln_w)?;
                let xh = xhat.select_rows(&chunk.rs, 0)?;
                let m1 = gt.mean_keepdim(1)?;
                let m2 = (&gt * &xh)?.mean_keepdim(1)?;
                let g = (gt.broadcast_sub(&m1)? - xh.broadcast_mul(&m2)?)?
                    .broadcast_mul(&inv_sigma.select_rows(&chunk.rs, 0)?)?;
                for (k, src) in plan.sources.iter().enumerate() {
                    let piece = match src.layer {
                        Layer::Wte => Some((rec.embed.select_rows(&chunk.rs, 0)? * &g)?.sum(1)?),
                        Layer::Module(j) => same_position(&chunk, j, g.mm(&w.ut[j])?)?,
                        Layer::Output => unreachable!("output is never a source"),
                    };
                    out[k].extend(piece);
                }
            }
        }
        Step::Attention { block } => {
            let output = |kind| &rec.outputs[&ModuleId::new(*block, kind)];
            let q = output(ModuleKind::Q);
            let kh = heads(output(ModuleKind::K), nh, hd)?;
            let vh_t = heads(output(ModuleKind::V), nh, hd)?
                .transpose(1, 2)?
                .contiguous()?;
            let probs = &rec.probs[*block];
            let o = module(plan.target);
            // Per cross-position source: its alive pairs' positions, `U` rows by head (transposed
            // for the product), and coefficients.
            let mut cross = Vec::new();
            for src in &plan.sources {
                let j = module(src.layer);
                let p = &pairs[j];
                cross.push(if src.cross_seq && p.len() > 0 {
                    let ps = u32s(&p.s, dev)?;
                    let pc = u32s(&p.c, dev)?;
                    let c = coef[j].dim(1)? as u32;
                    let flat: Vec<u32> = p.s.iter().zip(&p.c).map(|(s, ci)| s * c + ci).collect();
                    let coefs = coef[j]
                        .flatten_all()?
                        .select_rows(&u32s(&flat, dev)?, 0)?
                        .unsqueeze(0)?;
                    let u_t = heads(&w.u[j].select_rows(&pc, 0)?, nh, hd)?
                        .transpose(1, 2)?
                        .contiguous()?;
                    Some((ps, u_t, coefs))
                } else {
                    None
                });
            }
            let inv_sqrt = 1.0 / (hd as f64).sqrt();
            for chunk in chunks {
                let chunk = chunk?;
                let cols = heads(&w.vt[o].select_rows(&chunk.rc, 0)?, nh, hd)?; // [H, n, hd]
                let prow = probs.select_rows(&chunk.rs, 1)?; // [H, n, T]
                // w[h, row, s2] = v_h[s2] · β_h(row); f = p ⊙ (w − p·w) / √hd
                let wt = cols.mm(&vh_t)?;
                let wbar = (&prow * &wt)?.sum_keepdim(2)?;
                let f = (&prow * wt.broadcast_sub(&wbar)?)?.affine(inv_sqrt, 0.0)?;
                for (k, src) in plan.sources.iter().enumerate() {
                    let j = module(src.layer);
                    let piece = match (w.ids[j].kind, &cross[k]) {
                        (ModuleKind::Q, _) => {
                            let rho = f
                                .mm(&kh)?
                                .transpose(0, 1)?
                                .contiguous()?
                                .reshape((chunk.n(), nh * hd))?;
                            same_position(&chunk, j, rho.mm(&w.ut[j])?)?
                        }
                        (ModuleKind::K, Some((ps, uk_t, coefs))) => {
                            let qh = heads(&q.select_rows(&chunk.rs, 0)?, nh, hd)?;
                            let kq = qh.mm(uk_t)?; // [H, n, pairs]
                            let dense =
                                (kq * f.select_rows(ps, 2)?)?.sum(0)?.broadcast_mul(coefs)?;
                            gather(&dense, &chunk.causal(&pairs[j]))?
                        }
                        (ModuleKind::V, Some((ps, uv_t, coefs))) => {
                            let a = cols.mm(uv_t)?; // [H, n, pairs]
                            let dense = (a * prow.select_rows(ps, 2)?)?
                                .sum(0)?
                                .broadcast_mul(coefs)?;
                            gather(&dense, &chunk.causal(&pairs[j]))?
                        }
                        // A cross-position source with no alive pair emits nothing.
                        (ModuleKind::K | ModuleKind::V, None) => None,
                        _ => unreachable!("attention sources are q, k, v"),
                    };
                    out[k].extend(piece);
                }
            }
        }
        Step::Glu { .. } => unreachable!("the tensor backend refuses SwiGLU models"),
        Step::Identity => unreachable!("the tensor backend refuses inserted identities"),
        Step::Mlp { block } => {
            let h = &rec.outputs[&ModuleId::new(*block, ModuleKind::CFc)];
            let (down, j) = (module(plan.target), module(plan.sources[0].layer));
            for chunk in chunks {
                let chunk = chunk?;
                let grad = gelu_tanh_grad(&h.select_rows(&chunk.rs, 0)?)?;
                let tmp = (w.vt[down].select_rows(&chunk.rc, 0)? * grad)?;
                out[0].extend(same_position(&chunk, j, tmp.mm(&w.ut[j])?)?);
            }
        }
    }
    Ok(())
}

/// Target rows per layout work unit: enough edges to amortize taking a unit, few enough that the
/// largest plans split across threads.
const UNIT_EDGES: usize = 1 << 15;

/// The read-back values laid out as edges, in work units of whole target rows. Values come plan
/// by plan, source by source, each source's ordered by target row then pair; edges interleave the
/// sources per target row.
struct Layout<'a> {
    plans: &'a [TargetPlan],
    rows: &'a [Pairs],
    pairs: &'a [Pairs],
    values: &'a [f32],
    /// (plan, target rows, where each source's values start at the first row)
    units: Vec<(usize, std::ops::Range<usize>, Vec<usize>)>,
    lens: Vec<usize>,
}

impl<'a> Layout<'a> {
    fn new(
        plans: &'a [TargetPlan],
        rows: &'a [Pairs],
        pairs: &'a [Pairs],
        values: &'a [f32],
    ) -> Result<Self, RunError> {
        let mut layout = Layout {
            plans,
            rows,
            pairs,
            values,
            units: Vec::new(),
            lens: Vec::new(),
        };
        let mut base = 0;
        for ((p_idx, plan), rows) in plans.iter().enumerate().zip(rows) {
            let mut cursor = Vec::with_capacity(plan.sources.len());
            for src in &plan.sources {
                cursor.push(base);
                base += rows
                    .s
                    .iter()
                    .map(|&s| layout.count(src.layer, src.cross_seq, s))
                    .sum::<usize>();
            }
            let (mut first, mut len, mut at_first) = (0, 0, cursor.clone());
            for (r, &s) in rows.s.iter().enumerate() {
                for (src, at) in plan.sources.iter().zip(cursor.iter_mut()) {
                    let c = layout.count(src.layer, src.cross_seq, s);
                    *at += c;
                    len += c;
                }
                if len >= UNIT_EDGES || r + 1 == rows.len() {
                    layout.units.push((
                        p_idx,
                        first..r + 1,
                        std::mem::replace(&mut at_first, cursor.clone()),
                    ));
                    layout.lens.push(len);
                    (first, len) = (r + 1, 0);
                }
            }
        }
        if base != values.len() {
            return Err(candle_core::Error::Msg(format!(
                "tensor engine: {} values read back for {base} edges",
                values.len()
            ))
            .into());
        }
        Ok(layout)
    }

    fn source_pairs(&self, layer: Layer) -> Option<&'a Pairs> {
        match layer {
            Layer::Module(j) => Some(&self.pairs[j]),
            _ => None,
        }
    }

    /// Edges of a source into a target row at `s`.
    fn count(&self, layer: Layer, cross: bool, s: u32) -> usize {
        match self.source_pairs(layer) {
            None => 1,
            Some(p) if cross => p.start[s as usize + 1],
            Some(p) => p.at(s as usize).len(),
        }
    }
}

impl Units for Layout<'_> {
    fn lens(&self) -> &[usize] {
        &self.lens
    }

    fn target(&self, i: usize) -> Layer {
        self.plans[self.units[i].0].target
    }

    fn write(&self, i: usize, out: &mut impl Sink<Edge>) {
        let (p_idx, range, at_first) = &self.units[i];
        let (plan, rows) = (&self.plans[*p_idx], &self.rows[*p_idx]);
        let mut cursor = at_first.clone();
        for (&s, &c_out) in rows.s[range.clone()].iter().zip(&rows.c[range.clone()]) {
            for (src, at) in plan.sources.iter().zip(cursor.iter_mut()) {
                let mut push = |s_in: u32, c_in: u32| {
                    out.push(Edge {
                        source: src.layer,
                        target: plan.target,
                        c_in,
                        c_out,
                        s_in,
                        s_out: s,
                        value: self.values[*at] as f64,
                        is_cross_seq: src.cross_seq,
                    });
                    *at += 1;
                };
                match self.source_pairs(src.layer) {
                    None => push(s, 0),
                    Some(p) if src.cross_seq => {
                        for k in 0..p.start[s as usize + 1] {
                            push(p.s[k], p.c[k]);
                        }
                    }
                    Some(p) => {
                        for &c in p.at(s as usize) {
                            push(s, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Backend, FastEngine, Weights};
    use crate::attribution::{PromptCi, SourceMap, Thresholds};
    use crate::model::synthetic::{SyntheticSpec, synthetic_model};

    /// Chunks of one row or a few: the same edges as one chunk per plan and as the host backend.
    #[test]
    fn chunked_rows_give_the_same_edges() {
        let spec = SyntheticSpec {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            vocab_size: 30,
            block_size: 16,
            c: 9,
            ci_hidden: vec![6],
            ci_active_frac: 0.4,
            ..SyntheticSpec::simple_stories_1m()
        };
        let model = synthetic_model(&spec).unwrap();
        let sources = SourceMap::probe(&model).unwrap();
        let tokens = [3u32, 17, 4, 29, 0, 11, 11, 8, 2, 21];
        let ci = PromptCi::compute(&model, &tokens).unwrap();
        let th = Thresholds {
            ci: 0.05,
            output_prob: 0.02,
        };
        let host = FastEngine::with_backend(&model, &sources, Backend::Host)
            .unwrap()
            .graph(&model, &ci, th)
            .unwrap();
        assert!(host.edges.len() > 1000, "{} edges", host.edges.len());
        let scale = host.edges.iter().fold(0f64, |m, e| m.max(e.value.abs()));
        for chunk_elems in [1, 50, 400, usize::MAX / 2] {
            let mut engine = FastEngine::with_backend(&model, &sources, Backend::Tensor).unwrap();
            let Weights::Tensor(w) = &mut engine.weights else {
                unreachable!()
            };
            w.chunk_elems = chunk_elems;
            let got = engine.graph(&model, &ci, th).unwrap();
            assert_eq!(got.edges.len(), host.edges.len());
            for (a, b) in got.edges.iter().zip(&host.edges) {
                let key = |e: &crate::attribution::Edge| {
                    (e.source, e.target, e.c_in, e.c_out, e.s_in, e.s_out)
                };
                assert_eq!(key(a), key(b), "chunk {chunk_elems}");
                assert!(
                    (a.value - b.value).abs() <= 1e-5 * scale,
                    "chunk {chunk_elems}: {a:?} vs {b:?}"
                );
            }
        }
    }
}
