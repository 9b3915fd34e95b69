//! The weight deltas' paths for SPD's app semantics (SPEC §6): in the app's gradient forward every
//! component act is a leaf, but each module also adds `x Δᵀ`, through which gradient flows on. So
//! an edge into a residual reader at position `s` carries, besides the one-hop path, every path
//! from the source's write into the residual stream up through the delta terms of the sublayers in
//! between.
//!
//! Only the diagonal blocks matter: a target at position `s` reads the residual stream at `s`,
//! and positions never decrease along a path, so a path from a write at `s` to it stays at `s`
//! throughout. The gradient of a batch of target rows with respect to the residual stream is
//! therefore carried down sublayer by sublayer, `g_{j-1} = g_j + g_j J_j(s)`, where `J_j(s)` is the
//! delta-only Jacobian at `s` of sublayer `j` (norm, projections through their deltas, the
//! attention's softmax or the MLP's activation, evaluated at the app's forward). A run whose
//! deltas are all zero has `J = 0` everywhere, so the edges reduce to the one-hop closed forms.

use super::host::{Mat, NormBackward, dot, gelu_tanh_grad, silu_and_grad};
use super::{Ctx, FastEngine, TargetPlan};
use crate::attribution::layer::Layer;
use crate::model::SpdModel;
use crate::model::transformer::{LnSite, MlpKind, ModuleId, ModuleKind, NormKind};

/// Host copies of the deltas and norm weights the delta paths read. Built on the first graph of
/// the app's semantics: a copy of every decomposed weight matrix is memory a seed-only server
/// does not need.
pub(super) struct DeltaWeights {
    /// Per module, `Δᵀ` (`[d_in, d_out]`); `None` where the run has no delta or it is all zero.
    delta_t: Vec<Option<Mat>>,
    /// Per block, the weights of the norm in front of the attention and of the MLP.
    norm_1: Vec<Vec<f32>>,
    norm_2: Vec<Vec<f32>>,
}

