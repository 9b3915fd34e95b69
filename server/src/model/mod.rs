//! Loading SPD runs and running the target and component models.
pub mod checkpoint;
pub mod ci;
pub mod components;
pub mod config;
pub mod error;
pub mod global_ci;
pub mod spd;
pub mod synthetic;
pub mod transformer;

pub use error::{LoadError, RunError};
pub use spd::{CiOutput, ColumnSubset, SpdModel};
pub use transformer::{ModuleId, ModuleKind};
