//! Several embedded hubs in one PostgreSQL database: each hub's identities, twins, jobs and
//! queries see only its own rows, while the provisioning stores stay shared.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;
mod query_support;

use std::ops::ControlFlow;

use serde_json::{json, Map, Value};
use zerotouch_engine::jobs::{DeviceJobFilter, JobStore};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{PageRequest, Precondition, RegistrationStore};
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::Error;
use zerotouch_proto::hub::{Device, DeviceStatus, Module};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};
use zerotouch_store::postgres::PgStore;

use pg_support::TestDb;
use query_support::all_results;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000)
}

fn tags(site: &str) -> Map<String, Value> {
    json!({ "site": site }).as_object().unwrap().clone()
}

/// Writes device `id` with its twin (tagged `site`) into `hub`.
fn put_device_with_twin(hub: &PgStore, id: &str, status: DeviceStatus, site: &str) {
    let mut device = Device::new(DeviceId::new(id).unwrap());
    device.status = status;
    hub.put_device(&device, &Precondition::MustNotExist).unwrap();
    let twin = TwinDocument::with_initial(now(), &tags(site), &Map::new()).unwrap();
    hub.put_twin(&TwinKey::device(device.device_id), &twin, &Precondition::MustNotExist).unwrap();
}

fn site_of(hub: &PgStore, id: &DeviceId) -> Option<Value> {
    hub.twin(&TwinKey::device(id.clone())).unwrap().map(|t| t.tags()["site"].clone())
}

#[test]
fn two_hubs_in_one_database_keep_the_same_device_id_apart() {
    let db = TestDb::new();
    let store = db.store();
    let north = store.hub("North.example.net").unwrap();
    let south = store.hub("south.example.net").unwrap();
    let id = DeviceId::new("meter-1").unwrap();
    put_device_with_twin(&north, "meter-1", DeviceStatus::Enabled, "north");
    // The same id in the other hub is a new device, not a conflict.
    put_device_with_twin(&south, "meter-1", DeviceStatus::Disabled, "south");

    assert_eq!(north.device(&id).unwrap().unwrap().status, DeviceStatus::Enabled);
    assert_eq!(south.device(&id).unwrap().unwrap().status, DeviceStatus::Disabled);
    assert_eq!(site_of(&north, &id), Some(json!("north")));
    assert_eq!(site_of(&south, &id), Some(json!("south")));
    assert!(store.device(&id).unwrap().is_none(), "the unnamed hub holds nothing");
    assert_eq!(north.count_devices().unwrap().total, 1);
    assert_eq!(south.count_devices().unwrap().disabled, 1);

    // A host name is case-insensitive: another view of north sees north's device.
    let north_again = store.hub("NORTH.EXAMPLE.NET").unwrap();
    assert_eq!(north_again.device(&id).unwrap().unwrap().status, DeviceStatus::Enabled);
    assert_eq!(store.hub_names().unwrap(), vec!["north.example.net", "south.example.net"]);

    // Modules and deletes stay in their hub.
    let module = Module::new(id.clone(), ModuleId::new("m1").unwrap());
    north.put_module(&module, &Precondition::MustNotExist).unwrap();
    assert_eq!(north.modules(&id).unwrap().len(), 1);
    assert!(south.modules(&id).unwrap().is_empty());
    let (_, modules) = north.delete_device(&id, &Precondition::None).unwrap();
    assert_eq!(modules.len(), 1);
    assert!(north.device(&id).unwrap().is_none());
    assert_eq!(south.device(&id).unwrap().unwrap().status, DeviceStatus::Disabled);
    north.delete_twin(&TwinKey::device(id.clone()), &Precondition::None).unwrap();
    assert_eq!(site_of(&south, &id), Some(json!("south")));
}

