//! The device client against recorded Azure DPS replies (testdata/azure), replayed by a scripted
//! TLS peer over MQTT and HTTPS: the paths a self-hosted server cannot show on demand (long
//! assigning phases, throttling, 5xx, failed assignments).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{json, Value};
use zerotouch_proto::sas::SasToken;
use zerotouch_transport::client::{
    ClientError, FailureKind, ProvisioningClient, ProvisioningClientBuilder, Transport,
};

use client_support::{azure_dir, scenario, Accept, Exchange, Fault, ScriptedPeer, ServerCert};

const SCOPE: &str = "0ne00111111";
const DEVICE_KEY: &str =
    "18RQk/hOPJR9EbsJlk2j8WA6vWaj/yi+oaYg7zmxfQNdOyMSu+SJ8O7TSlZhDJCYmn4rzEiVKIzNiVAWjLxrGA==";

async fn peer(transport: Transport, cert: &ServerCert, name: &str) -> ScriptedPeer {
    let s = scenario(name);
    match transport {
        Transport::Https => ScriptedPeer::https(cert, s.exchanges).await,
        _ => ScriptedPeer::mqtt(cert, s.exchanges, ConnectReturnCode::Success).await,
    }
}

fn client(
    transport: Transport,
    cert: &ServerCert,
    peer: &ScriptedPeer,
    registration_id: &str,
) -> ProvisioningClient {
    client_builder(transport, cert, peer, registration_id).build().unwrap()
}

fn client_builder(
    transport: Transport,
    cert: &ServerCert,
    peer: &ScriptedPeer,
    registration_id: &str,
) -> ProvisioningClientBuilder {
    ProvisioningClient::builder(SCOPE, registration_id)
        .provisioning_host(peer.host())
        .transport(transport)
        .symmetric_key(DEVICE_KEY)
        .ca_pem(cert.ca_pem.clone())
        .request_timeout(Duration::from_secs(10))
        .max_throttle_retries(1)
}

/// Runs a recorded scenario on one transport and checks the outcome the file states.
async fn replay(transport: Transport, name: &str) -> (ScriptedPeer, Result<(), ClientError>) {
    let cert = ServerCert::new();
    let s = scenario(name);
    let peer = peer(transport, &cert, name).await;
    let result = client(transport, &cert, &peer, &s.registration_id).register().await;
    let outcome = &s.outcome;
    let result = match (&outcome["assigned"], result) {
        (Value::Object(want), Ok(a)) => {
            assert_eq!(a.assigned_hub, want["assignedHub"], "{name} over {transport}");
            assert_eq!(a.device_id, want["deviceId"], "{name} over {transport}");
            assert_eq!(json!(a.substatus), want["substatus"], "{name} over {transport}");
            Ok(())
        }
        (Value::Null, Err(e)) => {
            let want = &outcome["error"];
            assert_eq!(e.status().map(u64::from), want["status"].as_u64(), "{name} over {transport}: {e}");
            assert_eq!(
                e.error_code().map(u64::from),
                want["errorCode"].as_u64(),
                "{name} over {transport}: {e}"
            );
            assert_eq!(
                e.failure_kind().map(|k| k.to_string()).as_deref(),
                want["kind"].as_str(),
                "{name}: {e}"
            );
            Err(e)
        }
        (_, other) => panic!("{name} over {transport}: unexpected result {other:?}"),
    };
    let expected_requests = s.exchanges.len();
    assert_eq!(
        peer.seen().len(),
        expected_requests,
        "{name} over {transport}: every scripted reply was asked for"
    );
    (peer, result)
}

const TRANSPORTS: [Transport; 2] = [Transport::Mqtt, Transport::Https];

/// Registers with the client `builder` makes, which must fail: the error, and how long it took.
async fn failure(builder: zerotouch_transport::client::ProvisioningClientBuilder) -> (ClientError, Duration) {
    let started = Instant::now();
    let e = builder.build().unwrap().register().await.unwrap_err();
    (e, started.elapsed())
}

