//! The SQLite backend: one database file in WAL mode, one writer connection and a few readers.
//!
//! Every conditional write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's write
//! lock for the whole database (across processes too), so the precondition read and the write
//! form one compare-and-swap. Readers use their own connections and see every committed write.
//! A store opened with [`SqliteStore::open_read_only`] has one read-only connection and no writer.

mod hub;
mod provisioning;
mod query;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, ReentrantMutex};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use zerotouch_engine::store::OperationRecord;
use zerotouch_engine::StoreError;
use zerotouch_proto::Timestamp;

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
    // 2: several hubs in one database (so a registration writes its hub identity, twin and
    // record in one transaction): every hub table gains a `hub` column that leads its keys.
    // Rows of a version-1 database belong to the unnamed hub ''. SQLite cannot change a
    // table's keys in place, so each table is rebuilt (foreign keys are off meanwhile).
    "
    CREATE TABLE hubs (name TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE devices_v2 (
        hub TEXT NOT NULL,
        id TEXT NOT NULL,
        etag TEXT NOT NULL,
        status TEXT NOT NULL,
        connected INTEGER NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (hub, id)
    );
    INSERT INTO devices_v2 (hub, id, etag, status, connected, doc)
        SELECT '', id, etag, status, connected, doc FROM devices;
    CREATE TABLE modules_v2 (
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        etag TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (hub, device_id, module_id),
        FOREIGN KEY (hub, device_id) REFERENCES devices (hub, id) ON DELETE CASCADE
    );
    INSERT INTO modules_v2 (hub, device_id, module_id, etag, doc)
        SELECT '', device_id, module_id, etag, doc FROM modules;
    CREATE TABLE twins_v2 (
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (hub, device_id, module_id)
    );
    INSERT INTO twins_v2 (hub, device_id, module_id, version, doc)
        SELECT '', device_id, module_id, version, doc FROM twins;
    CREATE TABLE twin_tags_v2 (
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        path TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (hub, device_id, module_id, path, value)
    ) WITHOUT ROWID;
    INSERT INTO twin_tags_v2 (hub, device_id, module_id, path, value)
        SELECT '', device_id, module_id, path, value FROM twin_tags;
    CREATE TABLE jobs_v2 (
        hub TEXT NOT NULL,
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        job_type TEXT NOT NULL,
        status TEXT NOT NULL,
        purge_time INTEGER,
        doc TEXT NOT NULL,
        PRIMARY KEY (hub, id)
    );
    INSERT INTO jobs_v2 (hub, id, version, job_type, status, purge_time, doc)
        SELECT '', id, version, job_type, status, purge_time, doc FROM jobs;
    CREATE TABLE device_jobs_v2 (
        hub TEXT NOT NULL,
        job_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (hub, job_id, device_id)
    );
    INSERT INTO device_jobs_v2 (hub, job_id, device_id, doc)
        SELECT '', job_id, device_id, doc FROM device_jobs;
    DROP TABLE modules;
    DROP TABLE devices;
    DROP TABLE twin_tags;
    DROP TABLE twins;
    DROP TABLE device_jobs;
    DROP TABLE jobs;
    ALTER TABLE devices_v2 RENAME TO devices;
    ALTER TABLE modules_v2 RENAME TO modules;
    ALTER TABLE twins_v2 RENAME TO twins;
    ALTER TABLE twin_tags_v2 RENAME TO twin_tags;
    ALTER TABLE jobs_v2 RENAME TO jobs;
    ALTER TABLE device_jobs_v2 RENAME TO device_jobs;
    CREATE INDEX twin_tags_value ON twin_tags(hub, path, value, module_id, device_id);
    CREATE INDEX jobs_purge ON jobs(hub, purge_time) WHERE purge_time IS NOT NULL;
    CREATE INDEX device_jobs_device ON device_jobs(hub, device_id, job_id);
    ",
    // 3: a counter that every change to the enrollment groups bumps (by trigger, so writes of
    // any process count), letting a process keep the decoded symmetric-key groups that every
    // authentication reads and check them with one row read instead of decoding them again.
    "
    CREATE TABLE change_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO change_counters (name, value) VALUES ('enrollment_groups', 0);
    CREATE TRIGGER enrollment_groups_inserted AFTER INSERT ON enrollment_groups BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'enrollment_groups';
    END;
    CREATE TRIGGER enrollment_groups_updated AFTER UPDATE ON enrollment_groups BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'enrollment_groups';
    END;
    CREATE TRIGGER enrollment_groups_deleted AFTER DELETE ON enrollment_groups BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'enrollment_groups';
    END;
    ",
];

/// Schema version this binary writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Reader connections of a file database (the writer is separate).
const READERS: usize = 4;

/// Bytes of the database file a reader maps (pages past it, and pages in the WAL, are read
/// with `pread` as before).
const READER_MMAP_BYTES: i64 = 1 << 30;

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
/// certificates, registrations, operations) and the hub stores (identities, twins, jobs) of any
/// number of hubs, each seen through [`SqliteStore::hub`].
///
/// Cloning is cheap: clones share the connections.
///
/// Writes go through one writer connection. Concurrent writers are committed together (group
/// commit): a write that finds others waiting leaves the transaction open for them and returns
/// once the last of them has committed it, so a burst of registrations costs one commit (and, with
/// [`Durability::PowerLoss`], one sync) instead of one each.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    /// The hub whose identities, twins and jobs this handle sees ('' for a standalone store).
    hub: Arc<str>,
}

/// Decoded groups, shared by every reader of the cache.
type SharedGroups = Arc<[Arc<zerotouch_proto::service::EnrollmentGroup>]>;

