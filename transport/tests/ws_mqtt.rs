//! MQTT over WebSockets on the HTTPS listener (`/$iothub/websocket`, subprotocol `mqtt`), with
//! rumqttc as the device (what Python `websockets=True` and Node `MqttWs` do).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;
mod recording;

use std::sync::Arc;
use std::time::Duration;

use http_support::{sas, Server, HUB, SCOPE};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use zerotouch_testkit::certs::{CertSpec, TestCert};

const RESPONSES: &str = "$dps/registrations/res/#";

fn options(server: &Server, registration_id: &str, client: Option<&TestCert>) -> MqttOptions {
    let url = format!("wss://localhost:{}/$iothub/websocket", server.addr.port());
    let mut options = MqttOptions::new(registration_id, url, server.addr.port());
    options.set_transport(Transport::wss_with_config(TlsConfiguration::Rustls(Arc::new(
        server.client_config(client),
    ))));
    options.set_keep_alive(Duration::from_secs(60));
    options
}

/// Waits for the next PUBLISH on the response topics; returns (topic, JSON payload).
async fn next_response(events: &mut EventLoop) -> (String, Value) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("a reply within 10 s")
            .expect("connection stays up");
        if let Event::Incoming(Packet::Publish(p)) = event {
            return (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap());
        }
    }
}

/// Drives register → poll over one MQTT session and returns the final reply.
async fn register(client: &AsyncClient, events: &mut EventLoop, registration_id: &str) -> (String, Value) {
    client.subscribe(RESPONSES, QoS::AtLeastOnce).await.unwrap();
    let body = json!({ "payload": null, "registrationId": registration_id }).to_string();
    client
        .publish("$dps/registrations/PUT/iotdps-register/?$rid=1", QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    let (topic, accepted) = next_response(events).await;
    assert!(topic.starts_with("$dps/registrations/res/202/?$rid=1"), "{topic}: {accepted}");
    assert!(topic.contains("retry-after=3"), "{topic}");
    assert_eq!(accepted["status"], "assigning");
    let operation_id = accepted["operationId"].as_str().unwrap();
    let poll =
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={operation_id}");
    client.publish(poll, QoS::AtLeastOnce, false, " ").await.unwrap();
    next_response(events).await
}

#[tokio::test]
async fn symmetric_key_device_registers_over_websockets() {
    let server = Server::start().await;
    let key = server.enroll_symmetric("ws-sensor-1");
    let mut options = options(&server, "ws-sensor-1", None);
    options.set_credentials(
        format!("{SCOPE}/registrations/ws-sensor-1/api-version=2019-03-31"),
        sas(&key, "ws-sensor-1"),
    );
    let (client, mut events) = AsyncClient::new(options, 10);

    let (topic, done) = register(&client, &mut events, "ws-sensor-1").await;
    assert!(topic.starts_with("$dps/registrations/res/200/?$rid=2"), "{topic}: {done}");
    assert_eq!(done["status"], "assigned");
    assert_eq!(done["registrationState"]["assignedHub"], HUB);
    assert_eq!(done["registrationState"]["deviceId"], "ws-sensor-1");
    assert!(server.hub_has_device("ws-sensor-1"));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn x509_device_registers_over_websockets_with_its_tls_client_certificate() {
    let server = Server::start().await;
    let device = TestCert::self_signed(CertSpec::new("ws-camera-1"));
    server.enroll_x509(&device);
    let mut options = options(&server, "ws-camera-1", Some(&device));
    // X.509 devices send the username and no password.
    options.set_credentials(format!("{SCOPE}/registrations/ws-camera-1/api-version=2019-03-31"), "");
    let (client, mut events) = AsyncClient::new(options, 10);

    let (topic, done) = register(&client, &mut events, "ws-camera-1").await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic}: {done}");
    assert_eq!(done["status"], "assigned");
    assert!(server.hub_has_device("ws-camera-1"));
}

#[tokio::test]
async fn websocket_upgrade_needs_the_mqtt_subprotocol() {
    let server = Server::start().await;
    let mut client = server.connect(None).await;
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let amqp = [&upgrade[..], &[("sec-websocket-protocol", "AMQPWSB10")]].concat();
    let reply = client.send_with("GET", "/$iothub/websocket", &amqp, b"").await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.error_code(), 400000);

    // The C SDK spells it `MQTT`: accepted, and echoed as offered.
    let mut client = server.connect(None).await;
    let c_sdk = [&upgrade[..], &[("sec-websocket-protocol", "MQTT")]].concat();
    let reply = client.send_with("GET", "/$iothub/websocket", &c_sdk, b"").await;
    assert_eq!(reply.status, 101);
    assert_eq!(reply.header("sec-websocket-protocol"), Some("MQTT"));

    // A plain GET is not an upgrade.
    let mut client = server.connect(None).await;
    let reply = client.send("GET", "/$iothub/websocket", None, b"").await;
    assert_eq!(reply.status.as_u16() / 100, 4, "{}", reply.body);
    assert!(reply.body["message"].is_string());
}

/// One masked binary frame as a client sends it (RFC 6455 §5.2).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x82];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame; returns (opcode, payload).
async fn server_frame<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            io.read_exact(&mut ext).await.unwrap();
            usize::from(u16::from_be_bytes(ext))
        }
        127 => panic!("no server frame here is that long"),
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

