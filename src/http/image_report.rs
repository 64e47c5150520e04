//! Everything the page of one image shows (`/images/<name>`), and its JSON
//! (`/api/images/<name>`): tags and digests of both manifest forms per
//! platform, packages, layers and how many other images share each, the
//! builds of the name, pulls per day, and where it stands for eviction.

use crate::build::builder::Builder;
use crate::build::image::Arch;
use crate::build::store_path::name_and_version;
use crate::clock::now_unix;
use crate::digest::Digest;
use crate::http::plot::{plot, LineData, Plot, Unit};
use crate::http::report::{BuildView, ReportError};
use crate::oci::manifest;
use crate::oci::media::Format;
use crate::store::collector::Overview;
use crate::store::db::ImagePullsRecord;
use crate::store::db::{ManifestRecord, TagTree};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub name: String,
    /// The package source, as the admin page names it.
    pub source: String,
    pub tags: Vec<TagView>,
    /// Builds of this name among the recent ones, newest first.
    pub builds: Vec<BuildView>,
    /// Manifests served for pulls by tag, ever.
    pub pulls: u64,
    /// Unix seconds of the last pull of any of its manifests.
    pub last_pulled: Option<u64>,
    /// Pulls per day (UTC), the last 30 days with any, oldest first.
    pub pulls_by_day: Vec<DayPulls>,
    /// The same, drawn over the last 30 days.
    pub pulls_plot: Plot,
    pub eviction: Eviction,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayPulls {
    /// Unix seconds the day starts at.
    pub day: u64,
    pub pulls: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagView {
    pub tag: String,
    /// Imported (`nixery import`): served as is, never rebuilt or evicted.
    pub imported: bool,
    pub platforms: Vec<PlatformView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlatformView {
    /// Docker's name (`amd64`), or `-` when not known.
    pub architecture: String,
    pub docker_digest: String,
    /// The OCI form's digest (the same blobs under OCI media types);
    /// `None` when the manifest is not stored.
    pub oci_digest: Option<String>,
    /// Unix seconds of the build (or the last check that it is current).
    pub built_at: Option<u64>,
    pub revision: Option<String>,
    /// The requested packages' store paths, split into name and version.
    pub packages: Vec<PackageView>,
    /// Base-most first.
    pub layers: Vec<LayerView>,
    /// Bytes of its config and layers.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageView {
    pub name: String,
    pub version: Option<String>,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerView {
    pub digest: String,
    pub size: u64,
    /// How many other stored images have this layer too.
    pub shared_with: usize,
}

/// Where the image stands with the garbage collector.
#[derive(Debug, Clone, Serialize)]
pub struct Eviction {
    /// `imported`, `no_limit`, `leased`, `in_line` or `unknown`.
    pub state: &'static str,
    /// Its place in the eviction order (1: next), with `in_line` and
    /// `leased`.
    pub rank: Option<usize>,
    /// Images that could be evicted.
    pub candidates: usize,
    /// What the page says.
    pub text: String,
}

/// A manifest found for a tag and platform before the blocking part.
pub struct Found {
    pub tag: String,
    pub imported: bool,
    pub arch: Option<Arch>,
    pub digest: Digest,
    pub record: Option<ManifestRecord>,
}

/// What each tag of `name` stands for, per platform: imported, else the
/// cached build of each platform, else (a mirror) the last build.
pub async fn find(builder: &Builder, name: &str) -> Result<Vec<Found>, ReportError> {
    let db = builder.db().clone();
    let owned = name.to_owned();
    let tags = crate::blocking::blocking(move || {
        let mut out = Vec::new();
        for tag in db.tags(&owned)? {
            let pinned = db.tag_record(TagTree::Pinned, &owned, &tag)?;
            let platforms = db.pinned_platforms(&owned, &tag)?;
            let built = db.tag_record(TagTree::Built, &owned, &tag)?;
            out.push((tag, pinned, platforms, built));
        }
        Ok::<_, ReportError>(out)
    })
    .await?;
    let mut found = Vec::new();
    for (tag, pinned, platforms, built) in tags {
        if let Some(first) = pinned {
            let mut all: Vec<(Option<Arch>, Digest)> = platforms
                .iter()
                .map(|(arch, r)| (Arch::from_docker(arch), r.digest))
                .collect();
            if all.is_empty() {
                all.push((None, first.digest));
            }
            for (arch, digest) in all {
                found.push(Found {
                    tag: tag.clone(),
                    imported: true,
                    arch,
                    digest,
                    record: None,
                });
            }
            continue;
        }
        let before = found.len();
        for arch in builder.platforms_for(name) {
            if let Some(record) = builder.cached_record(name, &tag, arch).await? {
                found.push(Found {
                    tag: tag.clone(),
                    imported: false,
                    arch: Some(arch),
                    digest: record.digest,
                    record: Some(record),
                });
            }
        }
        if found.len() == before {
            if let Some(r) = built {
                found.push(Found {
                    tag: tag.clone(),
                    imported: false,
                    arch: None,
                    digest: r.digest,
                    record: None,
                });
            }
        }
    }
    Ok(found)
}

fn eviction(
    builder: &Builder,
    overview: &Overview,
    digests: &[Digest],
    imported: bool,
) -> Eviction {
    let order = &overview.eviction_order;
    let candidates = order.len();
    let policy = builder.collector().policy();
    let at = |state, rank, text: String| Eviction {
        state,
        rank,
        candidates,
        text,
    };
    if imported {
        return at("imported", None, "imported: never evicted".into());
    }
    if !policy.is_active() {
        return at(
            "no_limit",
            None,
            "no storage limit is set: never evicted".into(),
        );
    }
    let Some((rank, (_, leased))) = order
        .iter()
        .enumerate()
        .find(|(_, (manifest, _))| digests.contains(manifest))
    else {
        return at("unknown", None, "not among the stored images".into());
    };
    let rank = rank + 1;
    if *leased {
        return at(
            "leased",
            Some(rank),
            format!(
                "just served: kept while its client fetches it (for --gc-lease after the last blob; then {rank} of {candidates} in line)"
            ),
        );
    }
    let text = if rank == 1 {
        format!("next to evict when storage runs short (1 of {candidates})")
    } else {
        format!("{rank} of {candidates} in line for eviction when storage runs short")
    };
    at("in_line", Some(rank), text)
}

fn platform(
    builder: &Builder,
    found: &Found,
    shared: &HashMap<Digest, u32>,
) -> Result<PlatformView, ReportError> {
    let stored = builder.blobs().get(&found.digest)?;
    let bytes = stored.as_ref().map(|b| b.as_ref());
    let parts = bytes
        .and_then(manifest::referenced_blobs)
        .unwrap_or_default();
    let layers: Vec<LayerView> = parts
        .iter()
        .skip(1)
        .map(|(d, size)| LayerView {
            digest: d.to_string(),
            size: *size,
            // Others: this image counts once.
            shared_with: shared.get(d).copied().unwrap_or(1).saturating_sub(1) as usize,
        })
        .collect();
    let record = found.record.as_ref();
    Ok(PlatformView {
        architecture: found.arch.map_or("-", |a| a.docker()).to_owned(),
        docker_digest: found.digest.to_string(),
        oci_digest: bytes
            .and_then(|b| manifest::convert(b, Format::Oci).ok())
            .map(|doc| doc.digest.to_string()),
        built_at: record.map(|r| r.checked_at),
        revision: record.and_then(|r| r.revision.clone()),
        packages: record
            .map(|r| {
                r.out_paths
                    .iter()
                    .map(|p| {
                        let (name, version) = name_and_version(p);
                        PackageView {
                            name: name.to_owned(),
                            version: version.map(str::to_owned),
                            path: p.clone(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
        size: parts.iter().map(|(_, n)| n).sum(),
        layers,
    })
}

/// The latest pull of any of `digests`: only their own records are read.
fn last_pulled(builder: &Builder, digests: &[Digest]) -> Result<Option<u64>, ReportError> {
    let pulls = builder.collector().pulls();
    let mut latest = None;
    for digest in digests {
        if let Some(p) = pulls.get(builder.db(), digest)? {
            latest = latest.max(Some(p.at));
        }
    }
    Ok(latest)
}

const DAY: u64 = 86_400;

/// Pulls per day over the last [`ImagePullsRecord::DAYS`] days to `now`,
/// zero on days with none.
fn pulls_plot(days: &[DayPulls], now: u64) -> Plot {
    let today = now - now % DAY;
    let starts: Vec<u64> = (0..ImagePullsRecord::DAYS as u64)
        .rev()
        .filter_map(|back| today.checked_sub(back * DAY))
        .collect();
    let values = starts
        .iter()
        .map(|s| {
            let n = days.iter().find(|d| d.day == *s).map_or(0, |d| d.pulls);
            Some(n as f64)
        })
        .collect();
    let line = LineData {
        label: "pulls",
        class: "series-a",
        values,
    };
    plot(
        "image-pulls",
        "Pulls per day, last 30 days".into(),
        Unit::Count,
        &starts,
        vec![line],
        super::trends::date,
    )
}

impl ImageReport {
    /// Reads the database and the collector's overview of every stored
    /// image (for layer sharing and the eviction order): call off the
    /// async runtime. `None` when
    /// the name has neither a stored image nor a recent build (a failed
    /// build has a page, with its error).
    pub fn collect(
        builder: &Builder,
        name: &str,
        found: Vec<Found>,
    ) -> Result<Option<ImageReport>, ReportError> {
        let db = builder.db();
        let builds = crate::http::report::builds_of(builder, name)?;
        if found.is_empty() && builds.is_empty() {
            return Ok(None);
        }
        builder.status().flush_counts();
        let digests: Vec<Digest> = found.iter().map(|f| f.digest).collect();
        let imported = !found.is_empty() && found.iter().all(|f| f.imported);
        let expected = if imported { &[][..] } else { &digests[..] };
        let overview = builder.collector().overview(expected)?;
        let shared = &overview.images_per_blob;
        let mut tags: Vec<TagView> = Vec::new();
        for f in &found {
            let view = platform(builder, f, shared)?;
            match tags.last_mut() {
                Some(t) if t.tag == f.tag => t.platforms.push(view),
                _ => tags.push(TagView {
                    tag: f.tag.clone(),
                    imported: f.imported,
                    platforms: vec![view],
                }),
            }
        }
        let now = now_unix();
        let pulls_by_day: Vec<DayPulls> = db
            .image_pulls(name)?
            .days
            .into_iter()
            .map(|(day, pulls)| DayPulls { day, pulls })
            .collect();
        Ok(Some(ImageReport {
            name: name.to_owned(),
            source: builder.status().instance().source.clone(),
            builds,
            pulls: db.pull_count(name)?,
            last_pulled: last_pulled(builder, &digests)?,
            pulls_plot: pulls_plot(&pulls_by_day, now),
            pulls_by_day,
            eviction: eviction(builder, &overview, &digests, imported),
            tags,
        }))
    }
}
