//! What refers to an image: its bills of materials (`sbom`) as OCI
//! artifact manifests, recorded in the referrers record of each manifest
//! they are about (see `store::db::ReferrersRecord`).
//!
//! The documents are made once per Docker manifest: right after a build
//! (in the background, from the closure it has), or, for an image cached
//! before, when its referrers are first asked for (from its recorded store
//! paths, if they are still in the Nix store). The OCI form and the index
//! get artifact manifests of their own over the same document blobs when
//! their referrers are first asked for.

use crate::blocking::blocking;
use crate::build::builder::{BuildError, Builder};
use crate::build::sbom::{Input, Kind, Root};
use crate::build::store_path::PathInfo;
use crate::digest::Digest;
use crate::oci::artifact::{artifact_manifest, ArtifactDescriptor, EMPTY_CONFIG, TITLE};
use crate::oci::manifest::{self, media_type_of, Descriptor};
use crate::oci::media::{MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE};
use crate::oci::{Format, Named};
use crate::store::db::{self, Referrer, ReferrerKind, ReferrersRecord};
use crate::store::RecordKind;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Held while a referrers record is read from the bucket, merged and
/// written back, so that this process's writers do not undo each other.
static BUCKET_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The annotation naming the platform a document of an index is about.
pub const PLATFORM: &str = "org.nixery.platform";

/// What a build knows that its documents are made from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub image: String,
    pub architecture: String,
    pub revision: Option<String>,
    pub closure: Vec<PathInfo>,
    pub roots: Vec<Root>,
}

/// A document to attach: its kind, its blob, and annotations for the
/// artifact manifest.
type Attached = (Kind, ArtifactDescriptor, BTreeMap<String, String>);

impl Builder {
    /// Makes the documents of a just-built Docker manifest in the
    /// background: a pull never waits for them.
    pub(crate) fn attach_sboms_later(self: &Arc<Self>, docker: Digest, sources: Sources) {
        let this = Arc::clone(self);
        self.in_background(async move {
            let made = this
                .sboms_once(docker, move |b| async move {
                    b.attach_documents(docker, Some(sources)).await
                })
                .await;
            match made {
                // The collector counts them against the quota now.
                Ok(()) => this.collector().wake(),
                Err(e) => {
                    tracing::warn!(%docker, error = %e, "could not make the bills of materials")
                }
            }
        });
    }

    /// Runs `make` unless the documents of `docker` are being made (then
    /// waits for that).
    async fn sboms_once<F, Fut>(self: &Arc<Self>, docker: Digest, make: F) -> Result<(), BuildError>
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<(), BuildError>> + Send + 'static,
    {
        let this = Arc::clone(self);
        self.sboms()
            .run(&docker.hex(), move || {
                let work = make(this);
                async move { work.await.map_err(Arc::new) }
            })
            .await
            .unwrap_or_else(|| Err(Arc::new(BuildError::Task("making the documents".into()))))
            .map_err(BuildError::Shared)
    }

    /// The bucket's referrers record of `subject` (None if absent or
    /// unreadable).
    async fn bucket_referrers(
        &self,
        subject: &Digest,
    ) -> Result<Option<ReferrersRecord>, BuildError> {
        Ok(self
            .storage()
            .get_record(RecordKind::Referrers, &subject.hex())
            .await?
            .and_then(|b| db::decode::<ReferrersRecord>(&b)))
    }

    /// What refers to `subject` (any stored manifest), making the
    /// bills of materials first if none are recorded yet.
    pub async fn referrers(self: &Arc<Self>, subject: Digest) -> Result<Vec<Referrer>, BuildError> {
        if let Some(r) = self.referrers_record(&subject).await? {
            return Ok(r.referrers);
        }
        if !self.is_manifest(&subject).await? {
            return Ok(Vec::new());
        }
        let Some(bytes) = self.manifest_bytes(&subject).await? else {
            return Ok(Vec::new());
        };
        let subject_descriptor = Descriptor {
            media_type: media_type_of(&bytes).unwrap_or_else(|| MANIFEST_MEDIA_TYPE.into()),
            size: bytes.len() as u64,
            digest: subject,
        };
        match manifest::named_by(&bytes) {
            Some(Named::Image(_)) if subject_descriptor.media_type == MANIFEST_MEDIA_TYPE => {
                self.sboms_once(subject, move |b| async move {
                    b.attach_documents(subject, None).await
                })
                .await?;
            }
            Some(Named::Image(_)) => {
                let docker = manifest::convert(&bytes, Format::Docker)?.digest;
                let docs = self.documents_of(docker, None).await?;
                self.attach(&subject_descriptor, docs).await?;
            }
            Some(Named::Index(_)) => {
                let mut docs = Vec::new();
                for (arch, child) in platforms_of(&bytes) {
                    let Some(child_bytes) = self.manifest_bytes(&child).await? else {
                        continue;
                    };
                    let docker = match media_type_of(&child_bytes).as_deref() {
                        Some(MANIFEST_MEDIA_TYPE) => child,
                        _ => manifest::convert(&child_bytes, Format::Docker)?.digest,
                    };
                    docs.extend(self.documents_of(docker, Some(&arch)).await?);
                }
                self.attach(&subject_descriptor, docs).await?;
            }
            Some(Named::Artifact { .. }) | None => return Ok(Vec::new()),
        }
        Ok(self
            .referrers_record(&subject)
            .await?
            .map(|r| r.referrers)
            .unwrap_or_default())
    }

