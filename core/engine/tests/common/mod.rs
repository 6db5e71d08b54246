//! Shared world for the provisioning scenario tests: three linked hubs, a latency table, a custom
//! allocator, a memory store, simulated hubs and the simulator.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use zerotouch_engine::allocation::{Allocator, CustomAllocator, LatencyTable};
use zerotouch_engine::attestation::symmetric;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_engine::registration::{
    Assignment, DeviceCredential, RegistrationConfig, RegistrationEvent, RegistrationFailure,
};
use zerotouch_proto::service::{
    AllocationPolicy, AttestationMechanism, CustomAllocationRequest, CustomAllocationResponse,
    EnrollmentGroup, IndividualEnrollment, InitialTwin, InitialTwinProperties, ProvisioningStatus,
    ReprovisionPolicy,
};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, IfMatch, RegistrationId};
use zerotouch_testkit::hubs::SimHubs;
use zerotouch_testkit::sim::Simulator;

pub const SCOPE: &str = "0ne00ABCDEF";
pub const HUB_A: &str = "hub-a.example.net";
pub const HUB_B: &str = "hub-b.example.net";
pub const HUB_C: &str = "hub-c.example.net";

/// Custom allocation the way a webhook would do it: the device's payload names its site, the
/// allocator answers with that site's hub and greets the device. New devices get a twin tagged
/// with their site; on re-registration it returns no twin (so the reprovision policy decides)
/// unless the payload asks for `"retwin": true`.
pub struct SiteAllocator;

impl CustomAllocator for SiteAllocator {
    fn allocate(&self, request: &CustomAllocationRequest) -> Result<CustomAllocationResponse, String> {
        let site = request
            .device_runtime_context
            .payload
            .as_ref()
            .and_then(|p| p.get("site"))
            .and_then(Value::as_str)
            .ok_or("payload has no site")?;
        let hub = request
            .linked_hubs
            .iter()
            .find(|h| h.starts_with(&format!("hub-{site}.")))
            .ok_or_else(|| format!("no hub for site {site}"))?;
        let payload = request.device_runtime_context.payload.as_ref();
        let retwin = payload.and_then(|p| p.get("retwin")).and_then(Value::as_bool).unwrap_or(false);
        let new_device = request.device_runtime_context.current_iot_hub_host_name.is_none();
        Ok(CustomAllocationResponse {
            iot_hub_host_name: hub.clone(),
            initial_twin: (new_device || retwin)
                .then(|| InitialTwin { tags: Some(json!({ "site": site })), properties: None }),
            payload: Some(json!({ "welcome": site })),
        })
    }
}

pub fn linked_hubs() -> Vec<LinkedHub> {
    vec![LinkedHub::new(HUB_A), LinkedHub::new(HUB_B).with_weight(2), LinkedHub::new(HUB_C).with_weight(7)]
}

pub type World = Simulator<Arc<MemoryStore>, SimHubs>;

pub fn world() -> World {
    world_with(|p| p)
}

/// The world with its provisioner configured by `configure` (e.g. to add observers).
pub fn world_with(
    configure: impl FnOnce(Provisioner<Arc<MemoryStore>>) -> Provisioner<Arc<MemoryStore>>,
) -> World {
    let mut latency = LatencyTable::default();
    latency.insert(HUB_A, Duration::from_millis(80));
    latency.insert(HUB_B, Duration::from_millis(12));
    latency.insert(HUB_C, Duration::from_millis(45));
    let allocator = Allocator::new(linked_hubs()).with_latency(latency).with_custom(Arc::new(SiteAllocator));
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        Arc::new(MemoryStore::new()),
        Arc::new(RingCrypto::new()),
        allocator,
    );
    Simulator::new(configure(provisioner), SimHubs::new())
}

pub fn crypto() -> RingCrypto {
    RingCrypto::new()
}

pub fn initial_twin() -> InitialTwin {
    InitialTwin {
        tags: Some(json!({ "plan": "pilot", "floor": 3 })),
        properties: Some(InitialTwinProperties { desired: Some(json!({ "telemetryInterval": 30 })) }),
    }
}

/// Options common to individual enrollments and groups.
#[derive(Clone, Default)]
pub struct EnrollOptions {
    pub policy: Option<AllocationPolicy>,
    pub hubs: Option<Vec<String>>,
    pub reprovision: Option<ReprovisionPolicy>,
    pub disabled: bool,
    pub device_id: Option<String>,
    pub iot_edge: bool,
}

