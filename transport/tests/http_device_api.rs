//! The HTTPS device API over TLS against the real engine: what the Node, C and Rust HTTP clients do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;
mod recording;

use http_support::{node_sas, operation_path, register_path, sas, Server, API, HUB, SCOPE};
use serde_json::json;
use zerotouch_engine::attestation::symmetric::derive_device_key;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_testkit::certs::{CertSpec, TestCert};
use zerotouch_transport::limits::Limits;

#[tokio::test]
async fn symmetric_key_device_registers_polls_and_is_assigned() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-7");
    let token = sas(&key, "sensor-7");
    let mut client = server.connect(None).await;

    let body = json!({ "registrationId": "sensor-7" }).to_string();
    let accepted = client.send("PUT", &register_path("sensor-7"), Some(&token), body.as_bytes()).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    assert_eq!(accepted.body["status"], "assigning");
    assert_eq!(accepted.header("retry-after"), Some("3"));
    assert_eq!(accepted.header("content-type"), Some("application/json; charset=utf-8"));
    assert!(accepted.header("x-ms-request-id").is_some());
    assert!(accepted.header("strict-transport-security").is_some_and(|v| v.starts_with("max-age=")));
    let location = accepted.header("location").expect("Location on the register's 202");
    assert!(
        location.starts_with("https://")
            && location.ends_with(&format!("/{SCOPE}/registrations/sensor-7/register")),
        "{location}"
    );
    let operation_id = accepted.body["operationId"].as_str().unwrap().to_owned();

    // Node sends `{}` with the poll; the body is ignored.
    let done = client.send("GET", &operation_path("sensor-7", &operation_id), Some(&token), b"{}").await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["operationId"], operation_id.as_str());
    assert_eq!(done.body["status"], "assigned");
    let state = &done.body["registrationState"];
    assert_eq!(state["assignedHub"], HUB);
    assert_eq!(state["deviceId"], "sensor-7");
    assert_eq!(state["substatus"], "initialAssignment");
    assert!(done.header("retry-after").is_none());
    assert!(server.hub_has_device("sensor-7"));

    let lookup = client
        .send(
            "POST",
            &format!("/{SCOPE}/registrations/sensor-7?api-version={API}"),
            Some(&token),
            body.as_bytes(),
        )
        .await;
    assert_eq!(lookup.status, 200, "{}", lookup.body);
    assert_eq!(lookup.body["registrationId"], "sensor-7");
    assert_eq!(lookup.body["assignedHub"], HUB);
    server.stop().await;
}

#[tokio::test]
async fn the_engine_is_told_the_api_version_of_the_query() {
    // Devices on 2018-04-01 and before keep their hub under an enrollment without a reprovision
    // policy (spec §8.3): the engine can only apply that if it hears the version.
    let (wrap, seen) = recording::ApiVersions::recorder();
    let server = Server::start_wrapped(Limits::default(), wrap).await;
    let key = server.enroll_symmetric("sensor-old");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-old" }).to_string();
    let path = format!("/{SCOPE}/registrations/sensor-old/register?api-version=2018-04-01");
    let accepted = client.send("PUT", &path, Some(&sas(&key, "sensor-old")), body.as_bytes()).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    assert_eq!(*seen.lock().unwrap(), vec![Some("2018-04-01".to_owned())]);
    server.stop().await;
}

