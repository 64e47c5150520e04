//! The evaluation cache: what each package name evaluated to (derivation,
//! output path, `meta.mainProgram`) at a source revision that cannot
//! change, so that a new combination of known names runs no Nix
//! evaluation at all.
//!
//! Which revisions are fixed (see [`Source::resolve`](crate::build::source::Source::resolve)):
//! a git commit, whatever tag led to it; a nixpkgs channel given as a
//! commit; a flake reference that names a commit. A local path is never
//! cached: its files may change at any moment, and naming its content (a
//! NAR hash, as Nix would compute it) reads the whole tree on every pull,
//! which costs about what the evaluation it would save costs on nixpkgs.
//! Nor is a channel by name or a tarball URL: only evaluating it tells
//! which tarball it was.
//!
//! A record is only trusted while its derivation is still in the Nix
//! store: a collected `.drv` makes the name unknown, so it is evaluated
//! again (which writes the `.drv` back). Collected outputs are rebuilt
//! from their derivation by the realisation every build runs.

use crate::build::nix::ResolvedPackage;
use crate::store::db::{Db, DbError, EvalRecord};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Everything an evaluation depends on besides Nix itself.
#[derive(Debug, Clone)]
pub struct Revision {
    /// The source's stable description ([`crate::build::source::Source::describe`]).
    pub source: String,
    /// The commit evaluated.
    pub commit: String,
    /// The Nix system evaluated for.
    pub system: String,
}

impl Revision {
    /// The record key of a package name at this revision.
    fn key(&self, name: &str) -> String {
        let mut h = Sha256::new();
        for part in ["eval-v1", &self.source, &self.commit, &self.system, name] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }
}

/// Package names split by whether the cache knows them.
#[derive(Debug, Default)]
pub struct Known {
    pub found: BTreeMap<String, ResolvedPackage>,
    pub unknown: Vec<String>,
}

/// Looks each name up; blocking (sled, and a stat per derivation).
pub fn lookup(db: &Db, revision: &Revision, names: &[String]) -> Result<Known, DbError> {
    let mut known = Known::default();
    for name in names {
        let record = db
            .evaluation(&revision.key(name))?
            .filter(|r| Path::new(&r.drv_path).exists());
        match record {
            Some(r) => {
                known.found.insert(
                    name.clone(),
                    ResolvedPackage {
                        drv_path: r.drv_path,
                        out_path: r.out_path,
                        main_program: r.main_program,
                        licenses: r.licenses,
                        homepage: r.homepage,
                    },
                );
            }
            None if !known.unknown.contains(name) => known.unknown.push(name.clone()),
            None => {}
        }
    }
    Ok(known)
}

/// Remembers what names evaluated to; blocking.
pub fn remember(
    db: &Db,
    revision: &Revision,
    found: &BTreeMap<String, ResolvedPackage>,
) -> Result<(), DbError> {
    let records: Vec<(String, EvalRecord)> = found
        .iter()
        .map(|(name, p)| {
            let record = EvalRecord {
                drv_path: p.drv_path.clone(),
                out_path: p.out_path.clone(),
                main_program: p.main_program.clone(),
                licenses: p.licenses.clone(),
                homepage: p.homepage.clone(),
            };
            (revision.key(name), record)
        })
        .collect();
    db.put_evaluations(&records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev() -> Revision {
        Revision {
            source: "git:file:///r".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            system: "x86_64-linux".into(),
        }
    }

    fn package(drv: &Path) -> ResolvedPackage {
        ResolvedPackage {
            drv_path: drv.to_string_lossy().into_owned(),
            out_path: "/nix/store/x-hello".into(),
            main_program: Some("hello".into()),
            licenses: vec!["GPL-3.0-or-later".into()],
            homepage: Some("https://www.gnu.org/software/hello/".into()),
        }
    }

    #[test]
    fn known_names_are_found_until_their_derivation_goes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let drv = dir.path().join("x-hello.drv");
        std::fs::write(&drv, "Derive()").unwrap();
        let found = BTreeMap::from([("hello".to_owned(), package(&drv))]);
        remember(&db, &rev(), &found).unwrap();

        let names = vec!["hello".to_owned(), "jq".to_owned(), "jq".to_owned()];
        let known = lookup(&db, &rev(), &names).unwrap();
        assert_eq!(known.found, found);
        assert_eq!(known.unknown, vec!["jq".to_owned()]);

        // Another commit, system or source knows nothing.
        for other in [
            Revision {
                commit: "1123456789abcdef0123456789abcdef01234567".into(),
                ..rev()
            },
            Revision {
                system: "aarch64-linux".into(),
                ..rev()
            },
            Revision {
                source: "git:file:///s".into(),
                ..rev()
            },
        ] {
            assert_eq!(lookup(&db, &other, &names).unwrap().found.len(), 0);
        }

        std::fs::remove_file(&drv).unwrap();
        let known = lookup(&db, &rev(), &names).unwrap();
        assert!(known.found.is_empty());
        assert_eq!(known.unknown, vec!["hello".to_owned(), "jq".to_owned()]);
    }
}
