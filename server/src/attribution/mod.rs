//! Attribution graphs.
