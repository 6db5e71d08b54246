//! The If-Match matrix of hub spec §1.3: create / update / delete × no header / `*` / `"*"` /
//! right etag / wrong etag / missing device, for devices and modules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_support;

use registry_support::*;
use zerotouch_engine::registry::{hub_error_code, MemoryIdentityStore, Registry};
use zerotouch_engine::Error;
use zerotouch_proto::hub::{Device, DeviceStatus, HubErrorCode, Module};
use zerotouch_proto::IfMatch;

fn header(value: &str) -> IfMatch {
    IfMatch::from_header(Some(value))
}

fn code(err: Error) -> HubErrorCode {
    hub_error_code(&err)
}

fn with_device(name: &str) -> (Registry<MemoryIdentityStore>, Device) {
    let reg = registry();
    let d = reg.create_device(Device::new(id(name)), now()).unwrap().value;
    (reg, d)
}

fn disabled(d: &Device) -> Device {
    let mut body = d.clone();
    body.status = DeviceStatus::Disabled;
    body
}

#[test]
fn put_without_if_match_creates_a_new_device() {
    let reg = registry();
    let out = reg.put_device(&id("dev1"), Device::new(id("dev1")), &IfMatch::Absent, now()).unwrap();
    assert_eq!(out.value.device_id.as_str(), "dev1");
    assert_eq!(out.events.len(), 1);
    assert_eq!(reg.device(&id("dev1")).unwrap(), out.value);
}

#[test]
fn put_without_if_match_on_existing_device_is_409_device_already_exists() {
    let (reg, _) = with_device("dev1");
    let err = reg.put_device(&id("dev1"), Device::new(id("dev1")), &IfMatch::Absent, now()).unwrap_err();
    assert_eq!(err.to_wire().http_status, 409);
    assert_eq!(err.to_wire().error_code, 409001);
    assert_eq!(code(err), HubErrorCode::DeviceAlreadyExists);
}

#[test]
fn put_with_bare_and_quoted_wildcard_updates_any_version() {
    for wildcard in ["*", "\"*\""] {
        let (reg, d) = with_device("dev1");
        let out = reg.put_device(&id("dev1"), disabled(&d), &header(wildcard), later(1)).unwrap();
        assert_eq!(out.value.status, DeviceStatus::Disabled, "If-Match {wildcard}");
        assert_ne!(out.value.etag, d.etag);
        assert!(out.events.is_empty(), "an update is no lifecycle event");
    }
}

#[test]
fn put_with_wildcard_on_missing_device_is_404_device_not_found() {
    for wildcard in ["*", "\"*\""] {
        let reg = registry();
        let err =
            reg.put_device(&id("ghost"), Device::new(id("ghost")), &header(wildcard), now()).unwrap_err();
        assert_eq!(err.to_wire().http_status, 404);
        assert_eq!(code(err), HubErrorCode::DeviceNotFound);
    }
}

#[test]
fn put_with_the_right_etag_updates_in_every_spelling() {
    let (reg, d) = with_device("dev1");
    let bare = d.etag.clone().unwrap().as_str().to_owned();
    let mut current = d;
    for form in [format!("\"{bare}\""), bare.clone(), format!("W/\"{bare}\"")] {
        // Each update changes the etag, so build the header from the latest one.
        let tag = current.etag.clone().unwrap().as_str().to_owned();
        let form = form.replace(&bare, &tag);
        let mut body = current.clone();
        body.status_reason = Some(format!("via {form}"));
        current = reg.put_device(&id("dev1"), body, &header(&form), later(1)).unwrap().value;
        assert_eq!(current.status_reason.as_deref(), Some(format!("via {form}").as_str()));
    }
}

#[test]
fn put_with_a_wrong_etag_is_412_precondition_failed_and_changes_nothing() {
    let (reg, d) = with_device("dev1");
    let err = reg.put_device(&id("dev1"), disabled(&d), &header("\"MTIz\""), later(1)).unwrap_err();
    assert_eq!(err.to_wire().http_status, 412);
    assert_eq!(err.to_wire().error_code, 412001);
    assert_eq!(code(err), HubErrorCode::PreconditionFailed);
    assert_eq!(reg.device(&id("dev1")).unwrap(), d);
}

#[test]
fn put_with_an_etag_on_missing_device_is_404() {
    let reg = registry();
    let err = reg.put_device(&id("ghost"), Device::new(id("ghost")), &header("\"MTIz\""), now()).unwrap_err();
    assert_eq!(code(err), HubErrorCode::DeviceNotFound);
}

#[test]
fn put_with_a_stale_etag_after_an_update_is_412() {
    let (reg, d) = with_device("dev1");
    let stale = format!("\"{}\"", d.etag.clone().unwrap());
    reg.put_device(&id("dev1"), disabled(&d), &header(&stale), later(1)).unwrap();
    let err = reg.put_device(&id("dev1"), d, &header(&stale), later(2)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::PreconditionFailed);
}

