//! Testing a circuit: run the model with the selected nodes kept, ablated or scaled (on the prompt,
//! or a fork of it with tokens swapped), see each position's top tokens beside the target's, and
//! keep the runs of the prompt (the server stores them in its notes file); and CI optimised for a
//! prediction, shown as the "Optimized" tab.

use leptos::prelude::*;

use super::page::{Ctx, server_message};
use crate::api::{delete_intervention, list_interventions, run_intervention, search_vocab};
use crate::types::{
    InterventionMode, InterventionParams, InterventionRun, OptimLoss, OptimMask, OptimizeSpec,
    PromptRef, VocabEntry,
};

const TOP_K: usize = 5;

/// Keeps `hits` the vocabulary entries matching `query` as it is typed (the latest query wins).
fn vocab_search(query: RwSignal<String>, hits: RwSignal<Vec<VocabEntry>>) {
    Effect::new(move || {
        let q = query.get();
        if q.trim().is_empty() {
            hits.set(vec![]);
            return;
        }
        leptos::task::spawn_local(async move {
            if let Ok(found) = search_vocab(q.clone(), 12).await
                && query.get_untracked() == q
            {
                hits.set(found);
            }
        });
    });
}

#[component]
pub fn CircuitPanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let mode = RwSignal::new(InterventionMode::Keep);
    let factor = RwSignal::new(2.0f32);
    let runs: RwSignal<Vec<InterventionRun>> = RwSignal::new(vec![]);
    let shown: RwSignal<Option<usize>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let busy = RwSignal::new(false);
    // The fork being built: swaps (position, token id, token string).
    let swaps: RwSignal<Vec<(usize, u32, String)>> = RwSignal::new(vec![]);
    let fork_pos = RwSignal::new(0usize);
    let vocab_query = RwSignal::new(String::new());
    let vocab_hits: RwSignal<Vec<VocabEntry>> = RwSignal::new(vec![]);

    let prompt = Memo::new(move |_| ctx.view.with(|v| v.prompt.clone()));
    // The history follows the prompt.
    Effect::new(move || {
        let p = prompt.get();
        shown.set(None);
        swaps.set(vec![]);
        leptos::task::spawn_local(async move {
            match list_interventions(p.clone()).await {
                Ok(list) if prompt.get_untracked() == p => {
                    let last = list.len().checked_sub(1);
                    runs.set(list);
                    shown.set(last);
                }
                Ok(_) => {}
                Err(e) => error.set(Some(server_message(&e))),
            }
        });
    });
    vocab_search(vocab_query, vocab_hits);

    let run = move |fork: bool| {
        let nodes = ctx.view.with_untracked(|v| v.selected.clone());
        let params = InterventionParams {
            prompt: prompt.get_untracked(),
            nodes,
            mode: mode.get_untracked(),
            factor: factor.get_untracked(),
            top_k: TOP_K,
            replacements: if fork {
                swaps.with_untracked(|s| s.iter().map(|(p, t, _)| (*p, *t)).collect())
            } else {
                vec![]
            },
            semantics: ctx.view.with_untracked(|v| v.params.semantics),
        };
        busy.set(true);
        error.set(None);
        leptos::task::spawn_local(async move {
            let result = run_intervention(params).await;
            busy.set(false);
            match result {
                Ok(r) => {
                    runs.update(|v| v.push(r));
                    shown.set(Some(runs.with_untracked(Vec::len) - 1));
                }
                Err(e) => error.set(Some(server_message(&e))),
            }
        });
    };
    // `i` on the page runs the panel as it is set.
    Effect::new(move |seen: Option<u32>| {
        let n = ctx.intervene.get();
        if seen.is_some_and(|s| s != n) && !busy.get_untracked() {
            run(false);
        }
        n
    });
    let remove = move |i: usize| {
        let Some(id) = runs.with_untracked(|v| v.get(i).and_then(|r| r.id)) else {
            runs.update(|v| {
                v.remove(i);
            });
            shown.set(None);
            return;
        };
        leptos::task::spawn_local(async move {
            match delete_intervention(id).await {
                Ok(()) => {
                    runs.update(|v| v.retain(|r| r.id != Some(id)));
                    shown.set(runs.with_untracked(|v| v.len().checked_sub(1)));
                }
                Err(e) => error.set(Some(server_message(&e))),
            }
        });
    };

    let n_selected = move || ctx.view.with(|v| v.selected.len());
    let tokens = move || {
        ctx.graph
            .with(|g| g.as_ref().map(|g| g.tokens.clone()).unwrap_or_default())
    };
    view! {
        <section class="panel circuit">
            <h2>"Intervene"</h2>
            <p class="muted">
                <span id="selected-count">{move || format!("{} nodes selected", n_selected())}</span>
                " · shift-click a node or shift-drag a box to select; i runs"
            </p>
            <div class="buttons">
                <button id="select-drawn" on:click=move |_| ctx.select_drawn()>"Select all drawn"</button>
                <button id="clear-selection" on:click=move |_| ctx.view.update(|v| v.selected.clear())>
                    "Clear selection"
                </button>
            </div>
            <label>
                "Mode "
                <select id="iv-mode" on:change=move |ev| {
                    if let Some(m) = InterventionMode::from_name(&event_target_value(&ev)) {
                        mode.set(m);
                    }
                }>
                    {InterventionMode::ALL.into_iter().map(|m| view! {
                        <option value=m.name() selected=move || mode.get() == m>{m.name()}</option>
                    }).collect_view()}
                </select>
            </label>
            <Show when=move || mode.get() == InterventionMode::Scale>
                <label>
                    " factor "
                    <input id="iv-factor" type="number" step="0.1"
                        prop:value=move || factor.get().to_string()
                        on:change=move |ev| {
                            if let Ok(f) = event_target_value(&ev).parse::<f32>() {
                                factor.set(f);
                            }
                        } />
                </label>
            </Show>
            <div class="buttons">
                <button id="iv-run" disabled=move || busy.get() on:click=move |_| run(false)>
                    {move || if busy.get() { "Running…" } else { "Run" }}
                </button>
            </div>
            <details class="fork">
                <summary>"Fork: swap tokens"</summary>
                <label>
                    "Position "
                    <select id="fork-pos" on:change=move |ev| {
                        if let Ok(p) = event_target_value(&ev).parse() {
                            fork_pos.set(p);
                        }
                    }>
                        {move || tokens().into_iter().enumerate().map(|(i, t)| view! {
                            <option value=i.to_string()>{format!("{i}: {t:?}")}</option>
                        }).collect_view()}
                    </select>
                </label>
                <input id="fork-token" type="search" placeholder="Search the vocabulary"
                    prop:value=move || vocab_query.get()
                    on:input=move |ev| vocab_query.set(event_target_value(&ev)) />
                <ul class="vocab-hits">
                    {move || vocab_hits.get().into_iter().map(|h| {
                        let label = format!("{:?} #{}", h.token, h.id);
                        view! {
                            <li class="vocab-hit" data-id=h.id on:click=move |_| {
                                let p = fork_pos.get_untracked();
                                swaps.update(|s| {
                                    s.retain(|(q, _, _)| *q != p);
                                    s.push((p, h.id, h.token.clone()));
                                });
                                vocab_query.set(String::new());
                            }>{label}</li>
                        }
                    }).collect_view()}
                </ul>
                <ul class="swaps">
                    {move || swaps.get().into_iter().map(|(p, id, t)| view! {
                        <li class="swap">
                            {format!("position {p} → {t:?} (#{id}) ")}
                            <button on:click=move |_| swaps.update(|s| s.retain(|(q, _, _)| *q != p))>"×"</button>
                        </li>
                    }).collect_view()}
                </ul>
                <button id="fork-run" disabled=move || busy.get() || swaps.with(Vec::is_empty)
                    on:click=move |_| run(true)>"Run on the fork"</button>
            </details>
            {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            <ol class="iv-runs">
                {move || runs.get().into_iter().enumerate().map(|(i, r)| {
                    let forked = if r.params.replacements.is_empty() {
                        String::new()
                    } else {
                        format!(" · fork of {} token(s)", r.params.replacements.len())
                    };
                    let label = format!(
                        "{} {} node(s){forked}",
                        r.params.mode.name(),
                        r.params.nodes.len()
                    );
                    view! {
                        <li class="iv-run" class:current=move || shown.get() == Some(i)>
                            <span class="iv-run-label" on:click=move |_| shown.set(Some(i))>{label}</span>
                            " "
                            <button class="iv-delete" on:click=move |_| remove(i)>"Delete"</button>
                        </li>
                    }
                }).collect_view()}
            </ol>
            {move || shown.get().and_then(|i| runs.with(|v| v.get(i).cloned())).map(run_table)}
        </section>
    }
    .into_any()
}

