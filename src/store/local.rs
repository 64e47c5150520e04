//! The filesystem backend: the local blob store ([`BlobStore`]) is all the
//! storage there is. Its sled database is the only index, so shared records
//! are not kept, and one process is the only builder, so leases are always
//! granted (the builder's single-flight already builds an image once).

use super::fs::{BlobError, BlobStore};
use super::{ByteStream, Description, Lease, LeaseState, Opened, RecordKind, Storage, StoreError};
use crate::blocking::blocking;
use crate::digest::Digest;
use bytes::Bytes;
use futures::StreamExt;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// Bytes per chunk when a blob is streamed rather than mapped.
const STREAM_CHUNK: usize = 256 * 1024;

#[async_trait::async_trait]
impl Storage for BlobStore {
    fn describe(&self) -> Description {
        Description {
            backend: "filesystem",
            location: self.root().display().to_string(),
        }
    }

    fn staging(&self) -> &BlobStore {
        self
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn put_file(&self, path: &Path, digest: &Digest) -> Result<(), StoreError> {
        let (store, path, digest) = (self.clone(), path.to_owned(), *digest);
        blocking(move || {
            // Packed here already: committed under its digest when written.
            if path == store.path_of(&digest) {
                return Ok(());
            }
            let mut file = std::fs::File::open(&path).map_err(|source| StoreError::Read {
                path: path.display().to_string(),
                source,
            })?;
            match store.put_expecting(&mut file, &digest) {
                Ok(_) => Ok(()),
                Err(BlobError::DigestMismatch { expected, actual }) => {
                    Err(StoreError::DigestMismatch { expected, actual })
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let (store, digest) = (self.clone(), *digest);
        blocking(move || Ok(store.stat_blob(&digest)?)).await
    }

    async fn open(&self, digest: &Digest, _redirect: bool) -> Result<Option<Opened>, StoreError> {
        let (store, digest) = (self.clone(), *digest);
        blocking(move || Ok(store.get(&digest)?.map(Opened::Local))).await
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        let path = self.path_of(digest);
        let read_err = {
            let path = path.display().to_string();
            move |source| StoreError::Read {
                path: path.clone(),
                source,
            }
        };
        let (file, range) = {
            let err = read_err.clone();
            blocking(move || -> Result<_, StoreError> {
                let mut file = std::fs::File::open(&path).map_err(&err)?;
                let len = file.metadata().map_err(&err)?.len();
                let range = range.unwrap_or(0..len);
                file.seek(SeekFrom::Start(range.start)).map_err(&err)?;
                Ok((file, range))
            })
            .await?
        };
        // The state is None once a read failed: the stream ends after the error.
        let stream = futures::stream::unfold(
            (Some(file), range.end.saturating_sub(range.start)),
            move |(file, remaining)| {
                let err = read_err.clone();
                async move {
                    let mut file = file.filter(|_| remaining > 0)?;
                    let want = remaining.min(STREAM_CHUNK as u64) as usize;
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0; want];
                        file.read_exact(&mut buf).map(|()| (file, buf))
                    })
                    .await;
                    Some(match read {
                        Ok(Ok((file, buf))) => {
                            (Ok(Bytes::from(buf)), (Some(file), remaining - want as u64))
                        }
                        Ok(Err(e)) => (Err(err(e)), (None, 0)),
                        Err(e) => (Err(e.into()), (None, 0)),
                    })
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn list(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let store = self.clone();
        blocking(move || Ok(store.list_blobs()?)).await
    }

    async fn delete(&self, digest: &Digest) -> Result<bool, StoreError> {
        let (store, digest) = (self.clone(), *digest);
        blocking(move || Ok(BlobStore::delete(&store, &digest)?)).await
    }

    async fn get_record(&self, _: RecordKind, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    async fn record_keys(&self, _: RecordKind) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    async fn put_record(&self, _: RecordKind, _: &str, _: Vec<u8>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn try_lease(&self, name: &str, _: Duration) -> Result<LeaseState, StoreError> {
        Ok(LeaseState::Acquired(Lease {
            name: name.to_owned(),
            holder: "local".to_owned(),
        }))
    }

    async fn renew(&self, _: &Lease, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    async fn release(&self, _: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
}
