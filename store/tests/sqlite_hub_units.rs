//! Lifecycle events of hub writes made inside a SQLite unit: the embedded hub writes its
//! identities in the registration's unit, a unit that does not commit takes them and their
//! events with it, and a hub on another database (outside the unit) keeps both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{decode_key, derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubRegistry, LinkedHub, ProvisionedDevice, TwinSetup};
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::registry::events::LifecycleOperation;
use zerotouch_engine::registry::{IdentityStore, LifecycleEvent};
use zerotouch_engine::store::RegistrationStore;
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::device::{DeviceRegistration, RegistrationStatus};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, IfMatch, RegistrationId, Timestamp};
use zerotouch_store::sqlite::SqliteStore;
use zerotouch_testkit::hubs::RefuseAfterWrite;

const SCOPE: &str = "0ne00FAB001";
const HUB: &str = "plant.example.net";

type SqliteHub = EmbeddedHub<SqliteStore, SqliteStore, SqliteStore>;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// The embedded hub `HUB` over the hub tables of `store`'s database.
fn hub_on(store: &SqliteStore) -> SqliteHub {
    let mut hub = SqliteHub::over(HUB, store.hub(HUB).unwrap(), Arc::new(RingCrypto::new())).unwrap();
    hub.set_now(now());
    hub
}

fn open(dir: &Path, file: &str) -> SqliteStore {
    SqliteStore::open(dir.join(file)).unwrap()
}

/// A provisioner over `store` with one symmetric-key group, and register requests for it.
struct Plant {
    provisioner: Provisioner<SqliteStore>,
    group_key: Vec<u8>,
}

impl Plant {
    fn new(store: &SqliteStore) -> Self {
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
            store.clone(),
            Arc::new(RingCrypto::new()),
            Allocator::new(vec![LinkedHub::new(HUB)]),
        );
        let group = EnrollmentGroup::new(
            EnrollmentGroupId::new("presses").unwrap(),
            AttestationMechanism::symmetric_key(),
        );
        let group = enrollments::put_enrollment_group(
            provisioner.store(),
            &RingCrypto::new(),
            now(),
            group,
            &IfMatch::Absent,
        )
        .unwrap();
        let group_key = decode_key(&group.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap();
        Self { provisioner, group_key }
    }

    fn register(&self, id: &str, hub: &mut dyn HubRegistry) -> u16 {
        let crypto = RingCrypto::new();
        let device_key = derive_device_key(&crypto, &self.group_key, id);
        let token = registration_token(&crypto, &device_key, SCOPE, id, now().unix_secs() + 600);
        let request = RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: id.into(),
            body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
            credential: Credential::Sas(token.to_string()),
            api_version: None,
        };
        self.provisioner.handle_register(now(), request, hub).status
    }

    fn status(&self, id: &str) -> Option<RegistrationStatus> {
        let record = self.provisioner.store().registration(&RegistrationId::new(id).unwrap()).unwrap();
        record.and_then(|r| r.state.status)
    }
}

fn ops(events: &[LifecycleEvent]) -> Vec<(LifecycleOperation, &str)> {
    events.iter().map(|e| (e.op_type, e.device_id.as_str())).collect()
}

fn device(hub: &SqliteHub, id: &str) -> Option<zerotouch_proto::hub::Device> {
    hub.core().registry().store().device(&DeviceId::new(id).unwrap()).unwrap()
}

#[test]
fn a_registration_retried_after_its_sqlite_unit_rolled_back_announces_its_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "zerotouch.sqlite");
    let plant = Plant::new(&store);
    let mut hub = hub_on(&store);

    let status =
        plant.register("press-12", &mut RefuseAfterWrite { hub: &mut hub, refusals: 1, code: 412_002 });

    assert_eq!(status, 202);
    assert_eq!(plant.status("press-12"), Some(RegistrationStatus::Assigned));
    let kept = device(&hub, "press-12").unwrap();
    let events = hub.take_lifecycle_events();
    assert_eq!(ops(&events), [(LifecycleOperation::CreateDeviceIdentity, "press-12")]);
    let kept_etag = serde_json::to_value(&kept.etag).unwrap();
    assert_eq!(events[0].body["deviceEtag"], kept_etag, "the event is about the identity that stayed");
}

