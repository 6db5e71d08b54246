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
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    dir: std::path::PathBuf,
    durability: zerotouch_store::sqlite::Durability,
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
        Self { dir: dir.into(), durability: Default::default(), store: Arc::default() }
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
        crate::datadir::ensure_dir(&self.dir)?;
        let path = self.dir.join(Self::DATABASE_FILE);
        crate::datadir::create_private(&path)?;
        let store = zerotouch_store::sqlite::SqliteStore::open_with(&path, self.durability)
            .map_err(|e| ServerError::Store(format!("{}: {e}", path.display())))?;
        self.import_legacy_hubs(&store)?;
        // Another thread may have opened it meanwhile; both handles work, the first one wins.
        Ok(self.store.get_or_init(|| store))
    }

    fn import_legacy_hubs(&self, store: &zerotouch_store::sqlite::SqliteStore) -> Result<(), ServerError> {
        let dir = self.dir.join(Self::LEGACY_HUBS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ServerError::io(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| ServerError::io(&dir, e))?.path();
            let Some(hub) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sqlite"))
            else {
                continue;
            };
            let moved = store
                .import_hub_file(&path, hub)
                .map_err(|e| ServerError::Store(format!("{}: {e}", path.display())))?;
            let mut done = path.clone().into_os_string();
            done.push(".imported");
            std::fs::rename(&path, &done).map_err(|e| ServerError::io(&path, e))?;
            tracing::info!(hub, devices = moved, file = %path.display(), "moved a hub database into the data directory's database");
        }
        Ok(())
    }
}

#[cfg(feature = "sqlite")]
impl Backend for SqliteBackend {
    type Provisioning = zerotouch_store::sqlite::SqliteStore;
    type Identities = zerotouch_store::sqlite::SqliteStore;
    type Twins = zerotouch_store::sqlite::SqliteStore;
    type Jobs = zerotouch_store::sqlite::SqliteStore;

    fn close(store: &Self::Provisioning) -> Result<(), ServerError> {
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

/// PostgreSQL (`--database-url`): provisioning and every embedded hub in one database that
/// several server instances may share. A hub's identities, twins and jobs are rows tagged with
/// its host name (lower case), so the same device id may exist in two hubs; the names of the
/// hubs ever opened are stored, so admin commands list them. A database from before hubs had
/// names (one hub, untagged rows) gives its rows to the first hub opened on it.
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
        let moved = hub.claim_unnamed_hub().map_err(pg_error)?;
        if moved > 0 {
            tracing::info!(
                hub = host_name,
                devices = moved,
                "moved the devices of the unnamed hub into this hub"
            );
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

    fn shared_id_scope(&self, proposed: &IdScope) -> Result<Option<IdScope>, ServerError> {
        let stored = self.store.setting_or_insert("id-scope", proposed.as_str()).map_err(pg_error)?;
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
    fn a_backend_asked_for_power_loss_durability_syncs_every_commit() {
        use crate::config::SqliteDurability;
        use zerotouch_store::sqlite::Durability;

        let dir = tempfile::tempdir().unwrap();
        let default = SqliteBackend::new(dir.path().join("a"));
        assert_eq!(default.store().unwrap().durability().unwrap(), Durability::ProcessCrash);
        let synced = SqliteBackend::new(dir.path().join("b")).with_durability(SqliteDurability::PowerLoss);
        assert_eq!(synced.store().unwrap().durability().unwrap(), Durability::PowerLoss);
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
