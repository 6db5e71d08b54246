//! Bad credentials get the right CONNACK or error status; bad and slow input is cut off
//! without disturbing other devices; admission answers 429.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mqtt_support;

use std::time::Duration;

use mqtt_support::{
    connect, derived_key, in_an_hour, python_token, register, Auth, DeviceOptions, RawDevice, Server, API,
    HUB, SCOPE,
};
use rumqttc::{ConnectReturnCode, ConnectionError, Packet, Publish, QoS, Subscribe, SubscribeReasonCode};
use zerotouch_testkit::certs::TestCa;
use zerotouch_transport::limits::Limits;

fn refused(result: Result<mqtt_support::Outcome, ConnectionError>) -> ConnectReturnCode {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a refused CONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_symmetric_key_is_refused_with_connack_not_authorized() {
    let server = Server::start().await;
    server.enroll_symmetric("sensor-1");
    let opts = DeviceOptions::new("sensor-1", Auth::SasPython(vec![7u8; 32]));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::NotAuthorized);
    server.shutdown().await;
}

#[tokio::test]
async fn group_key_used_directly_instead_of_the_derived_key_is_refused() {
    let server = Server::start().await;
    let group_key = server.enroll_symmetric_group("thermostats");
    let opts = DeviceOptions::new("thermostat-1", Auth::SasNode(group_key.clone()));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::NotAuthorized);
    // The same device with its derived key gets in.
    let opts = DeviceOptions::new("thermostat-1", Auth::SasNode(derived_key(&group_key, "thermostat-1")));
    assert_eq!(register(&server, &opts).await.unwrap().status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn expired_token_is_refused_with_connack_not_authorized() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-2");
    let expired = python_token(&key, "sensor-2", in_an_hour() - 7200);
    let opts = DeviceOptions::new("sensor-2", Auth::Password(expired));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::NotAuthorized);
    server.shutdown().await;
}

#[tokio::test]
async fn token_signed_for_another_registration_is_refused() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-3");
    server.enroll_symmetric("sensor-4");
    let other = python_token(&key, "sensor-3", in_an_hour());
    let opts = DeviceOptions::new("sensor-4", Auth::Password(other));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::NotAuthorized);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_username_is_refused_as_bad_username_and_mismatched_client_id_as_bad_identifier() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("sensor-5");
    let mut opts = DeviceOptions::new("sensor-5", Auth::SasPython(key.clone()));
    opts.username = Some(format!("{SCOPE}/devices/sensor-5/api-version={API}"));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::BadUserNamePassword);
    let mut opts = DeviceOptions::new("sensor-5", Auth::SasPython(key));
    opts.username = Some(format!("{SCOPE}/registrations/sensor-6/api-version={API}"));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::BadClientId);
    server.shutdown().await;
}

#[tokio::test]
async fn device_without_token_or_certificate_is_refused() {
    let server = Server::start().await;
    server.enroll_symmetric("sensor-7");
    let opts = DeviceOptions::new("sensor-7", Auth::Password(String::new()));
    assert_eq!(refused(register(&server, &opts).await), ConnectReturnCode::NotAuthorized);
    server.shutdown().await;
}

#[tokio::test]
async fn sas_for_an_enrollment_of_another_attestation_connects_but_register_answers_401() {
    let server = Server::start().await;
    let camera = TestCa::root("Camera Root").device("camera-7");
    server.enroll_x509("camera-7", camera.pem());
    // A well-formed token for a registration whose enrollment wants a certificate: an
    // enrollment problem, told in the register reply, not a bad token refused at CONNACK.
    let opts = DeviceOptions::new("camera-7", Auth::SasPython(vec![7u8; 32]));
    let outcome = register(&server, &opts).await.unwrap();
    assert_eq!((outcome.status, outcome.error_code()), (401, Some(401_002)), "{outcome:?}");
    assert!(!server.hub_has_device("camera-7"));
    server.shutdown().await;
}

