//! The fast attribution engine: the same edges as [`super::reference_graph`], from closed-form local
//! Jacobians instead of one backward pass per target node.
//!
//! Every module's acts are leaves, so each edge is a one-hop effect through a short local function,
//! one closed form per operation of the block description: the norm (LayerNorm or RMSNorm) +
//! projection for residual readers (`q/k/v`, the MLP's inputs, `output`), one block's causal
//! attention (rotary positions and shared K/V heads included) for `q/k/v → o_proj`, the GELU for
//! `c_fc → down_proj` or SwiGLU's two inputs for `gate_proj, up_proj → down_proj`. One forward
//! records what those functions need (residual rows, attention probabilities, projection outputs);
//! then each edge is a dot product restricted to alive rows and columns.

mod delta;
mod fill;
mod host;
mod record;
pub mod tensor;
mod trace;

use std::collections::HashMap;
use std::ops::Range;

use candle_core::Tensor;

use self::delta::{DeltaWeights, PlanValues};
use self::fill::{Sink, fill_units, fold_units};
use self::host::{HostRope, Mat, NormBackward, dot, gelu_tanh_grad, silu_and_grad};
use self::record::Recorded;
use super::graph::{Edge, Graph, Semantics, Thresholds, alive_nodes_with};
use super::influence::{GraphTrace, Seeds};
use super::layer::Layer;
use super::prompt::PromptCi;
use super::sources::{Source, SourceMap};
use super::strongest::TopK;
use crate::model::transformer::{
    Family, LnSite, MlpKind, ModuleId, ModuleKind, NormKind, Positions, softmax_last,
};
use crate::model::{RunError, SpdModel};
use app::types::TraceTarget;

/// How a target layer's edges are computed.
#[derive(Debug, Clone)]
enum Step {
    /// The norm at `site`, then the target's `V` column (or `lm_head` row for `output`).
    Residual {
        site: LnSite,
        norm: NormKind,
        ln_weight: Vec<f32>,
    },
    /// `q/k/v → o_proj` through the causal attention of `block`.
    Attention { block: usize },
    /// `c_fc → down_proj` through the GELU of `block`.
    Mlp { block: usize },
    /// `gate_proj, up_proj → down_proj` through `silu(gate) ⊙ up` of `block`.
    Glu { block: usize },
    /// A projection behind an inserted identity reads the identity's output as it is: the edge
    /// is `U_identity[c_in] · V[:, c_out]`.
    Identity,
}

#[derive(Debug, Clone)]
struct TargetPlan {
    /// Its place in [`FastEngine::plans`].
    index: usize,
    target: Layer,
    step: Step,
    sources: Vec<Source>,
}

/// What graph a run computes.
#[derive(Clone, Copy)]
struct How<'a> {
    th: Thresholds,
    semantics: Semantics,
    max_outputs: Option<usize>,
    /// Output nodes `(position, token)` the graph must have whatever their probability (a
    /// trace's targets).
    force_outputs: &'a [(usize, u32)],
}

/// Which edges a run keeps.
#[derive(Clone, Copy)]
enum Collect<'a> {
    All,
    Strongest {
        k: usize,
        keep: &'a (dyn Fn(&Edge) -> bool + Sync),
    },
    /// The `k` edges carrying the most influence on the target, and every node's influence.
    Traced {
        target: TraceTarget,
        k: usize,
        keep: &'a (dyn Fn(&Edge) -> bool + Sync),
    },
}

/// What a run collected: edges, and a trace when one was asked for.
struct Collected {
    edges: Vec<Edge>,
    trace: Option<GraphTrace>,
}

/// A graph's work units: unit `i` writes `lens()[i]` edges, a contiguous run of the graph in the
/// engine's order, so a unit's first edge index is the sum of the lengths before it. A unit's
/// edges are all of the incoming edges of its target nodes, which lie in one layer, `target(i)`.
trait Units: Sync {
    fn lens(&self) -> &[usize];
    fn write(&self, i: usize, out: &mut impl Sink<Edge>);
    fn target(&self, i: usize) -> Layer;
}

/// Runs every unit on all threads into what `collect` asks for: the whole graph, each unit
/// writing in place (see `fill`), the strongest edges, each thread reusing one buffer for its
/// units and keeping a running selection, or a trace (see `trace`). `alive` and `n` (modules) name
/// the graph's nodes; `seeds` is the trace's start, resolved by the caller.
fn collect_units(
    units: &impl Units,
    collect: Collect,
    alive: &[Vec<Vec<u32>>],
    n: usize,
    seeds: Option<&Seeds>,
    progress: &dyn Fn(usize, usize),
) -> Collected {
    let lens = units.lens();
    let edges = match collect {
        Collect::All => fill_units(
            lens,
            available_threads(),
            |i, out| units.write(i, out),
            progress,
        ),
        Collect::Strongest { k, keep } => {
            let first = unit_starts(lens);
            let longest = lens.iter().copied().max().unwrap_or(0);
            let parts = fold_units(
                lens.len(),
                available_threads(),
                || (Vec::with_capacity(longest), TopK::new(k)),
                |i, (buf, top): &mut (Vec<Edge>, TopK)| {
                    buf.clear();
                    units.write(i, buf);
                    for (j, e) in buf.iter().enumerate() {
                        if keep(e) {
                            top.offer(first[i] + j, e);
                        }
                    }
                },
                progress,
            );
            let mut top = TopK::new(k);
            for (_, part) in parts {
                top.merge(part);
            }
            top.into_sorted()
        }
        Collect::Traced { k, keep, .. } => {
            let seeds = seeds.expect("a traced run resolves its seeds").clone();
            let folded = trace::trace_units(units, alive, n, &seeds, k, keep, progress);
            let (edge, edges) = folded.edges.into_iter().unzip();
            return Collected {
                edges,
                trace: Some(GraphTrace {
                    seeds,
                    node: folded.node,
                    edge,
                    total_edge_score: folded.total_edge_score,
                }),
            };
        }
    };
    Collected { edges, trace: None }
}

