//! Strings holding U+0000, which the engine accepts in twin values, payloads and enrollments,
//! are stored and found on PostgreSQL exactly as on SQLite (PostgreSQL's jsonb and text types
//! cannot hold the character itself).
#![cfg(all(feature = "postgres", feature = "sqlite"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;
mod query_support;

use std::ops::ControlFlow;
use std::sync::Arc;

use pg_support::TestDb;
use query_support::all_results;
use serde_json::{json, Map, Value};
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::jobs::JobStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, ResponseBody};
use zerotouch_engine::query::{parse, QuerySource};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{
    EnrollmentRef, OperationRecord, OperationStatus, PageRequest, Precondition, ProvisioningStore,
    RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_proto::device::{
    raw_payload, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{
    AttestationMechanism, DeviceRegistrationState, EnrollmentGroup, InitialTwin, InitialTwinProperties,
    SymmetricKeyAttestation,
};
use zerotouch_proto::{
    DeviceId, EnrollmentGroupId, IdScope, IfMatch, OperationId, RegistrationId, Timestamp,
};
use zerotouch_store::sqlite::SqliteStore;

const HUB: &str = "plant.example.net";

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Tags with U+0000 in a value, in a nested value and in an array item.
fn nul_tags() -> Map<String, Value> {
    object(json!({
        "serial": "ab\u{0}cd",
        "Site": { "room": "\u{0}" },
        "codes": ["x", "y\u{0}"],
        "plain": "eu",
    }))
}

#[test]
fn a_twin_whose_tags_hold_a_nul_character_is_stored_and_read_back_as_on_sqlite() {
    let db = TestDb::new();
    let pg = db.store().hub(HUB).unwrap();
    let sqlite = SqliteStore::open_in_memory().unwrap().hub(HUB).unwrap();
    let desired = object(json!({ "note": "x\u{0}y" }));
    // The engine accepts the twin (the same validation as an enrollment's initialTwin).
    let twin = TwinDocument::with_initial(now(), &nul_tags(), &desired).unwrap();
    let key = TwinKey::device(DeviceId::new("d1").unwrap());

    sqlite.put_twin(&key, &twin, &Precondition::MustNotExist).unwrap();
    pg.put_twin(&key, &twin, &Precondition::MustNotExist).unwrap();
    assert_eq!(pg.twin(&key).unwrap(), sqlite.twin(&key).unwrap());
    assert_eq!(pg.twin(&key).unwrap().unwrap().tags(), &nul_tags());

    // Replaced by a twin without the character, the row is indexed again (and back).
    let plain = TwinDocument::with_initial(now(), &object(json!({ "serial": "abcd" })), &Map::new()).unwrap();
    pg.put_twin(&key, &plain, &Precondition::None).unwrap();
    pg.put_twin(&key, &twin, &Precondition::None).unwrap();
    assert_eq!(pg.twin(&key).unwrap().unwrap().tags(), &nul_tags());

    // The bulk path writes twins with multi-row statements of its own.
    let device = Device::new(DeviceId::new("d2").unwrap());
    pg.put_devices_with_twins(&[(device.clone(), twin.clone())]).unwrap();
    let read = pg.twin(&TwinKey::device(device.device_id)).unwrap().unwrap();
    assert_eq!(read.tags(), &nul_tags());
    assert_eq!(read.desired(), twin.desired());
}

/// Devices `nul-0`..`nul-3` with U+0000 in tags or desired properties, and `plain-0`..`plain-3`
/// without, written through an embedded hub over `store`.
fn small_fleet<S>(store: S) -> EmbeddedHub<S, S, S>
where
    S: IdentityStore + TwinStore + JobStore + Clone,
{
    let hub = EmbeddedHub::over(HUB, store, Arc::new(RingCrypto::new())).unwrap();
    for i in 0..4 {
        let tags =
            object(json!({ "serial": format!("s{i}\u{0}"), "region": "eu", "floor": { "n": "f\u{0}" } }));
        let desired = object(json!({ "note": format!("n{i}\u{0}") }));
        let id = DeviceId::new(format!("nul-{i}")).unwrap();
        hub.create_device(Device::new(id), Some(&tags), Some(&desired), now()).unwrap();
        let tags = object(json!({ "serial": format!("s{i}"), "region": "eu" }));
        let id = DeviceId::new(format!("plain-{i}")).unwrap();
        hub.create_device(Device::new(id), Some(&tags), None, now()).unwrap();
    }
    hub
}

#[test]
fn a_query_for_a_value_holding_a_nul_character_answers_on_postgres_as_on_sqlite() {
    let db = TestDb::new();
    let pg = db.store().hub(HUB).unwrap();
    let sqlite = SqliteStore::open_in_memory().unwrap().hub(HUB).unwrap();
    let pg_hub = small_fleet(pg.clone());
    small_fleet(sqlite.clone());
    let cases: &[(&str, usize)] = &[
        (r"SELECT deviceId FROM devices WHERE tags.serial = 's1\u0000'", 1),
        (r"SELECT deviceId FROM devices WHERE tags.SERIAL IN ['s1\u0000', 's2\u0000', 's3']", 3),
        (r"SELECT deviceId FROM devices WHERE tags.floor.n = 'f\u0000'", 4),
        (r"SELECT deviceId FROM devices WHERE tags.serial = 's1'", 1),
        (r"SELECT deviceId FROM devices WHERE tags.region = 'eu'", 8),
        (r"SELECT deviceId FROM devices WHERE properties.desired.note = 'n2\u0000'", 1),
        (r"SELECT deviceId FROM devices WHERE deviceId = 'nul-1\u0000'", 0),
        (r"SELECT deviceId FROM devices WHERE status IN ['enabled', '\u0000']", 8),
        (r"SELECT * FROM devices.modules WHERE moduleId = 'm\u0000'", 0),
        (r"SELECT * FROM devices.jobs WHERE jobId = 'j\u0000'", 0),
    ];
    for (query, expected) in cases {
        let from_pg = all_results(query, &pg, 3);
        assert_eq!(from_pg.len(), *expected, "{query} over PostgreSQL: {from_pg:?}");
        assert_eq!(from_pg, all_results(query, &sqlite, 3), "{query}: PostgreSQL and SQLite differ");
        assert_eq!(from_pg, all_results(query, &pg_hub, 3), "{query}: PostgreSQL and the hub differ");
    }

    // The tag index still narrows: twins it cannot hold get past every tag test, the others
    // only when they match.
    let visited = |condition: &str| {
        let query = parse(&format!("SELECT * FROM devices WHERE {condition}")).unwrap();
        let mut n = 0;
        let page = PageRequest { continuation: None, max_items: 1000 };
        pg.scan(query.from, query.filter.as_ref(), &page, &mut |_| {
            n += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
        n
    };
    assert_eq!(visited("tags.serial = 's1'"), 1 + 4);
    assert_eq!(visited("tags.serial = 'nothing'"), 4);
}

#[test]
fn a_query_naming_a_tag_that_holds_a_nul_character_answers_on_postgres_as_on_sqlite() {
    let db = TestDb::new();
    let pg = db.store().hub(HUB).unwrap();
    let sqlite = SqliteStore::open_in_memory().unwrap().hub(HUB).unwrap();
    let pg_hub = small_fleet(pg.clone());
    small_fleet(sqlite.clone());
    // Names escaped in brackets may hold the character itself (the hub refuses it in the tag
    // names it stores, so no twin matches); PostgreSQL's jsonb cannot spell it.
    let cases = [
        "SELECT deviceId FROM devices WHERE tags.[[s\u{0}]] = 'x'",
        "SELECT deviceId FROM devices WHERE tags.[[serial\u{0}]] IN ['s1', 's2']",
        "SELECT deviceId FROM devices WHERE tags.[[floor\u{0}]].n = 'f'",
        "SELECT deviceId FROM devices WHERE tags.floor.[[n\u{0}]] = 'f'",
        "SELECT deviceId FROM devices WHERE tags.[[a\u{0}b]] = 'x' OR tags.region = 'eu'",
    ];
    for (query, expected) in cases.into_iter().zip([0, 0, 0, 0, 8]) {
        let from_pg = all_results(query, &pg, 3);
        assert_eq!(from_pg.len(), expected, "{query:?} over PostgreSQL: {from_pg:?}");
        assert_eq!(from_pg, all_results(query, &sqlite, 3), "{query:?}: PostgreSQL and SQLite differ");
        assert_eq!(from_pg, all_results(query, &pg_hub, 3), "{query:?}: PostgreSQL and the hub differ");
    }
}

/// 32 zero bytes in base64: a fixed group key the test can derive device keys from.
const GROUP_KEY_B64: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SCOPE: &str = "0ne00AB1234";

/// The symmetric-key group `nul` whose initial twin holds U+0000 in a tag and a desired value.
fn nul_group() -> EnrollmentGroup {
    let mut group =
        EnrollmentGroup::new(EnrollmentGroupId::new("nul").unwrap(), AttestationMechanism::symmetric_key());
    group.attestation.symmetric_key = Some(SymmetricKeyAttestation {
        primary_key: Some(GROUP_KEY_B64.to_owned()),
        secondary_key: Some(GROUP_KEY_B64.to_owned()),
    });
    group.initial_twin = Some(InitialTwin {
        tags: Some(json!({ "serial": "a\u{0}b" })),
        properties: Some(InitialTwinProperties { desired: Some(json!({ "mode": "\u{0}" })) }),
    });
    group
}

/// Enrolls [`nul_group`] in `store`, registers `device-1` through it into an embedded hub over
/// `hub_store`, and returns the final operation status and the device's twin tags and desired
/// properties.
fn register_through_the_nul_group<S, H>(store: S, hub_store: H) -> (RegistrationOperationStatus, Value)
where
    S: ProvisioningStore,
    H: IdentityStore + TwinStore + JobStore + Clone,
{
    enrollments::put_enrollment_group(&store, &RingCrypto::new(), now(), nul_group(), &IfMatch::Absent)
        .unwrap();
    let stored = store.enrollment_group(&EnrollmentGroupId::new("nul").unwrap()).unwrap().unwrap();
    assert_eq!(stored.initial_twin, nul_group().initial_twin);
    let mut hub = EmbeddedHub::over(HUB, hub_store.clone(), Arc::new(RingCrypto::new())).unwrap();
    hub.set_now(now());
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        Arc::new(RingCrypto::new()),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let r = provisioner.handle_register(
        now(),
        pg_support::register_request(
            SCOPE,
            "device-1",
            now(),
            Some(raw_payload(&json!({ "firmware": "1\u{0}2" }))),
        ),
        &mut hub,
    );
    let ResponseBody::Operation(op) = r.body else { panic!("not an operation: {:?}", r.body) };
    let status =
        provisioner.store().operation(&OperationId::new(&op.operation_id).unwrap()).unwrap().unwrap();
    let twin = hub_store.twin(&TwinKey::device(DeviceId::new("device-1").unwrap())).unwrap();
    let twin = twin.map_or(Value::Null, |t| json!({ "tags": t.tags(), "desired": t.desired() }));
    (status.into_status(), twin)
}

#[test]
fn a_device_of_an_enrollment_whose_initial_twin_holds_a_nul_character_is_assigned_as_on_sqlite() {
    let sqlite = SqliteStore::open_in_memory().unwrap();
    let (on_sqlite, sqlite_twin) = register_through_the_nul_group(sqlite.clone(), sqlite.hub(HUB).unwrap());
    assert_eq!(on_sqlite.status, RegistrationStatus::Assigned, "{on_sqlite:?}");

    let db = TestDb::new();
    let pg = db.store();
    let (on_pg, pg_twin) = register_through_the_nul_group(pg.clone(), pg.hub(HUB).unwrap());
    assert_eq!(on_pg.status, RegistrationStatus::Assigned, "{on_pg:?}");
    assert_eq!(pg_twin, json!({ "tags": { "serial": "a\u{0}b" }, "desired": { "mode": "\u{0}" } }));
    assert_eq!(pg_twin, sqlite_twin);
}

#[test]
fn a_registration_record_whose_payload_holds_a_nul_character_is_stored_as_on_sqlite() {
    let db = TestDb::new();
    let pg = db.store();
    let sqlite = SqliteStore::open_in_memory().unwrap();
    let id = RegistrationId::new("payload-1").unwrap();
    let payload = json!({ "config": "a\u{0}b", "list": ["\u{0}"] });
    let record = RegistrationRecord {
        registration_id: id.clone(),
        state: DeviceRegistrationState {
            registration_id: id.as_str().into(),
            status: Some(RegistrationStatus::Assigned),
            assigned_hub: Some(HUB.into()),
            device_id: Some("payload-1".into()),
            payload: Some(payload.clone()),
            ..Default::default()
        },
        enrollment: EnrollmentRef::Group(EnrollmentGroupId::new("nul").unwrap()),
        initial_hub: Some(HUB.into()),
    };
    let operation = |op: &str| OperationRecord {
        operation_id: OperationId::new(op).unwrap(),
        registration_id: id.clone(),
        created: now(),
        status: OperationStatus::Fixed(Box::new(RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigned,
            registration_state: Some(DeviceRegistrationResult {
                registration_id: id.as_str().into(),
                status: Some(RegistrationStatus::Assigned),
                payload: Some(payload.clone()),
                ..Default::default()
            }),
        })),
    };
    for (store, name) in [(&pg as &dyn RegistrationStore, "PostgreSQL"), (&sqlite, "SQLite")] {
        store
            .commit_registration(Arc::new(record.clone()), &Precondition::MustNotExist, operation("op-1"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let read = store.registration(&id).unwrap().unwrap();
        assert_eq!(read.state.payload.as_ref(), Some(&payload), "{name}");
        let op = store.operation(&OperationId::new("op-1").unwrap()).unwrap().unwrap().into_status();
        assert_eq!(op.registration_state.unwrap().payload, Some(payload.clone()), "{name}");
    }
}