struct Inner {
    writer: ReentrantMutex<Writer>,
    /// Threads waiting for the writer to start a unit.
    waiting: AtomicUsize,
    commits: parking_lot::Mutex<Commits>,
    committed: Condvar,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// The symmetric-key groups as of a value of the `enrollment_groups` change counter. Only
    /// filled from committed state (never from inside a unit, whose writes may roll back), so
    /// an equal counter means equal groups.
    symmetric_groups: parking_lot::Mutex<Option<(i64, SharedGroups)>>,
    /// Operations this process committed lately: a device polls its operation a few seconds
    /// after its register wrote it, and answering from here saves the read and the decoding.
    operations: parking_lot::Mutex<OperationCache>,
    /// Set for a store opened with [`SqliteStore::open_read_only`]: its one connection (in
    /// `writer`) is read-only, and every unit is refused before it starts.
    read_only: Option<ReadOnly>,
}

/// What a store opened read-only knows of its file.
struct ReadOnly {
    path: PathBuf,
    /// For a store read as a snapshot (`immutable=1`, see [`SqliteStore::open_read_only`]): the
    /// file as it was before it was opened. A read that ends with the file different fails,
    /// since it may have read pages of two versions.
    snapshot: Option<FileStamp>,
}

impl ReadOnly {
    /// The error every write of a read-only store fails with.
    fn refusal(&self) -> StoreError {
        StoreError::Backend(format!(
            "sqlite: {} was opened read-only, and this call writes",
            self.path.display()
        ))
    }

    /// Fails when the file of a snapshot store is no longer the file that was opened.
    fn check_unchanged(&self) -> Result<(), StoreError> {
        let Some(opened) = &self.snapshot else { return Ok(()) };
        match FileStamp::of(&self.path) {
            Ok(now) if now == *opened => Ok(()),
            _ => Err(StoreError::Backend(format!(
                "sqlite: {} changed while it was read (a server or a command that writes started on \
                 it): run the command again",
                self.path.display()
            ))),
        }
    }
}

/// What tells one version of a file from the next: every write changes the modification time
/// (and usually the size); a file put in its place has another inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Self { len: meta.len(), modified: meta.modified().ok(), inode })
    }
}

impl Drop for Inner {
    /// Closes the readers before the writer: SQLite checkpoints the log into the database file
    /// when the last connection to it closes, which a read-only connection cannot do. So a
    /// process that wrote and let go of its store (an admin command) leaves every commit in the
    /// file, as a server's checkpoint at its stop does.
    fn drop(&mut self) {
        self.readers.clear();
    }
}

/// Operations kept in memory at most (a few seconds of registrations at full speed; about a
/// kilobyte each).
const OPERATIONS_CACHED: usize = 16_384;

thread_local! {
    /// The enrollment-group change counter the last store call of this thread read, and the
    /// store it read it from (see [`SqliteStore::saw_groups_version`]).
    static GROUPS_VERSION_SEEN: Cell<Option<(usize, i64)>> = const { Cell::new(None) };
}

/// Recently committed operations by id, oldest evicted first. Only committed state enters it
/// (see [`Writer::staged`]), and an operation row is only ever written by the process that
/// created its random id, so an entry is the row as stored until it is purged.
#[derive(Default)]
struct OperationCache {
    by_id: HashMap<String, (u64, Arc<OperationRecord>)>,
    /// Ids in insertion order, with the insertion number that keeps a rewritten id's newer entry.
    order: VecDeque<(String, u64)>,
    inserted: u64,
}

impl OperationCache {
    fn get(&self, id: &str) -> Option<Arc<OperationRecord>> {
        self.by_id.get(id).map(|(_, op)| Arc::clone(op))
    }

    fn insert(&mut self, op: OperationRecord) {
        self.inserted += 1;
        let id = op.operation_id.as_str().to_owned();
        self.order.push_back((id.clone(), self.inserted));
        self.by_id.insert(id, (self.inserted, Arc::new(op)));
        while self.by_id.len() > OPERATIONS_CACHED || self.order.len() > 2 * OPERATIONS_CACHED {
            let Some((old, n)) = self.order.pop_front() else { break };
            if self.by_id.get(&old).is_some_and(|(m, _)| *m == n) {
                self.by_id.remove(&old);
            }
        }
    }

    /// Forgets the operations created before `cutoff` (as the purge deleted their rows).
    fn purge(&mut self, cutoff: Timestamp) {
        self.by_id.retain(|_, (_, op)| op.created >= cutoff);
        let by_id = &self.by_id;
        self.order.retain(|(id, n)| by_id.get(id).is_some_and(|(m, _)| m == n));
    }
}

/// The writer connection and the state of the transaction open on it. Only the thread holding
/// the (reentrant) writer lock touches it, hence `Cell`s.
struct Writer {
    conn: Connection,
    /// Whether a batch transaction is open.
    open: Cell<bool>,
    /// Number of the open (or last) batch.
    batch: Cell<u64>,
    /// Units in the open batch.
    units: Cell<u32>,
    /// A unit could not be undone: the batch must be rolled back, not committed.
    poisoned: Cell<bool>,
    /// A store call nested in the running top-level unit failed after changing rows. Nested
    /// calls run without a savepoint of their own, so their writes cannot be undone alone: the
    /// top-level unit is rolled back and fails, whatever its closure made of the error.
    tainted: Cell<bool>,
    /// Whether units wait to be committed together (file databases; an in-memory database has
    /// no readers, so an open batch would block every read).
    batching: bool,
    /// Operations written by the open batch's units, in order: they enter the
    /// [`OperationCache`] when the batch commits, and leave this list when their unit (or
    /// savepoint) is rolled back or the batch fails.
    staged: RefCell<Vec<OperationRecord>>,
}

