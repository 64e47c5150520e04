//! HTTP: the registry API under `/v2/`.

pub mod range;
pub mod registry;