#[tokio::test]
async fn device_is_assigned_after_one_assigning_poll() {
    for t in TRANSPORTS {
        let (peer, result) = replay(t, "assigned_after_one_poll.json").await;
        result.unwrap();
        let seen = peer.seen();
        // The register body names the device; the poll asks for the operation of the register reply.
        let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(body, json!({ "registrationId": "my-symkey-device" }));
        assert!(seen[1].target.contains("5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550"), "{t}");
        // The SAS token signs the registration resource with the device key.
        let token = SasToken::parse(seen[0].authorization.as_deref().unwrap()).unwrap();
        assert_eq!(token.resource().unwrap(), "0ne00111111/registrations/my-symkey-device");
        assert_eq!(token.key_name(), Some("registration"));
        let key = STANDARD.decode(DEVICE_KEY).unwrap();
        let expected = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            token.string_to_sign().as_bytes(),
        );
        assert_eq!(token.signature().unwrap(), expected.as_ref());
    }
}

#[tokio::test]
async fn custom_payload_and_api_version_reach_the_service() {
    for t in TRANSPORTS {
        let cert = ServerCert::new();
        let peer = peer(t, &cert, "assigned_after_one_poll.json").await;
        client_builder(t, &cert, &peer, "my-symkey-device")
            .payload(json!({ "site": "north", "floor": 3 }))
            .api_version("2019-03-31")
            .build()
            .unwrap()
            .register()
            .await
            .unwrap();
        let seen = peer.seen();
        let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(
            body,
            json!({ "registrationId": "my-symkey-device", "payload": { "site": "north", "floor": 3 } })
        );
        match t {
            Transport::Https => {
                assert!(seen[0].target.ends_with("?api-version=2019-03-31"), "{}", seen[0].target)
            }
            _ => assert!(peer.usernames.lock().unwrap()[0].contains("/api-version=2019-03-31&"), "{t}"),
        }
    }
}

