//! The view a researcher is looking at, and its URL form, so a view can be shared and survives a
//! reload: which prompt (or typed text), pinned components, filters, layout, zoom and pan.

use crate::canvas::layout::LayoutMode;
use crate::canvas::view::Viewport;
use crate::supernode::{self, Group};
use crate::trace::{DEFAULT_EDGE_THRESHOLD, DEFAULT_NODE_THRESHOLD};
use crate::types::{
    GraphParams, Normalize, OptimLoss, OptimMask, OptimizeSpec, PromptRef, Semantics, TraceTarget,
};

/// Edges drawn by default (the strongest by |value|).
pub const DEFAULT_TOP_K: usize = 2_000;

#[derive(Clone, Debug, PartialEq)]
pub struct ViewState {
    pub prompt: PromptRef,
    /// Pinned components, `"layer:c"`, in pin order.
    pub pins: Vec<String>,
    /// Nodes selected for an intervention, `"layer:pos:c"`, in selection order.
    pub selected: Vec<String>,
    pub top_k: usize,
    pub params: GraphParams,
    pub layout: LayoutMode,
    /// Zoom factor and pan offset in CSS pixels.
    pub zoom: f64,
    pub pan: (f64, f64),
    /// The optimisation of the prompt's "Optimized" tab, once asked for.
    pub opt: Option<OptimizeSpec>,
    /// Whether the optimised graph's tab is the one shown.
    pub show_opt: bool,
    /// The trace's pruning (`params.trace` says what is traced; `None` draws the `top_k`
    /// strongest edges instead): the fractions of influence the kept nodes and edges carry.
    pub node_threshold: f64,
    pub edge_threshold: f64,
    /// The second prompt ("B") the drawn one is compared with, if any; its graph is computed with
    /// the same parameters.
    pub compare: Option<PromptRef>,
    /// Supernodes: groups of nodes drawn as one (see [`crate::supernode`]).
    pub groups: Vec<Group>,
}

impl Default for ViewState {
    fn default() -> Self {
        ViewState {
            prompt: PromptRef::Stored(1),
            pins: vec![],
            selected: vec![],
            top_k: DEFAULT_TOP_K,
            // A new user sees what drives the last prediction, not a wall of the strongest edges.
            params: GraphParams {
                trace: Some(TraceTarget::Last),
                ..GraphParams::default()
            },
            layout: LayoutMode::Jittered,
            zoom: 1.0,
            pan: (0.0, 0.0),
            opt: None,
            show_opt: false,
            node_threshold: DEFAULT_NODE_THRESHOLD,
            edge_threshold: DEFAULT_EDGE_THRESHOLD,
            compare: None,
            groups: vec![],
        }
    }
}

/// `ce:label:position:imp_min_coeff:steps:pnorm:beta:mask:pgd_steps:pgd_step_size`.
fn spec_to_url(s: &OptimizeSpec) -> String {
    format!(
        "{}:{}:{}:{}:{}:{}:{}:{}:{}:{}",
        match s.loss {
            OptimLoss::Ce => "ce",
            OptimLoss::Kl => "kl",
        },
        s.label,
        s.position,
        s.imp_min_coeff,
        s.steps,
        s.pnorm,
        s.beta,
        match s.mask {
            OptimMask::Ci => "ci",
            OptimMask::Stochastic => "stochastic",
        },
        s.pgd_steps,
        s.pgd_step_size
    )
}

fn spec_from_url(v: &str) -> Option<OptimizeSpec> {
    let p: Vec<&str> = v.split(':').collect();
    let [
        loss,
        label,
        position,
        coeff,
        steps,
        pnorm,
        beta,
        mask,
        pgd_steps,
        pgd_size,
    ] = p[..]
    else {
        return None;
    };
    Some(OptimizeSpec {
        loss: match loss {
            "ce" => OptimLoss::Ce,
            "kl" => OptimLoss::Kl,
            _ => return None,
        },
        label: label.parse().ok()?,
        position: position.parse().ok()?,
        imp_min_coeff: coeff.parse().ok()?,
        steps: steps.parse().ok()?,
        pnorm: pnorm.parse().ok()?,
        beta: beta.parse().ok()?,
        mask: match mask {
            "ci" => OptimMask::Ci,
            "stochastic" => OptimMask::Stochastic,
            _ => return None,
        },
        pgd_steps: pgd_steps.parse().ok()?,
        pgd_step_size: pgd_size.parse().ok()?,
    })
}

impl ViewState {
    /// The zoom and pan as the canvas geometry uses them.
    pub fn viewport(&self) -> Viewport {
        Viewport {
            zoom: self.zoom,
            pan: self.pan,
        }
    }

    pub fn set_viewport(&mut self, v: Viewport) {
        self.zoom = v.zoom;
        self.pan = v.pan;
    }

