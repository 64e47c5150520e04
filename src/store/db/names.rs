//! Forgetting image names: what the database keeps per name besides its
//! images (its tags, the total and the days of its pulls) goes once the
//! name has no page, or it would grow with every name a client ever asked
//! for.

use super::{Db, DbError};
use std::collections::BTreeSet;

/// What [`Db::forget_names`] forgot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// Names, with their pulls.
    pub names: usize,
    /// Tags (of those names, or evicted ones of names that stay).
    pub tags: usize,
}

impl Db {
    /// Forgets every name `keep_name` refuses: the total of its pulls,
    /// its pulls per day and its tags (the list of images on `/` and
    /// `tags/list`); and every other tag `keep_tag` refuses (given
    /// `<name>\0<tag>`). A name or tag with a tag record stays whatever
    /// they say, so a build that recorded one after their sets were read
    /// keeps its place in the list.
    pub fn forget_names(
        &self,
        keep_name: impl Fn(&str) -> bool,
        keep_tag: impl Fn(&[u8]) -> bool,
    ) -> Result<Forgotten, DbError> {
        let mut forgotten = Forgotten::default();
        let mut gone: BTreeSet<Vec<u8>> = BTreeSet::new();
        for tree in [&self.pulls, &self.image_pulls] {
            for name in tree.iter().keys() {
                gone.insert(name?.to_vec());
            }
        }
        gone.retain(|name| !keep_name(&String::from_utf8_lossy(name)));
        for name in gone {
            if self.has_tag_record(&[&name[..], b"\0"].concat())? {
                continue;
            }
            self.pulls.remove(&name)?;
            self.image_pulls.remove(&name)?;
            forgotten.names += 1;
        }
        for key in self.tags.iter().keys() {
            let key = key?;
            let name = key.split(|&b| b == 0).next().unwrap_or(&key);
            if keep_name(&String::from_utf8_lossy(name)) && keep_tag(&key) {
                continue;
            }
            self.tags.remove(&key)?;
            // `put_tag_record` writes the record before the tag: one
            // recorded since the sets were read is seen here, or its tag
            // is written after this removal.
            if self.pinned.contains_key(&key)? || self.built_tags.contains_key(&key)? {
                self.tags.insert(&key, &[])?;
            } else {
                forgotten.tags += 1;
            }
        }
        Ok(forgotten)
    }

    /// Whether a tag of the name (`<name>\0`) is recorded, built or
    /// imported.
    fn has_tag_record(&self, prefix: &[u8]) -> Result<bool, DbError> {
        for tree in [&self.pinned, &self.built_tags] {
            if tree
                .scan_prefix(prefix)
                .keys()
                .next()
                .transpose()?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::store::db::{TagRecord, TagTree};
    use std::collections::HashMap;

    #[test]
    fn refused_names_and_tags_are_forgotten_unless_a_tag_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let record = TagRecord {
            digest: Digest::of(b"m"),
            at: 1,
        };
        for name in ["gone", "gone/x", "kept", "recorded"] {
            db.add_tag(name, "latest").unwrap();
            db.add_tag(name, "v1").unwrap();
        }
        // Recorded meanwhile: refused by `keep`, but it has an image.
        db.put_tag_record(TagTree::Built, "recorded", "v1", &record)
            .unwrap();
        let counts: HashMap<String, u64> = ["gone", "gone/x", "kept", "recorded", "untagged"]
            .iter()
            .map(|n| (n.to_string(), 2))
            .collect();
        db.add_manifest_requests(0, 0, &counts).unwrap();
        db.add_image_pulls(&counts, 86_400).unwrap();

        // Of the kept name, only its tag `latest` is kept.
        let keep_tag = |key: &[u8]| key != b"kept\0v1";
        let forgotten = db.forget_names(|name| name == "kept", keep_tag).unwrap();
        let expected = Forgotten { names: 3, tags: 6 };
        assert_eq!(
            forgotten, expected,
            "gone, gone/x, untagged; kept:v1, recorded:latest"
        );
        let (total, names) = db.image_names("", 0, 10).unwrap();
        assert_eq!(total, 2);
        assert_eq!(names[0], ("kept".into(), vec!["latest".into()]));
        assert_eq!(names[1], ("recorded".into(), vec!["v1".into()]));
        for name in ["gone", "gone/x", "untagged"] {
            assert!(db.tags(name).unwrap().is_empty(), "{name}");
            assert_eq!(db.pull_count(name).unwrap(), 0, "{name}");
            assert!(db.image_pulls(name).unwrap().days.is_empty(), "{name}");
        }
        for name in ["kept", "recorded"] {
            assert_eq!(db.pull_count(name).unwrap(), 2, "{name}");
            assert_eq!(db.image_pulls(name).unwrap().days, vec![(86_400, 2)]);
        }
        let again = db.forget_names(|name| name == "kept", keep_tag).unwrap();
        assert_eq!(again, Forgotten::default());
    }
}
