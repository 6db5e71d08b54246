//! Runnable scenarios live beside this file as examples; this library holds the little setup
//! several of them share, so each example reads as its scenario.

use std::sync::{Arc, Mutex};

use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::CryptoProvider;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::jobs::JobStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::ProvisioningStore;
use zerotouch_engine::twin::TwinStore;
use zerotouch_engine::Error;
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::IdScope;
use zerotouch_transport::service::{now, EngineService};

/// The DPS service as `zerotouch serve` builds it: a provisioner for `scope` over `store`, whose
/// linked hubs are the embedded `hubs`, each over the stores `view(name)` returns (for SQLite and
/// PostgreSQL, views of the same database, so a registration is one transaction).
///
/// # Errors
/// An invalid `scope`, or a hub the engine cannot set up over its stores.
pub fn service_over<P, S>(
    scope: &str,
    store: P,
    hubs: &[&str],
    view: impl Fn(&str) -> S,
    crypto: &Arc<dyn CryptoProvider>,
) -> Result<EngineService<P, EmbeddedHubs<S, S, S>>, Error>
where
    P: ProvisioningStore,
    S: IdentityStore + TwinStore + JobStore + Clone,
{
    let mut embedded = EmbeddedHubs::new();
    for name in hubs {
        let stores = view(name);
        embedded.insert(EmbeddedHub::over(*name, stores, Arc::clone(crypto))?);
    }
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(scope)?),
        store,
        Arc::clone(crypto),
        Allocator::new(hubs.iter().map(|h| LinkedHub::new(*h)).collect()),
    );
    Ok(EngineService::new(provisioner, Arc::new(Mutex::new(embedded))))
}

/// The register request a device of a symmetric-key group sends: its key derived from
/// `group_key`, a SAS token valid for an hour.
pub fn group_device_request(
    crypto: &dyn CryptoProvider,
    group_key: &[u8],
    scope: &str,
    id: &str,
) -> RegisterRequest {
    let key = derive_device_key(crypto, group_key, id);
    let token = registration_token(crypto, &key, scope, id, now().unix_secs() + 3600);
    RegisterRequest {
        id_scope: scope.into(),
        registration_id: id.into(),
        body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
        credential: Credential::Sas(token.to_string()),
        api_version: None,
    }
}
