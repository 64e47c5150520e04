//! The forms a built image is served in besides its Docker manifest: the
//! OCI manifest, and the OCI index (or Docker manifest list) naming one
//! manifest per platform. Each is written as a blob and marked as a
//! manifest when first asked for, so that it then answers by its digest.

use crate::build::builder::{BuildError, Builder};
use crate::build::image::Arch;
use crate::build::manifest::{self, Document, Format, PlatformManifest};
use crate::digest::Digest;
use crate::store::db::Db;
use crate::store::fs::BlobStore;
use bytes::Bytes;
use std::sync::Arc;

/// A manifest or index as served: its digest, bytes and media type.
#[derive(Debug, Clone)]
pub struct Served {
    pub digest: Digest,
    pub bytes: Bytes,
    pub media_type: &'static str,
}

/// Writes `doc` (if it is not stored yet) and marks it as a manifest.
fn keep(blobs: &BlobStore, db: &Db, doc: &Document) -> Result<(), BuildError> {
    if !blobs.contains(&doc.digest) {
        blobs.put(&doc.json)?;
    }
    db.add_manifest_digest(&doc.digest)?;
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::Task(e.to_string()))?
}

impl Builder {
    /// The image whose Docker manifest is `docker`, in `format`; `None`
    /// when that manifest is not stored.
    pub async fn manifest_in(
        &self,
        docker: Digest,
        format: Format,
    ) -> Result<Option<Served>, BuildError> {
        let blobs = self.blobs().clone();
        let db = self.db().clone();
        blocking(move || {
            let Some(blob) = blobs.get(&docker)? else {
                return Ok(None);
            };
            let bytes = blob.into_bytes();
            let media_type = format.manifest_type();
            if format == Format::Docker {
                return Ok(Some(Served {
                    digest: docker,
                    bytes,
                    media_type,
                }));
            }
            let doc = manifest::convert(&bytes, format)?;
            keep(&blobs, &db, &doc)?;
            Ok(Some(Served {
                digest: doc.digest,
                bytes: doc.json.into(),
                media_type,
            }))
        })
        .await
    }

    /// The index in `format` of `name:tag` built for each of its
    /// platforms.
    pub async fn index_for(
        self: &Arc<Self>,
        name: &str,
        tag: &str,
        format: Format,
    ) -> Result<Served, Arc<BuildError>> {
        let platforms: Vec<Arch> = self.platforms_for(name);
        let built = futures::future::try_join_all(
            platforms
                .iter()
                .map(|arch| self.manifest_for_arch(name, tag, *arch)),
        )
        .await?;
        let mut entries = Vec::with_capacity(built.len());
        for (arch, docker) in platforms.iter().zip(built) {
            let served = self
                .manifest_in(docker, format)
                .await?
                .ok_or_else(|| BuildError::Task(format!("manifest {docker} is not stored")))?;
            entries.push(PlatformManifest {
                architecture: arch.docker(),
                digest: served.digest,
                size: served.bytes.len() as u64,
            });
        }
        let doc = manifest::index(format, &entries).map_err(BuildError::from)?;
        let blobs = self.blobs().clone();
        let db = self.db().clone();
        let stored = doc.clone();
        blocking(move || keep(&blobs, &db, &stored)).await?;
        Ok(Served {
            digest: doc.digest,
            bytes: doc.json.into(),
            media_type: format.index_type(),
        })
    }
}
