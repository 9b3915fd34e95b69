//! The component browser: every component of a layer ranked by mean CI or firing density over the
//! database, with a rank plot (linear or log), a jump to `layer:c`, and a probe box that shows one
//! component's CI on every token of a typed text.

use leptos::prelude::*;

use super::page::{Ctx, server_message};
use crate::api::{get_layer_components, probe_component};
use crate::types::{ComponentRow, LayerComponents, Probe};

/// Rows listed under the plot.
const LISTED: usize = 30;
/// Smallest value the log plot shows (dead components sit on this floor).
const LOG_FLOOR: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    MeanCi,
    Density,
}

impl SortBy {
    fn value(self, r: &ComponentRow) -> f64 {
        match self {
            SortBy::MeanCi => r.mean_ci,
            SortBy::Density => r.density,
        }
        .unwrap_or(0.0)
    }
}

/// The rows by `by`, largest first (component order breaks ties).
pub fn ranked(rows: &[ComponentRow], by: SortBy) -> Vec<ComponentRow> {
    let mut out = rows.to_vec();
    out.sort_by(|a, b| by.value(b).total_cmp(&by.value(a)).then(a.c.cmp(&b.c)));
    out
}

/// The rank plot's polyline (`x,y` pairs) in a `w × h` box: rank left to right, value bottom to
/// top, on a log scale from [`LOG_FLOOR`] when `log`.
pub fn plot_points(values: &[f64], w: f64, h: f64, log: bool) -> String {
    let f = |v: f64| if log { v.max(LOG_FLOOR).log10() } else { v };
    let (lo, hi) = if log {
        (
            LOG_FLOOR.log10(),
            values.iter().copied().fold(LOG_FLOOR, f64::max).log10(),
        )
    } else {
        (0.0, values.iter().copied().fold(0.0, f64::max))
    };
    let span = (hi - lo).max(1e-12);
    let n = values.len().max(2) - 1;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = w * i as f64 / n as f64;
            let y = h - h * ((f(v) - lo) / span).clamp(0.0, 1.0);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[component]
pub fn ComponentBrowser() -> AnyView {
    let ctx = expect_context::<Ctx>();
    let layer = RwSignal::new(String::new());
    let sort = RwSignal::new(SortBy::MeanCi);
    let log = RwSignal::new(true);
    let data: RwSignal<Option<Result<LayerComponents, String>>> = RwSignal::new(None);
    let jump = RwSignal::new(String::new());
    let focus: RwSignal<Option<usize>> = RwSignal::new(None);
    let probe_text = RwSignal::new(String::new());
    let probe: RwSignal<Option<Result<Probe, String>>> = RwSignal::new(None);
    // The layer's rows, fetched when the layer changes (the first layer to begin with).
    Effect::new(move || {
        let l = layer.get();
        leptos::task::spawn_local(async move {
            let r = get_layer_components(l)
                .await
                .map_err(|e| server_message(&e));
            if let Ok(d) = &r
                && layer.get_untracked() != d.layer
            {
                layer.set(d.layer.clone());
            }
            data.set(Some(r));
        });
    });
    let ranking = Memo::new(move |_| {
        data.with(|d| match d {
            Some(Ok(d)) => ranked(&d.rows, sort.get()),
            _ => vec![],
        })
    });
    let do_jump = move || {
        let key = jump.get_untracked();
        if let Some((l, c)) = key.trim().rsplit_once(':')
            && let Ok(c) = c.parse::<usize>()
        {
            focus.set(Some(c));
            if l != layer.get_untracked() {
                layer.set(l.to_owned());
            }
        }
    };
    let do_probe = move || {
        let Some(c) = focus.get_untracked() else {
            probe.set(Some(Err(
                "choose a component first (jump, or click a row)".into()
            )));
            return;
        };
        let key = format!("{}:{c}", layer.get_untracked());
        let text = probe_text.get_untracked();
        leptos::task::spawn_local(async move {
            let r = probe_component(text, key).await;
            probe.set(Some(r.map_err(|e| server_message(&e))));
        });
    };
    let layers = move || {
        data.with(|d| match d {
            Some(Ok(d)) => d.layers.clone(),
            _ => vec![],
        })
    };
    let focus_line = move || {
        let c = focus.get()?;
        let rank = ranking.with(|r| r.iter().position(|row| row.c == c))?;
        let row = ranking.with(|r| r[rank].clone());
        let key = format!("{}:{c}", layer.get());
        let label = ctx.labels.with(|m| m.get(&key).cloned());
        Some(format!(
            "{key}{}: rank {} of {} · mean CI {} · density {}",
            label.map_or(String::new(), |l| format!(" ({l})")),
            rank + 1,
            ranking.with(Vec::len),
            row.mean_ci.map_or("–".into(), |m| format!("{m:.4}")),
            row.density
                .map_or("–".into(), |d| format!("{:.2}%", 100.0 * d)),
        ))
    };
    view! {
        <section class="panel browser" id="browser">
            <h2>"Components"</h2>
            <div class="browser-controls">
                <select id="browser-layer" prop:value=move || layer.get()
                    on:change=move |ev| { focus.set(None); layer.set(event_target_value(&ev)) }>
                    {move || layers().into_iter().map(|l| view! { <option value=l.clone()>{l.clone()}</option> }).collect_view()}
                </select>
                <select id="browser-sort" on:change=move |ev| sort.set(
                    if event_target_value(&ev) == "density" { SortBy::Density } else { SortBy::MeanCi })>
                    <option value="mean_ci">"by mean CI"</option>
                    <option value="density">"by firing density"</option>
                </select>
                <label><input id="browser-log" type="checkbox" prop:checked=move || log.get()
                    on:change=move |ev| log.set(event_target_checked(&ev)) />" log scale"</label>
                <form on:submit=move |ev| { ev.prevent_default(); do_jump(); }>
                    <input id="browser-jump" type="text" placeholder="jump to layer:c"
                        on:input=move |ev| jump.set(event_target_value(&ev)) />
                </form>
            </div>
            {move || match data.get() {
                None => view! { <p class="muted">"Loading components…"</p> }.into_any(),
                Some(Err(e)) => view! { <p class="error">{e}</p> }.into_any(),
                Some(Ok(_)) => {
                    let values: Vec<f64> = ranking.with(|r| r.iter().map(|x| sort.get().value(x)).collect());
                    let points = plot_points(&values, 400.0, 100.0, log.get());
                    let marker = focus.get().and_then(|c| ranking.with(|r| r.iter().position(|x| x.c == c)))
                        .map(|rank| 400.0 * rank as f64 / (values.len().max(2) - 1) as f64);
                    view! {
                        <svg class="rank-plot" viewBox="0 0 400 100" preserveAspectRatio="none"
                            data-points=values.len()>
                            <polyline points=points fill="none" stroke="#2563eb" stroke-width="1.5"
                                vector-effect="non-scaling-stroke" />
                            {marker.map(|x| view! { <line x1=x x2=x y1="0" y2="100" stroke="#f59e0b" stroke-width="1" /> })}
                        </svg>
                    }.into_any()
                }
            }}
            <p class="muted browser-focus">{focus_line}</p>
            <table class="data-table browser-table">
                <thead>
                    <tr><th>"rank"</th><th>"component"</th><th>"mean CI"</th><th>"density"</th></tr>
                </thead>
                <tbody>
                {move || ranking.get().into_iter().take(LISTED).enumerate().map(|(i, row)| {
                    let key = format!("{}:{}", layer.get_untracked(), row.c);
                    let label = ctx.labels.with(|m| m.get(&key).cloned());
                    let c = row.c;
                    view! {
                        <tr class="browser-row" data-key=key.clone()
                            class:focused=move || focus.get() == Some(c)
                            on:click=move |_| focus.set(Some(c))>
                            <td>{i + 1}</td>
                            <td class="mono">{key.clone()}{label.map(|l| view! { <span class="label">{format!(" ({l})")}</span> })}</td>
                            <td>{row.mean_ci.map_or("–".into(), |m| format!("{m:.4}"))}</td>
                            <td>{row.density.map_or("–".into(), |d| format!("{:.2}%", 100.0 * d))}</td>
                        </tr>
                    }
                }).collect_view()}
                </tbody>
            </table>
            <form class="probe-form" on:submit=move |ev| { ev.prevent_default(); do_probe(); }>
                <input id="probe-text" type="text" placeholder="Probe: type a text to see the chosen component's CI on each token"
                    on:input=move |ev| probe_text.set(event_target_value(&ev)) />
                <button id="probe-go" type="submit">"Probe"</button>
            </form>
            {move || probe.get().map(|p| match p {
                Err(e) => view! { <p class="error">{e}</p> }.into_any(),
                Ok(p) => view! {
                    <div class="probe-tokens" data-key=p.key.clone()>
                        {p.tokens.iter().zip(&p.ci).map(|(t, &ci)| {
                            let style = format!("background: rgba(245,158,11,{:.2})", f64::from(ci.clamp(0.0, 1.0)) * 0.8);
                            view! { <span class="tok" style=style title=format!("CI {ci:.3}") data-ci=format!("{ci:.4}")>{t.clone()}</span> }
                        }).collect_view()}
                    </div>
                }.into_any(),
            })}
        </section>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: usize, m: f64, d: f64) -> ComponentRow {
        ComponentRow {
            c,
            mean_ci: Some(m),
            density: Some(d),
        }
    }

    #[test]
    fn components_rank_by_the_chosen_statistic() {
        let rows = vec![row(0, 0.1, 0.5), row(1, 0.3, 0.1), row(2, 0.3, 0.2)];
        let cs = |v: Vec<ComponentRow>| v.into_iter().map(|r| r.c).collect::<Vec<_>>();
        assert_eq!(cs(ranked(&rows, SortBy::MeanCi)), vec![1, 2, 0]);
        assert_eq!(cs(ranked(&rows, SortBy::Density)), vec![0, 2, 1]);
    }

    #[test]
    fn the_rank_plot_spans_its_box_on_both_scales() {
        assert_eq!(
            plot_points(&[1.0, 0.5, 0.0], 100.0, 10.0, false),
            "0.0,0.0 50.0,5.0 100.0,10.0"
        );
        // Log: 1 at the top, the floor (and 0, below it) at the bottom, 1e-3 half way.
        assert_eq!(
            plot_points(&[1.0, 1e-3, 0.0], 100.0, 10.0, true),
            "0.0,0.0 50.0,5.0 100.0,10.0"
        );
    }
}