/// What the committers tell the units waiting for their batch.
#[derive(Default)]
struct Commits {
    /// Every batch up to this one is finished (committed or rolled back).
    done: u64,
    /// Recent batches that failed to commit, with the reason.
    failed: VecDeque<(u64, String)>,
}

/// Units per batch at most, so a steady stream of writers still commits regularly.
const MAX_BATCH_UNITS: u32 = 128;

/// Failed batches remembered for their waiting units (failures are rare; waiters are quick).
const FAILED_BATCHES_KEPT: usize = 64;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("hub", &self.hub)
            .field("readers", &self.inner.readers.len())
            .field("read_only", &self.is_read_only())
            .finish_non_exhaustive()
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
        // Every unit of a group commit is a savepoint, so each page it changes is first copied
        // to the statement journal; in memory that is a copy, on disk (SQLite spills it to a
        // temp file past 64 KiB) a `pwrite` per page and a file created and deleted per batch.
        // The writer sorts nothing large, so its temporary storage can live in memory.
        writer.pragma_update(None, "temp_store", "MEMORY").db()?;
        // Checkpoint every ~64 MiB of WAL instead of every 4 MiB: a bulk import batch is several
        // MiB, and each checkpoint costs two fsyncs.
        writer.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).db()?;
        migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(path, flags).db()?;
                tune(&conn)?;
                // A reader's page cache is dropped whenever another connection has committed
                // since its last read, which under load is every read: the authentication of
                // each request then re-read its pages with `pread` into freshly allocated cache
                // entries. Mapped, the pages of the database file are read in place.
                conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES).db()?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Self::from_parts(writer, readers, None))
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
        Ok(Self::from_parts(writer, Vec::new(), None))
    }

    /// Opens the database file at `path` for reading only: nothing is created, migrated or
    /// written, so a backup on a read-only mount, a copy in a directory of another user's or a
    /// store a server is writing can all be read. Every write through the store (or a hub view
    /// of it) fails with [`StoreError::Backend`] saying the store is read-only;
    /// [`SqliteStore::hub`] records no hub. One connection serves every read.
    ///
    /// The database must have this binary's schema version: an older one is not migrated (open it
    /// once for writing), a newer one needs a newer zerotouch.
    ///
    /// How the file is read depends on what is beside it:
    /// - a write-ahead log (`-wal`): a process has the database open (a running server) or did
    ///   not close it. It is read as any SQLite reader reads it, with the shared-memory index
    ///   (`-shm`), so every committed transaction is seen and writers are never blocked. When the
    ///   index is missing SQLite creates it, which needs a writable directory.
    /// - no log, and a database in WAL mode (as zerotouch leaves it when no process has it
    ///   open): the whole database is in the file, and it is read as an immutable snapshot,
    ///   which creates no `-wal` or `-shm` and works in a read-only directory. A read that finds
    ///   the file changed since it was opened (a writer started meanwhile) fails.
    /// - no log, and a database in rollback-journal mode (`VACUUM INTO` copies): read with
    ///   SQLite's file locks, which create nothing.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no file at `path`; [`StoreError::Backend`] when it
    /// is not a database SQLite can read, its schema version is not [`SCHEMA_VERSION`], or its
    /// log cannot be read (a log without its index in a directory that is not writable).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        // Stamped before the log is looked for: a writer that moves its log into the file and
        // goes away in between changes the stamp, and the first read then fails.
        let stamp = match FileStamp::of(path) {
            Ok(stamp) => stamp,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(StoreError::Backend(format!("sqlite: {}: {e}", path.display()))),
        };
        if !path.is_file() {
            return Err(StoreError::Backend(format!("sqlite: {}: not a file", path.display())));
        }
        // SQLite keeps the log and its index beside the file a symbolic link points at; looking
        // beside the link would miss a live server's log and read a stale snapshot.
        let given = path;
        let real = std::fs::canonicalize(given)
            .map_err(|e| StoreError::Backend(format!("sqlite: {}: {e}", given.display())))?;
        let path = real.as_path();
        let wal = sibling(path, "-wal");
        let shm = sibling(path, "-shm");
        // SQLite's plain read-only open of a WAL database opens its log and index read-write,
        // creating them when missing (https://www.sqlite.org/wal.html, "Read-Only Databases"),
        // and a read-only connection cannot delete them when it closes: a backup directory would
        // gain two files, and a read-only one could not be read at all. `immutable=1` reads the
        // file alone, without locks or a log: right only when the file holds every commit, which
        // it does when there is no log (every connection to a WAL database keeps the log, and
        // the last one to close moves it into the file and deletes it). A writer may still start
        // while the snapshot is read; it changes the file only when it moves its log into it,
        // which the stamp check after each read catches. With a log present the log must be
        // read, so the store reads as a normal reader: it sees every commit of a live server
        // and, in WAL mode, never blocks its writes (nor it theirs).
        let snapshot = !wal.exists() && wal_mode(path)?;
        let opened = (|| {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = if snapshot {
                Connection::open_with_flags(immutable_uri(path)?, flags | OpenFlags::SQLITE_OPEN_URI).db()?
            } else {
                Connection::open_with_flags(path, flags).db()?
            };
            tune(&conn)?;
            let found = user_version(&conn)?;
            Ok((conn, found))
        })();
        let (conn, found) = opened.map_err(|e| match e {
            StoreError::Backend(message) if !snapshot && wal.exists() && !shm.exists() => {
                StoreError::Backend(format!(
                    "{message} ({}): it has a write-ahead log ({}) but no index beside it ({}), which \
                     SQLite must create to read the log and cannot here: copy the database and its \
                     log to a writable directory and read the copy",
                    given.display(),
                    wal.display(),
                    shm.display()
                ))
            }
            StoreError::Backend(message) => StoreError::Backend(format!("{message} ({})", given.display())),
            other => other,
        })?;
        if found < SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{} has schema version {found}, older than the {SCHEMA_VERSION} of this zerotouch, and \
                 a read-only open does not migrate it: run `zerotouch serve` (or any command that \
                 writes to the store) on it once, or on a writable copy, to migrate it",
                given.display()
            )));
        }
        if found > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{} has schema version {found}, newer than the {SCHEMA_VERSION} this zerotouch \
                 understands: upgrade zerotouch to read it",
                given.display()
            )));
        }
        let read_only = ReadOnly { path: given.to_owned(), snapshot: snapshot.then_some(stamp) };
        Ok(Self::from_parts(conn, Vec::new(), Some(read_only)))
    }

    /// Whether this store was opened with [`SqliteStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.is_some()
    }

    fn from_parts(conn: Connection, readers: Vec<Mutex<Connection>>, read_only: Option<ReadOnly>) -> Self {
        let writer = Writer {
            conn,
            open: Cell::new(false),
            batch: Cell::new(0),
            units: Cell::new(0),
            poisoned: Cell::new(false),
            tainted: Cell::new(false),
            batching: !readers.is_empty(),
            staged: RefCell::new(Vec::new()),
        };
        Self {
            inner: Arc::new(Inner {
                writer: ReentrantMutex::new(writer),
                waiting: AtomicUsize::new(0),
                commits: parking_lot::Mutex::new(Commits::default()),
                committed: Condvar::new(),
                readers,
                next_reader: AtomicUsize::new(0),
                symmetric_groups: parking_lot::Mutex::new(None),
                operations: parking_lot::Mutex::new(OperationCache::default()),
                read_only,
            }),
            hub: Arc::from(""),
        }
    }

    /// The same database seen as the embedded hub `host_name`: its identity, twin and job
    /// stores and queries hold that hub's devices only (host names compare case-insensitively).
    /// Provisioning stores are shared by every view, and writes through any view of one
    /// database can be one unit ([`RegistrationStore::atomically`]). Records the hub in
    /// [`SqliteStore::hub_names`], except on a read-only store (whose view of a hub never
    /// recorded reads as empty).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the hub cannot be recorded; [`StoreError::Backend`] too for
    /// an empty name.
    ///
    /// [`RegistrationStore::atomically`]: zerotouch_engine::store::RegistrationStore::atomically
    pub fn hub(&self, host_name: &str) -> Result<Self, StoreError> {
        let name = host_name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(StoreError::Backend("a hub needs a host name".to_owned()));
        }
        if self.inner.read_only.is_some() {
            return Ok(Self { inner: Arc::clone(&self.inner), hub: Arc::from(name) });
        }
        self.write(|c| {
            c.prepare_cached("INSERT OR IGNORE INTO hubs (name) VALUES (?1)").db()?.execute([&name]).db()?;
            Ok(())
        })?;
        Ok(Self { inner: Arc::clone(&self.inner), hub: Arc::from(name) })
    }

    /// Host names of the hubs ever opened with [`SqliteStore::hub`] on this database, sorted.
    ///
    /// # Errors
    /// Backend failures.
    pub fn hub_names(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT name FROM hubs ORDER BY name").db()?;
            let names = stmt.query_map([], |r| r.get::<_, String>(0)).db()?;
            names.map(|n| n.db()).collect()
        })
    }

    /// Moves the hub tables (identities, twins, jobs) of another zerotouch SQLite file — one
    /// that held a single hub, as the data directories of zerotouch 0.1 did — into the hub
    /// `host_name` of this database, in one transaction. Returns how many devices moved. Rows
    /// already present in the hub are kept (the file's copy is skipped).
    ///
    /// Meant for start-up, before other writers: the file is attached to the writer
    /// connection, which needs no transaction open.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no file at `path` (nothing is created);
    /// [`StoreError::Backend`] when the file cannot be opened or migrated, or a write fails
    /// (then nothing moved), or this store is read-only.
    pub fn import_hub_file(&self, path: impl AsRef<Path>, host_name: &str) -> Result<u64, StoreError> {
        if let Some(read_only) = &self.inner.read_only {
            return Err(read_only.refusal());
        }
        let path = path.as_ref();
        // Opening would create a missing file as an empty database, and "import" nothing from
        // it: a file another process has just imported (and renamed) is not there any more.
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) => return Err(StoreError::NotFound),
            Err(e) => return Err(StoreError::Backend(format!("sqlite: {}: {e}", path.display()))),
        }
        // Opening it brings the file to this schema version (its rows under the hub '').
        drop(Self::open(path)?);
        let target = self.hub(host_name)?;
        let writer = self.inner.writer.lock();
        if writer.open.get() {
            return Err(StoreError::Backend(
                "sqlite: cannot import a hub file while writes are pending".into(),
            ));
        }
        let file = path.to_string_lossy().into_owned();
        writer.conn.execute("ATTACH DATABASE ?1 AS legacy", [&file]).db()?;
        let moved = import_attached(&writer.conn, &target.hub);
        let detached = writer.conn.execute_batch("DETACH DATABASE legacy").db();
        let moved = moved?;
        detached?;
        Ok(moved)
    }

    /// Moves everything in the write-ahead log into the database file and empties the log
    /// (`wal_checkpoint(TRUNCATE)`), so that the database file alone holds every commit: what a
    /// server does when it stops, for backups that copy the file. Waits up to 5 s for the
    /// writer and 1 s for readers of other processes, which may keep it from finishing (reported).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the checkpoint fails or could not copy the whole log, or this
    /// store is read-only.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        if let Some(read_only) = &self.inner.read_only {
            return Err(read_only.refusal());
        }
        // A write that never ends (a call still stuck when the server stops) must not hold the
        // stop: then the log keeps what it holds, as it would without a checkpoint.
        let writer = self.inner.writer.try_lock_for(std::time::Duration::from_secs(5)).ok_or_else(|| {
            StoreError::Backend("sqlite: a write still running kept the checkpoint from starting".into())
        })?;
        if writer.open.get() {
            return Err(StoreError::Backend("sqlite: cannot checkpoint while writes are pending".into()));
        }
        // Readers of other processes are waited for a second at most, not the busy timeout.
        writer.conn.busy_timeout(std::time::Duration::from_secs(1)).db()?;
        let checkpointed = writer
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .db();
        writer.conn.busy_timeout(BUSY_TIMEOUT).db()?;
        let (busy, _, _): (i64, i64, i64) = checkpointed?;
        if busy != 0 {
            return Err(StoreError::Backend(
                "sqlite: the checkpoint was blocked by another connection; the log keeps the rest".into(),
            ));
        }
        Ok(())
    }

    /// What a commit survives, as the writer connection is set (its `synchronous` pragma:
    /// `FULL` or stronger is [`Durability::PowerLoss`]).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the pragma cannot be read.
    pub fn durability(&self) -> Result<Durability, StoreError> {
        let writer = self.inner.writer.lock();
        let level: i64 = writer.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).db()?;
        Ok(if level >= 2 { Durability::PowerLoss } else { Durability::ProcessCrash })
    }

    /// The schema version of the open database.
    ///
    /// # Errors
    /// Backend failures.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.read(user_version)
    }

    /// Runs `f` as one unit of writes: committed when `f` succeeds (possibly together with
    /// other threads' units), undone when it fails. Returns only once the unit is committed.
    /// Called again from inside `f` on the same thread (a store method inside
    /// [`RegistrationStore::atomically`]), it runs inside the enclosing unit (see [`nested`]).
    ///
    /// Savepoints cost a copy of every page a unit changes (the statement journal), so only
    /// a unit that joins an open batch gets one, to be undone without its batch-mates. The unit
    /// that opens a batch runs without: while it runs it is the batch's only unit, so when it
    /// fails the whole transaction is rolled back instead.
    ///
    /// [`RegistrationStore::atomically`]: zerotouch_engine::store::RegistrationStore::atomically
    fn unit<T, E: From<StoreError>>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E> {
        GROUPS_VERSION_SEEN.with(|seen| seen.set(None));
        let inner = &*self.inner;
        if let Some(read_only) = &inner.read_only {
            return Err(read_only.refusal().into());
        }
        if inner.writer.is_owned_by_current_thread() {
            let writer = inner.writer.lock();
            return if writer.open.get() { nested(&writer, f) } else { savepoint(&writer, f) };
        }
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        let writer = inner.writer.lock();
        inner.waiting.fetch_sub(1, Ordering::SeqCst);
        let opens = !writer.open.get();
        if opens {
            exec(&writer.conn, "BEGIN IMMEDIATE")?;
            writer.open.set(true);
            writer.poisoned.set(false);
            writer.units.set(0);
            writer.batch.set(writer.batch.get() + 1);
        }
        let batch = writer.batch.get();
        writer.units.set(writer.units.get() + 1);
        writer.tainted.set(false);
        let finish = FinishBatch { store: self, writer: &writer, batch };
        let out = if opens {
            let out = untainted(&writer, f(&writer.conn));
            if out.is_err() {
                // The batch holds this unit only: rolling it back undoes exactly the unit.
                writer.poisoned.set(true);
                drop(finish);
                return out;
            }
            out
        } else {
            savepoint(&writer, f)
        };
        let leave_open = writer.batching
            && !writer.poisoned.get()
            && writer.units.get() < MAX_BATCH_UNITS
            && inner.waiting.load(Ordering::SeqCst) > 0;
        if leave_open {
            // A waiting writer takes the transaction over and commits it (or hands it on).
            std::mem::forget(finish);
            drop(writer);
            self.await_batch(batch)?;
        } else {
            drop(finish);
            drop(writer);
            self.batch_outcome(batch)?;
        }
        out
    }

    /// Commits (or, when poisoned, rolls back) the open batch and wakes its waiting units.
    fn end_batch(&self, writer: &Writer, batch: u64) {
        let outcome = if writer.poisoned.get() {
            Err("an earlier write of the batch could not be undone".to_owned())
        } else {
            exec(&writer.conn, "COMMIT").map_err(|e| format!("commit: {e}"))
        };
        if outcome.is_err() {
            // Best effort: after a failed COMMIT the transaction may still be open.
            let _ = exec(&writer.conn, "ROLLBACK");
        }
        writer.open.set(false);
        let staged = std::mem::take(&mut *writer.staged.borrow_mut());
        if outcome.is_ok() && !staged.is_empty() {
            let mut cache = self.inner.operations.lock();
            for op in staged {
                cache.insert(op);
            }
        }
        let mut commits = self.inner.commits.lock();
        commits.done = batch;
        if let Err(why) = outcome {
            commits.failed.push_back((batch, why));
            if commits.failed.len() > FAILED_BATCHES_KEPT {
                commits.failed.pop_front();
            }
        }
        drop(commits);
        self.inner.committed.notify_all();
    }

    /// Waits until `batch` is finished; its failure, if it failed.
    fn await_batch(&self, batch: u64) -> Result<(), StoreError> {
        let mut commits = self.inner.commits.lock();
        while commits.done < batch {
            self.inner.committed.wait(&mut commits);
        }
        drop(commits);
        self.batch_outcome(batch)
    }

    fn batch_outcome(&self, batch: u64) -> Result<(), StoreError> {
        let commits = self.inner.commits.lock();
        match commits.failed.iter().find(|(b, _)| *b == batch) {
            Some((_, why)) => Err(StoreError::Backend(why.clone())),
            None => Ok(()),
        }
    }

    /// Stages `op`, just written by a unit of this thread, for the operation cache: it enters the
    /// cache once its batch commits.
    /// Remembers, for the next store call of this thread, the enrollment-group change counter
    /// a read has just seen.
    fn saw_groups_version(&self, version: i64) {
        GROUPS_VERSION_SEEN.with(|seen| seen.set(Some((Arc::as_ptr(&self.inner) as usize, version))));
    }

    /// The counter [`SqliteStore::saw_groups_version`] kept, if the store call right before this
    /// one on this thread was that read of this store. Every other store call forgets it, so it
    /// never outlives the authentication that read it.
    fn take_groups_version(&self) -> Option<i64> {
        let (store, version) = GROUPS_VERSION_SEEN.with(Cell::take)?;
        (store == Arc::as_ptr(&self.inner) as usize).then_some(version)
    }

    fn stage_operation(&self, op: OperationRecord) {
        let writer = self.inner.writer.lock();
        writer.staged.borrow_mut().push(op);
    }

    /// Forgets cached and staged operations created before `cutoff`; called by the purge,
    /// inside its unit.
    fn forget_operations(&self, cutoff: Timestamp) {
        let writer = self.inner.writer.lock();
        writer.staged.borrow_mut().retain(|op| op.created >= cutoff);
        self.inner.operations.lock().purge(cutoff);
    }

    /// A committed operation this process wrote lately, if the cache still has it.
    fn cached_operation(&self, id: &str) -> Option<Arc<OperationRecord>> {
        self.inner.operations.lock().get(id)
    }

    /// Runs `f` as one unit of writes (see [`SqliteStore::unit`]).
    fn write<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.unit(f)
    }

    /// Runs `f` on a reader connection (the writer's for an in-memory database), inside one read
    /// transaction so multi-statement reads see one snapshot. Inside a unit of this thread, `f`
    /// runs on the writer, in the unit's transaction, so the unit reads its own writes.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.read_tracked(|c, _| f(c))
    }

    /// [`SqliteStore::read`], telling `f` whether it reads inside a unit of this thread (and so
    /// may see writes that are not committed yet).
    fn read_tracked<T>(
        &self,
        f: impl FnOnce(&Connection, bool) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.read_on(true, f)
    }

    /// [`SqliteStore::read`] for an `f` that runs exactly one statement: that statement's own
    /// implicit transaction is its snapshot, which saves a `BEGIN` and a `COMMIT` (the
    /// authentication of every request reads this way).
    fn read_one<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.read_on(false, |c, _| f(c))
    }

    /// Runs `f` as [`SqliteStore::read_tracked`] says, in an explicit read transaction when
    /// `transaction`.
    fn read_on<T>(
        &self,
        transaction: bool,
        f: impl FnOnce(&Connection, bool) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        GROUPS_VERSION_SEEN.with(|seen| seen.set(None));
        let inner = &*self.inner;
        if inner.writer.is_owned_by_current_thread() {
            let writer = inner.writer.lock();
            if writer.open.get() {
                return f(&writer.conn, true);
            }
        }
        let readers = &inner.readers;
        if readers.is_empty() {
            let writer = inner.writer.lock();
            let out = if transaction {
                read_transaction(&writer.conn, |c| f(c, false))
            } else {
                f(&writer.conn, false)
            };
            if let Some(read_only) = &inner.read_only {
                // Also when `f` failed: a change under the read is the likelier cause.
                read_only.check_unchanged()?;
            }
            return out;
        }
        let start = inner.next_reader.fetch_add(1, Ordering::Relaxed);
        let conn = match (0..readers.len()).find_map(|i| readers[(start + i) % readers.len()].try_lock().ok())
        {
            Some(conn) => conn,
            None => lock(&readers[start % readers.len()])?,
        };
        if transaction {
            read_transaction(&conn, |c| f(c, false))
        } else {
            f(&conn, false)
        }
    }
}

