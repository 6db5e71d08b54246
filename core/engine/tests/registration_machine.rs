//! The device registration state machine driven with hand-written DPS replies on a virtual clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::json;
use zerotouch_engine::crypto::{CryptoProvider as _, RandomFailure, RingCrypto};
use zerotouch_engine::registration::{
    DeviceCredential, FailureKind, Registration, RegistrationConfig, RegistrationEvent, RegistrationFailure,
    ServiceResponse, Transmit,
};
use zerotouch_proto::device::Substatus;
use zerotouch_proto::{IdScope, SasToken, Timestamp};
use zerotouch_testkit::crypto::RingWithRandom;

const SCOPE: &str = "0ne00111111";
const DEVICE: &str = "my-symkey-device";
/// Key of spec §4.5 vectors V3/V4.
const KEY: &str = "18RQk/hOPJR9EbsJlk2j8WA6vWaj/yi+oaYg7zmxfQNdOyMSu+SJ8O7TSlZhDJCYmn4rzEiVKIzNiVAWjLxrGA==";
const OP: &str = "5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550";
const HUB: &str = "MyExampleHub.azure-devices.net";

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn config() -> RegistrationConfig {
    RegistrationConfig::new(
        IdScope::new(SCOPE).unwrap(),
        DEVICE.parse().unwrap(),
        DeviceCredential::symmetric_key_base64(KEY).unwrap(),
    )
}

fn machine(config: RegistrationConfig) -> Registration {
    Registration::new(config, Arc::new(RingCrypto::new()))
}

/// A machine whose random source fills every byte with `random` (`None`: the source fails), so
/// that the jitter of retry waits is known.
fn machine_with_random(config: RegistrationConfig, random: Option<u8>) -> Registration {
    let crypto = RingWithRandom::new(move |out: &mut [u8]| {
        out.fill(random.ok_or(RandomFailure)?);
        Ok(())
    });
    Registration::new(config, Arc::new(crypto))
}

/// When the machine resends after a throttled reply at `replied`: checks that it is within
/// `replied + min ..= replied + max` and that nothing goes out before it.
fn resend_at(reg: &mut Registration, replied: Timestamp, min: Duration, max: Duration) -> Timestamp {
    let at = reg.poll_timeout().expect("a resend is scheduled");
    let wait = at.saturating_since(replied);
    assert!(min <= wait && wait <= max, "resend after {wait:?}, expected {min:?}..={max:?}");
    assert_eq!(reg.poll_transmit(at - Duration::from_nanos(1)), None, "sent before the wait ended");
    at
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn reply(status: u16, retry_after: Option<u64>, body: serde_json::Value) -> ServiceResponse {
    ServiceResponse { status, retry_after: retry_after.map(secs), body: body.to_string().into_bytes() }
}

fn assigning_register_reply() -> ServiceResponse {
    reply(202, Some(3), json!({"operationId": OP, "status": "assigning"}))
}

fn assigning_poll_reply() -> ServiceResponse {
    reply(
        202,
        Some(3),
        json!({"operationId": OP, "status": "assigning",
               "registrationState": {"registrationId": DEVICE, "status": "assigning"}}),
    )
}

fn assigned_body() -> serde_json::Value {
    json!({"operationId": OP, "status": "assigned", "registrationState": {
        "registrationId": DEVICE,
        "createdDateTimeUtc": "2022-08-27T17:53:19.5143497Z",
        "assignedHub": HUB,
        "deviceId": DEVICE,
        "status": "assigned",
        "substatus": "initialAssignment",
        "lastUpdatedDateTimeUtc": "2022-08-27T17:53:19.7519141Z",
        "etag": "IjEyMDA4NmYyLTAwMDAtMDMwMC0wMDAwLTYzMGE1YTBmMDAwMCI="
    }})
}

/// Answers the outstanding request `assigned` at `now` and checks the machine finishes assigned.
fn assigned_at(reg: &mut Registration, now: Timestamp) {
    reg.handle_response(now, reply(200, None, assigned_body()));
    assert!(matches!(reg.poll_event(), Some(RegistrationEvent::Assigned(_))));
}

fn error_body(code: u32, message: &str) -> serde_json::Value {
    json!({"errorCode": code, "trackingId": "8ad0463c-6427-4479-9dfa-3e8bb7003e9b", "message": message,
           "timestampUtc": "2019-06-10T10:50:14.7793152Z", "info": null})
}

fn expect_register(reg: &mut Registration, now: Timestamp) -> Option<String> {
    match reg.poll_transmit(now) {
        Some(Transmit::Register { body, authorization }) => {
            assert_eq!(body.registration_id, DEVICE);
            authorization
        }
        other => panic!("expected a register request at {now:?}, got {other:?}"),
    }
}

fn expect_poll(reg: &mut Registration, now: Timestamp) -> Option<String> {
    match reg.poll_transmit(now) {
        Some(Transmit::PollStatus { operation_id, authorization }) => {
            assert_eq!(operation_id.as_str(), OP);
            authorization
        }
        other => panic!("expected an operation status poll at {now:?}, got {other:?}"),
    }
}

fn expect_failure(reg: &mut Registration) -> RegistrationFailure {
    assert!(reg.is_finished());
    match reg.poll_event() {
        Some(RegistrationEvent::Failed(f)) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Sends register at `t0` and answers it with 202 assigning (retry-after 3 s).
fn registered(config: RegistrationConfig) -> Registration {
    let mut reg = machine(config);
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), assigning_register_reply());
    reg
}

#[test]
fn symmetric_key_device_registers_polls_and_is_assigned() {
    let mut reg = machine(config());
    assert_eq!(reg.poll_timeout(), None, "nothing to wait for before the first send");
    let auth = expect_register(&mut reg, t0());
    assert!(auth.is_some());
    assert_eq!(reg.poll_transmit(t0()), None, "one request at a time");
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(30)), "reply deadline");

    reg.handle_response(t0() + secs(1), assigning_register_reply());
    assert_eq!(reg.operation_id().map(|o| o.as_str()), Some(OP));
    assert_eq!(reg.poll_event(), None);
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(4)));
    reg.handle_timeout(t0() + secs(4));
    expect_poll(&mut reg, t0() + secs(4));

    reg.handle_response(t0() + secs(5), assigning_poll_reply());
    assert!(!reg.is_finished());
    expect_poll(&mut reg, t0() + secs(8));

    reg.handle_response(t0() + secs(9), reply(200, None, assigned_body()));
    assert!(reg.is_finished());
    assert_eq!(reg.poll_timeout(), None);
    match reg.poll_event() {
        Some(RegistrationEvent::Assigned(a)) => {
            assert_eq!(a.assigned_hub, HUB);
            assert_eq!(a.device_id, DEVICE);
            assert_eq!(a.substatus, Some(Substatus::InitialAssignment));
            assert_eq!(a.payload, None);
            assert_eq!(a.tpm_authentication_key, None);
            assert_eq!(a.state.etag.as_deref(), Some("IjEyMDA4NmYyLTAwMDAtMDMwMC0wMDAwLTYzMGE1YTBmMDAwMCI="));
        }
        other => panic!("expected an assignment, got {other:?}"),
    }
    assert_eq!(reg.poll_event(), None, "the outcome is reported once");
    assert_eq!(reg.poll_transmit(t0() + secs(100)), None);
}

