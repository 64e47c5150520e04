//! Makes the NAR of a store path into the blob store: serialised,
//! hashed (NarHash) and compressed (zstd) in one pass, the compressed
//! bytes hashed (FileHash) as they reach a temp file, which is fsynced
//! and linked under its digest like any blob.

use super::nar::{write_nar, NarError};
use crate::digest::HashingWriter;
use crate::store::db::nix::{NarCompression, NarRecord};
use crate::store::fs::{BlobError, BlobStore};
use std::io::Write;
use std::path::Path;

/// zstd's default level: fast to write, and what `nix copy` uses too.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("compressing a NAR: {0}")]
    Compress(std::io::Error),
}

/// The NAR of `path`, stored in `blobs`. Blocking.
pub fn produce(path: &Path, blobs: &BlobStore) -> Result<NarRecord, ProduceError> {
    let file = blobs.writer()?;
    let encoder = zstd::Encoder::new(file, ZSTD_LEVEL).map_err(ProduceError::Compress)?;
    let mut nar = HashingWriter::new(encoder);
    write_nar(path, &mut nar)?;
    nar.flush().map_err(ProduceError::Compress)?;
    let (encoder, nar_hash, nar_size) = nar.finish();
    let file = encoder.finish().map_err(ProduceError::Compress)?;
    let (digest, file_size) = file.commit()?;
    Ok(NarRecord {
        nar_hash,
        nar_size,
        file: digest,
        file_size,
        compression: NarCompression::Zstd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_blob_decompresses_to_the_hashed_nar() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&dir.path().join("store")).unwrap();
        let src = dir.path().join("p");
        std::fs::write(&src, vec![7u8; 100_000]).unwrap();
        let record = produce(&src, &blobs).unwrap();
        let mut nar = Vec::new();
        write_nar(&src, &mut nar).unwrap();
        assert_eq!(record.nar_hash, crate::digest::Digest::of(&nar));
        assert_eq!(record.nar_size, nar.len() as u64);
        let stored = std::fs::read(blobs.path_of(&record.file)).unwrap();
        assert_eq!(stored.len() as u64, record.file_size);
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), nar);
    }
}
