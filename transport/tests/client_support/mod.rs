//! Shared by the client tests: a throw-away server certificate and scripted DPS peers that
//! replay recorded Azure replies (testdata/azure) over TLS, on MQTT or HTTPS.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::QoS;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use zerotouch_proto::mqtt::{ConnectUsername, DeviceRequest, ResponseTopic};

/// A CA and a server certificate for `localhost` and `127.0.0.1` signed by it.
pub struct ServerCert {
    pub ca_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl ServerCert {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "zerotouch client-test CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let leaf = params.signed_by(&key, &issuer).unwrap();
        Self { ca_pem: ca.pem(), chain: vec![leaf.der().clone()], key_der: key.serialize_der() }
    }

    /// One self-signed certificate marked as a CA, for `names`, serving as the server's own and
    /// given to the client as its trusted CA (what `openssl req -x509` makes).
    pub fn self_signed_ca(names: &[&str]) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self { ca_pem: cert.pem(), chain: vec![cert.der().clone()], key_der: key.serialize_der() }
    }

    /// A rustls server config (ring) that asks for, but does not require, a client certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// One scripted reply: what request it answers and what the service said.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `register` or `poll`.
    pub request: String,
    pub status: u16,
    /// The `retry-after` value as sent: seconds, or any text a faulty service might send.
    pub retry_after: Option<String>,
    pub body: Value,
    /// Instead of replying, the peer breaks the connection this way.
    pub fault: Option<Fault>,
}

/// How a scripted peer breaks a connection instead of replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop the connection without a word (no TLS close_notify, no HTTP reply).
    Close,
    /// MQTT only: send DISCONNECT, then drop the connection.
    Disconnect,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Fault {}

/// A recorded scenario from testdata/azure.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub registration_id: String,
    pub exchanges: Vec<Exchange>,
    pub outcome: Value,
}

pub fn azure_dir() -> PathBuf {
    manifest_dir().join("../testdata/azure")
}

pub fn scenario(name: &str) -> Scenario {
    let text = std::fs::read_to_string(azure_dir().join(name)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let exchanges = v["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Exchange {
            request: e["request"].as_str().unwrap().to_owned(),
            status: u16::try_from(e["status"].as_u64().unwrap()).unwrap(),
            retry_after: e.get("retryAfter").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
            body: e["body"].clone(),
            fault: None,
        })
        .collect();
    Scenario {
        registration_id: v["registrationId"].as_str().unwrap().to_owned(),
        exchanges,
        outcome: v["outcome"].clone(),
    }
}

/// What the scripted peer saw of one device request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `register` or `poll`.
    pub request: String,
    /// HTTP path and query, or MQTT topic.
    pub target: String,
    /// `Authorization` header (HTTPS) or CONNECT password (MQTT).
    pub authorization: Option<String>,
    pub body: Bytes,
}

/// What a scripted peer does with one connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// TLS, then the device API (MQTT: CONNECT answered with the peer's CONNACK code).
    Serve,
    /// Keep the TCP connection open and never answer (no TLS, no CONNACK): a service that holds
    /// connections it cannot serve.
    Silent,
    /// MQTT only: answer CONNECT with this CONNACK code and close, instead of the peer's code.
    Connack(ConnectReturnCode),
}

/// How the peer treats its `n`-th accepted connection (from 0): `plan[n]`, or `Serve` past the
/// end of the plan.
fn planned(plan: &[Accept], n: usize) -> Accept {
    plan.get(n).copied().unwrap_or(Accept::Serve)
}

/// Holds a connection the peer does not answer until the client drops it.
fn hold_silently(mut tcp: tokio::net::TcpStream) {
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    });
}

/// A scripted DPS on an ephemeral port; it answers requests in script order.
pub struct ScriptedPeer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// MQTT CONNECT usernames, in order.
    pub usernames: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Script = Arc<Mutex<VecDeque<Exchange>>>;

fn next_reply(script: &Script, request: &str) -> Exchange {
    let exchange =
        script.lock().unwrap().pop_front().expect("the client sent more requests than the script has");
    assert_eq!(
        exchange.request, request,
        "the client sent a {request} where the script expects a {}",
        exchange.request
    );
    exchange
}

impl ScriptedPeer {
    /// The HTTPS device API, replaying `exchanges`.
    pub async fn https(cert: &ServerCert, exchanges: Vec<Exchange>) -> Self {
        Self::https_with_plan(cert, exchanges, Vec::new()).await
    }

