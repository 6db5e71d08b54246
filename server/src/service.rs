//! The engine behind the endpoints: provisioner over the provisioning store, embedded hubs
//! over their registries, joined as the transport's [`EngineService`].

use std::sync::{Arc, Mutex};

use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::CryptoProvider;
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::jobs::JobLimits;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegistrationOutcome};
use zerotouch_engine::store::EnrollmentRef;
use zerotouch_proto::device::Substatus;
use zerotouch_proto::IdScope;
use zerotouch_transport::service::EngineService;

use crate::backend::{Backend, HubStores};
use crate::config::HubSpec;
use crate::error::ServerError;

/// The embedded hubs of a backend.
pub type Hubs<B> = EmbeddedHubs<<B as Backend>::Identities, <B as Backend>::Twins, <B as Backend>::Jobs>;

/// The DPS service of a backend, as the endpoints call it.
pub type Service<B> = EngineService<<B as Backend>::Provisioning, Hubs<B>>;

/// Builds the provisioning service for `id_scope` whose linked hubs are the embedded `hubs`
/// (allocation weights as given), each over its stores in `backend`; `assigning` replies carry
/// `retry_after_secs`.
///
/// # Errors
/// [`ServerError::Config`] without hubs; store and engine failures while opening.
pub fn build<B: Backend>(
    backend: &B,
    id_scope: IdScope,
    hubs: &[HubSpec],
    crypto: Arc<dyn CryptoProvider>,
    retry_after_secs: u32,
) -> Result<Service<B>, ServerError> {
    if hubs.is_empty() {
        return Err(ServerError::Config("at least one hub is needed".into()));
    }
    let mut embedded = EmbeddedHubs::new();
    for spec in hubs {
        let HubStores { identities, twins, jobs } = backend.hub(&spec.name)?;
        let mut hub = EmbeddedHub::new(
            spec.name.clone(),
            identities,
            twins,
            jobs,
            Arc::clone(&crypto),
            JobLimits::default(),
        )?;
        // Nothing routes lifecycle events yet: building each provisioned device's event (its
        // twin with the identity's fields) cost ~4 % of a registration's server CPU.
        hub.set_lifecycle_events(false);
        // Nor does anything deliver twin events (no hub device routes yet): without this the
        // twin resets of reprovisioning would queue events nobody takes.
        hub.set_twin_events(false);
        embedded.insert(hub);
    }
    let mut config = ProvisionerConfig::new(id_scope);
    config.retry_after_secs = retry_after_secs;
    let provisioner = Provisioner::new(
        config,
        backend.provisioning()?,
        crypto,
        Allocator::new(hubs.iter().map(HubSpec::linked).collect()),
    )
    // The device hears only "Internal server error"; the operator needs the cause. Logged in
    // the span of the connection that met it, next to its "request refused" line.
    .on_internal_error(|e| tracing::warn!(error = %e, "request failed inside the server"))
    .on_registration(log_registration);
    Ok(EngineService::new(provisioner, Arc::new(Mutex::new(embedded))))
}

