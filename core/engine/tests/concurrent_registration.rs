//! Two instances registering the same device at once: the one whose record write loses the race
//! decides again on what the winner wrote, and the hub still gets the device's credentials.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{
    OperationStatusRequest, Provisioner, ProvisionerConfig, RegisterRequest, ResponseBody,
};
use zerotouch_engine::store::{OperationRecord, Precondition, RegistrationStore};
use zerotouch_proto::device::{DeviceRegistration, RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::{EnrollmentGroupId, IdScope, IfMatch, OperationId, RegistrationId, Timestamp};

const SCOPE: &str = "0ne00C0FFEE";
const HUB: &str = "hub-1.example.net";

/// A hub that, while applying the first registration's actions, lets "another instance" write
/// the device's record first (a newer etag), and remembers every action it was given.
struct RacingHub {
    store: Arc<MemoryStore>,
    raced: bool,
    seen: Vec<HubAction>,
}

impl HubRegistry for RacingHub {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.seen.push(action.clone());
        if !self.raced {
            self.raced = true;
            let id = RegistrationId::new("dev-1").unwrap();
            let mut record = self.store.registration(&id).unwrap().expect("registered before");
            let pre = Precondition::Matches(record.etag_bare().unwrap().to_owned());
            record.state.etag = Some("b3RoZXItaW5zdGFuY2U=".into());
            let op = OperationRecord {
                operation_id: OperationId::new("1.0000000000000000.other").unwrap(),
                registration_id: id.clone(),
                created: Timestamp::from_unix_secs(NOW),
                status: RegistrationOperationStatus {
                    operation_id: "1.0000000000000000.other".into(),
                    status: RegistrationStatus::Assigned,
                    registration_state: None,
                }
                .into(),
            };
            self.store.commit_registration(Arc::new(record), &pre, op).unwrap();
        }
        Ok(())
    }
}

const NOW: i64 = 1_767_225_600;

/// A provisioner over `store` with one linked hub and one symmetric-key group, and the group's
/// primary and secondary keys.
fn provisioner_with_group(
    store: Arc<MemoryStore>,
    group: &str,
) -> (Provisioner<Arc<MemoryStore>>, [Vec<u8>; 2]) {
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        Arc::new(RingCrypto::new()),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let group = enrollments::put_enrollment_group(
        provisioner.store(),
        &RingCrypto::new(),
        Timestamp::from_unix_secs(NOW),
        EnrollmentGroup::new(EnrollmentGroupId::new(group).unwrap(), AttestationMechanism::symmetric_key()),
        &IfMatch::Absent,
    )
    .unwrap();
    let keys = group.attestation.symmetric_key.unwrap();
    let decode = |key: Option<String>| STANDARD.decode(key.unwrap()).unwrap();
    (provisioner, [decode(keys.primary_key), decode(keys.secondary_key)])
}

#[test]
fn a_registration_that_loses_a_race_to_another_instance_is_decided_again_with_the_device_keys() {
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(NOW);
    let store = Arc::new(MemoryStore::new());
    let (provisioner, [group_primary, group_secondary]) =
        provisioner_with_group(Arc::clone(&store), "line-1");
    let primary = derive_device_key(&crypto, &group_primary, "dev-1");
    let secondary = derive_device_key(&crypto, &group_secondary, "dev-1");
    let token = registration_token(&crypto, &primary, SCOPE, "dev-1", now.unix_secs() + 3600).to_string();
    let register = |hub: &mut dyn HubRegistry| {
        provisioner.handle_register(
            now,
            RegisterRequest {
                id_scope: SCOPE.into(),
                registration_id: "dev-1".into(),
                body: DeviceRegistration {
                    payload: None,
                    registration_id: "dev-1".into(),
                    tpm: None,
                    csr: None,
                },
                credential: Credential::Sas(token.clone()),
                api_version: None,
            },
            hub,
        )
    };

    // First registration: no race (the hub only races once a record exists).
    let mut hub = RacingHub { store: Arc::clone(&store), raced: true, seen: Vec::new() };
    assert_eq!(register(&mut hub).status, 202);

    // The device registers again while another instance re-registers it too.
    let mut hub = RacingHub { store: Arc::clone(&store), raced: false, seen: Vec::new() };
    let reply = register(&mut hub);
    assert_eq!(reply.status, 202, "{reply:?}");
    let ResponseBody::Operation(op) = reply.body else { panic!("not an operation: {reply:?}") };

    // Two rounds reached the hub, and both provisioned the device with its derived keys.
    let expected = DeviceAuth::SymmetricKey {
        primary_key: STANDARD.encode(primary),
        secondary_key: STANDARD.encode(secondary),
    };
    assert_eq!(hub.seen.len(), 2, "{:?}", hub.seen);
    for action in &hub.seen {
        let HubAction::Provision { device, .. } = action else { panic!("unexpected action {action:?}") };
        assert_eq!(device.auth, expected);
    }

    // The second round's record is the one kept, and the operation reports it assigned.
    let status = provisioner.handle_operation_status(
        now,
        OperationStatusRequest {
            id_scope: SCOPE.into(),
            registration_id: "dev-1".into(),
            operation_id: op.operation_id.clone().into(),
            credential: Credential::Sas(token.clone()),
        },
    );
    let ResponseBody::Operation(status) = status.body else { panic!("not an operation: {status:?}") };
    assert_eq!(status.status, RegistrationStatus::Assigned);
    let record = store.registration(&RegistrationId::new("dev-1").unwrap()).unwrap().unwrap();
    assert_ne!(record.state.etag.as_deref(), Some("b3RoZXItaW5zdGFuY2U="));
    assert_eq!(record.state.assigned_hub.as_deref(), Some(HUB));
}

