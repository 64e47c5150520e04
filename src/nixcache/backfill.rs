//! At start-up, the closures the cache is missing, so that no image needs
//! a rebuild to be served:
//! - an image recorded by a version without the Nix cache has no closure:
//!   it is derived from its store paths (its build record's) as the host's
//!   Nix store has them now. Paths no longer valid there (collected by
//!   `nix-collect-garbage`, or an imported image, which records none)
//!   cannot be: such an image's paths are not served until it is built
//!   again, and the log says so.
//! - on s3, a closure recorded by a version that kept it only in the
//!   replica's database is published in the bucket (if the bucket still
//!   has the image), before this replica follows the bucket (narinfo
//!   requests wait for that).

use super::{record_closure, shared, NixCache};
use crate::blocking::blocking;
use crate::build::builder::{BuildError, Builder};
use crate::digest::Digest;
use crate::store::db::nix::{hash_part, ClosurePath};
use crate::store::db::{Db, DbError};
use crate::store::RecordKind;
use std::collections::HashSet;
use std::sync::Arc;

/// Runs both; failures are logged (the cache serves what it has).
pub async fn run(builder: Arc<Builder>, cache: Arc<NixCache>) {
    if builder.storage().is_shared() {
        if let Err(e) = publish_local(&builder).await {
            tracing::warn!(error = %e, "could not publish this replica's Nix closures in the bucket");
        }
    }
    cache.start_following();
    // The first time takes in every closure: now rather than in a request.
    if let Err(e) = cache.follow(&builder).await {
        tracing::warn!(error = %e, "could not read the bucket's Nix closures");
    }
    match derive_missing(&builder).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            images = n,
            "the Nix cache serves the store paths of images recorded before it"
        ),
        Err(e) => tracing::warn!(error = %e, "could not derive the closures of older images"),
    }
}

/// An image's closure as recorded in `db`.
fn local_closure(db: &Db, manifest: &Digest) -> Result<Option<Vec<ClosurePath>>, DbError> {
    let Some(closure) = db.nix_closure(manifest)? else {
        return Ok(None);
    };
    let mut paths = Vec::with_capacity(closure.paths.len());
    for path in closure.paths {
        let Some(r) = hash_part(&path)
            .map(|h| db.nix_path(h))
            .transpose()?
            .flatten()
        else {
            continue;
        };
        paths.push(ClosurePath {
            path: r.path,
            references: r.references,
            deriver: r.deriver,
        });
    }
    Ok(Some(paths))
}

async fn publish_local(builder: &Builder) -> Result<(), BuildError> {
    let db = builder.db().clone();
    let here = blocking(move || db.nix_closure_manifests()).await?;
    let listed: HashSet<String> = builder
        .storage()
        .record_keys(RecordKind::NixClosure)
        .await?
        .into_iter()
        .collect();
    for manifest in here {
        if listed.contains(&manifest.hex()) || builder.storage().stat(&manifest).await?.is_none() {
            continue;
        }
        let db = builder.db().clone();
        let Some(paths) = blocking(move || local_closure(&db, &manifest)).await? else {
            continue;
        };
        shared::publish(builder, &manifest, &paths).await?;
    }
    Ok(())
}

/// Derives and records the closures of stored images that have none;
/// returns how many.
async fn derive_missing(builder: &Arc<Builder>) -> Result<usize, BuildError> {
    let db = builder.db().clone();
    let (records, have) = blocking(move || -> Result<_, DbError> {
        Ok((db.manifests()?, db.nix_closure_manifests()?))
    })
    .await?;
    let mut seen: HashSet<Digest> = have.into_iter().collect();
    let mut derived = 0;
    let mut gone = 0;
    for (_, record) in records {
        if record.out_paths.is_empty() || !seen.insert(record.digest) {
            continue;
        }
        let key = record.digest.hex();
        if builder.storage().stat(&record.digest).await?.is_none()
            || builder
                .storage()
                .get_record(RecordKind::NixClosure, &key)
                .await?
                .is_some()
        {
            // Evicted, or (s3) another replica's record is followed.
            continue;
        }
        // A path gone from the store's directory is not valid: no Nix
        // process for it (each start would spawn one per such image).
        if !all_exist(&record.out_paths).await {
            gone += 1;
            continue;
        }
        match builder.nix().closure(&record.out_paths).await {
            Ok(closure) => {
                let paths = super::closure_paths(&closure);
                record_closure(builder, record.digest, paths).await?;
                derived += 1;
            }
            Err(e) => tracing::info!(
                manifest = %record.digest,
                error = %e,
                "an image recorded before the Nix cache has store paths no longer in the host's Nix store: they are not served until it is built again"
            ),
        }
    }
    if gone > 0 {
        tracing::info!(
            images = gone,
            "images recorded before the Nix cache have store paths no longer in the host's Nix store: they are not served until built again"
        );
    }
    Ok(derived)
}

/// Whether every path is there on disk (off the async threads).
async fn all_exist(paths: &[String]) -> bool {
    for p in paths {
        if !tokio::fs::try_exists(p).await.unwrap_or(false) {
            return false;
        }
    }
    true
}