#[test]
fn service_that_assigns_on_register_finishes_without_polling() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(200, None, assigned_body()));
    match reg.poll_event() {
        Some(RegistrationEvent::Assigned(a)) => assert_eq!(a.assigned_hub, HUB),
        other => panic!("expected an assignment, got {other:?}"),
    }
    assert_eq!(reg.poll_transmit(t0() + secs(10)), None);
}

#[test]
fn device_waits_the_retry_after_the_service_asks_for_before_polling() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(202, Some(10), json!({"operationId": OP, "status": "assigning"})));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(10)));
    for s in [0, 2, 9] {
        assert_eq!(reg.poll_transmit(t0() + secs(s)), None, "sent early at +{s} s");
    }
    reg.handle_timeout(t0() + secs(10) - Duration::from_millis(1));
    assert_eq!(reg.poll_transmit(t0() + secs(10) - Duration::from_millis(1)), None);
    expect_poll(&mut reg, t0() + secs(10));
}

#[test]
fn device_polls_after_two_seconds_when_the_service_gives_no_retry_after() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(202, None, json!({"operationId": OP, "status": "assigning"})));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(2)));
    assert_eq!(reg.poll_transmit(t0() + secs(1)), None);
    expect_poll(&mut reg, t0() + secs(2));
}

#[test]
fn retry_after_outside_one_to_three_hundred_seconds_is_clamped() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(202, Some(0), json!({"operationId": OP, "status": "assigning"})));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(1)));
    expect_poll(&mut reg, t0() + secs(1));
    reg.handle_response(
        t0() + secs(1),
        reply(202, Some(86_400), json!({"operationId": OP, "status": "assigning"})),
    );
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(301)));
}

#[test]
fn throttled_register_is_resent_after_retry_after_then_succeeds() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(429, Some(5), error_body(429001, "Too many requests")));
    assert!(!reg.is_finished());
    // The wait the service asked for, plus up to half of it again.
    let resent = resend_at(&mut reg, t0(), secs(5), millis(7500));
    expect_register(&mut reg, resent);
    reg.handle_response(resent, assigning_register_reply());
    expect_poll(&mut reg, resent + secs(3));
    assigned_at(&mut reg, resent + secs(3));
}

#[test]
fn throttling_without_retry_after_backs_off_exponentially() {
    let mut cfg = config();
    // Up to 1110 s of waits below: more than the default 900 s for the whole registration.
    cfg.registration_timeout = secs(3600);
    let mut reg = machine(cfg);
    let mut now = t0();
    expect_register(&mut reg, now);
    for ceiling in [2, 4, 8, 16, 32, 64, 128, 256, 300, 300] {
        reg.handle_response(now, reply(429, None, error_body(429001, "Too many requests")));
        // "Equal jitter": uniform in (b/2, b] of the doubling back-off b, capped at 300 s.
        now = resend_at(&mut reg, now, secs(ceiling) / 2, secs(ceiling));
        expect_register(&mut reg, now);
    }
    assigned_at(&mut reg, now);
}

#[test]
fn throttled_poll_without_operation_id_is_resent_with_the_kept_operation_id() {
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    // Error replies carry no operationId (spec §10.2); the poll must keep the register's id.
    reg.handle_response(t0() + secs(3), reply(429, Some(4), error_body(429001, "Too many requests")));
    let resent = resend_at(&mut reg, t0() + secs(3), secs(4), secs(6));
    expect_poll(&mut reg, resent);
    // A 202 poll reply without operationId is accepted too.
    reg.handle_response(resent, reply(202, Some(3), json!({"status": "assigning"})));
    expect_poll(&mut reg, resent + secs(3));
}

