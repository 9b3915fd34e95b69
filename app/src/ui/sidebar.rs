//! The left column: prompt picker (paged, searchable), custom prompt, graph controls, export.

use leptos::prelude::*;

use super::page::{Ctx, server_message};
use crate::api::list_prompts;
use crate::canvas::layout::LayoutMode;
use crate::types::{Normalize, PromptRef, PromptSummary, Semantics};

const PAGE: usize = 50;

#[component]
pub fn Sidebar() -> AnyView {
    view! {
        <aside class="sidebar">
            <PromptPicker />
            <CustomPrompt />
            <super::trace_panel::TracePanel />
            <Controls />
        </aside>
    }
    .into_any()
}

#[component]
fn PromptPicker() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let query = RwSignal::new(String::new());
    let prompts: RwSignal<Vec<PromptSummary>> = RwSignal::new(vec![]);
    let next: RwSignal<Option<i64>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let generation = StoredValue::new(0u64);
    // A new query replaces the list; "more" appends the next page.
    let fetch = move |append: bool| {
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        let q = query.get_untracked();
        let after = if append { next.get_untracked() } else { None };
        leptos::task::spawn_local(async move {
            let page = list_prompts(q, after, PAGE).await;
            if generation.get_value() != mine {
                return;
            }
            match page {
                Ok(p) => {
                    error.set(None);
                    next.set(p.next_after);
                    if append {
                        prompts.update(|v| v.extend(p.prompts));
                    } else {
                        prompts.set(p.prompts);
                    }
                }
                Err(e) => error.set(Some(server_message(&e))),
            }
        });
    };
    Effect::new(move || {
        query.track();
        fetch(false);
    });
    let current = move || ctx.view.with(|v| v.prompt.clone());
    view! {
        <section class="panel picker">
            <h2>"Prompts"</h2>
            <input
                id="prompt-search"
                type="search"
                placeholder="Search prompt text ( / )"
                node_ref=ctx.search_box
                prop:value=move || query.get()
                on:input=move |ev| query.set(event_target_value(&ev))
            />
            {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
            <ul class="prompt-list">
                <For each=move || prompts.get() key=|p| p.id let:p>
                    <li
                        class="prompt-item"
                        class:selected=move || current() == PromptRef::Stored(p.id)
                        data-id=p.id
                        on:click=move |_| ctx.view.update(|v| v.prompt = PromptRef::Stored(p.id))
                    >
                        <span class="pid">{p.id}</span>
                        " "
                        <span class="ptext">{p.text.clone()}</span>
                    </li>
                </For>
            </ul>
            <Show when=move || next.get().is_some()>
                <button class="more" on:click=move |_| fetch(true)>"More"</button>
            </Show>
        </section>
    }
    .into_any()
}

#[component]
fn CustomPrompt() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let text = RwSignal::new(String::new());
    // Show the current custom text when the view comes from a URL.
    Effect::new(move || {
        if let PromptRef::Text(t) = ctx.view.with(|v| v.prompt.clone()) {
            text.set(t);
        }
    });
    let submit = move || {
        let t = text.get_untracked();
        if !t.trim().is_empty() {
            ctx.view.update(|v| v.prompt = PromptRef::Text(t));
        }
    };
    view! {
        <section class="panel custom">
            <h2>"Custom prompt"</h2>
            <textarea
                id="custom-text"
                rows="3"
                placeholder="Type a prompt…"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
            ></textarea>
            <button id="custom-go" on:click=move |_| submit()>"Graph this text"</button>
        </section>
    }
    .into_any()
}

/// A select bound to one field of the view, with an option per value of `all`.
#[allow(clippy::too_many_arguments)]
fn choice<T: Copy + Send + Sync + 'static>(
    id: &'static str,
    label: &'static str,
    all: &'static [T],
    name: fn(T) -> &'static str,
    from_name: fn(&str) -> Option<T>,
    get: fn(&crate::state::ViewState) -> T,
    set: fn(&mut crate::state::ViewState, T),
) -> impl IntoView {
    let v = expect_context::<Ctx>().view;
    view! {
        <label class="control">
            <span>{label}</span>
            <select
                id=id
                prop:value=move || name(v.with(get))
                on:change=move |ev| {
                    if let Some(x) = from_name(&event_target_value(&ev)) {
                        v.update(|s| set(s, x));
                    }
                }
            >
                {all
                    .iter()
                    .map(|&x| view! { <option value=name(x)>{name(x)}</option> })
                    .collect_view()}
            </select>
        </label>
    }
}