/// The file SQLite keeps beside the database `path` with `suffix` (`-wal`, `-shm`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether the header of the database file at `path` says WAL mode (its read and write versions
/// are 2; a file too short for a header is a new, empty database).
fn wal_mode(path: &Path) -> Result<bool, StoreError> {
    use std::io::Read as _;
    let mut header = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut file| file.read_exact(&mut header));
    match read {
        Ok(()) => Ok(header[18] == 2 && header[19] == 2),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(StoreError::Backend(format!("sqlite: {}: {e}", path.display()))),
    }
}

/// The URI that opens the database file at `path` read-only as an immutable file (no locks, no
/// log, no shared memory): `file://` and the absolute path, every byte a URI could give a meaning
/// to (`?`, `#`, `%`, spaces, ...) percent-encoded.
fn immutable_uri(path: &Path) -> Result<String, StoreError> {
    use std::fmt::Write as _;
    let absolute = std::path::absolute(path)
        .map_err(|e| StoreError::Backend(format!("sqlite: {}: {e}", path.display())))?;
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(absolute.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = {
        let text = absolute.to_str().ok_or_else(|| {
            StoreError::Backend(format!("sqlite: {}: the path is not valid Unicode", path.display()))
        })?;
        let text = text.replace('\\', "/");
        if text.starts_with('/') { text } else { format!("/{text}") }.into_bytes()
    };
    let mut uri = String::from("file://");
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            uri.push(char::from(b));
        } else {
            let _ = write!(uri, "%{b:02X}");
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    Ok(uri)
}

/// Copies the hub '' rows of the attached database `legacy` into hub `hub`, in one transaction.
fn import_attached(conn: &Connection, hub: &str) -> Result<u64, StoreError> {
    const TABLES: [(&str, &str); 6] = [
        ("devices", "id, etag, status, connected, doc"),
        ("modules", "device_id, module_id, etag, doc"),
        ("twins", "device_id, module_id, version, doc"),
        ("twin_tags", "device_id, module_id, path, value"),
        ("jobs", "id, version, job_type, status, purge_time, doc"),
        ("device_jobs", "job_id, device_id, doc"),
    ];
    conn.execute_batch("BEGIN IMMEDIATE").db()?;
    let copied = (|| {
        let mut devices = 0;
        for (table, columns) in TABLES {
            let sql = format!(
                "INSERT OR IGNORE INTO main.{table} (hub, {columns})
                 SELECT ?1, {columns} FROM legacy.{table} WHERE hub = ''"
            );
            let n = conn.execute(&sql, [hub]).db()?;
            if table == "devices" {
                devices = u64::try_from(n).unwrap_or_default();
            }
        }
        Ok(devices)
    })();
    let end = conn.execute_batch(if copied.is_ok() { "COMMIT" } else { "ROLLBACK" }).db();
    copied.and_then(|n| end.map(|()| n))
}

/// Ends the batch of a top-level unit when dropped, also when the unit panics, so units waiting
/// for the batch are never stranded.
struct FinishBatch<'a> {
    store: &'a SqliteStore,
    writer: &'a Writer,
    batch: u64,
}

