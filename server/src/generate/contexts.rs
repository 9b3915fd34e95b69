//! Activation-context accumulators, filled in the same pass as the index: per component the sum of CI
//! over every token, the count of tokens where it fires (CI above the context threshold), and its
//! top-k examples. One example per prompt: the position where the component's CI is highest, with
//! `radius` tokens either side, so the k examples come from k different prompts.
//!
//! The accumulators merge exactly (sums add, top-k lists combine under a total order), which is what
//! makes resuming and merging shards give the result of one uninterrupted run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::Connection;
use serde_json::{Value, json};

use crate::store::contexts::{self as table, ContextExample, ModuleSums, example_order};
use crate::store::{Result, StoreError};

/// What the activation contexts keep.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContextParams {
    /// Examples kept per component.
    pub top_k: usize,
    /// Tokens kept either side of the firing token.
    pub radius: usize,
    /// A component fires on a token where its CI is above this (the original's
    /// `act_ctx_importance_threshold`).
    pub threshold: f32,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            top_k: 10,
            radius: 5,
            threshold: 0.1,
        }
    }
}

/// One batch's contribution to the activation contexts (columns as in [`Contexts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchContexts {
    pub prompts: u64,
    pub tokens: u64,
    /// Per column: sum of CI over the batch's tokens.
    pub sum_ci: Vec<f32>,
    /// Per column: tokens where the CI is above the context threshold.
    pub n_firing: Vec<u32>,
    /// Candidate examples by column.
    pub examples: Vec<(u32, ContextExample)>,
}

/// Accumulators for every component of every decomposed module (columns in model order: module `i`,
/// component `c` is column `offsets[i] + c`), over the run's first `prompts` prompts.
#[derive(Debug)]
pub struct Contexts {
    pub modules: Vec<String>,
    /// Where each module's columns start, and the column count at the end.
    pub offsets: Vec<usize>,
    pub params: ContextParams,
    /// Prompts and tokens added so far.
    pub prompts: u64,
    pub tokens: u64,
    pub sum_ci: Vec<f64>,
    pub n_firing: Vec<u64>,
    /// Per column, best first, at most `top_k`.
    pub top: Vec<Vec<ContextExample>>,
    dirty: Vec<bool>,
    /// Per column, the CI an example needs to enter a full top-k (f32 bits; 0 while not full). Shared
    /// with the workers so they send only candidates that can still make it.
    floors: Arc<Vec<AtomicU32>>,
}

impl Contexts {
    /// Accumulators for `modules`, each `(name, C)` in model order.
    pub fn new(modules: Vec<(String, usize)>, params: ContextParams) -> Self {
        let mut offsets = vec![0];
        for (_, c) in &modules {
            offsets.push(offsets.last().copied().unwrap_or(0) + c);
        }
        let n = *offsets.last().expect("at least the start");
        Self {
            modules: modules.into_iter().map(|(name, _)| name).collect(),
            offsets,
            params,
            prompts: 0,
            tokens: 0,
            sum_ci: vec![0.0; n],
            n_firing: vec![0; n],
            top: vec![vec![]; n],
            dirty: vec![false; n],
            floors: Arc::new((0..n).map(|_| AtomicU32::new(0)).collect()),
        }
    }

    /// The accumulators stored in a database (empty ones where it has none).
    pub fn load(
        conn: &Connection,
        modules: Vec<(String, usize)>,
        params: ContextParams,
    ) -> Result<Self> {
        let mut ctx = Self::new(modules, params);
        (ctx.prompts, ctx.tokens) = table::read_state(conn)?;
        for m in table::read_module_sums(conn)? {
            let Some(i) = ctx.modules.iter().position(|x| *x == m.module) else {
                return Err(StoreError::Invalid(format!(
                    "context_modules has module `{}`, which the model does not decompose",
                    m.module
                )));
            };
            let cols = ctx.columns(i);
            if m.sum_ci.len() != cols.len() {
                return Err(StoreError::Invalid(format!(
                    "context_modules `{}` has {} components, the model {}",
                    m.module,
                    m.sum_ci.len(),
                    cols.len()
                )));
            }
            ctx.sum_ci[cols.clone()].copy_from_slice(&m.sum_ci);
            ctx.n_firing[cols].copy_from_slice(&m.n_firing);
        }
        for (key, examples) in table::read_all_examples(conn)? {
            let col = ctx.column(&key).ok_or_else(|| {
                StoreError::Invalid(format!("context_examples has unknown component `{key}`"))
            })?;
            ctx.top[col] = examples;
            ctx.update_floor(col);
        }
        Ok(ctx)
    }

