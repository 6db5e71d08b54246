//! Where a server's state lives: one provisioning store and, per embedded hub, the hub's
//! identity, twin and job stores.

use std::sync::Arc;

use zerotouch_engine::jobs::{JobStore, MemoryJobStore};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::registry::{IdentityStore, MemoryIdentityStore};
use zerotouch_engine::store::ProvisioningStore;
use zerotouch_engine::twin::{MemoryTwinStore, TwinStore};
use zerotouch_proto::IdScope;

use crate::error::ServerError;

/// The stores of one embedded hub.
#[derive(Debug)]
pub struct HubStores<I, T, J> {
    /// Device and module identities.
    pub identities: I,
    /// Twins.
    pub twins: T,
    /// Scheduled and registry jobs.
    pub jobs: J,
}

/// The stores of one embedded hub of backend `B`.
pub type HubStoresOf<B> = HubStores<<B as Backend>::Identities, <B as Backend>::Twins, <B as Backend>::Jobs>;

/// A family of stores a server runs on. Every store a backend opens may be opened again by
/// another process (an admin command) while the server runs, except where a backend says so.
pub trait Backend: Send + Sync + 'static {
    /// Enrollments, CA certificates, registration records and operations.
    type Provisioning: ProvisioningStore + Clone + 'static;
    /// A hub's identity registry.
    type Identities: IdentityStore + 'static;
    /// A hub's twins.
    type Twins: TwinStore + 'static;
    /// A hub's jobs.
    type Jobs: JobStore + 'static;

    /// Opens the provisioning store.
    ///
    /// # Errors
    /// [`ServerError::Store`] or [`ServerError::Io`] when it cannot be opened.
    fn provisioning(&self) -> Result<Self::Provisioning, ServerError>;

    /// Opens (creating when missing) the stores of the embedded hub `host_name`.
    ///
    /// # Errors
    /// [`ServerError::Store`] or [`ServerError::Io`] when they cannot be opened.
    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError>;

    /// Host names of the embedded hubs that have stores, sorted.
    ///
    /// # Errors
    /// [`ServerError::Io`] or [`ServerError::Store`].
    fn hub_names(&self) -> Result<Vec<String>, ServerError>;

    /// Hands `visit` every device twin of the embedded hub `host_name`, as the IoT Hub service
    /// API shows it, in device id order (see [`crate::admin::for_each_device_twin`]; backends
    /// whose stores answer queries read a page of twins at a time instead of one per device).
    ///
    /// # Errors
    /// Store failures, and whatever `visit` fails with (which ends the walk).
    fn for_each_device_twin(
        &self,
        host_name: &str,
        visit: &mut dyn FnMut(serde_json::Value) -> Result<(), ServerError>,
    ) -> Result<(), ServerError> {
        let hub = self.hub(host_name)?;
        crate::admin::for_each_device_twin(&hub.identities, &hub.twins, visit)
    }

    /// The ID scope of every server on this store when several share it (PostgreSQL): the one
    /// stored, or `proposed` (this server's data directory's), which is then stored. `None` for a
    /// store only one data directory uses (its `id-scope` file decides).
    ///
    /// # Errors
    /// [`ServerError::Store`], or [`ServerError::Config`] for a stored value that is not a scope.
    fn shared_id_scope(&self, proposed: &IdScope) -> Result<Option<IdScope>, ServerError> {
        let _ = proposed;
        Ok(None)
    }

    /// The kind of store the data directory should record, when it is not the directory's own
    /// SQLite file (see [`crate::datadir::mark_store`]).
    fn store_kind(&self) -> Option<&'static str> {
        None
    }

    /// Leaves `store` complete in its files when the server stops (SQLite: the write-ahead log
    /// moved into the database file, so that copying `zerotouch.sqlite` is a backup). Blocks.
    ///
    /// # Errors
    /// [`ServerError::Store`] when that fails; nothing is lost (the log stays).
    fn close(store: &Self::Provisioning) -> Result<(), ServerError> {
        let _ = store;
        Ok(())
    }
}