impl Drop for FinishBatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.writer.poisoned.set(true);
        }
        self.store.end_batch(self.writer, self.batch);
    }
}

/// Runs `f` inside a savepoint of the open transaction: released when `f` succeeds, rolled
/// back to when it fails (so a refused compare-and-swap undoes only its own unit).
fn savepoint<T, E: From<StoreError>>(
    writer: &Writer,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    exec(&writer.conn, "SAVEPOINT unit")?;
    let staged_before = writer.staged.borrow().len();
    let out = untainted(writer, f(&writer.conn));
    let end = if out.is_ok() {
        exec(&writer.conn, "RELEASE unit")
    } else {
        writer.staged.borrow_mut().truncate(staged_before);
        exec(&writer.conn, "ROLLBACK TO unit").and_then(|()| exec(&writer.conn, "RELEASE unit"))
    };
    if let Err(e) = end {
        // The unit's writes may be half in the transaction: it must not be committed.
        writer.poisoned.set(true);
        return Err(StoreError::Backend(format!("ending a unit: {e}")).into());
    }
    out
}

/// Runs `f`, a store call made inside a unit of this thread, on the unit's transaction without a
/// savepoint of its own: its writes are undone with its enclosing unit. The engine may go on
/// after a failed call (a refused `MustNotExist` twin write, say); such refusals come before
/// any write, and a call that failed after changing rows (or after SQLite rolled the whole
/// transaction back) taints the enclosing unit, which then fails (see [`untainted`]).
fn nested<T, E: From<StoreError>>(
    writer: &Writer,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    // A failed statement leaves no changes and does not count in `total_changes`.
    let before = writer.conn.total_changes();
    let out = f(&writer.conn);
    if out.is_err() && (writer.conn.total_changes() != before || writer.conn.is_autocommit()) {
        writer.tainted.set(true);
    }
    out
}