#[component]
fn Controls() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let v = ctx.view;
    // A number input bound to one field of the view; out-of-range input is ignored.
    let number = move |id: &'static str,
                       label: &'static str,
                       step: &'static str,
                       get: fn(&crate::state::ViewState) -> f64,
                       set: fn(&mut crate::state::ViewState, f64),
                       ok: fn(f64) -> bool| {
        view! {
            <label class="control">
                <span>{label}</span>
                <input
                    id=id
                    type="number"
                    step=step
                    // Through f32, so 0.1 shows as 0.1 and not 0.10000000149.
                    prop:value=move || (v.with(get) as f32).to_string()
                    on:change=move |ev| {
                        if let Ok(x) = event_target_value(&ev).parse::<f64>()
                            && ok(x)
                        {
                            v.update(|s| set(s, x));
                        }
                    }
                />
            </label>
        }
    };
    view! {
        <section class="panel controls">
            <h2>"Graph"</h2>
            {number("top-k", "Top-k edges", "100", |s| s.top_k as f64, |s, x| s.top_k = x as usize, |x| x >= 1.0)}
            {number("ci-threshold", "CI threshold", "0.01", |s| f64::from(s.params.ci_threshold), |s, x| s.params.ci_threshold = x as f32, |x| x >= 0.0)}
            {number("out-threshold", "Output prob. threshold", "0.01", |s| f64::from(s.params.output_prob_threshold), |s, x| s.params.output_prob_threshold = x as f32, |x| (0.0..=1.0).contains(&x))}
            {number("max-mean-ci", "Max mean CI", "0.05", |s| f64::from(s.params.max_mean_ci), |s, x| s.params.max_mean_ci = x as f32, |x| (0.0..=1.0).contains(&x))}
            {choice("semantics", "Semantics", &Semantics::ALL, Semantics::name, Semantics::from_name, |s| s.params.semantics, |s, x| s.params.semantics = x)}
            {choice("normalize", "Normalize incoming edges", &Normalize::ALL, Normalize::name, Normalize::from_name, |s| s.params.normalize, |s, x| s.params.normalize = x)}
            {choice("layout", "Layout", &LayoutMode::ALL, LayoutMode::name, LayoutMode::from_name, |s| s.layout, |s, x| s.layout = x)}
            <div class="buttons">
                <button id="fit" on:click=move |_| v.update(|s| s.set_viewport(Default::default()))>"Fit (f)"</button>
                <button id="export-json" on:click=move |_| export_json(ctx)>"Export JSON"</button>
                <button id="export-png" on:click=move |_| export_png()>"Export PNG"</button>
            </div>
        </section>
    }
    .into_any()
}

fn export_json(ctx: Ctx) {
    #[cfg(feature = "hydrate")]
    ctx.graph.with_untracked(|g| {
        let Some(g) = g else { return };
        let json = ctx.view.with_untracked(|v| {
            ctx.labels
                .with_untracked(|labels| crate::export::export(g, v, labels))
        });
        let name = match g.prompt_id {
            Some(id) => format!("graph-prompt-{id}.json"),
            None => "graph-custom.json".to_owned(),
        };
        let parts = js_sys::Array::of1(&wasm_bindgen::JsValue::from_str(&json));
        let opts = web_sys::BlobPropertyBag::new();
        opts.set_type("application/json");
        if let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts)
            && let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob)
        {
            download(&url, &name);
            let _ = web_sys::Url::revoke_object_url(&url);
        }
    });
    #[cfg(not(feature = "hydrate"))]
    let _ = ctx;
}

fn export_png() {
    #[cfg(feature = "hydrate")]
    {
        use wasm_bindgen::JsCast;
        if let Some(canvas) = document()
            .query_selector("canvas.graph")
            .ok()
            .flatten()
            .and_then(|e| e.dyn_into::<web_sys::HtmlCanvasElement>().ok())
            && let Ok(url) = canvas.to_data_url()
        {
            download(&url, "graph.png");
        }
    }
}

#[cfg(feature = "hydrate")]
fn download(url: &str, name: &str) {
    use wasm_bindgen::JsCast;
    if let Ok(a) = document().create_element("a")
        && let Ok(a) = a.dyn_into::<web_sys::HtmlAnchorElement>()
    {
        a.set_href(url);
        a.set_download(name);
        a.click();
    }
}
