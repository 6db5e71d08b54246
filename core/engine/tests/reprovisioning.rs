//! Re-registration under each reprovision policy (spec §8.3): reprovision and migrate data,
//! reprovision and reset to initial config, never reprovision — moving hubs and staying.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_engine::store::{EnrollmentStore, RegistrationStore};
use zerotouch_proto::device::{RegistrationStatus, Substatus};
use zerotouch_proto::service::{AllocationPolicy, ReprovisionPolicy};
use zerotouch_proto::{DeviceId, IdScope, IfMatch, RegistrationId, Timestamp};

const ID: &str = "fridge-17";

fn custom(update: bool, migrate: bool) -> EnrollOptions {
    EnrollOptions {
        policy: Some(AllocationPolicy::Custom),
        reprovision: Some(ReprovisionPolicy { update_hub_assignment: update, migrate_device_data: migrate }),
        ..Default::default()
    }
}

fn site(s: &str) -> Option<serde_json::Value> {
    Some(json!({ "site": s }))
}

#[test]
fn reprovision_and_migrate_moves_the_twin_to_the_new_hub() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    let first = assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    assert_eq!((first.assigned_hub.as_str(), first.substatus), (HUB_A, Some(Substatus::InitialAssignment)));
    w.hubs.device_mut(HUB_A, ID).unwrap().reported.insert("firmware".into(), json!("1.2.3"));

    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
    assert!(w.hubs.device(HUB_A, ID).is_none(), "removed from the old hub");
    let twin = w.hubs.device(HUB_B, ID).unwrap();
    assert_eq!(twin.reported.get("firmware"), Some(&json!("1.2.3")), "reported properties migrated");
    assert_eq!(twin.tags.get("site"), Some(&json!("a")), "tags migrated, not replaced");

    let back = assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    assert_eq!(
        (back.assigned_hub.as_str(), back.substatus),
        (HUB_A, Some(Substatus::ReprovisionedToInitialAssignment))
    );
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_A.to_owned()]);
}

/// Serves the same store with `hub` taken out of the linked hubs.
fn unlink(w: &mut World, hub: &str) {
    let remaining: Vec<LinkedHub> = linked_hubs().into_iter().filter(|h| h.name.as_str() != hub).collect();
    w.provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        Arc::clone(w.provisioner.store()),
        Arc::new(RingCrypto::new()),
        Allocator::new(remaining),
    );
}

#[test]
fn a_device_whose_hub_was_taken_out_of_the_linked_hubs_is_provisioned_afresh_on_a_linked_one() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &EnrollOptions::default());
    let first = assigned(w.register(symmetric_device(ID, &key, None), None));
    let old = first.assigned_hub.clone();
    w.hubs.device_mut(&old, ID).unwrap().reported.insert("firmware".into(), json!("1.2.3"));

    // The operator unlinks that hub; the service can no longer read or write it.
    unlink(&mut w, &old);
    let actions_before = w.hubs.log.len();
    let again = assigned(w.register(symmetric_device(ID, &key, None), None));
    assert_ne!(again.assigned_hub, old);
    assert_eq!(again.substatus, Some(Substatus::DeviceDataReset), "nothing could be migrated");
    let twin = w.hubs.device(&again.assigned_hub, ID).unwrap();
    assert!(twin.reported.is_empty(), "a fresh twin");
    assert_eq!(twin.tags.get("plan"), Some(&json!("pilot")), "the enrollment's initial twin");
    let touched_old = w.hubs.log[actions_before..].iter().any(|a| format!("{a:?}").contains(&old));
    assert!(!touched_old, "no action on the unlinked hub: {:?}", &w.hubs.log[actions_before..]);
}

#[test]
fn a_never_reprovisioned_device_whose_hub_was_unlinked_fails_as_for_an_unlinked_hub() {
    let mut w = world();
    let never = EnrollOptions {
        reprovision: Some(ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: false }),
        ..Default::default()
    };
    let key = enroll_symmetric(&w, ID, &never);
    let first = assigned(w.register(symmetric_device(ID, &key, None), None));
    unlink(&mut w, &first.assigned_hub);
    let f = failed(w.register(symmetric_device(ID, &key, None), None));
    assert_eq!(f.error_code, Some(400_209), "{f:?}");
}