#[test]
fn delete_without_if_match_and_with_wildcards_is_unconditional() {
    for h in [None, Some("*"), Some("\"*\"")] {
        let (reg, _) = with_device("dev1");
        let out = reg.delete_device(&id("dev1"), &IfMatch::from_header(h), later(1)).unwrap();
        assert_eq!(out.value.device_id.as_str(), "dev1");
        assert_eq!(code(reg.device(&id("dev1")).unwrap_err()), HubErrorCode::DeviceNotFound, "{h:?}");
    }
}

#[test]
fn delete_with_the_right_etag_deletes_and_a_wrong_one_is_412() {
    let (reg, d) = with_device("dev1");
    let err = reg.delete_device(&id("dev1"), &header("\"bm9wZQ==\""), later(1)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::PreconditionFailed);
    assert!(reg.device(&id("dev1")).is_ok());
    let right = format!("W/\"{}\"", d.etag.unwrap());
    reg.delete_device(&id("dev1"), &header(&right), later(2)).unwrap();
    assert!(reg.device(&id("dev1")).is_err());
}

#[test]
fn delete_of_a_missing_device_is_404_in_every_header_form() {
    for h in [None, Some("*"), Some("\"*\""), Some("\"MTIz\"")] {
        let reg = registry();
        let err = reg.delete_device(&id("ghost"), &IfMatch::from_header(h), now()).unwrap_err();
        assert_eq!(err.to_wire().http_status, 404);
        assert_eq!(code(err), HubErrorCode::DeviceNotFound, "{h:?}");
    }
}

#[test]
fn device_ids_are_case_sensitive() {
    let (reg, _) = with_device("Dev1");
    assert_eq!(code(reg.device(&id("dev1")).unwrap_err()), HubErrorCode::DeviceNotFound);
    reg.create_device(Device::new(id("dev1")), now()).unwrap();
    assert_eq!(reg.statistics().unwrap().total_device_count, 2);
}

fn module(device: &str, module: &str) -> Module {
    Module::new(id(device), mid(module))
}

#[test]
fn module_put_follows_the_same_matrix() {
    let (reg, _) = with_device("edge1");
    let m = reg
        .put_module(&id("edge1"), &mid("m1"), module("edge1", "m1"), &IfMatch::Absent, now())
        .unwrap()
        .value;

    let err =
        reg.put_module(&id("edge1"), &mid("m1"), module("edge1", "m1"), &IfMatch::Absent, now()).unwrap_err();
    assert_eq!(err.to_wire().error_code, 409301);
    assert_eq!(code(err), HubErrorCode::ModuleAlreadyExistsOnDevice);

    for wildcard in ["*", "\"*\""] {
        let mut body = reg.module(&id("edge1"), &mid("m1")).unwrap();
        body.managed_by = Some(format!("by {wildcard}"));
        let out = reg.put_module(&id("edge1"), &mid("m1"), body, &header(wildcard), later(1)).unwrap();
        assert_eq!(out.value.managed_by.as_deref(), Some(format!("by {wildcard}").as_str()));
    }

    let err =
        reg.put_module(&id("edge1"), &mid("m1"), m.clone(), &header("\"stale\""), later(2)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::PreconditionFailed);

    let current = reg.module(&id("edge1"), &mid("m1")).unwrap();
    let right = format!("\"{}\"", current.etag.clone().unwrap());
    reg.put_module(&id("edge1"), &mid("m1"), current, &header(&right), later(3)).unwrap();

    let err =
        reg.put_module(&id("edge1"), &mid("m2"), module("edge1", "m2"), &header("*"), now()).unwrap_err();
    assert_eq!(code(err), HubErrorCode::ModuleNotFound);
    let err =
        reg.put_module(&id("ghost"), &mid("m1"), module("ghost", "m1"), &IfMatch::Absent, now()).unwrap_err();
    assert_eq!(code(err), HubErrorCode::DeviceNotFound);
}

#[test]
fn module_delete_follows_the_same_matrix() {
    let (reg, _) = with_device("edge1");
    let m = reg.create_module(module("edge1", "m1"), now()).unwrap().value;
    let err = reg.delete_module(&id("edge1"), &mid("m1"), &header("\"wrong\""), later(1)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::PreconditionFailed);
    let right = format!("\"{}\"", m.etag.unwrap());
    reg.delete_module(&id("edge1"), &mid("m1"), &header(&right), later(2)).unwrap();
    let err = reg.delete_module(&id("edge1"), &mid("m1"), &header("\"*\""), later(3)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::ModuleNotFound);
    let err = reg.delete_module(&id("ghost"), &mid("m1"), &IfMatch::Absent, later(3)).unwrap_err();
    assert_eq!(code(err), HubErrorCode::DeviceNotFound);
}
