//! The `.narinfo` of a served store path, and the fingerprint its
//! signature covers: `1;<path>;<NarHash>;<NarSize>;<references>`, the
//! references as full store paths separated by commas (Nix's
//! `ValidPathInfo::fingerprint`).

use super::base32;
use super::key::SigningKey;
use crate::store::db::nix::{NarCompression, NarRecord, NixPathRecord};

/// `sha256:<nix-base32>`, as narinfos and `nix path-info` write hashes.
pub fn nix_hash(digest: &crate::digest::Digest) -> String {
    format!("sha256:{}", base32::encode(digest.as_bytes()))
}

/// The file name extension of a NAR compressed this way.
pub fn extension(compression: NarCompression) -> &'static str {
    match compression {
        NarCompression::Zstd => "zst",
    }
}

fn compression_name(compression: NarCompression) -> &'static str {
    match compression {
        NarCompression::Zstd => "zstd",
    }
}

/// The NAR's URL relative to the cache: `nar/<file hash>.nar.<ext>`.
pub fn nar_url(nar: &NarRecord) -> String {
    format!(
        "nar/{}.nar.{}",
        base32::encode(nar.file.as_bytes()),
        extension(nar.compression)
    )
}

pub fn fingerprint(path: &str, nar: &NarRecord, references: &[String]) -> String {
    format!(
        "1;{path};{};{};{}",
        nix_hash(&nar.nar_hash),
        nar.nar_size,
        references.join(",")
    )
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The narinfo text for `record` with its NAR, signed by `key`.
pub fn render(record: &NixPathRecord, nar: &NarRecord, key: &SigningKey) -> String {
    let references: Vec<&str> = record.references.iter().map(|r| base_name(r)).collect();
    let mut text = format!(
        "StorePath: {}\nURL: {}\nCompression: {}\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        record.path,
        nar_url(nar),
        compression_name(nar.compression),
        nix_hash(&nar.file),
        nar.file_size,
        nix_hash(&nar.nar_hash),
        nar.nar_size,
        references.join(" "),
    );
    if let Some(deriver) = &record.deriver {
        text.push_str(&format!("Deriver: {}\n", base_name(deriver)));
    }
    text.push_str(&format!(
        "Sig: {}\n",
        key.sign(&fingerprint(&record.path, nar, &record.references))
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    #[test]
    fn renders_every_field_and_signs_the_fingerprint() {
        let (_, key) = SigningKey::generate("test-1").unwrap();
        let glibc = format!("/nix/store/{}-glibc", "1".repeat(32));
        let hello = format!("/nix/store/{}-hello", "2".repeat(32));
        let nar = NarRecord {
            nar_hash: Digest::of(b"nar"),
            nar_size: 120,
            file: Digest::of(b"file"),
            file_size: 60,
            compression: NarCompression::Zstd,
        };
        let record = NixPathRecord {
            path: hello.clone(),
            references: vec![glibc.clone(), hello.clone()],
            deriver: Some(format!("/nix/store/{}-hello.drv", "3".repeat(32))),
            nar: Some(nar),
        };
        let text = render(&record, &nar, &key);
        let fp = format!("1;{hello};{};120;{glibc},{hello}", nix_hash(&nar.nar_hash));
        assert_eq!(fingerprint(&hello, &nar, &record.references), fp);
        let b32 = base32::encode(nar.file.as_bytes());
        for line in [
            format!("StorePath: {hello}"),
            format!("URL: nar/{b32}.nar.zst"),
            "Compression: zstd".into(),
            format!("FileHash: sha256:{b32}"),
            "FileSize: 60".into(),
            "NarSize: 120".into(),
            format!(
                "References: {}-glibc {}-hello",
                "1".repeat(32),
                "2".repeat(32)
            ),
            format!("Deriver: {}-hello.drv", "3".repeat(32)),
            format!("Sig: {}", key.sign(&fp)),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
