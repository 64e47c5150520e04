//! nixery: a container registry that builds images on demand with Nix.

pub mod digest;
pub mod layers;
pub mod store_path;
