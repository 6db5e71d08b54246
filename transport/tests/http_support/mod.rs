//! A running HTTPS device endpoint over the real engine (memory store, one embedded hub) on an
//! ephemeral port, and an HTTPS client (hyper + tokio-rustls) that trusts its certificate.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::registration_token;
use zerotouch_engine::crypto::{CryptoProvider as _, RingCrypto};
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_proto::sas::{registration_resource, string_to_sign, SasToken};
use zerotouch_proto::service::{AttestationMechanism, IndividualEnrollment};
use zerotouch_proto::{DeviceId, IdScope, IfMatch, RegistrationId};
use zerotouch_testkit::certs::TestCert;
use zerotouch_transport::http::serve_https;
use zerotouch_transport::limits::Limits;
use zerotouch_transport::service::{now, DpsService, EngineService};
use zerotouch_transport::tls;

pub const SCOPE: &str = "0ne00C0FFEE";
pub const HUB: &str = "plant-north.example.net";
pub const API: &str = "2021-06-01";

/// The server under test and what tests need to reach and inspect it.
pub struct Server {
    pub addr: SocketAddr,
    pub server_cert: CertificateDer<'static>,
    pub store: Arc<MemoryStore>,
    pub hubs: Arc<Mutex<EmbeddedHubs>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> Server {
        Self::start_wrapped(limits, |service| service).await
    }

    /// A server whose engine service is wrapped by `wrap` (to record or alter requests).
    pub async fn start_wrapped(
        limits: Limits,
        wrap: impl FnOnce(Arc<dyn DpsService>) -> Arc<dyn DpsService>,
    ) -> Server {
        let crypto = Arc::new(RingCrypto::new());
        let store = Arc::new(MemoryStore::new());
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
            store.clone(),
            crypto.clone(),
            Allocator::new(vec![LinkedHub::new(HUB)]),
        );
        let mut hubs = EmbeddedHubs::new();
        hubs.insert(EmbeddedHub::in_memory(HUB, crypto).unwrap());
        let hubs = Arc::new(Mutex::new(hubs));
        let service = wrap(Arc::new(EngineService::new(provisioner, hubs.clone())));

        let server_key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let config = tls::server_config_from_pem(
            server_key.cert.pem().as_bytes(),
            server_key.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_https(listener, Arc::new(config), service, limits, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            server_cert: server_key.cert.der().clone(),
            store,
            hubs,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops accepting and waits until the server has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
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

    /// Enrolls the self-signed `device` certificate individually (registration id = its CN).
    pub fn enroll_x509(&self, device: &TestCert) {
        enrollments::put_enrollment(
            self.store.as_ref(),
            &RingCrypto::new(),
            now(),
            IndividualEnrollment::new(
                RegistrationId::new(device.common_name()).unwrap(),
                AttestationMechanism::x509_client_certificate(device.pem()),
            ),
            &IfMatch::Absent,
        )
        .unwrap();
    }

    /// Whether the hub registry holds a device identity `id`.
    pub fn hub_has_device(&self, id: &str) -> bool {
        let hubs = self.hubs.lock().unwrap();
        hubs.hub(HUB).unwrap().registry().device(&DeviceId::new(id).unwrap()).is_ok()
    }

    /// A TLS client configuration trusting this server, with `client` as client certificate.
    pub fn client_config(&self, client: Option<&TestCert>) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(self.server_cert.clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        match client {
            None => builder.with_no_client_auth(),
            Some(cert) => {
                let chain = cert.chain_der().into_iter().map(CertificateDer::from).collect();
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der().to_vec()));
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        }
    }

    /// Opens a TLS connection and nothing more, for tests that write their own bytes.
    pub async fn connect_raw(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connector = TlsConnector::from(Arc::new(self.client_config(None)));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
    }

    /// Opens an HTTP/1.1 connection over TLS.
    pub async fn connect(&self, client: Option<&TestCert>) -> Client {
        let connector = TlsConnector::from(Arc::new(self.client_config(client)));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        Client { sender }
    }
}

/// A reply as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts the DPS error body shape and returns its `errorCode`.
    pub fn error_code(&self) -> u64 {
        assert!(self.body["message"].is_string(), "error body without message: {}", self.body);
        assert!(self.body["trackingId"].is_string(), "error body without trackingId: {}", self.body);
        let code = self.body["errorCode"].as_u64().unwrap();
        assert_eq!(self.header("x-ms-error-code"), Some(code.to_string().as_str()));
        assert_eq!(code / 1000, u64::from(self.status.as_u16()), "errorCode class is the HTTP status");
        code
    }
}

pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    /// Resolves once the server has closed the connection.
    pub async fn closed(&self) {
        while !self.sender.is_closed() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Sends one request; `authorization` goes into the `Authorization` header.
    pub async fn send(
        &mut self,
        method: &str,
        target: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let headers: &[(&str, &str)] = match authorization {
            Some(a) => &[("authorization", a)],
            None => &[],
        };
        self.send_with(method, target, headers, body).await
    }

    /// Sends one request with extra headers.
    pub async fn send_with(
        &mut self,
        method: &str,
        target: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "localhost")
            .header("accept", "application/json");
        if !body.is_empty() {
            req = req.header("content-type", "application/json; charset=utf-8");
        }
        for (name, value) in extra {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            assert!(
                headers.get("content-type").unwrap().to_str().unwrap().contains("application/json"),
                "every reply is JSON"
            );
        }
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Reply { status, headers, body }
    }
}

/// A SAS token for `id` signed with `key`, valid for an hour.
pub fn sas(key: &[u8], id: &str) -> String {
    let expiry = now().unix_secs() + 3600;
    registration_token(&RingCrypto::new(), key, SCOPE, id, expiry).to_string()
}

/// A SAS token as the Node SDK signs it: raw `sr` (no percent-encoding) and `skn=registration`.
pub fn node_sas(key: &[u8], id: &str) -> String {
    let crypto = RingCrypto::new();
    let expiry = now().unix_secs() + 3600;
    let sr = registration_resource(SCOPE, id);
    let signature = crypto.hmac_sha256(key, string_to_sign(&sr, expiry).as_bytes());
    SasToken::build(&sr, expiry, Some("registration"), &signature).to_string()
}

pub fn register_path(id: &str) -> String {
    format!("/{SCOPE}/registrations/{id}/register?api-version={API}")
}

pub fn operation_path(id: &str, operation_id: &str) -> String {
    format!("/{SCOPE}/registrations/{id}/operations/{operation_id}?api-version={API}")
}
