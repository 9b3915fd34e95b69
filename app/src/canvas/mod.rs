//! The graph drawing: `layout` places nodes (pure, tested natively), `draw` paints them in the browser.

pub mod layout;

#[cfg(feature = "hydrate")]
pub mod draw;