#[test]
fn service_errors_that_persist_end_as_throttled_after_a_configured_retry_budget() {
    let mut cfg = config();
    cfg.max_throttle_retries = Some(3);
    let mut reg = machine(cfg);
    let mut now = t0();
    expect_register(&mut reg, now);
    for _ in 0..3 {
        reg.handle_response(now, reply(503, Some(1), error_body(503000, "Service unavailable")));
        assert!(!reg.is_finished());
        now = resend_at(&mut reg, now, secs(1), millis(1500));
        expect_register(&mut reg, now);
    }
    reg.handle_response(now, reply(500, Some(1), error_body(500000, "Internal server error")));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Throttled);
    assert_eq!(f.status, Some(500));
    assert_eq!(f.error_code, Some(500000));
    assert_eq!(f.message, "gave up after 3 retries; last reply HTTP 500: Internal server error");
    assert_eq!(reg.poll_transmit(now + secs(10)), None);
}

#[test]
fn giving_up_on_a_throttled_reply_without_a_message_does_not_repeat_the_status() {
    let mut cfg = config();
    cfg.max_throttle_retries = Some(0);
    let mut reg = machine(cfg);
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), ServiceResponse { status: 429, retry_after: Some(secs(1)), body: Vec::new() });
    let f = expect_failure(&mut reg);
    assert_eq!(
        f.to_string(),
        "registration failed (throttled; HTTP 429): gave up after 0 retries; last reply HTTP 429"
    );
}

#[test]
fn retry_budget_restarts_after_the_service_makes_progress() {
    let mut cfg = config();
    cfg.max_throttle_retries = Some(1);
    let mut reg = machine(cfg);
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(429, Some(1), error_body(429001, "Too many requests")));
    let resent = resend_at(&mut reg, t0(), secs(1), millis(1500));
    expect_register(&mut reg, resent);
    reg.handle_response(resent, assigning_register_reply());
    expect_poll(&mut reg, resent + secs(3));
    reg.handle_response(resent + secs(3), reply(429, Some(1), error_body(429001, "Too many requests")));
    assert!(!reg.is_finished(), "the register's retry does not count against the poll");
    let polled = resend_at(&mut reg, resent + secs(3), secs(1), millis(1500));
    expect_poll(&mut reg, polled);
}

/// The reviewer's probe (D1): a service answering `429, Retry-After: 1` made the device give up
/// after five resends, about 5 s into a registration allowed 900 s.
#[test]
fn a_device_throttled_or_failing_keeps_resending_until_the_registration_deadline() {
    for (status, retry_after) in [(429, Some(1)), (503, None), (500, Some(30))] {
        let mut reg = machine(config());
        let mut now = t0();
        let mut sent = 0;
        while !reg.is_finished() {
            if reg.poll_transmit(now).is_some() {
                sent += 1;
                reg.handle_response(now, reply(status, retry_after, error_body(503000, "busy")));
                continue;
            }
            now = reg.poll_timeout().expect("a resend or the deadline is scheduled");
            reg.handle_timeout(now);
        }
        let f = expect_failure(&mut reg);
        assert_eq!(f.kind, FailureKind::Timeout, "HTTP {status}: {f}");
        assert_eq!(now, t0() + secs(900), "HTTP {status}");
        // The old budget allowed the first request and five resends.
        assert!(sent > 6, "HTTP {status}: only {sent} requests in 900 s");
    }
}

#[test]
fn retry_jitter_comes_from_the_crypto_provider_and_never_undercuts_the_service() {
    let ns = Duration::from_nanos;
    // (random bytes, wait after `429, retry-after: 10`, the three waits after 503s without one)
    let cases = [
        // No jitter: what the service asked for, and the full back-off b = 2, 4, 8 s.
        (Some(0x00), secs(10), [secs(2), secs(4), secs(8)]),
        // The most jitter: half of the retry-after again, and just over b/2.
        (Some(0xff), secs(15) - ns(1), [secs(1) + ns(1), secs(2) + ns(1), secs(4) + ns(1)]),
        // A failing random source waits as if there were no jitter.
        (None, secs(10), [secs(2), secs(4), secs(8)]),
    ];
    for (random, after_429, backoffs) in cases {
        let mut reg = machine_with_random(config(), random);
        expect_register(&mut reg, t0());
        reg.handle_response(t0(), reply(429, Some(10), error_body(429001, "Too many requests")));
        assert_eq!(reg.poll_timeout(), Some(t0() + after_429), "random {random:?}");

        let mut reg = machine_with_random(config(), random);
        let mut now = t0();
        for wait in backoffs {
            expect_register(&mut reg, now);
            reg.handle_response(now, reply(503, None, error_body(503000, "Service unavailable")));
            assert_eq!(reg.poll_timeout(), Some(now + wait), "random {random:?}");
            now = now + wait;
        }
    }
}

#[test]
fn devices_throttled_together_come_back_at_different_times() {
    let resends: std::collections::BTreeSet<Timestamp> = (0..8)
        .map(|_| {
            let mut reg = machine(config());
            expect_register(&mut reg, t0());
            reg.handle_response(t0(), reply(429, Some(60), error_body(429001, "Too many requests")));
            reg.poll_timeout().unwrap()
        })
        .collect();
    assert!(resends.len() > 1, "eight devices all resend at {resends:?}");
    assert!(resends.iter().all(|&at| at >= t0() + secs(60) && at < t0() + secs(90)), "{resends:?}");
}

#[test]
fn wrong_key_is_reported_as_unauthorized() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(401, None, error_body(401002, "Unauthorized")));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Unauthorized);
    assert_eq!(f.status, Some(401));
    assert_eq!(f.error_code, Some(401002));
    assert_eq!(f.message, "Unauthorized");
}

#[test]
fn tpm_challenge_is_a_clear_unauthorized_failure_for_now() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    let challenge = json!({"message": "Authorization required, resend request using supplied key",
                           "authenticationKey": "AAECAw==", "unencryptedAuthenticationKey": null,
                           "keyName": "registration"});
    reg.handle_response(t0(), reply(401, None, challenge));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Unauthorized);
    assert!(f.message.contains("TPM"), "{}", f.message);
}

