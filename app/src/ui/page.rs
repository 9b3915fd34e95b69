//! The explorer page: its state, the loading of graphs (with progress), and the URL and keyboard
//! bindings. Graphs load in the browser after hydration, so the page never waits on the server.

use std::collections::HashMap;

use leptos::prelude::*;

use super::{
    browser::ComponentBrowser,
    circuit::{CircuitPanel, OptimizePanel},
    compare::ComparePanel,
    graph_view::GraphView,
    groups::GroupsPanel,
    pins::PinsPanel,
    sidebar::Sidebar,
};
use crate::api::{get_component, get_graph, get_labels, get_meta, get_optimized_graph};
use crate::canvas::layout::Layout;
use crate::canvas::scene::Scene;
use crate::state::ViewState;
use crate::supernode::{Group, merge, place_groups};
use crate::trace::{completeness, prune, pruned_graph};
use crate::types::{ComponentInfo, GraphData, Meta};

/// In trace mode a node's size says how much of the targets' influence it carries (relative to
/// the most influential node but the targets, which keep their probability).
fn size_by_influence(g: &GraphData, l: &mut Layout) {
    let Some(t) = &g.trace else { return };
    let is_target = |i: usize| t.targets.contains(&g.nodes[i].key);
    let wte = |i: usize| g.nodes[i].key.starts_with("wte:");
    let max = (0..g.nodes.len())
        .filter(|&i| !is_target(i) && !wte(i))
        .map(|i| t.influence.get(i).copied().unwrap_or(0.0))
        .fold(0f32, f32::max);
    if max <= 0.0 {
        return;
    }
    for (i, r) in l.radii.iter_mut().enumerate() {
        if !is_target(i) && !wte(i) {
            let rel = f64::from(t.influence.get(i).copied().unwrap_or(0.0) / max);
            *r = l.radius * (0.35 + 0.65 * rel.clamp(0.0, 1.0).sqrt());
        }
    }
}

/// Where the current graph request stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Load {
    Idle,
    Loading { done: usize, total: usize },
    Failed(String),
}

/// What the pointer is over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hover {
    None,
    Node(usize),
    Edge(usize),
}

/// The page state, shared through context. Every field is a cheap `Copy` handle.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub view: RwSignal<ViewState>,
    /// The graph as the server sent it.
    pub fetched: RwSignal<Option<GraphData>>,
    /// The graph drawn: `fetched`, or in trace mode its part the thresholds keep (see
    /// [`crate::trace`]). Node indices everywhere (scene, layout, hover) are into this one.
    pub graph: Memo<Option<GraphData>>,
    pub load: RwSignal<Load>,
    pub hover: RwSignal<Hover>,
    /// Pointer position over the canvas (CSS pixels), for placing the hover card.
    pub pointer: RwSignal<(f64, f64)>,
    pub meta: RwSignal<Option<Meta>>,
    /// Component details fetched for hover cards and pins, by `"layer:c"`.
    pub infos: RwSignal<HashMap<String, ComponentInfo>>,
    /// The researcher's labels of components (`"layer:c"`), kept by the server.
    pub labels: RwSignal<HashMap<String, String>>,
    /// CSS width of the canvas.
    pub width: RwSignal<f64>,
    pub scene: Memo<Option<Scene>>,
    pub layout: Memo<Option<Layout>>,
    /// Bumped to ask for the current graph again (retry).
    pub reload: RwSignal<u32>,
    /// Bumped by the keyboard (`i`) to run the intervention panel on the selection.
    pub intervene: RwSignal<u32>,
    pub search_box: NodeRef<leptos::html::Input>,
    /// Set by `l` over a node: the hover card holds still and shows a label box for the node's
    /// component or supernode, until Enter keeps the label or Escape drops it.
    pub labelling: RwSignal<bool>,
}

