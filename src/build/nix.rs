//! Async wrappers around the Nix command line tools. Every invocation runs
//! under [`process::run`]: its own process group, a timeout, bounded output.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::build::process::{self, ProcessError};
use crate::build::store_path::PathInfo;

/// Which Nix operation an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Evaluating prepare-image.nix (`nix-instantiate`).
    Resolve,
    /// Building derivations and rooting them (`build::realise`).
    Realise,
    /// Reading the runtime closure (`build::realise`, or `nix path-info`).
    Closure,
    /// Copying closures to or from a binary cache (`nix copy`).
    Copy,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Resolve => "resolve",
            Stage::Realise => "realise",
            Stage::Closure => "closure",
            Stage::Copy => "copy",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("nix {stage} timed out after {seconds} s")]
    Timeout { stage: Stage, seconds: u64 },
    #[error("nix {stage} failed ({}): {}", status_text(*.status), last_lines(.stderr, 3))]
    Failed {
        stage: Stage,
        /// Exit status; `None` if Nix was killed by a signal.
        status: Option<i32>,
        /// The end of Nix's stderr (build logs included), at most
        /// [`process::STDERR_TAIL`] bytes.
        stderr: String,
    },
    #[error("could not parse the output of nix {stage}: {source}")]
    Parse {
        stage: Stage,
        #[source]
        source: serde_json::Error,
    },
    #[error("I/O error while running nix {stage}: {source}")]
    Io {
        stage: Stage,
        #[source]
        source: io::Error,
    },
    #[error("nix reports {path} as not valid (is it built?)")]
    InvalidPath { path: String },
    /// Nix's own error for a request (`realise`): its message after the
    /// end of the build log, at most [`process::STDERR_TAIL`] bytes.
    #[error("nix {stage} failed: {}", last_lines(.log, 3))]
    Daemon { stage: Stage, log: String },
}

impl NixError {
    /// The last `n` lines of Nix's stderr, for short messages; `None` for
    /// errors that carry no stderr.
    pub fn stderr_tail(&self, n: usize) -> Option<&str> {
        match self {
            NixError::Failed { stderr, .. } | NixError::Daemon { log: stderr, .. } => {
                Some(last_lines(stderr, n))
            }
            _ => None,
        }
    }
}

fn status_text(status: Option<i32>) -> String {
    match status {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    }
}

/// The last `n` lines of `s`, without a trailing newline.
fn last_lines(s: &str, n: usize) -> &str {
    let s = s.trim_end();
    if n == 0 {
        return "";
    }
    match s.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &s[i + 1..],
        None => s,
    }
}

/// A package name resolved to its derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPackage {
    #[serde(rename = "drvPath")]
    pub drv_path: String,
    #[serde(rename = "outPath")]
    pub out_path: String,
    /// The package's `meta.mainProgram`, when it declares one.
    #[serde(rename = "mainProgram", default)]
    pub main_program: Option<String>,
    /// The SPDX identifiers of its `meta.license`, where declared.
    #[serde(default)]
    pub licenses: Vec<String>,
    /// Its `meta.homepage`, where declared.
    #[serde(default)]
    pub homepage: Option<String>,
}

/// The outcome of resolving package names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// Keyed by the name as requested.
    pub found: BTreeMap<String, ResolvedPackage>,
    #[serde(rename = "notFound")]
    pub not_found: Vec<String>,
    /// What the package set was evaluated from.
    #[serde(default)]
    pub source: SourceInfo,
}

/// What prepare-image.nix reports of the package set it evaluated; each
/// field is absent where the source type has no such thing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Store path of the fetched source (not for a local path).
    pub path: Option<String>,
    /// Git commit (fetchGit, flakes in git).
    pub rev: Option<String>,
    /// NAR hash in SRI form (fetchGit, flakes).
    #[serde(rename = "narHash")]
    pub nar_hash: Option<String>,
}

/// Runs Nix. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Nix {
    prepare_image: PathBuf,
    timeout: Duration,
    options: Vec<(String, String)>,
    fetch_ttl: Option<Duration>,
}

impl Nix {
    /// `prepare_image` is the path of `nix/prepare-image.nix`; `options`
    /// are passed as `--option NAME VALUE` to every invocation.
    pub fn new(prepare_image: PathBuf, timeout: Duration, options: Vec<(String, String)>) -> Self {
        Nix {
            prepare_image,
            timeout,
            options,
            fetch_ttl: None,
        }
    }

