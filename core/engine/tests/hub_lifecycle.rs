//! Device lifecycle on embedded hubs: plan (enroll), provision through DPS into an embedded hub,
//! configure by desired properties and a broadcast twin job, monitor by query, retire by disable
//! and delete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::registration_token;
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubRegistry, LinkedHub, ProvisionedDevice, TwinSetup};
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs, HUB_NOT_FOUND};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::registry::LifecycleOperation;
use zerotouch_engine::registry::TwinSink;
use zerotouch_engine::store::{EnrollmentStore, PageRequest, RegistrationStore};
use zerotouch_engine::twin::{TwinOperation, TwinStore};
use zerotouch_proto::device::{DeviceRegistration, RegistrationStatus};
use zerotouch_proto::hub::{DeviceStatus, ExportImportDevice};
use zerotouch_proto::jobs::{JobRequest, JobStatus};
use zerotouch_proto::service::{AllocationPolicy, InitialTwin};
use zerotouch_proto::{DeviceId, IdScope, IfMatch, RegistrationId};
use zerotouch_testkit::hubs::RefuseAfterWrite;
use zerotouch_testkit::sim::Simulator;

use common::{assigned, individual, symmetric_attestation, symmetric_device, EnrollOptions, SCOPE};

const PLANT: &str = "plant.example.net";
const SPARE: &str = "spare.example.net";

type Fleet = Simulator<Arc<MemoryStore>, EmbeddedHubs>;

fn fleet() -> Fleet {
    let crypto = Arc::new(RingCrypto::new());
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        Arc::new(MemoryStore::new()),
        crypto.clone(),
        Allocator::new(vec![LinkedHub::new(PLANT), LinkedHub::new(SPARE)]),
    );
    let mut hubs = EmbeddedHubs::new();
    hubs.insert(EmbeddedHub::in_memory(PLANT, crypto.clone()).unwrap());
    hubs.insert(EmbeddedHub::in_memory(SPARE, crypto).unwrap());
    Simulator::new(provisioner, hubs)
}