/// Everything in memory: for tests and throw-away servers. Enrollments are shared by every
/// [`Backend::provisioning`] handle; each [`Backend::hub`] call starts an empty registry, so a
/// hub's devices are only visible through the server that opened it.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    provisioning: Arc<MemoryStore>,
    hubs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for MemoryBackend {
    type Provisioning = Arc<MemoryStore>;
    type Identities = MemoryIdentityStore;
    type Twins = MemoryTwinStore;
    type Jobs = MemoryJobStore;

    fn provisioning(&self) -> Result<Self::Provisioning, ServerError> {
        Ok(Arc::clone(&self.provisioning))
    }

    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError> {
        let mut names = self.hubs.lock().map_err(|_| ServerError::Store("hub list poisoned".into()))?;
        if !names.iter().any(|n| n == host_name) {
            names.push(host_name.to_owned());
            names.sort();
        }
        Ok(HubStores {
            identities: MemoryIdentityStore::new(),
            twins: MemoryTwinStore::new(),
            jobs: MemoryJobStore::new(),
        })
    }

    fn hub_names(&self) -> Result<Vec<String>, ServerError> {
        Ok(self.hubs.lock().map_err(|_| ServerError::Store("hub list poisoned".into()))?.clone())
    }
}

/// The embedded default: one SQLite file in the data directory, `zerotouch.sqlite`, holding
/// provisioning and every embedded hub (each hub's identities, twins and jobs under its host
/// name), so a registration writes the hub identity, twin and record in one transaction.
/// Every handle this backend gives out shares one set of connections; admin commands open the
/// same file while a server runs (WAL, busy timeout).
///
/// Data directories of zerotouch 0.1 kept each hub in `hubs/<host name>.sqlite`: on first open
/// those files are moved into the database and renamed `….sqlite.imported`.
///
/// [`SqliteBackend::read_only`] opens the database for the commands that only read it.
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    dir: std::path::PathBuf,
    durability: zerotouch_store::sqlite::Durability,
    /// Opened with [`SqliteStore::open_read_only`](zerotouch_store::sqlite::SqliteStore::open_read_only).
    read_only: bool,
    store: Arc<std::sync::OnceLock<zerotouch_store::sqlite::SqliteStore>>,
}

#[cfg(feature = "sqlite")]
impl SqliteBackend {
    /// File name of the database in the data directory.
    pub const DATABASE_FILE: &'static str = "zerotouch.sqlite";
    /// Sub-directory where zerotouch 0.1 kept one database per hub.
    pub const LEGACY_HUBS_DIR: &'static str = "hubs";