#[test]
fn unknown_registration_and_bad_requests_fail_by_category() {
    for (status, code, kind) in [
        (404, 404201, FailureKind::NotFound),
        (400, 400004, FailureKind::BadRequest),
        (409, 409000, FailureKind::Service),
        (412, 412000, FailureKind::Service),
    ] {
        let mut reg = machine(config());
        expect_register(&mut reg, t0());
        reg.handle_response(t0(), reply(status, None, error_body(code, "refused")));
        let f = expect_failure(&mut reg);
        assert_eq!((f.kind, f.status, f.error_code), (kind, Some(status), Some(code)), "HTTP {status}");
    }
}

/// Reviewer's probe `status600` (D7): a status of 600 or more was backed off as a 5xx for 63 s.
#[test]
fn statuses_that_are_not_http_are_protocol_failures_not_retried() {
    for status in [600, 700, 999, 1000, 100, 302] {
        let mut reg = machine(config());
        expect_register(&mut reg, t0());
        reg.handle_response(t0(), reply(status, Some(1), error_body(503000, "odd")));
        let f = expect_failure(&mut reg);
        assert_eq!((f.kind, f.status), (FailureKind::Protocol, Some(status)), "HTTP {status}");
    }
}

#[test]
fn request_timeout_from_the_service_is_retried_like_a_server_error() {
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    reg.handle_response(t0() + secs(3), reply(408, None, error_body(408000, "Request timed out")));
    assert!(!reg.is_finished(), "408 is transient");
    let resent = resend_at(&mut reg, t0() + secs(3), secs(1), secs(2));
    expect_poll(&mut reg, resent);
    assigned_at(&mut reg, resent);
}

#[test]
fn error_code_given_as_a_string_of_digits_is_read() {
    for code in [json!("401002"), json!(401002)] {
        let mut reg = machine(config());
        expect_register(&mut reg, t0());
        reg.handle_response(t0(), reply(401, None, json!({"errorCode": code, "message": "Unauthorized"})));
        let f = expect_failure(&mut reg);
        assert_eq!((f.kind, f.error_code), (FailureKind::Unauthorized, Some(401002)), "errorCode {code}");
        assert_eq!(f.message, "Unauthorized");
    }
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(401, None, json!({"errorCode": "soon", "message": "Unauthorized"})));
    assert_eq!(expect_failure(&mut reg).error_code, None);
}

#[test]
fn error_reply_that_is_not_json_still_fails_with_its_status() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(
        t0(),
        ServiceResponse { status: 404, retry_after: None, body: b"Not Found".to_vec() },
    );
    let f = expect_failure(&mut reg);
    assert_eq!((f.kind, f.status, f.error_code), (FailureKind::NotFound, Some(404), None));
}

#[test]
fn failed_assignment_reports_the_error_code_of_the_registration_state() {
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    let failed = json!({"operationId": OP, "status": "failed", "registrationState": {
        "registrationId": DEVICE, "status": "failed", "errorCode": 400209,
        "errorMessage": "{\"Message\":\"{\\\"errorCode\\\":401002}\",\"ExceptionMessage\":\"\"}",
        "lastUpdatedDateTimeUtc": "2022-08-27T17:53:19.7519141Z"}});
    reg.handle_response(t0() + secs(4), reply(200, None, failed));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Failed);
    assert_eq!(f.status, Some(200));
    assert_eq!(f.error_code, Some(400209));
    assert!(f.message.contains("401002"));
}

#[test]
fn assigned_reply_without_assigned_hub_is_a_protocol_failure() {
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    let mut body = assigned_body();
    body["registrationState"].as_object_mut().unwrap().remove("assignedHub");
    reg.handle_response(t0() + secs(4), reply(200, None, body));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Protocol);
    assert!(f.message.contains("assignedHub"), "{}", f.message);
}

#[test]
fn assigned_reply_without_device_id_is_a_protocol_failure() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    let mut body = assigned_body();
    body["registrationState"].as_object_mut().unwrap().remove("deviceId");
    reg.handle_response(t0(), reply(200, None, body));
    assert_eq!(expect_failure(&mut reg).kind, FailureKind::Protocol);
}