impl Ctx {
    /// Fetches a component's details once.
    pub fn want_info(&self, key: &str) {
        if self.infos.with_untracked(|m| m.contains_key(key)) {
            return;
        }
        let (infos, key) = (self.infos, key.to_owned());
        // Placeholder so concurrent hovers do not fetch twice.
        infos.update(|m| {
            m.insert(
                key.clone(),
                ComponentInfo {
                    key: key.clone(),
                    ..ComponentInfo::default()
                },
            );
        });
        leptos::task::spawn_local(async move {
            if let Ok(info) = get_component(key.clone()).await {
                infos.update(|m| {
                    m.insert(key, info);
                });
            }
        });
    }

    /// Adds a node (`"layer:pos:c"`) to the intervention selection, or removes it.
    pub fn toggle_selected(&self, node: &str) {
        self.view.update(|v| {
            if let Some(i) = v.selected.iter().position(|p| p == node) {
                v.selected.remove(i);
            } else {
                v.selected.push(node.to_owned());
            }
        });
    }

    /// Adds component nodes to the selection (keeping its order, no duplicates).
    pub fn select(&self, nodes: impl IntoIterator<Item = String>) {
        self.view.update(|v| {
            for n in nodes {
                if selectable(&n) && !v.selected.contains(&n) {
                    v.selected.push(n);
                }
            }
        });
    }

    /// Labels what node `key` stands for: its supernode (kept in the view), or its component (kept
    /// by the server).
    pub fn label_node(&self, key: &str, label: &str) {
        match crate::supernode::group_of(key) {
            Some(gi) => self.view.update(|v| {
                if let Some(g) = v.groups.get_mut(gi) {
                    g.label = label.trim().to_owned();
                }
            }),
            None => self.label(&crate::canvas::scene::component_of(key), label),
        }
    }

    /// Groups the selected nodes into a supernode (key `g`), and clears the selection.
    pub fn group_selected(&self) {
        self.view.update(|v| {
            if v.selected.is_empty() {
                return;
            }
            let label = format!("group {}", v.groups.len() + 1);
            let members = std::mem::take(&mut v.selected);
            v.groups.push(Group {
                label,
                members,
                open: false,
            });
        });
    }

    /// Selects every component node an edge drawn now touches.
    pub fn select_drawn(&self) {
        let keys: Vec<String> = self.graph.with_untracked(|g| {
            self.scene.with_untracked(|s| {
                let (Some(g), Some(s)) = (g, s) else {
                    return vec![];
                };
                let mut on = vec![false; g.nodes.len()];
                for e in &s.edges {
                    on[e.src] = true;
                    on[e.tgt] = true;
                }
                (0..g.nodes.len())
                    .filter(|&i| on[i])
                    .map(|i| g.nodes[i].key.clone())
                    .collect()
            })
        });
        self.select(keys);
    }

    /// Labels a component on the server, and here once the server kept it.
    pub fn label(&self, component: &str, label: &str) {
        let (labels, key, label) = (self.labels, component.to_owned(), label.trim().to_owned());
        leptos::task::spawn_local(async move {
            if crate::api::set_label(key.clone(), label.clone())
                .await
                .is_ok()
            {
                labels.update(|m| {
                    if label.is_empty() {
                        m.remove(&key);
                    } else {
                        m.insert(key, label);
                    }
                });
            }
        });
    }

    pub fn toggle_pin(&self, component: &str) {
        self.view.update(|v| {
            if let Some(i) = v.pins.iter().position(|p| p == component) {
                v.pins.remove(i);
            } else {
                v.pins.push(component.to_owned());
            }
        });
        self.want_info(component);
    }
}

/// Whether a node can be intervened on or grouped: components, not the embedding, the outputs or
/// a supernode.
pub fn selectable(node: &str) -> bool {
    !node.starts_with("wte:")
        && !node.starts_with("output:")
        && crate::supernode::group_of(node).is_none()
}