#[test]
fn reprovision_and_reset_gives_the_new_hub_the_initial_twin() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, false));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    w.hubs.device_mut(HUB_A, ID).unwrap().reported.insert("firmware".into(), json!("1.2.3"));

    let moved = assigned(w.register(symmetric_device(ID, &key, site("c")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_C, Some(Substatus::DeviceDataReset)));
    let twin = w.hubs.device(HUB_C, ID).unwrap();
    assert!(twin.reported.is_empty(), "no data carried over");
    assert_eq!(twin.tags.get("plan"), Some(&json!("pilot")), "the enrollment's initial twin");
    assert_eq!(twin.tags.get("site"), None, "nothing of the old twin");
    assert!(w.hubs.device(HUB_A, ID).is_none(), "old identity removed");
}

#[test]
fn reset_policy_on_the_same_hub_resets_the_twin() {
    let mut w = world();
    let key = enroll_symmetric(
        &w,
        ID,
        &EnrollOptions {
            policy: Some(AllocationPolicy::Static),
            hubs: Some(vec![HUB_B.into()]),
            reprovision: Some(ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: false }),
            ..Default::default()
        },
    );
    assigned(w.register(symmetric_device(ID, &key, None), None));
    let d = w.hubs.device_mut(HUB_B, ID).unwrap();
    d.reported.insert("errors".into(), json!(12));
    d.desired.insert("telemetryInterval".into(), json!(5));

    let again = assigned(w.register(symmetric_device(ID, &key, None), None));
    assert_eq!((again.assigned_hub.as_str(), again.substatus), (HUB_B, Some(Substatus::DeviceDataReset)));
    let d = w.hubs.device(HUB_B, ID).unwrap();
    assert!(d.reported.is_empty());
    assert_eq!(
        d.desired.get("telemetryInterval"),
        Some(&json!(30)),
        "back to the enrollment's desired value"
    );
}

#[test]
fn migrate_policy_on_the_same_hub_keeps_twin_and_substatus() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    w.hubs.device_mut(HUB_A, ID).unwrap().reported.insert("uptime".into(), json!(99));
    let again = assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    assert_eq!((again.assigned_hub.as_str(), again.substatus), (HUB_A, Some(Substatus::InitialAssignment)));
    assert_eq!(w.hubs.device(HUB_A, ID).unwrap().reported.get("uptime"), Some(&json!(99)));
}

#[test]
fn a_webhook_twin_on_re_registration_replaces_migration() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    w.hubs.device_mut(HUB_A, ID).unwrap().reported.insert("firmware".into(), json!("1.2.3"));
    let moved =
        assigned(w.register(symmetric_device(ID, &key, Some(json!({ "site": "b", "retwin": true }))), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataReset)));
    let twin = w.hubs.device(HUB_B, ID).unwrap();
    assert!(twin.reported.is_empty());
    assert_eq!(twin.tags.get("site"), Some(&json!("b")));
}

#[test]
fn never_reprovision_keeps_the_device_on_its_hub() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(false, false));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let again = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((again.assigned_hub.as_str(), again.substatus), (HUB_A, Some(Substatus::InitialAssignment)));
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_A.to_owned()]);
}

/// A device speaking `api_version`, with the registration's custom payload naming `site`.
fn device_on(api_version: &str, key: &[u8], s: &str) -> zerotouch_engine::registration::RegistrationConfig {
    let mut config = symmetric_device(ID, key, site(s));
    config.api_version = api_version.to_owned();
    config
}

