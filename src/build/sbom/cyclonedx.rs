//! CycloneDX 1.6 JSON: the image as the metadata's component (type
//! container), one library component per store path (purl, SHA-256 of its
//! NAR, the store path, NAR hash and size as properties), and the
//! dependency graph from the image to the requested packages and on.

use super::{
    input_digest, license_expression, name_and_version, nar_hash_hex, purl, root_of, Input, CREATED,
};
use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom<'a> {
    bom_format: &'static str,
    spec_version: &'static str,
    serial_number: String,
    version: u32,
    metadata: Metadata<'a>,
    components: Vec<Component<'a>>,
    dependencies: Vec<Dependency<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    timestamp: &'static str,
    tools: Tools,
    component: Component<'a>,
}

#[derive(Serialize)]
struct Tools {
    components: Vec<Tool>,
}

#[derive(Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct Component<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    licenses: Vec<License>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<String>,
    #[serde(rename = "externalReferences", skip_serializing_if = "Vec::is_empty")]
    external_references: Vec<ExternalReference<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    properties: Vec<Property>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

#[derive(Serialize)]
struct License {
    expression: String,
}

#[derive(Serialize)]
struct ExternalReference<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    url: &'a str,
}

#[derive(Serialize)]
struct Property {
    name: &'static str,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dependency<'a> {
    #[serde(rename = "ref")]
    reference: &'a str,
    depends_on: Vec<&'a str>,
}

const IMAGE_REF: &str = "image";

/// A version-5-shaped UUID from a digest, so the serial number is fixed
/// for the same input.
fn serial_number(input: &Input) -> String {
    let mut b: [u8; 16] = input_digest(input).as_bytes()[..16]
        .try_into()
        .unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn write(input: &Input) -> Result<Vec<u8>, serde_json::Error> {
    let mut image_properties = vec![
        Property {
            name: "org.opencontainers.image.source",
            value: input.source.to_owned(),
        },
        Property {
            name: "nixery:platform",
            value: format!("linux/{}", input.architecture),
        },
    ];
    if let Some(rev) = input.revision {
        image_properties.push(Property {
            name: "org.opencontainers.image.revision",
            value: rev.to_owned(),
        });
    }
    let mut roots: Vec<&str> = input.roots.iter().map(|r| r.out_path.as_str()).collect();
    roots.sort();
    roots.dedup();
    let mut dependencies = vec![Dependency {
        reference: IMAGE_REF,
        depends_on: roots,
    }];
    let mut components = Vec::with_capacity(input.closure.len());
    for p in input.closure {
        let (name, version) = name_and_version(&p.path);
        let root = root_of(input, &p.path);
        components.push(Component {
            kind: "library",
            bom_ref: &p.path,
            name,
            version,
            hashes: nar_hash_hex(&p.nar_hash)
                .map(|content| Hash {
                    alg: "SHA-256",
                    content,
                })
                .into_iter()
                .collect(),
            licenses: root
                .and_then(|r| license_expression(&r.licenses))
                .map(|expression| License { expression })
                .into_iter()
                .collect(),
            purl: Some(purl(&p.path)),
            external_references: root
                .and_then(|r| r.homepage.as_deref())
                .map(|url| ExternalReference {
                    kind: "website",
                    url,
                })
                .into_iter()
                .collect(),
            properties: vec![
                Property {
                    name: "nix:store_path",
                    value: p.path.clone(),
                },
                Property {
                    name: "nix:nar_hash",
                    value: p.nar_hash.clone(),
                },
                Property {
                    name: "nix:nar_size",
                    value: p.nar_size.to_string(),
                },
            ],
        });
        dependencies.push(Dependency {
            reference: &p.path,
            depends_on: p
                .references
                .iter()
                .filter(|r| **r != p.path)
                .map(String::as_str)
                .collect(),
        });
    }
    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.6",
        serial_number: serial_number(input),
        version: 1,
        metadata: Metadata {
            timestamp: CREATED,
            tools: Tools {
                components: vec![Tool {
                    kind: "application",
                    name: "nixery",
                    version: env!("CARGO_PKG_VERSION"),
                }],
            },
            component: Component {
                kind: "container",
                bom_ref: IMAGE_REF,
                name: input.image,
                version: input.revision,
                hashes: vec![],
                licenses: vec![],
                purl: None,
                external_references: vec![],
                properties: image_properties,
            },
        },
        components,
        dependencies,
    };
    serde_json::to_vec_pretty(&bom)
}
