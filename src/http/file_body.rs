//! Blob bodies read from the file in pieces as the client takes them.
//! Memory per download stays at a piece or two however large the blob,
//! and concurrent downloads of one blob share the page cache: a private
//! mapping per request would count the whole blob in our RSS once per
//! download.

use crate::store::fs::BlobFile;
use axum::body::Body;
use bytes::Bytes;
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// Bytes read per step. Large enough that the blocking-pool hop per piece
/// is noise next to the copy, small enough to keep memory flat.
const PIECE: u64 = 256 * 1024;

/// The bytes `span` of `file`, read off the async runtime as they are sent.
pub fn body(file: BlobFile, span: Range<u64>) -> Body {
    let file = Arc::new(file);
    let end = span.end;
    let pieces = futures::stream::try_unfold(span.start, move |pos| {
        let file = Arc::clone(&file);
        async move {
            if pos >= end {
                return Ok::<_, io::Error>(None);
            }
            let n = (end - pos).min(PIECE);
            let piece = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Some((piece, pos + n)))
        }
    });
    Body::from_stream(pieces)
}
