//! The cache's signing key, in the format `nix-store
//! --generate-binary-cache-key` writes: `name:base64(64 bytes)`, the
//! ed25519 seed followed by the public key (libsodium's secret key). The
//! public key is `name:base64(32 bytes)`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("cannot read the Nix cache key {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the Nix cache key {path} is malformed: {reason} (expected `name:base64` as `nixery nix-cache key` or `nix-store --generate-binary-cache-key` writes)")]
    Malformed { path: String, reason: String },
    #[error("invalid key name {0:?}: use letters, digits, `.`, `-` or `_` (e.g. the host name and `-1`)")]
    Name(String),
    #[error("cannot make a key: {0}")]
    Random(String),
}

/// A secret key that signs narinfos.
#[derive(Debug)]
pub struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
}

/// Whether `name` can be a key's name: Nix splits the line at the first
/// `:`, and the name ends up in nix.conf lists, split at white space.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SigningKey {
    /// Parses the secret key text; `path` is only for the error.
    pub fn parse(text: &str, path: &str) -> Result<SigningKey, KeyError> {
        let malformed = |reason: &str| KeyError::Malformed {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, encoded) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| malformed("no `:` between name and key"))?;
        if !valid_name(name) {
            return Err(malformed(
                "the name is empty or has characters Nix cannot use",
            ));
        }
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| malformed("the key is not base64"))?;
        if bytes.len() != 64 {
            return Err(malformed(
                "a secret key has 64 bytes (is this the public key?)",
            ));
        }
        let pair = Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..])
            .map_err(|_| malformed("its public half does not match its secret half"))?;
        Ok(SigningKey {
            name: name.to_owned(),
            pair,
        })
    }

    /// Reads and parses a key file.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        SigningKey::parse(&text, &shown)
    }

    /// A new key named `name`: its secret text (to keep) and the key.
    pub fn generate(name: &str) -> Result<(String, SigningKey), KeyError> {
        use ring::rand::SecureRandom as _;
        if !valid_name(name) {
            return Err(KeyError::Name(name.to_owned()));
        }
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::Random("the system's random source failed".into()))?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| KeyError::Random("the seed was refused".into()))?;
        let mut secret = seed.to_vec();
        secret.extend_from_slice(pair.public_key().as_ref());
        let text = format!("{name}:{}", STANDARD.encode(&secret));
        Ok((
            text,
            SigningKey {
                name: name.to_owned(),
                pair,
            },
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:base64(public key)`, what clients list in `trusted-public-keys`.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.pair.public_key().as_ref())
        )
    }

    /// A narinfo `Sig:` value for `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.pair.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_and_signs_verifiably() {
        let (text, key) = SigningKey::generate("cache.lan-1").unwrap();
        let again = SigningKey::parse(&format!("{text}\n"), "k").unwrap();
        assert_eq!(again.public(), key.public());
        let sig = again.sign("1;/nix/store/x;sha256:y;1;");
        let (name, b64) = sig.split_once(':').unwrap();
        assert_eq!(name, "cache.lan-1");
        let public = STANDARD
            .decode(key.public().split_once(':').unwrap().1)
            .unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
            .verify(
                b"1;/nix/store/x;sha256:y;1;",
                &STANDARD.decode(b64).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        let (text, key) = SigningKey::generate("k").unwrap();
        for bad in [
            "",
            "nocolon",
            ":AAAA",
            "k:not base64!",
            key.public().as_str(),
            &text.replace("k:", "bad name:"),
        ] {
            let err = SigningKey::parse(bad, "/etc/k").unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("/etc/k"));
        }
        // The right length, but the halves of two different keys.
        let (other, _) = SigningKey::generate("k").unwrap();
        let a = STANDARD.decode(text.split_once(':').unwrap().1).unwrap();
        let b = STANDARD.decode(other.split_once(':').unwrap().1).unwrap();
        let mixed = [&a[..32], &b[32..]].concat();
        let err = SigningKey::parse(&format!("k:{}", STANDARD.encode(mixed)), "f").unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(SigningKey::generate("a b").is_err());
    }
}