fn expect_assignment(reg: &mut Registration) -> zerotouch_engine::registration::Assignment {
    assert!(reg.is_finished());
    match reg.poll_event() {
        Some(RegistrationEvent::Assigned(a)) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// The body of the reviewer's fake DPS (D4): an assigned reply as ours sends it.
fn probe_assigned_body() -> serde_json::Value {
    json!({"operationId": OP, "status": "assigned", "registrationState": {
        "registrationId": DEVICE, "assignedHub": "h.example", "deviceId": DEVICE, "status": "assigned",
        "substatus": "initialAssignment", "payload": {"echo": "{}"}}})
}

/// Reviewer's probe `newsub` (D4): a substatus newer than this client failed the registration
/// as a protocol error although the device was assigned.
#[test]
fn assigned_reply_with_a_substatus_this_version_does_not_know_is_an_assignment() {
    let mut body = probe_assigned_body();
    body["registrationState"]["substatus"] = json!("hubMovedV2");
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    reg.handle_response(t0() + secs(3), reply(200, None, body.clone()));
    let a = expect_assignment(&mut reg);
    assert_eq!((a.assigned_hub.as_str(), a.device_id.as_str()), ("h.example", DEVICE));
    assert_eq!(a.substatus, None, "an unknown substatus is no known one");
    assert_eq!(a.raw_state, body["registrationState"], "the reply as sent is kept");
    assert_eq!(a.raw_state["substatus"], "hubMovedV2");
    assert_eq!(a.payload, Some(json!({"echo": "{}"})), "the other members are read");
    assert_eq!(a.state.status, Some(zerotouch_proto::device::RegistrationStatus::Assigned));
}

/// Reviewer's probe `extra` (D4): an `x509` detail with only some certificate fields (and a
/// member this version does not know) failed with "missing field `sha1Thumbprint`".
#[test]
fn assigned_reply_with_partial_x509_detail_is_an_assignment() {
    let mut body = probe_assigned_body();
    body["registrationState"]["trust"] = json!({"x": 1});
    body["registrationState"]["x509"] =
        json!({"certificateInfo": {"subjectName": "CN=x"}, "enrollmentGroupId": "g"});
    let mut cfg = config();
    cfg.credential = DeviceCredential::X509;
    let mut reg = machine(cfg);
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(200, None, body.clone()));
    let a = expect_assignment(&mut reg);
    assert_eq!((a.assigned_hub.as_str(), a.device_id.as_str()), ("h.example", DEVICE));
    assert_eq!(a.substatus, Some(Substatus::InitialAssignment));
    assert_eq!(a.state.x509, None, "the unreadable detail is left out of the typed state");
    assert_eq!(a.raw_state["x509"]["certificateInfo"]["subjectName"], "CN=x", "and kept as sent");
    assert_eq!(a.raw_state["trust"], json!({"x": 1}));
}

#[test]
fn unreadable_optional_members_of_the_registration_state_do_not_fail_an_assignment() {
    let mut body = probe_assigned_body();
    let state = body["registrationState"].as_object_mut().unwrap();
    state.insert("status".into(), json!("assignedV2"));
    state.insert("createdDateTimeUtc".into(), json!("yesterday"));
    state.insert("errorCode".into(), json!("none"));
    state.insert("tpm".into(), json!({}));
    state.remove("registrationId");
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(200, None, body));
    let a = expect_assignment(&mut reg);
    assert_eq!(a.assigned_hub, "h.example");
    assert_eq!((a.state.status, a.state.created_date_time_utc, a.state.error_code), (None, None, None));
    assert_eq!(a.tpm_authentication_key, None);
    assert_eq!(a.state.registration_id.as_str(), DEVICE, "the device's own id fills a missing one");
    assert_eq!(a.state.substatus, Some(Substatus::InitialAssignment));
}

#[test]
fn assigned_reply_still_needs_hub_and_device_id_and_a_known_status() {
    let mut body = probe_assigned_body();
    body["registrationState"]["substatus"] = json!("hubMovedV2");
    body["registrationState"]["assignedHub"] = json!(42);
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(200, None, body));
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Protocol);
    assert!(f.message.contains("assignedHub"), "{f}");

    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(200, None, json!({"operationId": OP, "status": "assignedV2"})));
    assert_eq!(expect_failure(&mut reg).kind, FailureKind::Protocol);
}

#[test]
fn failed_reply_with_unreadable_members_still_reports_its_error() {
    let mut reg = registered(config());
    expect_poll(&mut reg, t0() + secs(3));
    let failed = json!({"operationId": OP, "status": "failed", "registrationState": {
        "registrationId": DEVICE, "status": "failedV2", "substatus": "hubMovedV2",
        "errorCode": "400209", "errorMessage": "Hub not specified."}});
    reg.handle_response(t0() + secs(3), reply(200, None, failed));
    let f = expect_failure(&mut reg);
    assert_eq!((f.kind, f.error_code), (FailureKind::Failed, Some(400209)));
    assert_eq!(f.message, "Hub not specified.");
}

#[test]
fn unexpected_registration_status_values_are_protocol_failures() {
    for status in ["unassigned", "registering", "Assigned-ish"] {
        let mut reg = registered(config());
        expect_poll(&mut reg, t0() + secs(3));
        let body = json!({"operationId": OP, "status": status,
                          "registrationState": {"registrationId": DEVICE}});
        reg.handle_response(t0() + secs(3), reply(200, None, body));
        assert_eq!(expect_failure(&mut reg).kind, FailureKind::Protocol, "status {status:?}");
    }
}

#[test]
fn unparsable_replies_are_protocol_failures() {
    let bodies: [&[u8]; 3] = [b"", b"<html>oops</html>", br#"{"status":"assigning"}"#];
    for body in bodies {
        let mut reg = machine(config());
        expect_register(&mut reg, t0());
        reg.handle_response(t0(), ServiceResponse { status: 202, retry_after: None, body: body.to_vec() });
        let f = expect_failure(&mut reg);
        assert_eq!(
            (f.kind, f.status),
            (FailureKind::Protocol, Some(202)),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn service_that_never_answers_times_out() {
    let mut reg = registered(config());
    let sent = t0() + secs(3);
    expect_poll(&mut reg, sent);
    assert_eq!(reg.poll_timeout(), Some(sent + secs(30)));
    reg.handle_timeout(sent + secs(29));
    assert!(!reg.is_finished());
    assert_eq!(reg.poll_event(), None);
    reg.handle_timeout(sent + secs(30));
    let f = expect_failure(&mut reg);
    assert_eq!((f.kind, f.status), (FailureKind::Timeout, None));
    // A reply that arrives after the deadline changes nothing.
    reg.handle_response(sent + secs(31), reply(200, None, assigned_body()));
    assert_eq!(reg.poll_event(), None);
}

/// Review D2: the reply deadline started at `poll_transmit`, before the transport connected, so
/// a slow connection ate into the wait for the reply.
#[test]
fn the_reply_deadline_starts_when_the_request_is_sent() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    assert_eq!(reg.deadline(), Some(t0() + secs(900)), "the registration deadline runs from the start");
    // Connecting took 26 s.
    reg.handle_sent(t0() + secs(26));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(56)));
    reg.handle_timeout(t0() + secs(30));
    assert!(!reg.is_finished(), "the reply is not late 4 s after the request went out");
    reg.handle_response(t0() + secs(32), assigning_register_reply());
    assert_eq!(reg.deadline(), Some(t0() + secs(900)), "sending does not move the registration deadline");
    // Nothing is outstanding while waiting to poll: a stray call changes nothing.
    reg.handle_sent(t0() + secs(33));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(35)));
}