/// Enrolls `id` for the plant hub and returns its primary key.
fn enroll(w: &Fleet, id: &str) -> Vec<u8> {
    let o = EnrollOptions {
        policy: Some(AllocationPolicy::Static),
        hubs: Some(vec![PLANT.to_owned()]),
        ..Default::default()
    };
    let e = enrollments::put_enrollment(
        w.provisioner.store(),
        &RingCrypto::new(),
        w.now,
        individual(id, symmetric_attestation(), &o),
        &IfMatch::Absent,
    )
    .unwrap();
    STANDARD.decode(e.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap()
}

fn query(hub: &EmbeddedHub, text: &str) -> Vec<Value> {
    let q = parse(text).unwrap();
    execute(&q, hub, &PageRequest { continuation: None, max_items: 100 }).unwrap().items
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn report(hub: &EmbeddedHub, device: &str, reported: Value, w: &Fleet) {
    let Value::Object(patch) = reported else { panic!("reported must be an object") };
    hub.update_twin(&id(device), None, &TwinOperation::Reported(patch), &IfMatch::Any, w.now).unwrap();
}

#[test]
fn fleet_is_planned_provisioned_configured_monitored_and_retired_on_an_embedded_hub() {
    let mut w = fleet();
    let devices = ["press-1", "press-2", "press-3"];

    // Plan: enroll every device for the plant hub.
    let keys: Vec<Vec<u8>> = devices.iter().map(|d| enroll(&w, d)).collect();

    // Provision: each device registers through DPS and lands in the embedded plant hub.
    for (device, key) in devices.iter().zip(&keys) {
        let now = w.now;
        w.hubs.set_now(now);
        let a = assigned(w.register(symmetric_device(device, key, None), None));
        assert_eq!(a.assigned_hub, PLANT);
        assert_eq!(a.device_id, *device);
    }
    let plant = w.hubs.hub(PLANT).unwrap();
    assert_eq!(plant.registry().statistics().unwrap().total_device_count, 3);
    let created = plant.take_lifecycle_events();
    assert_eq!(created.len(), 3);
    assert!(created.iter().all(|e| e.op_type == LifecycleOperation::CreateDeviceIdentity));
    assert_eq!(created[0].device_id.as_str(), "press-1");
    assert_eq!(created[0].body["tags"], json!({ "plan": "pilot", "floor": 3 }));
    assert_eq!(created[0].body["properties"]["desired"]["telemetryInterval"], 30);
    assert!(query(w.hubs.hub(SPARE).unwrap(), "SELECT * FROM devices").is_empty());
    let twin = plant.device_twin(&id("press-1")).unwrap();
    assert_eq!(twin["deviceId"], "press-1");
    assert_eq!(twin["status"], "enabled");
    assert_eq!(twin["connectionState"], "Disconnected");
    assert_eq!(twin["authenticationType"], "sas");
    assert_eq!(twin["tags"], json!({ "plan": "pilot", "floor": 3 }));
    assert_eq!(twin["properties"]["desired"]["telemetryInterval"], 30);
    let identity = plant.registry().device(&id("press-1")).unwrap();
    let sas = identity.authentication.unwrap().symmetric_key;
    assert_eq!(STANDARD.decode(sas.primary_key.unwrap()).unwrap(), keys[0]);

    // Devices report their firmware.
    report(plant, "press-1", json!({ "firmware": "1.0" }), &w);
    report(plant, "press-2", json!({ "firmware": "1.0" }), &w);
    report(plant, "press-3", json!({ "firmware": "0.9" }), &w);

    // Configure: a broadcast job lowers the telemetry interval of the 1.0 devices.
    let request: JobRequest = serde_json::from_value(json!({
        "jobId": "tune-1",
        "type": "scheduleUpdateTwin",
        "queryCondition": "properties.reported.firmware = '1.0'",
        "updateTwin": { "etag": "*", "properties": { "desired": { "telemetryInterval": 10 } } },
        "maxExecutionTimeInSeconds": 600,
    }))
    .unwrap();
    let now = w.now;
    let plant = w.hubs.hub_mut(PLANT).unwrap();
    plant.create_job(now, "tune-1", &request).unwrap();
    plant.run_jobs(now + Duration::from_secs(1)).unwrap();
    let job = plant.planner().job("tune-1").unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    let plant = w.hubs.hub(PLANT).unwrap();
    for (device, interval) in [("press-1", 10), ("press-2", 10), ("press-3", 30)] {
        let twin = plant.device_twin(&id(device)).unwrap();
        assert_eq!(twin["properties"]["desired"]["telemetryInterval"], interval, "{device}");
    }

    // Monitor: by query over reported properties, grouped counts and device job records.
    let old = query(plant, "SELECT * FROM devices WHERE properties.reported.firmware = '0.9'");
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["deviceId"], "press-3");
    let mut groups = query(
        plant,
        "SELECT properties.reported.firmware AS firmware, COUNT() AS n FROM devices \
         GROUP BY properties.reported.firmware",
    );
    groups.sort_by_key(|g| g["firmware"].as_str().unwrap_or_default().to_owned());
    assert_eq!(groups, vec![json!({ "firmware": "0.9", "n": 1 }), json!({ "firmware": "1.0", "n": 2 })]);
    let records = query(plant, "SELECT * FROM devices.jobs WHERE jobId = 'tune-1'");
    let mut job_devices: Vec<&str> = records.iter().map(|r| r["deviceId"].as_str().unwrap()).collect();
    job_devices.sort_unstable();
    assert_eq!(job_devices, ["press-1", "press-2"]);
    assert!(records.iter().all(|r| r["status"] == "completed"));

    // Retire: disable first, then delete.
    let later = w.now + Duration::from_secs(60);
    plant
        .registry()
        .set_device_status(
            &id("press-3"),
            DeviceStatus::Disabled,
            Some("retired".into()),
            &IfMatch::Any,
            later,
        )
        .unwrap();
    let disabled = query(plant, "SELECT deviceId FROM devices WHERE status = 'disabled'");
    assert_eq!(disabled, vec![json!({ "deviceId": "press-3" })]);

    let deleted = plant.delete_device(&id("press-3"), &IfMatch::Any, later).unwrap();
    assert_eq!(deleted.events.len(), 1);
    let event = &deleted.events[0];
    assert_eq!(event.op_type, LifecycleOperation::DeleteDeviceIdentity);
    assert_eq!(event.hub_name, PLANT);
    assert_eq!(event.device_id.as_str(), "press-3");
    assert_eq!(event.module_id, None);
    assert_eq!(event.operation_timestamp, later);
    assert_eq!(
        event.application_properties(),
        vec![
            ("hubName", PLANT.to_owned()),
            ("deviceId", "press-3".to_owned()),
            ("opType", "deleteDeviceIdentity".to_owned()),
            ("iothub-message-schema", "deviceLifecycleNotification".to_owned()),
            ("operationTimestamp", later.to_string()),
        ]
    );
    assert_eq!(event.body["deviceId"], "press-3");
    assert_eq!(event.body["tags"], json!({ "plan": "pilot", "floor": 3 }));
    assert_eq!(event.body["properties"]["reported"]["firmware"], "0.9");
    assert!(plant.core().twin(&id("press-3"), None).is_err());
    assert!(plant.device_twin(&id("press-3")).is_err());
    let counts = query(plant, "SELECT COUNT() AS n FROM devices");
    assert_eq!(counts, vec![json!({ "n": 2 })]);
}

fn sas_device(device: &str) -> ProvisionedDevice {
    ProvisionedDevice {
        device_id: id(device),
        auth: DeviceAuth::SymmetricKey {
            primary_key: STANDARD.encode([7u8; 32]),
            secondary_key: STANDARD.encode([9u8; 32]),
        },
        iot_edge: false,
    }
}

fn initial(tags: Value, desired: Value) -> InitialTwin {
    serde_json::from_value(json!({ "tags": tags, "properties": { "desired": desired } })).unwrap()
}

/// Hubs `PLANT` and `SPARE`, with `name` provisioned on `PLANT` (tag `line: 4`, desired
/// `speed: 2`) and reporting `temp: 21`; and the action that migrates it to `SPARE`.
fn a_device_on_plant_reporting(name: &str) -> (EmbeddedHubs, HubAction) {
    let mut hubs: EmbeddedHubs = EmbeddedHubs::new();
    let crypto = Arc::new(RingCrypto::new());
    hubs.insert(EmbeddedHub::in_memory(PLANT, crypto.clone()).unwrap());
    hubs.insert(EmbeddedHub::in_memory(SPARE, crypto).unwrap());
    hubs.apply(&HubAction::Provision {
        hub: PLANT.into(),
        device: sas_device(name),
        twin: TwinSetup::KeepOrInitial(initial(json!({ "line": 4 }), json!({ "speed": 2 }))),
    })
    .unwrap();
    let plant = hubs.hub(PLANT).unwrap();
    let Value::Object(reported) = json!({ "temp": 21 }) else { unreachable!() };
    let now = zerotouch_proto::Timestamp::EPOCH;
    plant.update_twin(&id(name), None, &TwinOperation::Reported(reported), &IfMatch::Any, now).unwrap();
    let migrate = HubAction::Migrate {
        from_hub: PLANT.into(),
        from_device_id: id(name),
        to_hub: SPARE.into(),
        device: sas_device(name),
        initial_twin: initial(json!({ "fresh": true }), json!({})),
    };
    (hubs, migrate)
}

#[test]
fn device_migrated_between_embedded_hubs_keeps_tags_desired_and_reported() {
    let (mut hubs, migrate) = a_device_on_plant_reporting("mover");
    hubs.apply(&migrate).unwrap();

    assert!(hubs.hub(PLANT).unwrap().device_twin(&id("mover")).is_err());
    let left = hubs.hub(PLANT).unwrap().take_lifecycle_events();
    let ops: Vec<_> = left.iter().map(|e| e.op_type).collect();
    assert_eq!(ops, [LifecycleOperation::CreateDeviceIdentity, LifecycleOperation::DeleteDeviceIdentity]);
    assert_eq!(left[1].body["properties"]["reported"]["temp"], 21);
    let arrived = hubs.hub(SPARE).unwrap().take_lifecycle_events();
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0].hub_name, SPARE);
    let twin = hubs.hub(SPARE).unwrap().device_twin(&id("mover")).unwrap();
    assert_eq!(twin["tags"], json!({ "line": 4 }));
    assert_eq!(twin["properties"]["desired"]["speed"], 2);
    assert_eq!(twin["properties"]["reported"]["temp"], 21);
}

