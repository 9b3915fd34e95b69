//! Loading SPD runs and running the target and component models.
pub mod checkpoint;
pub mod ci;
pub mod components;
pub mod config;
pub mod error;
pub mod gpt2_simple;
pub mod spd;
pub mod synthetic;

pub use error::{LoadError, RunError};
pub use gpt2_simple::{ModuleId, ModuleKind};
pub use spd::{CiOutput, SpdModel};
