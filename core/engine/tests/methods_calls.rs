//! Direct methods: what a back end sees when it invokes a method on online, offline and slow
//! devices, and what the device sees on its topics (hub spec §6.6, §7).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::jobs::methods::{
    target_not_found, DeviceMethodRequest, MethodTarget, MAX_METHOD_PAYLOAD_BYTES,
};
use zerotouch_engine::jobs::{MethodCalls, MethodFailure, MethodInvocation};
use zerotouch_engine::registry::SessionId;
use zerotouch_proto::jobs::{CloudToDeviceMethod, HubErrorCode};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn device(id: &str) -> MethodTarget {
    MethodTarget::device(DeviceId::new(id).unwrap())
}

fn table() -> MethodCalls {
    MethodCalls::new(&RingCrypto::new()).unwrap()
}

fn wire(name: &str, payload: Value, response: Option<i64>, connect: Option<i64>) -> CloudToDeviceMethod {
    CloudToDeviceMethod {
        method_name: name.into(),
        payload,
        response_timeout_in_seconds: response,
        connect_timeout_in_seconds: connect,
    }
}

#[test]
fn a_method_to_an_online_device_returns_its_status_and_payload() {
    let mut calls = table();
    let dev = device("thermostat-1");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    let body: CloudToDeviceMethod = serde_json::from_str(
        r#"{"methodName":"reboot","payload":{"input1":"x"},
            "responseTimeoutInSeconds":30,"connectTimeoutInSeconds":0}"#,
    )
    .unwrap();
    let call = calls.invoke(t0(), dev.clone(), MethodInvocation::from_wire(&body).unwrap());

    let delivery = calls.poll_transmit().expect("delivered at once");
    assert_eq!(delivery.call, call);
    assert_eq!(delivery.target, dev);
    assert_eq!(delivery.topic, format!("$iothub/methods/POST/reboot/?$rid={}", delivery.rid));
    assert!(delivery.rid.bytes().all(|b| b.is_ascii_hexdigit()), "rid is URL-safe: {}", delivery.rid);

    // The device side parses the publish and answers on the response topic.
    let request = DeviceMethodRequest::from_publish(&delivery.topic, &delivery.body).unwrap();
    assert_eq!(request.name, "reboot");
    assert_eq!(request.payload, json!({"input1": "x"}));
    let (topic, answer) = request.respond(200, &json!("Reboot started"));
    assert_eq!(topic, format!("$iothub/methods/res/200/?$rid={}", delivery.rid));

    assert_eq!(calls.poll_event(), None);
    let done = calls.handle_device_publish(t0() + secs(1), &dev, &topic, &answer).unwrap();
    assert_eq!(done, call);
    let event = calls.poll_event().unwrap();
    let result = event.outcome.unwrap();
    assert_eq!(serde_json::to_value(&result).unwrap(), json!({"status": 200, "payload": "Reboot started"}));
    assert_eq!(calls.pending(), 0);
    assert_eq!(calls.poll_timeout(), None);
}