impl DeltaWeights {
    pub fn new(model: &SpdModel) -> candle_core::Result<Self> {
        let mut delta_t = Vec::with_capacity(model.modules.len());
        for m in &model.modules {
            delta_t.push(match &m.components.delta_t {
                Some(d) => {
                    let d = Mat::from_tensor(d)?;
                    d.data.iter().any(|v| *v != 0.0).then_some(d)
                }
                None => None,
            });
        }
        let weights = |site| model.target.norm(site).weight.to_vec1::<f32>();
        let n = model.target.blocks.len();
        Ok(Self {
            delta_t,
            norm_1: (0..n)
                .map(|b| weights(LnSite::Attn(b)))
                .collect::<candle_core::Result<_>>()?,
            norm_2: (0..n)
                .map(|b| weights(LnSite::Mlp(b)))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Whether no module has a delta: every path is one hop.
    pub fn all_zero(&self) -> bool {
        self.delta_t.iter().all(Option::is_none)
    }
}

/// Where a residual-stream position sits: 0 after the embedding, `2b + 1` after block `b`'s
/// attention, `2b + 2` after its MLP; a site reads the stream at its index.
pub(super) fn stream_index(site: LnSite, n_blocks: usize) -> usize {
    match site {
        LnSite::Attn(b) => 2 * b,
        LnSite::Mlp(b) => 2 * b + 1,
        LnSite::Final => 2 * n_blocks,
    }
}

/// `out[r] = Δ g[r]` for `rows` rows: `g` is `[rows, d_out]`, `out` `[rows, d_in]`, `dt = Δᵀ`
/// (`[d_in, d_out]`); i.e. `out = g · dtᵀ`, one matrix product (gemm's kernels, on this thread:
/// the work units already run on every core).
fn times_delta(dt: &Mat, g: &[f32], rows: usize, out: &mut [f32]) {
    let (d_in, d_out) = (dt.rows, dt.cols);
    assert!(g.len() >= rows * d_out && out.len() >= rows * d_in && dt.data.len() == d_in * d_out);
    if rows == 0 || d_in == 0 {
        return;
    }
    // SAFETY: the three buffers hold at least the elements the strides reach (checked above):
    // `out` is `rows × d_in` row-major, `g` is `rows × d_out` row-major, and `dt` read as
    // `dtᵀ` (`d_out × d_in`: row stride 1, column stride d_out) is `d_in × d_out` row-major.
    unsafe {
        gemm::gemm(
            rows,
            d_in,
            d_out,
            out.as_mut_ptr(),
            1,
            d_in as isize,
            false,
            g.as_ptr(),
            1,
            d_out as isize,
            dt.data.as_ptr(),
            d_out as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A residual reader's edges under the app's semantics, computed for all its positions at once:
/// the values in the engine's order, `values[offsets[s]..offsets[s + 1]]` for position `s`.
pub(super) struct PlanValues {
    pub offsets: Vec<usize>,
    pub values: Vec<f32>,
}

impl Ctx<'_> {
    /// Every edge value of the residual reader `plan`: its alive targets at every position are
    /// rows of one matrix, carried down the residual stream sublayer by sublayer (each row at its
    /// own position), so each delta matrix is read once per plan in one product rather than once
    /// per position; where a source's write lands, its edges are dotted off the rows.
    pub(super) fn plan_values(
        &self,
        deltas: &DeltaWeights,
        plan: &TargetPlan,
        site: LnSite,
        norm: NormKind,
        ln_weight: &[f32],
    ) -> PlanValues {
        let e = self.weights;
        let x = self.rec.residual_at(site);
        let (d, t) = (x.cols, x.rows);
        // Rows: (position, c_out) in the engine's order.
        let mut pos = Vec::new();
        let mut g = Vec::new();
        let mut column = vec![0f32; d];
        for s in 0..t {
            let outs = self.alive(plan.target, s);
            if outs.is_empty() {
                continue;
            }
            let ln = NormBackward::new(norm, x.row(s));
            for &c_out in outs {
                let col = match plan.target {
                    Layer::Module(i) => e.vt[i].row(c_out as usize),
                    _ => e.lm_head.row(c_out as usize),
                };
                ln.apply(col, ln_weight, &mut column);
                g.extend_from_slice(&column);
                pos.push(s);
            }
        }
        let rows = pos.len();
        // Where each row's values start, and each source's values within a row.
        let per_source = |s: usize| -> Vec<usize> {
            plan.sources
                .iter()
                .map(|src| match src.layer {
                    Layer::Wte => 1,
                    l => self.alive(l, s).len(),
                })
                .collect()
        };
        let mut offsets = Vec::with_capacity(t + 1);
        let mut row_start = Vec::with_capacity(rows);
        let mut source_start: Vec<Vec<usize>> = Vec::with_capacity(t);
        let mut at = 0;
        let mut r = 0;
        for s in 0..t {
            offsets.push(at);
            let counts = per_source(s);
            let mut starts = Vec::with_capacity(counts.len());
            let mut k = 0;
            for c in &counts {
                starts.push(k);
                k += c;
            }
            source_start.push(starts);
            while r < rows && pos[r] == s {
                row_start.push(at);
                at += k;
                r += 1;
            }
        }
        offsets.push(at);
        let mut values = vec![0f32; at];
        let n_blocks = self.model.target.blocks.len();
        let lands = |layer: Layer| match layer {
            Layer::Module(j) => {
                let id = self.model.modules[j].id;
                match id.kind {
                    ModuleKind::O => 2 * id.block + 1,
                    _ => 2 * id.block + 2,
                }
            }
            _ => 0,
        };
        let mut emit = |k: usize, g: &[f32]| {
            for (si, src) in plan.sources.iter().enumerate() {
                if lands(src.layer) != k {
                    continue;
                }
                for r in 0..rows {
                    let s = pos[r];
                    let gr = &g[r * d..(r + 1) * d];
                    let out = &mut values[row_start[r] + source_start[s][si]..];
                    match src.layer {
                        Layer::Wte => out[0] = dot(self.rec.embed.row(s), gr),
                        Layer::Module(j) => {
                            for (o, &c_in) in out.iter_mut().zip(self.alive(src.layer, s)) {
                                *o = self.coef[j].at(s, c_in as usize)
                                    * dot(e.u[j].row(c_in as usize), gr);
                            }
                        }
                        Layer::Output => unreachable!("output is never a source"),
                    }
                }
            }
        };
        let top = stream_index(site, n_blocks);
        emit(top, &g);
        for j in (1..=top).rev() {
            let block = (j - 1) / 2;
            let through = if j % 2 == 1 {
                self.attention_vjp(deltas, block, &pos, &g)
            } else {
                self.mlp_vjp(deltas, block, &pos, &g)
            };
            if let Some(through) = through {
                for (a, b) in g.iter_mut().zip(through) {
                    *a += b;
                }
            }
            emit(j - 1, &g);
        }
        PlanValues { offsets, values }
    }

    /// `Δ` of the projection `(block, kind)` applied to `g` (`[rows, d_out]`), behind its inserted
    /// identity's `Δ` where it has one: the delta-only Jacobian of a projection from its input.
    /// `None` where it is zero.
    fn projection_vjp(
        &self,
        deltas: &DeltaWeights,
        id: ModuleId,
        g: &[f32],
        rows: usize,
    ) -> Option<Vec<f32>> {
        let apply = |id: ModuleId, g: &[f32]| -> Option<Vec<f32>> {
            let dt = deltas.delta_t[self.module(id)].as_ref()?;
            let mut out = vec![0f32; rows * dt.rows];
            times_delta(dt, g, rows, &mut out);
            Some(out)
        };
        let y = apply(id, g)?;
        match self.model.module_index(id.identity()) {
            Some(_) => apply(id.identity(), &y),
            None => Some(y),
        }
    }

    /// Adds `Σ` of the projections' input gradients and takes the norm at `site` backward, each
    /// row at its position `pos[r]`.
    fn norm_vjp(
        &self,
        site: LnSite,
        weight: &[f32],
        pos: &[usize],
        parts: Vec<Option<Vec<f32>>>,
    ) -> Option<Vec<f32>> {
        let mut parts = parts.into_iter().flatten();
        let mut sum = parts.next()?;
        for p in parts {
            for (a, b) in sum.iter_mut().zip(p) {
                *a += b;
            }
        }
        let x = self.rec.residual_at(site);
        let d = x.cols;
        let mut out = vec![0f32; pos.len() * d];
        let mut norm: Option<(usize, NormBackward)> = None;
        for (r, &s) in pos.iter().enumerate() {
            if norm.as_ref().is_none_or(|(at, _)| *at != s) {
                norm = Some((s, NormBackward::new(self.model.target.cfg.norm, x.row(s))));
            }
            let (_, nb) = norm.as_ref().expect("set above");
            nb.apply(
                &sum[r * d..(r + 1) * d],
                weight,
                &mut out[r * d..(r + 1) * d],
            );
        }
        Some(out)
    }

    /// `g J` for block `block`'s attention sublayer, each row `r` at its position `s = pos[r]`
    /// (the delta-only Jacobian of the sublayer's output at `s` with respect to the stream at
    /// `s`): through o_proj's delta, then the query at `s` (all keys), and the key and value at
    /// `s` itself.
    fn attention_vjp(
        &self,
        deltas: &DeltaWeights,
        block: usize,
        pos: &[usize],
        g: &[f32],
    ) -> Option<Vec<f32>> {
        let rows = pos.len();
        let id = |kind| ModuleId::new(block, kind);
        let gz = self.projection_vjp(deltas, id(ModuleKind::O), g, rows)?;
        let engine: &FastEngine = self.engine;
        let (nh, hd) = (engine.n_head, engine.head_dim);
        let group = nh / engine.n_kv_head;
        let kv = engine.n_kv_head * hd;
        let d = nh * hd;
        let inv_sqrt = 1.0 / (hd as f32).sqrt();
        let v = &self.rec.outputs[&id(ModuleKind::V)];
        let q = &self.rec.outputs[&id(ModuleKind::Q)];
        let k = &self.rec.outputs[&id(ModuleKind::K)];
        let qr = self.rec.rotated.get(&id(ModuleKind::Q)).unwrap_or(q);
        let kr = self.rec.rotated.get(&id(ModuleKind::K)).unwrap_or(k);
        let t = q.rows;
        let probs = &self.rec.probs[block];
        let mut gq = vec![0f32; rows * d];
        let mut gk = vec![0f32; rows * kv];
        let mut gv = vec![0f32; rows * kv];
        let mut w = vec![0f32; t];
        let mut tmp = vec![0f32; hd];
        for (r, &s) in pos.iter().enumerate() {
            let p = |h: usize, s2: usize| probs[(h * t + s) * t + s2];
            let w = &mut w[..=s];
            let gz = &gz[r * d..(r + 1) * d];
            for h in 0..nh {
                let (hq, hk) = (h * hd..(h + 1) * hd, (h / group) * hd..(h / group + 1) * hd);
                let gzh = &gz[hq.clone()];
                let mut wbar = 0f32;
                for (s2, ws) in w.iter_mut().enumerate() {
                    *ws = dot(gzh, &v.row(s2)[hk.clone()]);
                    wbar += p(h, s2) * *ws;
                }
                // Value at s: its probability times g_z.
                for (o, gi) in gv[r * kv..][hk.clone()].iter_mut().zip(gzh) {
                    *o += p(h, s) * gi;
                }
                // Scores s → s2: g_score = p (w − w̄); the query reads every key, the key at s
                // reads the query.
                let gq_h = &mut gq[r * d..][hq.clone()];
                for (s2, ws) in w.iter().enumerate() {
                    let f = p(h, s2) * (ws - wbar) * inv_sqrt;
                    for (o, ki) in gq_h.iter_mut().zip(&kr.row(s2)[hk.clone()]) {
                        *o += f * ki;
                    }
                }
                let f = p(h, s) * (w[s] - wbar) * inv_sqrt;
                let gk_h = &mut gk[r * kv..][hk.clone()];
                match &engine.rope {
                    Some(rope) => {
                        tmp.copy_from_slice(gq_h);
                        rope.rotate(&tmp, s, true, gq_h);
                        for (o, qi) in tmp.iter_mut().zip(&qr.row(s)[hq]) {
                            *o = f * qi;
                        }
                        let mut back = vec![0f32; hd];
                        rope.rotate(&tmp, s, true, &mut back);
                        for (o, b) in gk_h.iter_mut().zip(back) {
                            *o += b;
                        }
                    }
                    None => {
                        for (o, qi) in gk_h.iter_mut().zip(&qr.row(s)[hq]) {
                            *o += f * qi;
                        }
                    }
                }
            }
        }
        let parts = vec![
            self.projection_vjp(deltas, id(ModuleKind::Q), &gq, rows),
            self.projection_vjp(deltas, id(ModuleKind::K), &gk, rows),
            self.projection_vjp(deltas, id(ModuleKind::V), &gv, rows),
        ];
        self.norm_vjp(LnSite::Attn(block), &deltas.norm_1[block], pos, parts)
    }

    /// `g J` for block `block`'s MLP sublayer, each row at its position: down_proj's delta, the
    /// activation's derivative at the app's forward, the input projections' deltas, the norm.
    fn mlp_vjp(
        &self,
        deltas: &DeltaWeights,
        block: usize,
        pos: &[usize],
        g: &[f32],
    ) -> Option<Vec<f32>> {
        let rows = pos.len();
        let id = |kind| ModuleId::new(block, kind);
        let ga = self.projection_vjp(deltas, id(ModuleKind::Down), g, rows)?;
        let parts = match self.model.target.cfg.mlp {
            MlpKind::Gelu => {
                let h = &self.rec.outputs[&id(ModuleKind::CFc)];
                let mut gh = ga;
                for (row, &s) in gh.chunks_mut(h.cols).zip(pos) {
                    for (o, x) in row.iter_mut().zip(h.row(s)) {
                        *o *= gelu_tanh_grad(*x);
                    }
                }
                vec![self.projection_vjp(deltas, id(ModuleKind::CFc), &gh, rows)]
            }
            MlpKind::SwiGlu => {
                let gates = &self.rec.outputs[&id(ModuleKind::Gate)];
                let ups = &self.rec.outputs[&id(ModuleKind::Up)];
                let (mut g_gate, mut g_up) = (ga.clone(), ga);
                let m = gates.cols;
                for (r, &s) in pos.iter().enumerate() {
                    let (gate, up) = (gates.row(s), ups.row(s));
                    for n in 0..m {
                        let (act, grad) = silu_and_grad(gate[n]);
                        g_gate[r * m + n] *= grad * up[n];
                        g_up[r * m + n] *= act;
                    }
                }
                vec![
                    self.projection_vjp(deltas, id(ModuleKind::Gate), &g_gate, rows),
                    self.projection_vjp(deltas, id(ModuleKind::Up), &g_up, rows),
                ]
            }
        };
        self.norm_vjp(LnSite::Mlp(block), &deltas.norm_2[block], pos, parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_delta_is_the_naive_product() {
        let (rows, d_in, d_out) = (3, 5, 7);
        let dt = Mat {
            rows: d_in,
            cols: d_out,
            data: (0..d_in * d_out).map(|i| (i as f32 * 0.37).sin()).collect(),
        };
        let g: Vec<f32> = (0..rows * d_out).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![f32::NAN; rows * d_in];
        times_delta(&dt, &g, rows, &mut out);
        for r in 0..rows {
            for i in 0..d_in {
                let want: f64 = (0..d_out)
                    .map(|j| dt.at(i, j) as f64 * g[r * d_out + j] as f64)
                    .sum();
                assert!((out[r * d_in + i] as f64 - want).abs() < 1e-5, "{r} {i}");
            }
        }
    }
}
