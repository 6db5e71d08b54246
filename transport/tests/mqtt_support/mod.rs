//! A zerotouch MQTT endpoint on an ephemeral port over an in-memory engine, and an rumqttc device
//! that registers through it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../recording/mod.rs"]
pub mod recording;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::derive_device_key;
use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_proto::mqtt::{DeviceRequest, ResponseTopic, SUBSCRIBE_FILTER};
use zerotouch_proto::sas::{encode_resource, registration_resource, string_to_sign};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, IfMatch, RegistrationId};
use zerotouch_transport::limits::Limits;
use zerotouch_transport::mqtt::serve_mqtt;
use zerotouch_transport::service::{now, DpsService, EngineService};
use zerotouch_transport::tls::server_config_from_pem;

pub const SCOPE: &str = "0ne00C0FFEE";
pub const HUB: &str = "hub-1.zerotouch.test";
pub const API: &str = "2019-03-31";

/// A running endpoint and what the test needs to reach and inspect it.
pub struct Server {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate (`localhost`, `127.0.0.1`).
    pub ca_pem: String,
    pub store: Arc<MemoryStore>,
    pub hubs: Arc<Mutex<EmbeddedHubs>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> Server {
        Server::start_wrapped(limits, |service| service).await
    }

    /// A server whose engine answers every request `delay` late.
    pub async fn start_slow(limits: Limits, delay: std::time::Duration) -> Server {
        Self::start_wrapped(limits, recording::SlowService::by(delay)).await
    }

    /// A server whose engine service is wrapped by `wrap` (to slow it down, count calls, ...).
    pub async fn start_wrapped(
        limits: Limits,
        wrap: impl FnOnce(Arc<dyn DpsService>) -> Arc<dyn DpsService>,
    ) -> Server {
        let (ca_pem, chain_pem, key_pem) = server_certificate();
        let tls = Arc::new(server_config_from_pem(chain_pem.as_bytes(), key_pem.as_bytes()).unwrap());
        let store = Arc::new(MemoryStore::new());
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
            store.clone(),
            Arc::new(RingCrypto::new()),
            Allocator::new(vec![LinkedHub::new(HUB)]),
        );
        let mut hubs = EmbeddedHubs::new();
        hubs.insert(EmbeddedHub::in_memory(HUB, Arc::new(RingCrypto::new())).unwrap());
        let hubs = Arc::new(Mutex::new(hubs));
        let service: Arc<dyn DpsService> = wrap(Arc::new(EngineService::new(provisioner, hubs.clone())));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_mqtt(listener, tls, service, limits, async {
            let _ = stopped.await;
        }));
        Server { addr, ca_pem, store, hubs, stop: Some(stop), task: Some(task) }
    }

    /// Asks the endpoint to drain and waits until it has.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap();
        }
    }

    /// Enrolls `id` individually with a service-generated symmetric key; returns the key.
    pub fn enroll_symmetric(&self, id: &str) -> Vec<u8> {
        zerotouch_testkit::enroll::symmetric(self.store.as_ref(), id, now())
    }

    /// Creates a symmetric-key enrollment group; returns its primary key bytes.
    pub fn enroll_symmetric_group(&self, group_id: &str) -> Vec<u8> {
        zerotouch_testkit::enroll::symmetric_group(self.store.as_ref(), group_id, now())
    }

    /// Enrolls `id` individually with its leaf certificate (PEM).
    pub fn enroll_x509(&self, id: &str, leaf_pem: &str) {
        enrollments::put_enrollment(
            self.store.as_ref(),
            &RingCrypto::new(),
            now(),
            IndividualEnrollment::new(
                RegistrationId::new(id).unwrap(),
                AttestationMechanism::x509_client_certificate(leaf_pem),
            ),
            &IfMatch::Absent,
        )
        .unwrap();
    }

    /// Enrolls an X.509 group anchored on `ca_pem`.
    pub fn enroll_x509_group(&self, group_id: &str, ca_pem: &str) {
        enrollments::put_enrollment_group(
            self.store.as_ref(),
            &RingCrypto::new(),
            now(),
            EnrollmentGroup::new(
                EnrollmentGroupId::new(group_id).unwrap(),
                AttestationMechanism::x509_signing_certificate(ca_pem),
            ),
            &IfMatch::Absent,
        )
        .unwrap();
    }

    /// Whether the embedded hub holds a device identity `device_id`.
    pub fn hub_has_device(&self, device_id: &str) -> bool {
        let hubs = self.hubs.lock().unwrap();
        hubs.hub(HUB).unwrap().registry().device(&DeviceId::new(device_id).unwrap()).is_ok()
    }
}

/// A CA and a server certificate for `localhost` / `127.0.0.1` signed by it:
/// (CA PEM, server chain PEM, server key PEM).
fn server_certificate() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "zerotouch test server CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// How the device authenticates.
#[derive(Clone)]
pub enum Auth {
    /// Python form: `sr` URL-encoded, no `skn`.
    SasPython(Vec<u8>),
    /// Node form: raw `sr`, `skn=registration`.
    SasNode(Vec<u8>),
    /// A literal password.
    Password(String),
    /// Client certificate chain (leaf first, DER) and its PKCS#8 key (DER).
    X509(Vec<Vec<u8>>, Vec<u8>),
}