    /// The query string (without `?`); only what differs from the defaults, in a fixed order.
    pub fn to_query(&self) -> String {
        let d = ViewState::default();
        let mut parts: Vec<(&str, String)> = vec![];
        match &self.prompt {
            PromptRef::Stored(id) => parts.push(("prompt", id.to_string())),
            PromptRef::Text(t) => parts.push(("text", t.clone())),
        }
        match &self.compare {
            Some(PromptRef::Stored(id)) => parts.push(("b", id.to_string())),
            Some(PromptRef::Text(t)) => parts.push(("btext", t.clone())),
            None => {}
        }
        if !self.pins.is_empty() {
            parts.push(("pins", self.pins.join(",")));
        }
        if !self.selected.is_empty() {
            parts.push(("sel", self.selected.join(",")));
        }
        for g in &self.groups {
            parts.push(("g", supernode::to_url(g)));
        }
        if self.top_k != d.top_k {
            parts.push(("topk", self.top_k.to_string()));
        }
        let p = &self.params;
        if p.ci_threshold != d.params.ci_threshold {
            parts.push(("ci", p.ci_threshold.to_string()));
        }
        if p.output_prob_threshold != d.params.output_prob_threshold {
            parts.push(("out", p.output_prob_threshold.to_string()));
        }
        if p.normalize != d.params.normalize {
            parts.push(("norm", p.normalize.name().into()));
        }
        if p.semantics != d.params.semantics {
            parts.push(("sem", p.semantics.name().into()));
        }
        if p.max_mean_ci != d.params.max_mean_ci {
            parts.push(("mmci", p.max_mean_ci.to_string()));
        }
        if p.trace != d.params.trace {
            parts.push(("trace", p.trace.map_or("off".into(), TraceTarget::to_url)));
        }
        if self.node_threshold != d.node_threshold {
            parts.push(("tn", self.node_threshold.to_string()));
        }
        if self.edge_threshold != d.edge_threshold {
            parts.push(("te", self.edge_threshold.to_string()));
        }
        if self.layout != d.layout {
            parts.push(("layout", self.layout.name().into()));
        }
        if let Some(o) = &self.opt {
            parts.push(("opt", spec_to_url(o)));
        }
        if self.show_opt && self.opt.is_some() {
            parts.push(("tab", "opt".into()));
        }
        if self.zoom != 1.0 || self.pan != (0.0, 0.0) {
            parts.push((
                "view",
                format!("{:.3},{:.1},{:.1}", self.zoom, self.pan.0, self.pan.1),
            ));
        }
        parts
            .into_iter()
            .map(|(k, v)| format!("{k}={}", encode(&v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Reads a query string (with or without `?`); anything missing or malformed keeps its default.
    pub fn from_query(query: &str) -> ViewState {
        let mut s = ViewState::default();
        for pair in query.trim_start_matches('?').split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "prompt" => {
                    if let Ok(id) = v.parse() {
                        s.prompt = PromptRef::Stored(id);
                    }
                }
                "text" if !v.is_empty() => s.prompt = PromptRef::Text(v),
                "b" => {
                    if let Ok(id) = v.parse() {
                        s.compare = Some(PromptRef::Stored(id));
                    }
                }
                "btext" if !v.is_empty() => s.compare = Some(PromptRef::Text(v)),
                "pins" => {
                    s.pins = v
                        .split(',')
                        .filter(|p| p.contains(':'))
                        .map(str::to_owned)
                        .collect()
                }
                "sel" => {
                    s.selected = v
                        .split(',')
                        .filter(|p| p.matches(':').count() == 2)
                        .map(str::to_owned)
                        .collect()
                }
                "g" => s.groups.extend(supernode::from_url(&v)),
                "topk" => s.top_k = v.parse().unwrap_or(s.top_k),
                "ci" => s.params.ci_threshold = v.parse().unwrap_or(s.params.ci_threshold),
                "out" => {
                    s.params.output_prob_threshold =
                        v.parse().unwrap_or(s.params.output_prob_threshold)
                }
                "norm" => {
                    s.params.normalize = Normalize::from_name(&v).unwrap_or(s.params.normalize)
                }
                "sem" => {
                    s.params.semantics = Semantics::from_name(&v).unwrap_or(s.params.semantics)
                }
                "mmci" => s.params.max_mean_ci = v.parse().unwrap_or(s.params.max_mean_ci),
                "trace" if v == "off" => s.params.trace = None,
                "trace" => s.params.trace = TraceTarget::from_url(&v).or(s.params.trace),
                "tn" => s.node_threshold = unit(&v).unwrap_or(s.node_threshold),
                "te" => s.edge_threshold = unit(&v).unwrap_or(s.edge_threshold),
                "layout" => s.layout = LayoutMode::from_name(&v).unwrap_or(s.layout),
                "opt" => s.opt = spec_from_url(&v),
                "tab" => s.show_opt = v == "opt",
                "view" => {
                    let n: Vec<f64> = v.split(',').filter_map(|x| x.parse().ok()).collect();
                    if let [z, x, y] = n[..]
                        && z > 0.0
                    {
                        s.zoom = z;
                        s.pan = (x, y);
                    }
                }
                _ => {}
            }
        }
        s.show_opt &= s.opt.is_some();
        s
    }
}

/// A number in [0, 1].
fn unit(v: &str) -> Option<f64> {
    v.parse().ok().filter(|x: &f64| (0.0..=1.0).contains(x))
}

/// Percent-encodes everything but unreserved characters and the separators we use inside values.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' | b':' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 2;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_view_is_just_the_prompt() {
        assert_eq!(ViewState::default().to_query(), "prompt=1");
        assert_eq!(ViewState::from_query(""), ViewState::default());
    }

