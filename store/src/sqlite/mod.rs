//! The SQLite backend: one database file in WAL mode, one writer connection and a few readers.
//!
//! Every conditional write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's write
//! lock for the whole database (across processes too), so the precondition read and the write
//! form one compare-and-swap. Readers use their own connections and see every committed write.

mod hub;
mod provisioning;
mod query;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use zerotouch_engine::StoreError;

/// Schema migrations: entry `i` brings a database from `user_version` `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: provisioning and hub tables. Documents are hundreds of bytes, so the tables keep rowids
    // (WITHOUT ROWID suits small rows only) with a unique index on the key; the small
    // relation tables of groups are WITHOUT ROWID.
    "
    CREATE TABLE enrollments (
        key TEXT NOT NULL UNIQUE,
        etag TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE TABLE enrollment_groups (
        key TEXT PRIMARY KEY,
        etag TEXT NOT NULL,
        symmetric INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX enrollment_groups_symmetric ON enrollment_groups(symmetric, key);
    CREATE TABLE group_subjects (
        subject TEXT NOT NULL,
        group_key TEXT NOT NULL REFERENCES enrollment_groups(key) ON DELETE CASCADE,
        PRIMARY KEY (subject, group_key)
    ) WITHOUT ROWID;
    CREATE INDEX group_subjects_group ON group_subjects(group_key);
    CREATE TABLE group_ca_refs (
        ca_name TEXT NOT NULL,
        group_key TEXT NOT NULL REFERENCES enrollment_groups(key) ON DELETE CASCADE,
        PRIMARY KEY (ca_name, group_key)
    ) WITHOUT ROWID;
    CREATE INDEX group_ca_refs_group ON group_ca_refs(group_key);
    CREATE TABLE ca_certificates (
        name TEXT PRIMARY KEY,
        etag TEXT NOT NULL,
        subject TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX ca_certificates_subject ON ca_certificates(subject);
    CREATE TABLE registrations (
        key TEXT NOT NULL UNIQUE,
        etag TEXT NOT NULL,
        group_key TEXT,
        doc TEXT NOT NULL
    );
    CREATE INDEX registrations_group ON registrations(group_key, key);
    CREATE TABLE operations (
        id TEXT NOT NULL UNIQUE,
        created INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX operations_created ON operations(created);
    CREATE TABLE devices (
        id TEXT NOT NULL UNIQUE,
        etag TEXT NOT NULL,
        status TEXT NOT NULL,
        connected INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE TABLE modules (
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        module_id TEXT NOT NULL,
        etag TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (device_id, module_id)
    );
    CREATE TABLE twins (
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (device_id, module_id)
    );
    CREATE TABLE twin_tags (
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        path TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (device_id, module_id, path, value)
    ) WITHOUT ROWID;
    CREATE INDEX twin_tags_value ON twin_tags(path, value, module_id, device_id);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        job_type TEXT NOT NULL,
        status TEXT NOT NULL,
        purge_time INTEGER,
        doc TEXT NOT NULL
    );
    CREATE INDEX jobs_purge ON jobs(purge_time) WHERE purge_time IS NOT NULL;
    CREATE TABLE device_jobs (
        job_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (job_id, device_id)
    );
    CREATE INDEX device_jobs_device ON device_jobs(device_id, job_id);
    ",
];

/// Schema version this binary writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Reader connections of a file database (the writer is separate).
const READERS: usize = 4;

/// WAL pages (4 KiB) after which a commit checkpoints the WAL into the database file.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// How long a statement waits for another connection's (or process's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a commit survives once it has returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// The process being killed (`synchronous=NORMAL` in WAL mode): the WAL is written at each
    /// commit and synced at checkpoints, so a power loss may roll back the last commits.
    #[default]
    ProcessCrash,
    /// A power loss too (`synchronous=FULL`): the WAL is synced at every commit.
    PowerLoss,
}

/// A SQLite database holding every store of the engine: provisioning (enrollments, groups, CA
/// certificates, registrations, operations) and hub (identities, twins, jobs).
///
/// Cloning is cheap: clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("readers", &self.inner.readers.len()).finish_non_exhaustive()
    }
}

