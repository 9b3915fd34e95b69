//! Leptos components, the typed structs shared by server and browser, and server-function declarations.

pub mod api;
pub mod canvas;
pub mod types;

use api::get_graph;
use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::{
    StaticSegment,
    components::{Route, Router, Routes},
};
use types::GraphData;

/// The HTML document around the app, rendered on the server only.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
                <AutoReload options=options.clone() />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="leptos" href="/pkg/spd-explorer.css" />
        <Title text="SPD local attributions" />
        <Router>
            <main>
                <Routes fallback=|| "Page not found.".into_view()>
                    <Route path=StaticSegment("") view=GraphPage />
                </Routes>
            </main>
        </Router>
    }
}

/// One prompt's attribution graph: a status line and the canvas.
#[component]
fn GraphPage() -> impl IntoView {
    let graph = Resource::new(|| 0u32, get_graph);
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    // The backing store is sized in device pixels, so redraw when the window changes size.
    let resized = RwSignal::new(0u32);
    let _ = window_event_listener(leptos::ev::resize, move |_| resized.update(|n| *n += 1));

    // Effects run only in the browser, after hydration: the flag tells tests the wasm is live.
    Effect::new(move || {
        #[cfg(feature = "hydrate")]
        if let Some(body) = document().body() {
            let _ = body.set_attribute("data-hydrated", "true");
        }
    });

    Effect::new(move || {
        resized.track();
        let (Some(Ok(data)), Some(el)) = (graph.get(), canvas.get()) else {
            return;
        };
        draw_graph(&el, &data);
    });

    view! {
        <h1>"SPD local attributions"</h1>
        <p class="status">
            <Suspense fallback=|| "Loading graph…">
                {move || Suspend::new(async move { status_line(&graph.await) })}
            </Suspense>
        </p>
        <canvas class="graph" node_ref=canvas></canvas>
    }
}

fn status_line(graph: &Result<GraphData, ServerFnError>) -> String {
    match graph {
        Ok(g) => format!(
            "Prompt {}: {} tokens, {} nodes, {} edges",
            g.prompt_id,
            g.tokens.len(),
            g.nodes.len(),
            g.edges.len()
        ),
        Err(e) => format!("Could not load the graph: {e}"),
    }
}

#[cfg(feature = "hydrate")]
fn draw_graph(el: &web_sys::HtmlCanvasElement, data: &GraphData) {
    use canvas::{draw, layout};
    let Some((ctx, width)) = draw::fit_canvas(el, layout::height_for(data.n_blocks)) else {
        leptos::logging::error!("the graph canvas has no 2D context");
        return;
    };
    let drawn = draw::draw(&ctx, data, &layout::Layout::new(data, width));
    let _ = el.set_attribute("data-drawn", &drawn.to_string());
}

#[cfg(not(feature = "hydrate"))]
fn draw_graph<T>(_el: &T, _data: &GraphData) {}
