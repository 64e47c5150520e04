//! Which manifest form a client asked for, from its `Accept` headers.

use crate::oci::media::{
    Format, LIST_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE,
};
use axum::http::{header, HeaderMap};

/// The media types a client accepts, with their quality (`q`).
#[derive(Debug, Default)]
pub struct Accept {
    types: Vec<(String, f32)>,
}

impl Accept {
    /// Every `Accept` header, each a comma-separated list.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut types = Vec::new();
        for value in headers.get_all(header::ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let media_type = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                if media_type.is_empty() {
                    continue;
                }
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                types.push((media_type, q));
            }
        }
        Accept { types }
    }

    /// How much the client wants `media_type` (its `q`); `None` when it
    /// does not accept it.
    fn rank(&self, media_type: &str) -> Option<f32> {
        self.types
            .iter()
            .find(|(t, q)| t == media_type && *q > 0.0)
            .map(|(_, q)| *q)
    }

    /// OCI when the client gives the OCI manifest a higher `q` than Docker
    /// schema2 (or accepts only OCI); Docker schema2 otherwise, also with no
    /// `Accept`. The order of equal types does not count: docker lists them
    /// in a different order from one pull to the next, and the same client
    /// must always get the same digest.
    pub fn manifest_format(&self) -> Format {
        match (
            self.rank(OCI_MANIFEST_MEDIA_TYPE),
            self.rank(MANIFEST_MEDIA_TYPE),
        ) {
            (Some(oci), Some(docker)) if oci > docker => Format::Oci,
            (Some(_), None) => Format::Oci,
            _ => Format::Docker,
        }
    }

    /// The index a client takes: an OCI index whenever it accepts one, a
    /// Docker manifest list for a client that accepts only that.
    pub fn index_format(&self) -> Option<Format> {
        if self.rank(OCI_INDEX_MEDIA_TYPE).is_some() {
            Some(Format::Oci)
        } else if self.rank(LIST_MEDIA_TYPE).is_some() {
            Some(Format::Docker)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(values: &[&str]) -> Accept {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        Accept::from_headers(&h)
    }

    #[test]
    fn docker_unless_oci_is_preferred() {
        assert_eq!(accept(&[]).manifest_format(), Format::Docker);
        assert_eq!(accept(&["*/*"]).manifest_format(), Format::Docker);
        assert_eq!(
            accept(&[OCI_MANIFEST_MEDIA_TYPE]).manifest_format(),
            Format::Oci
        );
        let both = format!("{OCI_MANIFEST_MEDIA_TYPE}, {MANIFEST_MEDIA_TYPE}");
        assert_eq!(accept(&[&both]).manifest_format(), Format::Docker);
        let oci_preferred = format!("{OCI_MANIFEST_MEDIA_TYPE}, {MANIFEST_MEDIA_TYPE};q=0.9");
        assert_eq!(accept(&[&oci_preferred]).manifest_format(), Format::Oci);
        let docker_first = [MANIFEST_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE];
        assert_eq!(accept(&docker_first).manifest_format(), Format::Docker);
        let weighted = format!("{MANIFEST_MEDIA_TYPE};q=0.5, {OCI_MANIFEST_MEDIA_TYPE}");
        assert_eq!(accept(&[&weighted]).manifest_format(), Format::Oci);
        let refused = format!("{OCI_MANIFEST_MEDIA_TYPE};q=0");
        assert_eq!(accept(&[&refused]).manifest_format(), Format::Docker);
    }

    #[test]
    fn index_when_accepted() {
        assert_eq!(accept(&[MANIFEST_MEDIA_TYPE]).index_format(), None);
        assert_eq!(
            accept(&[MANIFEST_MEDIA_TYPE, LIST_MEDIA_TYPE]).index_format(),
            Some(Format::Docker)
        );
        assert_eq!(
            accept(&[LIST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE]).index_format(),
            Some(Format::Oci)
        );
    }
}