#[test]
fn the_reply_deadline_never_outlasts_the_registration_deadline() {
    let mut cfg = config();
    cfg.registration_timeout = secs(40);
    let mut reg = machine(cfg);
    expect_register(&mut reg, t0());
    reg.handle_sent(t0() + secs(20));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(40)));
    reg.handle_timeout(t0() + secs(40));
    assert!(expect_failure(&mut reg).message.contains("registration timeout"));
}

/// Review D3: a dropped connection ended the registration although DPS keeps no sessions and a
/// poll with the kept operation id works from any new connection.
#[test]
fn a_poll_lost_with_its_connection_is_sent_again_with_the_kept_operation_id() {
    let mut reg = machine_with_random(config(), Some(0x00));
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), assigning_register_reply());
    let sent = t0() + secs(3);
    expect_poll(&mut reg, sent);
    reg.handle_connection_lost(sent + secs(1));
    assert!(!reg.is_finished());
    assert_eq!(reg.poll_event(), None);
    assert_eq!(reg.operation_id().map(|id| id.as_str()), Some(OP));
    // No jitter: the full back-off of 2 s.
    let resend = resend_at(&mut reg, sent + secs(1), secs(2), secs(2));
    expect_poll(&mut reg, resend);
    assigned_at(&mut reg, resend);
}

#[test]
fn a_register_lost_with_its_connection_is_sent_again() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_connection_lost(t0() + secs(1));
    let resend = resend_at(&mut reg, t0() + secs(1), secs(1), secs(2));
    expect_register(&mut reg, resend);
}

#[test]
fn connections_lost_in_a_row_back_off_with_jitter_and_a_reply_starts_again() {
    let mut cfg = config();
    cfg.registration_timeout = secs(3600);
    let mut reg = machine(cfg);
    let mut now = t0();
    expect_register(&mut reg, now);
    for ceiling in [2, 4, 8, 16, 32, 64, 128, 256, 300, 300] {
        reg.handle_connection_lost(now);
        now = resend_at(&mut reg, now, secs(ceiling) / 2, secs(ceiling));
        expect_register(&mut reg, now);
    }
    reg.handle_response(now, assigning_register_reply());
    now = now + secs(3);
    expect_poll(&mut reg, now);
    reg.handle_connection_lost(now);
    resend_at(&mut reg, now, secs(1), secs(2));
}

#[test]
fn connections_lost_do_not_use_the_throttle_budget_but_end_at_the_registration_deadline() {
    let mut cfg = config();
    cfg.max_throttle_retries = Some(1);
    cfg.registration_timeout = secs(60);
    let mut reg = machine(cfg);
    let mut now = t0();
    let mut sent = 0;
    while !reg.is_finished() {
        if reg.poll_transmit(now).is_some() {
            sent += 1;
            // Each connection drops a second after the request went out.
            now = now + secs(1);
            reg.handle_connection_lost(now);
            continue;
        }
        now = reg.poll_timeout().expect("a resend or the deadline is scheduled");
        reg.handle_timeout(now);
    }
    let f = expect_failure(&mut reg);
    assert_eq!(f.kind, FailureKind::Timeout, "{f}");
    assert!(f.message.contains("registration timeout"), "{f}");
    // At the deadline, or at the loss that came after it (a resend jittered into the last
    // second before it).
    assert!(now >= t0() + secs(60) && now <= t0() + secs(61), "ended at {now:?}");
    assert!(sent > 2, "only {sent} attempts in 60 s");
}

#[test]
fn a_connection_lost_with_nothing_outstanding_changes_nothing() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), assigning_register_reply());
    // Lost during the 3 s retry-after wait: the poll goes out when the wait ends, as planned.
    reg.handle_connection_lost(t0() + secs(1));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(3)));
    expect_poll(&mut reg, t0() + secs(3));
    reg.handle_response(t0() + secs(3), reply(200, None, assigned_body()));
    reg.handle_connection_lost(t0() + secs(4));
    assert!(matches!(reg.poll_event(), Some(RegistrationEvent::Assigned(_))));
    assert_eq!(reg.poll_transmit(t0() + secs(10)), None);
}

#[test]
fn a_connection_lost_after_the_registration_deadline_ends_in_a_timeout() {
    let mut cfg = config();
    cfg.registration_timeout = secs(10);
    let mut reg = machine(cfg);
    expect_register(&mut reg, t0());
    reg.handle_connection_lost(t0() + secs(10));
    assert_eq!(expect_failure(&mut reg).kind, FailureKind::Timeout);
}

#[test]
fn reply_without_an_outstanding_request_is_ignored() {
    let mut reg = registered(config());
    reg.handle_response(t0() + secs(1), reply(200, None, assigned_body()));
    assert!(!reg.is_finished());
    expect_poll(&mut reg, t0() + secs(3));
}

#[test]
fn register_sends_the_custom_payload() {
    let mut cfg = config();
    cfg.payload = Some(json!({"modelId": "dtmi:com:example:Thermostat;1"}));
    let mut reg = machine(cfg);
    match reg.poll_transmit(t0()) {
        Some(Transmit::Register { body, .. }) => {
            let wire = serde_json::to_value(&body).unwrap();
            assert_eq!(
                wire,
                json!({"payload": {"modelId": "dtmi:com:example:Thermostat;1"}, "registrationId": DEVICE})
            );
        }
        other => panic!("expected register, got {other:?}"),
    }
    let mut body = assigned_body();
    body["registrationState"]["payload"] = json!({"from": "webhook"});
    reg.handle_response(t0(), reply(200, None, body));
    match reg.poll_event() {
        Some(RegistrationEvent::Assigned(a)) => assert_eq!(a.payload, Some(json!({"from": "webhook"}))),
        other => panic!("expected an assignment, got {other:?}"),
    }
}