    /// The backend of data directory `dir` (created when missing, on first open).
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into(), durability: Default::default(), read_only: false, store: Arc::default() }
    }

    /// The backend of data directory `dir` for reading only: the database is opened read-only
    /// (see [`SqliteStore::open_read_only`]), so nothing in the directory is created, migrated or
    /// written, and the directory may be read-only (a backup, another user's, a snapshot). Every
    /// write fails; [`Backend::hub`] records no hub.
    ///
    /// Opening fails with [`ServerError::NotFound`] when the directory holds no database, and
    /// with [`ServerError::Store`] when the database must first be migrated (an older schema, or
    /// hub files of zerotouch 0.1 not yet moved into it) or needs a newer zerotouch.
    ///
    /// [`SqliteStore::open_read_only`]: zerotouch_store::sqlite::SqliteStore::open_read_only
    pub fn read_only(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { read_only: true, ..Self::new(dir) }
    }

    /// The backend of a store sub-command on data directory `dir`: [`SqliteBackend::read_only`]
    /// for one that only reads, otherwise one that syncs every commit
    /// ([`SqliteDurability::PowerLoss`](crate::config::SqliteDurability::PowerLoss)), whatever
    /// `sqlite-durability` the server on the same store runs with. A command's commits are few,
    /// so the sync costs little; without it an import or a delete (the revocation of a device)
    /// that printed its summary could still be undone by a power loss, since the server, not the
    /// exiting command, checkpoints the log into the database when it shares the file.
    pub fn for_command(dir: impl Into<std::path::PathBuf>, read_only: bool) -> Self {
        if read_only {
            Self::read_only(dir)
        } else {
            Self::new(dir).with_durability(crate::config::SqliteDurability::PowerLoss)
        }
    }

    /// The backend with its database opened for `durability` (see `--sqlite-durability`).
    #[must_use]
    pub fn with_durability(mut self, durability: crate::config::SqliteDurability) -> Self {
        self.durability = match durability {
            crate::config::SqliteDurability::ProcessCrash => {
                zerotouch_store::sqlite::Durability::ProcessCrash
            }
            crate::config::SqliteDurability::PowerLoss => zerotouch_store::sqlite::Durability::PowerLoss,
        };
        self
    }

    /// The database, opened on first use.
    fn store(&self) -> Result<&zerotouch_store::sqlite::SqliteStore, ServerError> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        if self.read_only {
            let store = self.open_read_only()?;
            return Ok(self.store.get_or_init(|| store));
        }
        crate::datadir::ensure_dir(&self.dir)?;
        let path = self.dir.join(Self::DATABASE_FILE);
        crate::datadir::create_private(&path)?;
        let store = zerotouch_store::sqlite::SqliteStore::open_with(&path, self.durability)
            .map_err(|e| ServerError::Store(format!("{}: {e}", path.display())))?;
        self.import_legacy_hubs(&store)?;
        // Another thread may have opened it meanwhile; both handles work, the first one wins.
        Ok(self.store.get_or_init(|| store))
    }

    fn open_read_only(&self) -> Result<zerotouch_store::sqlite::SqliteStore, ServerError> {
        let path = self.dir.join(Self::DATABASE_FILE);
        let store = zerotouch_store::sqlite::SqliteStore::open_read_only(&path).map_err(|e| match e {
            zerotouch_engine::StoreError::NotFound => no_store(&path),
            e => ServerError::Store(e.to_string()),
        })?;
        // What a writer would move into the database first; reading without it would miss
        // those hubs' devices.
        if let Some((file, _)) = self.legacy_hub_files()?.first() {
            return Err(ServerError::Store(format!(
                "{} is a hub database of zerotouch 0.1 not yet moved into {}, and a read-only command \
                 does not move it: run `zerotouch serve` (or any command that writes to the store) on \
                 the data directory once, or on a writable copy",
                file.display(),
                path.display()
            )));
        }
        Ok(store)
    }

    /// The hub databases of zerotouch 0.1 in the data directory, with their hubs' host names.
    fn legacy_hub_files(&self) -> Result<Vec<(std::path::PathBuf, String)>, ServerError> {
        let dir = self.dir.join(Self::LEGACY_HUBS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ServerError::io(dir, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| ServerError::io(&dir, e))?.path();
            let hub = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sqlite"));
            if let Some(hub) = hub.map(str::to_owned) {
                files.push((path, hub));
            }
        }
        files.sort();
        Ok(files)
    }

    fn import_legacy_hubs(&self, store: &zerotouch_store::sqlite::SqliteStore) -> Result<(), ServerError> {
        for (path, hub) in self.legacy_hub_files()? {
            let hub = hub.as_str();
            let moved = match store.import_hub_file(&path, hub) {
                Ok(moved) => moved,
                // Another process (a store command beside a starting server) moved it first.
                Err(zerotouch_engine::StoreError::NotFound) => continue,
                Err(e) => return Err(ServerError::Store(format!("{}: {e}", path.display()))),
            };
            keep_imported(&path)?;
            tracing::info!(hub, devices = moved, file = %path.display(), "moved a hub database into the data directory's database");
        }
        Ok(())
    }
}

