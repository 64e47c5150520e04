//! The formats stored content is written in, on the ground floor: media
//! types (`media`), image manifests, indexes and what a stored one names
//! (`manifest`), and artifact manifests with a `subject` and the referrers
//! index listing them (`artifact`). `build` writes them, `store` follows
//! what they name (garbage collection, verify), `mirror` moves them and
//! `http` serves them; none of those owns them.

pub mod artifact;
pub mod manifest;
pub mod media;

pub use manifest::{named_by, Document, Named};
pub use media::Format;

/// A format document that could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("serialising image metadata: {0}")]
    Serialise(#[from] serde_json::Error),
}