pub fn individual(id: &str, attestation: AttestationMechanism, o: &EnrollOptions) -> IndividualEnrollment {
    let mut e = IndividualEnrollment::new(RegistrationId::new(id).unwrap(), attestation);
    e.device_id = o.device_id.as_deref().map(|d| DeviceId::new(d).unwrap());
    e.capabilities = Some(zerotouch_proto::service::DeviceCapabilities { iot_edge: o.iot_edge });
    e.initial_twin = Some(initial_twin());
    e.provisioning_status = Some(status(o));
    e.reprovision_policy = o.reprovision;
    e.allocation_policy = o.policy;
    e.iot_hubs = o.hubs.clone();
    e
}

pub fn group(id: &str, attestation: AttestationMechanism, o: &EnrollOptions) -> EnrollmentGroup {
    let mut g = EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), attestation);
    g.capabilities = Some(zerotouch_proto::service::DeviceCapabilities { iot_edge: o.iot_edge });
    g.initial_twin = Some(initial_twin());
    g.provisioning_status = Some(status(o));
    g.reprovision_policy = o.reprovision;
    g.allocation_policy = o.policy;
    g.iot_hubs = o.hubs.clone();
    g
}

fn status(o: &EnrollOptions) -> ProvisioningStatus {
    if o.disabled {
        ProvisioningStatus::Disabled
    } else {
        ProvisioningStatus::Enabled
    }
}

pub fn symmetric_attestation() -> AttestationMechanism {
    AttestationMechanism::symmetric_key()
}

/// Enrolls `id` individually with generated keys; returns the primary key bytes.
pub fn enroll_symmetric<
    S: zerotouch_engine::store::ProvisioningStore,
    H: zerotouch_engine::hub::HubRegistry,
>(
    w: &Simulator<S, H>,
    id: &str,
    o: &EnrollOptions,
) -> Vec<u8> {
    let e = enrollments::put_enrollment(
        w.provisioner.store(),
        &crypto(),
        w.now,
        individual(id, symmetric_attestation(), o),
        &IfMatch::Absent,
    )
    .unwrap();
    let key = e.attestation.symmetric_key.unwrap().primary_key.unwrap();
    STANDARD.decode(key).unwrap()
}

/// Creates a symmetric-key group with generated keys; returns the primary group key bytes.
pub fn enroll_symmetric_group(w: &World, id: &str, o: &EnrollOptions) -> Vec<u8> {
    let g = enrollments::put_enrollment_group(
        w.provisioner.store(),
        &crypto(),
        w.now,
        group(id, symmetric_attestation(), o),
        &IfMatch::Absent,
    )
    .unwrap();
    STANDARD.decode(g.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap()
}

pub fn symmetric_device(id: &str, key: &[u8], payload: Option<Value>) -> RegistrationConfig {
    let mut c = RegistrationConfig::new(
        IdScope::new(SCOPE).unwrap(),
        RegistrationId::new(id).unwrap(),
        DeviceCredential::SymmetricKey(key.to_vec()),
    );
    c.payload = payload;
    c
}

pub fn group_device(id: &str, group_key: &[u8], payload: Option<Value>) -> RegistrationConfig {
    symmetric_device(id, &symmetric::derive_device_key(&crypto(), group_key, id), payload)
}

pub fn x509_device(id: &str, payload: Option<Value>) -> RegistrationConfig {
    let mut c = RegistrationConfig::new(
        IdScope::new(SCOPE).unwrap(),
        RegistrationId::new(id).unwrap(),
        DeviceCredential::X509,
    );
    c.payload = payload;
    c
}

pub fn assigned(event: RegistrationEvent) -> Assignment {
    match event {
        RegistrationEvent::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

pub fn failed(event: RegistrationEvent) -> RegistrationFailure {
    match event {
        RegistrationEvent::Failed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

pub fn x509_individual_attestation(device_pem: &str) -> AttestationMechanism {
    AttestationMechanism::x509_client_certificate(device_pem)
}

pub fn x509_group_attestation(ca_pem: &str) -> AttestationMechanism {
    AttestationMechanism::x509_signing_certificate(ca_pem)
}

pub fn enroll_x509(w: &World, id: &str, device_pem: &str, o: &EnrollOptions) {
    enrollments::put_enrollment(
        w.provisioner.store(),
        &crypto(),
        w.now,
        individual(id, x509_individual_attestation(device_pem), o),
        &IfMatch::Absent,
    )
    .unwrap();
}

pub fn enroll_x509_group(w: &World, id: &str, ca_pem: &str, o: &EnrollOptions) {
    enrollments::put_enrollment_group(
        w.provisioner.store(),
        &crypto(),
        w.now,
        group(id, x509_group_attestation(ca_pem), o),
        &IfMatch::Absent,
    )
    .unwrap();
}