    /// How long the fetchers may trust a cached download of a moving
    /// source (Nix's `tarball-ttl`, default one hour), so that a re-check
    /// after the image cache TTL really looks again. `--option` given by
    /// the user still wins.
    pub fn with_fetch_ttl(mut self, ttl: Duration) -> Self {
        self.fetch_ttl = Some(ttl);
        self
    }

    /// Names -> derivations via prepare-image.nix; unknown names are
    /// listed, not an error.
    pub async fn resolve(
        &self,
        src_type: &str,
        src_args: &str,
        system: &str,
        packages: &[String],
    ) -> Result<Resolved, NixError> {
        // Names reach Nix only as --argstr values, never as Nix code.
        let packages_json = serde_json::Value::from(packages.to_vec()).to_string();
        let mut args: Vec<OsString> = vec![
            "--eval".into(),
            "--strict".into(),
            "--json".into(),
            // Evaluating drvPath writes .drv files to the store.
            "--read-write-mode".into(),
            self.prepare_image.clone().into(),
        ];
        if src_type == "flake" {
            args.extend([
                "--extra-experimental-features".into(),
                "nix-command flakes".into(),
            ]);
        }
        if let Some(ttl) = self.fetch_ttl {
            let secs = ttl.as_secs().to_string();
            args.extend(["--option".into(), "tarball-ttl".into(), secs.into()]);
        }
        for (name, value) in [
            ("srcType", src_type),
            ("srcArgs", src_args),
            ("system", system),
            ("packages", packages_json.as_str()),
        ] {
            args.extend(["--argstr".into(), name.into(), value.into()]);
        }
        let stdout = self.run(Stage::Resolve, "nix-instantiate", args).await?;
        parse_resolved(&stdout)
    }

    /// The runtime closure of the out paths, from Nix's own metadata.
    pub async fn closure(&self, out_paths: &[String]) -> Result<Vec<PathInfo>, NixError> {
        if out_paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<OsString> = vec![
            "--extra-experimental-features".into(),
            "nix-command".into(),
            "path-info".into(),
            "--json".into(),
            "--recursive".into(),
        ];
        args.extend(out_paths.iter().map(OsString::from));
        let stdout = self.run(Stage::Closure, "nix", args).await?;
        let store_dir = out_paths[0]
            .rsplit_once('/')
            .map_or("/nix/store", |(dir, _)| dir);
        parse_path_info(&stdout, store_dir)
    }

    /// The NAR hash (SRI) of a valid store path, e.g. a fetched tarball.
    pub async fn nar_hash(&self, path: &str) -> Result<String, NixError> {
        let args: Vec<OsString> = vec![
            "--extra-experimental-features".into(),
            "nix-command".into(),
            "path-info".into(),
            "--json".into(),
            path.into(),
        ];
        let stdout = self.run(Stage::Closure, "nix", args).await?;
        parse_nar_hash(&stdout, path)
    }

    /// Copies the closures of `paths` between stores (`nix copy`): to a
    /// binary cache such as `file:///dir`, or from one into the local store.
    /// A file cache is unsigned, so signatures are not required.
    pub async fn copy(
        &self,
        from: Option<&str>,
        to: Option<&str>,
        paths: &[String],
    ) -> Result<(), NixError> {
        let mut args: Vec<OsString> = vec![
            "--extra-experimental-features".into(),
            "nix-command".into(),
            "copy".into(),
            "--no-check-sigs".into(),
        ];
        if let Some(from) = from {
            args.extend(["--from".into(), from.into()]);
        }
        if let Some(to) = to {
            args.extend(["--to".into(), to.into()]);
        }
        args.extend(paths.iter().map(OsString::from));
        self.run(Stage::Copy, "nix", args).await?;
        Ok(())
    }

    /// How long each call may run; other tools a build runs get as long.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The `--option NAME VALUE` pairs every invocation gets.
    pub fn options(&self) -> &[(String, String)] {
        &self.options
    }