#[tokio::test]
async fn unenrolled_certificate_connects_but_register_answers_401() {
    let server = Server::start().await;
    let stranger = TestCa::root("Unknown Root").device("camera-9");
    let auth = Auth::X509(stranger.chain_der(), stranger.key_der().to_vec());
    let outcome = register(&server, &DeviceOptions::new("camera-9", auth)).await.unwrap();
    assert_eq!(outcome.status, 401, "{outcome:?}");
    assert_eq!(outcome.error_code().map(|c| c / 1000), Some(401));
    assert!(!server.hub_has_device("camera-9"));
    server.shutdown().await;
}

/// Sends a PINGREQ every 100 ms for `how_long`, or until the server has closed the connection.
async fn keep_pinging(device: &mut RawDevice, how_long: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < how_long {
        // Written by hand: the connection may be gone already.
        if tokio::io::AsyncWriteExt::write_all(&mut device.stream, &[0xC0, 0x00]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_certificate_nobody_enrolled_cannot_hold_a_connection() {
    let limits = Limits { connect_timeout: Duration::from_millis(500), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let stranger = TestCa::root("Squatter Root").device("camera-13");
    let auth = Auth::X509(stranger.chain_der(), stranger.key_der().to_vec());

    // Connected, then only pinging: its certificate was never accepted, so pings buy no time.
    let mut squatter = RawDevice::open_with(&server, &auth).await;
    assert!(matches!(squatter.connect_x509("camera-13", u16::MAX).await, Packet::ConnAck(_)));
    keep_pinging(&mut squatter, Duration::from_secs(3)).await;
    assert!(
        squatter.closed_within(Duration::from_secs(3)).await,
        "a never-accepted certificate held its slot"
    );

    // Told 401, a device has nothing more to do on its connection: it gets the CONNECT deadline
    // to read the answer and leave.
    let mut refused = RawDevice::open_with(&server, &auth).await;
    refused.connect_x509("camera-13", 60).await;
    refused.send(register_publish("1", "camera-13", 1)).await;
    loop {
        match refused.next().await {
            Some(Packet::Publish(p)) => {
                assert!(p.topic.starts_with("$dps/registrations/res/401/"), "{}", p.topic);
                break;
            }
            Some(_) => {}
            None => panic!("closed before the 401"),
        }
    }
    assert!(refused.closed_within(Duration::from_secs(3)).await, "open after its 401");

    // The same for a token: accepted at CONNECT, refused later (here: another registration's
    // enrollment kind), it holds its slot no longer than the CONNECT deadline after the 401.
    let key = server.enroll_symmetric("camera-14");
    let mut expired = RawDevice::open(&server).await;
    expired.connect("camera-14", &key, u16::MAX).await;
    server.enroll_x509("camera-14", stranger.pem());
    expired.send(register_publish("2", "camera-14", 1)).await;
    keep_pinging(&mut expired, Duration::from_secs(3)).await;
    assert!(expired.closed_within(Duration::from_secs(3)).await, "a refused token held its slot");
    server.shutdown().await;
}

#[tokio::test]
async fn certificate_whose_cn_is_not_the_registration_id_is_answered_401() {
    let server = Server::start().await;
    let root = TestCa::root("Fabrikam Root");
    server.enroll_x509_group("cameras", root.pem());
    let device = root.device("camera-10");
    let auth = Auth::X509(device.chain_der(), device.key_der().to_vec());
    let outcome = register(&server, &DeviceOptions::new("camera-11", auth)).await.unwrap();
    assert_eq!(outcome.status, 401, "{outcome:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn register_beyond_admission_is_answered_429_with_retry_after() {
    let limits = Limits { max_concurrent_requests: 0, throttle_retry_after_secs: 7, ..Limits::default() };
    let server = Server::start_with(limits).await;
    let root = TestCa::root("Fabrikam Root");
    let device = root.device("camera-12");
    server.enroll_x509("camera-12", device.pem());
    let auth = Auth::X509(device.chain_der(), device.key_der().to_vec());
    let outcome = register(&server, &DeviceOptions::new("camera-12", auth)).await.unwrap();
    assert_eq!(outcome.status, 429);
    assert_eq!(outcome.retry_after, Some(7));
    assert_eq!(outcome.error_code(), Some(429_001));
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_packet_garbage_and_slow_connect_are_cut_while_a_good_device_registers() {
    let limits =
        Limits { max_packet_size: 4096, connect_timeout: Duration::from_millis(700), ..Limits::default() };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("good-1");
    let big_key = server.enroll_symmetric("big-1");

    // Connected, then a publish far over the packet limit.
    let mut oversized = RawDevice::open(&server).await;
    assert!(
        matches!(oversized.connect("big-1", &big_key, 60).await, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success)
    );
    let topic = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; 64 * 1024]);
    publish.pkid = 1;
    oversized.send(Packet::Publish(publish)).await;
    // Bytes that are not MQTT at all.
    let mut garbage = RawDevice::open(&server).await;
    garbage.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    // TLS done, CONNECT never sent.
    let mut slow = RawDevice::open(&server).await;

    // All three are open while a well-behaved device registers.
    let opts = DeviceOptions::new("good-1", Auth::SasPython(key));
    let outcome = register(&server, &opts).await.unwrap();
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.assigned_hub(), Some(HUB));

    assert!(oversized.closed_within(Duration::from_secs(5)).await, "oversized packet not cut");
    assert!(garbage.closed_within(Duration::from_secs(5)).await, "garbage not cut");
    assert!(slow.closed_within(Duration::from_secs(5)).await, "slow CONNECT not cut");
    assert!(!server.hub_has_device("big-1"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_for_an_unknown_scope_cannot_hold_a_connection_by_pinging() {
    let limits = Limits { connect_timeout: Duration::from_millis(500), ..Limits::default() };
    let server = Server::start_with(limits).await;
    // CONNACK 0 (the register reply is what tells a mistyped scope from a wrong key), but the
    // garbage token proved nothing: pings buy no time beyond the CONNECT deadline.
    let mut forger = RawDevice::open(&server).await;
    let mut connect = rumqttc::Connect::new("dev-404");
    connect.keep_alive = u16::MAX;
    connect.set_login(
        "0ne00000000/registrations/dev-404/api-version=2021-06-01",
        "SharedAccessSignature sr=x&sig=AAAA&se=1",
    );
    forger.send(Packet::Connect(connect)).await;
    match forger.next().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    keep_pinging(&mut forger, Duration::from_secs(3)).await;
    assert!(forger.closed_within(Duration::from_secs(3)).await, "an unproven token held its slot");

    // A valid token that never asks for anything is no different.
    let key = server.enroll_symmetric("idle-1");
    let mut idle = RawDevice::open(&server).await;
    idle.connect("idle-1", &key, u16::MAX).await;
    keep_pinging(&mut idle, Duration::from_secs(3)).await;
    assert!(idle.closed_within(Duration::from_secs(3)).await, "a device that never registered held its slot");

    // A device whose register was answered keeps its connection for as long as it pings.
    let key = server.enroll_symmetric("busy-1");
    let mut busy = RawDevice::open(&server).await;
    busy.connect("busy-1", &key, 60).await;
    busy.send(register_publish("1", "busy-1", 1)).await;
    assert_eq!(reply_statuses(&mut busy, 1).await, [("1".to_owned(), 202)]);
    keep_pinging(&mut busy, Duration::from_secs(2)).await;
    busy.send(Packet::PingReq).await;
    assert_eq!(busy.next().await, Some(Packet::PingResp), "an accepted device was cut off");
    server.shutdown().await;
}

#[tokio::test]
async fn a_throttled_device_keeps_its_connection_for_the_retry_after_it_was_given() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(500),
        max_concurrent_requests: 0,
        throttle_retry_after_secs: 1,
        ..Limits::default()
    };
    let server = Server::start_with(limits).await;
    // A certificate (a token is checked at CONNECT, which admission refuses here too).
    let cert = TestCa::root("Late Root").device("late-1");
    server.enroll_x509("late-1", cert.pem());
    let mut device =
        RawDevice::open_with(&server, &Auth::X509(cert.chain_der(), cert.key_der().to_vec())).await;
    device.connect_x509("late-1", 60).await;
    device.send(register_publish("1", "late-1", 1)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, [("1".to_owned(), 429)]);
    // Told to come back in a second, it may: past the CONNECT deadline, within retry-after
    // plus that deadline.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    device.send(Packet::PingReq).await;
    assert_eq!(device.next().await, Some(Packet::PingResp), "cut off while waiting as told");
    // Nothing proven by then: no more time than that.
    keep_pinging(&mut device, Duration::from_secs(2)).await;
    assert!(device.closed_within(Duration::from_secs(2)).await, "a throttled, unproven device held its slot");
    server.shutdown().await;
}

#[tokio::test]
async fn a_device_answered_500_late_keeps_its_connection_to_send_again() {
    // The engine answers after 1.5 s; the endpoint gives up on it after 0.8 s with a 500, past
    // the CONNECT deadline (0.5 s) of the still unproven connection.
    let limits = Limits {
        connect_timeout: Duration::from_millis(500),
        engine_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let server = Server::start_slow(limits, Duration::from_millis(1500)).await;
    let key = server.enroll_symmetric("slow-1");
    let mut device = RawDevice::open(&server).await;
    device.connect("slow-1", &key, 60).await;
    device.send(register_publish("1", "slow-1", 1)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, [("1".to_owned(), 500)]);
    // As the SDKs do: wait a little, then go on on the same connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    device.send(Packet::PingReq).await;
    assert_eq!(device.next().await, Some(Packet::PingResp), "cut off right after its 500");
    server.shutdown().await;
}

#[tokio::test]
async fn silent_device_is_cut_after_one_and_a_half_keep_alives_and_pings_keep_it_open() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("quiet-1");
    let mut quiet = RawDevice::open(&server).await;
    quiet.connect("quiet-1", &key, 1).await;
    let mut pinging = RawDevice::open(&server).await;
    pinging.connect("quiet-1", &key, 1).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        pinging.send(Packet::PingReq).await;
        assert_eq!(pinging.next().await, Some(Packet::PingResp));
    }
    assert!(quiet.closed_within(Duration::from_secs(1)).await, "silent device still connected");
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_grants_the_dps_filter_at_most_qos_1_and_refuses_others() {
    let server = Server::start().await;
    let mut device = RawDevice::enrolled_and_connected(&server, "sub-1").await;
    let mut subscribe = Subscribe::new("$dps/registrations/res/#", QoS::ExactlyOnce);
    subscribe.pkid = 5;
    subscribe.add("devices/sub-1/messages/devicebound/#".to_owned(), QoS::AtLeastOnce);
    device.send(Packet::Subscribe(subscribe)).await;
    match device.next().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 5);
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce), SubscribeReasonCode::Failure]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_returns() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("idle-1");
    let opts = DeviceOptions::new("idle-1", Auth::SasPython(key));
    let (_client, mut events) = connect(&server, &opts).await.unwrap();
    server.shutdown().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection survived the shutdown");
}

fn register_publish(rid: &str, registration_id: &str, pkid: u16) -> Packet {
    let topic = format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}");
    let body = format!(r#"{{"registrationId":"{registration_id}"}}"#);
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, body.into_bytes());
    publish.pkid = pkid;
    Packet::Publish(publish)
}