    /// The columns of module `i`.
    pub fn columns(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// The column of `"module:c"`.
    pub fn column(&self, key: &str) -> Option<usize> {
        let (module, c) = key.rsplit_once(':')?;
        let c: usize = c.parse().ok()?;
        let i = self.modules.iter().position(|m| m == module)?;
        let cols = self.columns(i);
        (c < cols.len()).then_some(cols.start + c)
    }

    /// `(module, component)` of a column.
    pub fn locate(&self, col: usize) -> (usize, usize) {
        let i = self.offsets.partition_point(|&o| o <= col) - 1;
        (i, col - self.offsets[i])
    }

    pub fn key(&self, col: usize) -> String {
        let (i, c) = self.locate(col);
        format!("{}:{c}", self.modules[i])
    }

    pub fn floors(&self) -> Arc<Vec<AtomicU32>> {
        self.floors.clone()
    }

    /// Adds one batch.
    pub fn add(&mut self, batch: BatchContexts) {
        self.prompts += batch.prompts;
        self.tokens += batch.tokens;
        for (acc, x) in self.sum_ci.iter_mut().zip(&batch.sum_ci) {
            *acc += *x as f64;
        }
        for (acc, x) in self.n_firing.iter_mut().zip(&batch.n_firing) {
            *acc += *x as u64;
        }
        for (col, ex) in batch.examples {
            self.offer(col as usize, ex);
        }
    }

    /// Offers an example to a column's top-k.
    fn offer(&mut self, col: usize, ex: ContextExample) {
        let top = &mut self.top[col];
        let at = top.partition_point(|e| example_order(e, &ex).is_lt());
        if at >= self.params.top_k || top.get(at) == Some(&ex) {
            return;
        }
        top.insert(at, ex);
        top.truncate(self.params.top_k);
        self.dirty[col] = true;
        self.update_floor(col);
    }

    fn update_floor(&self, col: usize) {
        if let Some(last) = self.top[col].get(self.params.top_k.saturating_sub(1)) {
            // CI is never negative, so the bits of the f32 order like the values.
            self.floors[col].store(last.active_ci().max(0.0).to_bits(), Ordering::Relaxed);
        }
    }

    /// Adds another run's accumulators (a shard of the same corpus).
    pub fn merge(&mut self, other: &Contexts) {
        self.prompts += other.prompts;
        self.tokens += other.tokens;
        for (a, b) in self.sum_ci.iter_mut().zip(&other.sum_ci) {
            *a += b;
        }
        for (a, b) in self.n_firing.iter_mut().zip(&other.n_firing) {
            *a += b;
        }
        for (col, top) in other.top.iter().enumerate() {
            for ex in top {
                self.offer(col, ex.clone());
            }
        }
    }

    /// Writes the module sums, every top-k list that changed since the last save, and the count of
    /// prompts covered.
    pub fn save(&mut self, conn: &Connection) -> Result<()> {
        table::write_state(conn, self.prompts, self.tokens)?;
        for (i, module) in self.modules.iter().enumerate() {
            let cols = self.columns(i);
            table::write_module_sums(
                conn,
                &ModuleSums {
                    module: module.clone(),
                    sum_ci: self.sum_ci[cols.clone()].to_vec(),
                    n_firing: self.n_firing[cols].to_vec(),
                },
            )?;
        }
        for col in 0..self.top.len() {
            if std::mem::take(&mut self.dirty[col]) {
                table::write_examples(conn, &self.key(col), &self.top[col])?;
            }
        }
        Ok(())
    }

    /// `meta.activation_contexts` in the original tool's layout: `{module: [component, …]}` with
    /// components that fired, by mean CI descending, each `{subcomponent_idx, mean_ci, example_tokens,
    /// example_ci, example_active_pos, example_active_ci, pr_tokens, pr_recalls, pr_precisions}`
    /// (values rounded to 3 decimals as the original did), plus `density` and `example_token_ids`. The
    /// precision/recall lists, which the explorer does not use, are left empty.
    pub fn to_meta(&self, token_str: &dyn Fn(u32) -> String) -> Value {
        let n_tokens = self.tokens;
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let per_token = |x: f64| {
            if n_tokens == 0 {
                0.0
            } else {
                x / n_tokens as f64
            }
        };
        let mut layers = serde_json::Map::new();
        for (i, module) in self.modules.iter().enumerate() {
            let start = self.offsets[i];
            let mut comps: Vec<(f64, Value)> = self
                .columns(i)
                .filter(|&col| self.n_firing[col] > 0 || !self.top[col].is_empty())
                .map(|col| {
                    let mean = per_token(self.sum_ci[col]);
                    let top = &self.top[col];
                    let v = json!({
                        "subcomponent_idx": col - start,
                        "mean_ci": round(mean),
                        "density": per_token(self.n_firing[col] as f64),
                        "example_tokens": top.iter()
                            .map(|e| e.tokens.iter().map(|&t| token_str(t)).collect::<Vec<_>>())
                            .collect::<Vec<_>>(),
                        "example_token_ids": top.iter().map(|e| e.tokens.clone()).collect::<Vec<_>>(),
                        "example_ci": top.iter()
                            .map(|e| e.ci.iter().map(|&x| round(x as f64)).collect::<Vec<_>>())
                            .collect::<Vec<_>>(),
                        "example_active_pos": top.iter().map(|e| e.active).collect::<Vec<_>>(),
                        "example_active_ci": top.iter()
                            .map(|e| round(e.active_ci() as f64))
                            .collect::<Vec<_>>(),
                        "pr_tokens": [],
                        "pr_recalls": [],
                        "pr_precisions": [],
                    });
                    (mean, v)
                })
                .collect();
            comps.sort_by(|a, b| b.0.total_cmp(&a.0));
            layers.insert(
                module.clone(),
                Value::Array(comps.into_iter().map(|(_, v)| v).collect()),
            );
        }
        Value::Object(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(window: u64, ci: f32) -> ContextExample {
        ContextExample {
            window,
            position: 0,
            active: 0,
            tokens: vec![1],
            ci: vec![ci],
        }
    }

    #[test]
    fn top_k_is_independent_of_arrival_and_merge_order() {
        let params = ContextParams {
            top_k: 3,
            ..Default::default()
        };
        let offers = [(0, 0.5), (1, 0.9), (2, 0.5), (3, 0.7), (4, 0.9), (5, 0.2)];
        let batch = |sum: f32, fired: u32, offers: &[(u64, f32)]| BatchContexts {
            prompts: offers.len() as u64,
            tokens: 4 * offers.len() as u64,
            sum_ci: vec![sum],
            n_firing: vec![fired],
            examples: offers.iter().map(|&(w, c)| (0, ex(w, c))).collect(),
        };
        let mut one = Contexts::new(vec![("m".into(), 1)], params);
        one.add(batch(1.0, 2, &offers));
        let mut a = Contexts::new(vec![("m".into(), 1)], params);
        let mut b = Contexts::new(vec![("m".into(), 1)], params);
        a.add(batch(0.25, 1, &offers[3..]));
        b.add(batch(0.75, 1, &offers[..3]));
        a.merge(&b);
        assert_eq!((a.prompts, a.tokens), (one.prompts, one.tokens));
        assert_eq!(a.top, one.top);
        assert_eq!(a.sum_ci, one.sum_ci);
        assert_eq!(a.n_firing, one.n_firing);
        let order: Vec<_> = one.top[0].iter().map(|e| e.window).collect();
        assert_eq!(order, vec![1, 4, 3]);
        assert_eq!(f32::from_bits(one.floors()[0].load(Ordering::Relaxed)), 0.7);
    }
}
