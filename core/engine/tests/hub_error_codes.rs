//! Twin and query failures carry the IoT Hub error of the spec's table (hub spec §1.4), and the
//! numeric code (`to_wire`) agrees with the name (`hub_error_code`, envelope A).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use serde_json::json;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::registry::{error_envelope, hub_error_code};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinOperation;
use zerotouch_engine::Error;
use zerotouch_proto::hub::{Device, HubErrorCode, Module};
use zerotouch_proto::service::{AttestationMechanism, IndividualEnrollment};
use zerotouch_proto::{DeviceId, IfMatch, ModuleId, RegistrationId, Timestamp};

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// The error reports as `code` everywhere: name, numeric code, HTTP status and envelope.
#[track_caller]
fn reports_as(err: &Error, code: HubErrorCode) {
    assert_eq!(hub_error_code(err), code, "{err}");
    let wire = err.to_wire();
    assert_eq!((wire.http_status, wire.error_code), (code.http_status(), code.code()), "{err}");
    assert_eq!(error_envelope(err, "").code(), Some(code), "{err}");
}

fn tags_patch() -> TwinOperation {
    TwinOperation::Patch(serde_json::from_value(json!({"tags": {"a": 1}})).unwrap())
}

#[test]
fn twin_writes_fail_with_the_hub_codes_of_the_spec() {
    let hub = EmbeddedHub::in_memory("h.example", Arc::new(RingCrypto::new())).unwrap();
    let err = hub.update_twin(&id("ghost"), None, &tags_patch(), &IfMatch::Any, t0()).unwrap_err();
    reports_as(&err, HubErrorCode::DeviceNotFound);

    hub.create_device(Device::new(id("d")), None, None, t0()).unwrap();
    let ghost_module = ModuleId::new("ghost").unwrap();
    let err = hub.update_twin(&id("d"), Some(&ghost_module), &tags_patch(), &IfMatch::Any, t0()).unwrap_err();
    reports_as(&err, HubErrorCode::ModuleNotFound);

    let rep = TwinOperation::Reported(json!({"$version": 3}).as_object().unwrap().clone());
    let err = hub.update_twin(&id("d"), None, &rep, &IfMatch::Absent, t0()).unwrap_err();
    reports_as(&err, HubErrorCode::ArgumentInvalid);

    let deep = TwinOperation::Patch(serde_json::from_value(json!({"tags": {"a.b": 1}})).unwrap());
    let err = hub.update_twin(&id("d"), None, &deep, &IfMatch::Any, t0()).unwrap_err();
    reports_as(&err, HubErrorCode::ArgumentInvalid);

    let big = TwinOperation::Patch(
        serde_json::from_value(json!({"properties": {"desired": {"s": "x".repeat(5000)}}})).unwrap(),
    );
    let err = hub.update_twin(&id("d"), None, &big, &IfMatch::Any, t0()).unwrap_err();
    reports_as(&err, HubErrorCode::ArgumentInvalid);

    let err = hub.update_twin(&id("d"), None, &tags_patch(), &IfMatch::Tag("nope".into()), t0()).unwrap_err();
    reports_as(&err, HubErrorCode::PreconditionFailed);

    // A module twin that exists takes writes as a device twin does.
    let module: Module = serde_json::from_value(json!({"deviceId": "d", "moduleId": "m"})).unwrap();
    hub.create_module(module, t0()).unwrap();
    let m = ModuleId::new("m").unwrap();
    hub.update_twin(&id("d"), Some(&m), &tags_patch(), &IfMatch::Any, t0()).unwrap();
}

#[test]
fn queries_that_do_not_parse_or_carry_a_foreign_token_fail_with_the_hub_codes() {
    let err: Error = parse("SELEC * FROM devices").unwrap_err().into();
    reports_as(&err, HubErrorCode::IotHubFormatError);
    assert!(err.to_wire().message.starts_with("The query is invalid"), "{}", err.to_wire().message);

    let hub = EmbeddedHub::in_memory("h.example", Arc::new(RingCrypto::new())).unwrap();
    let q = parse("SELECT * FROM devices").unwrap();
    let forged = PageRequest { continuation: Some("not a token".into()), max_items: 10 };
    let err = execute(&q, &hub, &forged).unwrap_err();
    reports_as(&err, HubErrorCode::ArgumentInvalid);
}

#[test]
fn an_enrollment_with_an_initial_twin_the_hub_would_refuse_is_still_a_dps_bad_request() {
    let store = MemoryStore::new();
    for (twin, text) in [
        (json!({"tags": {"a.b": 1}}), "initialTwin: invalid twin tags property `a.b`"),
        (json!({"tags": [1]}), "initialTwin tags must be a JSON object"),
    ] {
        let mut e = IndividualEnrollment::new(
            RegistrationId::new("dev-1").unwrap(),
            AttestationMechanism::symmetric_key(),
        );
        e.initial_twin = Some(serde_json::from_value(twin).unwrap());
        let err =
            enrollments::put_enrollment(&store, &RingCrypto::new(), t0(), e, &IfMatch::Absent).unwrap_err();
        let wire = err.to_wire();
        assert_eq!((wire.http_status, wire.error_code), (400, 400_000), "{err}");
        assert!(wire.message.starts_with(text), "{}", wire.message);
    }
}