#[component]
pub fn GraphPage() -> AnyView {
    let view = RwSignal::new(ViewState::default());
    let fetched: RwSignal<Option<GraphData>> = RwSignal::new(None);
    let thresholds = Memo::new(move |_| view.with(|v| (v.node_threshold, v.edge_threshold)));
    let groups = Memo::new(move |_| view.with(|v| v.groups.clone()));
    let graph = Memo::new(move |_| {
        let (tn, te) = thresholds.get();
        groups.with(|groups| {
            fetched.with(|g| {
                g.as_ref().map(|g| {
                    let kept = match prune(g, tn, te) {
                        Some(p) => pruned_graph(g, &p),
                        None => g.clone(),
                    };
                    merge(kept, groups)
                })
            })
        })
    });
    let width = RwSignal::new(900.0);
    // The parts of the view each derived value depends on, as memos: reading `view` itself would
    // rebuild the scene and layout (and refetch the graph, below) on every zoom, pan step and pin.
    let top_k = Memo::new(move |_| view.with(|v| v.top_k));
    let mode = Memo::new(move |_| view.with(|v| v.layout));
    let request = Memo::new(move |_| {
        view.with(|v| {
            let opt = if v.show_opt { v.opt } else { None };
            (v.prompt.clone(), v.params, opt)
        })
    });
    let scene = Memo::new(move |_| {
        let top_k = top_k.get();
        graph.with(|g| g.as_ref().map(|g| Scene::new(g, top_k)))
    });
    let layout = Memo::new(move |_| {
        let mode = mode.get();
        let w = width.get();
        graph.with(|g| {
            g.as_ref().map(|g| {
                let mut l = Layout::new(g, w, mode, 0);
                size_by_influence(g, &mut l);
                groups.with(|groups| place_groups(&mut l, g, groups));
                l
            })
        })
    });
    let ctx = Ctx {
        view,
        fetched,
        graph,
        load: RwSignal::new(Load::Idle),
        hover: RwSignal::new(Hover::None),
        pointer: RwSignal::new((0.0, 0.0)),
        meta: RwSignal::new(None),
        infos: RwSignal::new(HashMap::new()),
        labels: RwSignal::new(HashMap::new()),
        width,
        scene,
        layout,
        reload: RwSignal::new(0),
        intervene: RwSignal::new(0),
        search_box: NodeRef::new(),
        labelling: RwSignal::new(false),
    };
    provide_context(ctx);

    // Runs once in the browser: the URL's view, the run's meta, then graphs as the view asks.
    let ready = RwSignal::new(false);
    Effect::new(move || {
        if ready.get_untracked() {
            return;
        }
        #[cfg(feature = "hydrate")]
        {
            if let Ok(search) = window().location().search() {
                let from_url = ViewState::from_query(&search);
                for pin in &from_url.pins {
                    ctx.want_info(pin);
                }
                view.set(from_url);
            }
            if let Some(body) = document().body() {
                let _ = body.set_attribute("data-hydrated", "true");
            }
        }
        ready.set(true);
        leptos::task::spawn_local(async move {
            if let Ok(labels) = get_labels().await {
                ctx.labels.set(labels.into_iter().collect());
            }
        });
        leptos::task::spawn_local(async move {
            match get_meta().await {
                Ok(m) => ctx.meta.set(Some(m)),
                Err(e) => ctx
                    .load
                    .set(Load::Failed(format!("cannot reach the server: {e}"))),
            }
        });
    });

    // The graph follows the prompt and the server-side parameters; a newer request wins.
    let generation = StoredValue::new(0u64);
    Effect::new(move || {
        if !ready.get() {
            return;
        }
        ctx.reload.track();
        let (prompt, params, opt) = request.get();
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        ctx.load.set(Load::Loading { done: 0, total: 0 });
        ctx.hover.set(Hover::None);
        let ticket = new_ticket();
        let progress = watch_progress(ticket, ctx.load, generation, mine);
        leptos::task::spawn_local(async move {
            let result = {
                // The progress stream lives as long as the request.
                let _progress = progress;
                match opt {
                    Some(spec) => get_optimized_graph(prompt, params, spec, Some(ticket)).await,
                    None => get_graph(prompt, params, Some(ticket)).await,
                }
            };
            if generation.get_value() != mine {
                return;
            }
            match result {
                Ok(g) => {
                    fetched.set(Some(g));
                    ctx.load.set(Load::Idle);
                }
                Err(e) => ctx.load.set(Load::Failed(server_message(&e))),
            }
        });
    });

    // The URL mirrors the view (replacing, not pushing, so Back leaves the page as expected).
    Effect::new(move || {
        let query = view.with(ViewState::to_query);
        if !ready.get() {
            return;
        }
        #[cfg(feature = "hydrate")]
        if let Ok(history) = window().history() {
            let _ = history.replace_state_with_url(
                &wasm_bindgen::JsValue::NULL,
                "",
                Some(&format!("?{query}")),
            );
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = query;
    });

    let _keys = window_event_listener(leptos::ev::keydown, move |ev| on_key(ctx, &ev));

    view! {
        <div class="app"
            on:dragover=|ev: leptos::ev::DragEvent| ev.prevent_default()
            on:drop=move |ev: leptos::ev::DragEvent| import_dropped(ctx, ev)>
            <header class="top">
                <h1>"SPD local attributions"</h1>
                <MetaLine />
            </header>
            <Sidebar />
            <section class="main">
                <Tabs />
                <StatusLine />
                <GraphView />
                <div class="panels">
                    <CircuitPanel />
                    <div class="column">
                        <OptimizePanel />
                        <GroupsPanel />
                        <PinsPanel />
                    </div>
                </div>
                <ComparePanel />
                <ComponentBrowser />
            </section>
        </div>
    }
    .into_any()
}

/// Opens the view of an exported JSON file dropped on the page, and keeps its labels.
fn import_dropped(ctx: Ctx, ev: leptos::ev::DragEvent) {
    ev.prevent_default();
    #[cfg(feature = "hydrate")]
    {
        let Some(file) = ev
            .data_transfer()
            .and_then(|d| d.files())
            .and_then(|f| f.get(0))
        else {
            return;
        };
        leptos::task::spawn_local(async move {
            let text = wasm_bindgen_futures::JsFuture::from(file.text()).await;
            let Some(text) = text.ok().and_then(|t| t.as_string()) else {
                return;
            };
            match crate::export::import(&text) {
                Ok((view, labels)) => {
                    for (key, label) in labels {
                        ctx.label(&key, &label);
                    }
                    for pin in &view.pins {
                        ctx.want_info(pin);
                    }
                    ctx.view.set(view);
                }
                Err(e) => ctx.load.set(Load::Failed(format!("{}: {e}", file.name()))),
            }
        });
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = ctx;
}

/// The message of a server function error, without the framework's prefix.
pub fn server_message(e: &ServerFnError) -> String {
    let s = e.to_string();
    s.split_once(": ")
        .filter(|(head, _)| head.contains("error"))
        .map_or(s.clone(), |(_, rest)| rest.to_owned())
}

fn new_ticket() -> u64 {
    #[cfg(feature = "hydrate")]
    {
        (js_sys::Math::random() * 9.0e15) as u64
    }
    #[cfg(not(feature = "hydrate"))]
    {
        0
    }
}

/// Streams the server's progress for `ticket` into `load` while the request is the current one;
/// dropping the returned guard closes the stream.
#[cfg(feature = "hydrate")]
fn watch_progress(
    ticket: u64,
    load: RwSignal<Load>,
    generation: StoredValue<u64>,
    mine: u64,
) -> Option<ProgressGuard> {
    use wasm_bindgen::prelude::*;
    let source = web_sys::EventSource::new(&format!("/api/progress/{ticket}")).ok()?;
    let on_message =
        Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |ev: web_sys::MessageEvent| {
            if generation.get_value() != mine {
                return;
            }
            let Some(text) = ev.data().as_string() else {
                return;
            };
            #[derive(serde::Deserialize)]
            struct Status {
                state: String,
                #[serde(default)]
                done: usize,
                #[serde(default)]
                total: usize,
            }
            if let Ok(s) = serde_json::from_str::<Status>(&text)
                && s.state == "running"
                && matches!(load.get_untracked(), Load::Loading { .. })
            {
                load.set(Load::Loading {
                    done: s.done,
                    total: s.total,
                });
            }
        });
    source.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    // The stream ends by itself; do not let the browser reconnect to a finished ticket.
    let on_error = Closure::<dyn FnMut()>::new({
        let source = source.clone();
        move || source.close()
    });
    source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    Some(ProgressGuard {
        source,
        _on_message: on_message,
        _on_error: on_error,
    })
}

/// The stream and the callbacks it calls, which must live as long as it does.
#[cfg(feature = "hydrate")]
pub struct ProgressGuard {
    source: web_sys::EventSource,
    _on_message: wasm_bindgen::closure::Closure<dyn FnMut(web_sys::MessageEvent)>,
    _on_error: wasm_bindgen::closure::Closure<dyn FnMut()>,
}

#[cfg(feature = "hydrate")]
impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.source.close();
    }
}