/// Each unit's first edge index in the engine's order: the sum of the lengths before it.
fn unit_starts(lens: &[usize]) -> Vec<usize> {
    lens.iter()
        .scan(0, |at, len| {
            let first = *at;
            *at += len;
            Some(first)
        })
        .collect()
}

/// The host backend's units: (target plan, position).
struct HostUnits<'a> {
    ctx: &'a Ctx<'a>,
    units: &'a [(&'a TargetPlan, usize)],
    lens: &'a [usize],
}

impl Units for HostUnits<'_> {
    fn lens(&self) -> &[usize] {
        self.lens
    }

    fn write(&self, i: usize, out: &mut impl Sink<Edge>) {
        self.ctx.unit(self.units[i], out);
    }

    fn target(&self, i: usize) -> Layer {
        self.units[i].0.target
    }
}

/// Which hardware runs the closed forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Loops over host copies of the weights, split into (target, position) units across threads:
    /// touches only alive rows and columns, the fastest choice on a CPU.
    Host,
    /// Batched tensor ops on the model's device (see [`tensor`]); the edges are gathered there and
    /// read back once. The choice for a GPU on a host with few cores (see [`HOST_THREADS_FOR_GPU`]);
    /// on a CPU it runs too (that is how it is tested).
    Tensor,
}

/// From this many host threads on, the host backend builds a GPU model's graph faster than the
/// tensor backend. Measured (bench-shaped model): on an H200 machine's 16 cores the host backend,
/// fed by the GPU's forward, took 19 / 59 / 510 ms at 32 / 128 / 512 tokens against the tensor
/// backend's 26 / 74 / 699 ms; on 2 cores the host loops alone take 60-80 ms at 32 tokens, the
/// tensor backend's 26 ms wins.
pub const HOST_THREADS_FOR_GPU: usize = 8;

impl Backend {
    /// The backend for a model on `device`: host loops on the CPU, and for an accelerator too when
    /// the host has [`HOST_THREADS_FOR_GPU`] threads or more; tensors on the device otherwise.
    pub fn for_device(device: &candle_core::Device) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::choose(device.is_cpu(), threads)
    }

    /// [`Self::for_device`] for `model`, falling back to the host backend where the tensor
    /// backend's closed forms do not cover the model's blocks.
    pub fn for_model(model: &SpdModel) -> Self {
        match Self::for_device(model.device()) {
            Self::Tensor if !Self::tensor_covers(model) => Self::Host,
            b => b,
        }
    }

    /// Whether the tensor backend covers `model`: GPT2Simple blocks (LayerNorm, learned positions,
    /// a GELU MLP, a K/V head per query head) without inserted identities. The host backend covers every family.
    pub fn tensor_covers(model: &SpdModel) -> bool {
        let cfg = &model.target.cfg;
        cfg.family == Family::Gpt2Simple
            && model.modules.iter().all(|m| !m.id.pre_identity)
            && matches!(cfg.norm, NormKind::LayerNorm { .. })
            && cfg.positions == Positions::Learned
            && cfg.mlp == MlpKind::Gelu
            && cfg.n_kv_head == cfg.n_head
    }

    fn choose(on_cpu: bool, host_threads: usize) -> Self {
        if on_cpu || host_threads >= HOST_THREADS_FOR_GPU {
            Self::Host
        } else {
            Self::Tensor
        }
    }
}

/// Host copies of the weights the host backend's loops read.
struct HostWeights {
    /// Per decomposed module: `U` (`[C, d_out]`) and `Vᵀ` (`[C, d_in]`).
    u: Vec<Mat>,
    vt: Vec<Mat>,
    /// `[vocab, d]`
    lm_head: Mat,
}

enum Weights {
    Host(HostWeights),
    Tensor(tensor::TensorWeights),
}

/// The per-target plan and the weights its backend reads. Build once per model.
pub struct FastEngine {
    plans: Vec<TargetPlan>,
    weights: Weights,
    n_head: usize,
    /// K/V heads; query head `h` reads K/V head `h / (n_head / n_kv_head)`.
    n_kv_head: usize,
    head_dim: usize,
    /// Rotary tables of a model with rotary positions (host backend).
    rope: Option<HostRope>,
    /// The deltas' host copies, made on the first graph of the app's semantics.
    deltas: std::sync::OnceLock<DeltaWeights>,
}

impl FastEngine {
    /// Plans the closed forms for `model`, on the backend that suits its device. Refuses (with the
    /// reason) models whose structure they do not cover: every block must have all six projections
    /// decomposed, so each edge is one hop.
    pub fn new(model: &SpdModel, sources: &SourceMap) -> Result<Self, String> {
        Self::with_backend(model, sources, Backend::for_model(model))
    }