/// Renames an imported hub file of zerotouch 0.1 to `….sqlite.imported` (`.imported.1`, `.2`, …
/// when that name is taken), never over an existing file: a copy kept by an earlier import
/// stays as it is.
#[cfg(feature = "sqlite")]
fn keep_imported(path: &std::path::Path) -> Result<(), ServerError> {
    for n in 0u32.. {
        let mut done = path.as_os_str().to_owned();
        done.push(".imported");
        if n > 0 {
            done.push(format!(".{n}"));
        }
        // A hard link fails where the name exists, where a rename would replace the file. A
        // file gone meanwhile was kept by another process that imported it too (the import
        // skips rows already present, so both imports moved the same rows).
        match std::fs::hard_link(path, &done) {
            Ok(()) => {
                return match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ServerError::io(path, e)),
                    _ => Ok(()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ServerError::io(path, e)),
        }
    }
    Err(ServerError::Store(format!("{}: no free name to keep it under", path.display())))
}

#[cfg(feature = "sqlite")]
impl Backend for SqliteBackend {
    type Provisioning = zerotouch_store::sqlite::SqliteStore;
    type Identities = zerotouch_store::sqlite::SqliteStore;
    type Twins = zerotouch_store::sqlite::SqliteStore;
    type Jobs = zerotouch_store::sqlite::SqliteStore;

    fn close(store: &Self::Provisioning) -> Result<(), ServerError> {
        if store.is_read_only() {
            // It wrote nothing, and its log (if any) is a writer's to move.
            return Ok(());
        }
        store.checkpoint().map_err(|e| ServerError::Store(e.to_string()))
    }

    fn provisioning(&self) -> Result<Self::Provisioning, ServerError> {
        self.store().cloned()
    }

    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError> {
        let view =
            self.store()?.hub(host_name).map_err(|e| ServerError::Store(format!("hub {host_name}: {e}")))?;
        Ok(HubStores { identities: view.clone(), twins: view.clone(), jobs: view })
    }

    fn hub_names(&self) -> Result<Vec<String>, ServerError> {
        self.store()?.hub_names().map_err(|e| ServerError::Store(e.to_string()))
    }

    fn for_each_device_twin(
        &self,
        host_name: &str,
        visit: &mut dyn FnMut(serde_json::Value) -> Result<(), ServerError>,
    ) -> Result<(), ServerError> {
        crate::admin::scan_device_twins(&self.hub(host_name)?.twins, visit)
    }
}

/// The error of a command that needs the store at `database` and finds none.
#[cfg(feature = "sqlite")]
pub(crate) fn no_store(database: &std::path::Path) -> ServerError {
    ServerError::NotFound(format!(
        "no store at {} (is --data-dir right? `zerotouch serve --data-dir DIR` or `zerotouch enrollments \
         import --data-dir DIR FILE` creates one)",
        database.display()
    ))
}

/// PostgreSQL (`--database-url`): provisioning and every embedded hub in one database that
/// several server instances may share. A hub's identities, twins and jobs are rows tagged with
/// its host name (lower case), so the same device id may exist in two hubs; the names of the
/// hubs ever opened are stored, so admin commands list them. A database from before hubs had
/// names (one hub, untagged rows) gives its rows to the first hub opened on it.
///
/// [`PgBackend::connect_read_only`] opens the database for the commands that only read it.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PgBackend {
    store: zerotouch_store::postgres::PgStore,
}

#[cfg(feature = "postgres")]
impl PgBackend {
    /// Connections per process.
    pub const POOL_SIZE: u32 = 16;

    /// Connects to `url` (`postgres://user:password@host/db`) and applies pending migrations.
    ///
    /// # Errors
    /// [`ServerError::Store`] when the server is unreachable or refuses.
    pub fn connect(url: &str) -> Result<Self, ServerError> {
        let store = zerotouch_store::postgres::PgStore::connect(url, Self::POOL_SIZE).map_err(pg_error)?;
        Ok(Self { store })
    }