/// A certificate is judged by the register request, so its body is decoded before the device is
/// authenticated: the payload is only syntax-checked there. One nested deeper than serde_json
/// builds trees for, from a certificate nobody enrolled, gets the 401; from the enrolled one,
/// the 400 of a body that is not a DeviceRegistration.
#[tokio::test]
async fn a_register_payload_is_parsed_only_after_the_certificate_is_accepted() {
    let server = Server::start().await;
    let device = TestCa::root("Payload Root").device("camera-15");
    server.enroll_x509("camera-15", device.pem());
    let stranger = TestCa::root("Stranger Root").device("camera-15");
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let body = format!(r#"{{"registrationId":"camera-15","payload":{deep}}}"#);
    let topic = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    for (cert, status) in [(&stranger, 401), (&device, 400)] {
        let auth = Auth::X509(cert.chain_der(), cert.key_der().to_vec());
        let mut raw = RawDevice::open_with(&server, &auth).await;
        raw.connect_x509("camera-15", 60).await;
        raw.send(Packet::Publish(Publish::new(topic, QoS::AtMostOnce, body.clone().into_bytes()))).await;
        assert_eq!(reply_statuses(&mut raw, 1).await, [("1".to_owned(), status)]);
    }
    assert!(!server.hub_has_device("camera-15"));
    server.shutdown().await;
}

/// The statuses of the next `n` replies (PUBACKs skipped), in arrival order.
async fn reply_statuses(device: &mut RawDevice, n: usize) -> Vec<(String, u16)> {
    let mut replies = Vec::new();
    while replies.len() < n {
        match device.next().await {
            Some(Packet::Publish(p)) => {
                let topic = zerotouch_proto::mqtt::ResponseTopic::parse(&p.topic).unwrap();
                replies.push((topic.rid, topic.status));
            }
            Some(_) => {}
            None => panic!("connection closed after {} replies", replies.len()),
        }
    }
    replies
}

#[tokio::test]
async fn shutdown_lets_a_request_in_progress_finish_and_deliver_its_reply() {
    let delay = Duration::from_millis(600);
    let server = Server::start_slow(Limits::default(), delay).await;
    let mut device = RawDevice::enrolled_and_connected(&server, "late-1").await;
    device.send(register_publish("9", "late-1", 1)).await;
    assert!(matches!(device.next().await, Some(Packet::PubAck(_))));
    // The register is now in the (slow) engine; stop the server meanwhile.
    let stopping = tokio::spawn(server.shutdown());
    let operation_id = assigning_reply(&mut device, "9").await;
    // The device, told to poll, may still do so while the server drains, and hears the result.
    device.send(poll_publish("10", &operation_id, 2)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("10".to_owned(), 200)]);
    assert!(device.closed_within(Duration::from_secs(5)).await, "connection not closed after draining");
    stopping.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_a_device_between_register_and_poll_finish_its_registration() {
    let server = Server::start().await;
    let mut device = RawDevice::enrolled_and_connected(&server, "mid-1").await;
    device.send(register_publish("1", "mid-1", 1)).await;
    let operation_id = assigning_reply(&mut device, "1").await;
    // SIGTERM while the device waits out its retry-after.
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    device.send(poll_publish("2", &operation_id, 2)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("2".to_owned(), 200)]);
    // As the Node SDK does: it unsubscribes before it disconnects, and must be answered (it
    // never reports its result when the connection drops first).
    device.send(Packet::Unsubscribe(rumqttc::Unsubscribe::new("$dps/registrations/res/#"))).await;
    loop {
        match device.next().await {
            Some(Packet::UnsubAck(_)) => break,
            Some(_) => {}
            None => panic!("connection closed before the UNSUBACK"),
        }
    }
    device.send(Packet::Disconnect).await;
    assert!(device.closed_within(Duration::from_secs(5)).await, "connection not closed once registered");
    tokio::time::timeout(Duration::from_secs(5), stopping).await.expect("shutdown ends").unwrap();
}