#[cfg(not(feature = "hydrate"))]
pub struct ProgressGuard;

#[cfg(not(feature = "hydrate"))]
fn watch_progress(_: u64, _: RwSignal<Load>, _: StoredValue<u64>, _: u64) -> Option<ProgressGuard> {
    None
}

fn on_key(ctx: Ctx, ev: &leptos::ev::KeyboardEvent) {
    let typing = ev
        .target()
        .and_then(|t| {
            use leptos::wasm_bindgen::JsCast;
            t.dyn_into::<leptos::web_sys::Element>().ok()
        })
        .is_some_and(|el| matches!(el.tag_name().as_str(), "INPUT" | "TEXTAREA" | "SELECT"));
    match ev.key().as_str() {
        "Escape" if ctx.labelling.get_untracked() => ctx.labelling.set(false),
        "l" if !typing && matches!(ctx.hover.get_untracked(), Hover::Node(_)) => {
            ev.prevent_default();
            ctx.labelling.set(true);
        }
        "Escape" => {
            ctx.hover.set(Hover::None);
            ctx.view.update(|v| {
                v.pins.clear();
                v.selected.clear();
            });
        }
        "/" if !typing => {
            ev.prevent_default();
            if let Some(input) = ctx.search_box.get_untracked() {
                let _ = input.focus();
            }
        }
        "f" if !typing => ctx.view.update(|v| v.set_viewport(Default::default())),
        "i" if !typing => ctx.intervene.update(|n| *n += 1),
        "g" if !typing => ctx.group_selected(),
        _ => {}
    }
}