#[tokio::test]
async fn a_request_the_engine_does_not_finish_in_time_is_answered_500() {
    let limits = Limits { engine_timeout: std::time::Duration::from_millis(300), ..Limits::default() };
    let server =
        Server::start_wrapped(limits, recording::SlowService::by(std::time::Duration::from_secs(3))).await;
    let key = server.enroll_symmetric("sensor-stuck");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-stuck" }).to_string();
    let started = std::time::Instant::now();
    let reply = client
        .send("PUT", &register_path("sensor-stuck"), Some(&sas(&key, "sensor-stuck")), body.as_bytes())
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.body["errorCode"].as_u64()),
        (500, Some(500_000)),
        "{}",
        reply.body
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn node_http_group_device_with_derived_key_and_raw_sr_token_is_assigned() {
    let server = Server::start().await;
    let group_key = server.enroll_symmetric_group("thermostats");
    let device_key = derive_device_key(&RingCrypto::new(), &group_key, "thermostat-001");
    let token = node_sas(&device_key, "thermostat-001");
    assert!(token.contains("sr=0ne00C0FFEE/registrations/thermostat-001"), "Node leaves sr unencoded");
    let mut client = server.connect(None).await;

    // Node HTTP adds forceRegistration on request; it is accepted and ignored.
    let path = format!("{}&forceRegistration=true", register_path("thermostat-001"));
    let body = json!({ "registrationId": "thermostat-001" }).to_string();
    let accepted = client.send("PUT", &path, Some(&token), body.as_bytes()).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let operation_id = accepted.body["operationId"].as_str().unwrap().to_owned();
    let done =
        client.send("GET", &operation_path("thermostat-001", &operation_id), Some(&token), b"{}").await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["status"], "assigned");
    assert_eq!(done.body["registrationState"]["deviceId"], "thermostat-001");
    assert!(server.hub_has_device("thermostat-001"));
}

#[tokio::test]
async fn python_style_null_payload_and_encoded_path_are_accepted() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("dev:1");
    let mut client = server.connect(None).await;
    let body = br#"{"payload": null, "registrationId": "dev:1"}"#;
    let path = format!("/{SCOPE}/registrations/dev%3a1/register?api-version=2019-03-31");
    let accepted = client.send("PUT", &path, Some(&sas(&key, "dev:1")), body).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
}

#[tokio::test]
async fn x509_device_registers_with_its_tls_client_certificate() {
    let server = Server::start().await;
    let device = TestCert::self_signed(CertSpec::new("camera-01"));
    server.enroll_x509(&device);
    let mut client = server.connect(Some(&device)).await;

    let body = json!({ "registrationId": "camera-01" }).to_string();
    let accepted = client.send("PUT", &register_path("camera-01"), None, body.as_bytes()).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let operation_id = accepted.body["operationId"].as_str().unwrap().to_owned();
    let done = client.send("GET", &operation_path("camera-01", &operation_id), None, b"").await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["status"], "assigned");
    assert_eq!(done.body["registrationState"]["deviceId"], "camera-01");
    assert!(server.hub_has_device("camera-01"));
}

#[tokio::test]
async fn x509_device_without_a_client_certificate_is_unauthorized() {
    let server = Server::start().await;
    let device = TestCert::self_signed(CertSpec::new("camera-02"));
    server.enroll_x509(&device);
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "camera-02" }).to_string();
    let refused = client.send("PUT", &register_path("camera-02"), None, body.as_bytes()).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.error_code(), 401002);
}

#[tokio::test]
async fn bad_sas_signature_is_401_with_the_dps_error_body() {
    let server = Server::start().await;
    server.enroll_symmetric("sensor-8");
    let wrong_key = [7u8; 32];
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-8" }).to_string();
    let refused = client
        .send("PUT", &register_path("sensor-8"), Some(&sas(&wrong_key, "sensor-8")), body.as_bytes())
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), 401002);
    assert!(!server.hub_has_device("sensor-8"));

    // The connection stays usable after an error reply.
    let refused_again =
        client.send("PUT", &register_path("sensor-8"), Some("garbage"), body.as_bytes()).await;
    assert_eq!(refused_again.status, 401);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-9");
    let mut client = server.connect(None).await;
    let token = sas(&key, "sensor-9");
    for body in [&b"{\"registrationId\": "[..], b"", b"[1,2]", b"{\"payload\":{}}"] {
        let reply = client.send("PUT", &register_path("sensor-9"), Some(&token), body).await;
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(reply.error_code(), 400000);
    }
}