fn poll_publish(rid: &str, operation_id: &str, pkid: u16) -> Packet {
    let topic =
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}");
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, b" ".to_vec());
    publish.pkid = pkid;
    Packet::Publish(publish)
}

/// Waits for the `202 assigning` reply to `rid` (PUBACKs skipped); returns its operation id.
async fn assigning_reply(device: &mut RawDevice, rid: &str) -> String {
    loop {
        match device.next().await {
            Some(Packet::Publish(p)) => {
                let topic = zerotouch_proto::mqtt::ResponseTopic::parse(&p.topic).unwrap();
                assert_eq!((topic.rid.as_str(), topic.status), (rid, 202));
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                return body["operationId"].as_str().unwrap().to_owned();
            }
            Some(_) => {}
            None => panic!("connection closed before the reply to {rid}"),
        }
    }
}

#[tokio::test]
async fn a_register_is_acknowledged_before_its_reply_and_a_slow_one_without_waiting_for_the_engine() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("ack-1");
    let mut device = RawDevice::open(&server).await;
    device.connect("ack-1", &key, 60).await;
    device.send(register_publish("4", "ack-1", 7)).await;
    assert!(matches!(device.next().await, Some(Packet::PubAck(ack)) if ack.pkid == 7));
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("4".to_owned(), 202)]);
    server.shutdown().await;

    let delay = Duration::from_secs(2);
    let server = Server::start_slow(Limits::default(), delay).await;
    let mut device = RawDevice::enrolled_and_connected(&server, "ack-2").await;
    let sent = std::time::Instant::now();
    device.send(register_publish("5", "ack-2", 8)).await;
    assert!(matches!(device.next().await, Some(Packet::PubAck(ack)) if ack.pkid == 8));
    assert!(sent.elapsed() < delay / 2, "the PUBACK waited for the engine: {:?}", sent.elapsed());
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("5".to_owned(), 202)]);
    server.shutdown().await;
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_wait_instead_of_being_dropped() {
    let delay = Duration::from_millis(300);
    let limits = Limits { max_in_flight_per_connection: 1, ..Limits::default() };
    let server = Server::start_slow(limits, delay).await;
    let mut device = RawDevice::enrolled_and_connected(&server, "busy-1").await;
    let started = std::time::Instant::now();
    for (pkid, rid) in [(1, "a"), (2, "b"), (3, "c")] {
        device.send(register_publish(rid, "busy-1", pkid)).await;
    }
    let replies = reply_statuses(&mut device, 3).await;
    let rids: Vec<&str> = replies.iter().map(|(rid, _)| rid.as_str()).collect();
    assert_eq!(rids, ["a", "b", "c"]);
    assert!(replies.iter().all(|(_, status)| *status == 202), "{replies:?}");
    // One at a time: three slow calls back to back.
    assert!(started.elapsed() >= delay * 3, "requests overlapped: {:?}", started.elapsed());
    server.shutdown().await;
}

