//! The host's Nix database, read-only: what the host store holds, with the hashes,
//! sizes, references and signatures Nix recorded when each path became valid.
//!
//! Opened with SQLite's read-only flag, never `immutable`: the host's Nix keeps
//! writing it (in WAL mode), and a reader on the same machine sees each commit. A
//! query that waits for a lock gives up after `BUSY_TIMEOUT`; the caller then answers
//! "not here", and the guest gets the path elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::narinfo::{PathInfo, STORE_DIR, Sha256};

/// Longest wait for the host's Nix to release a lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// The schema version this reader understands (`/nix/var/nix/db/schema`; Nix has
/// written 10 since 2.0).
const SCHEMA: &str = "10";

/// Connections kept open between queries.
const POOL: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the host's Nix database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "the host's Nix database {path} has schema {found:?}, not {SCHEMA}; this darwin-vz-nix does not know that Nix version's database"
    )]
    Schema { path: PathBuf, found: String },
    #[error("reading the host's Nix database failed: {0}")]
    Query(String),
    #[error("{0}")]
    Invalid(String),
}

/// The database of one host store, with a few open connections.
pub struct StoreDb {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl StoreDb {
    /// Nothing is opened until the first query.
    pub fn new(path: &Path) -> StoreDb {
        StoreDb {
            path: path.to_path_buf(),
            pool: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The valid path whose hash part is `hash_part`, if the host has one. Blocks (on
    /// SQLite): call it off the async workers.
    pub fn query(&self, hash_part: &str) -> Result<Option<PathInfo>, DbError> {
        let connection = match self.take() {
            Some(connection) => connection,
            None => self.open()?,
        };
        let result = lookup(&connection, hash_part);
        if result.is_ok() {
            self.give_back(connection);
        }
        result
    }

    fn take(&self) -> Option<Connection> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
    }

    fn give_back(&self, connection: Connection) {
        let mut pool = self
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pool.len() < POOL {
            pool.push(connection);
        }
    }

    fn open(&self) -> Result<Connection, DbError> {
        let open_error = |message: String| DbError::Open {
            path: self.path.clone(),
            message,
        };
        let schema_path = self.path.with_file_name("schema");
        let schema = std::fs::read(&schema_path)
            .map_err(|e| open_error(format!("{}: {e}", schema_path.display())))?;
        let schema = String::from_utf8_lossy(schema.get(..16).unwrap_or(&schema))
            .trim()
            .to_string();
        if schema != SCHEMA {
            return Err(DbError::Schema {
                path: self.path.clone(),
                found: schema,
            });
        }
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(e.to_string()))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_error(e.to_string()))?;
        Ok(connection)
    }
}

/// Nix's own lookup by hash part (`queryPathFromHashPart`): the first path at or
/// after `<store>/<hash>`, if it starts with `<store>/<hash>-`.
fn lookup(connection: &Connection, hash_part: &str) -> Result<Option<PathInfo>, DbError> {
    let query = |e: rusqlite::Error| DbError::Query(e.to_string());
    let prefix = format!("{STORE_DIR}/{hash_part}");
    let row = connection
        .prepare_cached(
            "SELECT id, path, hash, deriver, narSize, sigs, ca FROM ValidPaths \
             WHERE path >= ?1 ORDER BY path LIMIT 1",
        )
        .map_err(query)?
        .query_row([&prefix], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, Option<i64>>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, Option<String>>(6)?,
            ))
        })
        .optional()
        .map_err(query)?;
    let Some((id, path, hash, deriver, nar_size, sigs, ca)) = row else {
        return Ok(None);
    };
    if !path.starts_with(&format!("{prefix}-")) {
        return Ok(None);
    }
    let invalid = |what: &str| DbError::Invalid(format!("{path}: {what} in the host's database"));
    let nar_hash = Sha256::parse_db(&hash).ok_or_else(|| invalid("an unknown hash format"))?;
    let nar_size = nar_size
        .and_then(|size| u64::try_from(size).ok())
        .filter(|size| *size > 0)
        .ok_or_else(|| invalid("no NAR size"))?;
    let mut references: Vec<String> = connection
        .prepare_cached(
            "SELECT path FROM Refs JOIN ValidPaths ON reference = id WHERE referrer = ?1",
        )
        .map_err(query)?
        .query_map([id], |row| row.get::<_, String>(0))
        .map_err(query)?
        .collect::<Result<_, _>>()
        .map_err(query)?;
    references.sort();
    let info = PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver: deriver.filter(|d| !d.is_empty()),
        sigs: sigs
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect(),
        ca: ca.filter(|ca| !ca.is_empty()),
    };
    info.check().map_err(|e| DbError::Invalid(e.to_string()))?;
    Ok(Some(info))
}
