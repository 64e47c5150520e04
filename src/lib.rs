//! nixery: a container registry that builds images on demand with Nix.

pub mod digest;
pub mod layers;
pub mod manifest;
pub mod store_path;
