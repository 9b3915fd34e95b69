//! Attribution graphs of one prompt (SPEC §3): which components drive which, by gradient × activation
//! across one hop of the non-decomposed computation.
pub mod active;
pub mod fast;
pub mod graph;
pub mod influence;
pub mod layer;
pub mod normalize;
pub mod prompt;
pub mod sources;
pub mod strongest;

pub use active::{ActiveEntry, extract_active};
pub use fast::{Backend, FastEngine};
pub use graph::{
    Edge, Graph, Semantics, Thresholds, default_max_outputs, reference_graph, reference_graph_with,
};
pub use layer::Layer;
pub use normalize::{Normalization, normalize, normalize_by_target};
pub use prompt::PromptCi;
pub use sources::{Source, SourceMap};
pub use strongest::{TopK, strongest};
pub mod report;