/// A run's table: per position the input token, the intervened top tokens with their
/// probabilities beside the target's and the CI-masked model's, the target's own top token and
/// the KL; positions whose most probable token changed are marked.
fn run_table(r: InterventionRun) -> AnyView {
    let changed = r.changed_argmax();
    let pct = |p: f32| format!("{:.1}%", 100.0 * p);
    let rows = r
        .rows
        .iter()
        .enumerate()
        .map(|(s, row)| {
            let top = row
                .iter()
                .map(|p| {
                    view! {
                        <div class="pred">
                            <span class="tok">{format!("{:?}", p.token)}</span>
                            " "<span class="p-iv">{pct(p.prob)}</span>
                            " "<span class="p-target muted">{format!("target {}", pct(p.target_prob))}</span>
                            " "<span class="p-ci muted">{format!("CI {}", pct(p.ci_masked_prob))}</span>
                        </div>
                    }
                })
                .collect_view();
            let target = r.target_top.get(s).map_or(String::new(), |t| {
                format!("{:?} {}", t.token, pct(t.prob))
            });
            view! {
                <tr class:changed=changed.get(s).copied().unwrap_or(false)>
                    <td class="mono">{s}</td>
                    <td class="tok">{format!("{:?}", r.tokens.get(s).cloned().unwrap_or_default())}</td>
                    <td>{top}</td>
                    <td class="tok">{target}</td>
                    <td class="mono">{format!("{:.3}", r.kl.get(s).copied().unwrap_or(0.0))}</td>
                </tr>
            }
        })
        .collect_view();
    let prompt = match &r.params.prompt {
        PromptRef::Stored(id) => format!("prompt {id}"),
        PromptRef::Text(_) => "typed text".to_owned(),
    };
    view! {
        <div class="iv-table-wrap">
        <table class="iv-table">
            <caption>{format!(
                "{} of {} node(s) on {prompt}: intervened top {} beside the target's",
                r.params.mode.name(),
                r.params.nodes.len(),
                r.rows.first().map_or(0, Vec::len),
            )}</caption>
            <thead>
                <tr><th>"pos"</th><th>"input"</th><th>"intervened"</th><th>"target top"</th><th>"KL"</th></tr>
            </thead>
            <tbody>{rows}</tbody>
        </table>
        </div>
    }
    .into_any()
}

