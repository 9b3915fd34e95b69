//! The page's components. State lives in one place, [`page::Ctx`]; the pieces read and write it.

mod card;
mod circuit;
mod compare;
mod graph_view;
pub mod page;
mod pins;
mod sidebar;
mod trace_panel;
