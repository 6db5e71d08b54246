//! MQTT over WebSockets on the HTTPS listener (`/$iothub/websocket`, subprotocol `mqtt`), with
//! rumqttc as the device (what Python `websockets=True` and Node `MqttWs` do).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http_support;

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