/// The "Optimize" form: CI re-optimised so that a label stays predicted at a position with as
/// few components as the sparsity coefficient allows; the result opens as the "Optimized" tab.
#[component]
pub fn OptimizePanel() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let defaults = OptimizeSpec::default();
    let loss = RwSignal::new(defaults.loss);
    let label: RwSignal<Option<(u32, String)>> = RwSignal::new(None);
    let position: RwSignal<Option<usize>> = RwSignal::new(None);
    // log10 of the sparsity coefficient.
    let log_coeff = RwSignal::new(defaults.imp_min_coeff.log10());
    let steps = RwSignal::new(defaults.steps);
    let pnorm = RwSignal::new(defaults.pnorm);
    let beta = RwSignal::new(defaults.beta);
    let mask = RwSignal::new(defaults.mask);
    let pgd_steps = RwSignal::new(0usize);
    let pgd_size = RwSignal::new(defaults.pgd_step_size);
    let query = RwSignal::new(String::new());
    let hits: RwSignal<Vec<VocabEntry>> = RwSignal::new(vec![]);
    let error: RwSignal<Option<String>> = RwSignal::new(None);

    // A prompt change forgets the optimisation (its position and label were this prompt's).
    let previous = StoredValue::new(None::<PromptRef>);
    Effect::new(move || {
        let p = ctx.view.with(|v| v.prompt.clone());
        if previous.get_value().is_some_and(|q| q != p) {
            ctx.view.update(|v| {
                v.opt = None;
                v.show_opt = false;
            });
            position.set(None);
            label.set(None);
        }
        previous.set_value(Some(p));
    });
    // The form shows the view's optimisation (from the URL, or the one just asked for).
    let current = Memo::new(move |_| ctx.view.with(|v| v.opt));
    Effect::new(move || {
        if let Some(o) = current.get() {
            loss.set(o.loss);
            position.set(Some(o.position));
            log_coeff.set(o.imp_min_coeff.log10());
            steps.set(o.steps);
            pnorm.set(o.pnorm);
            beta.set(o.beta);
            mask.set(o.mask);
            pgd_steps.set(o.pgd_steps);
            pgd_size.set(o.pgd_step_size);
            if label.get_untracked().is_none_or(|(id, _)| id != o.label) {
                label.set(Some((o.label, format!("#{}", o.label))));
            }
        }
    });
    vocab_search(query, hits);
    let tokens = move || {
        ctx.graph.with(|g| {
            g.as_ref()
                .filter(|g| g.optimization.is_none())
                .map(|g| g.tokens.clone())
                .unwrap_or_default()
        })
    };
    let last = move || tokens().len().saturating_sub(1);
    let optimize = move |_| {
        let n = tokens().len();
        if n == 0 {
            return;
        }
        let pos = position.get_untracked().unwrap_or(n - 1).min(n - 1);
        let spec = OptimizeSpec {
            loss: loss.get_untracked(),
            label: label.get_untracked().map_or(0, |(id, _)| id),
            position: pos,
            imp_min_coeff: 10f32.powf(log_coeff.get_untracked()),
            steps: steps.get_untracked(),
            pnorm: pnorm.get_untracked(),
            beta: beta.get_untracked(),
            mask: mask.get_untracked(),
            pgd_steps: pgd_steps.get_untracked(),
            pgd_step_size: pgd_size.get_untracked(),
        };
        if spec.loss == OptimLoss::Ce && label.get_untracked().is_none() {
            error.set(Some("choose the label token".into()));
            return;
        }
        error.set(None);
        ctx.view.update(|v| {
            v.opt = Some(spec);
            v.show_opt = true;
        });
    };
    let number = |sig: RwSignal<f32>| {
        move |ev: leptos::ev::Event| {
            if let Ok(x) = event_target_value(&ev).parse::<f32>() {
                sig.set(x);
            }
        }
    };
    view! {
        <section class="panel optimize">
            <h2>"Optimize"</h2>
            <label>
                "Loss "
                <select id="opt-loss" on:change=move |ev| loss.set(
                    if event_target_value(&ev) == "kl" { OptimLoss::Kl } else { OptimLoss::Ce }
                )>
                    <option value="ce" selected=move || loss.get() == OptimLoss::Ce>"CE of a label"</option>
                    <option value="kl" selected=move || loss.get() == OptimLoss::Kl>"KL to the target"</option>
                </select>
            </label>
            <label>
                " at position "
                <select id="opt-pos" on:change=move |ev| position.set(event_target_value(&ev).parse().ok())>
                    {move || tokens().into_iter().enumerate().map(|(i, t)| view! {
                        <option value=i.to_string()
                            selected=move || position.get().unwrap_or_else(last) == i>
                            {format!("{i}: {t:?}")}
                        </option>
                    }).collect_view()}
                </select>
            </label>
            <Show when=move || loss.get() == OptimLoss::Ce>
                <div>
                    <span id="opt-label">{move || label.get().map_or(
                        "label: none chosen".to_owned(),
                        |(id, t)| format!("label: {t:?} (#{id})"),
                    )}</span>
                    " "
                    <input id="opt-label-search" type="search" placeholder="Search the label token"
                        prop:value=move || query.get()
                        on:input=move |ev| query.set(event_target_value(&ev)) />
                    <ul class="vocab-hits">
                        {move || hits.get().into_iter().map(|h| {
                            let text = format!("{:?} #{}", h.token, h.id);
                            view! {
                                <li class="vocab-hit" data-id=h.id on:click=move |_| {
                                    label.set(Some((h.id, h.token.clone())));
                                    query.set(String::new());
                                }>{text}</li>
                            }
                        }).collect_view()}
                    </ul>
                </div>
            </Show>
            <label class="slider">
                {move || format!("Sparsity {:.1e} ", 10f32.powf(log_coeff.get()))}
                <input id="opt-coeff" type="range" min="-5" max="0" step="0.25"
                    prop:value=move || log_coeff.get().to_string()
                    on:input=number(log_coeff) />
            </label>
            <label>
                " steps "
                <input id="opt-steps" type="number" min="1" max="100000"
                    prop:value=move || steps.get().to_string()
                    on:change=move |ev| {
                        if let Ok(n) = event_target_value(&ev).parse() {
                            steps.set(n);
                        }
                    } />
            </label>
            <details class="advanced">
                <summary>"Advanced"</summary>
                <label>"p-norm " <input id="opt-pnorm" type="number" step="0.1"
                    prop:value=move || pnorm.get().to_string() on:change=number(pnorm) /></label>
                <label>" β " <input id="opt-beta" type="number" step="0.1"
                    prop:value=move || beta.get().to_string() on:change=number(beta) /></label>
                <label>
                    " masks "
                    <select id="opt-mask" on:change=move |ev| mask.set(
                        if event_target_value(&ev) == "stochastic" { OptimMask::Stochastic } else { OptimMask::Ci }
                    )>
                        <option value="ci" selected=move || mask.get() == OptimMask::Ci>"CI"</option>
                        <option value="stochastic" selected=move || mask.get() == OptimMask::Stochastic>"stochastic"</option>
                    </select>
                </label>
                <label>" PGD steps " <input id="opt-pgd-steps" type="number" min="0"
                    prop:value=move || pgd_steps.get().to_string()
                    on:change=move |ev| {
                        if let Ok(n) = event_target_value(&ev).parse() {
                            pgd_steps.set(n);
                        }
                    } /></label>
                <label>" step size " <input id="opt-pgd-size" type="number" step="0.01"
                    prop:value=move || pgd_size.get().to_string() on:change=number(pgd_size) /></label>
            </details>
            <div class="buttons">
                <button id="opt-run" on:click=optimize>"Optimize"</button>
            </div>
            {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
        </section>
    }
    .into_any()
}