    /// Connects to `url` for reading only (see
    /// [`PgStore::connect_read_only`](zerotouch_store::postgres::PgStore::connect_read_only)):
    /// nothing is created, migrated or written, so a command of a newer zerotouch never changes
    /// the schema under the servers running on the database, and PostgreSQL refuses every write.
    /// [`Backend::hub`] records no hub and moves no rows of the unnamed hub;
    /// [`Backend::shared_id_scope`] stores none.
    ///
    /// # Errors
    /// [`ServerError::NotFound`] when the database holds no zerotouch store;
    /// [`ServerError::Store`] when the server is unreachable or refuses, or when the schema must
    /// first be migrated or needs a newer zerotouch.
    pub fn connect_read_only(url: &str) -> Result<Self, ServerError> {
        let store = zerotouch_store::postgres::PgStore::connect_read_only(url, Self::POOL_SIZE).map_err(
            |e| match e {
                zerotouch_engine::StoreError::NotFound => ServerError::NotFound(
                    "no zerotouch store in the PostgreSQL database (no `zerotouch_schema` table on its \
                     search path: is --database-url right? `zerotouch serve --database-url URL` or \
                     `zerotouch enrollments import --database-url URL FILE` creates one)"
                        .to_owned(),
                ),
                e => pg_error(e),
            },
        )?;
        Ok(Self { store })
    }

    /// The backend of a store sub-command on `url`: [`PgBackend::connect_read_only`] for one
    /// that only reads, otherwise [`PgBackend::connect`].
    ///
    /// # Errors
    /// As those.
    pub fn for_command(url: &str, read_only: bool) -> Result<Self, ServerError> {
        if read_only {
            Self::connect_read_only(url)
        } else {
            Self::connect(url)
        }
    }
}

#[cfg(feature = "postgres")]
fn pg_error(e: zerotouch_engine::StoreError) -> ServerError {
    ServerError::Store(format!("postgres: {e}"))
}

#[cfg(feature = "postgres")]
impl Backend for PgBackend {
    type Provisioning = zerotouch_store::postgres::PgStore;
    type Identities = zerotouch_store::postgres::PgStore;
    type Twins = zerotouch_store::postgres::PgStore;
    type Jobs = zerotouch_store::postgres::PgStore;

