//! Popularity data (`NIX_POPULARITY_URL`): JSON `{"<store path name>": count}`
//! from a file or an http(s) URL, as the original's popcount writes it.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    #[error("could not read popularity file {path:?}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "could not fetch popularity data from {}: {}",
        crate::redact::redact(url),
        crate::redact::redact(&source.to_string())
    )]
    Fetch { url: String, source: reqwest::Error },
    #[error(
        "popularity data from {} is not a JSON object of counts: {source}",
        crate::redact::redact(from)
    )]
    Parse {
        from: String,
        source: serde_json::Error,
    },
}

/// Loads popularity counts from a file path or an http(s) URL.
pub async fn load(location: &str) -> Result<HashMap<String, u64>, PopularityError> {
    let bytes = if location.starts_with("http://") || location.starts_with("https://") {
        let fetch = |source| PopularityError::Fetch {
            url: location.to_owned(),
            source,
        };
        reqwest::get(location)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(fetch)?
            .bytes()
            .await
            .map_err(fetch)?
            .to_vec()
    } else {
        let path = location.strip_prefix("file://").unwrap_or(location);
        tokio::fs::read(Path::new(path))
            .await
            .map_err(|source| PopularityError::Read {
                path: path.to_owned(),
                source,
            })?
    };
    serde_json::from_slice(&bytes).map_err(|source| PopularityError::Parse {
        from: location.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_a_file_and_rejects_bad_json() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("pop.json");
        std::fs::write(&good, r#"{"hello-2.12": 7, "glibc-2.36": 1000}"#).unwrap();
        let counts = load(good.to_str().unwrap()).await.unwrap();
        assert_eq!(counts["glibc-2.36"], 1000);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "[1,2]").unwrap();
        assert!(matches!(
            load(bad.to_str().unwrap()).await,
            Err(PopularityError::Parse { .. })
        ));
        assert!(matches!(
            load("/no/such/file").await,
            Err(PopularityError::Read { .. })
        ));
    }
}