#[test]
fn a_registration_whose_sqlite_unit_fails_leaves_no_device_and_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "zerotouch.sqlite");
    let plant = Plant::new(&store);
    let mut hub = hub_on(&store);

    // The hub fails after writing: the registration is recorded as failed, the unit with the
    // identity is rolled back.
    let status =
        plant.register("press-13", &mut RefuseAfterWrite { hub: &mut hub, refusals: 1, code: 500_001 });
    assert_eq!(status, 202);
    assert_eq!(
        plant.status("press-13"),
        Some(RegistrationStatus::Failed),
        "the record says failed; the unit with the identity was rolled back"
    );
    assert!(device(&hub, "press-13").is_none());
    assert!(hub.take_lifecycle_events().is_empty());

    // The device tries again: announced once.
    assert_eq!(plant.register("press-13", &mut hub), 202);
    assert_eq!(plant.status("press-13"), Some(RegistrationStatus::Assigned));
    assert_eq!(ops(&hub.take_lifecycle_events()), [(LifecycleOperation::CreateDeviceIdentity, "press-13")]);
}

/// Applies `action` in a unit of `store`, which fails after it when `fail`, as an embedder
/// would; returns whether the unit committed.
fn in_unit(store: &SqliteStore, hub: &mut SqliteHub, action: &HubAction, fail: bool) -> bool {
    hub.begin_unit();
    let result = store.atomically(&mut || {
        hub.apply(action).map_err(|e| Error::BadRequest(e.message))?;
        if fail {
            return Err(Error::Store(StoreError::Backend("the batch failed to commit".into())));
        }
        Ok(())
    });
    hub.end_unit(result.is_ok());
    result.is_ok()
}

#[test]
fn a_removal_rolled_back_with_its_sqlite_unit_announces_no_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "zerotouch.sqlite");
    let mut hub = hub_on(&store);
    let provision = |id: &str| HubAction::Provision {
        hub: HUB.into(),
        device: ProvisionedDevice {
            device_id: DeviceId::new(id).unwrap(),
            auth: DeviceAuth::CertificateAuthority,
            iot_edge: false,
        },
        twin: TwinSetup::KeepOrInitial(Default::default()),
    };
    let remove = |id: &str| HubAction::Remove { hub: HUB.into(), device_id: DeviceId::new(id).unwrap() };
    hub.apply(&provision("drill-1")).unwrap();
    drop(hub.take_lifecycle_events());

    assert!(!in_unit(&store, &mut hub, &remove("drill-1"), true));
    assert!(device(&hub, "drill-1").is_some(), "the rollback brought the identity back");
    assert!(hub.take_lifecycle_events().is_empty());

    assert!(in_unit(&store, &mut hub, &remove("drill-1"), false));
    assert_eq!(ops(&hub.take_lifecycle_events()), [(LifecycleOperation::DeleteDeviceIdentity, "drill-1")]);
}

#[test]
fn a_hub_on_another_database_keeps_what_it_wrote_in_a_failed_unit_and_announces_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "provisioning.sqlite");
    let hub_store = open(dir.path(), "hub.sqlite");
    let plant = Plant::new(&store);
    let mut hub = hub_on(&hub_store);

    // The provisioning unit fails, but the hub's database was never part of it.
    let status =
        plant.register("press-14", &mut RefuseAfterWrite { hub: &mut hub, refusals: 1, code: 500_001 });
    assert_eq!(status, 202);
    assert!(device(&hub, "press-14").is_some());
    assert_eq!(ops(&hub.take_lifecycle_events()), [(LifecycleOperation::CreateDeviceIdentity, "press-14")]);
}

#[test]
fn a_twin_reset_rolled_back_with_its_sqlite_unit_pushes_nothing_and_a_committed_one_pushes_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), "zerotouch.sqlite");
    let mut hub = hub_on(&store);
    let provision =
        |mode: &str, reset: bool| zerotouch_testkit::hubs::provision_desiring(HUB, "drill-2", mode, reset);
    hub.apply(&provision("a", false)).unwrap();
    drop(hub.take_lifecycle_events());
    assert!(hub.take_twin_events().is_empty());

    assert!(!in_unit(&store, &mut hub, &provision("b", true), true));
    let twin = hub.device_twin(&DeviceId::new("drill-2").unwrap()).unwrap();
    assert_eq!(twin["properties"]["desired"]["mode"], "a", "the rollback undid the reset");
    assert!(hub.take_twin_events().is_empty(), "no push of a reset that did not happen");

    assert!(in_unit(&store, &mut hub, &provision("c", true), false));
    let pushed: Vec<serde_json::Value> = hub
        .take_twin_events()
        .into_iter()
        .filter_map(|e| match e {
            zerotouch_engine::twin::TwinEvent::DesiredPropertiesChanged(d) => {
                Some(serde_json::Value::Object(d.patch.patch))
            }
            _ => None,
        })
        .collect();
    assert_eq!(pushed, [serde_json::json!({ "mode": "c" })]);
}
