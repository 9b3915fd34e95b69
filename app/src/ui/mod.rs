//! The page's components. State lives in one place, [`page::Ctx`]; the pieces read and write it.

mod browser;
mod card;
mod circuit;
mod compare;
mod graph_view;
mod groups;
pub mod page;
mod pinned_view;
mod pins;
mod sidebar;
mod trace_panel;
