//! Short holds on the images whose manifests were just served: a client
//! that got a manifest fetches its blobs next, so the collector leaves
//! those blobs alone for a while (`--gc-lease`), and each blob fetched
//! under the same repository name renews the hold of the images of that
//! name it belongs to (not of every image sharing a base layer, which
//! steady traffic would then keep leased for ever). Memory only; the holds
//! are bounded by the images stored, as only stored manifests are served.

use crate::digest::Digest;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Held {
    /// The repository name it was served as.
    name: String,
    until: Instant,
    ttl: Duration,
    blobs: Vec<Digest>,
}

/// The live leases, by image (a manifest or index digest), and which
/// images each blob belongs to (for renewals).
#[derive(Debug, Default)]
pub struct Leases {
    images: HashMap<Digest, Held>,
    by_blob: HashMap<Digest, Vec<Digest>>,
}

impl Leases {
    /// Holds `image`, served as `name`, and its `blobs` for `ttl` from
    /// `now`; true if it was not held before (a new hold, which a collector
    /// must notice).
    pub fn grant(
        &mut self,
        name: &str,
        image: Digest,
        blobs: Vec<Digest>,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        self.expire(now);
        let until = now + ttl;
        if let Some(held) = self.images.get_mut(&image) {
            held.until = held.until.max(until);
            held.ttl = ttl;
            name.clone_into(&mut held.name);
            return false;
        }
        for b in blobs.iter().chain(std::iter::once(&image)) {
            let owners = self.by_blob.entry(*b).or_default();
            if !owners.contains(&image) {
                owners.push(image);
            }
        }
        let name = name.to_owned();
        self.images.insert(
            image,
            Held {
                name,
                until,
                ttl,
                blobs,
            },
        );
        true
    }

    /// A blob was fetched as part of `name`: the images of that name it
    /// belongs to are held a full lease again.
    pub fn renew(&mut self, name: &str, blob: &Digest, now: Instant) {
        let Some(owners) = self.by_blob.get(blob) else {
            return;
        };
        for image in owners {
            if let Some(held) = self.images.get_mut(image) {
                if held.until > now && held.name == name {
                    held.until = now + held.ttl;
                }
            }
        }
    }

    /// Drops the leases that ended by `now`.
    pub fn expire(&mut self, now: Instant) {
        let ended: Vec<Digest> = self
            .images
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(d, _)| *d)
            .collect();
        for image in ended {
            let Some(held) = self.images.remove(&image) else {
                continue;
            };
            for b in held.blobs.iter().chain(std::iter::once(&image)) {
                if let Some(owners) = self.by_blob.get_mut(b) {
                    owners.retain(|o| *o != image);
                    if owners.is_empty() {
                        self.by_blob.remove(b);
                    }
                }
            }
        }
    }

    /// Whether a live lease holds `blob`.
    pub fn holds(&self, blob: &Digest, now: Instant) -> bool {
        self.by_blob.get(blob).is_some_and(|owners| {
            owners
                .iter()
                .any(|o| self.images.get(o).is_some_and(|h| h.until > now))
        })
    }

    /// Every blob a live lease holds.
    pub fn held_blobs(&self, now: Instant) -> HashSet<Digest> {
        self.by_blob
            .keys()
            .filter(|b| self.holds(b, now))
            .copied()
            .collect()
    }

    /// When the first live lease ends.
    pub fn first_end(&self, now: Instant) -> Option<Instant> {
        self.images
            .values()
            .map(|h| h.until)
            .filter(|u| *u > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn a_lease_holds_its_blobs_until_it_ends_and_blob_fetches_renew_it() {
        let mut leases = Leases::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(leases.grant("a", d(1), vec![d(10), d(11)], ttl, t0));
        assert!(!leases.grant("a", d(1), vec![d(10), d(11)], ttl, t0));
        assert!(leases.holds(&d(1), t0) && leases.holds(&d(11), t0));
        assert!(!leases.holds(&d(12), t0));
        assert_eq!(leases.first_end(t0), Some(t0 + ttl));

        let t8 = t0 + Duration::from_secs(8);
        leases.renew("another", &d(10), t8);
        assert!(
            !leases.holds(&d(11), t0 + ttl),
            "not renewed by another name"
        );
        leases.renew("a", &d(10), t8);
        let t15 = t0 + Duration::from_secs(15);
        assert!(leases.holds(&d(11), t15), "renewed at 8 s: held until 18 s");
        let t19 = t0 + Duration::from_secs(19);
        assert!(!leases.holds(&d(11), t19));
        leases.renew("a", &d(10), t19);
        assert!(!leases.holds(&d(10), t19), "an ended lease is not revived");
        leases.expire(t19);
        assert!(
            leases.held_blobs(t0).is_empty(),
            "expired leases are dropped"
        );
        assert_eq!(leases.first_end(t19), None);
    }

    #[test]
    fn a_blob_shared_by_two_images_is_held_while_either_is() {
        let mut leases = Leases::default();
        let t0 = Instant::now();
        leases.grant("a", d(1), vec![d(9)], Duration::from_secs(5), t0);
        leases.grant("b", d(2), vec![d(9)], Duration::from_secs(50), t0);
        let t10 = t0 + Duration::from_secs(10);
        leases.expire(t10);
        assert!(leases.holds(&d(9), t10));
        assert!(!leases.holds(&d(1), t10));
        assert_eq!(leases.held_blobs(t10).len(), 2);
    }
}