/// Maps SQLite failures to the engine's backend error.
trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Backend(format!("sqlite: {e}")))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, applies pending migrations and
    /// tunes it for a server (WAL, `synchronous=NORMAL`, busy timeout, foreign keys).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the file cannot be opened, a migration fails, or the database
    /// was written by a newer zerotouch (its schema version is above [`SCHEMA_VERSION`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::default())
    }

    /// [`SqliteStore::open`] with a chosen [`Durability`].
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let mut writer = Connection::open(path).db()?;
        tune(&writer)?;
        if durability == Durability::PowerLoss {
            writer.pragma_update(None, "synchronous", "FULL").db()?;
        }
        writer.pragma_update(None, "journal_mode", "WAL").db()?;
        // Checkpoint every ~64 MiB of WAL instead of every 4 MiB: a bulk import batch is several
        // MiB, and each checkpoint costs two fsyncs.
        writer.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).db()?;
        migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(path, flags).db()?;
                tune(&conn)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Self::from_parts(writer, readers))
    }

    /// A private database in memory, for tests and throw-away embedding. Reads and writes share
    /// one connection; the handle is still `Send + Sync` and cheap to clone.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when SQLite cannot allocate the database.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let mut writer = Connection::open_in_memory().db()?;
        tune(&writer)?;
        migrate(&mut writer)?;
        Ok(Self::from_parts(writer, Vec::new()))
    }

    fn from_parts(writer: Connection, readers: Vec<Mutex<Connection>>) -> Self {
        Self {
            inner: Arc::new(Inner { writer: Mutex::new(writer), readers, next_reader: AtomicUsize::new(0) }),
        }
    }

    /// The schema version of the open database.
    ///
    /// # Errors
    /// Backend failures.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.read(user_version)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction: committed when `f` succeeds, rolled back
    /// when it fails.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = lock(&self.inner.writer)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
        let out = f(&tx)?;
        tx.commit().db()?;
        Ok(out)
    }

    /// Runs `f` on a reader connection (the writer's for an in-memory database), inside one read
    /// transaction so multi-statement reads see one snapshot.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let readers = &self.inner.readers;
        let mut conn = if readers.is_empty() {
            lock(&self.inner.writer)?
        } else {
            let start = self.inner.next_reader.fetch_add(1, Ordering::Relaxed);
            match (0..readers.len()).find_map(|i| readers[(start + i) % readers.len()].try_lock().ok()) {
                Some(conn) => conn,
                None => lock(&readers[start % readers.len()])?,
            }
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).db()?;
        let out = f(&tx)?;
        tx.commit().db()?;
        Ok(out)
    }
}

fn lock(m: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, StoreError> {
    m.lock().map_err(|_| StoreError::Backend("sqlite connection lock poisoned".to_owned()))
}

fn tune(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).db()?;
    // NORMAL in WAL mode loses no committed transaction when the process dies; only a power
    // loss may roll back the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL").db()?;
    conn.pragma_update(None, "foreign_keys", "ON").db()?;
    conn.pragma_update(None, "cache_size", -32_768).db()?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn user_version(conn: &Connection) -> Result<u32, StoreError> {
    conn.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0)).db()
}

/// Applies the migrations the database lacks, under the write lock so two processes opening
/// one file do not both migrate it.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
    let found = user_version(&tx)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the database has schema version {found}, newer than the {SCHEMA_VERSION} this zerotouch \
             understands: upgrade zerotouch (or restore a backup) before opening it"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(|e| {
            StoreError::Backend(format!("sqlite: migration to schema version {}: {e}", version + 1))
        })?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).db()?;
    tx.commit().db()
}

/// A page limit as SQL wants it: one row more than the page, to learn whether another follows.
fn limit_plus_one(max_items: usize) -> i64 {
    i64::try_from(max_items.max(1)).unwrap_or(i64::MAX - 1) + 1
}