/// The derived device key of a group member.
pub fn derived_key(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    derive_device_key(&RingCrypto::new(), group_key, registration_id).to_vec()
}

/// A SAS token in the Python SDK's form (`sr` URL-encoded, no `skn`).
pub fn python_token(key: &[u8], registration_id: &str, expiry: i64) -> String {
    let sr = encode_resource(&registration_resource(SCOPE, registration_id));
    let sig = sign(key, &sr, expiry);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}")
}

/// A SAS token in the Node SDK's form (raw `sr`, `skn=registration` before `se`).
pub fn node_token(key: &[u8], registration_id: &str, expiry: i64) -> String {
    let sr = registration_resource(SCOPE, registration_id);
    let sig = sign(key, &sr, expiry);
    format!("SharedAccessSignature sr={sr}&sig={sig}&skn=registration&se={expiry}")
}

fn sign(key: &[u8], sr: &str, expiry: i64) -> String {
    let mac = RingCrypto::new().hmac_sha256(key, string_to_sign(sr, expiry).as_bytes());
    percent_encoding::utf8_percent_encode(&STANDARD.encode(mac), percent_encoding::NON_ALPHANUMERIC)
        .to_string()
}

/// An hour from now, in Unix seconds.
pub fn in_an_hour() -> i64 {
    now().unix_secs() + 3600
}

/// A device's connection settings.
pub struct DeviceOptions {
    pub registration_id: String,
    pub auth: Auth,
    pub tls12_only: bool,
    pub username: Option<String>,
}

impl DeviceOptions {
    pub fn new(registration_id: &str, auth: Auth) -> Self {
        Self { registration_id: registration_id.to_owned(), auth, tls12_only: false, username: None }
    }
}

/// The device-side TLS configuration: trusts `ca_pem`, optionally presents a client certificate.
pub fn client_tls(ca_pem: &str, auth: &Auth, tls12_only: bool) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    match auth {
        Auth::X509(chain, key) => {
            // Not `with_client_auth_cert`: its key check reads the leaf with webpki, which refuses
            // version 1 certificates, and a test may present a key that is not the leaf's.
            let key = rustls::crypto::ring::default_provider()
                .key_provider
                .load_private_key(PrivateKeyDer::try_from(key.clone()).unwrap())
                .unwrap();
            let chain = chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
            builder.with_client_cert_resolver(Arc::new(Presents(Arc::new(CertifiedKey::new(chain, key)))))
        }
        _ => builder.with_no_client_auth(),
    }
}

/// A device that presents its certificate to every server that asks.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The final reply of a registration (or the first error): status and JSON body.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u32>,
}

impl Outcome {
    pub fn assigned_hub(&self) -> Option<&str> {
        self.body["registrationState"]["assignedHub"].as_str()
    }
    pub fn device_id(&self) -> Option<&str> {
        self.body["registrationState"]["deviceId"].as_str()
    }
    pub fn error_code(&self) -> Option<u64> {
        self.body["errorCode"].as_u64()
    }
}

/// Connects like an SDK does (client id = registration id, DPS username, TLS with the server
/// CA) and returns the client once CONNACK accepted it.
pub async fn connect(
    server: &Server,
    opts: &DeviceOptions,
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let mut mqtt = MqttOptions::new(opts.registration_id.clone(), "localhost", server.addr.port());
    mqtt.set_keep_alive(Duration::from_secs(60));
    mqtt.set_clean_session(false);
    mqtt.set_max_packet_size(256 * 1024, 256 * 1024);
    let username = opts.username.clone().unwrap_or_else(|| {
        format!(
            "{SCOPE}/registrations/{}/api-version={API}&ClientVersion=zerotouch-tests%2F1.0",
            opts.registration_id
        )
    });
    let password = match &opts.auth {
        Auth::SasPython(key) => python_token(key, &opts.registration_id, in_an_hour()),
        Auth::SasNode(key) => node_token(key, &opts.registration_id, in_an_hour()),
        Auth::Password(p) => p.clone(),
        Auth::X509(..) => String::new(),
    };
    mqtt.set_credentials(username, password);
    let tls = client_tls(&server.ca_pem, &opts.auth, opts.tls12_only);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, mut events) = AsyncClient::new(mqtt, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("CONNACK in time")? {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, events)),
            _ => continue,
        }
    }
}

/// Waits for the reply to `rid` on `$dps/registrations/res/#`.
pub async fn reply(events: &mut EventLoop, rid: &str) -> Outcome {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("reply in time")
            .expect("connection stays up");
        if let Event::Incoming(Packet::Publish(p)) = event {
            let topic = ResponseTopic::parse(&p.topic).unwrap();
            if topic.rid == rid {
                return Outcome {
                    status: topic.status,
                    body: serde_json::from_slice(&p.payload).unwrap(),
                    retry_after: topic.retry_after,
                };
            }
        }
    }
}

