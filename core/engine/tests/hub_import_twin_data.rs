//! A bulk or import entry that would create an identity with twin data the twin refuses fails
//! whole: no identity without a twin is left behind, and the entry can be retried as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use serde_json::{json, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::jobs::{JobLimits, MemoryJobStore};
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::registry::{ImportJob, MemoryIdentityStore};
use zerotouch_engine::store::{Page, PageRequest, Precondition};
use zerotouch_engine::twin::{MemoryTwinStore, StoredTwin, TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::{Device, ExportImportDevice, HubErrorCode, JobProperties};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

fn hub() -> EmbeddedHub {
    EmbeddedHub::in_memory("plant.example.net", Arc::new(RingCrypto::new())).unwrap()
}

fn entry(v: Value) -> ExportImportDevice {
    serde_json::from_value(v).unwrap()
}

fn device_ids(hub: &EmbeddedHub) -> Vec<Value> {
    let q = parse("SELECT deviceId FROM devices").unwrap();
    let page = PageRequest { continuation: None, max_items: 100 };
    execute(&q, hub, &page).unwrap().items.into_iter().map(|r| r["deviceId"].clone()).collect()
}

#[test]
fn a_bulk_create_with_invalid_twin_data_creates_nothing_and_can_be_retried() {
    let hub = hub();
    hub.create_device(Device::new(id("host")), None, None, t0()).unwrap();
    // '.' is not allowed in a property name; a string over 4 KB is too long.
    let long = "x".repeat(5000);
    for bad in [
        json!({"id": "d1", "importMode": "create", "tags": {"a.b": 1}}),
        json!({"id": "d2", "importMode": "createOrUpdate", "properties": {"desired": {"s": long}}}),
        json!({"id": "d3", "importMode": "createOrUpdateIfMatchETag", "eTag": "\"MQ==\"",
               "properties": {"reported": {"a b": 1}}}),
        json!({"id": "host", "moduleId": "m1", "importMode": "create", "tags": {"a.b": 1}}),
    ] {
        let applied = hub.bulk(&[entry(bad.clone())], t0()).unwrap();
        assert!(!applied.value.is_successful, "{bad}");
        assert_eq!(applied.value.errors[0].error_code, HubErrorCode::ArgumentInvalid, "{bad}");
        assert!(applied.events.is_empty(), "{bad}");
    }
    for name in ["d1", "d2", "d3"] {
        assert!(hub.registry().device(&id(name)).is_err(), "{name} was created without its twin");
    }
    assert!(hub.registry().module(&id("host"), &ModuleId::new("m1").unwrap()).is_err());
    assert_eq!(device_ids(&hub), [json!("host")]);

    // The same entry with valid twin data is a plain create, not DeviceAlreadyExists.
    let applied =
        hub.bulk(&[entry(json!({"id": "d1", "importMode": "create", "tags": {"a": 1}}))], t0()).unwrap();
    assert!(applied.value.is_successful, "{:?}", applied.value);
    assert_eq!(applied.events.len(), 1);
    assert_eq!(hub.device_twin(&id("d1")).unwrap()["tags"], json!({"a": 1}));
    assert_eq!(device_ids(&hub), [json!("d1"), json!("host")]);
}

#[test]
fn an_import_line_with_invalid_twin_data_is_logged_and_creates_nothing() {
    let hub = hub();
    let mut job = ImportJob::new("imp", JobProperties::default());
    job.start(t0()).unwrap();
    let bad = r#"{"id":"i1","importMode":"create","tags":{"a.b":1}}"#;
    let outcome = job.import_line(hub.registry(), bad, hub.core(), t0()).unwrap();
    let logged = outcome.error.expect("the line is logged as failed");
    assert_eq!(logged.error_code, HubErrorCode::ArgumentInvalid.code());
    assert!(outcome.events.is_empty());
    assert!(hub.registry().device(&id("i1")).is_err());

    // A later import (one job refuses an id it saw twice) creates it as the line says.
    let mut job = ImportJob::new("imp-2", JobProperties::default());
    job.start(t0()).unwrap();
    let good = r#"{"id":"i1","importMode":"create","tags":{"a":1}}"#;
    let outcome = job.import_line(hub.registry(), good, hub.core(), t0()).unwrap();
    assert!(outcome.error.is_none(), "{outcome:?}");
    let events = hub.settle_lifecycle(outcome.events, t0()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["tags"], json!({"a": 1}));
    assert_eq!(device_ids(&hub), [json!("i1")]);
}

/// Twins whose writes fail, as a store that is down.
#[derive(Default)]
struct DownTwins(MemoryTwinStore);

impl TwinStore for DownTwins {
    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        self.0.twin(key)
    }
    fn put_twin(&self, _: &TwinKey, _: &TwinDocument, _: &Precondition) -> Result<(), StoreError> {
        Err(StoreError::Backend("the twin store is down".into()))
    }
    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        self.0.delete_twin(key, pre)
    }
    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        self.0.twins(page)
    }
    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        self.0.device_twins(device_id)
    }
}

#[test]
fn a_bulk_create_whose_twin_write_fails_takes_its_identity_back() {
    let hub = EmbeddedHub::new(
        "plant.example.net",
        MemoryIdentityStore::new(),
        DownTwins::default(),
        MemoryJobStore::new(),
        Arc::new(RingCrypto::new()),
        JobLimits::default(),
    )
    .unwrap();
    let applied =
        hub.bulk(&[entry(json!({"id": "d1", "importMode": "create", "tags": {"a": 1}}))], t0()).unwrap();
    assert!(!applied.value.is_successful);
    assert!(applied.events.is_empty());
    assert!(hub.registry().device(&id("d1")).is_err(), "the identity without its twin stayed");
}

#[test]
fn a_bulk_update_with_invalid_twin_data_changes_no_identity() {
    let hub = hub();
    hub.create_device(Device::new(id("d1")), None, None, t0()).unwrap();
    let before = hub.registry().device(&id("d1")).unwrap();
    let etag = before.etag.clone().unwrap();
    for bad in [
        json!({"id": "d1", "importMode": "update", "status": "disabled", "tags": {"a.b": 1}}),
        json!({"id": "d1", "importMode": "updateIfMatchETag", "eTag": etag.to_string(),
               "status": "disabled", "tags": {"a.b": 1}}),
        json!({"id": "d1", "importMode": "createOrUpdate", "status": "disabled", "tags": {"a.b": 1}}),
        json!({"id": "d1", "importMode": "createOrUpdateIfMatchETag", "eTag": etag.to_string(),
               "status": "disabled", "tags": {"a.b": 1}}),
    ] {
        let applied = hub.bulk(&[entry(bad.clone())], t0()).unwrap();
        assert!(!applied.value.is_successful, "{bad}");
        assert_eq!(applied.value.errors[0].error_code, HubErrorCode::ArgumentInvalid, "{bad}");
        // Refused for its twin data, the entry changed nothing: same status, keys and etag.
        assert_eq!(hub.registry().device(&id("d1")).unwrap(), before, "{bad}");
    }
}
