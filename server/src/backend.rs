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