#[tokio::test]
async fn mqtt_packets_spanning_websocket_frames_are_reassembled() {
    use rumqttc::mqttbytes::v4::{Connect, Packet as Wire, Subscribe};
    use rumqttc::mqttbytes::QoS as WireQoS;
    use tokio::io::AsyncWriteExt as _;

    let server = Server::start().await;
    let key = server.enroll_symmetric("ws-sensor-2");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(server.client_config(None)));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let handshake = "GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    tls.write_all(handshake.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut tls, &mut byte).await.unwrap();
        response.push(byte[0]);
    }
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(response.to_ascii_lowercase().contains("sec-websocket-protocol: mqtt"), "{response}");

    let mut connect = Connect::new("ws-sensor-2");
    connect.set_login(
        format!("{SCOPE}/registrations/ws-sensor-2/api-version=2019-03-31"),
        sas(&key, "ws-sensor-2"),
    );
    let mut subscribe = Subscribe::new(RESPONSES, WireQoS::AtLeastOnce);
    subscribe.pkid = 7;
    let mut bytes = bytes::BytesMut::new();
    connect.write(&mut bytes).unwrap();
    subscribe.write(&mut bytes).unwrap();
    // The CONNECT starts in one frame and ends in the next, which also carries the SUBSCRIBE.
    let (first, rest) = bytes.split_at(3);
    tls.write_all(&client_frame(first)).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tls.write_all(&client_frame(rest)).await.unwrap();
    tls.flush().await.unwrap();

    let mut received = bytes::BytesMut::new();
    let mut packets = Vec::new();
    while packets.len() < 2 {
        let (opcode, payload) = tokio::time::timeout(Duration::from_secs(10), server_frame(&mut tls))
            .await
            .expect("server answers");
        assert_eq!(opcode, 2, "MQTT travels in binary frames");
        received.extend_from_slice(&payload);
        while let Ok(packet) = Wire::read(&mut received, 1 << 20) {
            packets.push(packet);
        }
    }
    match &packets[0] {
        Wire::ConnAck(ack) => assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    match &packets[1] {
        Wire::SubAck(ack) => assert_eq!(ack.pkid, 7),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Enrolls `registration_id` with a symmetric key and connects it over WebSockets, subscribed to
/// the reply topics (SUBACK read).
async fn enrolled_and_subscribed(server: &Server, registration_id: &str) -> (AsyncClient, EventLoop) {
    let key = server.enroll_symmetric(registration_id);
    let mut options = options(server, registration_id, None);
    options.set_credentials(
        format!("{SCOPE}/registrations/{registration_id}/api-version=2019-03-31"),
        sas(&key, registration_id),
    );
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe(RESPONSES, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            return (client, events);
        }
    }
}

/// A session still waiting for the engine when the server stops is cut at the end of the grace
/// period, not waited for.
#[tokio::test]
async fn shutdown_closes_websocket_connections_after_the_grace_period() {
    let limits = zerotouch_transport::limits::Limits {
        shutdown_grace: Duration::from_millis(300),
        ..zerotouch_transport::limits::Limits::default()
    };
    let server = Server::start_wrapped(limits, recording::SlowService::by(Duration::from_secs(4))).await;
    let (client, mut events) = enrolled_and_subscribed(&server, "ws-sensor-3").await;
    let register = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    client.publish(register, QoS::AtLeastOnce, false, r#"{"registrationId":"ws-sensor-3"}"#).await.unwrap();
    // The register is in flight (the engine answers 4 s late) once its PUBACK is back.
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.stop()).await.expect("server drained");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?} for the engine", started.elapsed());
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the bridged MQTT connection is closed");
}

/// A WebSocket session drains at shutdown as an MQTT/TLS one does: an idle device (assigned,
/// nothing in flight) is closed at once, not kept for the whole grace period.
#[tokio::test]
async fn shutdown_closes_an_idle_websocket_session_at_once_not_after_the_grace_period() {
    let limits = zerotouch_transport::limits::Limits {
        shutdown_grace: Duration::from_secs(30),
        ..zerotouch_transport::limits::Limits::default()
    };
    let server = Server::start_with(limits).await;
    let key = server.enroll_symmetric("ws-sensor-5");
    let mut options = options(&server, "ws-sensor-5", None);
    options.set_credentials(
        format!("{SCOPE}/registrations/ws-sensor-5/api-version=2019-03-31"),
        sas(&key, "ws-sensor-5"),
    );
    let (client, mut events) = AsyncClient::new(options, 10);
    let (topic, done) = register(&client, &mut events, "ws-sensor-5").await;
    assert!(topic.starts_with("$dps/registrations/res/200/"), "{topic}: {done}");
    // The server stops well within the grace (30 s): the idle session did not hold it.
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("stopped before the grace ran out");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the idle session is closed");
}

#[tokio::test]
async fn an_upgraded_websocket_connection_keeps_its_connection_slot() {
    let limits = zerotouch_transport::limits::Limits { max_connections: 1, ..Default::default() };
    let server = Server::start_with(limits).await;
    let (client, mut events) = enrolled_and_subscribed(&server, "ws-sensor-4").await;
    // The WebSocket session is the one connection the limit allows: the next is closed before
    // its handshake completes, however long after the upgrade it comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(server.client_config(None)));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await;
    assert!(!matches!(second, Ok(Ok(_))), "a second connection got past a limit of one");
    // The session itself is still served.
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            false,
            r#"{"registrationId":"ws-sensor-4"}"#,
        )
        .await
        .unwrap();
    let (topic, _) = next_response(&mut events).await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}");
}