/// A hub whose first action hits a conflict in its database (what a PostgreSQL deadlock between
/// two registrations turns into), then accepts.
struct ConflictOnceHub {
    conflicts_left: usize,
    applied: usize,
}

impl HubRegistry for ConflictOnceHub {
    fn apply(&mut self, _: &HubAction) -> Result<(), HubError> {
        if self.conflicts_left > 0 {
            self.conflicts_left -= 1;
            return Err(HubError { code: 412_000, message: "conflict with a concurrent update".into() });
        }
        self.applied += 1;
        Ok(())
    }
}

#[test]
fn a_hub_conflict_during_registration_is_retried_instead_of_failing_the_device() {
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(NOW);
    let (provisioner, [key, _]) = provisioner_with_group(Arc::new(MemoryStore::new()), "line-2");
    let token = registration_token(
        &crypto,
        &derive_device_key(&crypto, &key, "dev-7"),
        SCOPE,
        "dev-7",
        now.unix_secs() + 60,
    )
    .to_string();
    let request = || RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: "dev-7".into(),
        body: DeviceRegistration { payload: None, registration_id: "dev-7".into(), tpm: None, csr: None },
        credential: Credential::Sas(token.clone()),
        api_version: None,
    };
    let poll = |operation_id: String| {
        let reply = provisioner.handle_operation_status(
            now,
            OperationStatusRequest {
                id_scope: SCOPE.into(),
                registration_id: "dev-7".into(),
                operation_id,
                credential: Credential::Sas(token.clone()),
            },
        );
        let ResponseBody::Operation(status) = reply.body else { panic!("not an operation: {reply:?}") };
        status
    };

    let mut hub = ConflictOnceHub { conflicts_left: 2, applied: 0 };
    let reply = provisioner.handle_register(now, request(), &mut hub);
    let ResponseBody::Operation(op) = reply.body else { panic!("not an operation: {reply:?}") };
    let status = poll(op.operation_id.into());
    assert_eq!(status.status, RegistrationStatus::Assigned, "{status:?}");
    assert_eq!(hub.applied, 1);

    // A hub that keeps conflicting is not retried forever: the device is told to try again later.
    let mut hub = ConflictOnceHub { conflicts_left: usize::MAX, applied: 0 };
    let reply = provisioner.handle_register(now, request(), &mut hub);
    assert_eq!((reply.status, reply.error_code()), (429, Some(429_001)), "{reply:?}");
    assert!(reply.retry_after.is_some(), "a retry-after the SDKs wait before retrying");
    assert_eq!(hub.applied, 0);
}

#[test]
fn a_poll_answered_from_memory_matches_the_stored_answer_and_still_checks_the_device() {
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(NOW);
    let (provisioner, [key, _]) = provisioner_with_group(Arc::new(MemoryStore::new()), "line-3");
    let token_for = |id: &str| {
        registration_token(&crypto, &derive_device_key(&crypto, &key, id), SCOPE, id, now.unix_secs() + 60)
            .to_string()
    };
    let request = RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: "dev-9".into(),
        body: DeviceRegistration { payload: None, registration_id: "dev-9".into(), tpm: None, csr: None },
        credential: Credential::Sas(token_for("dev-9")),
        api_version: None,
    };
    let reply =
        provisioner.handle_register(now, request, &mut ConflictOnceHub { conflicts_left: 0, applied: 0 });
    let ResponseBody::Operation(op) = reply.body else { panic!("not an operation: {reply:?}") };
    let poll = |registration_id: &str, credential: Credential| OperationStatusRequest {
        id_scope: SCOPE.into(),
        registration_id: registration_id.into(),
        operation_id: op.operation_id.to_string(),
        credential,
    };

    let from_memory = provisioner
        .operation_status_in_memory(now, &poll("dev-9", Credential::Sas(token_for("dev-9"))))
        .expect("the memory store holds every operation");
    let stored = provisioner.handle_operation_status(now, poll("dev-9", Credential::Sas(token_for("dev-9"))));
    assert_eq!(from_memory, stored);
    assert_eq!(from_memory.status, 200);

    // Another device's valid token does not read this device's operation, nor does a bad one.
    let other = provisioner
        .operation_status_in_memory(now, &poll("dev-10", Credential::Sas(token_for("dev-10"))))
        .unwrap();
    assert_eq!(other.status, 404, "{other:?}");
    let forged = provisioner
        .operation_status_in_memory(now, &poll("dev-9", Credential::Sas(token_for("dev-10"))))
        .unwrap();
    assert_eq!(forged.status, 401, "{forged:?}");
    // An id the store never saw is left to the stored path.
    let unknown =
        OperationStatusRequest { operation_id: "1.0.unknown".into(), ..poll("dev-9", Credential::None) };
    assert_eq!(provisioner.operation_status_in_memory(now, &unknown), None);
}