#[tokio::test]
async fn device_sits_out_a_long_assigning_phase_honouring_retry_after() {
    for t in TRANSPORTS {
        let started = Instant::now();
        let (_peer, result) = replay(t, "long_assigning.json").await;
        result.unwrap();
        // Five replies asked for a one-second wait each before the next poll.
        assert!(started.elapsed() >= Duration::from_secs(5), "{t}: {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn throttled_register_is_resent_after_retry_after() {
    for t in TRANSPORTS {
        let (peer, result) = replay(t, "throttled_register_then_assigned.json").await;
        result.unwrap();
        let kinds: Vec<String> = peer.seen().into_iter().map(|s| s.request).collect();
        assert_eq!(kinds, ["register", "register", "poll"], "{t}");
    }
}

#[tokio::test]
async fn server_error_on_a_poll_is_retried_after_a_back_off() {
    for t in TRANSPORTS {
        replay(t, "server_error_then_assigned.json").await.1.unwrap();
    }
}

#[tokio::test]
async fn poll_reply_without_operation_id_keeps_the_registered_operation() {
    for t in TRANSPORTS {
        let (peer, result) = replay(t, "poll_reply_without_operation_id.json").await;
        result.unwrap();
        let seen = peer.seen();
        assert!(seen[2].target.contains("5.316aac5bdc130deb"), "{t}");
    }
}

#[tokio::test]
async fn wrong_key_reaches_the_app_as_401002() {
    for t in TRANSPORTS {
        let e = replay(t, "unauthorized.json").await.1.unwrap_err();
        assert!(e.is_unauthorized(), "{t}: {e}");
    }
}

#[tokio::test]
async fn unknown_registration_reaches_the_app_as_404201() {
    for t in TRANSPORTS {
        let e = replay(t, "unknown_registration.json").await.1.unwrap_err();
        assert_eq!(e.failure_kind(), Some(FailureKind::NotFound), "{t}");
    }
}

#[tokio::test]
async fn failed_assignment_carries_the_registration_state_error() {
    for t in TRANSPORTS {
        let e = replay(t, "assignment_failed.json").await.1.unwrap_err();
        assert!(e.to_string().contains("Hub not specified."), "{t}: {e}");
    }
}

#[tokio::test]
async fn client_gives_up_when_throttling_does_not_end() {
    for t in TRANSPORTS {
        replay(t, "throttled_until_giving_up.json").await.1.unwrap_err();
    }
}

#[tokio::test]
async fn mqtt_connect_refused_with_not_authorized_is_an_auth_error() {
    let cert = ServerCert::new();
    let peer = ScriptedPeer::mqtt(&cert, Vec::new(), ConnectReturnCode::NotAuthorized).await;
    let e = client(Transport::Mqtt, &cert, &peer, "my-symkey-device").register().await.unwrap_err();
    assert!(matches!(e, ClientError::ConnectRefused { return_code: 5, .. }), "{e}");
    assert!(e.is_unauthorized());
    let username = peer.usernames.lock().unwrap()[0].clone();
    assert!(username.starts_with("0ne00111111/registrations/my-symkey-device/api-version=2021-06-01&ClientVersion=zerotouch-device%2F"), "{username}");
}

/// A register reply `assigning` with `retry-after: {retry_after}`, then `polls` poll replies: all
/// `assigning` (retry-after 1 s) but the last, which is `assigned` when `assigned_at_last`.
fn assigning_script(retry_after: &str, polls: usize, assigned_at_last: bool) -> Vec<Exchange> {
    let op = "5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550";
    let assigning = json!({"operationId": op, "status": "assigning",
        "registrationState": {"registrationId": "my-symkey-device", "status": "assigning"}});
    let assigned = json!({"operationId": op, "status": "assigned", "registrationState": {
        "registrationId": "my-symkey-device", "assignedHub": "hub.example", "deviceId": "my-symkey-device",
        "status": "assigned", "substatus": "initialAssignment"}});
    let exchange = |request: &str, retry_after: Option<&str>, body: &Value| Exchange {
        request: request.to_owned(),
        status: 202,
        retry_after: retry_after.map(str::to_owned),
        body: body.clone(),
        fault: None,
    };
    let mut script = vec![exchange("register", Some(retry_after), &assigning)];
    for n in 1..=polls {
        script.push(if n == polls && assigned_at_last {
            Exchange { status: 200, ..exchange("poll", None, &assigned) }
        } else {
            exchange("poll", Some("1"), &assigning)
        });
    }
    script
}

async fn scripted(transport: Transport, cert: &ServerCert, script: Vec<Exchange>) -> ScriptedPeer {
    match transport {
        Transport::Https => ScriptedPeer::https(cert, script).await,
        _ => ScriptedPeer::mqtt(cert, script, ConnectReturnCode::Success).await,
    }
}

#[tokio::test]
async fn a_retry_after_that_is_not_a_number_means_the_default_wait_on_every_transport() {
    for t in TRANSPORTS {
        for odd in ["abc", "-1", "1.5"] {
            let cert = ServerCert::new();
            let peer = scripted(t, &cert, assigning_script(odd, 1, true)).await;
            let started = Instant::now();
            let assignment = client(t, &cert, &peer, "my-symkey-device").register().await;
            assert_eq!(assignment.unwrap().assigned_hub, "hub.example", "{t}, retry-after {odd}");
            // The reply counted (no 10 s reply timeout) and the poll came after the default 2 s.
            let waited = started.elapsed();
            assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(8), "{t}: {waited:?}");
        }
    }
}

#[tokio::test]
async fn a_service_that_keeps_answering_assigning_is_given_up_at_the_registration_timeout() {
    for t in TRANSPORTS {
        let cert = ServerCert::new();
        let peer = scripted(t, &cert, assigning_script("1", 30, false)).await;
        let (e, took) = failure(
            client_builder(t, &cert, &peer, "my-symkey-device").registration_timeout(Duration::from_secs(3)),
        )
        .await;
        assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{t}: {e}");
        assert!(e.to_string().contains("registration timeout"), "{t}: {e}");
        assert!(took < Duration::from_secs(6), "{t}: {:?}", took);
        assert!(peer.seen().len() <= 4, "{t}: {} requests", peer.seen().len());
    }
}

#[tokio::test]
async fn an_mqtt_connect_waits_the_whole_connect_timeout_and_names_the_server() {
    let cert = ServerCert::new();
    let (addr, server) = silent_peer(&cert).await;
    let (e, took) =
        failure(silent_client(&cert, addr, Transport::Mqtt).connect_timeout(Duration::from_secs(7))).await;
    // rumqttc's own limit is 5 s; the documented setting decides.
    assert!(took >= Duration::from_millis(6_500), "{:?}: {e}", took);
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
    server.abort();
}

#[tokio::test]
async fn a_self_signed_server_certificate_given_as_the_ca_is_trusted_for_its_names_only() {
    for t in TRANSPORTS {
        // As `openssl req -x509` makes it: self-signed and marked CA; OpenSSL (so the Python SDK)
        // accepts it as the server's own when it is the trusted certificate.
        let cert = ServerCert::self_signed_ca(&["localhost", "127.0.0.1"]);
        let peer = scripted(t, &cert, assigning_script("1", 1, true)).await;
        let assignment = client_builder(t, &cert, &peer, "my-symkey-device")
            .provisioning_host(format!("localhost:{}", peer.addr.port()))
            .build()
            .unwrap()
            .register()
            .await;
        assert_eq!(assignment.unwrap().assigned_hub, "hub.example", "{t}");

        // The same kind of certificate for another name is refused.
        let other = ServerCert::self_signed_ca(&["elsewhere.example"]);
        let peer = scripted(t, &other, Vec::new()).await;
        let (e, _) = failure(
            client_builder(t, &other, &peer, "my-symkey-device")
                .provisioning_host(format!("localhost:{}", peer.addr.port())),
        )
        .await;
        assert!(e.to_string().contains("not valid for name"), "{t}: {e}");
        assert!(matches!(e, ClientError::UntrustedServer(_)), "{t}: {e:?}");
    }
}

/// A TLS peer that accepts one connection, reads what comes and never answers.
async fn silent_peer(cert: &ServerCert) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink).await;
    });
    (addr, server)
}

