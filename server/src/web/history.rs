//! The page's intervention runs: computed by [`Data::run_intervention`], kept per prompt in the
//! sidecar notes file, listed and deleted; and the vocabulary search the fork and optimise forms
//! use.

use app::api::ApiError;
use app::types::{
    InterventionMode, InterventionParams, InterventionRun, PredictionRow, PromptRef, TopToken,
    VocabEntry,
};

use super::service::Data;
use crate::circuit::Mode;

/// Most tokens a vocabulary search returns.
const MAX_VOCAB_HITS: usize = 200;
const MAX_LABEL_CHARS: usize = 200;

/// How a prompt is named in the notes file.
fn prompt_key(prompt: &PromptRef) -> String {
    match prompt {
        PromptRef::Stored(id) => format!("id:{id}"),
        PromptRef::Text(text) => format!("text:{text}"),
    }
}

impl Data {
    fn model_key(&self) -> String {
        self.run.model_path.display().to_string()
    }

    fn notes_error(e: crate::store::StoreError) -> ApiError {
        ApiError::internal(format!("notes file: {e}"))
    }

    /// Every component label of this model, by key.
    pub fn labels(&self) -> Result<Vec<(String, String)>, ApiError> {
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.labels(&self.model_key()).map_err(Self::notes_error)
    }

    /// Labels component `key` (`layer:c`) with `label` (trimmed; empty removes it).
    pub fn set_label(&self, key: &str, label: &str) -> Result<(), ApiError> {
        self.check_component(key)?;
        let label = label.trim();
        if label.chars().count() > MAX_LABEL_CHARS {
            return Err(ApiError::bad_request(format!(
                "a label has at most {MAX_LABEL_CHARS} characters"
            )));
        }
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes
            .set_label(&self.model_key(), key, label)
            .map_err(Self::notes_error)
    }

    /// Runs `params` and keeps the run in the prompt's history.
    pub fn intervene(&self, params: InterventionParams) -> Result<InterventionRun, ApiError> {
        let tokens = self.tokens_of(&params.prompt)?;
        self.run
            .model
            .check_tokens(&tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let mode = match params.mode {
            InterventionMode::Keep => Mode::Keep,
            InterventionMode::Ablate => Mode::Ablate,
            InterventionMode::Scale if params.factor.is_finite() => Mode::Scale(params.factor),
            InterventionMode::Scale => {
                return Err(ApiError::bad_request(format!(
                    "the scale factor must be finite, not {}",
                    params.factor
                )));
            }
        };
        let (out, ci) = self.run_intervention(
            &tokens,
            &params.nodes,
            mode,
            params.top_k,
            &params.replacements,
            params.semantics,
        )?;
        let row = |id: u32, prob: f32, target_prob: f32, ci_masked_prob: f32| PredictionRow {
            token: self.run.token_string(id),
            id,
            prob,
            target_prob,
            ci_masked_prob,
        };
        let target_top = ci
            .target_probs
            .iter()
            .map(|p| {
                let (id, prob) =
                    p.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
                            if *v > best.1 { (i, *v) } else { best }
                        });
                TopToken {
                    id: id as u32,
                    token: self.run.token_string(id as u32),
                    prob,
                }
            })
            .collect();
        let mut run = InterventionRun {
            id: None,
            tokens: out
                .tokens
                .iter()
                .map(|t| self.run.token_string(*t))
                .collect(),
            rows: out
                .predictions
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|p| row(p.token, p.prob, p.target_prob, p.ci_masked_prob))
                        .collect()
                })
                .collect(),
            target_top,
            kl: out.kl,
            params,
        };
        let request =
            serde_json::to_string(&run.params).map_err(|e| ApiError::internal(e.to_string()))?;
        let result = serde_json::to_string(&run).map_err(|e| ApiError::internal(e.to_string()))?;
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        match notes.add_run(
            &self.model_key(),
            &prompt_key(&run.params.prompt),
            &request,
            &result,
        ) {
            Ok(id) => run.id = Some(id),
            Err(e) => tracing::warn!("cannot keep the intervention run: {e}"),
        }
        Ok(run)
    }

    /// The kept runs of `prompt`, oldest first.
    pub fn interventions(&self, prompt: &PromptRef) -> Result<Vec<InterventionRun>, ApiError> {
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        let stored = notes
            .runs(&self.model_key(), &prompt_key(prompt))
            .map_err(Self::notes_error)?;
        Ok(stored
            .into_iter()
            .filter_map(|s| {
                // A row another version wrote in another shape is skipped, not an error.
                let mut run: InterventionRun = serde_json::from_str(&s.result).ok()?;
                run.id = Some(s.id);
                Some(run)
            })
            .collect())
    }

    pub fn delete_intervention(&self, id: i64) -> Result<(), ApiError> {
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if notes
            .delete_run(&self.model_key(), id)
            .map_err(Self::notes_error)?
        {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("no intervention run {id}")))
        }
    }

    /// Tokens whose string contains `query` (case-insensitive), shortest first; `#N` is token N.
    pub fn vocab(&self, query: &str, limit: usize) -> Result<Vec<VocabEntry>, ApiError> {
        let strings = self.vocab.get_or_init(|| {
            (0..self.run.model.vocab_size() as u32)
                .map(|id| self.run.token_string(id))
                .collect()
        });
        let limit = limit.clamp(1, MAX_VOCAB_HITS);
        if let Some(id) = query
            .strip_prefix('#')
            .and_then(|n| n.parse::<usize>().ok())
        {
            return Ok(strings
                .get(id)
                .map(|t| VocabEntry {
                    id: id as u32,
                    token: t.clone(),
                })
                .into_iter()
                .collect());
        }
        let needle = query.to_lowercase();
        if needle.trim().is_empty() {
            return Err(ApiError::bad_request("type part of a token to search for"));
        }
        let mut hits: Vec<(usize, u32)> = strings
            .iter()
            .enumerate()
            .filter(|(_, s)| s.to_lowercase().contains(&needle))
            .map(|(i, s)| (s.len(), i as u32))
            .collect();
        hits.sort_unstable();
        hits.truncate(limit);
        Ok(hits
            .into_iter()
            .map(|(_, id)| VocabEntry {
                id,
                token: strings[id as usize].clone(),
            })
            .collect())
    }
}
