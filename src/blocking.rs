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