/// A top-level unit's result, turned into a failure when a nested call tainted it.
fn untainted<T, E: From<StoreError>>(writer: &Writer, out: Result<T, E>) -> Result<T, E> {
    if out.is_ok() && writer.tainted.get() {
        return Err(StoreError::Backend(
            "sqlite: a write inside the unit failed after changing rows, so the unit was undone".to_owned(),
        )
        .into());
    }
    out
}

/// Runs one statement without rows through the statement cache: transaction control runs
/// several times per registration, and preparing it each time costs more than running it.
fn exec(conn: &Connection, sql: &'static str) -> Result<(), StoreError> {
    conn.prepare_cached(sql).db()?.execute([]).db()?;
    Ok(())
}

/// Runs `f` in one read transaction of `conn`, so multi-statement reads see one snapshot.
fn read_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    exec(conn, "BEGIN DEFERRED")?;
    let out = f(conn);
    let end = exec(conn, if out.is_ok() { "COMMIT" } else { "ROLLBACK" });
    out.and_then(|v| end.map(|()| v))
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
    // Table rebuilds drop tables that others reference; the pragma only works outside a
    // transaction, and the references are checked before the commit instead.
    conn.pragma_update(None, "foreign_keys", "OFF").db()?;
    let result = migrate_tables(conn);
    conn.pragma_update(None, "foreign_keys", "ON").db()?;
    result
}