    /// Whole seconds for Nix's `--timeout`, at least 1 (0 means none).
    pub fn timeout_secs(&self) -> u64 {
        let secs = self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0);
        secs.max(1)
    }

    /// Runs `program args --option ...` and returns its stdout.
    async fn run(
        &self,
        stage: Stage,
        program: &str,
        mut args: Vec<OsString>,
    ) -> Result<Vec<u8>, NixError> {
        for (name, value) in &self.options {
            args.extend(["--option".into(), name.into(), value.into()]);
        }
        tracing::debug!(%stage, program, args = %crate::redact::redact(&format!("{args:?}")), "running nix");
        let started = Instant::now();
        let mut cmd = Command::new(program);
        cmd.args(&args);
        let done = match process::run(cmd, program, self.timeout).await {
            Ok(done) => done,
            Err(ProcessError::Timeout { .. }) => {
                tracing::warn!(%stage, program, timeout = ?self.timeout, "nix timed out and was stopped");
                return Err(NixError::Timeout {
                    stage,
                    seconds: self.timeout_secs(),
                });
            }
            Err(ProcessError::Spawn { source, .. }) => {
                return Err(NixError::Spawn {
                    program: program.to_string(),
                    source,
                })
            }
            Err(e @ (ProcessError::Io { .. } | ProcessError::TooMuchOutput { .. })) => {
                return Err(NixError::Io {
                    stage,
                    source: io::Error::other(e.to_string()),
                })
            }
        };
        let status = done.status;
        // Nix echoes the source URL, credentials included.
        let stderr = crate::redact::redact(&done.stderr).into_owned();
        tracing::debug!(%stage, program, elapsed = ?started.elapsed(), ?status, "nix finished");
        if status.success() {
            return Ok(done.stdout);
        }
        tracing::warn!(%stage, program, ?status, %stderr, "nix failed");
        Err(NixError::Failed {
            stage,
            status: status.code(),
            stderr,
        })
    }
}

/// prepare-image.nix evaluates to a string holding the JSON object (see
/// there why); a plain object is accepted too.
fn parse_resolved(stdout: &[u8]) -> Result<Resolved, NixError> {
    let parse = |source| NixError::Parse {
        stage: Stage::Resolve,
        source,
    };
    match serde_json::from_slice(stdout).map_err(parse)? {
        serde_json::Value::String(inner) => serde_json::from_str(&inner).map_err(parse),
        value => serde_json::from_value(value).map_err(parse),
    }
}

/// `narHash` from either `nix path-info --json` shape (see below).
fn parse_nar_hash(stdout: &[u8], path: &str) -> Result<String, NixError> {
    let value: serde_json::Value =
        serde_json::from_slice(stdout).map_err(|source| NixError::Parse {
            stage: Stage::Closure,
            source,
        })?;
    let record = match &value {
        serde_json::Value::Array(items) => items.first(),
        serde_json::Value::Object(map) => map.values().next(),
        _ => None,
    };
    record
        .and_then(|r| r.get("narHash"))
        .and_then(|h| h.as_str())
        .map(str::to_owned)
        .ok_or_else(|| NixError::InvalidPath {
            path: path.to_owned(),
        })
}

/// One `nix path-info --json` record, minus the path itself.
#[derive(Deserialize)]
struct PathInfoRecord {
    /// Absent for paths that are not valid.
    #[serde(rename = "narSize")]
    nar_size: Option<u64>,
    #[serde(rename = "narHash", default)]
    nar_hash: String,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
}

/// Nix up to 2.18 prints a list of records with a `path`.
#[derive(Deserialize)]
struct PathInfoListRecord {
    path: String,
    #[serde(flatten)]
    record: PathInfoRecord,
}

