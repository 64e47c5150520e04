//! Forgetting image names: what the database keeps per name besides its
//! images (its tags, the total and the days of its pulls) goes once the
//! name has no page, or it would grow with every name a client ever asked
//! for.

use super::{Db, DbError};
use std::collections::BTreeSet;

impl Db {
    /// Forgets every name `keep` refuses: its tags (the list of images on
    /// `/` and `tags/list`; unless not `with_tags`), the total of its
    /// pulls and its pulls per day; how many names. A name with a tag
    /// record stays whatever `keep` says, so a build that recorded one
    /// after `keep`'s names were read keeps its place in the list.
    pub fn forget_names(
        &self,
        keep: impl Fn(&str) -> bool,
        with_tags: bool,
    ) -> Result<usize, DbError> {
        let mut gone: BTreeSet<Vec<u8>> = BTreeSet::new();
        for tree in [&self.pulls, &self.image_pulls] {
            for name in tree.iter().keys() {
                gone.insert(name?.to_vec());
            }
        }
        for key in self.tags.iter().keys() {
            let key = key?;
            let name = key.split(|&b| b == 0).next().unwrap_or(&key);
            gone.insert(name.to_vec());
        }
        gone.retain(|name| !keep(&String::from_utf8_lossy(name)));
        let mut forgotten = 0;
        for name in gone {
            let prefix = [&name[..], b"\0"].concat();
            if self.has_tag_record(&prefix)? {
                continue;
            }
            self.pulls.remove(&name)?;
            self.image_pulls.remove(&name)?;
            if !with_tags {
                forgotten += 1;
                continue;
            }
            for key in self.tags.scan_prefix(&prefix).keys() {
                let key = key?;
                self.tags.remove(&key)?;
                // `put_tag_record` writes the record before the tag: one
                // recorded since the look above is seen here, or its tag
                // is written after this removal.
                if self.pinned.contains_key(&key)? || self.built_tags.contains_key(&key)? {
                    self.tags.insert(&key, &[])?;
                }
            }
            forgotten += 1;
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
    fn a_refused_name_loses_its_tags_and_pulls_unless_a_tag_is_recorded() {
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

        // Without tags (a replica of a bucket): the pulls go, the list stays.
        db.add_tag("cached", "latest").unwrap();
        db.add_manifest_requests(0, 0, &HashMap::from([("cached".to_string(), 1)]))
            .unwrap();
        let keep = |name: &str| name != "cached";
        assert_eq!(db.forget_names(keep, false).unwrap(), 1);
        assert_eq!(db.tags("cached").unwrap(), vec!["latest".to_string()]);
        assert_eq!(db.pull_count("cached").unwrap(), 0);
        db.tags.remove("cached\0latest").unwrap();

        let forgotten = db.forget_names(|name| name == "kept", true).unwrap();
        assert_eq!(forgotten, 3, "gone, gone/x and untagged");
        let (total, names) = db.image_names("", 0, 10).unwrap();
        assert_eq!(total, 2);
        assert_eq!(names[0].0, "kept");
        assert_eq!(
            names[1],
            ("recorded".into(), vec!["latest".into(), "v1".into()])
        );
        for name in ["gone", "gone/x", "untagged"] {
            assert!(db.tags(name).unwrap().is_empty(), "{name}");
            assert_eq!(db.pull_count(name).unwrap(), 0, "{name}");
            assert!(db.image_pulls(name).unwrap().days.is_empty(), "{name}");
        }
        for name in ["kept", "recorded"] {
            assert_eq!(db.pull_count(name).unwrap(), 2, "{name}");
            assert_eq!(db.image_pulls(name).unwrap().days, vec![(86_400, 2)]);
        }
        assert_eq!(db.forget_names(|name| name == "kept", true).unwrap(), 0);
    }
}
