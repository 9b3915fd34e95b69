//! The engine (model, CI, attribution), storage and serving for the SPD explorer.
pub mod attribution;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod device;
pub mod generate;
pub mod model;
pub mod store;
pub mod tokenizer;
pub mod web;
