//! The engine (model, CI, attribution), storage and serving for the SPD explorer.
pub mod attribution;
pub mod device;
pub mod model;
pub mod tokenizer;
pub mod web;
