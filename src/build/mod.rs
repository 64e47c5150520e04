//! From an image name to a stored manifest: the name (`image`), where
//! packages come from (`source`, `git`), Nix (`nix`; `realise` and its
//! `worker_protocol` for building and closures), the processes it
//! runs (`process`) and what its evaluations gave (`eval_cache`), the closure's layer plan (`layering`, `popularity`),
//! packing (`archive`), the manifest and the forms it is served in
//! (`manifest`, `forms`), and the orchestration of it all (`builder`,
//! `singleflight`, the bounded `queue`, the failure `cache`).

pub mod archive;
pub mod builder;
pub mod cache;
pub mod delivery;
pub mod eval_cache;
pub mod forms;
pub mod git;
pub mod hot;
pub mod image;
pub mod layering;
pub mod manifest;
pub mod nix;
pub mod pgzip;
pub mod popularity;
pub mod process;
pub mod queue;
pub mod realise;
pub mod referrers;
pub mod sbom;
pub mod singleflight;
pub mod source;
pub mod spare;
pub mod store_path;
pub mod users;
pub mod worker_protocol;
