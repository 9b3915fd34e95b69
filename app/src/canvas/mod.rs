//! The graph drawing: pure geometry (`layout`, `view`, `scene`, `hit`), tested natively, and the
//! canvas painter (`draw`, browser only).

#[cfg(feature = "hydrate")]
pub mod draw;
pub mod hit;
pub mod layout;
pub mod scene;
pub mod view;