#[tokio::test]
async fn register_body_over_the_body_limit_is_answered_413_and_the_connection_stays_usable() {
    let limits = Limits { max_body_size: 256, ..Limits::default() };
    let server = Server::start_with(limits).await;
    let mut device = RawDevice::enrolled_and_connected(&server, "chatty-1").await;
    let topic = "$dps/registrations/PUT/iotdps-register/?$rid=big";
    let body = format!(r#"{{"registrationId":"chatty-1","payload":"{}"}}"#, "x".repeat(1024));
    let mut publish = Publish::new(topic, QoS::AtMostOnce, body.into_bytes());
    publish.pkid = 0;
    device.send(Packet::Publish(publish)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("big".to_owned(), 413)]);
    device.send(register_publish("small", "chatty-1", 2)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("small".to_owned(), 202)]);
    server.shutdown().await;
}

#[tokio::test]
async fn publish_to_a_non_dps_topic_is_ignored_and_register_still_works() {
    let server = Server::start().await;
    let mut device = RawDevice::enrolled_and_connected(&server, "lost-1").await;
    let mut stray = Publish::new("devices/lost-1/messages/events/", QoS::AtLeastOnce, b"{}".to_vec());
    stray.pkid = 1;
    device.send(Packet::Publish(stray)).await;
    device.send(register_publish("ok", "lost-1", 2)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("ok".to_owned(), 202)]);
    server.shutdown().await;
}