    fn store_kind(&self) -> Option<&'static str> {
        Some("postgresql")
    }

    fn provisioning(&self) -> Result<Self::Provisioning, ServerError> {
        Ok(self.store.clone())
    }

    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError> {
        // One view for all three: they share the pool, so a registration's unit covers them.
        let hub = self.store.hub(host_name).map_err(pg_error)?;
        if self.store.is_read_only() {
            // What a writer would move into the hub first; reading without it would miss those
            // devices.
            if hub.would_claim_unnamed_hub().map_err(pg_error)? {
                return Err(ServerError::Store(format!(
                    "the database holds devices of the unnamed hub (written before hubs had names), which \
                     the first server to open hub {host_name} moves into it, and a read-only command does \
                     not move them: run `zerotouch serve` with that hub on the database once"
                )));
            }
        } else {
            let moved = hub.claim_unnamed_hub().map_err(pg_error)?;
            if moved > 0 {
                tracing::info!(
                    hub = host_name,
                    devices = moved,
                    "moved the devices of the unnamed hub into this hub"
                );
            }
        }
        Ok(HubStores { identities: hub.clone(), twins: hub.clone(), jobs: hub })
    }

    fn hub_names(&self) -> Result<Vec<String>, ServerError> {
        self.store.hub_names().map_err(pg_error)
    }

    fn for_each_device_twin(
        &self,
        host_name: &str,
        visit: &mut dyn FnMut(serde_json::Value) -> Result<(), ServerError>,
    ) -> Result<(), ServerError> {
        crate::admin::scan_device_twins(&self.hub(host_name)?.twins, visit)
    }

    /// The stored ID scope, or `proposed`, which is then stored; on a read-only backend the
    /// stored one only (`None` when none is).
    fn shared_id_scope(&self, proposed: &IdScope) -> Result<Option<IdScope>, ServerError> {
        let stored = if self.store.is_read_only() {
            match self.store.setting("id-scope").map_err(pg_error)? {
                Some(stored) => stored,
                None => return Ok(None),
            }
        } else {
            self.store.setting_or_insert("id-scope", proposed.as_str()).map_err(pg_error)?
        };
        IdScope::new(stored.as_str())
            .map(Some)
            .map_err(|e| ServerError::Config(format!("the database's ID scope {stored:?}: {e}")))
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use zerotouch_engine::store::Precondition;
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::DeviceId;
    use zerotouch_store::sqlite::SqliteStore;

    use super::*;

    #[test]
    fn a_data_directory_with_one_file_per_hub_is_moved_into_one_database() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(SqliteBackend::LEGACY_HUBS_DIR);
        std::fs::create_dir_all(&legacy).unwrap();
        let id = DeviceId::new("boiler-9").unwrap();
        {
            let old = SqliteStore::open(legacy.join("north.localhost.sqlite")).unwrap();
            old.put_device(&Device::new(id.clone()), &Precondition::MustNotExist).unwrap();
        }

        let backend = SqliteBackend::new(dir.path());
        let north = backend.hub("north.localhost").unwrap();
        assert!(north.identities.device(&id).unwrap().is_some());
        assert!(backend.hub("south.localhost").unwrap().identities.device(&id).unwrap().is_none());
        assert_eq!(backend.hub_names().unwrap(), ["north.localhost", "south.localhost"]);
        assert!(!legacy.join("north.localhost.sqlite").exists());
        assert!(legacy.join("north.localhost.sqlite.imported").exists());

        // A second backend on the same directory finds nothing left to move and the same devices.
        let again = SqliteBackend::new(dir.path());
        assert!(again.hub("north.localhost").unwrap().identities.device(&id).unwrap().is_some());
    }

    #[test]
    fn a_hub_file_imported_again_never_replaces_the_copy_kept_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(SqliteBackend::LEGACY_HUBS_DIR);
        std::fs::create_dir_all(&legacy).unwrap();
        let kept = legacy.join("north.localhost.sqlite.imported");
        std::fs::write(&kept, b"the copy kept by the first import").unwrap();
        {
            let old = SqliteStore::open(legacy.join("north.localhost.sqlite")).unwrap();
            old.put_device(&Device::new(DeviceId::new("boiler-9").unwrap()), &Precondition::MustNotExist)
                .unwrap();
        }

        let backend = SqliteBackend::new(dir.path());
        backend.hub("north.localhost").unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), b"the copy kept by the first import");
        assert!(!legacy.join("north.localhost.sqlite").exists());
        assert!(legacy.join("north.localhost.sqlite.imported.1").exists());
    }

    #[test]
    fn a_hub_file_kept_by_another_process_meanwhile_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("north.localhost.sqlite");
        std::fs::write(&path, b"a hub file").unwrap();
        // Both processes imported it; the first keeps it, then the second finds it gone.
        keep_imported(&path).unwrap();
        keep_imported(&path).unwrap();
        assert_eq!(std::fs::read(dir.path().join("north.localhost.sqlite.imported")).unwrap(), b"a hub file");
        assert!(!dir.path().join("north.localhost.sqlite.imported.1").exists());
    }

    #[test]
    fn a_read_only_backend_opens_no_hub_and_moves_no_hub_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let refused = SqliteBackend::read_only(&missing).provisioning().unwrap_err();
        assert_eq!(refused.exit_code(), 4, "{refused}");
        assert!(refused.to_string().contains("no store at"), "{refused}");
        assert!(!missing.exists(), "the data directory was created");

        let id = DeviceId::new("boiler-9").unwrap();
        SqliteBackend::new(dir.path())
            .hub("north.localhost")
            .unwrap()
            .identities
            .put_device(&Device::new(id.clone()), &Precondition::MustNotExist)
            .unwrap();
        let reader = SqliteBackend::read_only(dir.path());
        assert!(reader.hub("north.localhost").unwrap().identities.device(&id).unwrap().is_some());
        assert!(reader.hub("south.localhost").unwrap().identities.device(&id).unwrap().is_none());
        assert_eq!(reader.hub_names().unwrap(), ["north.localhost"], "a read-only hub view recorded its hub");
        let written =
            reader.hub("north.localhost").unwrap().identities.delete_device(&id, &Precondition::None);
        assert!(written.unwrap_err().to_string().contains("read-only"));
        SqliteBackend::close(&reader.provisioning().unwrap()).unwrap();

        // A hub file of zerotouch 0.1 is moved by a writer; a reader says so instead of
        // reading without it.
        let legacy = dir.path().join(SqliteBackend::LEGACY_HUBS_DIR);
        std::fs::create_dir_all(&legacy).unwrap();
        drop(SqliteStore::open(legacy.join("west.localhost.sqlite")).unwrap());
        let refused = SqliteBackend::read_only(dir.path()).hub_names().unwrap_err().to_string();
        assert!(
            refused.contains("west.localhost.sqlite") && refused.contains("zerotouch serve"),
            "{refused}"
        );
        assert!(legacy.join("west.localhost.sqlite").exists());
    }

    #[test]
    fn a_backend_asked_for_power_loss_durability_syncs_every_commit() {
        use crate::config::SqliteDurability;
        use zerotouch_store::sqlite::Durability;

        let dir = tempfile::tempdir().unwrap();
        let default = SqliteBackend::new(dir.path().join("a"));
        assert_eq!(default.store().unwrap().durability().unwrap(), Durability::ProcessCrash);
        let synced = SqliteBackend::new(dir.path().join("b")).with_durability(SqliteDurability::PowerLoss);
        assert_eq!(synced.store().unwrap().durability().unwrap(), Durability::PowerLoss);
    }

    #[test]
    fn a_store_command_that_writes_syncs_every_commit_whatever_the_server_runs_with() {
        use zerotouch_store::sqlite::Durability;

        let dir = tempfile::tempdir().unwrap();
        // The server runs with the default (commits synced at checkpoints only).
        let server = SqliteBackend::new(dir.path());
        assert_eq!(server.store().unwrap().durability().unwrap(), Durability::ProcessCrash);
        let command = SqliteBackend::for_command(dir.path(), false);
        assert_eq!(command.store().unwrap().durability().unwrap(), Durability::PowerLoss);
        assert!(SqliteBackend::for_command(dir.path(), true).read_only);
    }

    #[cfg(unix)]
    #[test]
    fn the_database_and_its_journal_are_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::new(dir.path());
        let hub = backend.hub("north.localhost").unwrap();
        hub.identities
            .put_device(&Device::new(DeviceId::new("unit-2").unwrap()), &Precondition::MustNotExist)
            .unwrap();
        for file in [SqliteBackend::DATABASE_FILE, "zerotouch.sqlite-wal"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
        }
    }

    #[test]
    fn provisioning_and_hub_handles_share_one_database() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::new(dir.path());
        let provisioning = backend.provisioning().unwrap();
        let hub = backend.hub("north.localhost").unwrap();
        let id = DeviceId::new("unit-1").unwrap();
        // A unit on the provisioning handle that writes through the hub handle and fails leaves
        // nothing: both handles are one database and one writer.
        let result = zerotouch_engine::store::RegistrationStore::atomically(&provisioning, &mut || {
            hub.identities.put_device(&Device::new(id.clone()), &Precondition::MustNotExist)?;
            Err(zerotouch_engine::Error::BadRequest("abandoned".into()))
        });
        assert!(result.is_err());
        assert!(hub.identities.device(&id).unwrap().is_none());
        assert!(dir.path().join(SqliteBackend::DATABASE_FILE).exists());
        assert!(!dir.path().join(SqliteBackend::LEGACY_HUBS_DIR).exists());
    }
}