/// A migration applied twice (a unit run again over hubs outside the store's transaction) finds
/// the old identity gone and the new one there: it keeps the new one, with the data the first
/// run moved, instead of starting it over from the initial twin.
#[test]
fn a_migration_applied_again_keeps_the_data_the_first_run_moved() {
    let (mut hubs, migrate) = a_device_on_plant_reporting("twice");
    hubs.apply(&migrate).unwrap();
    hubs.apply(&migrate).unwrap();
    let twin = hubs.hub(SPARE).unwrap().device_twin(&id("twice")).unwrap();
    assert_eq!(twin["tags"], json!({ "line": 4 }), "{twin}");
    assert_eq!(twin["properties"]["reported"]["temp"], 21, "{twin}");
}

#[test]
fn reprovision_with_reset_replaces_tags_and_desired_and_clears_reported() {
    let mut hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    hub.apply(&HubAction::Provision {
        hub: PLANT.into(),
        device: sas_device("resettable"),
        twin: TwinSetup::KeepOrInitial(initial(json!({ "old": true }), json!({ "mode": "a" }))),
    })
    .unwrap();
    let Value::Object(reported) = json!({ "seen": 1 }) else { unreachable!() };
    let now = zerotouch_proto::Timestamp::EPOCH;
    hub.update_twin(&id("resettable"), None, &TwinOperation::Reported(reported), &IfMatch::Any, now).unwrap();

    // Keeping the twin leaves everything as it was.
    hub.apply(&HubAction::Provision {
        hub: PLANT.into(),
        device: sas_device("resettable"),
        twin: TwinSetup::KeepOrInitial(initial(json!({ "new": true }), json!({ "mode": "b" }))),
    })
    .unwrap();
    let kept = hub.device_twin(&id("resettable")).unwrap();
    assert_eq!(kept["tags"], json!({ "old": true }));
    assert_eq!(kept["properties"]["reported"]["seen"], 1);

    hub.apply(&HubAction::Provision {
        hub: PLANT.into(),
        device: sas_device("resettable"),
        twin: TwinSetup::Reset(initial(json!({ "new": true }), json!({ "mode": "b" }))),
    })
    .unwrap();
    let reset = hub.device_twin(&id("resettable")).unwrap();
    assert_eq!(reset["tags"], json!({ "new": true }));
    assert_eq!(reset["properties"]["desired"]["mode"], "b");
    let reported: &Map<String, Value> = reset["properties"]["reported"].as_object().unwrap();
    assert!(reported.keys().all(|k| k.starts_with('$')), "reported not cleared: {reported:?}");
    assert!(reset["version"].as_u64().unwrap() > kept["version"].as_u64().unwrap());
}