#[test]
fn a_device_older_than_reprovision_policies_stays_on_its_hub_when_the_enrollment_sets_none() {
    let mut w = world();
    let options = EnrollOptions { policy: Some(AllocationPolicy::Custom), ..Default::default() };
    let key = enroll_symmetric(&w, ID, &options);
    assigned(w.register(device_on("2018-04-01", &key, "a"), None));
    let again = assigned(w.register(device_on("2018-04-01", &key, "b"), None));
    assert_eq!((again.assigned_hub.as_str(), again.substatus), (HUB_A, Some(Substatus::InitialAssignment)));
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_A.to_owned()]);

    // The same device on a current api-version gets the default: re-provision and migrate.
    let moved = assigned(w.register(device_on("2019-03-31", &key, "b"), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
}

#[test]
fn a_device_older_than_reprovision_policies_whose_hub_was_unlinked_is_provisioned_afresh() {
    // The legacy rule keeps a device on its hub; a hub that is gone cannot keep it, and with no
    // policy of the enrollment's own to say otherwise it gets the default (spec §8.3).
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &EnrollOptions::default());
    let first = assigned(w.register(device_on("2018-04-01", &key, "a"), None));
    unlink(&mut w, &first.assigned_hub);
    let again = assigned(w.register(device_on("2018-04-01", &key, "a"), None));
    assert_ne!(again.assigned_hub, first.assigned_hub);
    assert_eq!(again.substatus, Some(Substatus::DeviceDataReset));
}

#[test]
fn a_reprovision_policy_the_enrollment_sets_applies_to_devices_older_than_policies_too() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(device_on("2018-04-01", &key, "a"), None));
    let moved = assigned(w.register(device_on("2018-04-01", &key, "b"), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
}

#[test]
fn deleting_the_registration_record_makes_the_next_registration_initial() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    zerotouch_engine::enrollments::delete_registration_state(
        w.provisioner.store(),
        &RegistrationId::new(ID).unwrap(),
        &zerotouch_proto::IfMatch::Any,
    )
    .unwrap();
    let again = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(again.substatus, Some(Substatus::InitialAssignment));
}

/// A hub that checks, while a migration runs, that the registration shows `assigning`.
struct WatchingHub {
    inner: zerotouch_testkit::hubs::SimHubs,
    store: Arc<MemoryStore>,
    seen: Arc<Mutex<Vec<Option<RegistrationStatus>>>>,
}

impl HubRegistry for WatchingHub {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        if matches!(action, HubAction::Migrate { .. }) {
            let record = self.store.registration(&RegistrationId::new(ID).unwrap()).unwrap();
            self.seen.lock().unwrap().push(record.and_then(|r| r.state.status));
        }
        self.inner.apply(action)
    }

    fn begin_unit(&mut self) {
        self.inner.begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.inner.end_unit(committed);
    }
}

#[test]
fn a_device_being_moved_is_assigning_until_its_data_arrives() {
    let w = world();
    let store = w.provisioner.store().clone();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut w = zerotouch_testkit::sim::Simulator::new(
        w.provisioner,
        WatchingHub { inner: w.hubs, store: store.clone(), seen: seen.clone() },
    );
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(*seen.lock().unwrap(), vec![Some(RegistrationStatus::Assigning)]);
    let record = store.registration(&RegistrationId::new(ID).unwrap()).unwrap().unwrap();
    assert_eq!(record.state.status, Some(RegistrationStatus::Assigned));
}

#[test]
fn a_hub_failure_fails_the_registration_with_the_hub_error() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &EnrollOptions::default());
    w.hubs.fail_with = Some(HubError { code: 401002, message: "IotHubUnauthorizedAccess".into() });
    let f = failed(w.register(symmetric_device(ID, &key, None), None));
    assert_eq!(f.error_code, Some(401002));
    assert!(f.message.contains("IotHubUnauthorizedAccess"));
}

fn record_of(w: &World) -> zerotouch_engine::store::RegistrationRecord {
    w.provisioner.store().registration(&RegistrationId::new(ID).unwrap()).unwrap().expect("a record")
}