/// Parses both `nix path-info --json` shapes: a list of records (Nix up to
/// 2.18) and an object keyed by path, `null` for invalid paths (2.19+).
/// Paths given relative to the store are made absolute with `store_dir`.
fn parse_path_info(stdout: &[u8], store_dir: &str) -> Result<Vec<PathInfo>, NixError> {
    let parse = |source| NixError::Parse {
        stage: Stage::Closure,
        source,
    };
    let records: Vec<(String, Option<PathInfoRecord>)> = match serde_json::from_slice(stdout)
        .map_err(parse)?
    {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|item| {
                serde_json::from_value::<PathInfoListRecord>(item).map(|r| (r.path, Some(r.record)))
            })
            .collect::<Result<_, _>>()
            .map_err(parse)?,
        value => serde_json::from_value::<BTreeMap<String, Option<PathInfoRecord>>>(value)
            .map_err(parse)?
            .into_iter()
            .collect(),
    };

    let absolute = |p: String| {
        if p.starts_with('/') {
            p
        } else {
            format!("{store_dir}/{p}")
        }
    };
    let mut closure = BTreeMap::new();
    for (path, record) in records {
        let path = absolute(path);
        let Some(PathInfoRecord {
            nar_size: Some(nar_size),
            nar_hash,
            references,
            deriver,
        }) = record
        else {
            return Err(NixError::InvalidPath { path });
        };
        let mut references: Vec<String> = references.into_iter().map(absolute).collect();
        references.sort();
        references.dedup();
        closure.insert(
            path.clone(),
            PathInfo {
                path,
                nar_size,
                nar_hash,
                references,
                deriver: deriver.map(absolute),
            },
        );
    }
    Ok(closure.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLIBC: &str = "/nix/store/c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36";
    const HELLO: &str = "/nix/store/mp2idg5w9j21l85c53gb9bkmfpk0ggbx-hello-2.10";

    fn expected() -> Vec<PathInfo> {
        vec![
            PathInfo {
                path: GLIBC.into(),
                nar_size: 4222208,
                nar_hash: "sha256-VXNLXKcgum2EwRhUjtpIPtXyPfSygtUUhihX+gTMC9c=".into(),
                references: vec![],
                deriver: Some("/nix/store/apnrvjqcc1n26sg1mx93a49ssz8rghvk-glibc-2.36.drv".into()),
            },
            PathInfo {
                path: HELLO.into(),
                nar_size: 36184,
                nar_hash: "sha256-HN6s3W77d31JI9vCFh2UtbpCh7cY+Q/9PYObrX/kXYI=".into(),
                references: vec![GLIBC.into()],
                deriver: Some("/nix/store/q4qpdi3l7v7pa7szykywqvjyaaxx30za-hello-2.10.drv".into()),
            },
        ]
    }

    #[test]
    fn path_info_list_shape() {
        // Verbatim from Nix 2.8.
        let json = r#"[{"path":"/nix/store/c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36","narHash":"sha256-VXNLXKcgum2EwRhUjtpIPtXyPfSygtUUhihX+gTMC9c=","narSize":4222208,"references":[],"deriver":"/nix/store/apnrvjqcc1n26sg1mx93a49ssz8rghvk-glibc-2.36.drv","registrationTime":1795440069,"ultimate":true},{"path":"/nix/store/mp2idg5w9j21l85c53gb9bkmfpk0ggbx-hello-2.10","narHash":"sha256-HN6s3W77d31JI9vCFh2UtbpCh7cY+Q/9PYObrX/kXYI=","narSize":36184,"references":["/nix/store/c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36"],"deriver":"/nix/store/q4qpdi3l7v7pa7szykywqvjyaaxx30za-hello-2.10.drv","registrationTime":1795440069,"ultimate":true}]"#;
        let got = parse_path_info(json.as_bytes(), "/nix/store").unwrap();
        assert_eq!(got, expected());
    }

    #[test]
    fn path_info_object_shape() {
        // The Nix 2.19+ shape, hello first to check the output is sorted.
        let json = r#"{
          "/nix/store/mp2idg5w9j21l85c53gb9bkmfpk0ggbx-hello-2.10": {
            "ca": null, "deriver": "/nix/store/q4qpdi3l7v7pa7szykywqvjyaaxx30za-hello-2.10.drv",
            "narHash": "sha256-HN6s3W77d31JI9vCFh2UtbpCh7cY+Q/9PYObrX/kXYI=", "narSize": 36184,
            "references": ["/nix/store/c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36"],
            "registrationTime": 1795440069, "signatures": [], "ultimate": true
          },
          "/nix/store/c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36": {
            "ca": null, "deriver": "/nix/store/apnrvjqcc1n26sg1mx93a49ssz8rghvk-glibc-2.36.drv", "narHash": "sha256-VXNLXKcgum2EwRhUjtpIPtXyPfSygtUUhihX+gTMC9c=",
            "narSize": 4222208, "references": [], "signatures": [], "ultimate": true
          }
        }"#;
        let got = parse_path_info(json.as_bytes(), "/nix/store").unwrap();
        assert_eq!(got, expected());
    }

    #[test]
    fn path_info_relative_paths_are_made_absolute() {
        let json = r#"{"mp2idg5w9j21l85c53gb9bkmfpk0ggbx-hello-2.10": {"narSize": 36184,
          "references": ["c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36"]},
          "c2a5w403b5l4xcazdzw2d66p48p0hzpk-glibc-2.36": {"narSize": 4222208, "references": []}}"#;
        let got = parse_path_info(json.as_bytes(), "/nix/store").unwrap();
        let mut want = expected();
        for p in &mut want {
            p.nar_hash.clear();
            p.deriver = None;
        }
        assert_eq!(got, want);
    }

    #[test]
    fn path_info_invalid_paths_are_errors() {
        let list = r#"[{"path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","valid":false}]"#;
        let object = r#"{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x": null}"#;
        for json in [list, object] {
            match parse_path_info(json.as_bytes(), "/nix/store") {
                Err(NixError::InvalidPath { path }) => {
                    assert_eq!(path, "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
                }
                other => panic!("expected InvalidPath, got {other:?}"),
            }
        }
    }

    #[test]
    fn path_info_garbage_is_a_parse_error() {
        for json in [
            "",
            "42",
            r#"[{"narSize": 1}]"#,
            r#"{"/x": {"narSize": "big"}}"#,
        ] {
            assert!(
                matches!(
                    parse_path_info(json.as_bytes(), "/nix/store"),
                    Err(NixError::Parse {
                        stage: Stage::Closure,
                        ..
                    })
                ),
                "{json:?}"
            );
        }
    }

    #[test]
    fn resolved_from_string_or_object() {
        let object = r#"{"found":{"hello":{"drvPath":"/nix/store/a.drv","outPath":"/nix/store/a"}},"notFound":["x"]}"#;
        let string = serde_json::Value::from(object).to_string();
        for json in [object, string.as_str()] {
            let got = parse_resolved(json.as_bytes()).unwrap();
            assert_eq!(got.not_found, vec!["x".to_string()]);
            assert_eq!(got.found["hello"].drv_path, "/nix/store/a.drv");
            assert_eq!(got.found["hello"].out_path, "/nix/store/a");
        }
        assert!(parse_resolved(br#""not json""#).is_err());
        assert_eq!(
            parse_resolved(object.as_bytes()).unwrap().source,
            SourceInfo::default()
        );
        let with_source = r#"{"found":{},"notFound":[],"source":{"path":"/nix/store/s","rev":null,"narHash":"sha256-x"}}"#;
        let source = parse_resolved(with_source.as_bytes()).unwrap().source;
        assert_eq!(source.path.as_deref(), Some("/nix/store/s"));
        assert_eq!(
            (source.rev, source.nar_hash.as_deref()),
            (None, Some("sha256-x"))
        );
    }

    #[test]
    fn nar_hash_from_either_path_info_shape() {
        let list = br#"[{"path":"/nix/store/s","narHash":"sha256-a","narSize":1}]"#;
        let object = br#"{"/nix/store/s":{"narHash":"sha256-a","narSize":1}}"#;
        for json in [&list[..], &object[..]] {
            assert_eq!(parse_nar_hash(json, "/nix/store/s").unwrap(), "sha256-a");
        }
        assert!(matches!(
            parse_nar_hash(br#"{"/nix/store/s":null}"#, "/nix/store/s"),
            Err(NixError::InvalidPath { .. })
        ));
    }

    #[test]
    fn stderr_tail_and_message() {
        let err = NixError::Failed {
            stage: Stage::Realise,
            status: Some(100),
            stderr: "one\ntwo\nthree\nfour\n".into(),
        };
        assert_eq!(err.stderr_tail(2), Some("three\nfour"));
        assert_eq!(err.stderr_tail(10), Some("one\ntwo\nthree\nfour"));
        assert_eq!(err.stderr_tail(0), Some(""));
        assert_eq!(
            err.to_string(),
            "nix realise failed (exit status 100): two\nthree\nfour"
        );
        let timeout = NixError::Timeout {
            stage: Stage::Resolve,
            seconds: 2,
        };
        assert_eq!(timeout.stderr_tail(3), None);
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let nix = Nix::new(PathBuf::new(), Duration::from_secs(5), vec![]);
        let err = nix
            .run(Stage::Resolve, "/nonexistent/nix-instantiate", vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, NixError::Spawn { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        // A unique duration marks this test's processes.
        let marker = "30.4817";
        let script = format!("sleep {marker} & sleep {marker}; wait");
        let nix = Nix::new(PathBuf::new(), Duration::from_millis(300), vec![]);
        let started = Instant::now();
        let err = nix
            .run(Stage::Realise, "/bin/sh", vec!["-c".into(), script.into()])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                NixError::Timeout {
                    stage: Stage::Realise,
                    seconds: 1
                }
            ),
            "{err:?}"
        );
        // sh dies on SIGTERM at once, without waiting for the grace period.
        assert!(started.elapsed() < Duration::from_secs(2));
        let left = || -> Vec<Vec<u8>> {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(marker))
                .collect()
        };
        // Signals are delivered asynchronously: give the sleeps a moment.
        for _ in 0..20 {
            if left().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = left();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn timeout_secs_rounds_up() {
        let nix = |d| Nix::new(PathBuf::new(), d, vec![]).timeout_secs();
        assert_eq!(nix(Duration::from_millis(1)), 1);
        assert_eq!(nix(Duration::from_millis(2500)), 3);
        assert_eq!(nix(Duration::from_secs(2)), 2);
    }
}