#[test]
fn embedded_hub_refuses_actions_for_a_hub_it_does_not_hold() {
    let mut hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    let err = hub
        .apply(&HubAction::Provision {
            hub: SPARE.into(),
            device: sas_device("stray"),
            twin: TwinSetup::KeepOrInitial(InitialTwin::default()),
        })
        .unwrap_err();
    assert_eq!(err.code, HUB_NOT_FOUND);
    assert!(hub.registry().device(&id("stray")).is_err());
    let err = hub.apply(&HubAction::Remove { hub: SPARE.into(), device_id: id("stray") }).unwrap_err();
    assert_eq!(err.code, HUB_NOT_FOUND);
    // On its own hub, an identity that is not there counts as removed (an operator deleted it).
    hub.apply(&HubAction::Remove { hub: PLANT.into(), device_id: id("stray") }).unwrap();
}

#[test]
fn bulk_import_creates_identities_with_twins_and_update_twin_mode_rewrites_them() {
    let hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    let now = zerotouch_proto::Timestamp::EPOCH + Duration::from_secs(1_000_000);
    let create: Vec<ExportImportDevice> = serde_json::from_value(json!([
        { "id": "bulk-1", "importMode": "create", "tags": { "zone": "north" } },
        { "id": "bulk-2", "importMode": "create" },
    ]))
    .unwrap();
    let applied = hub.bulk(&create, now).unwrap();
    assert!(applied.value.is_successful, "{:?}", applied.value);
    assert_eq!(applied.events.len(), 2);
    assert_eq!(applied.events[0].body["tags"], json!({ "zone": "north" }));
    assert_eq!(hub.device_twin(&id("bulk-2")).unwrap()["version"], 2);

    let retwin: Vec<ExportImportDevice> = serde_json::from_value(json!([{
        "id": "bulk-2",
        "importMode": "updateTwin",
        "tags": { "zone": "south" },
        "properties": { "desired": { "mode": "eco" }, "reported": { "battery": 80 } },
    }]))
    .unwrap();
    assert!(hub.bulk(&retwin, now).unwrap().value.is_successful);
    let south = query(&hub, "SELECT * FROM devices WHERE tags.zone = 'south'");
    assert_eq!(south.len(), 1);
    assert_eq!(south[0]["deviceId"], "bulk-2");
    assert_eq!(south[0]["properties"]["desired"]["mode"], "eco");
    assert_eq!(south[0]["properties"]["reported"]["battery"], 80);

    let (_, tags, properties) = hub.core().twin_for_export(&id("bulk-2"), None).unwrap().unwrap();
    assert_eq!(tags, Some(json!({ "zone": "south" })));
    assert_eq!(properties.desired.unwrap()["mode"], "eco");
}

