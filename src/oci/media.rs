//! Media types, and the two manifest vocabularies a client may ask for.

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const LIST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The config of an artifact manifest that has none (image-spec 1.1).
pub const OCI_EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// The two manifest vocabularies a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => MANIFEST_MEDIA_TYPE,
            Format::Oci => OCI_MANIFEST_MEDIA_TYPE,
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Format::Docker => LIST_MEDIA_TYPE,
            Format::Oci => OCI_INDEX_MEDIA_TYPE,
        }
    }

    pub(crate) fn config_type(self) -> &'static str {
        match self {
            Format::Docker => CONFIG_MEDIA_TYPE,
            Format::Oci => OCI_CONFIG_MEDIA_TYPE,
        }
    }

    pub(crate) fn layer_type(self) -> &'static str {
        match self {
            Format::Docker => LAYER_MEDIA_TYPE,
            Format::Oci => OCI_LAYER_MEDIA_TYPE,
        }
    }
}
