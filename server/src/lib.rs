//! The engine (model, CI, attribution), storage and serving for the SPD explorer.
pub mod attribution;
pub mod circuit;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod device;
pub mod generate;
pub mod model;
pub mod nn;
pub mod store;
pub mod tokenizer;
pub mod web;