#[test]
fn module_twins_are_queryable_and_go_with_their_device() {
    let hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    let now = zerotouch_proto::Timestamp::EPOCH + Duration::from_secs(5_000);
    let device: zerotouch_proto::hub::Device =
        serde_json::from_value(json!({ "deviceId": "gateway" })).unwrap();
    hub.create_device(device, None, None, now).unwrap();
    let module: zerotouch_proto::hub::Module =
        serde_json::from_value(json!({ "deviceId": "gateway", "moduleId": "filter" })).unwrap();
    let created = hub.create_module(module, now).unwrap();
    assert_eq!(created.events.len(), 1);
    assert_eq!(created.events[0].body["moduleId"], "filter");

    let modules = query(&hub, "SELECT * FROM devices.modules WHERE deviceId = 'gateway'");
    assert_eq!(modules.len(), 1);
    assert_eq!(modules[0]["moduleId"], "filter");
    assert_eq!(modules[0]["connectionState"], "Disconnected");

    let deleted = hub.delete_device(&id("gateway"), &IfMatch::Any, now).unwrap();
    assert!(deleted.events.iter().any(|e| e.module_id.as_ref().is_some_and(|m| m.as_str() == "filter")));
    assert!(query(&hub, "SELECT * FROM devices.modules").is_empty());
    assert!(hub.core().twins().device_twins(&id("gateway")).unwrap().is_empty());
}

#[test]
fn queries_between_writes_see_every_write_made_through_the_hub() {
    let hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    let now = zerotouch_proto::Timestamp::EPOCH + Duration::from_secs(1_000_000);
    let north = "SELECT deviceId FROM devices WHERE tags.zone = 'north'";
    let create: Vec<ExportImportDevice> = serde_json::from_value(json!([
        { "id": "q-1", "importMode": "create", "tags": { "zone": "north" } },
        { "id": "q-2", "importMode": "create", "tags": { "zone": "south" } },
    ]))
    .unwrap();
    assert!(hub.bulk(&create, now).unwrap().value.is_successful);
    assert_eq!(query(&hub, north), vec![json!({ "deviceId": "q-1" })]);

    // A twin write, then an identity delete, each seen by the next query of the same text.
    let patch = serde_json::from_value(json!({ "tags": { "zone": "north" } })).unwrap();
    hub.update_twin(&id("q-2"), None, &TwinOperation::Patch(patch), &IfMatch::Any, now).unwrap();
    assert_eq!(query(&hub, north), vec![json!({ "deviceId": "q-1" }), json!({ "deviceId": "q-2" })]);
    hub.delete_device(&id("q-1"), &IfMatch::Any, now).unwrap();
    assert_eq!(query(&hub, north), vec![json!({ "deviceId": "q-2" })]);

    // A change made through the registry handed out by the hub is seen as well.
    let mut device = hub.registry().device(&id("q-2")).unwrap();
    device.status = DeviceStatus::Disabled;
    hub.registry().update_device(device, &IfMatch::Any, now).unwrap();
    let disabled = query(&hub, "SELECT deviceId FROM devices WHERE status = 'disabled'");
    assert_eq!(disabled, vec![json!({ "deviceId": "q-2" })]);
}

