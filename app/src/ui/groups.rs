//! The supernodes of the view: group the selection (key `g`), name a group, open or collapse it,
//! ungroup. They live in the view, so the URL keeps them.

use leptos::prelude::*;

use super::page::Ctx;

#[component]
pub fn GroupsPanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let groups = move || ctx.view.with(|v| v.groups.clone());
    let n_selected = move || ctx.view.with(|v| v.selected.len());
    let edit = move |i: usize, f: &dyn Fn(&mut crate::supernode::Group)| {
        ctx.view.update(|v| {
            if let Some(g) = v.groups.get_mut(i) {
                f(g);
            }
        })
    };
    view! {
        <section class="panel groups" id="groups">
            <h2>"Supernodes"</h2>
            <p class="muted">
                "Shift-click or shift-drag to select nodes, then "
                <button id="group-selection" disabled=move || n_selected() == 0
                    on:click=move |_| ctx.group_selected()>
                    {move || format!("group the {} selected (g)", n_selected())}
                </button>
            </p>
            <ul class="group-list">
                {move || groups().into_iter().enumerate().map(|(i, g)| {
                    let n = g.members.len();
                    view! {
                        <li class="group" data-index=i>
                            <input class="group-label" type="text" prop:value=g.label.clone()
                                on:change=move |ev| {
                                    let label = event_target_value(&ev).trim().to_owned();
                                    edit(i, &|g| g.label = label.clone());
                                } />
                            " "<span class="muted">{format!("{n} nodes")}</span>" "
                            <button class="group-toggle" on:click=move |_| edit(i, &|g| g.open = !g.open)>
                                {if g.open { "Collapse" } else { "Open" }}
                            </button>
                            <button class="ungroup" on:click=move |_| ctx.view.update(|v| {
                                if i < v.groups.len() {
                                    v.groups.remove(i);
                                }
                            })>"Ungroup"</button>
                        </li>
                    }
                }).collect_view()}
            </ul>
        </section>
    }
    .into_any()
}