/// One info line per registration the engine accepted: where the device landed, or why it
/// failed after its credential was accepted (a poll reads `failed` with status 200, so the
/// endpoints' refusal lines never show it). Only devices with valid credentials cause these
/// lines, so they have no budget; the registration id and hub names are not secret.
fn log_registration(outcome: &RegistrationOutcome<'_>) {
    match outcome {
        RegistrationOutcome::Assigned(record) => {
            let state = &record.state;
            let (enrollment_kind, enrollment) = match &record.enrollment {
                EnrollmentRef::Individual(id) => ("individual", id.as_str()),
                EnrollmentRef::Group(id) => ("group", id.as_str()),
            };
            tracing::info!(
                registration_id = %record.registration_id,
                hub = state.assigned_hub.as_deref().unwrap_or_default(),
                device_id = state.device_id.as_deref().unwrap_or_default(),
                substatus = state.substatus.map(Substatus::as_str).unwrap_or_default(),
                enrollment_kind,
                enrollment,
                "device assigned"
            );
        }
        RegistrationOutcome::Failed { registration_id, error_code, message } => {
            // Not `message`: a JSON log line's text is its `message` field.
            tracing::info!(%registration_id, error_code, error_message = message, "registration failed");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
    use zerotouch_engine::attestation::Credential;
    use zerotouch_engine::crypto::RingCrypto;
    use zerotouch_engine::provisioner::{OperationStatusRequest, RegisterRequest, ResponseBody};
    use zerotouch_proto::device::{DeviceRegistration, RegistrationStatus};
    use zerotouch_proto::{DeviceId, Timestamp};
    use zerotouch_transport::service::DpsService;

    use super::*;
    use crate::admin;
    use crate::backend::MemoryBackend;

    /// A register request of `registration_id` in the tests' scope.
    fn register_request(registration_id: &str, credential: &Credential) -> RegisterRequest {
        RegisterRequest {
            id_scope: "0ne0000AB12".into(),
            registration_id: registration_id.into(),
            body: DeviceRegistration {
                payload: None,
                registration_id: registration_id.into(),
                tpm: None,
                csr: None,
            },
            credential: credential.clone(),
            api_version: None,
        }
    }

    #[test]
    fn an_imported_device_provisions_into_the_embedded_hub_registry() {
        let backend = MemoryBackend::new();
        let crypto: Arc<dyn CryptoProvider> = Arc::new(RingCrypto::new());
        let now = Timestamp::from_unix_nanos(1_800_000_000_000_000_000);
        let key = STANDARD.encode([7u8; 32]);
        let file = format!(
            r#"[{{"registrationId": "boiler-1",
                 "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}}}}]"#
        );
        let entries = admin::parse_import(&file).unwrap();
        admin::import(backend.provisioning().unwrap().as_ref(), crypto.as_ref(), now, entries).unwrap();

        let scope = IdScope::new("0ne0000AB12").unwrap();
        let hubs = [HubSpec::parse("north.localhost").unwrap(), HubSpec::parse("south.localhost:3").unwrap()];
        let service = build(&backend, scope, &hubs, Arc::clone(&crypto), 1).unwrap();

        let token = registration_token(crypto.as_ref(), &[7u8; 32], "0ne0000AB12", "boiler-1", 1_900_000_000);
        let credential = Credential::Sas(token.to_string());
        let accepted = service.register(now, register_request("boiler-1", &credential));
        assert_eq!(accepted.status, 202);
        assert_eq!(accepted.retry_after, Some(1));
        let ResponseBody::Operation(op) = accepted.body else { panic!("{accepted:?}") };
        let done = service.operation_status(
            now,
            OperationStatusRequest {
                id_scope: "0ne0000AB12".into(),
                registration_id: "boiler-1".into(),
                operation_id: op.operation_id.into(),
                credential,
            },
        );
        let ResponseBody::Operation(op) = done.body else { panic!("{done:?}") };
        assert_eq!(op.status, RegistrationStatus::Assigned);
        let state = op.registration_state.unwrap();
        let hub = state.assigned_hub.unwrap();
        assert!(hubs.iter().any(|h| h.name == hub), "{hub}");

        let hubs = service.hubs().lock().unwrap();
        let registry = hubs.hub(&hub).unwrap().registry();
        let device = admin::device(registry.store(), &DeviceId::new("boiler-1").unwrap()).unwrap().unwrap();
        assert_eq!(device.device_id.as_str(), "boiler-1");
        assert_eq!(admin::devices(registry.store()).unwrap().len(), 1);
        assert_eq!(backend.hub_names().unwrap(), vec!["north.localhost", "south.localhost"]);
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn a_poll_answered_from_memory_still_refuses_a_device_whose_group_was_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::backend::SqliteBackend::new(dir.path());
        let crypto: Arc<dyn CryptoProvider> = Arc::new(RingCrypto::new());
        let now = Timestamp::from_unix_nanos(1_800_000_000_000_000_000);
        let group_key = STANDARD.encode([9u8; 32]);
        let group = |status: &str| {
            format!(
                r#"[{{"enrollmentGroupId": "meters", "provisioningStatus": "{status}",
                     "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{group_key}", "secondaryKey": "{group_key}"}}}}}}]"#
            )
        };
        let import = |status: &str| {
            let entries = admin::parse_import(&group(status)).unwrap();
            admin::import(&backend.provisioning().unwrap(), crypto.as_ref(), now, entries).unwrap();
        };
        import("enabled");
        let hubs = [HubSpec::parse("north.localhost").unwrap()];
        let service =
            build(&backend, IdScope::new("0ne0000AB12").unwrap(), &hubs, Arc::clone(&crypto), 1).unwrap();

        let key = derive_device_key(crypto.as_ref(), &[9u8; 32], "meter-1");
        let token = registration_token(crypto.as_ref(), &key, "0ne0000AB12", "meter-1", 1_900_000_000);
        let credential = Credential::Sas(token.to_string());
        let accepted = service.register(now, register_request("meter-1", &credential));
        let ResponseBody::Operation(op) = accepted.body else { panic!("{accepted:?}") };
        let poll = OperationStatusRequest {
            id_scope: "0ne0000AB12".into(),
            registration_id: "meter-1".into(),
            operation_id: op.operation_id.into(),
            credential,
        };

        // The committed operation is in memory: the poll is answered without the blocking path.
        let done = service.operation_status_in_memory(now, &poll).expect("answered from memory");
        assert_eq!(done.status, 200, "{done:?}");
        let ResponseBody::Operation(status) = done.body else { panic!("{done:?}") };
        assert_eq!(status.status, RegistrationStatus::Assigned);

        // Authentication still runs on every poll: a disabled group refuses the next one.
        import("disabled");
        let refused = service.operation_status_in_memory(now, &poll).expect("answered from memory");
        assert_eq!(refused.status, 401, "{refused:?}");

        // An operation the store does not hold in memory is left to the blocking path.
        let unknown = OperationStatusRequest { operation_id: "4.0123456789abcdef.unknown".into(), ..poll };
        assert!(service.operation_status_in_memory(now, &unknown).is_none());
    }
}
