//! Twin writes the caller gets no `TwinOutcome` for (scheduled twin jobs, twin data of bulk and
//! import entries, the twin reset of reprovisioning) still hand their desired pushes and change
//! notifications to the transport, through `EmbeddedHub::take_twin_events`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use serde_json::{json, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubRegistry, ProvisionedDevice, TwinSetup};
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::registry::ImportJob;
use zerotouch_engine::twin::{TwinEvent, TwinOperation};
use zerotouch_proto::hub::{Device, ExportImportDevice, JobProperties};
use zerotouch_proto::jobs::JobRequest;
use zerotouch_proto::service::InitialTwin;
use zerotouch_proto::twin::TwinChangeOperation;
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};

const HUB: &str = "plant.example.net";

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

fn hub() -> EmbeddedHub {
    EmbeddedHub::in_memory(HUB, Arc::new(RingCrypto::new())).unwrap()
}

/// `(device, desired $version, desired patch)` of each desired push, in order.
fn pushes(events: &[TwinEvent]) -> Vec<(String, u64, Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            TwinEvent::DesiredPropertiesChanged(d) => {
                Some((d.device_id.to_string(), d.version, Value::Object(d.patch.patch.clone())))
            }
            TwinEvent::TwinChanged(_) => None,
        })
        .collect()
}

/// `(device, operation)` of each change notification, in order.
fn notifications(events: &[TwinEvent]) -> Vec<(String, TwinChangeOperation)> {
    events
        .iter()
        .filter_map(|e| match e {
            TwinEvent::TwinChanged(n) => Some((n.device_id.to_string(), n.operation)),
            TwinEvent::DesiredPropertiesChanged(_) => None,
        })
        .collect()
}

#[test]
fn a_scheduled_twin_update_pushes_desired_and_notifies_like_a_service_patch() {
    let mut hub = hub();
    hub.create_device(Device::new(id("d1")), None, None, t0()).unwrap();
    let req: JobRequest = serde_json::from_value(json!({
        "jobId": "j", "type": "scheduleUpdateTwin", "queryCondition": "*",
        "updateTwin": {"etag": "*", "properties": {"desired": {"x": 1}}},
    }))
    .unwrap();
    hub.create_job(t0(), "j", &req).unwrap();
    hub.run_jobs(t0()).unwrap();
    assert_eq!(hub.device_twin(&id("d1")).unwrap()["properties"]["desired"]["x"], 1);

    let events = hub.take_twin_events();
    assert_eq!(pushes(&events), [("d1".to_owned(), 2, json!({"x": 1}))]);
    assert_eq!(notifications(&events), [("d1".to_owned(), TwinChangeOperation::UpdateTwin)]);
    assert!(hub.take_twin_events().is_empty(), "taken once");

    // The REST path returns the same kind of events to its caller and queues nothing.
    let patch = serde_json::from_value(json!({"properties": {"desired": {"x": 2}}})).unwrap();
    let out = hub.update_twin(&id("d1"), None, &TwinOperation::Patch(patch), &IfMatch::Any, t0()).unwrap();
    assert_eq!(pushes(&out.events), [("d1".to_owned(), 3, json!({"x": 2}))]);
    assert!(hub.take_twin_events().is_empty());
}

#[test]
fn twin_data_of_bulk_and_import_entries_reaches_the_transport() {
    let hub = hub();
    hub.create_device(Device::new(id("b1")), None, None, t0()).unwrap();
    let entries: Vec<ExportImportDevice> = serde_json::from_value(json!([{
        "id": "b1", "importMode": "updateTwin",
        "tags": {"zone": "south"},
        "properties": {"desired": {"mode": "eco"}},
    }]))
    .unwrap();
    assert!(hub.bulk(&entries, t0()).unwrap().value.is_successful);
    let events = hub.take_twin_events();
    assert_eq!(pushes(&events).iter().map(|p| p.2.clone()).collect::<Vec<_>>(), [json!({"mode": "eco"})]);
    assert!(!notifications(&events).is_empty());

    let mut job = ImportJob::new("imp", JobProperties::default());
    job.start(t0()).unwrap();
    let line = r#"{"id":"b1","importMode":"updateTwin","properties":{"desired":{"mode":"max"}}}"#;
    let outcome = job.import_line(hub.registry(), line, hub.core(), t0()).unwrap();
    assert!(outcome.error.is_none(), "{outcome:?}");
    let events = hub.take_twin_events();
    assert_eq!(pushes(&events).iter().map(|p| p.2.clone()).collect::<Vec<_>>(), [json!({"mode": "max"})]);
}

fn provision(hub: &mut EmbeddedHub, twin: TwinSetup) {
    let device = ProvisionedDevice {
        device_id: id("r1"),
        auth: DeviceAuth::SymmetricKey {
            primary_key: "cHJpbWFyeS1rZXktb2YtdGhlLWRldmljZQ==".to_owned(),
            secondary_key: "c2Vjb25kYXJ5LWtleS1vZi10aGUtZGV2aWNl".to_owned(),
        },
        iot_edge: false,
    };
    hub.apply_at(&HubAction::Provision { hub: HUB.into(), device, twin }, t0()).unwrap();
}

fn initial(desired: Value) -> InitialTwin {
    serde_json::from_value(json!({"properties": {"desired": desired}})).unwrap()
}

#[test]
fn reprovisioning_with_reset_pushes_the_reset_desired_properties() {
    let mut hub = hub();
    provision(&mut hub, TwinSetup::KeepOrInitial(initial(json!({"mode": "a"}))));
    assert!(hub.take_twin_events().is_empty(), "a new identity is announced by its lifecycle event");

    provision(&mut hub, TwinSetup::Reset(initial(json!({"mode": "b"}))));
    let events = hub.take_twin_events();
    assert_eq!(pushes(&events).iter().map(|p| p.2["mode"].clone()).collect::<Vec<_>>(), [json!("b")]);
    assert!(notifications(&events).contains(&("r1".to_owned(), TwinChangeOperation::ReplaceTwin)));

    // Inside a unit the events wait for it; the in-memory twin store is not part of the unit,
    // so its write stands and is announced even when the unit rolls back.
    hub.begin_unit();
    provision(&mut hub, TwinSetup::Reset(initial(json!({"mode": "c"}))));
    assert!(hub.take_twin_events().is_empty(), "the unit may still roll back");
    hub.end_unit(false);
    assert!(!pushes(&hub.take_twin_events()).is_empty());

    // A host that delivers no twin events turns them off.
    hub.set_twin_events(false);
    provision(&mut hub, TwinSetup::Reset(initial(json!({"mode": "d"}))));
    assert!(hub.take_twin_events().is_empty());
}