    /// The documents attached to a Docker manifest (made if need be),
    /// annotated with `platform` when given.
    async fn documents_of(
        self: &Arc<Self>,
        docker: Digest,
        platform: Option<&str>,
    ) -> Result<Vec<Attached>, BuildError> {
        let mut out = Vec::new();
        for r in Box::pin(self.referrers(docker)).await? {
            let Some(kind) = Kind::from_media_type(&r.artifact_type) else {
                continue;
            };
            let Some(bytes) = self.manifest_bytes(&r.digest).await? else {
                continue;
            };
            let Some(Named::Artifact { blobs, .. }) = manifest::named_by(&bytes) else {
                continue;
            };
            let Some(&(digest, size)) = blobs.get(1) else {
                continue;
            };
            let mut annotations = BTreeMap::new();
            if let Some(p) = platform {
                annotations.insert(PLATFORM.to_owned(), format!("linux/{p}"));
            }
            out.push((kind, content(kind, digest, size), annotations));
        }
        Ok(out)
    }

    /// Writes the documents of the Docker manifest `docker` and attaches
    /// them; from `sources` after a build, otherwise from the records
    /// (nothing when the store paths are not known or no longer in the
    /// Nix store, as for an imported image).
    async fn attach_documents(
        self: &Arc<Self>,
        docker: Digest,
        sources: Option<Sources>,
    ) -> Result<(), BuildError> {
        let recorded = self.referrers_record(&docker).await?;
        // Documents are manifests; NARs (blobs) may come first.
        let documented =
            |r: &ReferrersRecord| r.referrers.iter().any(|r| r.kind == ReferrerKind::Manifest);
        if recorded.is_some_and(|r| documented(&r)) {
            return Ok(());
        }
        let Some(bytes) = self.manifest_bytes(&docker).await? else {
            return Ok(());
        };
        let sources = match sources {
            Some(s) => s,
            None => match self.recorded_sources(docker, &bytes).await? {
                Some(s) => s,
                // Remembered as none, so that asking again costs no
                // search and no Nix; a build of the image makes them.
                None => return self.add_referrers(&docker, Vec::new()).await,
            },
        };
        let source = self.source().public_description();
        let written = blocking(move || -> Result<Vec<(Kind, Vec<u8>)>, BuildError> {
            let input = Input {
                image: &sources.image,
                architecture: &sources.architecture,
                source: &source,
                revision: sources.revision.as_deref(),
                closure: &sources.closure,
                roots: &sources.roots,
            };
            Kind::ALL
                .into_iter()
                .map(|k| Ok((k, k.write(&input).map_err(crate::oci::OciError::from)?)))
                .collect()
        })
        .await?;
        let mut docs = Vec::new();
        let mut pins = Vec::new();
        for (kind, json) in written {
            let (digest, size) = (Digest::of(&json), json.len() as u64);
            pins.push(self.blobs().pin(&digest));
            self.put_blob(json).await?;
            docs.push((kind, content(kind, digest, size), BTreeMap::new()));
        }
        let subject = Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            size: bytes.len() as u64,
            digest: docker,
        };
        self.attach(&subject, docs).await
    }

    /// Stores an artifact manifest over each document with `subject`, and
    /// records them as its referrers.
    async fn attach(&self, subject: &Descriptor, docs: Vec<Attached>) -> Result<(), BuildError> {
        let mut pins = vec![self.blobs().pin(&Digest::of(EMPTY_CONFIG))];
        self.put_blob(EMPTY_CONFIG.to_vec()).await?;
        let mut referrers = Vec::new();
        for (kind, content, annotations) in docs {
            let doc = artifact_manifest(kind.media_type(), content, subject, &annotations)?;
            pins.push(self.blobs().pin(&doc.digest));
            referrers.push(Referrer {
                kind: ReferrerKind::Manifest,
                media_type: OCI_MANIFEST_MEDIA_TYPE.into(),
                artifact_type: kind.media_type().into(),
                digest: doc.digest,
                size: doc.json.len() as u64,
                annotations: annotations.into_iter().collect(),
            });
            self.put_blob(doc.json).await?;
        }
        self.add_referrers(&subject.digest, referrers).await
    }

    /// Stores and publishes a small blob (if it is not stored yet).
    async fn put_blob(&self, bytes: Vec<u8>) -> Result<(), BuildError> {
        let blobs = self.blobs().clone();
        let digest = blocking(move || -> Result<Digest, BuildError> {
            let digest = Digest::of(&bytes);
            if !blobs.contains(&digest) {
                blobs.put(&bytes)?;
            }
            Ok(digest)
        })
        .await?;
        self.publish(&digest).await
    }

    /// The referrers recorded for `subject`: here, or (s3) by a replica.
    async fn referrers_record(
        &self,
        subject: &Digest,
    ) -> Result<Option<ReferrersRecord>, BuildError> {
        let db = self.db().clone();
        let s = *subject;
        if let Some(r) = blocking(move || db.referrers(&s)).await? {
            return Ok(Some(r));
        }
        if !self.storage().is_shared() {
            return Ok(None);
        }
        let Some(record) = self.bucket_referrers(subject).await? else {
            return Ok(None);
        };
        let (db, s, more) = (self.db().clone(), *subject, record.referrers.clone());
        blocking(move || db.add_referrers(&s, &more)).await?;
        Ok(Some(record))
    }

    /// Records `referrers` of `subject` here and, on s3, in the bucket.
    pub(crate) async fn add_referrers(
        &self,
        subject: &Digest,
        referrers: Vec<Referrer>,
    ) -> Result<(), BuildError> {
        let mut referrers = referrers;
        // This process's writes of a bucket record, one at a time.
        let mut _writing = None;
        if self.storage().is_shared() {
            _writing = Some(BUCKET_WRITES.lock().await);
            // What other replicas recorded (documents, NARs) stays: the
            // bucket's record is replaced whole below. Two replicas adding
            // at the same moment can still lose one's addition; a NAR
            // lost so is recorded again when next asked for.
            if let Some(bucket) = self.bucket_referrers(subject).await? {
                referrers.splice(0..0, bucket.referrers);
            }
        }
        let (db, s) = (self.db().clone(), *subject);
        let record = blocking(move || db.add_referrers(&s, &referrers)).await?;
        if self.storage().is_shared() {
            // As here: only manifests among them are served by digest.
            let manifests = record
                .referrers
                .iter()
                .filter(|r| r.kind == ReferrerKind::Manifest);
            for r in manifests {
                self.storage()
                    .put_record(RecordKind::ManifestDigest, &r.digest.hex(), Vec::new())
                    .await?;
            }
            self.storage()
                .put_record(RecordKind::Referrers, &subject.hex(), db::encode(&record)?)
                .await?;
        }
        Ok(())
    }

    /// What an image cached before is made of: its recorded store paths,
    /// their closure as the Nix store has it now, and its config's labels.
    async fn recorded_sources(
        &self,
        docker: Digest,
        manifest_bytes: &[u8],
    ) -> Result<Option<Sources>, BuildError> {
        let db = self.db().clone();
        let found = blocking(move || -> Result<_, BuildError> {
            Ok(db
                .manifests()?
                .into_iter()
                .find(|(_, r)| r.digest == docker && !r.out_paths.is_empty()))
        })
        .await?;
        let Some((_, record)) = found else {
            return Ok(None);
        };
        let closure = match self.nix().closure(&record.out_paths).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(%docker, error = %e, "no bill of materials: the image's store paths are not in the Nix store");
                return Ok(None);
            }
        };
        let config = manifest::named_by(manifest_bytes)
            .and_then(|n| n.blobs().first().copied())
            .map(|(d, _)| d);
        let mut architecture = "amd64".to_owned();
        if let Some(config) = config {
            if let Some(bytes) = self.manifest_bytes(&config).await? {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                if let Some(a) = v["architecture"].as_str() {
                    architecture = a.to_owned();
                }
            }
        }
        let image = record
            .out_paths
            .iter()
            .map(|p| crate::build::sbom::name_and_version(p).0)
            .collect::<Vec<_>>()
            .join("/");
        Ok(Some(Sources {
            image,
            architecture,
            revision: record.revision.clone(),
            roots: record
                .out_paths
                .iter()
                .map(|p| Root {
                    out_path: p.clone(),
                    licenses: Vec::new(),
                    homepage: None,
                })
                .collect(),
            closure,
        }))
    }
}

fn content(kind: Kind, digest: Digest, size: u64) -> ArtifactDescriptor {
    ArtifactDescriptor {
        media_type: kind.media_type().into(),
        digest,
        size,
        artifact_type: None,
        annotations: BTreeMap::from([(TITLE.to_owned(), kind.file_name().to_owned())]),
    }
}

/// The platforms an index names: architecture and manifest digest.
fn platforms_of(index: &[u8]) -> Vec<(String, Digest)> {
    let v: serde_json::Value = serde_json::from_slice(index).unwrap_or_default();
    v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["platform"]["architecture"].as_str()?.to_owned(),
                m["digest"].as_str()?.parse().ok()?,
            ))
        })
        .collect()
}