#[test]
fn x509_device_sends_no_sas_token() {
    let mut cfg = config();
    cfg.credential = DeviceCredential::X509;
    let mut reg = machine(cfg);
    assert_eq!(expect_register(&mut reg, t0()), None);
    reg.handle_response(t0(), assigning_register_reply());
    assert_eq!(expect_poll(&mut reg, t0() + secs(3)), None);
}

#[test]
fn sas_token_matches_published_vector_v4() {
    // se = now + 3600 s = 1663952627 (spec §4.5 V4).
    let now = Timestamp::from_unix_secs(1_663_952_627 - 3600);
    let mut reg = machine(config());
    let auth = expect_register(&mut reg, now).unwrap();
    assert_eq!(
        auth,
        "SharedAccessSignature sr=0ne00111111%2Fregistrations%2Fmy-symkey-device\
         &sig=8VPprb8BiTkuVE0hBqHm%2FSVrzVpdD8VZcXugntdbhuU%3D&se=1663952627&skn=registration"
    );
    let token = SasToken::parse(&auth).unwrap();
    assert_eq!(STANDARD.encode(token.signature().unwrap()), "8VPprb8BiTkuVE0hBqHm/SVrzVpdD8VZcXugntdbhuU=");
}

#[test]
fn sas_token_signs_the_encoded_resource_and_expiry_with_the_device_key() {
    let id = "dev:42.a_b";
    let cfg = RegistrationConfig::new(
        IdScope::new(SCOPE).unwrap(),
        id.parse().unwrap(),
        DeviceCredential::symmetric_key_base64(KEY).unwrap(),
    );
    let now = Timestamp::from_unix_nanos(1_700_000_000_400_000_000);
    let mut reg = machine(cfg);
    let Some(Transmit::Register { authorization: Some(auth), .. }) = reg.poll_transmit(now) else {
        panic!("expected a signed register request");
    };
    assert!(auth.starts_with("SharedAccessSignature "));
    let token = SasToken::parse(&auth).unwrap();
    assert_eq!(token.resource_raw(), "0ne00111111%2Fregistrations%2Fdev%3A42.a_b");
    assert_eq!(token.resource().unwrap(), format!("{SCOPE}/registrations/{id}"));
    assert_eq!(token.key_name(), Some("registration"));
    assert_eq!(token.expiry_secs(), 1_700_003_600);
    let key = STANDARD.decode(KEY).unwrap();
    let expected = RingCrypto::new()
        .hmac_sha256(&key, format!("{}\n{}", token.resource_raw(), 1_700_003_600).as_bytes());
    assert_eq!(token.signature().unwrap(), expected.to_vec());
}

#[test]
fn sas_token_is_reused_while_fresh_and_signed_again_near_expiry() {
    let mut cfg = config();
    cfg.token_ttl = secs(20);
    cfg.request_timeout = secs(5);
    let mut reg = machine(cfg);
    let first = expect_register(&mut reg, t0()).unwrap();
    reg.handle_response(t0(), assigning_register_reply());
    let second = expect_poll(&mut reg, t0() + secs(3)).unwrap();
    assert_eq!(first, second, "17 s of 20 s left: reuse");
    reg.handle_response(
        t0() + secs(3),
        reply(202, Some(14), json!({"operationId": OP, "status": "assigning"})),
    );
    let third = expect_poll(&mut reg, t0() + secs(17)).unwrap();
    assert_ne!(third, first, "3 s left is less than the request timeout: sign again");
    assert_eq!(SasToken::parse(&third).unwrap().expiry_secs(), (t0() + secs(37)).unix_secs());
}

#[test]
fn default_configuration_matches_the_documented_defaults() {
    let cfg = config();
    assert_eq!(cfg.api_version, "2021-06-01");
    assert_eq!(cfg.token_ttl, secs(3600));
    assert_eq!(cfg.request_timeout, secs(30));
    assert_eq!(cfg.default_retry_after, secs(2));
    assert_eq!(cfg.max_throttle_retries, None, "no count: throttling is bounded by the registration timeout");
    assert_eq!(cfg.registration_timeout, secs(900));
    assert_eq!(cfg.payload, None);
    let printed = format!("{cfg:?}");
    assert!(!printed.contains(KEY) && printed.contains("<redacted>"), "{printed}");
}

mod any_reply_sequence {
    use proptest::prelude::*;

    use super::*;

    fn any_reply() -> impl Strategy<Value = ServiceResponse> {
        let status =
            prop::sample::select(vec![200u16, 202, 204, 302, 400, 401, 404, 408, 409, 429, 500, 503, 600]);
        let body = prop::sample::select(vec![
            assigning_register_reply().body,
            assigning_poll_reply().body,
            assigned_body().to_string().into_bytes(),
            error_body(429001, "Too many requests").to_string().into_bytes(),
            json!({"operationId": OP, "status": "failed", "registrationState": {"registrationId": DEVICE}})
                .to_string()
                .into_bytes(),
            b"not json".to_vec(),
            Vec::new(),
        ]);
        (status, prop::option::of(0u64..1000), body).prop_map(|(status, retry_after, body)| ServiceResponse {
            status,
            retry_after: retry_after.map(secs),
            body,
        })
    }