    #[test]
    fn every_field_round_trips_through_the_url() {
        let s = ViewState {
            prompt: PromptRef::Text("Tom said \"hi\" & left, 100% sure+".into()),
            pins: vec!["h.0.attn.k_proj:12".into(), "output:431".into()],
            selected: vec!["h.1.mlp.c_fc:3:7".into(), "wte:0:0".into()],
            top_k: 500,
            params: GraphParams {
                ci_threshold: 0.25,
                output_prob_threshold: 0.1,
                normalize: Normalize::L2Layer,
                semantics: Semantics::App,
                max_mean_ci: 0.5,
                trace: Some(TraceTarget::Diff {
                    pos: 3,
                    a: 17,
                    b: 250,
                }),
            },
            layout: LayoutMode::Importance,
            zoom: 2.5,
            pan: (-120.5, 33.0),
            opt: Some(OptimizeSpec {
                loss: OptimLoss::Kl,
                label: 17,
                position: 4,
                imp_min_coeff: 0.0025,
                steps: 250,
                pnorm: 0.5,
                beta: 0.1,
                mask: OptimMask::Stochastic,
                pgd_steps: 3,
                pgd_step_size: 0.05,
            }),
            show_opt: true,
            node_threshold: 0.55,
            edge_threshold: 0.9,
            compare: Some(PromptRef::Text("a boy & his \"dog\"".into())),
            groups: vec![
                Group {
                    label: "names, copied".into(),
                    members: vec!["h.0.attn.v_proj:6:28".into(), "h.1.attn.o_proj:14:3".into()],
                    open: false,
                },
                Group {
                    label: "plural|count".into(),
                    members: vec!["h.0.mlp.c_fc:2:9".into()],
                    open: true,
                },
            ],
        };
        let q = s.to_query();
        assert!(!q.contains(' ') && !q.contains('"'), "{q}");
        assert_eq!(ViewState::from_query(&q), s);
        assert_eq!(ViewState::from_query(&format!("?{q}")), s);
        let stored = ViewState {
            compare: Some(PromptRef::Stored(42)),
            ..s
        };
        assert_eq!(ViewState::from_query(&stored.to_query()), stored);
    }

    #[test]
    fn malformed_values_keep_their_defaults() {
        let s = ViewState::from_query(
            "prompt=x&topk=-3&ci=abc&layout=spiral&view=0,1,2&pins=bad,,wte:0&sel=a:1,b:2:3&zzz",
        );
        let d = ViewState::default();
        assert_eq!(s.prompt, d.prompt);
        assert_eq!(s.top_k, d.top_k);
        assert_eq!(s.params, d.params);
        assert_eq!(s.layout, d.layout);
        assert_eq!((s.zoom, s.pan), (d.zoom, d.pan));
        assert_eq!(s.pins, vec!["wte:0".to_owned()]);
        assert_eq!(s.selected, vec!["b:2:3".to_owned()]);
        // An optimisation tab needs its optimisation.
        assert!(!ViewState::from_query("tab=opt").show_opt);
        assert_eq!(ViewState::from_query("opt=ce:1:2").opt, None);
        assert_eq!(decode("%zz%4"), "%zz%4");
        let s = ViewState::from_query("trace=1:x&tn=1.5&te=-1");
        assert_eq!(s.params.trace, d.params.trace);
        assert_eq!(
            (s.node_threshold, s.edge_threshold),
            (d.node_threshold, d.edge_threshold)
        );
    }

    #[test]
    fn the_trace_of_the_last_position_is_the_default_and_can_be_turned_off() {
        let d = ViewState::default();
        assert_eq!(d.params.trace, Some(TraceTarget::Last));
        let off = ViewState::from_query("trace=off");
        assert_eq!(off.params.trace, None);
        assert_eq!(off.to_query(), "prompt=1&trace=off");
        for t in [
            TraceTarget::Token { pos: 2, token: 9 },
            TraceTarget::Diff { pos: 0, a: 1, b: 2 },
        ] {
            assert_eq!(TraceTarget::from_url(&t.to_url()), Some(t));
        }
    }
}
