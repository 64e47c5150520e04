//! A build's pins, carried to the clients that waited for it: the image
//! just built stays out of the collector's reach, in an emergency too,
//! until its manifest has been answered to each of them (the hold travels
//! with the response's bytes, so it goes when they are sent, or with the
//! connection). Then the image gets a short grace (see
//! [`crate::store::leases::DELIVERY_GRACE`]) for its blobs to be fetched.

use crate::store::fs::PinSet;
use bytes::Bytes;

/// What keeps the images of one answer from the collector; empty for an
/// answer from the cache.
#[derive(Debug, Clone, Default)]
pub struct Hold(Vec<PinSet>);

impl Hold {
    pub fn of(pins: Option<PinSet>) -> Hold {
        Hold(pins.into_iter().collect())
    }

    /// Both holds in one.
    pub fn join(mut self, other: Hold) -> Hold {
        self.0.extend(other.0);
        self
    }

    /// `body`, holding this until the bytes are dropped (sent, or the
    /// response abandoned).
    pub fn attach(self, body: Bytes) -> Bytes {
        if self.0.is_empty() {
            return body;
        }
        Bytes::from_owner(Held(body, self))
    }
}

/// The owner of an answer's bytes and its hold.
struct Held(Bytes, #[allow(dead_code)] Hold);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
