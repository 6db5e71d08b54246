//! Devices register over MQTT/TLS the way the Azure SDKs do, with each kind of attestation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mqtt_support;

use mqtt_support::recording;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mqtt_support::{derived_key, register, Auth, DeviceOptions, Server, HUB, SCOPE};
use zerotouch_engine::provisioner::{OperationStatusRequest, RegisterRequest, Response, StatusLookupRequest};
use zerotouch_proto::Timestamp;
use zerotouch_testkit::certs::TestCa;
use zerotouch_transport::limits::Limits;
use zerotouch_transport::service::DpsService;

#[tokio::test]
async fn individual_symmetric_key_device_with_python_token_is_assigned_and_created_in_the_hub() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-1");
    let outcome = register(&server, &DeviceOptions::new("sensor-1", Auth::SasPython(key))).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.body["status"], "assigned");
    assert_eq!(outcome.assigned_hub(), Some(HUB));
    assert_eq!(outcome.device_id(), Some("sensor-1"));
    assert!(server.hub_has_device("sensor-1"));
    server.shutdown().await;
}

#[tokio::test]
async fn group_symmetric_key_device_with_node_token_gets_its_derived_key_accepted() {
    let server = Server::start().await;
    let group_key = server.enroll_symmetric_group("thermostats");
    let key = derived_key(&group_key, "thermostat-007");
    let outcome = register(&server, &DeviceOptions::new("thermostat-007", Auth::SasNode(key))).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.assigned_hub(), Some(HUB));
    assert!(server.hub_has_device("thermostat-007"));
    server.shutdown().await;
}

#[tokio::test]
async fn register_reply_is_202_assigning_with_retry_after_like_real_dps() {
    let server = Server::start().await;
    let (client, mut events) = mqtt_support::enrolled_and_subscribed(&server, "sensor-2").await;
    let topic = "$dps/registrations/PUT/iotdps-register/?$rid=42";
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, r#"{"registrationId":"sensor-2"}"#)
        .await
        .unwrap();
    let first = mqtt_support::reply(&mut events, "42").await;
    assert_eq!(first.status, 202);
    assert_eq!(first.body["status"], "assigning");
    assert!(first.body["operationId"].as_str().is_some());
    assert!(first.retry_after.is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn a_poll_for_a_malformed_or_missing_operation_id_is_answered_404202_not_left_hanging() {
    let server = Server::start().await;
    let (client, mut events) = mqtt_support::enrolled_and_subscribed(&server, "sensor-3").await;
    let long = "x".repeat(300);
    for (rid, query) in [
        ("1", "&operationId=bad_op".to_owned()),
        ("2", "&operationId=".to_owned()),
        ("3", String::new()),
        ("4", format!("&operationId={long}")),
    ] {
        let poll = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}{query}");
        client.publish(poll, rumqttc::QoS::AtLeastOnce, false, " ").await.unwrap();
        let reply = mqtt_support::reply(&mut events, rid).await;
        assert_eq!(reply.status, 404, "{query}: {reply:?}");
        assert_eq!(reply.body["errorCode"], 404202, "{query}: {reply:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn individual_x509_device_presenting_its_certificate_is_assigned() {
    let server = Server::start().await;
    let root = TestCa::root("Fabrikam Root");
    let device = root.device("camera-1");
    server.enroll_x509("camera-1", device.pem());
    let auth = Auth::X509(device.chain_der(), device.key_der().to_vec());
    let outcome = register(&server, &DeviceOptions::new("camera-1", auth)).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.assigned_hub(), Some(HUB));
    assert!(server.hub_has_device("camera-1"));
    server.shutdown().await;
}

#[tokio::test]
async fn x509_group_device_chained_through_an_intermediate_is_assigned() {
    let server = Server::start().await;
    let root = TestCa::root("Contoso Root");
    let line = root.intermediate("Contoso Line 1");
    server.enroll_x509_group("cameras", line.pem());
    let device = line.device("camera-42");
    let auth = Auth::X509(device.chain_der(), device.key_der().to_vec());
    let outcome = register(&server, &DeviceOptions::new("camera-42", auth)).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.device_id(), Some("camera-42"));
    assert!(server.hub_has_device("camera-42"));
    server.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_only_client_like_python_registers() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("py-device");
    let mut opts = DeviceOptions::new("py-device", Auth::SasPython(key));
    opts.tls12_only = true;
    let outcome = register(&server, &opts).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.assigned_hub(), Some(HUB));
    server.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_only_x509_client_registers() {
    let server = Server::start().await;
    let root = TestCa::root("Fabrikam Root 12");
    let device = root.device("camera-tls12");
    server.enroll_x509("camera-tls12", device.pem());
    let mut opts =
        DeviceOptions::new("camera-tls12", Auth::X509(device.chain_der(), device.key_der().to_vec()));
    opts.tls12_only = true;
    let outcome = register(&server, &opts).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_version_1_device_certificate_registers_over_tls_1_2_and_1_3_and_a_wrong_key_is_refused() {
    use zerotouch_testkit::certs::{pem_to_der, x509_v1};

    let server = Server::start().await;
    server.enroll_x509_group("legacy", x509_v1::ROOT_PEM);
    let chain = vec![pem_to_der(x509_v1::DEVICE_PEM)];
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(x509_v1::DEVICE_KEY_PEM.as_bytes())
            .unwrap()
            .secret_der()
            .to_vec()
    };
    for tls12_only in [true, false] {
        let mut opts = DeviceOptions::new(x509_v1::REGISTRATION_ID, Auth::X509(chain.clone(), key.clone()));
        opts.tls12_only = tls12_only;
        let outcome = register(&server, &opts).await.unwrap();
        assert_eq!(outcome.status, 200, "TLS 1.2 only: {tls12_only}: {outcome:?}");
        assert_eq!(outcome.device_id(), Some(x509_v1::REGISTRATION_ID));
    }
    // Another key than the certificate's cannot sign the handshake for it.
    let other = TestCa::root("Other Root").device("x");
    for tls12_only in [true, false] {
        let auth = Auth::X509(chain.clone(), other.key_der().to_vec());
        let mut opts = DeviceOptions::new(x509_v1::REGISTRATION_ID, auth);
        opts.tls12_only = tls12_only;
        assert!(
            register(&server, &opts).await.is_err(),
            "TLS 1.2 only: {tls12_only}: a foreign key was taken"
        );
    }
    assert!(server.hub_has_device(x509_v1::REGISTRATION_ID));
    server.shutdown().await;
}

#[tokio::test]
async fn c_sdk_style_qos0_publishes_with_integer_rids_get_their_replies() {
    let server = Server::start().await;
    let (client, mut events) = mqtt_support::enrolled_and_subscribed(&server, "c-device").await;
    let body = r#"{"registrationId":"c-device"}"#;
    let register = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    client.publish(register, rumqttc::QoS::AtMostOnce, false, body).await.unwrap();
    let first = mqtt_support::reply(&mut events, "1").await;
    assert_eq!(first.status, 202);
    let operation_id = first.body["operationId"].as_str().unwrap();
    // The C SDK polls with the register body as payload.
    let poll =
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={operation_id}");
    client.publish(poll, rumqttc::QoS::AtMostOnce, false, body).await.unwrap();
    let done = mqtt_support::reply(&mut events, "2").await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.assigned_hub(), Some(HUB));
    server.shutdown().await;
}