/// Registers over an open connection: subscribe, register publish, then polls until the
/// operation leaves `assigning`. Returns the final reply or the first error reply.
pub async fn register_on(client: &AsyncClient, events: &mut EventLoop, registration_id: &str) -> Outcome {
    client.subscribe(SUBSCRIBE_FILTER, QoS::AtLeastOnce).await.unwrap();
    let register = DeviceRequest::Register { rid: "r1".into() };
    let body = json!({ "registrationId": registration_id, "payload": null });
    client.publish(register.to_string(), QoS::AtLeastOnce, false, body.to_string()).await.unwrap();
    let mut outcome = reply(events, "r1").await;
    for n in 2..20 {
        if outcome.status != 202 {
            return outcome;
        }
        let operation_id = outcome.body["operationId"].as_str().unwrap().to_owned();
        let rid = format!("r{n}");
        let poll = DeviceRequest::PollStatus { rid: rid.clone(), operation_id };
        client.publish(poll.to_string(), QoS::AtLeastOnce, false, " ").await.unwrap();
        outcome = reply(events, &rid).await;
    }
    panic!("still assigning after 18 polls: {outcome:?}");
}

/// Enrolls `registration_id` with a generated key, connects with a Python-style token and
/// subscribes to the replies, as every SDK does before its first publish.
pub async fn enrolled_and_subscribed(server: &Server, registration_id: &str) -> (AsyncClient, EventLoop) {
    let key = server.enroll_symmetric(registration_id);
    let opts = DeviceOptions::new(registration_id, Auth::SasPython(key));
    let (client, events) = connect(server, &opts).await.unwrap();
    client.subscribe(SUBSCRIBE_FILTER, QoS::AtLeastOnce).await.unwrap();
    (client, events)
}

/// Connects and registers; `Err` when CONNECT is refused.
pub async fn register(server: &Server, opts: &DeviceOptions) -> Result<Outcome, ConnectionError> {
    let (client, mut events) = connect(server, opts).await?;
    let outcome = register_on(&client, &mut events, &opts.registration_id).await;
    let _ = client.disconnect().await;
    Ok(outcome)
}

/// A device speaking MQTT by hand over TLS, for what a well-behaved client never sends.
pub struct RawDevice {
    pub stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    inbound: bytes::BytesMut,
}

impl RawDevice {
    /// Opens TLS to the server (no client certificate).
    pub async fn open(server: &Server) -> RawDevice {
        Self::open_with(server, &Auth::Password(String::new())).await
    }

    /// Enrolls `registration_id` with a generated symmetric key, opens TLS and connects with a
    /// Python-form token and a keep-alive of 60 s (CONNACK read).
    pub async fn enrolled_and_connected(server: &Server, registration_id: &str) -> RawDevice {
        let key = server.enroll_symmetric(registration_id);
        let mut device = Self::open(server).await;
        device.connect(registration_id, &key, 60).await;
        device
    }

    /// Opens TLS to the server, with the client certificate of `auth` when it has one.
    pub async fn open_with(server: &Server, auth: &Auth) -> RawDevice {
        use tokio_rustls::TlsConnector;
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let connector = TlsConnector::from(Arc::new(client_tls(&server.ca_pem, auth, false)));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        RawDevice { stream, inbound: bytes::BytesMut::new() }
    }

    /// Sends a CONNECT with a Python-form SAS token for `registration_id`.
    pub async fn connect(&mut self, registration_id: &str, key: &[u8], keep_alive: u16) -> Packet {
        let mut connect = rumqttc::Connect::new(registration_id);
        connect.keep_alive = keep_alive;
        connect.set_login(
            format!("{SCOPE}/registrations/{registration_id}/api-version={API}"),
            python_token(key, registration_id, in_an_hour()),
        );
        self.send(Packet::Connect(connect)).await;
        self.next().await.expect("CONNACK")
    }

    /// Sends a CONNECT without a password (the certificate of the TLS handshake is the credential).
    pub async fn connect_x509(&mut self, registration_id: &str, keep_alive: u16) -> Packet {
        let mut connect = rumqttc::Connect::new(registration_id);
        connect.keep_alive = keep_alive;
        connect.set_login(format!("{SCOPE}/registrations/{registration_id}/api-version={API}"), "");
        self.send(Packet::Connect(connect)).await;
        self.next().await.expect("CONNACK")
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = bytes::BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.write(&out).await;
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // The server may already have cut us off; that is what some tests look for.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet from the server, `None` once it closed the connection.
    pub async fn next(&mut self) -> Option<Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            match Packet::read(&mut self.inbound, usize::MAX) {
                Ok(p) => return Some(p),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("server sent a malformed packet: {e}"),
            }
            match self.stream.read_buf(&mut self.inbound).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Waits until the server closes the connection, failing after `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async { while self.next().await.is_some() {} }).await.is_ok()
    }
}
