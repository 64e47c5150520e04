//! The database layout version and the migrations between versions, run
//! by `Db::open` before anything else reads the database.
//!
//! Layouts:
//! - 1 (no `meta/schema` key): record values were bare bincode.
//! - 2: every record value starts with its record version byte
//!   ([`super::Record::VERSION`]); version 1 of each record is the bincode
//!   that layout 1 stored, so migrating prefixes each value with `1`.
//!
//! A migration rewrites one tree at a time in a transaction that also
//! marks the tree done, so a crash in the middle resumes where it stopped
//! and never migrates a value twice. A database at the current version is
//! only read: starting writes nothing.

use super::DbError;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// The layout this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

const META: &str = "meta";
const SCHEMA_KEY: &str = "schema";

/// Trees whose values are records (the others hold counters or markers).
const RECORD_TREES: [&str; 4] = ["manifests", "layers", "builds", "errors"];

/// Every tree a layout-1 database may have.
const LAYOUT_1_TREES: [&str; 9] = [
    "manifests",
    "manifest_digests",
    "layers",
    "popularity",
    "builds",
    "tags",
    "errors",
    "pulls",
    "lookups",
];

/// Brings the database to [`SCHEMA_VERSION`].
pub fn run(db: &sled::Db) -> Result<(), DbError> {
    let meta = db.open_tree(META)?;
    let found = match meta.get(SCHEMA_KEY)? {
        Some(v) => {
            let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| DbError::Migration {
                from: 0,
                message: format!("the layout version is {} bytes, not 4", v.len()),
            })?;
            u32::from_be_bytes(bytes)
        }
        None if is_empty(db)? => {
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            return Ok(());
        }
        None => 1,
    };
    if found > SCHEMA_VERSION {
        return Err(DbError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == 1 {
        tracing::info!("migrating the database from layout 1 to 2");
        for name in RECORD_TREES {
            prefix_record_versions(db, &meta, name)?;
        }
    }
    if found < SCHEMA_VERSION {
        meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
        for name in RECORD_TREES {
            meta.remove(done_key(name))?;
        }
        db.flush()?;
        tracing::info!(from = found, to = SCHEMA_VERSION, "database migrated");
    }
    Ok(())
}

/// Whether no tree of any layout holds anything yet (a new database).
fn is_empty(db: &sled::Db) -> Result<bool, DbError> {
    for name in LAYOUT_1_TREES {
        if !db.open_tree(name)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn done_key(tree: &str) -> String {
    format!("migrated-to-2/{tree}")
}

/// Layout 1 -> 2 for one tree: each value gains the version byte 1.
fn prefix_record_versions(db: &sled::Db, meta: &sled::Tree, name: &str) -> Result<(), DbError> {
    let done = done_key(name);
    if meta.contains_key(&done)? {
        return Ok(());
    }
    let tree = db.open_tree(name)?;
    let mut values = Vec::with_capacity(tree.len());
    for kv in tree.iter() {
        let (k, v) = kv?;
        let mut prefixed = Vec::with_capacity(v.len() + 1);
        prefixed.push(1u8);
        prefixed.extend_from_slice(&v);
        values.push((k, prefixed));
    }
    (&tree, meta)
        .transaction(|(tree, meta)| {
            for (k, v) in &values {
                tree.insert(k, v.as_slice())?;
            }
            meta.insert(done.as_bytes(), &[])?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            TransactionError::Storage(e) => DbError::Sled(e),
            TransactionError::Abort(()) => DbError::Migration {
                from: 1,
                message: format!("the transaction for tree {name} was aborted"),
            },
        })?;
    Ok(())
}
