//! Blob bodies sent from the page cache in windows as the client takes
//! them: each window is a read-only shared mapping of the file, written
//! to the socket straight from the page cache (no copy into a buffer of
//! ours) and unmapped once sent. Concurrent downloads of one blob share
//! the page cache, and each pins only a window or two of it in our RSS
//! (file pages, no anonymous memory), however large the blob and however
//! slow the client. A blob of one piece or less is read at once.
//!
//! The body is an ordinary stream of [`Bytes`], so it goes through any
//! connection (plain or TLS) as hyper writes it. On a plain HTTP/1.1
//! connection the windows are registered with it instead, unread, and the
//! socket sends their bytes from the file with sendfile (see
//! [`super::sendfile`]).

use super::sendfile::Sendfile;
use crate::store::fs::BlobFile;
use axum::body::Body;
use bytes::Bytes;
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// Blobs up to this size are read into memory at once.
const PIECE: u64 = 256 * 1024;

/// Bytes mapped per step. Large enough that the blocking-pool hop and the
/// mapping per window are noise next to sending it, small enough that 8
/// downloads pin a few MB of page cache in our RSS.
const WINDOW: u64 = 1024 * 1024;

/// Bytes per step handed to sendfile: they are mapped but never read, so
/// they pin no memory, and larger steps mean fewer trips to the blocking
/// pool.
const SENDFILE_WINDOW: u64 = 16 * 1024 * 1024;

/// An opened blob: small ones already read, saving a trip to the blocking
/// pool per request.
pub enum Opened {
    Small(Bytes),
    Large(BlobFile),
}

impl Opened {
    /// Reads `file` now if it is one piece or less. Blocking.
    pub fn new(file: BlobFile) -> io::Result<Opened> {
        if file.len() > PIECE {
            return Ok(Opened::Large(file));
        }
        let mut buf = vec![0u8; file.len() as usize];
        file.read_exact_at(&mut buf, 0)?;
        Ok(Opened::Small(Bytes::from(buf)))
    }

    pub fn len(&self) -> u64 {
        match self {
            Opened::Small(bytes) => bytes.len() as u64,
            Opened::Large(file) => file.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes `span` (within `0..len()`), read off the async runtime as
    /// they are sent; with `sendfile`, sent from the file by the kernel.
    pub fn body(self, span: Range<u64>, sendfile: Option<Sendfile>) -> Body {
        match self {
            Opened::Small(bytes) => Body::from(bytes.slice(span.start as usize..span.end as usize)),
            Opened::Large(file) => stream(file, span, sendfile),
        }
    }
}

fn stream(file: BlobFile, span: Range<u64>, sendfile: Option<Sendfile>) -> Body {
    let file = Arc::new(file);
    let end = span.end;
    let step = if sendfile.is_some() {
        SENDFILE_WINDOW
    } else {
        WINDOW
    };
    let windows = futures::stream::try_unfold(span.start, move |pos| {
        let file = Arc::clone(&file);
        let sendfile = sendfile.clone();
        async move {
            if pos >= end {
                return Ok::<_, io::Error>(None);
            }
            let n = (end - pos).min(step) as usize;
            let window = tokio::task::spawn_blocking(move || match sendfile {
                Some(sendfile) => sendfile.window(&file, pos, n),
                None => file.map_window(pos, n),
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Some((window, pos + n as u64)))
        }
    });
    Body::from_stream(windows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fs::BlobStore;

    /// Small and large blobs give the same bytes for any span, a large one
    /// across piece boundaries.
    #[tokio::test]
    async fn bodies_hold_the_requested_span() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for len in [0u64, 10, PIECE, PIECE + 1, 3 * PIECE + 7, 2 * WINDOW + 4097] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let digest = store.put(&data).unwrap();
            // Unaligned starts and ends, within a page and across windows.
            let spans = [
                0..len,
                len / 3..len,
                0..len / 2,
                len.saturating_sub(5)..len,
                len.min(4095)..len.min(WINDOW + 5),
            ];
            for span in spans {
                // Registered windows read like any others.
                for sendfile in [None, Some(Sendfile::default())] {
                    let file = store.open_blob(&digest).unwrap().unwrap();
                    let opened = Opened::new(file).unwrap();
                    assert_eq!(matches!(opened, Opened::Small(_)), len <= PIECE);
                    assert_eq!(opened.len(), len);
                    let body = opened.body(span.clone(), sendfile);
                    let got = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                    assert_eq!(&got[..], &data[span.start as usize..span.end as usize]);
                }
            }
        }
    }
}