#[tokio::test]
async fn register_body_that_is_not_json_is_answered_400() {
    let server = Server::start().await;
    let mut device = RawDevice::enrolled_and_connected(&server, "typo-1").await;
    let mut publish = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=7",
        QoS::AtLeastOnce,
        b"{not json".to_vec(),
    );
    publish.pkid = 1;
    device.send(Packet::Publish(publish)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, vec![("7".to_owned(), 400)]);
    server.shutdown().await;
}

/// Whether a TLS handshake with the server completes (the connection is then dropped).
async fn handshake_completes(server: &Server) -> bool {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = mqtt_support::client_tls(&server.ca_pem, &Auth::Password(String::new()), false);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    matches!(tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await, Ok(Ok(_)))
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_a_freed_slot_admits_the_next_device() {
    let server = Server::start_with(Limits { max_connections: 2, ..Limits::default() }).await;
    let key = server.enroll_symmetric("after-1");
    let first = RawDevice::open(&server).await;
    let second = RawDevice::open(&server).await;
    // The server accepts the third and closes it at once: its handshake never completes.
    assert!(!handshake_completes(&server).await, "a third connection got past a limit of two");

    drop(first);
    // The slot frees once the server notices the first connection closed.
    let mut admitted = false;
    for _ in 0..50 {
        if handshake_completes(&server).await {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "a closed connection did not free its slot");
    // With a slot free (once the probe above is noticed gone), a device registers as usual
    // while the second connection stays open.
    let opts = DeviceOptions::new("after-1", Auth::SasPython(key));
    let mut outcome = register(&server, &opts).await;
    for _ in 0..50 {
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        outcome = register(&server, &opts).await;
    }
    assert_eq!(outcome.unwrap().status, 200);
    drop(second);
    server.shutdown().await;
}

#[tokio::test]
async fn an_mqtt_5_connect_is_refused_with_unacceptable_protocol_version() {
    let server = Server::start().await;
    let mut device = RawDevice::open(&server).await;
    // CONNECT, protocol "MQTT" level 5, clean start, keep-alive 60, no properties, client id "a".
    device
        .write(&[
            0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01, b'a',
        ])
        .await;
    match device.next().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    assert!(device.closed_within(Duration::from_secs(5)).await, "refused connection left open");
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_devices_that_have_not_finished_their_handshake_or_sent_their_connect() {
    let limits = Limits {
        connect_timeout: Duration::from_secs(120),
        shutdown_grace: Duration::from_secs(120),
        ..Limits::default()
    };
    let server = Server::start_with(limits).await;
    let _quiet = RawDevice::open(&server).await;
    let _no_handshake = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Let the accept loop take both in before the stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Shutdown must sit out neither the CONNECT deadline nor the grace it gives connections
    // that are doing something (`shutdown` gives up after 20 s).
    server.shutdown().await;
}

#[tokio::test]
async fn packets_mqtt_3_1_1_forbids_cut_the_connection() {
    let server = Server::start().await;
    // SUBSCRIBE must carry header flags 0010 (§2.2.2): here 0000.
    let mut device = RawDevice::enrolled_and_connected(&server, "strict-1").await;
    let filter = b"$dps/registrations/res/#";
    let mut subscribe = vec![0x80, u8::try_from(2 + 2 + filter.len() + 1).unwrap(), 0, 1, 0, 24];
    subscribe.extend_from_slice(filter);
    subscribe.push(1);
    device.write(&subscribe).await;
    assert!(device.closed_within(Duration::from_secs(3)).await, "SUBSCRIBE with wrong flags not cut");

    // A PUBLISH topic may not hold a wildcard (§3.3.2.1).
    let mut device = RawDevice::enrolled_and_connected(&server, "strict-2").await;
    device
        .send(Packet::Publish(rumqttc::Publish::new(
            "$dps/registrations/PUT/iotdps-register/#",
            rumqttc::QoS::AtMostOnce,
            "{}",
        )))
        .await;
    assert!(device.closed_within(Duration::from_secs(3)).await, "wildcard PUBLISH not cut");

    // CONNECT's reserved flag must be 0 (§3.1.2.3).
    let key = server.enroll_symmetric("strict-3");
    let mut connect = rumqttc::Connect::new("strict-3");
    connect.set_login(
        format!("{SCOPE}/registrations/strict-3/api-version={API}"),
        python_token(&key, "strict-3", in_an_hour()),
    );
    let mut bytes = bytes::BytesMut::new();
    Packet::Connect(connect).write(&mut bytes, usize::MAX).unwrap();
    // Fixed header (type, then the remaining length in one or two bytes here), "MQTT", level.
    let length_bytes = if bytes[1] & 0x80 == 0 { 1 } else { 2 };
    let flags_at = 1 + length_bytes + 2 + 4 + 1;
    bytes[flags_at] |= 1;
    let mut device = RawDevice::open(&server).await;
    device.write(&bytes).await;
    assert_eq!(device.next().await, None, "CONNECT with the reserved flag was answered");

    // A well-formed device still registers.
    let mut good = RawDevice::enrolled_and_connected(&server, "strict-4").await;
    good.send(register_publish("1", "strict-4", 1)).await;
    assert!(matches!(good.next().await, Some(Packet::PubAck(_))));
    drop(good);
    server.shutdown().await;
}

#[tokio::test]
async fn a_device_that_connects_again_takes_over_from_its_stale_connection() {
    let limits = Limits::default();
    let server = Server::start_with(limits.clone()).await;
    let key = server.enroll_symmetric("pump-7");
    // Its first connection went silent (a dropped network, say) but the server still holds it.
    let mut stale = RawDevice::open(&server).await;
    assert!(matches!(stale.connect("pump-7", &key, 60).await, Packet::ConnAck(_)));
    stale.send(register_publish("0", "pump-7", 1)).await;
    assert_eq!(reply_statuses(&mut stale, 1).await, [("0".to_owned(), 202)]);
    // MQTT 3.1.1 §3.1.4-2: a client that connects with the client id of a connected client
    // disconnects the existing one; here once the engine has answered it (authenticated it).
    // The client id is the registration id, matched as registration ids are.
    let mut fresh = RawDevice::open(&server).await;
    assert!(matches!(fresh.connect("PUMP-7", &key, 60).await, Packet::ConnAck(_)));
    fresh.send(register_publish("1", "PUMP-7", 1)).await;
    assert_eq!(reply_statuses(&mut fresh, 1).await, [("1".to_owned(), 202)]);
    assert!(stale.closed_within(Duration::from_secs(3)).await, "the stale connection stayed open");

    // A connection that never proved itself takes over nothing: a certificate nobody enrolled,
    // naming the device, leaves the device's connection alone.
    let stranger = TestCa::root("Squatter Root").device("pump-7");
    let mut squatter =
        RawDevice::open_with(&server, &Auth::X509(stranger.chain_der(), stranger.key_der().to_vec())).await;
    assert!(matches!(squatter.connect_x509("pump-7", 60).await, Packet::ConnAck(_)));
    squatter.send(register_publish("2", "pump-7", 1)).await;
    assert_eq!(reply_statuses(&mut squatter, 1).await, [("2".to_owned(), 401)]);
    fresh.send(register_publish("3", "PUMP-7", 2)).await;
    assert_eq!(
        reply_statuses(&mut fresh, 1).await,
        [("3".to_owned(), 202)],
        "the device kept its connection"
    );

    // Nor does a token with a made-up signature for a device enrolled with a certificate: the
    // CONNECT is accepted (its register will answer 401), but proves nothing.
    let camera = TestCa::root("Camera Root").device("cam-7");
    server.enroll_x509("cam-7", camera.pem());
    let mut device =
        RawDevice::open_with(&server, &Auth::X509(camera.chain_der(), camera.key_der().to_vec())).await;
    assert!(matches!(device.connect_x509("cam-7", 60).await, Packet::ConnAck(_)));
    device.send(register_publish("6", "cam-7", 1)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, [("6".to_owned(), 202)]);
    let mut forger = RawDevice::open(&server).await;
    assert!(matches!(forger.connect("cam-7", &[9u8; 32], 60).await, Packet::ConnAck(_)));
    forger.send(register_publish("7", "cam-7", 1)).await;
    assert_eq!(reply_statuses(&mut forger, 1).await, [("7".to_owned(), 401)]);
    device.send(register_publish("8", "cam-7", 2)).await;
    assert_eq!(reply_statuses(&mut device, 1).await, [("8".to_owned(), 202)], "a forged token took over");

    // Other devices are not affected, and a device may connect again after it disconnected.
    let other_key = server.enroll_symmetric("pump-8");
    let mut other = RawDevice::open(&server).await;
    assert!(matches!(other.connect("pump-8", &other_key, 60).await, Packet::ConnAck(_)));
    other.send(register_publish("9", "pump-8", 1)).await;
    assert_eq!(reply_statuses(&mut other, 1).await, [("9".to_owned(), 202)]);
    other.send(Packet::Disconnect).await;
    assert!(other.closed_within(Duration::from_secs(3)).await);
    let connected = limits.mqtt_clients.len();
    let mut again = RawDevice::open(&server).await;
    assert!(matches!(again.connect("pump-8", &other_key, 60).await, Packet::ConnAck(_)));
    again.send(register_publish("4", "pump-8", 1)).await;
    assert_eq!(reply_statuses(&mut again, 1).await, [("4".to_owned(), 202)]);
    // The id its closed connection held was released, and is held again.
    assert_eq!(limits.mqtt_clients.len(), connected + 1);
    fresh.send(register_publish("5", "PUMP-7", 3)).await;
    assert_eq!(reply_statuses(&mut fresh, 1).await, [("5".to_owned(), 202)]);
    // Told to poll, they would hold the shutdown for its grace.
    drop((fresh, again, squatter, device, forger));
    server.shutdown().await;
}
