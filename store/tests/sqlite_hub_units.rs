//! Lifecycle events of registrations whose SQLite unit is rolled back: the embedded hub writes
//! its identity inside the registration's unit, and a unit that does not commit takes the
//! identity and its "created" event with it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{decode_key, derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::jobs::JobLimits;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::registry::events::LifecycleOperation;
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::RegistrationStore;
use zerotouch_proto::device::{DeviceRegistration, RegistrationStatus};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, IfMatch, RegistrationId, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

const SCOPE: &str = "0ne00FAB001";
const HUB: &str = "plant.example.net";

type SqliteHub = EmbeddedHub<SqliteStore, SqliteStore, SqliteStore>;

/// The embedded hub, refusing the registration's actions as a concurrent change (`412`) after
/// writing them, as many times as `conflicts` says: the provisioner then decides the round again,
/// and the store rolls back the unit that holds the hub's writes.
struct ConflictAfterWrite<'a> {
    hub: &'a mut SqliteHub,
    conflicts: usize,
}

impl HubRegistry for ConflictAfterWrite<'_> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.hub.apply(action)?;
        if self.conflicts > 0 {
            self.conflicts -= 1;
            return Err(HubError { code: 412_002, message: "changed concurrently".into() });
        }
        Ok(())
    }

    fn begin_unit(&mut self) {
        self.hub.begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.hub.end_unit(committed);
    }
}

#[test]
fn a_registration_retried_after_its_sqlite_unit_rolled_back_announces_its_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(1_767_225_600);
    let view = store.hub(HUB).unwrap();
    let mut hub = SqliteHub::new(
        HUB,
        view.clone(),
        view.clone(),
        view,
        Arc::new(RingCrypto::new()),
        JobLimits::default(),
    )
    .unwrap();
    hub.set_now(now);
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store.clone(),
        Arc::new(RingCrypto::new()),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let group = enrollments::put_enrollment_group(
        provisioner.store(),
        &crypto,
        now,
        EnrollmentGroup::new(
            EnrollmentGroupId::new("presses").unwrap(),
            AttestationMechanism::symmetric_key(),
        ),
        &IfMatch::Absent,
    )
    .unwrap();
    let group_key = decode_key(&group.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap();
    let id = "press-12";
    let device_key = derive_device_key(&crypto, &group_key, id);
    let request = RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: id.into(),
        body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
        credential: Credential::Sas(
            registration_token(&crypto, &device_key, SCOPE, id, now.unix_secs() + 600).to_string(),
        ),
    };

    let reply =
        provisioner.handle_register(now, request, &mut ConflictAfterWrite { hub: &mut hub, conflicts: 1 });

    assert_eq!(reply.status, 202);
    let record = store.registration(&RegistrationId::new(id).unwrap()).unwrap().unwrap();
    assert_eq!(record.state.status, Some(RegistrationStatus::Assigned));
    let device = hub.core().registry().store().device(&DeviceId::new(id).unwrap()).unwrap().unwrap();
    let events = hub.take_lifecycle_events();
    assert_eq!(events.len(), 1, "one identity was kept, so one event: {events:?}");
    assert_eq!(events[0].op_type, LifecycleOperation::CreateDeviceIdentity);
    assert_eq!(events[0].device_id.as_str(), id);
    let kept_etag = serde_json::to_value(&device.etag).unwrap();
    assert_eq!(events[0].body["deviceEtag"], kept_etag, "the event is about the identity that stayed");
}