#[test]
fn a_move_the_new_hub_refuses_leaves_the_record_failed_on_the_old_hub_and_a_later_move_succeeds() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let assigned_record = record_of(&w);
    w.hubs.fail_with = Some(HubError { code: 401002, message: "IotHubUnauthorizedAccess".into() });
    let f = failed(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(f.error_code, Some(401002));

    // Not left `assigning` for ever: the record says the registration failed, and why, and still
    // names the hub and device id the identity has (the move's hub actions were not applied).
    let record = record_of(&w);
    assert_eq!(record.state.status, Some(RegistrationStatus::Failed));
    assert_eq!(record.state.error_code, Some(401002));
    assert!(record.state.error_message.as_deref().unwrap().contains("IotHubUnauthorizedAccess"));
    assert_eq!(record.state.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(record.state.device_id.as_deref(), Some(ID));
    // The record keeps the last assignment's substatus for the next registration; a device
    // hears a substatus only with an assignment.
    assert_eq!(record.state.substatus, Some(Substatus::InitialAssignment));
    assert!(record.state.payload.is_some(), "the custom allocator's payload of the assignment");
    let shown = record.result(None);
    assert_eq!((shown.substatus, shown.payload), (None, None));
    let shown = record.clone().into_state();
    assert_eq!((shown.substatus, shown.payload), (None, None));
    assert_eq!(record.state.created_date_time_utc, assigned_record.state.created_date_time_utc);
    assert_ne!(record.state.etag, assigned_record.state.etag);
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_A.to_owned()]);

    // Once the hub accepts again, the device moves from where its identity is, with its data.
    w.hubs.fail_with = None;
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_B.to_owned()]);
    let record = record_of(&w);
    assert_eq!((record.state.status, record.state.error_code), (Some(RegistrationStatus::Assigned), None));
}

#[test]
fn a_move_whose_hub_keeps_conflicting_is_not_left_assigning_and_a_later_move_succeeds() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let assigned_record = record_of(&w);
    // Every hub action conflicts (a PostgreSQL deadlock each time): after its rounds, each
    // register is answered 429, which the device retries until its registration times out.
    w.hubs.fail_with = Some(HubError { code: 412_000, message: "conflict with a concurrent update".into() });
    failed(w.register(symmetric_device(ID, &key, site("b")), None));

    // The move's `assigning` record does not outlive the registration: the record says the
    // registration failed, and why, and still names the identity's hub and device id.
    let record = record_of(&w);
    assert_eq!(record.state.status, Some(RegistrationStatus::Failed), "{record:?}");
    assert_eq!(record.state.error_code, Some(429_001));
    assert_eq!(record.state.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(record.state.device_id.as_deref(), Some(ID));
    assert_eq!(record.state.created_date_time_utc, assigned_record.state.created_date_time_utc);
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_A.to_owned()]);

    // Once the hub accepts again, the device moves from where its identity is, with its data.
    w.hubs.fail_with = None;
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_B.to_owned()]);
}

#[test]
fn a_first_registration_that_fails_leaves_a_failed_record_with_the_error() {
    let mut w = world();
    // Static allocation with two hubs: no hub to assign (400208).
    let o = EnrollOptions {
        policy: Some(AllocationPolicy::Static),
        hubs: Some(vec![HUB_A.to_owned(), HUB_B.to_owned()]),
        ..Default::default()
    };
    let key = enroll_symmetric(&w, ID, &o);
    let f = failed(w.register(symmetric_device(ID, &key, None), None));
    assert_eq!(f.error_code, Some(400208));
    let record = record_of(&w);
    assert_eq!(record.state.status, Some(RegistrationStatus::Failed));
    assert_eq!(record.state.error_code, Some(400208));
    assert_eq!(record.state.error_message.as_deref(), Some(f.message.as_str()));
    assert!(record.state.created_date_time_utc.is_some() && record.state.etag.is_some());
    assert_eq!((record.state.assigned_hub, record.state.device_id), (None, None));

    // A failed first registration is not an assignment: the next one is initial.
    let o = EnrollOptions { policy: Some(AllocationPolicy::Static), hubs: Some(vec![HUB_B.to_owned()]), ..o };
    let e = zerotouch_engine::enrollments::put_enrollment(
        w.provisioner.store(),
        &crypto(),
        w.now,
        individual(ID, symmetric_attestation(), &o),
        &zerotouch_proto::IfMatch::Any,
    )
    .unwrap();
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        e.attestation.symmetric_key.unwrap().primary_key.unwrap(),
    )
    .unwrap();
    let a = assigned(w.register(symmetric_device(ID, &key, None), None));
    assert_eq!((a.assigned_hub.as_str(), a.substatus), (HUB_B, Some(Substatus::InitialAssignment)));
}