#[component]
fn MetaLine() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    move || {
        ctx.meta.with(|m| match m {
            None => String::new(),
            Some(m) => format!(
                "{} · {} · {} blocks · CI {} · {} prompts · database {}",
                m.run_name,
                m.family,
                m.n_blocks,
                m.ci_kind,
                m.prompt_count,
                human_bytes(m.db_bytes)
            ),
        })
    }
}

/// What a trace follows, in words: "the last position", "\" Mia\" at 7", "\" Mia\" − \" Leo\" at 7".
pub fn describe_target(g: &GraphData, target: crate::types::TraceTarget) -> String {
    use crate::types::TraceTarget;
    let token = |pos: u32, id: u32| {
        let key = format!("output:{pos}:{id}");
        g.outputs
            .iter()
            .find(|o| o.key == key)
            .map_or(format!("#{id}"), |o| format!("{:?}", o.token))
    };
    match target {
        TraceTarget::Last => "the last position".into(),
        TraceTarget::Token { pos, token: t } => format!("{} at {pos}", token(pos, t)),
        TraceTarget::Diff { pos, a, b } => {
            format!("{} − {} at {pos}", token(pos, a), token(pos, b))
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

/// "Standard" and, once an optimisation was asked for, "Optimized".
#[component]
fn Tabs() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let has_opt = move || ctx.view.with(|v| v.opt.is_some());
    let showing = move || ctx.view.with(|v| v.show_opt);
    view! {
        <Show when=has_opt>
            <div class="tabs" role="tablist">
                <button id="tab-standard" role="tab" class:active=move || !showing()
                    on:click=move |_| ctx.view.update(|v| v.show_opt = false)>"Standard"</button>
                <button id="tab-optimized" role="tab" class:active=showing
                    on:click=move |_| ctx.view.update(|v| v.show_opt = true)>"Optimized"</button>
            </div>
        </Show>
    }
    .into_any()
}

#[component]
fn StatusLine() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let summary =
        move || {
            let shown = ctx.scene.with(|s| s.as_ref().map_or(0, |s| s.edges.len()));
            ctx.graph.with(|g| {
                g.as_ref().map(|g| {
                let what = match g.prompt_id {
                    Some(id) => format!("Prompt {id}"),
                    None => "Custom prompt".to_owned(),
                };
                let capped = if g.total_edges > g.edges.len() {
                    format!(" (capped at {} of {})", g.edges.len(), g.total_edges)
                } else {
                    String::new()
                };
                let normalized = match g.params.normalize {
                    crate::types::Normalize::None => String::new(),
                    n => format!(", {} normalized", n.name()),
                };
                let optimized = g.optimization.as_ref().map_or(String::new(), |o| {
                    let pct = |p: f32| format!("{:.1}%", 100.0 * p);
                    let mut prob = o.ci_masked_label_prob.map_or(String::new(), |p| {
                        format!(": label {} under the CI mask", pct(p))
                    });
                    if let Some(p) = o.stoch_masked_label_prob {
                        prob.push_str(&format!(", {} stochastic", pct(p)));
                    }
                    if let Some(p) = o.adv_pgd_label_prob {
                        prob.push_str(&format!(", {} adversarial", pct(p)));
                    }
                    format!(
                        " · optimized for {:?} at position {}{prob}, L0 {:.1} (was {:.1})",
                        o.label_str, o.spec.position, o.l0_total, o.l0_before
                    )
                });
                let semantics = g.params.semantics.name();
                if let (Some(c), Some(target)) = (completeness(g), g.params.trace) {
                    let all = ctx.fetched.with(|f| f.as_ref().map_or(0, |f| f.nodes.len()));
                    return format!(
                        "{what}: {} tokens, {} nodes (of {all}), {shown} edges (of {}) · trace of \
                         {}, completeness {:.1}% · {semantics} semantics{normalized}{optimized}",
                        g.tokens.len(),
                        g.nodes.len(),
                        g.total_edges,
                        describe_target(g, target),
                        100.0 * c,
                    );
                }
                format!(
                    "{what}: {} tokens, {} nodes, {shown} of {} edges shown{capped} · \
                     {semantics} semantics{normalized}{optimized}",
                    g.tokens.len(),
                    g.nodes.len(),
                    g.edges.len(),
                )
            })
            })
        };
    view! {
        <div class="status-bar">
            <p class="status">{summary}</p>
            {move || match ctx.load.get() {
                Load::Idle => None,
                Load::Loading { done, total } => Some(view! {
                    <p class="loading">
                        "Computing the graph… "
                        <progress max=total.max(1) value=done></progress>
                    </p>
                }.into_any()),
                Load::Failed(msg) => Some(view! {
                    <p class="error" role="alert">
                        <span class="error-text">{msg}</span>
                        " "
                        <button class="retry" on:click=move |_| ctx.reload.update(|n| *n += 1)>
                            "Retry"
                        </button>
                    </p>
                }.into_any()),
            }}
        </div>
    }
    .into_any()
}