    /// [`https`](Self::https), treating the accepted connections as `plan` says.
    pub async fn https_with_plan(cert: &ServerCert, exchanges: Vec<Exchange>, plan: Vec<Accept>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(cert.server_config());
        let script: Script = Arc::new(Mutex::new(exchanges.into()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            for n in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                if planned(&plan, n) == Accept::Silent {
                    hold_silently(tcp);
                    continue;
                }
                let Ok(tls) = acceptor.accept(tcp).await else { continue };
                let (script, seen) = (script.clone(), seen2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (script, seen) = (script.clone(), seen.clone());
                        // An error makes hyper drop the connection without a reply.
                        async move { answer_http(req, &script, &seen).await.ok_or(Fault::Close) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, seen, usernames: Arc::default(), task }
    }

    /// The MQTT device API, replaying `exchanges`; CONNECT is accepted with `connack`.
    pub async fn mqtt(cert: &ServerCert, exchanges: Vec<Exchange>, connack: ConnectReturnCode) -> Self {
        Self::mqtt_with_connack_delay(cert, exchanges, connack, Duration::ZERO).await
    }

    /// [`mqtt`](Self::mqtt), with CONNACK sent `connack_delay` after CONNECT (a slow or far
    /// service).
    pub async fn mqtt_with_connack_delay(
        cert: &ServerCert,
        exchanges: Vec<Exchange>,
        connack: ConnectReturnCode,
        connack_delay: Duration,
    ) -> Self {
        Self::mqtt_with_plan(cert, exchanges, connack, connack_delay, Vec::new()).await
    }

    /// [`mqtt_with_connack_delay`](Self::mqtt_with_connack_delay), treating the accepted
    /// connections as `plan` says.
    pub async fn mqtt_with_plan(
        cert: &ServerCert,
        exchanges: Vec<Exchange>,
        connack: ConnectReturnCode,
        connack_delay: Duration,
        plan: Vec<Accept>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(cert.server_config());
        let script: Script = Arc::new(Mutex::new(exchanges.into()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let usernames = Arc::new(Mutex::new(Vec::new()));
        let (seen2, usernames2) = (seen.clone(), usernames.clone());
        let task = tokio::spawn(async move {
            for n in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let connack = match planned(&plan, n) {
                    Accept::Serve => connack,
                    Accept::Silent => {
                        hold_silently(tcp);
                        continue;
                    }
                    Accept::Connack(code) => code,
                };
                let Ok(tls) = acceptor.accept(tcp).await else { continue };
                let (script, seen, usernames) = (script.clone(), seen2.clone(), usernames2.clone());
                tokio::spawn(serve_mqtt(tls, script, seen, usernames, connack, connack_delay));
            }
        });
        Self { addr, seen, usernames, task }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer_http(
    req: Request<Incoming>,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
) -> Option<Response<Full<Bytes>>> {
    let target = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let request = match (req.method().as_str(), req.uri().path()) {
        ("PUT", p) if p.ends_with("/register") => "register",
        ("GET", p) if p.contains("/operations/") => "poll",
        (m, p) => panic!("unexpected request {m} {p}"),
    };
    let authorization = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    seen.lock().unwrap().push(Seen { request: request.to_owned(), target, authorization, body });
    let exchange = next_reply(script, request);
    if exchange.fault.is_some() {
        return None;
    }
    let mut response =
        Response::builder().status(exchange.status).header("content-type", "application/json; charset=utf-8");
    if let Some(value) = &exchange.retry_after {
        response = response.header("retry-after", value.as_str());
    }
    Some(response.body(Full::new(Bytes::from(serde_json::to_vec(&exchange.body).unwrap()))).unwrap())
}

async fn serve_mqtt<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    usernames: Arc<Mutex<Vec<String>>>,
    connack: ConnectReturnCode,
    connack_delay: Duration,
) {
    const MAX: usize = 256 * 1024;
    let mut buf = BytesMut::new();
    let mut password = None;
    let mut pkid: u16 = 0;
    let mut refused = false;
    loop {
        let packet = loop {
            match Packet::read(&mut buf, MAX) {
                Ok(p) => break p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                Err(e) => panic!("bad packet from the client: {e:?}"),
            }
        };
        let mut out = BytesMut::new();
        match packet {
            Packet::Connect(connect) => {
                let login = connect.login.expect("CONNECT carries a username");
                assert_eq!(
                    connect.client_id,
                    ConnectUsername::parse(&login.username).unwrap().registration_id.as_str()
                );
                usernames.lock().unwrap().push(login.username);
                password = Some(login.password).filter(|p| !p.is_empty());
                tokio::time::sleep(connack_delay).await;
                Packet::ConnAck(ConnAck::new(connack, false)).write(&mut out, MAX).unwrap();
                refused = connack != ConnectReturnCode::Success;
            }
            Packet::Subscribe(sub) => {
                let codes =
                    sub.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                Packet::SubAck(SubAck::new(sub.pkid, codes)).write(&mut out, MAX).unwrap();
            }
            Packet::Publish(publish) => {
                if publish.qos != QoS::AtMostOnce {
                    Packet::PubAck(PubAck::new(publish.pkid)).write(&mut out, MAX).unwrap();
                }
                let request = DeviceRequest::parse_topic(&publish.topic).unwrap();
                let kind = match request {
                    DeviceRequest::Register { .. } => "register",
                    DeviceRequest::PollStatus { .. } => "poll",
                };
                seen.lock().unwrap().push(Seen {
                    request: kind.to_owned(),
                    target: publish.topic.clone(),
                    authorization: password.clone(),
                    body: publish.payload.clone(),
                });
                let exchange = next_reply(&script, kind);
                match exchange.fault {
                    // Dropping the stream sends no close_notify: the client reads an unexpected EOF.
                    Some(Fault::Close) => return,
                    Some(Fault::Disconnect) => {
                        let mut bye = BytesMut::new();
                        Packet::Disconnect.write(&mut bye, MAX).unwrap();
                        let _ = stream.write_all(&bye).await;
                        let _ = stream.flush().await;
                        return;
                    }
                    None => {}
                }
                let mut topic = ResponseTopic::reply_to(&request, exchange.status, None).to_string();
                if let Some(value) = &exchange.retry_after {
                    topic = format!("{topic}&retry-after={value}");
                }
                pkid = pkid % 60_000 + 1;
                let mut reply =
                    Publish::new(topic, QoS::AtLeastOnce, serde_json::to_vec(&exchange.body).unwrap());
                reply.pkid = pkid;
                Packet::Publish(reply).write(&mut out, MAX).unwrap();
            }
            Packet::PingReq => Packet::PingResp.write(&mut out, MAX).map(|_| ()).unwrap(),
            Packet::Disconnect => return,
            _ => {}
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if refused {
            // A refused CONNECT ends the connection, as a broker does.
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// This crate's directory as cargo gives it when running the test: a binary reused from a shared
/// build cache may have been compiled in a checkout elsewhere, so the compile-time path is only
/// the fallback.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
