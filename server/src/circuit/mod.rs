//! Testing a circuit by running the model with it: interventions (keep only, ablate or scale
//! chosen components, on the prompt or a fork of it with tokens swapped) and CI optimised for one
//! prediction (SPEC §7).

pub mod intervention;
pub mod optimize;
pub mod report;

pub use intervention::{
    Intervention, InterventionResult, Mode, Prediction, Selected, fork, intervene, intervene_with,
    kl_divergence,
};
pub use optimize::{
    MaskType, Metrics, OptimConfig, OptimError, Optimized, Pgd, PgdInit, Progress, Recon, optimize,
    optimized_prompt,
};
