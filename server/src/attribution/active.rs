//! The inverted-index view of one prompt (SPEC §4): for every node alive somewhere in the prompt, its
//! maximum value and the positions where it is alive. Output nodes use the plain target model's
//! probabilities here, as the original `generate` does.

use super::graph::Thresholds;

#[derive(Debug, Clone, PartialEq)]
pub struct ActiveEntry {
    /// Max CI (max probability for `output:v`, 1.0 for `wte:0`).
    pub max: f32,
    pub positions: Vec<u32>,
}

/// `(key, entry)` pairs keyed `"layer:c"`, in model order (`wte:0`, modules by component, outputs by id).
/// `ci[module][position][component]`, `target_probs[position][vocab]`.
pub fn extract_active(
    module_names: &[&str],
    ci: &[Vec<Vec<f32>>],
    target_probs: &[Vec<f32>],
    th: Thresholds,
) -> Vec<(String, ActiveEntry)> {
    let t = target_probs.len();
    let mut out = vec![(
        "wte:0".to_owned(),
        ActiveEntry {
            max: 1.0,
            positions: (0..t as u32).collect(),
        },
    )];
    let mut push_columns = |layer: &str, rows: &[Vec<f32>], thr: f32| {
        let width = rows.first().map_or(0, Vec::len);
        for c in 0..width {
            let mut entry = ActiveEntry {
                max: f32::NEG_INFINITY,
                positions: vec![],
            };
            for (s, row) in rows.iter().enumerate() {
                if row[c] >= thr {
                    entry.positions.push(s as u32);
                    entry.max = entry.max.max(row[c]);
                }
            }
            if !entry.positions.is_empty() {
                out.push((format!("{layer}:{c}"), entry));
            }
        }
    };
    for (name, rows) in module_names.iter().zip(ci) {
        push_columns(name, rows, th.ci);
    }
    push_columns("output", target_probs, th.output_prob);
    out
}