fn migrate_tables(conn: &mut Connection) -> Result<(), StoreError> {
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
    let dangling: i64 =
        tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| r.get(0)).db()?;
    if dangling > 0 {
        return Err(StoreError::Backend(format!(
            "sqlite: migration left {dangling} rows whose referenced row is missing"
        )));
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).db()?;
    tx.commit().db()
}

/// A page limit as SQL wants it: one row more than the page, to learn whether another follows.
fn limit_plus_one(max_items: usize) -> i64 {
    i64::try_from(max_items.max(1)).unwrap_or(i64::MAX - 1) + 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A unit that inserts `name`, then makes a nested store call that writes and fails, and
    /// carries on as if the call's failure did not matter.
    fn unit_ignoring_a_half_written_nested_call(store: &SqliteStore, name: &str) -> Result<(), StoreError> {
        store.unit(|c| {
            c.execute("INSERT INTO hubs (name) VALUES (?1)", [name]).db()?;
            let nested: Result<(), StoreError> = store.unit(|c| {
                c.execute("INSERT INTO hubs (name) VALUES (?1)", [format!("{name}-half")]).db()?;
                Err(StoreError::Backend("refused after a write".to_owned()))
            });
            assert!(nested.is_err());
            Ok(())
        })
    }

    #[test]
    fn a_unit_whose_nested_call_failed_after_writing_keeps_none_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        for store in
            [SqliteStore::open_in_memory().unwrap(), SqliteStore::open(dir.path().join("t.db")).unwrap()]
        {
            assert!(unit_ignoring_a_half_written_nested_call(&store, "first").is_err());
            assert_eq!(store.hub_names().unwrap(), Vec::<String>::new());
        }
    }

    #[test]
    fn a_nested_call_refused_before_writing_leaves_its_unit_good() {
        let store = SqliteStore::open_in_memory().unwrap();
        store
            .unit(|c| {
                c.execute("INSERT INTO hubs (name) VALUES ('kept')", []).db()?;
                let refused: Result<(), StoreError> =
                    store.unit(|_| Err(StoreError::Backend("refused before writing".to_owned())));
                assert!(refused.is_err());
                Ok::<(), StoreError>(())
            })
            .unwrap();
        assert_eq!(store.hub_names().unwrap(), vec!["kept".to_owned()]);
    }

    #[test]
    fn a_unit_joining_a_batch_fails_alone_when_its_nested_call_failed_after_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db")).unwrap();
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let opener = s.spawn(|| {
                store.unit(|c| {
                    c.execute("INSERT INTO hubs (name) VALUES ('opener')", []).db()?;
                    started.wait();
                    // Hold the batch open until the other unit waits for it, so it joins.
                    while store.inner.waiting.load(Ordering::SeqCst) == 0 {
                        std::thread::yield_now();
                    }
                    Ok::<(), StoreError>(())
                })
            });
            started.wait();
            let joiner = unit_ignoring_a_half_written_nested_call(&store, "joiner");
            assert!(joiner.is_err());
            opener.join().unwrap().unwrap();
        });
        assert_eq!(store.hub_names().unwrap(), vec!["opener".to_owned()]);
    }

    #[test]
    fn a_writer_commits_while_a_read_only_store_is_inside_a_read_which_keeps_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = SqliteStore::open(&path).unwrap();
        writer.hub("first").unwrap();
        // The writer keeps its log open: the live case, read with the shared-memory index.
        let reader = SqliteStore::open_read_only(&path).unwrap();
        assert!(reader.inner.read_only.as_ref().unwrap().snapshot.is_none());
        let hubs = |c: &Connection| c.query_row("SELECT count(*) FROM hubs", [], |r| r.get::<_, i64>(0)).db();
        reader
            .read(|c| {
                assert_eq!(hubs(c)?, 1);
                let asked = std::time::Instant::now();
                writer.hub("second")?;
                assert!(asked.elapsed() < Duration::from_secs(2), "the write waited for the read");
                assert_eq!(hubs(c)?, 1, "one read sees one snapshot");
                Ok(())
            })
            .unwrap();
        assert_eq!(reader.hub_names().unwrap(), ["first", "second"]);
    }

    #[test]
    fn a_version_1_database_keeps_its_hub_rows_under_the_unnamed_hub() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO devices VALUES ('d1', 'e1', 'enabled', 0, '{}');
             INSERT INTO modules VALUES ('d1', 'm1', 'e2', '{}');
             INSERT INTO twins VALUES ('d1', '', 3, '{}');
             INSERT INTO twin_tags VALUES ('d1', '', 'site', 'oslo');
             INSERT INTO jobs VALUES ('j1', 1, 'scheduleUpdateTwin', 'queued', NULL, '{}');
             INSERT INTO device_jobs VALUES ('j1', 'd1', '{}');",
        )
        .unwrap();
        tune(&conn).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        for table in ["devices", "modules", "twins", "twin_tags", "jobs", "device_jobs"] {
            let sql = format!("SELECT count(*) FROM {table} WHERE hub = ''");
            let n: i64 = conn.query_row(&sql, [], |r| r.get(0)).unwrap();
            assert_eq!(n, 1, "{table}");
        }
        // The module still cascades with its device.
        conn.execute("DELETE FROM devices WHERE hub = '' AND id = 'd1'", []).unwrap();
        let modules: i64 = conn.query_row("SELECT count(*) FROM modules", [], |r| r.get(0)).unwrap();
        assert_eq!(modules, 0);
    }
}