/// A register body is decoded before the device is authenticated, so its payload is only
/// syntax-checked there: a payload nested deeper than serde_json builds trees for is refused
/// (400 400000, as any body that is not a DeviceRegistration) only once the credential is
/// good; a bad credential gets its 401 and the payload is never parsed.
#[tokio::test]
async fn a_register_payload_is_parsed_only_after_the_device_is_authenticated() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-17");
    let mut client = server.connect(None).await;
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let body = format!(r#"{{"registrationId":"sensor-17","payload":{deep}}}"#);
    let path = register_path("sensor-17");
    let refused = client.send("PUT", &path, Some(&sas(&[7u8; 32], "sensor-17")), body.as_bytes()).await;
    assert_eq!((refused.status.as_u16(), refused.error_code()), (401, 401002), "{}", refused.body);
    let refused = client.send("PUT", &path, None, body.as_bytes()).await;
    assert_eq!((refused.status.as_u16(), refused.error_code()), (401, 401002), "{}", refused.body);
    let reply = client.send("PUT", &path, Some(&sas(&key, "sensor-17")), body.as_bytes()).await;
    assert_eq!((reply.status.as_u16(), reply.error_code()), (400, 400000), "{}", reply.body);
    assert!(!server.hub_has_device("sensor-17"));
    // The status lookup never parses it either.
    let lookup = format!("/{SCOPE}/registrations/sensor-17?api-version={API}");
    let reply = client.send("POST", &lookup, Some(&sas(&key, "sensor-17")), body.as_bytes()).await;
    assert_eq!((reply.status.as_u16(), reply.error_code()), (404, 404201), "{}", reply.body);
}

#[tokio::test]
async fn registration_id_in_body_must_match_the_path() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-10");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "someone-else" }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-10"), Some(&sas(&key, "sensor-10")), body.as_bytes()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.error_code(), 400004);
}

#[tokio::test]
async fn status_lookup_body_must_name_the_path_registration_and_carry_no_csr() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-15");
    let token = sas(&key, "sensor-15");
    let mut client = server.connect(None).await;
    let lookup = format!("/{SCOPE}/registrations/sensor-15?api-version={API}");
    let body = json!({ "registrationId": "sensor-15" }).to_string();
    // Enrolled but not registered yet: 404 404201, saying so.
    let reply = client.send("POST", &lookup, Some(&token), body.as_bytes()).await;
    assert_eq!((reply.status.as_u16(), reply.error_code()), (404, 404201), "{}", reply.body);
    assert!(reply.body["message"].as_str().unwrap().contains("has not registered"), "{}", reply.body);
    let reply = client.send("PUT", &register_path("sensor-15"), Some(&token), body.as_bytes()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);

    let other = json!({ "registrationId": "someone-else" }).to_string();
    let reply = client.send("POST", &lookup, Some(&token), other.as_bytes()).await;
    assert_eq!((reply.status.as_u16(), reply.error_code()), (400, 400004), "{}", reply.body);

    let with_csr = json!({ "registrationId": "sensor-15", "csr": "MIIB" }).to_string();
    let reply = client.send("POST", &lookup, Some(&token), with_csr.as_bytes()).await;
    assert_eq!((reply.status.as_u16(), reply.error_code()), (400, 400000), "{}", reply.body);

    // The same body in another spelling of the id, and no body at all, are looked up.
    let upper = json!({ "registrationId": "SENSOR-15" }).to_string();
    for body in [upper.as_bytes(), b""] {
        let reply = client.send("POST", &lookup, Some(&token), body).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["assignedHub"], HUB);
    }
}

#[tokio::test]
async fn a_register_asking_for_a_certificate_is_refused_400_not_assigned_without_one() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-16");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-16", "csr": "MIIBCjCBsQIBADBPMQswCQYD" }).to_string();
    for api in ["2019-03-31", "2025-07-01-preview"] {
        let path = format!("/{SCOPE}/registrations/sensor-16/register?api-version={api}");
        let reply = client.send("PUT", &path, Some(&sas(&key, "sensor-16")), body.as_bytes()).await;
        assert_eq!((reply.status.as_u16(), reply.error_code()), (400, 400000), "{api}: {}", reply.body);
        assert!(reply.body["message"].as_str().unwrap().contains("csr"), "{}", reply.body);
    }
    assert!(!server.hub_has_device("sensor-16"));
}

