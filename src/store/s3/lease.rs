//! Leases in the bucket: a claim on work (building an image, collecting
//! garbage) that one holder has until it expires or is released. Taken
//! with a create-if-absent `PUT`; an expired one (its holder died) is
//! cleared and taken again.

use super::bucket::remote;
use super::Bucket;
use crate::clock::now_unix;
use crate::store::{Lease, LeaseState, StoreError};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a new lease is left before it is read back (see `try_lease`).
const LEASE_SETTLE: Duration = Duration::from_millis(300);

/// What a lease object holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LeaseBody {
    pub holder: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// A name for a new lease holder: unique per host, process and call, so
/// two clients in one process are two holders too.
pub fn new_holder() -> String {
    static HOLDERS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        std::process::id(),
        now_unix(),
        HOLDERS.fetch_add(1, Ordering::Relaxed)
    )
}

fn body(holder: &str, ttl: Duration) -> PutPayload {
    let body = LeaseBody {
        holder: holder.to_owned(),
        expires_at: now_unix() + ttl.as_secs().max(1),
    };
    serde_json::to_vec(&body).unwrap_or_default().into()
}

impl Bucket {
    async fn read_lease(&self, key: &Key) -> Result<Option<LeaseBody>, StoreError> {
        Ok(self
            .get(key)
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Removes the lease `name`, whoever holds it.
    pub async fn delete_lease(&self, name: &str) -> Result<(), StoreError> {
        self.delete(&self.lease_key(name)).await
    }

    /// The lease `name`, if there is one (and it can be read).
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseBody>, StoreError> {
        self.read_lease(&self.lease_key(name)).await
    }

    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<LeaseState, StoreError> {
        let key = self.lease_key(name);
        // Twice at most: once more after clearing an expired lease.
        for _ in 0..2 {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self.client.put_opts(&key, body(holder, ttl), opts).await {
                Ok(_) => {
                    // Defensive: S3-compatible stores differ in how strictly
                    // they make create-if-absent atomic under a race, so the
                    // lease is ours only if it reads back as ours once a
                    // racing write has had time to land (the last one wins).
                    tokio::time::sleep(LEASE_SETTLE).await;
                    let now = now_unix();
                    return Ok(match self.read_lease(&key).await? {
                        Some(body) if body.holder != holder => LeaseState::Held(
                            Duration::from_secs(body.expires_at.saturating_sub(now).max(1)),
                        ),
                        _ => LeaseState::Acquired(Lease {
                            name: name.to_owned(),
                            holder: holder.to_owned(),
                        }),
                    });
                }
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(remote("taking lease", &key)(e)),
            }
            let now = now_unix();
            match self.read_lease(&key).await? {
                Some(body) if body.expires_at > now => {
                    return Ok(LeaseState::Held(Duration::from_secs(body.expires_at - now)))
                }
                // Not visible yet (its creator's write is still landing):
                // never cleared, only waited for.
                None => return Ok(LeaseState::Held(Duration::from_secs(1))),
                // Expired (its holder died): clear it, try again.
                Some(_) => self.delete(&key).await?,
            }
        }
        Ok(LeaseState::Held(Duration::from_secs(1)))
    }

    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        let key = self.lease_key(&lease.name);
        self.client
            .put(&key, body(&lease.holder, ttl))
            .await
            .map_err(remote("renewing lease", &key))?;
        Ok(())
    }

    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let key = self.lease_key(&lease.name);
        match self.read_lease(&key).await? {
            Some(body) if body.holder == lease.holder => self.delete(&key).await,
            _ => Ok(()),
        }
    }
}
