//! SPDX 2.3 JSON: a package for the image (`SPDXRef-Image`, purpose
//! CONTAINER) and one per store path, the NAR hash as its SHA256 checksum
//! and the store path as its file name; the image DEPENDS_ON each
//! requested package, each path DEPENDS_ON what it references.

use super::{
    input_digest, license_expression, name_and_version, nar_hash_hex, purl, root_of, store_hash,
    Input, CREATED,
};
use serde::Serialize;

const NOASSERTION: &str = "NOASSERTION";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: CreationInfo,
    packages: Vec<Package<'a>>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
struct CreationInfo {
    created: &'static str,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Package<'a> {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_info: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    package_file_name: Option<&'a str>,
    download_location: &'static str,
    files_analyzed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checksums: Vec<Checksum>,
    #[serde(skip_serializing_if = "Option::is_none")]
    homepage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_info: Option<String>,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<ExternalRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_package_purpose: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Checksum {
    algorithm: &'static str,
    checksum_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

const IMAGE_ID: &str = "SPDXRef-Image";

fn package_id(path: &str) -> String {
    format!("SPDXRef-StorePath-{}", store_hash(path))
}

pub fn write(input: &Input) -> Result<Vec<u8>, serde_json::Error> {
    let revision = input
        .revision
        .map(|r| format!(" at {r}"))
        .unwrap_or_default();
    let mut packages = vec![Package {
        spdx_id: IMAGE_ID.into(),
        name: input.image,
        version_info: input.revision,
        package_file_name: None,
        download_location: NOASSERTION,
        files_analyzed: false,
        checksums: vec![],
        homepage: None,
        source_info: Some(format!(
            "built by nixery for linux/{} from {}{revision}",
            input.architecture, input.source
        )),
        license_concluded: NOASSERTION,
        license_declared: NOASSERTION.into(),
        copyright_text: NOASSERTION,
        comment: None,
        external_refs: vec![],
        primary_package_purpose: Some("CONTAINER"),
    }];
    let mut relationships = vec![Relationship {
        spdx_element_id: "SPDXRef-DOCUMENT".into(),
        relationship_type: "DESCRIBES",
        related_spdx_element: IMAGE_ID.into(),
    }];
    let mut roots: Vec<&str> = input.roots.iter().map(|r| r.out_path.as_str()).collect();
    roots.sort();
    roots.dedup();
    for root in roots {
        relationships.push(Relationship {
            spdx_element_id: IMAGE_ID.into(),
            relationship_type: "DEPENDS_ON",
            related_spdx_element: package_id(root),
        });
    }
    for p in input.closure {
        let (name, version) = name_and_version(&p.path);
        let root = root_of(input, &p.path);
        packages.push(Package {
            spdx_id: package_id(&p.path),
            name,
            version_info: version,
            package_file_name: Some(&p.path),
            download_location: NOASSERTION,
            files_analyzed: false,
            checksums: nar_hash_hex(&p.nar_hash)
                .map(|hex| Checksum {
                    algorithm: "SHA256",
                    checksum_value: hex,
                })
                .into_iter()
                .collect(),
            homepage: root.and_then(|r| r.homepage.as_deref()),
            source_info: None,
            license_concluded: NOASSERTION,
            license_declared: root
                .and_then(|r| license_expression(&r.licenses))
                .unwrap_or_else(|| NOASSERTION.into()),
            copyright_text: NOASSERTION,
            comment: Some(format!(
                "Nix store path; the checksum is of its NAR serialisation ({} bytes)",
                p.nar_size
            )),
            external_refs: vec![ExternalRef {
                reference_category: "PACKAGE-MANAGER",
                reference_type: "purl",
                reference_locator: purl(&p.path),
            }],
            primary_package_purpose: None,
        });
        for r in p.references.iter().filter(|r| **r != p.path) {
            relationships.push(Relationship {
                spdx_element_id: package_id(&p.path),
                relationship_type: "DEPENDS_ON",
                related_spdx_element: package_id(r),
            });
        }
    }
    let doc = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{} (linux/{})", input.image, input.architecture),
        document_namespace: format!("https://nixery.invalid/spdx/{}", input_digest(input).hex()),
        creation_info: CreationInfo {
            created: CREATED,
            creators: vec![format!("Tool: nixery-{}", env!("CARGO_PKG_VERSION"))],
        },
        packages,
        relationships,
    };
    serde_json::to_vec_pretty(&doc)
}