#[test]
fn a_query_over_one_hub_returns_only_that_hubs_devices_modules_and_jobs() {
    let db = TestDb::new();
    let store = db.store_with(4);
    let (a, b) = (store.hub("plant-a.example.net").unwrap(), store.hub("plant-b.example.net").unwrap());
    // Two hubs with the same fleet: every device id, module and job record exists twice.
    let hub_a = query_support::fleet(a.clone(), true);
    let _hub_b = query_support::fleet(b.clone(), true);
    let cases: &[(&str, usize)] = &[
        ("SELECT * FROM devices", 120),
        ("SELECT * FROM devices WHERE deviceId = 'dev-007'", 1),
        ("SELECT * FROM devices WHERE tags.region = 'eu'", 40),
        ("SELECT * FROM devices.modules", 24),
        ("SELECT * FROM devices.modules WHERE deviceId = 'dev-010'", 2),
        ("SELECT * FROM devices.jobs", 36),
        ("SELECT * FROM devices.jobs WHERE jobId = 'job-b' AND status = 'failed'", 9),
    ];
    for (query, expected) in cases {
        let from_store = all_results(query, &a, 50);
        assert_eq!(from_store.len(), *expected, "{query} over one hub");
        assert_eq!(from_store, all_results(query, &hub_a, 50), "{query}: store and hub differ");
    }
    // Telling the hubs apart: one device of b changes, a's answer does not.
    let id = DeviceId::new("dev-007").unwrap();
    let mut device = b.device(&id).unwrap().unwrap();
    device.status = DeviceStatus::Disabled;
    b.put_device(&device, &Precondition::None).unwrap();
    let q = "SELECT * FROM devices WHERE deviceId = 'dev-007' AND status = 'disabled'";
    assert_eq!(all_results(q, &a, 10).len(), 0);
    assert_eq!(all_results(q, &b, 10).len(), 1);
    let filter = DeviceJobFilter { job_id: None, device_id: Some("dev-007".to_owned()) };
    let page = PageRequest { continuation: None, max_items: 100 };
    assert_eq!(a.device_jobs(&filter, &page).unwrap().items.len(), 2);
}

#[test]
fn a_bulk_import_and_export_cover_one_hub() {
    let db = TestDb::new();
    let store = db.store();
    let north = store.hub("north").unwrap();
    let south = store.hub("south").unwrap();
    let devices: Vec<(Device, TwinDocument)> = (0..30)
        .map(|i| (Device::new(DeviceId::new(format!("d-{i:02}")).unwrap()), TwinDocument::new(now())))
        .collect();
    north.put_devices_with_twins(&devices).unwrap();
    south.put_devices_with_twins(&devices[..10]).unwrap();
    assert_eq!(north.device_count().unwrap(), 30);
    assert_eq!(south.device_count().unwrap(), 10);
    let mut exported = 0;
    south
        .export_devices(4, |_| {
            exported += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(exported, 10);
    assert_eq!(south.twins(&PageRequest { continuation: None, max_items: 100 }).unwrap().items.len(), 10);
}

#[test]
fn a_unit_covers_writes_to_a_hub_view_and_reads_inside_it_see_them() {
    let db = TestDb::new();
    let store = db.store_with(2);
    let north = store.hub("north").unwrap();
    let id = DeviceId::new("inside").unwrap();
    let mut seen = Vec::new();
    let result = store.atomically(&mut || {
        put_device_with_twin(&north, "inside", DeviceStatus::Enabled, "north");
        // A nested unit is a savepoint: its failure undoes only its own writes.
        let inner = store.atomically(&mut || {
            north.put_module(&Module::new(id.clone(), ModuleId::new("m1").unwrap()), &Precondition::None)?;
            Err(Error::Hub { code: 400_000, message: "inner refused".to_owned() })
        });
        seen.push(inner.is_err());
        seen.push(north.device(&id)?.is_some());
        seen.push(north.modules(&id)?.is_empty());
        // The export reads the unit's transaction too.
        let mut exported = 0;
        north.export_devices(10, |_| {
            exported += 1;
            ControlFlow::Continue(())
        })?;
        seen.push(exported == 1);
        Err(Error::Hub { code: 409_000, message: "outer refused".to_owned() })
    });
    assert!(matches!(result, Err(Error::Hub { code: 409_000, .. })), "{result:?}");
    assert_eq!(seen, vec![true, true, true, true]);
    assert!(north.device(&id).unwrap().is_none(), "the failed unit's device was kept");
    assert!(north.twin(&TwinKey::device(id)).unwrap().is_none(), "the failed unit's twin was kept");
}

#[test]
fn a_module_of_a_missing_device_inside_a_unit_is_refused_without_aborting_the_unit() {
    let db = TestDb::new();
    let store = db.store_with(2);
    let north = store.hub("north").unwrap();
    let id = DeviceId::new("kept").unwrap();
    store
        .atomically(&mut || {
            let orphan = Module::new(DeviceId::new("missing").unwrap(), ModuleId::new("m1").unwrap());
            let refused = north.put_module(&orphan, &Precondition::MustNotExist);
            assert!(matches!(refused, Err(zerotouch_engine::StoreError::NotFound)), "{refused:?}");
            put_device_with_twin(&north, "kept", DeviceStatus::Enabled, "north");
            Ok(())
        })
        .unwrap();
    assert!(north.device(&id).unwrap().is_some());
}
