//! Lifecycle notifications for device and module identities (hub spec §4), with exact fields.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_support;

use std::sync::Arc;

use registry_support::*;
use serde_json::json;
use zerotouch_engine::registry::{
    LifecycleOperation, MemoryIdentityStore, ModuleEventStyle, Registry, RegistryConfig,
};
use zerotouch_proto::hub::{Device, Module};
use zerotouch_proto::IfMatch;

fn props(list: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    list.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn creating_a_device_emits_create_device_identity_with_exact_properties_and_twin_body() {
    let reg = registry();
    let out = reg.create_device(Device::new(id("sensor-1")), now()).unwrap();
    assert_eq!(out.events.len(), 1);
    let ev = &out.events[0];
    assert_eq!(ev.op_type, LifecycleOperation::CreateDeviceIdentity);
    assert_eq!(
        props(ev.application_properties()),
        pairs(&[
            ("hubName", HUB),
            ("deviceId", "sensor-1"),
            ("opType", "createDeviceIdentity"),
            ("iothub-message-schema", "deviceLifecycleNotification"),
            ("operationTimestamp", "2026-11-23T10:00:00.1234567Z"),
        ])
    );
    assert_eq!(
        props(ev.system_properties()),
        pairs(&[
            ("content-type", "application/json"),
            ("content-encoding", "utf-8"),
            ("iothub-message-source", "deviceLifecycleEvents"),
            ("iothub-connection-device-id", "sensor-1"),
            ("user-id", HUB),
        ])
    );
    let section = json!({"$metadata": {"$lastUpdated": "2026-11-23T10:00:00.1234567Z"}, "$version": 1});
    assert_eq!(
        ev.body,
        json!({"deviceId": "sensor-1", "etag": "AAAAAAAAAAE=", "version": 2,
               "properties": {"desired": section, "reported": section}})
    );
    let bytes: serde_json::Value = serde_json::from_slice(&ev.body_bytes()).unwrap();
    assert_eq!(bytes, ev.body);
}

#[test]
fn deleting_a_device_emits_delete_device_identity() {
    let reg = registry();
    reg.create_device(Device::new(id("sensor-1")), now()).unwrap();
    let out = reg.delete_device(&id("sensor-1"), &IfMatch::Any, later(60)).unwrap();
    let ev = &out.events[0];
    assert_eq!(ev.op_type, LifecycleOperation::DeleteDeviceIdentity);
    assert_eq!(ev.operation_timestamp, later(60));
    assert!(ev.application_properties().contains(&("opType", "deleteDeviceIdentity".to_owned())));
}

#[test]
fn module_events_default_to_device_events_with_a_module_id() {
    let reg = registry();
    reg.create_device(Device::new(id("gw")), now()).unwrap();
    let out = reg.create_module(Module::new(id("gw"), mid("filter")), now()).unwrap();
    let ev = &out.events[0];
    assert_eq!(ev.op_type, LifecycleOperation::CreateDeviceIdentity);
    assert_eq!(
        props(ev.application_properties()),
        pairs(&[
            ("hubName", HUB),
            ("deviceId", "gw"),
            ("moduleId", "filter"),
            ("opType", "createDeviceIdentity"),
            ("iothub-message-schema", "deviceLifecycleNotification"),
            ("operationTimestamp", "2026-11-23T10:00:00.1234567Z"),
        ])
    );
    assert!(ev.system_properties().contains(&("iothub-connection-module-id", "filter".to_owned())));
    assert_eq!(ev.body["moduleId"], "filter");
    assert_eq!(ev.body["deviceId"], "gw");
}

#[test]
fn module_events_in_the_older_documented_style() {
    let mut config = RegistryConfig::new(HUB);
    config.module_events = ModuleEventStyle::ModuleEvents;
    let reg = Registry::new(MemoryIdentityStore::new(), Arc::new(counting_crypto()), config);
    reg.create_device(Device::new(id("gw")), now()).unwrap();
    let created = reg.create_module(Module::new(id("gw"), mid("filter")), now()).unwrap();
    let ev = &created.events[0];
    assert_eq!(ev.op_type, LifecycleOperation::CreateModuleIdentity);
    assert_eq!(ev.message_source, "moduleLifecycleEvents");
    assert!(ev
        .application_properties()
        .contains(&("iothub-message-schema", "moduleLifecycleNotification".into())));
    let deleted = reg.delete_module(&id("gw"), &mid("filter"), &IfMatch::Any, later(1)).unwrap();
    assert_eq!(deleted.events[0].op_type, LifecycleOperation::DeleteModuleIdentity);
    // Device events keep the device labels in either style.
    let dev = reg.delete_device(&id("gw"), &IfMatch::Any, later(2)).unwrap();
    assert_eq!(dev.events[0].message_source, "deviceLifecycleEvents");
}

#[test]
fn the_twin_owner_can_replace_the_event_body() {
    let reg = registry();
    let ev = reg.create_device(Device::new(id("t1")), now()).unwrap().events.remove(0);
    let twin = json!({"deviceId": "t1", "etag": "AAAAAAAAAAI=", "version": 3, "tags": {"a": 1}});
    assert_eq!(ev.with_twin(twin.clone()).body, twin);
}
