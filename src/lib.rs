//! nixery: a container registry that builds images on demand with Nix.

pub mod digest;
pub mod nix;
pub mod store_path;