/// A client of the peer at `addr` over `transport`, trusting `cert`'s CA.
fn silent_client(
    cert: &ServerCert,
    addr: std::net::SocketAddr,
    transport: Transport,
) -> ProvisioningClientBuilder {
    ProvisioningClient::builder(SCOPE, "my-symkey-device")
        .provisioning_host(addr.to_string())
        .transport(transport)
        .symmetric_key(DEVICE_KEY)
        .ca_pem(cert.ca_pem.clone())
}

#[tokio::test]
async fn silent_service_ends_in_a_timeout() {
    let cert = ServerCert::new();
    // The peer accepts the request and never answers.
    let (addr, server) = silent_peer(&cert).await;
    let (e, _) =
        failure(silent_client(&cert, addr, Transport::Https).request_timeout(Duration::from_secs(1))).await;
    assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{e}");
    server.abort();
}

/// Review diff13 #9: an untrusted server certificate was a `Connection` error, which the CLI
/// calls "try again later"; it is its own error, naming the server and the reason.
#[tokio::test]
async fn server_not_signed_by_the_given_ca_is_refused() {
    for t in TRANSPORTS {
        let cert = ServerCert::new();
        let other = ServerCert::new();
        let peer = scripted(t, &cert, Vec::new()).await;
        let (e, _) = failure(
            ProvisioningClient::builder(SCOPE, "my-symkey-device")
                .provisioning_host(peer.host())
                .transport(t)
                .symmetric_key(DEVICE_KEY)
                .ca_pem(other.ca_pem.clone()),
        )
        .await;
        assert!(matches!(e, ClientError::UntrustedServer(_)), "{t}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(&peer.host()) && text.contains("invalid peer certificate"), "{t}: {text}");
    }
}

/// Review diff13 #9: a host name that does not exist was a `Connection` error ("try again
/// later"); it is `UnknownHost`, naming the host.
#[tokio::test]
async fn a_provisioning_host_that_does_not_resolve_is_named() {
    // `.invalid` never resolves (RFC 6761); a resolver that cannot be reached says so as a
    // temporary failure, which stays a connection error, and the test has nothing to check.
    if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs("zerotouch-test.invalid:443") {
        if e.to_string().to_ascii_lowercase().contains("temporary failure") {
            eprintln!("skipped: the name service is unreachable here ({e})");
            return;
        }
    }
    let cert = ServerCert::new();
    for t in [Transport::Mqtt, Transport::MqttWs, Transport::Https] {
        let (e, _) = failure(
            ProvisioningClient::builder(SCOPE, "my-symkey-device")
                .provisioning_host("zerotouch-test.invalid:8883")
                .transport(t)
                .symmetric_key(DEVICE_KEY)
                .ca_pem(cert.ca_pem.clone()),
        )
        .await;
        assert!(matches!(e, ClientError::UnknownHost(_)), "{t}: {e:?}");
        assert!(e.to_string().contains("zerotouch-test.invalid:8883"), "{t}: {e}");
    }
}

/// Operator review #4: over MQTT, 5 runs in 12 reported "the MQTT event loop stopped" instead
/// of the certificate error. The race seldom shows against this in-process peer; the link's unit
/// tests pin it down deterministically. This checks the whole path names the certificate.
#[tokio::test]
async fn an_untrusted_server_certificate_is_named_on_every_mqtt_attempt() {
    let cert = ServerCert::new();
    let other = ServerCert::new();
    let peer = ScriptedPeer::mqtt(&cert, Vec::new(), ConnectReturnCode::Success).await;
    for run in 0..12 {
        let (e, _) = failure(
            ProvisioningClient::builder(SCOPE, "my-symkey-device")
                .provisioning_host(peer.host())
                .transport(Transport::Mqtt)
                .symmetric_key(DEVICE_KEY)
                .ca_pem(other.ca_pem.clone()),
        )
        .await;
        assert!(e.to_string().contains("invalid peer certificate"), "run {run}: {e}");
    }
}

/// Review D2: a server that never sends CONNACK held the device for the 30 s connect timeout
/// although the whole registration was allowed 3 s.
#[tokio::test]
async fn the_registration_timeout_bounds_an_mqtt_connect_that_never_completes() {
    let cert = ServerCert::new();
    let (addr, server) = silent_peer(&cert).await;
    let (e, took) = failure(
        silent_client(&cert, addr, Transport::Mqtt)
            .registration_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(20)),
    )
    .await;
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "{took:?}: {e}");
    assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{e}");
    assert!(e.to_string().contains("registration timeout"), "{e}");
    assert!(e.to_string().contains(&format!("no CONNACK and SUBACK from {addr}")), "{e}");
    server.abort();
}