    /// [`Self::new`] on a chosen backend.
    pub fn with_backend(
        model: &SpdModel,
        sources: &SourceMap,
        backend: Backend,
    ) -> Result<Self, String> {
        let cfg = &model.target.cfg;
        if backend == Backend::Tensor && !Backend::tensor_covers(model) {
            return Err(format!(
                "the tensor backend's closed forms cover GPT2Simple blocks (LayerNorm, learned \
                 positions, GELU MLP, one K/V head per query head), not {}; use the host backend",
                cfg.family.name()
            ));
        }
        for block in 0..model.target.blocks.len() {
            for &kind in cfg.kinds() {
                let id = ModuleId::new(block, kind);
                if model.module_index(id).is_none() {
                    return Err(format!(
                        "the fast engine needs every projection decomposed; {} is not",
                        id.name()
                    ));
                }
            }
        }
        let kind_of = |l: Layer| match l {
            Layer::Module(i) => Some(model.modules[i].id),
            _ => None,
        };
        let is_writer = |s: &Source| {
            !s.cross_seq
                && (s.layer == Layer::Wte
                    || kind_of(s.layer).is_some_and(|id| {
                        !id.pre_identity && matches!(id.kind, ModuleKind::O | ModuleKind::Down)
                    }))
        };
        let mut plans = Vec::new();
        for (target, srcs) in &sources.targets {
            let step = match kind_of(*target) {
                None => Step::Residual {
                    site: LnSite::Final,
                    norm: cfg.norm,
                    ln_weight: model
                        .target
                        .ln_f
                        .weight
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(|e| e.to_string())?,
                },
                // An identity reads what its projection would; the projection reads it.
                Some(id) if !id.pre_identity && model.module_index(id.identity()).is_some() => {
                    Step::Identity
                }
                Some(id) => match id.kind {
                    kind if kind.reads_residual() => {
                        let site = match kind {
                            ModuleKind::Q | ModuleKind::K | ModuleKind::V => LnSite::Attn(id.block),
                            _ => LnSite::Mlp(id.block),
                        };
                        let ln_weight = model
                            .target
                            .norm(site)
                            .weight
                            .to_vec1()
                            .map_err(|e| e.to_string())?;
                        Step::Residual {
                            site,
                            norm: cfg.norm,
                            ln_weight,
                        }
                    }
                    ModuleKind::O => Step::Attention { block: id.block },
                    ModuleKind::Down if cfg.mlp == MlpKind::SwiGlu => Step::Glu { block: id.block },
                    _ => Step::Mlp { block: id.block },
                },
            };
            let ok = match &step {
                Step::Residual { .. } => srcs.iter().all(is_writer),
                Step::Attention { block } => srcs.iter().all(|s| {
                    kind_of(s.layer).is_some_and(|id| {
                        id.block == *block
                            && match id.kind {
                                ModuleKind::Q => !s.cross_seq,
                                ModuleKind::K | ModuleKind::V => s.cross_seq,
                                _ => false,
                            }
                    })
                }),
                Step::Mlp { block } => {
                    srcs.len() == 1
                        && !srcs[0].cross_seq
                        && kind_of(srcs[0].layer) == Some(ModuleId::new(*block, ModuleKind::CFc))
                }
                Step::Identity => {
                    let identity = kind_of(*target).map(ModuleId::identity);
                    srcs.len() == 1 && !srcs[0].cross_seq && kind_of(srcs[0].layer) == identity
                }
                Step::Glu { block } => {
                    let kinds: Vec<Option<ModuleId>> =
                        srcs.iter().map(|s| kind_of(s.layer)).collect();
                    srcs.iter().all(|s| !s.cross_seq)
                        && kinds
                            == [ModuleKind::Gate, ModuleKind::Up]
                                .map(|kind| Some(ModuleId::new(*block, kind)))
                }
            };
            if !ok {
                return Err(format!(
                    "the fast engine has no closed form for the sources of {}",
                    target.name(model)
                ));
            }
            plans.push(TargetPlan {
                index: plans.len(),
                target: *target,
                step,
                sources: srcs.clone(),
            });
        }
        let weights = match backend {
            Backend::Host => {
                let host = |t: &Tensor| Mat::from_tensor(t).map_err(|e| e.to_string());
                let mut u = Vec::new();
                let mut vt = Vec::new();
                for m in &model.modules {
                    u.push(host(&m.components.u)?);
                    vt.push(host(&m.components.v)?.transpose());
                }
                Weights::Host(HostWeights {
                    u,
                    vt,
                    lm_head: host(&model.target.lm_head_t)?.transpose(),
                })
            }
            Backend::Tensor => Weights::Tensor(
                tensor::TensorWeights::new(model, &plans).map_err(|e| e.to_string())?,
            ),
        };
        let rope = match &model.target.rope {
            Some(r) => Some(HostRope::new(r).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Self {
            plans,
            weights,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim(),
            rope,
            deltas: std::sync::OnceLock::new(),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.weights {
            Weights::Host(_) => Backend::Host,
            Weights::Tensor(_) => Backend::Tensor,
        }
    }

    /// The attribution graph of one prompt; same edges, same order as the reference engine.
    pub fn graph(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
    ) -> Result<Graph, RunError> {
        self.graph_with(model, ci, th, Semantics::Seed, None)
    }

    /// [`Self::graph`] under either semantics, with at most `max_outputs` output nodes per
    /// position: [`super::reference_graph_with`]'s edges, in its order.
    pub fn graph_with(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
        semantics: Semantics,
        max_outputs: Option<usize>,
    ) -> Result<Graph, RunError> {
        self.graph_forcing(model, ci, th, semantics, max_outputs, &[])
    }

    /// [`Self::graph_with`] whose graph has the output nodes `force_outputs` (`(position,
    /// token)`) whatever their probability: the targets of a trace.
    pub fn graph_forcing(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
        semantics: Semantics,
        max_outputs: Option<usize>,
        force_outputs: &[(usize, u32)],
    ) -> Result<Graph, RunError> {
        let how = How {
            th,
            semantics,
            max_outputs,
            force_outputs,
        };
        Ok(self.run(model, ci, how, Collect::All, &|_, _| {})?.0)
    }

    /// The graph traced from `target` (issue "Reading big graphs"): every alive node's influence
    /// on it and the `k` edges (of those `keep` accepts) that carry the most, by score, folded
    /// while the engine computes so the whole graph is never held. Returns the graph with those
    /// edges, the trace (scores aligned with the edges), and the whole graph's edge count.
    #[allow(clippy::too_many_arguments)]
    pub fn traced_graph(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
        semantics: Semantics,
        max_outputs: Option<usize>,
        target: TraceTarget,
        k: usize,
        keep: &(dyn Fn(&Edge) -> bool + Sync),
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Graph, GraphTrace, usize), RunError> {
        let force = target.needed_outputs();
        let how = How {
            th,
            semantics,
            max_outputs,
            force_outputs: &force,
        };
        let collect = Collect::Traced { target, k, keep };
        let (graph, total, trace) = self.run(model, ci, how, collect, progress)?;
        let trace = trace.ok_or_else(|| RunError::Unsupported("no trace was folded".into()))?;
        Ok((graph, trace, total))
    }

    /// Whether this engine computes graphs of `semantics`: the host backend both, the tensor
    /// backend the seed's.
    pub fn computes(&self, semantics: Semantics) -> bool {
        semantics == Semantics::Seed || self.backend() == Backend::Host
    }

    /// What the explorer draws: the graph with only its `k` strongest edges that `keep` accepts,
    /// in strength order ([`strongest`]'s, i.e. a stable sort by |value|), and the number of edges
    /// of the whole graph. The host backend never holds the whole graph: each thread keeps a
    /// running selection (a 512-token prompt of the bench model has 43M edges, 2.7 GB as [`Edge`]s).
    /// `progress(done, total)` is called on this thread as work units finish, so a server can tell
    /// a waiting user how far a long prompt has got.
    pub fn strongest_graph(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
        k: usize,
        keep: &(dyn Fn(&Edge) -> bool + Sync),
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Graph, usize), RunError> {
        self.strongest_graph_with(model, ci, th, Semantics::Seed, None, k, keep, progress)
    }

    /// [`Self::strongest_graph`] under either semantics. The strongest edges are chosen from the
    /// raw values: a caller that normalises first must ask for the whole graph.
    #[allow(clippy::too_many_arguments)]
    pub fn strongest_graph_with(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        th: Thresholds,
        semantics: Semantics,
        max_outputs: Option<usize>,
        k: usize,
        keep: &(dyn Fn(&Edge) -> bool + Sync),
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Graph, usize), RunError> {
        let how = How {
            th,
            semantics,
            max_outputs,
            force_outputs: &[],
        };
        let (graph, total, _) =
            self.run(model, ci, how, Collect::Strongest { k, keep }, progress)?;
        Ok((graph, total))
    }

    fn run(
        &self,
        model: &SpdModel,
        ci: &PromptCi,
        how: How,
        collect: Collect,
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Graph, usize, Option<GraphTrace>), RunError> {
        // The seed differentiates its CI-masked forward; the app differentiates the forward with
        // every mask 1 plus the deltas, and takes output nodes from a CI-masked one without them.
        let (rec, masked) = match how.semantics {
            Semantics::Seed => {
                let rec = Recorded::run(model, &ci.lower_tensors, false, &ci.tokens)?;
                let masked = rec.logits.clone();
                (rec, masked)
            }
            Semantics::App => {
                if !self.computes(Semantics::App) {
                    return Err(RunError::Unsupported(
                        "the tensor backend computes the seed's semantics only; the host backend \
                         computes the app's"
                            .into(),
                    ));
                }
                let t = ci.tokens.len();
                let rec = Recorded::run(model, &model.ones_masks(t)?, true, &ci.tokens)?;
                let tokens = crate::model::transformer::tokens_tensor(&ci.tokens, model.device())?;
                let masked = model
                    .masked_logits(&tokens, &ci.lower_tensors, false)?
                    .squeeze(0)?;
                (rec, masked)
            }
        };
        let masked_logits = Mat::from_tensor(&masked)?.to_rows();
        let masked_probs = Mat::from_tensor(&softmax_last(&masked)?)?.to_rows();
        let mut alive = alive_nodes_with(ci, &masked_probs, how.th, how.semantics, how.max_outputs);
        let outputs = alive.len() - 1;
        for &(pos, token) in how.force_outputs {
            let Some(row) = alive[outputs].get_mut(pos) else {
                return Err(RunError::Unsupported(format!(
                    "position {pos} is outside the prompt ({} tokens)",
                    ci.tokens.len()
                )));
            };
            if token as usize >= model.target.cfg.vocab_size {
                return Err(RunError::Unsupported(format!(
                    "token {token} is out of the vocabulary (size {})",
                    model.target.cfg.vocab_size
                )));
            }
            if let Err(at) = row.binary_search(&token) {
                row.insert(at, token);
            }
        }
        let seeds = match collect {
            Collect::Traced { target, .. } => Some(
                Seeds::resolve(target, &alive[outputs], &masked_probs)
                    .map_err(RunError::Unsupported)?,
            ),
            _ => None,
        };
        let deltas = match how.semantics {
            Semantics::Seed => None,
            Semantics::App => {
                if self.deltas.get().is_none() {
                    // Two threads may both build it; one copy is kept.
                    let _ = self.deltas.set(DeltaWeights::new(model)?);
                }
                self.deltas.get().filter(|d| !d.all_zero())
            }
        };
        let seeds = seeds.as_ref();
        let (collected, total) = match &self.weights {
            Weights::Host(w) => {
                self.host_edges(w, model, ci, &rec, &alive, deltas, collect, seeds, progress)?
            }
            Weights::Tensor(w) => {
                tensor::edges(&self.plans, w, ci, &rec, &alive, collect, seeds, progress)?
            }
        };
        let graph = Graph {
            edges: collected.edges,
            masked_probs,
            masked_logits,
            alive,
            n_backward_passes: 0,
        };
        Ok((graph, total, collected.trace))
    }

    /// The host backend: (target, position) units over threads. Returns the edges `collect` asks
    /// for and the graph's edge count.
    #[allow(clippy::too_many_arguments)]
    fn host_edges(
        &self,
        weights: &HostWeights,
        model: &SpdModel,
        ci: &PromptCi,
        rec: &Recorded,
        alive: &[Vec<Vec<u32>>],
        deltas: Option<&DeltaWeights>,
        collect: Collect,
        seeds: Option<&Seeds>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Collected, usize), RunError> {
        let rec = HostRecord::new(rec, self)?;
        let n = model.modules.len();
        let ctx = Ctx {
            engine: self,
            weights,
            model,
            rec: &rec,
            alive,
            coef: &rec.coef,
            n,
            app_values: None,
        };
        // The app's semantics: every residual reader's edges first, one plan per thread (each
        // plan's positions share its matrix products).
        let app_values = deltas.map(|d| ctx.all_plan_values(d));
        let ctx = Ctx {
            app_values: app_values.as_deref(),
            ..ctx
        };
        // Work units are (target, position) in the reference's order; a unit's edges are a
        // contiguous run of the graph, so where they land does not depend on the threads.
        let t = ci.tokens.len();
        let units: Vec<(&TargetPlan, usize)> = self
            .plans
            .iter()
            .flat_map(|p| (0..t).map(move |s| (p, s)))
            .collect();
        let lens: Vec<usize> = units.iter().map(|(p, s)| ctx.unit_len(p, *s)).collect();
        let total = lens.iter().sum();
        let edges = collect_units(
            &HostUnits {
                ctx: &ctx,
                units: &units,
                lens: &lens,
            },
            collect,
            alive,
            n,
            seeds,
            progress,
        );
        Ok((edges, total))
    }
}

/// Threads for the host-side work of a graph.
fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Mat {
    fn to_rows(&self) -> Vec<Vec<f32>> {
        self.data
            .chunks(self.cols.max(1))
            .map(<[f32]>::to_vec)
            .collect()
    }
}

/// [`Recorded`] copied to the host, for the host backend's loops.
struct HostRecord {
    embed: Mat,
    outputs: HashMap<ModuleId, Mat>,
    coef: Vec<Mat>,
    residual: Vec<(LnSite, Mat)>,
    /// Per block, attention probabilities `[H][T][T]` flattened.
    probs: Vec<Vec<f32>>,
    /// With rotary positions: `q' = R_s q` and `k' = R_s k` as the scores read them, by the q/k
    /// projection's id (absent without rotary positions: the outputs are what the scores read).
    rotated: HashMap<ModuleId, Mat>,
}

impl HostRecord {
    /// The host copy of `rec`, with q and k rotated once here rather than in every work unit.
    fn new(rec: &Recorded, engine: &FastEngine) -> candle_core::Result<Self> {
        let outputs: HashMap<ModuleId, Mat> = rec
            .outputs
            .iter()
            .map(|(id, t)| Ok((*id, Mat::from_tensor(t)?)))
            .collect::<candle_core::Result<_>>()?;
        let mut rotated = HashMap::new();
        if let Some(rope) = &engine.rope {
            let hd = engine.head_dim;
            for (id, m) in &outputs {
                if matches!(id.kind, ModuleKind::Q | ModuleKind::K) {
                    let mut out = m.clone();
                    for s in 0..m.rows {
                        for h in 0..m.cols / hd {
                            let r = h * hd..(h + 1) * hd;
                            rope.rotate(
                                &m.row(s)[r.clone()],
                                s,
                                false,
                                &mut out.data[s * m.cols..][r],
                            );
                        }
                    }
                    rotated.insert(*id, out);
                }
            }
        }
        Ok(Self {
            embed: Mat::from_tensor(&rec.embed)?,
            outputs,
            rotated,
            coef: rec
                .coef
                .iter()
                .map(Mat::from_tensor)
                .collect::<candle_core::Result<_>>()?,
            residual: rec
                .residual
                .iter()
                .map(|(s, t)| Ok((*s, Mat::from_tensor(t)?)))
                .collect::<candle_core::Result<_>>()?,
            probs: rec
                .probs
                .iter()
                .map(|p| {
                    p.flatten_all()?
                        .to_device(&candle_core::Device::Cpu)?
                        .to_vec1()
                })
                .collect::<candle_core::Result<_>>()?,
        })
    }

    fn residual_at(&self, site: LnSite) -> &Mat {
        record::at_site(&self.residual, site)
    }
}

/// Everything the per-target loops read.
struct Ctx<'a> {
    engine: &'a FastEngine,
    weights: &'a HostWeights,
    model: &'a SpdModel,
    rec: &'a HostRecord,
    alive: &'a [Vec<Vec<u32>>],
    coef: &'a [Mat],
    n: usize,
    /// The app's semantics with non-zero deltas: each residual reader's edge values, computed
    /// beforehand with the deltas' paths (by plan index).
    app_values: Option<&'a [Option<PlanValues>]>,
}

impl Ctx<'_> {
    fn alive(&self, layer: Layer, s: usize) -> &[u32] {
        &self.alive[layer.index(self.n)][s]
    }

    /// How many edges the unit (plan, position `s`) emits: alive targets × alive sources in range.
    fn unit_len(&self, plan: &TargetPlan, s: usize) -> usize {
        let per_target: usize = plan
            .sources
            .iter()
            .map(|src| {
                let first = if src.cross_seq { 0 } else { s };
                (first..=s)
                    .map(|s_in| self.alive(src.layer, s_in).len())
                    .sum::<usize>()
            })
            .sum();
        self.alive(plan.target, s).len() * per_target
    }

    /// The edges of one work unit: `plan`'s targets at one position.
    fn unit(&self, (plan, s): (&TargetPlan, usize), out: &mut impl Sink<Edge>) {
        match &plan.step {
            Step::Residual {
                site,
                norm,
                ln_weight,
            } => self.residual(plan, *site, *norm, ln_weight, s..s + 1, out),
            Step::Attention { block } => self.attention(plan, *block, s..s + 1, out),
            Step::Mlp { block } => self.mlp(plan, *block, s..s + 1, out),
            Step::Glu { block } => self.glu(plan, *block, s..s + 1, out),
            Step::Identity => self.identity(plan, s, out),
        }
    }

    fn module(&self, id: ModuleId) -> usize {
        self.model
            .module_index(id)
            .expect("planned modules are decomposed")
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        edges: &mut impl Sink<Edge>,
        src: &Source,
        target: Layer,
        c_in: u32,
        c_out: u32,
        s_in: usize,
        s_out: usize,
        value: f32,
    ) {
        edges.push(Edge {
            source: src.layer,
            target,
            c_in,
            c_out,
            s_in: s_in as u32,
            s_out: s_out as u32,
            value: value as f64,
            is_cross_seq: src.cross_seq,
        });
    }

    /// Residual readers: `∂act/∂x` through the norm, then one dot product per source row.
    fn residual(
        &self,
        plan: &TargetPlan,
        site: LnSite,
        norm: NormKind,
        ln_weight: &[f32],
        positions: Range<usize>,
        edges: &mut impl Sink<Edge>,
    ) {
        if let Some(values) = self.app_values.and_then(|v| v[plan.index].as_ref()) {
            return self.residual_from_values(values, plan, positions, edges);
        }
        let e = self.weights;
        let x = self.rec.residual_at(site);
        let mut g = vec![0f32; x.cols];
        for s in positions {
            let outs = self.alive(plan.target, s);
            if outs.is_empty() {
                continue;
            }
            let ln = NormBackward::new(norm, x.row(s));
            for &c_out in outs {
                let column = match plan.target {
                    Layer::Module(i) => e.vt[i].row(c_out as usize),
                    _ => e.lm_head.row(c_out as usize),
                };
                ln.apply(column, ln_weight, &mut g);
                for src in &plan.sources {
                    match src.layer {
                        Layer::Wte => self.push(
                            edges,
                            src,
                            plan.target,
                            0,
                            c_out,
                            s,
                            s,
                            dot(self.rec.embed.row(s), &g),
                        ),
                        Layer::Module(j) => {
                            for &c_in in self.alive(src.layer, s) {
                                let v = self.coef[j].at(s, c_in as usize)
                                    * dot(e.u[j].row(c_in as usize), &g);
                                self.push(edges, src, plan.target, c_in, c_out, s, s, v);
                            }
                        }
                        Layer::Output => unreachable!("output is never a source"),
                    }
                }
            }
        }
    }

    /// [`Self::residual`] under the app's semantics: the values were computed beforehand
    /// ([`Self::plan_values`]); a unit emits its positions' edges in the engine's order.
    fn residual_from_values(
        &self,
        values: &PlanValues,
        plan: &TargetPlan,
        positions: Range<usize>,
        edges: &mut impl Sink<Edge>,
    ) {
        for s in positions {
            let mut v = values.values[values.offsets[s]..values.offsets[s + 1]].iter();
            for &c_out in self.alive(plan.target, s) {
                for src in &plan.sources {
                    match src.layer {
                        Layer::Wte => {
                            let x = *v.next().expect("one value per edge");
                            self.push(edges, src, plan.target, 0, c_out, s, s, x);
                        }
                        _ => {
                            for &c_in in self.alive(src.layer, s) {
                                let x = *v.next().expect("one value per edge");
                                self.push(edges, src, plan.target, c_in, c_out, s, s, x);
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`Self::plan_values`] of every residual reader, the plans spread over the threads.
    fn all_plan_values(&self, deltas: &DeltaWeights) -> Vec<Option<PlanValues>> {
        let plans = &self.engine.plans;
        let threads = available_threads().min(plans.len()).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut out: Vec<Option<PlanValues>> = (0..plans.len()).map(|_| None).collect();
        let done: Vec<Vec<(usize, PlanValues)>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(plan) = plans.get(i) else { break };
                            if let Step::Residual {
                                site,
                                norm,
                                ln_weight,
                            } = &plan.step
                            {
                                mine.push((
                                    i,
                                    self.plan_values(deltas, plan, *site, *norm, ln_weight),
                                ));
                            }
                        }
                        mine
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a plan's values do not panic"))
                .collect()
        });
        for (i, v) in done.into_iter().flatten() {
            out[i] = Some(v);
        }
        out
    }

    /// `q/k/v → o_proj` of one block, from the softmax attention's derivatives. With rotary
    /// positions the scores read `q' = R_s q` and `k' = R_s₂ k`, so a q source's gradient is rotated
    /// back by `R_sᵀ` and a k source's reads `R_s₂ᵀ q'`; query head `h` reads K/V head `h / r`.
    fn attention(
        &self,
        plan: &TargetPlan,
        block: usize,
        positions: Range<usize>,
        edges: &mut impl Sink<Edge>,
    ) {
        let e = self.weights;
        let (nh, hd) = (self.engine.n_head, self.engine.head_dim);
        let group = nh / self.engine.n_kv_head;
        let inv_sqrt = 1.0 / (hd as f32).sqrt();
        let id = |kind| ModuleId::new(block, kind);
        let (q, k, v) = (
            &self.rec.outputs[&id(ModuleKind::Q)],
            &self.rec.outputs[&id(ModuleKind::K)],
            &self.rec.outputs[&id(ModuleKind::V)],
        );
        let t = q.rows;
        let probs = &self.rec.probs[block];
        let p = |h: usize, s: usize, s2: usize| probs[(h * t + s) * t + s2];
        // The target is o_proj, or the identity in front of it.
        let Layer::Module(o) = plan.target else {
            unreachable!("planned as o_proj")
        };
        let vt_o = &e.vt[o];
        let head = |h: usize| h * hd..(h + 1) * hd;
        let kv_head = |h: usize| head(h / group);
        let (iq, ik, iv) = (
            self.module(id(ModuleKind::Q)),
            self.module(id(ModuleKind::K)),
            self.module(id(ModuleKind::V)),
        );
        // q' and k' as the scores read them (rotated where the model has rotary positions).
        let (qr, kr) = (
            self.rec.rotated.get(&id(ModuleKind::Q)).unwrap_or(q),
            self.rec.rotated.get(&id(ModuleKind::K)).unwrap_or(k),
        );
        let back = |x: &mut [f32], s: usize, tmp: &mut [f32]| {
            if let Some(rope) = &self.engine.rope {
                rope.rotate(x, s, true, tmp);
                x.copy_from_slice(tmp);
            }
        };
        let mut tmp = vec![0f32; hd];
        let mut w = vec![0f32; nh * t];
        let mut wbar = vec![0f32; nh];
        let mut rho = vec![0f32; nh * hd];
        let mut qback = vec![0f32; nh * hd];
        for s_out in positions {
            let outs = self.alive(plan.target, s_out);
            if outs.is_empty() {
                continue;
            }
            // Uₖ[c_in]·(R_s_inᵀ q'_h[s_out]) for every alive k row up to s_out: shared by all
            // targets at s_out. Without rotary positions `R_s_inᵀ q'` is `q` itself.
            let mut kq: Vec<Vec<f32>> = Vec::with_capacity(s_out + 1);
            for s_in in 0..=s_out {
                let qrow: &[f32] = if self.engine.rope.is_some() {
                    qback.copy_from_slice(qr.row(s_out));
                    for h in 0..nh {
                        back(&mut qback[head(h)], s_in, &mut tmp);
                    }
                    &qback
                } else {
                    q.row(s_out)
                };
                kq.push(
                    self.alive(Layer::Module(ik), s_in)
                        .iter()
                        .flat_map(|&c| {
                            let urow = e.u[ik].row(c as usize);
                            (0..nh).map(move |h| dot(&urow[kv_head(h)], &qrow[head(h)]))
                        })
                        .collect(),
                );
            }
            for &c_out in outs {
                let col = vt_o.row(c_out as usize);
                for h in 0..nh {
                    let beta = &col[head(h)];
                    let mut acc = 0f32;
                    for s2 in 0..=s_out {
                        let wv = dot(&v.row(s2)[kv_head(h)], beta);
                        w[h * t + s2] = wv;
                        acc += p(h, s_out, s2) * wv;
                    }
                    wbar[h] = acc;
                }
                for src in &plan.sources {
                    let Layer::Module(j) = src.layer else {
                        unreachable!("attention sources are modules")
                    };
                    if j == iq {
                        for h in 0..nh {
                            let r = &mut rho[h * hd..(h + 1) * hd];
                            r.fill(0.0);
                            for s2 in 0..=s_out {
                                let f = p(h, s_out, s2) * (w[h * t + s2] - wbar[h]) * inv_sqrt;
                                for (ri, ki) in r.iter_mut().zip(&kr.row(s2)[kv_head(h)]) {
                                    *ri += f * ki;
                                }
                            }
                            back(r, s_out, &mut tmp);
                        }
                        for &c_in in self.alive(src.layer, s_out) {
                            let urow = e.u[j].row(c_in as usize);
                            let g: f32 = (0..nh)
                                .map(|h| dot(&urow[head(h)], &rho[h * hd..(h + 1) * hd]))
                                .sum();
                            self.push(
                                edges,
                                src,
                                plan.target,
                                c_in,
                                c_out,
                                s_out,
                                s_out,
                                self.coef[j].at(s_out, c_in as usize) * g,
                            );
                        }
                    } else if j == ik {
                        for (s_in, kq_row) in kq.iter().enumerate() {
                            for (a, &c_in) in self.alive(src.layer, s_in).iter().enumerate() {
                                let g: f32 = (0..nh)
                                    .map(|h| {
                                        kq_row[a * nh + h]
                                            * p(h, s_out, s_in)
                                            * (w[h * t + s_in] - wbar[h])
                                            * inv_sqrt
                                    })
                                    .sum();
                                self.push(
                                    edges,
                                    src,
                                    plan.target,
                                    c_in,
                                    c_out,
                                    s_in,
                                    s_out,
                                    self.coef[j].at(s_in, c_in as usize) * g,
                                );
                            }
                        }
                    } else if j == iv {
                        for s_in in 0..=s_out {
                            for &c_in in self.alive(src.layer, s_in) {
                                let urow = e.u[j].row(c_in as usize);
                                let g: f32 = (0..nh)
                                    .map(|h| {
                                        p(h, s_out, s_in) * dot(&urow[kv_head(h)], &col[head(h)])
                                    })
                                    .sum();
                                self.push(
                                    edges,
                                    src,
                                    plan.target,
                                    c_in,
                                    c_out,
                                    s_in,
                                    s_out,
                                    self.coef[j].at(s_in, c_in as usize) * g,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// `gate_proj, up_proj → down_proj` of SwiGLU, `a = silu(g) ⊙ u`: a gate source's edge is
    /// `U_gate[c_in] · (silu'(g) ⊙ u ⊙ V_down[:, c_out])`, an up source's
    /// `U_up[c_in] · (silu(g) ⊙ V_down[:, c_out])`.
    fn glu(
        &self,
        plan: &TargetPlan,
        block: usize,
        positions: Range<usize>,
        edges: &mut impl Sink<Edge>,
    ) {
        let e = self.weights;
        let out_of = |kind| &self.rec.outputs[&ModuleId::new(block, kind)];
        let (gate, up) = (out_of(ModuleKind::Gate), out_of(ModuleKind::Up));
        let Layer::Module(i) = plan.target else {
            unreachable!("planned as down_proj")
        };
        let mut via_gate = vec![0f32; gate.cols];
        let mut via_up = vec![0f32; gate.cols];
        for s in positions {
            let outs = self.alive(plan.target, s);
            if outs.is_empty() {
                continue;
            }
            let (act, grad): (Vec<f32>, Vec<f32>) =
                gate.row(s).iter().map(|x| silu_and_grad(*x)).unzip();
            for &c_out in outs {
                let col = e.vt[i].row(c_out as usize);
                for (n, c) in col.iter().enumerate() {
                    via_gate[n] = c * grad[n] * up.at(s, n);
                    via_up[n] = c * act[n];
                }
                for (src, tmp) in plan.sources.iter().zip([&via_gate, &via_up]) {
                    let Layer::Module(j) = src.layer else {
                        unreachable!("planned as gate_proj, up_proj")
                    };
                    for &c_in in self.alive(src.layer, s) {
                        let v =
                            self.coef[j].at(s, c_in as usize) * dot(e.u[j].row(c_in as usize), tmp);
                        self.push(edges, src, plan.target, c_in, c_out, s, s, v);
                    }
                }
            }
        }
    }

    /// An inserted identity → the projection it feeds, at one position.
    fn identity(&self, plan: &TargetPlan, s: usize, edges: &mut impl Sink<Edge>) {
        let e = self.weights;
        let (Layer::Module(i), src) = (plan.target, &plan.sources[0]) else {
            unreachable!("planned as a projection")
        };
        let Layer::Module(j) = src.layer else {
            unreachable!("planned as its identity")
        };
        for &c_out in self.alive(plan.target, s) {
            let col = e.vt[i].row(c_out as usize);
            for &c_in in self.alive(src.layer, s) {
                let v = self.coef[j].at(s, c_in as usize) * dot(e.u[j].row(c_in as usize), col);
                self.push(edges, src, plan.target, c_in, c_out, s, s, v);
            }
        }
    }

    /// `c_fc → down_proj`: `Σ_j U_cfc[c_in, j] · gelu'(h_j) · V_down[j, c_out]`.
    fn mlp(
        &self,
        plan: &TargetPlan,
        block: usize,
        positions: Range<usize>,
        edges: &mut impl Sink<Edge>,
    ) {
        let e = self.weights;
        let h = &self.rec.outputs[&ModuleId::new(block, ModuleKind::CFc)];
        let src = &plan.sources[0];
        let Layer::Module(j) = src.layer else {
            unreachable!("planned as c_fc")
        };
        let Layer::Module(i) = plan.target else {
            unreachable!("planned as down_proj")
        };
        let mut tmp = vec![0f32; h.cols];
        for s in positions {
            let outs = self.alive(plan.target, s);
            if outs.is_empty() {
                continue;
            }
            let grad: Vec<f32> = h.row(s).iter().map(|x| gelu_tanh_grad(*x)).collect();
            for &c_out in outs {
                for ((t, v), g) in tmp.iter_mut().zip(e.vt[i].row(c_out as usize)).zip(&grad) {
                    *t = v * g;
                }
                for &c_in in self.alive(src.layer, s) {
                    let v =
                        self.coef[j].at(s, c_in as usize) * dot(e.u[j].row(c_in as usize), &tmp);
                    self.push(edges, src, plan.target, c_in, c_out, s, s, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_loops_on_cpus_and_on_gpus_with_enough_cores() {
        assert_eq!(Backend::choose(true, 1), Backend::Host);
        assert_eq!(Backend::choose(true, 64), Backend::Host);
        assert_eq!(Backend::choose(false, 2), Backend::Tensor);
        assert_eq!(
            Backend::choose(false, HOST_THREADS_FOR_GPU - 1),
            Backend::Tensor
        );
        assert_eq!(Backend::choose(false, HOST_THREADS_FOR_GPU), Backend::Host);
        assert_eq!(Backend::choose(false, 16), Backend::Host);
    }
}