#[test]
fn a_device_provisioned_again_with_its_keys_keeps_its_identity_and_new_keys_replace_them() {
    let mut hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    let provision = |device: ProvisionedDevice| HubAction::Provision {
        hub: PLANT.into(),
        device,
        twin: TwinSetup::KeepOrInitial(initial(json!({ "line": 1 }), json!({}))),
    };
    hub.apply(&provision(sas_device("lathe"))).unwrap();
    let created = hub.registry().device(&id("lathe")).unwrap();
    // The create event carries the twin as written and the identity as created.
    let events = hub.take_lifecycle_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].op_type, LifecycleOperation::CreateDeviceIdentity);
    assert_eq!(events[0].body["tags"], json!({ "line": 1 }));
    assert_eq!(events[0].body["deviceEtag"], json!(created.etag.as_ref().unwrap().as_str()));

    hub.apply(&provision(sas_device("lathe"))).unwrap();
    assert_eq!(hub.registry().device(&id("lathe")).unwrap(), created, "same keys: the identity is untouched");

    let mut rotated = sas_device("lathe");
    rotated.auth = DeviceAuth::SymmetricKey {
        primary_key: STANDARD.encode([1u8; 32]),
        secondary_key: STANDARD.encode([2u8; 32]),
    };
    hub.apply(&provision(rotated)).unwrap();
    let updated = hub.registry().device(&id("lathe")).unwrap();
    assert_ne!(updated.etag, created.etag);
    let keys = updated.authentication.unwrap().symmetric_key;
    assert_eq!(keys.primary_key, Some(STANDARD.encode([1u8; 32])));
    assert_eq!(keys.secondary_key, Some(STANDARD.encode([2u8; 32])));
    assert!(hub.take_lifecycle_events().is_empty(), "updates are not lifecycle events");
}

// Lifecycle events of registrations whose store unit commits or is rolled back. The hub's
// in-memory stores are not part of the provisioning store's units, so what the hub wrote stands
// whatever a unit's outcome; the database case, where a rollback takes the hub's writes and
// their events with it, is tested on SQLite and PostgreSQL in `store/tests/*_hub_units.rs`.

/// A provisioner over the memory store with the plant hub over memory stores.
struct UnitWorld {
    provisioner: Provisioner<MemoryStore>,
    hubs: EmbeddedHubs,
    crypto: RingCrypto,
}

impl UnitWorld {
    fn new() -> Self {
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
            MemoryStore::new(),
            Arc::new(RingCrypto::new()),
            Allocator::new(vec![LinkedHub::new(PLANT)]),
        );
        let mut hubs = EmbeddedHubs::new();
        hubs.insert(EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap());
        hubs.set_now(zerotouch_testkit::sim::START);
        Self { provisioner, hubs, crypto: RingCrypto::new() }
    }

    fn plant(&self) -> &EmbeddedHub {
        self.hubs.hub(PLANT).unwrap()
    }

    /// Enrolls `id` for the plant hub and sends its register request through the plant hubs,
    /// refused `refusals` times with `code` after they wrote; returns the reply status.
    fn register(&mut self, id: &str, refusals: usize, code: u32) -> u16 {
        let now = zerotouch_testkit::sim::START;
        let o = EnrollOptions {
            policy: Some(AllocationPolicy::Static),
            hubs: Some(vec![PLANT.to_owned()]),
            ..Default::default()
        };
        let store = self.provisioner.store();
        let enrollment = match store.enrollment(&RegistrationId::new(id).unwrap()).unwrap() {
            Some(e) => e,
            None => enrollments::put_enrollment(
                store,
                &self.crypto,
                now,
                individual(id, symmetric_attestation(), &o),
                &IfMatch::Absent,
            )
            .unwrap(),
        };
        let key =
            STANDARD.decode(enrollment.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap();
        let token = registration_token(&self.crypto, &key, SCOPE, id, now.unix_secs() + 60).to_string();
        let request = RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: id.into(),
            body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
            credential: Credential::Sas(token),
            api_version: None,
        };
        let mut hubs = RefuseAfterWrite { hub: &mut self.hubs, refusals, code };
        self.provisioner.handle_register(now, request, &mut hubs).status
    }

    fn status(&self, id: &str) -> Option<RegistrationStatus> {
        let record = self.provisioner.store().registration(&RegistrationId::new(id).unwrap()).unwrap();
        record.and_then(|r| r.state.status)
    }
}

fn created_ids(events: &[zerotouch_engine::registry::LifecycleEvent]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e.op_type == LifecycleOperation::CreateDeviceIdentity)
        .map(|e| e.device_id.as_str())
        .collect()
}