/// The embedded C SDK's provisioning samples (azure-sdk-for-c) publish the register with no
/// payload at all, and poll with none: the registration id is the connection's.
#[tokio::test]
async fn an_embedded_sdk_device_registering_with_an_empty_payload_is_assigned() {
    let server = Server::start().await;
    let (client, mut events) = mqtt_support::enrolled_and_subscribed(&server, "embedded-1").await;
    let register = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    client.publish(register, rumqttc::QoS::AtLeastOnce, false, Vec::new()).await.unwrap();
    let first = mqtt_support::reply(&mut events, "1").await;
    assert_eq!(first.status, 202, "{first:?}");
    let operation_id = first.body["operationId"].as_str().unwrap();
    let poll =
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId={operation_id}");
    client.publish(poll, rumqttc::QoS::AtLeastOnce, false, Vec::new()).await.unwrap();
    let done = mqtt_support::reply(&mut events, "1").await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!((done.assigned_hub(), done.device_id()), (Some(HUB), Some("embedded-1")));
    assert!(server.hub_has_device("embedded-1"));
    // Whitespace alone is no body either; a body that is not JSON still is refused.
    client.publish(register.replace("=1", "=2"), rumqttc::QoS::AtLeastOnce, false, " \r\n").await.unwrap();
    assert_eq!(mqtt_support::reply(&mut events, "2").await.status, 202);
    client.publish(register.replace("=1", "=3"), rumqttc::QoS::AtLeastOnce, false, "{").await.unwrap();
    let refused = mqtt_support::reply(&mut events, "3").await;
    assert_eq!((refused.status, refused.error_code()), (400, Some(400_000)), "{refused:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn fifty_group_devices_registering_at_once_all_land_in_the_hub() {
    let server = std::sync::Arc::new(Server::start().await);
    let group_key = server.enroll_symmetric_group("fleet");
    let mut devices = tokio::task::JoinSet::new();
    for i in 0..50 {
        let server = server.clone();
        let id = format!("fleet-{i:03}");
        let key = derived_key(&group_key, &id);
        devices.spawn(async move {
            let outcome = register(&server, &DeviceOptions::new(&id, Auth::SasPython(key))).await.unwrap();
            (id, outcome)
        });
    }
    while let Some(done) = devices.join_next().await {
        let (id, outcome) = done.unwrap();
        assert_eq!(outcome.status, 200, "{id}: {outcome:?}");
        assert!(server.hub_has_device(&id), "{id} missing from the hub");
    }
    std::sync::Arc::into_inner(server).unwrap().shutdown().await;
}

/// An engine that holds every operation in memory (the in-memory engine never blocks): it
/// answers polls through `operation_status_in_memory` and counts those that still reach a
/// blocking thread.
struct PollsFromMemory {
    inner: Arc<dyn DpsService>,
    blocking_polls: Arc<AtomicUsize>,
}

impl DpsService for PollsFromMemory {
    fn register(&self, now: Timestamp, req: RegisterRequest) -> Response {
        self.inner.register(now, req)
    }

    fn operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response {
        self.blocking_polls.fetch_add(1, Ordering::SeqCst);
        self.inner.operation_status(now, req)
    }

    fn operation_status_in_memory(&self, now: Timestamp, req: &OperationStatusRequest) -> Option<Response> {
        Some(self.inner.operation_status(now, req.clone()))
    }

    fn status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response {
        self.inner.status_lookup(now, req)
    }
}

#[tokio::test]
async fn a_poll_the_engine_holds_in_memory_is_answered_without_a_blocking_thread() {
    let blocking_polls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&blocking_polls);
    let server = Server::start_wrapped(Limits::default(), move |inner| {
        Arc::new(PollsFromMemory { inner, blocking_polls: counter })
    })
    .await;
    let group_key = server.enroll_symmetric_group("meters");
    let key = derived_key(&group_key, "meter-7");
    let outcome = register(&server, &DeviceOptions::new("meter-7", Auth::SasPython(key))).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(outcome.device_id(), Some("meter-7"));
    assert!(server.hub_has_device("meter-7"));
    assert_eq!(blocking_polls.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_engine_is_told_the_api_version_of_the_username() {
    // Devices on 2018-04-01 and before keep their hub under an enrollment without a reprovision
    // policy (spec §8.3): the engine can only apply that if it hears the version.
    let (wrap, seen) = recording::ApiVersions::recorder();
    let server = Server::start_wrapped(Limits::default(), wrap).await;
    let key = server.enroll_symmetric("dev-old");
    let mut opts = DeviceOptions::new("dev-old", Auth::SasPython(key));
    opts.username = Some(format!("{SCOPE}/registrations/dev-old/api-version=2018-04-01&ClientVersion=c%2F1"));
    let outcome = register(&server, &opts).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert_eq!(*seen.lock().unwrap(), vec![Some("2018-04-01".to_owned())]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_the_engine_does_not_finish_in_time_is_answered_500() {
    let limits = Limits { engine_timeout: std::time::Duration::from_millis(300), ..Limits::default() };
    let server = Server::start_slow(limits, std::time::Duration::from_secs(3)).await;
    let key = server.enroll_symmetric("dev-stuck");
    let started = std::time::Instant::now();
    let outcome = register(&server, &DeviceOptions::new("dev-stuck", Auth::SasPython(key))).await.unwrap();
    assert_eq!((outcome.status, outcome.error_code()), (500, Some(500_000)), "{outcome:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    server.shutdown().await;
}

#[tokio::test]
async fn a_device_naming_an_unknown_api_version_is_told_so_as_over_https() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("dev-api");
    for (version, status) in [("2099-01-01", 400), ("", 400), ("2021-06-01", 202), ("2019-03-31", 202)] {
        let mut opts = DeviceOptions::new("dev-api", Auth::SasPython(key.clone()));
        opts.username = Some(format!("{SCOPE}/registrations/dev-api/api-version={version}"));
        let outcome = register(&server, &opts).await.unwrap();
        let outcome_status = if outcome.status == 200 { 202 } else { outcome.status };
        assert_eq!(outcome_status, status, "api-version {version:?}: {outcome:?}");
        if status == 400 {
            assert_eq!(outcome.error_code(), Some(400_000));
            assert!(outcome.body["message"].as_str().unwrap().contains("api-version"), "{outcome:?}");
        }
    }
    server.shutdown().await;
}