/// Something that happens to the device while a registration's hub actions run.
type Interference<'a> = Box<dyn FnOnce(&mut zerotouch_testkit::hubs::SimHubs) + 'a>;

/// A hub whose first action first lets an interference happen (another registration of the
/// device, an operator deleting its record), then refuses the action (`then_fail`) or goes on.
struct InterferingHub<'a> {
    inner: zerotouch_testkit::hubs::SimHubs,
    interference: Option<Interference<'a>>,
    then_fail: bool,
}

impl HubRegistry for InterferingHub<'_> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        if let Some(interfere) = self.interference.take() {
            interfere(&mut self.inner);
            if self.then_fail {
                return Err(HubError { code: 401_002, message: "IotHubUnauthorizedAccess".into() });
            }
        }
        self.inner.apply(action)
    }
}

#[test]
fn a_failed_registration_does_not_overwrite_the_record_of_a_newer_one_that_succeeded() {
    use zerotouch_engine::attestation::symmetric::registration_token;
    use zerotouch_engine::attestation::Credential;
    use zerotouch_engine::provisioner::RegisterRequest;
    use zerotouch_proto::device::{raw_payload, DeviceRegistration};

    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let now = w.now;
    let request = |s: &str| {
        let token = registration_token(&crypto(), &key, SCOPE, ID, now.unix_secs() + 3600);
        RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: ID.into(),
            body: DeviceRegistration {
                payload: site(s).as_ref().map(raw_payload),
                registration_id: ID.into(),
                tpm: None,
                csr: None,
            },
            credential: Credential::Sas(token.to_string()),
            api_version: None,
        }
    };
    // The device moves to b; while the move's hub actions run, it registers again (another
    // connection, another instance) and stays on a; then the move fails.
    let (provisioner, overtaking) = (&w.provisioner, request("a"));
    let mut hub = InterferingHub {
        inner: std::mem::take(&mut w.hubs),
        interference: Some(Box::new(move |hubs| {
            let reply = provisioner.handle_register(now, overtaking, hubs);
            assert_eq!(reply.status, 202, "{reply:?}");
        })),
        then_fail: true,
    };
    let reply = w.provisioner.handle_register(now, request("b"), &mut hub);
    assert_eq!(reply.status, 202, "{reply:?}");
    let record = record_of(&w);
    assert_eq!(record.state.status, Some(RegistrationStatus::Assigned), "{record:?}");
    assert_eq!(record.state.assigned_hub.as_deref(), Some(HUB_A));
}

#[test]
fn a_failed_registration_keeps_the_substatus_of_the_assignment_the_device_still_has() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(moved.substatus, Some(Substatus::DeviceDataMigrated));
    w.hubs.fail_with = Some(HubError { code: 500_001, message: "hub down".into() });
    failed(w.register(symmetric_device(ID, &key, site("b")), None));
    w.hubs.fail_with = None;
    // It stays where it is, with its data: still the substatus of its move, not a first one.
    let stayed = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(
        (stayed.assigned_hub.as_str(), stayed.substatus),
        (HUB_B, Some(Substatus::DeviceDataMigrated))
    );
}