    proptest! {
        /// Replies, lost connections and silences in any order, with a transport that takes a
        /// while to connect (`delay`) between `poll_transmit` and `handle_sent`, as a real one
        /// does, and sometimes cannot connect at all. The jitter comes from a fixed random byte
        /// (or a failing source), so that a failing case shrinks and replays the same.
        #[test]
        fn machine_never_sends_early_and_always_ends_quiet(
            replies in prop::collection::vec((any_reply(), 0u8..4, 0u64..70), 1..40),
            random in prop::option::of(any::<u8>()),
            registration_timeout in 40u64..900,
        ) {
            let mut config = config();
            config.registration_timeout = secs(registration_timeout);
            let request_timeout = config.request_timeout;
            let mut reg = machine_with_random(config, random);
            let mut now = t0();
            // When the outstanding request went on the wire.
            let mut sent_at: Option<Timestamp> = None;
            let mut outcomes = 0;
            for (response, input, delay) in replies {
                // Advance to the next timer without skipping past it, as a driver would.
                if let Some(at) = reg.poll_timeout() {
                    prop_assert!(at >= now, "a timer in the past: {:?} < {:?}", at, now);
                    if at > now {
                        prop_assert_eq!(reg.poll_transmit(at - Duration::from_nanos(1)), None);
                    }
                    now = at;
                    reg.handle_timeout(now);
                }
                let polled = reg.poll_transmit(now).is_some();
                prop_assert_eq!(reg.poll_transmit(now), None, "one request in flight at a time");
                if polled {
                    sent_at = None;
                    // The transport connects for `delay`, bounded by the registration deadline
                    // as the driver bounds it.
                    let end = reg.deadline().expect("set by the first request");
                    now = (now + secs(delay)).min(end);
                    if input == 3 {
                        // The connection could not be set up: the request never went out.
                        reg.handle_connection_lost(now);
                    } else {
                        reg.handle_sent(now);
                        sent_at = Some(now);
                        // The reply deadline counts from the send, however long connecting took.
                        prop_assert_eq!(reg.poll_timeout(), Some((now + request_timeout).min(end)));
                        reg.handle_timeout(now);
                        prop_assert!(reg.is_finished() == (now >= end), "ended at the send");
                        match input {
                            // The reply arrives.
                            0 => reg.handle_response(now, response),
                            // The connection drops: the request is scheduled again, or the deadline ends it.
                            1 => reg.handle_connection_lost(now),
                            // No reply: the next timer is the reply deadline.
                            _ => {}
                        }
                    }
                }
                if let Some(event) = reg.poll_event() {
                    outcomes += 1;
                    prop_assert!(reg.is_finished());
                    if let RegistrationEvent::Failed(f) = event {
                        prop_assert!(!f.message.is_empty());
                        if f.kind == FailureKind::Timeout {
                            let end = reg.deadline().unwrap();
                            let reply_late = sent_at.is_some_and(|s| now >= s + request_timeout);
                            prop_assert!(now >= end || reply_late, "timed out early: {}", f.message);
                            if f.message.starts_with("no reply") {
                                prop_assert!(reply_late, "{} {:?} after the send", f.message, sent_at.map(|s| now.saturating_since(s)));
                            }
                        }
                    }
                }
                if reg.is_finished() {
                    prop_assert_eq!(reg.poll_timeout(), None);
                    prop_assert_eq!(reg.poll_transmit(now + secs(3600)), None);
                }
            }
            prop_assert!(outcomes <= 1);
        }
    }
}

#[test]
fn a_service_that_answers_assigning_for_ever_ends_in_a_timeout_at_the_registration_deadline() {
    let mut config = config();
    config.registration_timeout = secs(60);
    let mut reg = registered(config);
    let mut now = t0();
    let mut polls = 0;
    while !reg.is_finished() {
        let due = reg.poll_timeout().expect("a wait or a deadline while running");
        assert!(due <= t0() + secs(60), "nothing is scheduled past the registration deadline");
        now = due;
        reg.handle_timeout(now);
        if reg.poll_transmit(now).is_some() {
            polls += 1;
            reg.handle_response(now, assigning_poll_reply());
        }
    }
    let failure = expect_failure(&mut reg);
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure:?}");
    assert!(failure.message.contains("60 s"), "{failure:?}");
    assert_eq!(now, t0() + secs(60));
    assert_eq!(polls, 19, "a poll every 3 s until the deadline");
}

#[test]
fn a_throttled_resend_waiting_past_the_registration_deadline_is_cut_at_the_deadline() {
    let mut config = config();
    config.registration_timeout = secs(100);
    let mut reg = machine(config);
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(429, Some(300), error_body(429001, "Too many requests")));
    assert_eq!(reg.poll_timeout(), Some(t0() + secs(100)));
    assert!(reg.poll_transmit(t0() + secs(99)).is_none());
    reg.handle_timeout(t0() + secs(100));
    assert_eq!(expect_failure(&mut reg).kind, FailureKind::Timeout);
}

#[test]
fn a_failure_reads_with_the_status_and_error_code_the_service_sent() {
    let mut reg = machine(config());
    expect_register(&mut reg, t0());
    reg.handle_response(t0(), reply(401, None, error_body(401002, "Unauthorized")));
    let failure = expect_failure(&mut reg);
    assert_eq!(
        failure.to_string(),
        "registration failed (unauthorized; HTTP 401, error 401002): Unauthorized"
    );
}

#[test]
fn a_request_in_debug_output_shows_no_token() {
    let mut reg = machine(config());
    let transmit = reg.poll_transmit(t0()).unwrap();
    let shown = format!("{transmit:?}");
    assert!(shown.contains("Register") && shown.contains("<redacted>"), "{shown}");
    assert!(!shown.contains("sig=") && !shown.contains("SharedAccessSignature"), "{shown}");
}
