//! Where a server's state lives: one provisioning store and, per embedded hub, the hub's
//! identity, twin and job stores.

use std::sync::Arc;

use zerotouch_engine::jobs::{JobStore, MemoryJobStore};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::registry::{IdentityStore, MemoryIdentityStore};
use zerotouch_engine::store::ProvisioningStore;
use zerotouch_engine::twin::{MemoryTwinStore, TwinStore};

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

/// The embedded default: SQLite files in the data directory, `zerotouch.sqlite` for
/// provisioning and `hubs/<host name>.sqlite` per embedded hub (a hub's registry keeps device
/// ids unique per hub, as IoT Hub does, so hubs do not share tables). Admin commands open the
/// same files while a server runs (WAL, busy timeout).
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    dir: std::path::PathBuf,
}

#[cfg(feature = "sqlite")]
impl SqliteBackend {
    /// File name of the provisioning database in the data directory.
    pub const DATABASE_FILE: &'static str = "zerotouch.sqlite";
    /// Sub-directory of the hub databases.
    pub const HUBS_DIR: &'static str = "hubs";

    /// The backend of data directory `dir` (created when missing, on first open).
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn open(path: &std::path::Path) -> Result<zerotouch_store::sqlite::SqliteStore, ServerError> {
        if let Some(parent) = path.parent() {
            crate::datadir::ensure_dir(parent)?;
        }
        zerotouch_store::sqlite::SqliteStore::open(path)
            .map_err(|e| ServerError::Store(format!("{}: {e}", path.display())))
    }
}

#[cfg(feature = "sqlite")]
impl Backend for SqliteBackend {
    type Provisioning = zerotouch_store::sqlite::SqliteStore;
    type Identities = zerotouch_store::sqlite::SqliteStore;
    type Twins = zerotouch_store::sqlite::SqliteStore;
    type Jobs = zerotouch_store::sqlite::SqliteStore;

    fn provisioning(&self) -> Result<Self::Provisioning, ServerError> {
        Self::open(&self.dir.join(Self::DATABASE_FILE))
    }

    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError> {
        let file = format!("{}.sqlite", host_name.to_ascii_lowercase());
        let store = Self::open(&self.dir.join(Self::HUBS_DIR).join(file))?;
        Ok(HubStores { identities: store.clone(), twins: store.clone(), jobs: store })
    }

    fn hub_names(&self) -> Result<Vec<String>, ServerError> {
        let dir = self.dir.join(Self::HUBS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ServerError::io(dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ServerError::io(&dir, e))?;
            if let Some(name) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".sqlite")) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// PostgreSQL (`--database-url`): provisioning and every embedded hub in one database that
/// several server instances may share. A hub's identities, twins and jobs are rows tagged with
/// its host name (lower case), so the same device id may exist in two hubs; the names of the
/// hubs ever opened are stored, so admin commands list them.
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

    fn provisioning(&self) -> Result<Self::Provisioning, ServerError> {
        Ok(self.store.clone())
    }

    fn hub(&self, host_name: &str) -> Result<HubStoresOf<Self>, ServerError> {
        // One view for all three: they share the pool, so a registration's unit covers them.
        let hub = self.store.hub(host_name).map_err(pg_error)?;
        Ok(HubStores { identities: hub.clone(), twins: hub.clone(), jobs: hub })
    }

    fn hub_names(&self) -> Result<Vec<String>, ServerError> {
        self.store.hub_names().map_err(pg_error)
    }
}
