//! Blocking work (sled, the file system, fsyncs, layer planning) run on
//! tokio's blocking threads, so one slow disk cannot stall every
//! connection.

use tokio::task::JoinError;

/// Runs `work` on a blocking thread; a panic in it comes back as the
/// caller's error type.
pub(crate) async fn blocking<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<JoinError> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}

/// Hands a stream's chunks to `consume` on a blocking thread through a
/// short queue (so a slow disk or a hash never holds an async worker, and
/// at most a few chunks wait in memory), and returns what it made of them.
/// `consume` calls `next` until it gives None: the end of the stream, or
/// an error, which is then returned instead of `consume`'s result.
pub(crate) async fn feed_blocking<T, E, S>(
    mut stream: S,
    consume: impl FnOnce(&mut dyn FnMut() -> Option<bytes::Bytes>) -> T + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<JoinError>,
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    use futures::TryStreamExt;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let consumer = tokio::task::spawn_blocking(move || consume(&mut || rx.blocking_recv()));
    let fed = async {
        while let Some(chunk) = stream.try_next().await? {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        Ok::<(), E>(())
    }
    .await;
    drop(tx);
    let made = consumer.await?;
    fed.map(|()| made)
}

/// The chunks [`feed_blocking`] hands over, read as one byte stream.
pub(crate) struct ChunkReader<'a> {
    next: &'a mut dyn FnMut() -> Option<bytes::Bytes>,
    chunk: bytes::Bytes,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(next: &'a mut dyn FnMut() -> Option<bytes::Bytes>) -> Self {
        ChunkReader {
            next,
            chunk: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match (self.next)() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
