//! Content digests (`sha256:<64 hex>`), the only addressing the store knows.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// A sha256 content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest algorithm {0:?} is not supported; only sha256 is")]
    Unsupported(String),
    #[error("digest is not of the form sha256:<64 lowercase hex digits>")]
    Invalid,
}

impl Digest {
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        Digest(raw)
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 lowercase hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest whose [`hex`](Self::hex) is `encoded` (a file or object
    /// named by its digest).
    pub fn from_hex(encoded: &str) -> Result<Self, DigestError> {
        if encoded.len() != 64
            || !encoded
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(DigestError::Invalid);
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(encoded, &mut raw).map_err(|_| DigestError::Invalid)?;
        Ok(Digest(raw))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parses strictly: the distribution grammar allows other algorithms and
    /// encodings, which this registry never produces.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::Invalid)?;
        if algorithm != "sha256" {
            // The distribution grammar: algorithm [a-z0-9+._-]+, encoded
            // [a-zA-Z0-9=_-]+.
            let well_formed = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && !encoded.is_empty()
                && encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
            return Err(if well_formed {
                DigestError::Unsupported(algorithm.to_owned())
            } else {
                DigestError::Invalid
            });
        }
        Digest::from_hex(encoded)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Passes bytes on to `inner`, hashing and counting exactly what it
/// accepted, so a digest is computed in the same pass that writes the data.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inner writer, the digest of everything written and its length.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.len)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        // Hash only what was accepted: a short write is retried by the caller.
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_sha256() {
        let d = Digest::of(b"abc");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(s.parse::<Digest>(), Ok(d));
    }

    /// A writer that takes at most 3 bytes a call.
    struct Short(Vec<u8>);

    impl std::io::Write for Short {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn hashing_writer_hashes_what_was_accepted() {
        use std::io::Write;
        let mut w = HashingWriter::new(Short(Vec::new()));
        w.write_all(b"hello world").unwrap();
        assert_eq!(w.len(), 11);
        let (inner, digest, len) = w.finish();
        assert_eq!((inner.0.as_slice(), len), (&b"hello world"[..], 11));
        assert_eq!(digest, Digest::of(b"hello world"));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!("sha256:abc".parse::<Digest>(), Err(DigestError::Invalid));
        assert_eq!("nocolon".parse::<Digest>(), Err(DigestError::Invalid));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert_eq!(upper.parse::<Digest>(), Err(DigestError::Invalid));
        let other = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            other.parse::<Digest>(),
            Err(DigestError::Unsupported("sha512".into()))
        );
        assert_eq!("../x:y".parse::<Digest>(), Err(DigestError::Invalid));
        assert_eq!("sha512:a/b".parse::<Digest>(), Err(DigestError::Invalid));
        assert_eq!("sha512:".parse::<Digest>(), Err(DigestError::Invalid));
    }
    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_sha256_round_trips(raw in any::<[u8; 32]>()) {
                let d = Digest::from_bytes(raw);
                prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
            }

            #[test]
            fn only_canonical_text_parses(text in "sha256:[0-9a-fA-F]{60,68}|\\PC{0,80}") {
                if let Ok(d) = text.parse::<Digest>() {
                    prop_assert_eq!(d.to_string(), text);
                }
            }
        }
    }
}
