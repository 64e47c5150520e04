//! Short holds on the images whose manifests were just served: a client
//! that got a manifest fetches its blobs next, so the collector leaves
//! those blobs alone for a while (`--gc-lease`), and each blob fetched
//! under the same repository name renews the hold of the images of that
//! name it belongs to (not of every image sharing a base layer, which
//! steady traffic would then keep leased for ever). Memory only; the holds
//! are bounded by the images stored, as only stored manifests are served.
//!
//! Below the free-space floor leases give way, but an image a build has
//! just delivered is spared for [`DELIVERY_GRACE`] after its manifest was
//! answered: its client starts fetching the blobs then (each blob sent is
//! pinned while it is sent), and evicting it in between would answer a
//! successful build with missing blobs.

use crate::digest::Digest;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long an image just built is spared by an emergency collection
/// after its manifest was answered to the clients that waited for it.
pub const DELIVERY_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Held {
    /// The repository name it was served as.
    name: String,
    until: Instant,
    ttl: Duration,
    blobs: Vec<Digest>,
    /// Until when an emergency spares it too (see [`Leases::spare`]);
    /// never renewed.
    spared_until: Option<Instant>,
}

impl Held {
    fn ends(&self) -> Instant {
        self.spared_until.map_or(self.until, |s| s.max(self.until))
    }
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
                spared_until: None,
            },
        );
        true
    }

    /// The leased `image` was just delivered by its build: an emergency
    /// spares it until `until` as well. True if that changed what an
    /// emergency spares; nothing without a lease (no limits are set).
    pub fn spare(&mut self, image: &Digest, until: Instant) -> bool {
        match self.images.get_mut(image) {
            Some(held) if held.spared_until.is_none_or(|s| s < until) => {
                held.spared_until = Some(until);
                true
            }
            _ => false,
        }
    }

    /// `image`, made for `name` with `blobs`, was just answered to the
    /// clients of its build: an emergency spares it for
    /// [`DELIVERY_GRACE`]. Leased again for that long if its lease ended
    /// while they waited (for another platform's build, or a lease of 0
    /// s); nothing without blobs (no limits are set).
    pub fn deliver(&mut self, name: &str, image: Digest, blobs: Vec<Digest>, now: Instant) -> bool {
        if blobs.is_empty() {
            return false;
        }
        let live = self.images.get(&image).is_some_and(|h| h.ends() > now);
        if !live {
            self.grant(name, image, blobs, DELIVERY_GRACE, now);
        }
        self.spare(&image, now + DELIVERY_GRACE)
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
            .filter(|(_, h)| h.ends() <= now)
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

    /// Whether a live lease holds `blob`; in an `emergency`, whether an
    /// image just delivered does.
    pub fn holds(&self, blob: &Digest, now: Instant, emergency: bool) -> bool {
        self.by_blob.get(blob).is_some_and(|owners| {
            owners.iter().any(|o| {
                self.images
                    .get(o)
                    .and_then(|h| Self::end(h, emergency))
                    .is_some_and(|end| end > now)
            })
        })
    }

    /// When `held` stops holding: the lease's end, or in an emergency the
    /// end of its delivery grace (None without one).
    fn end(held: &Held, emergency: bool) -> Option<Instant> {
        match emergency {
            true => held.spared_until,
            false => Some(held.ends()),
        }
    }

    /// Every blob a live lease holds (see [`holds`](Self::holds)).
    pub fn held_blobs(&self, now: Instant, emergency: bool) -> HashSet<Digest> {
        self.by_blob
            .keys()
            .filter(|b| self.holds(b, now, emergency))
            .copied()
            .collect()
    }

    /// When the first live lease ends (see [`holds`](Self::holds)).
    pub fn first_end(&self, now: Instant, emergency: bool) -> Option<Instant> {
        self.images
            .values()
            .filter_map(|h| Self::end(h, emergency))
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
        assert!(leases.holds(&d(1), t0, false) && leases.holds(&d(11), t0, false));
        assert!(!leases.holds(&d(12), t0, false));
        assert_eq!(leases.first_end(t0, false), Some(t0 + ttl));

        let t8 = t0 + Duration::from_secs(8);
        leases.renew("another", &d(10), t8);
        assert!(
            !leases.holds(&d(11), t0 + ttl, false),
            "not renewed by another name"
        );
        leases.renew("a", &d(10), t8);
        let t15 = t0 + Duration::from_secs(15);
        assert!(
            leases.holds(&d(11), t15, false),
            "renewed at 8 s: held until 18 s"
        );
        let t19 = t0 + Duration::from_secs(19);
        assert!(!leases.holds(&d(11), t19, false));
        leases.renew("a", &d(10), t19);
        assert!(
            !leases.holds(&d(10), t19, false),
            "an ended lease is not revived"
        );
        leases.expire(t19);
        assert!(
            leases.held_blobs(t0, false).is_empty(),
            "expired leases are dropped"
        );
        assert_eq!(leases.first_end(t19, false), None);
    }

    #[test]
    fn a_blob_shared_by_two_images_is_held_while_either_is() {
        let mut leases = Leases::default();
        let t0 = Instant::now();
        leases.grant("a", d(1), vec![d(9)], Duration::from_secs(5), t0);
        leases.grant("b", d(2), vec![d(9)], Duration::from_secs(50), t0);
        let t10 = t0 + Duration::from_secs(10);
        leases.expire(t10);
        assert!(leases.holds(&d(9), t10, false));
        assert!(!leases.holds(&d(1), t10, false));
        assert_eq!(leases.held_blobs(t10, false).len(), 2);
    }

    #[test]
    fn an_emergency_spares_only_an_image_just_delivered_and_only_for_its_grace() {
        let mut leases = Leases::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(120);
        leases.grant("built", d(1), vec![d(10)], lease, t0);
        leases.grant("served", d(2), vec![d(20)], lease, t0);
        assert!(!leases.holds(&d(10), t0, true), "leases give way");
        assert!(
            !leases.spare(&d(3), t0 + DELIVERY_GRACE),
            "no lease, nothing"
        );
        assert!(leases.spare(&d(1), t0 + DELIVERY_GRACE));
        assert!(!leases.spare(&d(1), t0 + DELIVERY_GRACE), "already so");
        assert!(leases.holds(&d(10), t0, true) && leases.holds(&d(1), t0, true));
        assert!(!leases.holds(&d(20), t0, true));
        assert_eq!(leases.held_blobs(t0, true).len(), 2);
        assert_eq!(leases.first_end(t0, true), Some(t0 + DELIVERY_GRACE));
        let after = t0 + DELIVERY_GRACE;
        assert!(!leases.holds(&d(10), after, true), "the grace ended");
        assert!(leases.holds(&d(10), after, false), "the lease goes on");
        assert_eq!(leases.first_end(after, true), None);

        // A grace longer than a short lease keeps the entry until it ends.
        let short = Duration::from_secs(1);
        leases.grant("quick", d(4), vec![d(40)], short, t0);
        leases.spare(&d(4), t0 + DELIVERY_GRACE);
        leases.expire(t0 + Duration::from_secs(5));
        assert!(leases.holds(&d(40), t0 + Duration::from_secs(5), true));
    }

    #[test]
    fn a_delivery_whose_lease_ended_while_its_clients_waited_still_gets_its_grace() {
        let mut leases = Leases::default();
        let t0 = Instant::now();
        // Leased for 1 s; its clients are answered 30 s later (another
        // platform's build took that long).
        leases.grant("slow", d(1), vec![d(10)], Duration::from_secs(1), t0);
        let t30 = t0 + Duration::from_secs(30);
        assert!(!leases.holds(&d(10), t30, true));
        assert!(leases.deliver("slow", d(1), vec![d(10)], t30));
        assert!(leases.holds(&d(10), t30, true), "spared in an emergency");
        assert!(leases.holds(&d(10), t30, false), "and leased for the grace");
        let after = t30 + DELIVERY_GRACE;
        assert!(!leases.holds(&d(10), after, true) && !leases.holds(&d(10), after, false));
        // Never leased (no limits are set): nothing.
        assert!(!leases.deliver("none", d(2), vec![], t30));
        assert!(leases.held_blobs(t30, true).len() == 2);
    }
}