#[test]
fn a_registration_whose_round_is_lost_after_the_hub_wrote_announces_its_device_once() {
    // The lost round's identity stays in the hub's memory; the next round finds and keeps it.
    let mut w = UnitWorld::new();
    assert_eq!(w.register("press-7", 1, 412_002), 202);
    assert_eq!(w.status("press-7"), Some(RegistrationStatus::Assigned));
    assert!(w.plant().registry().device(&id("press-7")).is_ok());
    let events = w.plant().take_lifecycle_events();
    assert_eq!(created_ids(&events), ["press-7"]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["tags"], json!({ "plan": "pilot", "floor": 3 }));
}

#[test]
fn a_failed_unit_still_announces_a_device_its_hub_outside_the_unit_kept() {
    let mut w = UnitWorld::new();
    assert_eq!(w.register("press-9", 1, 500_001), 202);
    assert_eq!(w.status("press-9"), Some(RegistrationStatus::Failed), "the registration failed");
    assert!(w.plant().registry().device(&id("press-9")).is_ok(), "the hub's memory is not in the unit");
    assert_eq!(created_ids(&w.plant().take_lifecycle_events()), ["press-9"]);

    // Registering again updates the identity it has: nothing new to announce.
    assert_eq!(w.register("press-9", 0, 0), 202);
    assert_eq!(w.status("press-9"), Some(RegistrationStatus::Assigned));
    assert!(w.plant().take_lifecycle_events().is_empty());
}

fn provision_action(device: &str) -> HubAction {
    HubAction::Provision {
        hub: PLANT.into(),
        device: sas_device(device),
        twin: TwinSetup::KeepOrInitial(initial(json!({ "line": 4 }), json!({}))),
    }
}

#[test]
fn a_unit_inside_a_unit_announces_nothing_before_the_outer_one_commits() {
    let mut hub = EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap();
    hub.begin_unit();
    hub.apply(&provision_action("lathe-1")).unwrap();
    hub.begin_unit();
    hub.apply(&provision_action("lathe-2")).unwrap();
    hub.end_unit(true);
    assert!(hub.take_lifecycle_events().is_empty(), "the outer unit may still roll back");
    hub.apply(&provision_action("lathe-3")).unwrap();
    hub.end_unit(true);
    assert_eq!(created_ids(&hub.take_lifecycle_events()), ["lathe-1", "lathe-2", "lathe-3"]);

    // The outer unit rolls back, but the hub's memory is not part of it: the inner unit's
    // device stands, and is announced when the outer unit ends, not before.
    hub.begin_unit();
    hub.begin_unit();
    hub.apply(&provision_action("lathe-4")).unwrap();
    hub.end_unit(true);
    assert!(hub.take_lifecycle_events().is_empty());
    hub.end_unit(false);
    assert!(hub.registry().device(&id("lathe-4")).is_ok());
    assert_eq!(created_ids(&hub.take_lifecycle_events()), ["lathe-4"]);

    // Outside a unit an action is announced at once, as before.
    hub.apply(&provision_action("lathe-5")).unwrap();
    assert_eq!(created_ids(&hub.take_lifecycle_events()), ["lathe-5"]);
}

#[test]
fn registrations_on_two_threads_announce_only_their_own_committed_devices() {
    let hub = Arc::new(Mutex::new(EmbeddedHub::in_memory(PLANT, Arc::new(RingCrypto::new())).unwrap()));
    hub.lock().unwrap().begin_unit();
    hub.lock().unwrap().apply(&provision_action("mill-1")).unwrap();

    // Another registration runs its whole unit while this one is open.
    let other = Arc::clone(&hub);
    std::thread::spawn(move || {
        other.lock().unwrap().begin_unit();
        other.lock().unwrap().apply(&provision_action("mill-2")).unwrap();
        other.lock().unwrap().end_unit(true);
    })
    .join()
    .unwrap();
    assert_eq!(created_ids(&hub.lock().unwrap().take_lifecycle_events()), ["mill-2"]);

    // A third one ends while this unit is still open: only its own device is announced.
    let other = Arc::clone(&hub);
    std::thread::spawn(move || {
        let mut hub = other.lock().unwrap();
        hub.begin_unit();
        hub.apply(&provision_action("mill-3")).unwrap();
        hub.end_unit(true);
    })
    .join()
    .unwrap();
    assert_eq!(created_ids(&hub.lock().unwrap().take_lifecycle_events()), ["mill-3"]);

    hub.lock().unwrap().end_unit(true);
    assert_eq!(created_ids(&hub.lock().unwrap().take_lifecycle_events()), ["mill-1"]);
}