#[test]
fn a_record_deleted_while_its_device_registers_ends_in_an_answer_not_a_404() {
    let mut w = world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let store = w.provisioner.store().clone();
    let delete = || -> Interference<'_> {
        Box::new(|_| {
            let id = RegistrationId::new(ID).unwrap();
            zerotouch_engine::enrollments::delete_registration_state(
                &*store,
                &id,
                &zerotouch_proto::IfMatch::Any,
            )
            .unwrap();
        })
    };
    // Deleted, then the hub refuses: the device hears its registration failed.
    let hubs = std::mem::take(&mut w.hubs);
    let mut w = zerotouch_testkit::sim::Simulator::new(
        w.provisioner,
        InterferingHub { inner: hubs, interference: Some(delete()), then_fail: true },
    );
    let f = failed(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(f.error_code, Some(401_002));
    // Deleted, then the hub writes: the registration is decided again, as a first one.
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    w.hubs.interference = Some(delete());
    w.hubs.then_fail = false;
    let a = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((a.assigned_hub.as_str(), a.substatus), (HUB_B, Some(Substatus::InitialAssignment)));
}

/// The world's provisioner over embedded hubs (the hubs `serve` runs), one per linked hub.
fn embedded_world() -> zerotouch_testkit::sim::Simulator<Arc<MemoryStore>, EmbeddedHubs> {
    let mut hubs = EmbeddedHubs::new();
    for hub in [HUB_A, HUB_B, HUB_C] {
        hubs.insert(EmbeddedHub::in_memory(hub, Arc::new(RingCrypto::new())).unwrap());
    }
    zerotouch_testkit::sim::Simulator::new(world().provisioner, hubs)
}

/// What an operator does in the hub: deletes the device's identity (and its twin).
fn delete_identity(hubs: &EmbeddedHubs, hub: &str, device: &str) {
    let hub = hubs.hub(hub).unwrap();
    hub.delete_device(&DeviceId::new(device).unwrap(), &IfMatch::Any, Timestamp::EPOCH).unwrap();
}

#[test]
fn a_device_whose_identity_the_operator_deleted_is_reprovisioned_with_reset_elsewhere() {
    let mut w = embedded_world();
    let key = enroll_symmetric(&w, ID, &custom(true, false));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    delete_identity(&w.hubs, HUB_A, ID);

    // The old identity is already gone: nothing to remove, and the device lands on hub b.
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataReset)));
    let twin = w.hubs.hub(HUB_B).unwrap().device_twin(&DeviceId::new(ID).unwrap()).unwrap();
    assert_eq!(twin["tags"], serde_json::to_value(initial_twin().tags).unwrap());
}

#[test]
fn a_device_whose_identity_the_operator_deleted_is_reset_on_its_hub_under_a_new_device_id() {
    let mut w = embedded_world();
    let key = enroll_symmetric(&w, ID, &custom(true, false));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    delete_identity(&w.hubs, HUB_A, ID);
    // The enrollment now names another device id: the reset removes the old identity.
    let mut e = w.provisioner.store().enrollment(&RegistrationId::new(ID).unwrap()).unwrap().unwrap();
    e.device_id = Some(DeviceId::new("fridge-17-b").unwrap());
    w.provisioner.store().put_enrollment(&e, &zerotouch_engine::store::Precondition::None).unwrap();

    let again = assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    assert_eq!((again.assigned_hub.as_str(), again.device_id.as_str()), (HUB_A, "fridge-17-b"));
    assert_eq!(again.substatus, Some(Substatus::DeviceDataReset));
}

#[test]
fn a_device_whose_identity_the_operator_deleted_migrates_with_the_initial_twin() {
    let mut w = embedded_world();
    let key = enroll_symmetric(&w, ID, &custom(true, true));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    delete_identity(&w.hubs, HUB_A, ID);

    // No data to migrate: the new identity gets the initial configuration, as a new device does.
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!(moved.assigned_hub.as_str(), HUB_B);
    let twin = w.hubs.hub(HUB_B).unwrap().device_twin(&DeviceId::new(ID).unwrap()).unwrap();
    assert_eq!(twin["tags"], serde_json::to_value(initial_twin().tags).unwrap());
    assert_eq!(twin["properties"]["desired"]["telemetryInterval"], 30);
}