/// Review D2: the same over HTTPS, to a socket that accepts TCP and never speaks TLS.
#[tokio::test]
async fn the_registration_timeout_bounds_an_https_connect_that_never_completes() {
    let cert = ServerCert::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink).await;
    });
    let (e, took) = failure(
        silent_client(&cert, addr, Transport::Https)
            .registration_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(20)),
    )
    .await;
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "{took:?}: {e}");
    assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{e}");
    assert!(e.to_string().contains(&format!("no TLS connection to {addr}")), "{e}");
    server.abort();
}

/// Review D2 (probe `slowconnack`): the wait for the register reply started before connecting,
/// so a slow CONNACK used it up and a reply that came promptly after the request was too late.
#[tokio::test]
async fn a_slow_connack_does_not_use_up_the_wait_for_the_register_reply() {
    let cert = ServerCert::new();
    let peer = ScriptedPeer::mqtt_with_connack_delay(
        &cert,
        assigning_script("1", 1, true),
        ConnectReturnCode::Success,
        Duration::from_millis(2_500),
    )
    .await;
    let assignment = client_builder(Transport::Mqtt, &cert, &peer, "my-symkey-device")
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .register()
        .await;
    assert_eq!(assignment.unwrap().assigned_hub, "hub.example");
}

/// Register `assigning`, then a poll answered by breaking the connection with `fault` as many
/// as `broken` times, then (when `broken` is 1) a poll answered `assigned`.
fn script_with_broken_polls(fault: Fault, broken: usize) -> Vec<Exchange> {
    let mut script = assigning_script("1", broken + 1, true);
    for exchange in &mut script[1..=broken] {
        exchange.fault = Some(fault);
    }
    script
}

