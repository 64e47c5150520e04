//! nixery: a container registry that builds images on demand with Nix.

pub mod archive;
pub mod blobs;
pub mod digest;
pub mod store_path;
