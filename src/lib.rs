//! nixery: a container registry that builds images on demand with Nix.

pub mod archive;
pub mod blobs;
pub mod config;
pub mod db;
pub mod digest;
pub mod error;
pub mod image;
pub mod layers;
pub mod manifest;
pub mod nix;
pub mod singleflight;
pub mod source;
pub mod store_path;