const FAULTS: [(Transport, Fault); 3] =
    [(Transport::Mqtt, Fault::Close), (Transport::Mqtt, Fault::Disconnect), (Transport::Https, Fault::Close)];

/// Review D3 (probes `disc`, `serverdisconnect`, `closepoll`): a connection the service dropped
/// during a poll ended the registration, although the operation id was known and a poll works
/// from any new connection.
#[tokio::test]
async fn a_poll_whose_connection_the_service_drops_is_sent_again_on_a_new_connection() {
    for (t, fault) in FAULTS {
        let cert = ServerCert::new();
        let peer = scripted(t, &cert, script_with_broken_polls(fault, 1)).await;
        let assignment = client(t, &cert, &peer, "my-symkey-device").register().await;
        assert_eq!(assignment.unwrap().assigned_hub, "hub.example", "{t}, {fault:?}");
        let seen = peer.seen();
        let kinds: Vec<&str> = seen.iter().map(|s| s.request.as_str()).collect();
        assert_eq!(kinds, ["register", "poll", "poll"], "{t}, {fault:?}");
        assert_eq!(seen[1].target.split("operationId").nth(1), seen[2].target.split("operationId").nth(1));
        assert!(seen[2].target.contains("5.316aac5bdc130deb"), "{t}: the poll keeps the operation id");
        if t == Transport::Mqtt {
            assert_eq!(peer.usernames.lock().unwrap().len(), 2, "{fault:?}: one CONNECT, then another");
        }
    }
}

/// Review D3 and D8: when the connection keeps being dropped, the registration ends at its
/// deadline and says the service closed the connection, not rustls's or rumqttc's text.
#[tokio::test]
async fn a_service_that_keeps_dropping_the_connection_is_named_at_the_registration_timeout() {
    for (t, fault) in FAULTS {
        let cert = ServerCert::new();
        let peer = scripted(t, &cert, script_with_broken_polls(fault, 10)).await;
        let (e, took) = failure(
            client_builder(t, &cert, &peer, "my-symkey-device").registration_timeout(Duration::from_secs(4)),
        )
        .await;
        assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(7), "{t}, {fault:?}: {took:?}");
        assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{t}, {fault:?}: {e}");
        let text = e.to_string();
        assert!(text.contains("the service closed the connection"), "{t}, {fault:?}: {text}");
        assert!(!text.contains("docs.rs") && !text.contains("wrong packet"), "{t}, {fault:?}: {text}");
        if fault == Fault::Disconnect {
            assert!(text.contains("MQTT DISCONNECT"), "{text}");
        }
        assert!(peer.seen().len() >= 3, "{t}, {fault:?}: the poll was sent again");
    }
}

/// Review D3: a connection that cannot be opened again after a loss is retried with a back-off
/// too, and the timeout at the end names why the service could not be reached.
#[tokio::test]
async fn a_service_that_cannot_be_reached_again_after_a_loss_is_named_at_the_registration_timeout() {
    for t in TRANSPORTS {
        let cert = ServerCert::new();
        let peer = scripted(t, &cert, script_with_broken_polls(Fault::Close, 1)).await;
        let client = client_builder(t, &cert, &peer, "my-symkey-device")
            .registration_timeout(Duration::from_secs(4))
            .build()
            .unwrap();
        let registering = tokio::spawn(async move { client.register().await });
        // The register reply asks for a 1 s wait; stop listening before the poll, whose
        // connection is then dropped: every new connection is refused.
        while peer.seen().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(peer);
        let e = registering.await.unwrap().unwrap_err();
        assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{t}: {e}");
        let text = e.to_string();
        assert!(text.contains("last connection error") && text.contains("refused"), "{t}: {text}");
    }
}

