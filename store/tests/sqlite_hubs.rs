//! Several embedded hubs in one SQLite database: each hub view keeps its own devices, twins,
//! jobs and query results, and the same device id lives independently in two hubs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use serde_json::{json, Map, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{PageRequest, Precondition};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::Device;
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

fn hub(store: &SqliteStore, name: &str) -> EmbeddedHub<SqliteStore, SqliteStore, SqliteStore> {
    EmbeddedHub::over(name, store.hub(name).unwrap(), Arc::new(RingCrypto::new())).unwrap()
}

fn tags(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn ids(hub: &EmbeddedHub<SqliteStore, SqliteStore, SqliteStore>, sql: &str) -> Vec<String> {
    let page =
        execute(&parse(sql).unwrap(), hub, &PageRequest { continuation: None, max_items: 100 }).unwrap();
    page.items.iter().map(|t| t["deviceId"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn two_hubs_in_one_database_keep_the_same_device_id_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    let north = hub(&store, "North.example.net");
    let south = hub(&store, "south.example.net");
    let now = Timestamp::from_unix_secs(1_700_000_000);
    let id = DeviceId::new("pump-1").unwrap();
    north.create_device(Device::new(id.clone()), Some(&tags(json!({"site": "oslo"}))), None, now).unwrap();
    south.create_device(Device::new(id.clone()), Some(&tags(json!({"site": "rome"}))), None, now).unwrap();
    south
        .create_device(
            Device::new(DeviceId::new("pump-2").unwrap()),
            Some(&tags(json!({"site": "oslo"}))),
            None,
            now,
        )
        .unwrap();

    assert_eq!(ids(&north, "SELECT * FROM devices"), ["pump-1"]);
    assert_eq!(ids(&south, "SELECT * FROM devices"), ["pump-1", "pump-2"]);
    // The tag index answers per hub.
    assert_eq!(ids(&north, "SELECT * FROM devices WHERE tags.site = 'oslo'"), ["pump-1"]);
    assert_eq!(ids(&south, "SELECT * FROM devices WHERE tags.site = 'oslo'"), ["pump-2"]);
    assert_eq!(north.device_twin(&id).unwrap()["tags"]["site"], "oslo");
    assert_eq!(south.device_twin(&id).unwrap()["tags"]["site"], "rome");

    north.delete_device(&id, &IfMatch::Any, now).unwrap();
    assert!(north.registry().store().device(&id).unwrap().is_none());
    assert!(south.registry().store().device(&id).unwrap().is_some());
    assert_eq!(south.device_twin(&id).unwrap()["tags"]["site"], "rome");

    // Hub names are recorded lower-cased, and a standalone handle sees no hub's devices.
    assert_eq!(store.hub_names().unwrap(), ["north.example.net", "south.example.net"]);
    assert!(store.device(&id).unwrap().is_none());
    assert_eq!(
        store.put_device(&Device::new(id.clone()), &Precondition::MustExist),
        Err(StoreError::NotFound)
    );
}

#[test]
fn a_hub_view_reopened_by_another_handle_sees_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let id = DeviceId::new("meter-7").unwrap();
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .hub("east.localhost")
            .unwrap()
            .put_device(&Device::new(id.clone()), &Precondition::MustNotExist)
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert!(store.hub("EAST.localhost").unwrap().device(&id).unwrap().is_some());
    assert!(store.hub("west.localhost").unwrap().device(&id).unwrap().is_none());
}

#[test]
fn importing_a_hub_file_that_is_not_there_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    // Another process imported (and renamed) it meanwhile.
    let missing = dir.path().join("north.localhost.sqlite");
    assert_eq!(store.import_hub_file(&missing, "north.localhost"), Err(StoreError::NotFound));
    assert!(!missing.exists());
    assert!(store.hub_names().unwrap().is_empty(), "{:?}", store.hub_names());
}
