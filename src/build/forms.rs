//! The forms a built image is served in besides its Docker manifest: the
//! OCI manifest, and the OCI index (or Docker manifest list) naming one
//! manifest per platform. Each is written as a blob and marked as a
//! manifest when first asked for, so that it then answers by its digest.

use crate::blocking::blocking;
use crate::build::builder::{BuildError, Builder};
use crate::build::image::Arch;
use crate::digest::Digest;
use crate::oci::manifest::{self, Document, Named, PlatformManifest};
use crate::oci::Format;
use bytes::Bytes;

/// A manifest or index as served: its digest, bytes and media type.
#[derive(Debug, Clone)]
pub struct Served {
    pub digest: Digest,
    pub bytes: Bytes,
    pub media_type: &'static str,
}

impl Builder {
    /// Leases a manifest or index just served as `name`, with every blob
    /// it names (for an index, its manifests' too): the collector keeps
    /// them while the client fetches them; the blobs leased. Nothing
    /// without a storage limit.
    pub async fn lease_served(&self, name: &str, served: &Digest, bytes: &[u8]) -> Vec<Digest> {
        let policy = *self.collector().policy();
        if !policy.is_active() {
            return Vec::new();
        }
        let mut blobs = Vec::new();
        match manifest::named_by(bytes) {
            Some(Named::Image(parts)) => blobs.extend(parts.into_iter().map(|(d, _)| d)),
            Some(Named::Index(children)) => {
                for (child, _) in children {
                    blobs.push(child);
                    if let Ok(Some(bytes)) = self.manifest_bytes(&child).await {
                        if let Some(Named::Image(parts)) = manifest::named_by(&bytes) {
                            blobs.extend(parts.into_iter().map(|(d, _)| d));
                        }
                    }
                }
            }
            // An artifact (a bill of materials) is one small document.
            Some(Named::Artifact { .. }) | None => {}
        }
        self.blobs()
            .lease(name, *served, blobs.clone(), policy.lease);
        blobs
    }

    /// The image whose Docker manifest is `docker`, in `format`; `None`
    /// when that manifest is not stored.
    pub async fn manifest_in(
        &self,
        docker: Digest,
        format: Format,
    ) -> Result<Option<Served>, BuildError> {
        let media_type = format.manifest_type();
        // The form every build stores: hot in memory after one read, from
        // wherever it is stored (a replica may not have built it).
        let Some(bytes) = self.manifest_bytes(&docker).await? else {
            return Ok(None);
        };
        if format == Format::Docker {
            return Ok(Some(Served {
                digest: docker,
                bytes,
                media_type,
            }));
        }
        if let Some(form) = self.hot().form(&docker, media_type) {
            if let Some(bytes) = self.hot().bytes(&form) {
                return Ok(Some(Served {
                    digest: form,
                    bytes,
                    media_type,
                }));
            }
        }
        let doc = manifest::convert(&bytes, format)?;
        self.keep_document(&doc).await?;
        // Converted and stored once; from memory after that.
        let bytes = Bytes::from(doc.json);
        self.hot().remember_form(docker, media_type, doc.digest);
        self.hot().remember_bytes(doc.digest, bytes.clone());
        Ok(Some(Served {
            digest: doc.digest,
            bytes,
            media_type,
        }))
    }

    /// Writes `doc` (if it is not stored yet), publishes it and marks it
    /// as a manifest.
    async fn keep_document(&self, doc: &Document) -> Result<(), BuildError> {
        // Pinned until it is marked: the garbage collector either sees it
        // marked or leaves it.
        let _pin = self.blobs().pin(&doc.digest);
        let (blobs, db) = (self.blobs().clone(), self.db().clone());
        let (digest, json) = (doc.digest, doc.json.clone());
        // Marked here only after it was published: publish and mark once.
        let published = blocking(move || -> Result<_, BuildError> {
            if !blobs.contains(&digest) {
                blobs.put(&json)?;
            }
            Ok(db.is_manifest(&digest)?)
        })
        .await?;
        if published {
            return Ok(());
        }
        self.publish(&doc.digest).await?;
        self.mark_manifest(&doc.digest).await
    }

    /// The index in `format` over each platform's Docker manifest (see
    /// [`answer`](Self::answer)), naming each in that
    /// format.
    pub async fn index_of(
        &self,
        platforms: &[(Arch, Digest)],
        format: Format,
    ) -> Result<Option<Served>, BuildError> {
        let mut entries = Vec::with_capacity(platforms.len());
        for (arch, docker) in platforms {
            // Evicted since the answer (below the free-space floor).
            let Some(served) = self.manifest_in(*docker, format).await? else {
                return Ok(None);
            };
            entries.push(PlatformManifest {
                architecture: arch.docker(),
                digest: served.digest,
                size: served.bytes.len() as u64,
            });
        }
        let doc = manifest::index(format, &entries)?;
        self.keep_document(&doc).await?;
        Ok(Some(Served {
            digest: doc.digest,
            bytes: doc.json.into(),
            media_type: format.index_type(),
        }))
    }
}