#[tokio::test]
async fn oversized_body_is_413() {
    let limits = Limits { max_body_size: 1024, ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-11");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-11", "payload": "x".repeat(4096) }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-11"), Some(&sas(&key, "sensor-11")), body.as_bytes()).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error_code(), 413000);
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_is_405() {
    let server = Server::start().await;
    let mut client = server.connect(None).await;
    let missing = client.send("GET", &format!("/{SCOPE}/devices/d1?api-version={API}"), None, b"").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), 404000);

    // The service API is not served on the device endpoint.
    let service_api = client.send("GET", &format!("/enrollments/e1?api-version={API}"), None, b"").await;
    assert_eq!(service_api.status, 404);

    let wrong_method = client.send("DELETE", &register_path("d1"), None, b"").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.error_code(), 405000);
    assert_eq!(wrong_method.header("allow"), Some("PUT"));
}

#[tokio::test]
async fn missing_or_unknown_api_version_is_400() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-12");
    let token = sas(&key, "sensor-12");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-12" }).to_string();
    for target in [
        format!("/{SCOPE}/registrations/sensor-12/register"),
        format!("/{SCOPE}/registrations/sensor-12/register?api-version="),
        format!("/{SCOPE}/registrations/sensor-12/register?api-version=1999-01-01"),
    ] {
        let reply = client.send("PUT", &target, Some(&token), body.as_bytes()).await;
        assert_eq!(reply.status, 400, "{target}: {}", reply.body);
        assert_eq!(reply.error_code(), 400000);
    }
}

#[tokio::test]
async fn unknown_operation_is_404202_and_unknown_scope_is_404() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-13");
    let token = sas(&key, "sensor-13");
    let mut client = server.connect(None).await;
    let unknown = "4.0123456789abcdef.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550";
    let reply = client.send("GET", &operation_path("sensor-13", unknown), Some(&token), b"").await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(reply.error_code(), 404202);
    // The error body in the shape real DPS sends, `"info": null` included (spec §1.6).
    let body = reply.body.as_object().unwrap();
    for field in ["errorCode", "trackingId", "message", "timestampUtc", "info"] {
        assert!(body.contains_key(field), "{field} missing: {}", reply.body);
    }
    assert!(body["info"].is_null());
    // An id no register reply could have given names no operation either.
    for malformed in ["bad_op", "UPPER.case", &"x".repeat(300)] {
        let reply = client.send("GET", &operation_path("sensor-13", malformed), Some(&token), b"").await;
        assert_eq!(reply.status, 404, "{malformed}: {}", reply.body);
        assert_eq!(reply.error_code(), 404202, "{malformed}");
    }

    let other_scope = "/0ne00000001/registrations/sensor-13/register?api-version=2021-06-01";
    let body = json!({ "registrationId": "sensor-13" }).to_string();
    let reply = client.send("PUT", other_scope, Some(&token), body.as_bytes()).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
}

#[tokio::test]
async fn admission_refusal_is_429_with_retry_after() {
    let limits = Limits { max_concurrent_requests: 0, throttle_retry_after_secs: 7, ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("sensor-14");
    let mut client = server.connect(None).await;
    let body = json!({ "registrationId": "sensor-14" }).to_string();
    let reply =
        client.send("PUT", &register_path("sensor-14"), Some(&sas(&key, "sensor-14")), body.as_bytes()).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.error_code(), 429001);
    assert_eq!(reply.header("retry-after"), Some("7"));
}

#[tokio::test]
async fn server_stops_when_asked_while_a_client_is_connected() {
    let server = Server::start().await;
    let _idle_client = server.connect(None).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), server.stop()).await.expect("server drained");
}