/// A peer over `transport` replaying `script` and treating its connections as `plan` says.
async fn planned(
    transport: Transport,
    cert: &ServerCert,
    script: Vec<Exchange>,
    plan: Vec<Accept>,
) -> ScriptedPeer {
    match transport {
        Transport::Https => ScriptedPeer::https_with_plan(cert, script, plan).await,
        _ => {
            ScriptedPeer::mqtt_with_plan(cert, script, ConnectReturnCode::Success, Duration::ZERO, plan).await
        }
    }
}

/// Review diff13 #2: after a lost connection, a new connection that took the whole connect
/// timeout ended the registration with "no reply to the operation status request", because the
/// driver checked the reply deadline set before connecting. The registration deadline bounds
/// reconnects: the next connection is served and the device is assigned.
#[tokio::test]
async fn a_reconnect_that_times_out_is_retried_until_the_registration_deadline() {
    for t in TRANSPORTS {
        let cert = ServerCert::new();
        // The first connection carries the register and breaks at the poll; the second is
        // accepted and never answered; the third is served.
        let plan = vec![Accept::Serve, Accept::Silent];
        let peer = planned(t, &cert, script_with_broken_polls(Fault::Close, 1), plan).await;
        let started = Instant::now();
        let assignment = client_builder(t, &cert, &peer, "my-symkey-device")
            .connect_timeout(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(1))
            .registration_timeout(Duration::from_secs(20))
            .build()
            .unwrap()
            .register()
            .await;
        assert_eq!(assignment.unwrap().assigned_hub, "hub.example", "{t} after {:?}", started.elapsed());
        let kinds: Vec<String> = peer.seen().into_iter().map(|s| s.request).collect();
        assert_eq!(kinds, ["register", "poll", "poll"], "{t}");
    }
}

/// Review diff13 #3: `zerotouch serve` refuses a CONNECT with CONNACK 3 "server unavailable"
/// when it is overloaded; on a reconnect that ended the registration, though the CLI calls it
/// "try again later". It is retried until the registration deadline, like a lost connection.
#[tokio::test]
async fn a_reconnect_refused_as_server_unavailable_is_retried() {
    let cert = ServerCert::new();
    let unavailable = Accept::Connack(ConnectReturnCode::ServiceUnavailable);
    let plan = vec![Accept::Serve, unavailable, unavailable];
    let peer = planned(Transport::Mqtt, &cert, script_with_broken_polls(Fault::Close, 1), plan).await;
    let assignment = client_builder(Transport::Mqtt, &cert, &peer, "my-symkey-device")
        .registration_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .register()
        .await;
    assert_eq!(assignment.unwrap().assigned_hub, "hub.example");
    assert_eq!(peer.usernames.lock().unwrap().len(), 4, "served, refused twice, served");
    let kinds: Vec<String> = peer.seen().into_iter().map(|s| s.request).collect();
    assert_eq!(kinds, ["register", "poll", "poll"]);
}

/// Review diff13 #3: when the service stays unavailable, the registration ends at its deadline
/// and names the refusal.
#[tokio::test]
async fn a_service_that_stays_unavailable_is_named_at_the_registration_timeout() {
    let cert = ServerCert::new();
    let mut plan = vec![Accept::Serve];
    plan.extend([Accept::Connack(ConnectReturnCode::ServiceUnavailable); 20]);
    let peer = planned(Transport::Mqtt, &cert, script_with_broken_polls(Fault::Close, 1), plan).await;
    let (e, _) = failure(
        client_builder(Transport::Mqtt, &cert, &peer, "my-symkey-device")
            .registration_timeout(Duration::from_secs(4)),
    )
    .await;
    assert_eq!(e.failure_kind(), Some(FailureKind::Timeout), "{e}");
    let text = e.to_string();
    assert!(text.contains("last connection error") && text.contains("server unavailable"), "{text}");
}

#[test]
fn every_recorded_scenario_is_documented() {
    let readme = std::fs::read_to_string(azure_dir().join("README.md")).unwrap();
    for entry in std::fs::read_dir(azure_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".json") {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{name} is not listed in testdata/azure/README.md"
            );
            scenario(&name);
        }
    }
}