#[test]
fn a_device_error_status_is_still_a_successful_call() {
    let mut calls = table();
    let dev = device("d1");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    calls.invoke(t0(), dev.clone(), MethodInvocation::new("setLed", json!(true)).unwrap());
    let d = calls.poll_transmit().unwrap();
    calls.handle_device_response(t0(), &dev, &d.rid, 501, br#"{"error":"no led"}"#).unwrap();
    let result = calls.poll_event().unwrap().outcome.unwrap();
    assert_eq!(result.status, 501);
    assert_eq!(result.payload, json!({"error": "no led"}));
}

#[test]
fn a_method_to_an_offline_device_times_out_with_404103() {
    let mut calls = table();
    let dev = device("sleepy");
    let call = calls.invoke(t0(), dev.clone(), MethodInvocation::new("reboot", Value::Null).unwrap());
    assert_eq!(calls.poll_transmit(), None, "nothing is published to an offline device");

    let event = calls.poll_event().expect("connect timeout 0 fails at once");
    assert_eq!(event.call, call);
    let failure = event.outcome.unwrap_err();
    assert_eq!(failure, MethodFailure::DeviceNotOnline { connect_timeout: Duration::ZERO });
    assert_eq!(failure.code(), HubErrorCode::DeviceNotOnline);
    assert_eq!(failure.code().http_status(), 404);

    let body = serde_json::to_value(failure.to_body(t0(), "abc")).unwrap();
    assert_eq!(
        body,
        json!({
            "errorCode": 404103,
            "trackingId": "abc",
            "message": "Timed out waiting for device to connect.",
            "info": {"timeout": "00:00:00"},
            "timestampUtc": "2023-11-14T22:13:20.0000000Z"
        })
    );
    let wire = failure.to_error().to_wire();
    assert_eq!((wire.http_status, wire.error_code), (404, 404103));
}

#[test]
fn a_device_that_connects_within_the_connect_timeout_gets_the_call() {
    let mut calls = table();
    let dev = device("late-riser");
    let inv = MethodInvocation::new("getTemp", Value::Null).unwrap().with_connect_timeout(secs(30)).unwrap();
    calls.invoke(t0(), dev.clone(), inv);
    assert_eq!(calls.poll_timeout(), Some(t0() + secs(30)));
    calls.handle_timeout(t0() + secs(10));
    assert_eq!(calls.poll_event(), None);

    calls.handle_device_connected(t0() + secs(10), dev.clone(), SessionId::new(1));
    let d = calls.poll_transmit().expect("delivered on connect");
    // From delivery on, the response timeout (default 30 s) counts.
    assert_eq!(calls.poll_timeout(), Some(t0() + secs(40)));
    calls.handle_device_response(t0() + secs(12), &dev, &d.rid, 200, b"21.5").unwrap();
    assert_eq!(calls.poll_event().unwrap().outcome.unwrap().payload, json!(21.5));
}

#[test]
fn a_device_that_stays_offline_past_the_connect_timeout_yields_404103_with_the_timeout() {
    let mut calls = table();
    let dev = device("never");
    let inv = MethodInvocation::new("reboot", Value::Null).unwrap().with_connect_timeout(secs(15)).unwrap();
    calls.invoke(t0(), dev, inv);
    calls.handle_timeout(t0() + secs(14));
    assert_eq!(calls.poll_event(), None);
    calls.handle_timeout(t0() + secs(15));
    let failure = calls.poll_event().unwrap().outcome.unwrap_err();
    assert_eq!(failure.info()["timeout"], "00:00:15");
    assert_eq!(failure.code().code(), 404103);
}

#[test]
fn a_slow_device_response_yields_504101_and_the_late_answer_is_dropped() {
    let mut calls = table();
    let dev = device("slow");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    let inv = MethodInvocation::new("calibrate", json!({})).unwrap().with_response_timeout(secs(5)).unwrap();
    calls.invoke(t0(), dev.clone(), inv);
    let d = calls.poll_transmit().unwrap();
    assert_eq!(calls.poll_timeout(), Some(t0() + secs(5)));
    calls.handle_timeout(t0() + secs(5));

    let failure = calls.poll_event().unwrap().outcome.unwrap_err();
    assert_eq!(failure, MethodFailure::GatewayTimeout { response_timeout: secs(5) });
    assert_eq!(failure.message(), "Timed out waiting for the response from device.");
    let wire = failure.to_error().to_wire();
    assert_eq!((wire.http_status, wire.error_code), (504, 504101));

    assert!(calls.handle_device_response(t0() + secs(6), &dev, &d.rid, 200, b"{}").is_err());
    assert_eq!(calls.poll_event(), None);
}

#[test]
fn a_device_that_drops_after_delivery_is_still_waited_for() {
    let mut calls = table();
    let dev = device("flaky");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    calls.invoke(t0(), dev.clone(), MethodInvocation::new("m", Value::Null).unwrap());
    let d = calls.poll_transmit().unwrap();
    calls.handle_device_disconnected(t0() + secs(1), &dev, SessionId::new(1));
    assert!(!calls.is_online(&dev));
    calls.handle_device_response(t0() + secs(2), &dev, &d.rid, 200, b"").unwrap();
    assert_eq!(calls.poll_event().unwrap().outcome.unwrap().payload, Value::Null);
}

#[test]
fn timeouts_outside_the_documented_bounds_are_rejected_with_400004() {
    for response in [4, 301, -1] {
        let err = MethodInvocation::from_wire(&wire("m", Value::Null, Some(response), None)).unwrap_err();
        let w = err.to_wire();
        assert_eq!((w.http_status, w.error_code), (400, 400004));
        assert_eq!(w.message, "responseTimeoutInSeconds must be within [5; 300].");
    }
    for ok in [5, 300] {
        assert!(MethodInvocation::from_wire(&wire("m", Value::Null, Some(ok), Some(300))).is_ok());
    }
    for connect in [301, -1] {
        let w =
            MethodInvocation::from_wire(&wire("m", Value::Null, None, Some(connect))).unwrap_err().to_wire();
        assert_eq!(w.error_code, 400004);
        assert_eq!(w.message, "connectTimeoutInSeconds must be within [0; 300].");
    }
    let defaults = MethodInvocation::from_wire(&wire("m", Value::Null, None, None)).unwrap();
    assert_eq!((defaults.response_timeout(), defaults.connect_timeout()), (secs(30), Duration::ZERO));
}

#[test]
fn a_payload_over_128_kb_is_rejected_with_413001() {
    // A JSON string of n characters serializes to n + 2 bytes.
    let fits = Value::String("a".repeat(MAX_METHOD_PAYLOAD_BYTES - 2));
    assert!(MethodInvocation::new("upload", fits).is_ok());
    let too_big = Value::String("a".repeat(MAX_METHOD_PAYLOAD_BYTES - 1));
    let w = MethodInvocation::new("upload", too_big).unwrap_err().to_wire();
    assert_eq!((w.http_status, w.error_code), (413, 413001));
}

#[test]
fn method_names_with_reserved_characters_are_rejected() {
    for bad in ["a b", "a/b", "$reboot", "a?b", "a=b", "a{b", "ä", "tab\there"] {
        let w = MethodInvocation::new(bad, Value::Null).unwrap_err().to_wire();
        assert_eq!(w.error_code, 400004, "{bad:?}");
    }
    assert_eq!(MethodInvocation::new("", Value::Null).unwrap_err().to_wire().error_code, 400005);
    for good in ["reboot", "fw-update_2.0", "a#b", "x+y", "50%", "~!*'&|^`"] {
        assert!(MethodInvocation::new(good, Value::Null).is_ok(), "{good:?}");
    }
}

#[test]
fn method_names_with_topic_wildcards_reach_the_device_unchanged() {
    let mut calls = table();
    let dev = device("d");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    calls.invoke(t0(), dev, MethodInvocation::new("set#1+50%", Value::Null).unwrap());
    let d = calls.poll_transmit().unwrap();
    assert!(!d.topic.contains('#') && !d.topic.contains('+'), "{}", d.topic);
    assert_eq!(DeviceMethodRequest::from_publish(&d.topic, &d.body).unwrap().name, "set#1+50%");
}

#[test]
fn a_device_cannot_answer_another_devices_request() {
    let mut calls = table();
    let (a, b) = (device("a"), device("b"));
    calls.handle_device_connected(t0(), a.clone(), SessionId::new(1));
    calls.handle_device_connected(t0(), b.clone(), SessionId::new(1));
    calls.invoke(t0(), a.clone(), MethodInvocation::new("m", Value::Null).unwrap());
    let d = calls.poll_transmit().unwrap();
    assert!(calls.handle_device_response(t0(), &b, &d.rid, 200, b"{}").is_err());
    assert!(calls.handle_device_response(t0(), &a, &d.rid, 200, b"{}").is_ok());
}

#[test]
fn a_non_json_device_answer_comes_back_as_a_string() {
    let mut calls = table();
    let dev = device("d");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    calls.invoke(t0(), dev.clone(), MethodInvocation::new("m", Value::Null).unwrap());
    let d = calls.poll_transmit().unwrap();
    calls.handle_device_response(t0(), &dev, &d.rid, 200, b"not json").unwrap();
    assert_eq!(calls.poll_event().unwrap().outcome.unwrap().payload, json!("not json"));
}

#[test]
fn a_python_service_call_without_payload_delivers_an_empty_string() {
    let mut calls = table();
    let dev = device("d");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    let body: CloudToDeviceMethod = serde_json::from_str(r#"{"methodName":"ping","payload":""}"#).unwrap();
    calls.invoke(t0(), dev, MethodInvocation::from_wire(&body).unwrap());
    assert_eq!(calls.poll_transmit().unwrap().body, b"\"\"");
}

#[test]
fn module_methods_go_to_the_module_session_only() {
    let mut calls = table();
    let dev = DeviceId::new("edge-1").unwrap();
    let module = MethodTarget::module(dev.clone(), ModuleId::new("camera").unwrap());
    calls.handle_device_connected(t0(), MethodTarget::device(dev), SessionId::new(1));
    let inv = MethodInvocation::new("snap", Value::Null).unwrap().with_connect_timeout(secs(10)).unwrap();
    calls.invoke(t0(), module.clone(), inv);
    assert_eq!(calls.poll_transmit(), None, "the device session is not the module session");
    calls.handle_device_connected(t0() + secs(1), module.clone(), SessionId::new(1));
    assert_eq!(calls.poll_transmit().unwrap().target, module);
}

#[test]
fn many_calls_expire_in_deadline_order() {
    let mut calls = table();
    let dev = device("d");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    let mut ids = Vec::new();
    for s in [30u64, 5, 17] {
        let inv = MethodInvocation::new("m", Value::Null).unwrap().with_response_timeout(secs(s)).unwrap();
        ids.push(calls.invoke(t0(), dev.clone(), inv));
    }
    calls.handle_timeout(t0() + secs(300));
    let order: Vec<_> = std::iter::from_fn(|| calls.poll_event()).map(|e| e.call).collect();
    assert_eq!(order, vec![ids[1], ids[2], ids[0]]);
}

#[test]
fn a_method_to_an_unknown_or_disabled_device_is_404001_and_to_a_missing_module_404010() {
    let w = target_not_found(&device("ghost"), false).to_wire();
    assert_eq!((w.http_status, w.error_code), (404, 404001));
    let module = MethodTarget::module(DeviceId::new("edge").unwrap(), ModuleId::new("nope").unwrap());
    assert_eq!(target_not_found(&module, true).to_wire().error_code, 404010);
}

#[test]
fn a_404103_is_sent_over_rest_as_the_stringified_numeric_envelope() {
    let failure = MethodFailure::DeviceNotOnline { connect_timeout: secs(90) };
    let outer = failure.to_body(t0(), "trk").wrapped_for_rest();
    let inner: Value = serde_json::from_str(outer["Message"].as_str().unwrap()).unwrap();
    assert_eq!(inner["errorCode"], 404103);
    assert_eq!(inner["info"]["timeout"], "00:01:30");
    assert_eq!(outer["ExceptionMessage"], "");
}

#[test]
fn a_reconnect_that_replaces_a_session_keeps_the_device_online_when_the_old_one_closes() {
    let mut calls = table();
    let dev = device("roamer");
    calls.handle_device_connected(t0(), dev.clone(), SessionId::new(1));
    // The same client id connects again (NAT timeout, network change): the hub kicks session 1,
    // and the transport reports its close after the new session's connect.
    calls.handle_device_connected(t0() + secs(1), dev.clone(), SessionId::new(2));
    calls.handle_device_disconnected(t0() + secs(1), &dev, SessionId::new(1));
    assert!(calls.is_online(&dev));
    calls.invoke(t0() + secs(2), dev.clone(), MethodInvocation::new("reboot", Value::Null).unwrap());
    assert_eq!(calls.poll_transmit().expect("delivered to the live session").target, dev);
    assert_eq!(calls.poll_event(), None);

    // The live session closing takes the device offline.
    calls.handle_device_disconnected(t0() + secs(3), &dev, SessionId::new(2));
    assert!(!calls.is_online(&dev));
}
