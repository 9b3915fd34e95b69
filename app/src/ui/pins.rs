//! Pinned components (they persist across prompts) and the search for prompts where they fire.

use leptos::prelude::*;

use super::card::info_view;
use super::page::{Ctx, server_message};
use super::pinned_view::PinnedGraph;
use crate::api::search_components;
use crate::types::{PromptRef, SearchResults};

const RESULTS: usize = 50;

#[component]
pub fn PinsPanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let results: RwSignal<Option<Result<SearchResults, String>>> = RwSignal::new(None);
    let search = move |all: bool| {
        let keys = ctx.view.with_untracked(|v| v.pins.clone());
        if keys.is_empty() {
            return;
        }
        leptos::task::spawn_local(async move {
            let r = search_components(keys, all, RESULTS).await;
            results.set(Some(r.map_err(|e| server_message(&e))));
        });
    };
    let pins = move || ctx.view.with(|v| v.pins.clone());
    view! {
        <section class="panel pins">
            <h2>"Pinned components"</h2>
            <Show
                when=move || !pins().is_empty()
                fallback=|| view! { <p class="muted">"Click a node to pin its component."</p> }
            >
                <PinnedGraph />
                <ul class="pin-list">
                    <For each=pins key=|k| k.clone() let:key>
                        <li class="pin" data-key=key.clone()>
                            <span class="mono">{key.clone()}</span>
                            " "
                            <button class="unpin" on:click={
                                let key = key.clone();
                                move |_| ctx.toggle_pin(&key)
                            }>"Unpin"</button>
                            <input class="label-input" type="text" placeholder="label (Enter keeps it)"
                                prop:value={
                                    let key = key.clone();
                                    move || ctx.labels.with(|m| m.get(&key).cloned().unwrap_or_default())
                                }
                                on:change={
                                    let key = key.clone();
                                    move |ev| ctx.label(&key, &event_target_value(&ev))
                                }
                            />
                            {
                                let key = key.clone();
                                move || ctx.infos.with(|m| m.get(&key).cloned()).map(info_view)
                            }
                        </li>
                    </For>
                </ul>
                <div class="buttons">
                    <button id="clear-pins" on:click=move |_| ctx.view.update(|v| v.pins.clear())>"Clear all"</button>
                    <button id="find-all" on:click=move |_| search(true)>"Find prompts with all"</button>
                    <button id="find-any" on:click=move |_| search(false)>"…with any"</button>
                </div>
            </Show>
            {move || results.get().map(|r| match r {
                Err(e) => view! { <p class="error">{e}</p> }.into_any(),
                Ok(found) => view! {
                    <p class="muted search-count">{format!("{} matching prompts", found.total)}</p>
                    <ul class="results">
                        {found.hits.into_iter().map(|h| {
                            let id = h.prompt.id;
                            let labels = ctx.labels.get_untracked();
                            let where_ = h.matches.iter()
                                .map(|m| match labels.get(&m.key) {
                                    Some(l) => format!("{} ({l}) @ {:?}", m.key, m.positions),
                                    None => format!("{} @ {:?}", m.key, m.positions),
                                })
                                .collect::<Vec<_>>()
                                .join("; ");
                            view! {
                                <li class="result" data-id=id
                                    on:click=move |_| ctx.view.update(|v| v.prompt = PromptRef::Stored(id))>
                                    <span class="pid">{id}</span>" "
                                    <span class="ptext">{h.prompt.text.clone()}</span>
                                    <div class="muted mono">{where_}</div>
                                </li>
                            }
                        }).collect_view()}
                    </ul>
                }.into_any(),
            })}
        </section>
    }
    .into_any()
}
