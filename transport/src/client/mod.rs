//! The Rust device client: `ProvisioningClient` registers a device with DPS (Azure or zerotouch)
//! over MQTT, MQTT over WebSockets or HTTPS.
//!
//! The client only moves bytes and time: every protocol decision (what to send, when to poll,
//! how to read a reply, when to give up) is the engine's [`Registration`] state machine.
//!
//! ```no_run
//! # async fn run() -> Result<(), zerotouch_transport::client::ClientError> {
//! use zerotouch_transport::client::{ProvisioningClient, Transport};
//!
//! let assignment = ProvisioningClient::builder("0ne00111111", "thermostat-17")
//!     .group_key("8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==")
//!     .transport(Transport::Mqtt)
//!     .build()?
//!     .register()
//!     .await?;
//! println!("{} on {}", assignment.device_id, assignment.assigned_hub);
//! # Ok(()) }
//! ```

mod error;
mod https;
mod mqtt;
mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use serde_json::Value;
use zerotouch_engine::attestation::symmetric::derive_device_key;
use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_engine::registration::{
    DeviceCredential, Registration, RegistrationConfig, RegistrationEvent, ServiceResponse, Transmit,
};
use zerotouch_proto::{IdScope, RegistrationId, Timestamp};

pub use error::ClientError;
pub use zerotouch_engine::registration::{Assignment, FailureKind, RegistrationFailure};

/// The global device endpoint of Azure DPS, shared by every instance (the ID scope picks one).
pub const GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";

/// The WebSocket path of MQTT over WebSockets (the IoT Hub one, also used by DPS).
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";

/// Value of `ClientVersion` in the MQTT username and of the HTTP `User-Agent`.
pub const USER_AGENT: &str = concat!("zerotouch-device/", env!("CARGO_PKG_VERSION"));

/// How the client talks to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// MQTT 3.1.1 over TLS, port 8883 by default.
    #[default]
    Mqtt,
    /// MQTT over WebSockets (`wss://host/$iothub/websocket`, subprotocol `mqtt`), port 443 by default.
    MqttWs,
    /// The HTTPS device API, port 443 by default.
    Https,
}

impl Transport {
    /// The port used when the provisioning host names none.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Mqtt => 8883,
            Self::MqttWs | Self::Https => 443,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mqtt => "mqtt",
            Self::MqttWs => "mqtt-ws",
            Self::Https => "https",
        })
    }
}

/// How the device proves its identity. Key material never appears in `Debug` output.
#[derive(Clone)]
enum Credential {
    /// The device's own key (individual enrollment), base64.
    SymmetricKey(String),
    /// The enrollment group's key, base64; the device key is derived from it and the
    /// registration id.
    GroupKey(String),
    /// A certificate chain (leaf first) and its private key, PEM.
    X509 { chain_pem: Vec<u8>, key_pem: Vec<u8> },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SymmetricKey(_) => "SymmetricKey(<redacted>)",
            Self::GroupKey(_) => "GroupKey(<redacted>)",
            Self::X509 { .. } => "X509(<redacted>)",
        })
    }
}

/// Settings of a [`ProvisioningClient`]; start with [`ProvisioningClient::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ProvisioningClientBuilder {
    id_scope: String,
    registration_id: String,
    host: String,
    transport: Transport,
    credential: Option<Credential>,
    ca_pem: Option<Vec<u8>>,
    /// The file `ca_pem` was read from, named in errors about its content.
    ca_file: Option<PathBuf>,
    payload: Option<Value>,
    api_version: Option<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    token_ttl: Option<Duration>,
    max_throttle_retries: Option<u32>,
    registration_timeout: Option<Duration>,
}

impl ProvisioningClientBuilder {
    /// The provisioning host: a name or address, optionally with `:port` (default
    /// [`GLOBAL_ENDPOINT`], port from [`Transport::default_port`]).
    pub fn provisioning_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// The transport (default [`Transport::Mqtt`]).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Authenticate with the device's own symmetric key (individual enrollment), base64.
    pub fn symmetric_key(mut self, key_base64: impl Into<String>) -> Self {
        self.credential = Some(Credential::SymmetricKey(key_base64.into()));
        self
    }

    /// Authenticate with a key derived from the enrollment group's key (base64) and the
    /// registration id, as DPS expects of group members.
    pub fn group_key(mut self, group_key_base64: impl Into<String>) -> Self {
        self.credential = Some(Credential::GroupKey(group_key_base64.into()));
        self
    }

    /// Authenticate with an X.509 certificate: `chain_pem` holds the device certificate first,
    /// then any intermediates the service needs to reach an enrolled CA; `key_pem` its key
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn x509_pem(mut self, chain_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.credential = Some(Credential::X509 { chain_pem: chain_pem.into(), key_pem: key_pem.into() });
        self
    }

    /// [`x509_pem`](Self::x509_pem) from files.
    ///
    /// # Errors
    /// [`ClientError::Config`] when a file cannot be read.
    pub fn x509_files(
        self,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, ClientError> {
        let chain = read_file(cert_path.as_ref(), "device certificate")?;
        let key = read_file(key_path.as_ref(), "device key")?;
        Ok(self.x509_pem(chain, key))
    }

    /// Trust only the CA certificates of this PEM for the server (a self-hosted server's CA)
    /// instead of the operating system's store.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self.ca_file = None;
        self
    }

    /// [`ca_pem`](Self::ca_pem) from a file; [`build`](Self::build) names the file when it
    /// holds no usable certificate.
    ///
    /// # Errors
    /// [`ClientError::Config`] when the file cannot be read.
    pub fn ca_file(self, path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let pem = read_file(path.as_ref(), "CA certificate")?;
        let mut builder = self.ca_pem(pem);
        builder.ca_file = Some(path.as_ref().to_owned());
        Ok(builder)
    }

    /// A custom JSON payload for the allocation webhook.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = Some(payload);
        self
    }

    /// The api-version to speak (default: the engine's `2021-06-01`).
    pub fn api_version(mut self, api_version: impl Into<String>) -> Self {
        self.api_version = Some(api_version.into());
        self
    }

    /// How long to wait for each reply (default 30 s, as every SDK).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long TCP connect, TLS handshake and MQTT CONNACK may take together (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Lifetime of the SAS tokens the client signs (default 1 h).
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = Some(ttl);
        self
    }

    /// How many 429/5xx replies in a row the client sits out before giving up (default: no
    /// count; the client keeps retrying until the registration timeout).
    pub fn max_throttle_retries(mut self, retries: u32) -> Self {
        self.max_throttle_retries = Some(retries);
        self
    }

    /// How long the whole registration may take, connection and waits included, before it fails
    /// with a timeout (default 15 min).
    pub fn registration_timeout(mut self, timeout: Duration) -> Self {
        self.registration_timeout = Some(timeout);
        self
    }

    /// Checks the settings, derives the device key of a group member and builds the TLS
    /// configuration.
    ///
    /// # Errors
    /// [`ClientError::Config`] for an invalid ID scope, registration id, key, PEM or host, or
    /// when no credential was given.
    pub fn build(self) -> Result<ProvisioningClient, ClientError> {
        let id_scope =
            IdScope::new(self.id_scope.as_str()).map_err(|e| ClientError::Config(e.to_string()))?;
        let registration_id = RegistrationId::new(self.registration_id.as_str())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let credential = self.credential.ok_or_else(|| {
            ClientError::Config(
                "no credential: give a symmetric key, a group key or an X.509 certificate".into(),
            )
        })?;
        let crypto: Arc<dyn CryptoProvider> = Arc::new(RingCrypto::new());
        // The engine's message without its "bad request:" (wire) prefix, for the key given.
        let engine_key = |b64: &str, what: &str| {
            DeviceCredential::symmetric_key_base64(b64).map_err(|e| {
                let message = match e {
                    zerotouch_engine::Error::BadRequest(message) => message,
                    other => other.to_string(),
                };
                ClientError::Config(message.replacen("the symmetric key", what, 1))
            })
        };
        let (device_credential, identity) = match &credential {
            Credential::SymmetricKey(key) => (engine_key(key, "the symmetric key")?, None),
            Credential::GroupKey(key) => {
                let DeviceCredential::SymmetricKey(group) = engine_key(key, "the group key")? else {
                    return Err(ClientError::Config("the group key is not a symmetric key".into()));
                };
                let derived = derive_device_key(crypto.as_ref(), &group, registration_id.as_str());
                (DeviceCredential::SymmetricKey(derived.to_vec()), None)
            }
            Credential::X509 { chain_pem, key_pem } => {
                (DeviceCredential::X509, Some(tls::Identity { chain_pem, key_pem }))
            }
        };
        let endpoint = Endpoint::parse(&self.host, self.transport.default_port())?;
        let roots = match &self.ca_pem {
            Some(pem) => tls::Roots::Pem { pem, file: self.ca_file.as_deref() },
            None => tls::Roots::Native,
        };
        let alpn: &[&[u8]] = if self.transport == Transport::Https { &[b"http/1.1"] } else { &[] };
        let tls = tls::client_config(roots, identity, alpn)?;

        let mut config = RegistrationConfig::new(id_scope, registration_id, device_credential);
        config.payload = self.payload;
        if let Some(v) = self.api_version {
            config.api_version = v;
        }
        if let Some(ttl) = self.token_ttl {
            config.token_ttl = ttl;
        }
        if let Some(n) = self.max_throttle_retries {
            config.max_throttle_retries = Some(n);
        }
        if let Some(timeout) = self.registration_timeout {
            if timeout.is_zero() {
                return Err(ClientError::Config("the registration timeout must be longer than zero".into()));
            }
            config.registration_timeout = timeout;
        }
        config.request_timeout = self.request_timeout;
        Ok(ProvisioningClient {
            config,
            crypto,
            endpoint,
            transport: self.transport,
            tls,
            connect_timeout: self.connect_timeout,
        })
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

/// Host and port of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Name or address, without brackets for IPv6.
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Endpoint {
    fn parse(text: &str, default_port: u16) -> Result<Self, ClientError> {
        let bad =
            || ClientError::Config(format!("bad provisioning host {text:?}: expected HOST or HOST:PORT"));
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match text.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => (text, None),
                None => (text, None),
            }
        };
        if host.is_empty() || host.contains(['/', ' ', '?', '#']) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
            None => default_port,
        };
        Ok(Self { host: host.to_owned(), port })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A DPS device client for one registration id. Cheap to clone; each
/// [`register`](Self::register) opens its own connection.
#[derive(Clone)]
pub struct ProvisioningClient {
    config: RegistrationConfig,
    crypto: Arc<dyn CryptoProvider>,
    endpoint: Endpoint,
    transport: Transport,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
}

impl fmt::Debug for ProvisioningClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningClient")
            .field("id_scope", &self.config.id_scope)
            .field("registration_id", &self.config.registration_id)
            .field("credential", &self.config.credential)
            .field("endpoint", &self.endpoint.authority())
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl ProvisioningClient {
    /// Starts a builder for the device `registration_id` of the DPS instance `id_scope`.
    pub fn builder(
        id_scope: impl Into<String>,
        registration_id: impl Into<String>,
    ) -> ProvisioningClientBuilder {
        ProvisioningClientBuilder {
            id_scope: id_scope.into(),
            registration_id: registration_id.into(),
            host: GLOBAL_ENDPOINT.to_owned(),
            transport: Transport::default(),
            credential: None,
            ca_pem: None,
            ca_file: None,
            payload: None,
            api_version: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            token_ttl: None,
            max_throttle_retries: None,
            registration_timeout: None,
        }
    }

    /// The state-machine configuration this client registers with.
    pub fn config(&self) -> &RegistrationConfig {
        &self.config
    }

    /// The transport this client uses.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Registers the device: connects, sends register, polls the operation as the service asks
    /// and returns where the device was assigned.
    ///
    /// # Errors
    /// [`ClientError::Registration`] when the service refused or failed the registration (with
    /// its status and error code) or did not answer in time; [`ClientError::UntrustedServer`]
    /// when the client refused the service's certificate and [`ClientError::UnknownHost`] when
    /// the host name does not exist; [`ClientError::Connection`],
    /// [`ClientError::ConnectRefused`] or [`ClientError::SubscribeRefused`] when the first
    /// connection could not be set up, or the service refused a later CONNECT (other than with
    /// CONNACK 3, "server unavailable") or SUBSCRIBE. A connection lost after the first one was
    /// set up is opened again, after a back-off, and the outstanding request sent again until
    /// the registration timeout, which then fails with [`FailureKind::Timeout`] naming the last
    /// connection error; a new connection refused as "server unavailable" is retried the same
    /// way.
    pub async fn register(&self) -> Result<Assignment, ClientError> {
        let registration = Registration::new(self.config.clone(), self.crypto.clone());
        let clock = Clock::start();
        match self.transport {
            Transport::Mqtt | Transport::MqttWs => {
                drive(registration, mqtt::MqttLink::new(self), self.connect_timeout, clock).await
            }
            Transport::Https => {
                drive(registration, https::HttpsLink::new(self), self.connect_timeout, clock).await
            }
        }
    }
}

/// One connection to the service as the driver sees it.
pub(crate) trait Link {
    /// Makes sure a connection is open before `transmit` is sent: keeps a usable one, else opens
    /// one (MQTT signs in with the SAS token of `transmit`). The driver bounds how long it takes
    /// and drops the future when it takes too long, so it must be cancel-safe.
    async fn connect(&mut self, transmit: &Transmit) -> Result<(), ClientError>;
    /// The error of a [`connect`](Link::connect) the driver stopped after `within`.
    fn connect_timed_out(&self, within: Duration) -> ClientError;
    /// Starts sending `transmit` on the connection [`connect`](Link::connect) opened.
    async fn send(&mut self, transmit: &Transmit) -> Result<(), ClientError>;
    /// The reply to the request last sent; pending forever when none is outstanding or the
    /// connection was [`reset`](Link::reset). Must be cancel-safe: the driver races it against
    /// the state machine's timer.
    async fn recv(&mut self) -> Result<ServiceResponse, ClientError>;
    /// Forgets a connection that failed, so that the next [`connect`](Link::connect) opens a new
    /// one.
    fn reset(&mut self);
    /// Closes the connection politely.
    async fn close(self);
}

/// Pumps requests, replies and timers between `link` and the state machine until it decides.
///
/// A connection that fails after the first one was set up (closed by the service, reset, or
/// not opened again) is a transient failure: the machine sends the outstanding request again
/// after a back-off, on a new connection, until the registration deadline. A first connection
/// that cannot be set up fails the registration at once (wrong host, untrusted certificate,
/// refused credentials are not cured by waiting), and so does a refused CONNECT or SUBSCRIBE
/// at any time, except a new connection's CONNECT refused as "server unavailable" (CONNACK 3),
/// which an overloaded service answers: that one is retried like a lost connection.
async fn drive<L: Link>(
    mut registration: Registration,
    mut link: L,
    connect_timeout: Duration,
    clock: Clock,
) -> Result<Assignment, ClientError> {
    // Whether a connection was set up once: failures after that are worth a new connection.
    let mut connected = false;
    // The last connection failure since the last reply: said with a timeout, which alone would
    // not tell that the service could not be reached.
    let mut connection_error: Option<ClientError> = None;
    let outcome = loop {
        while let Some(transmit) = registration.poll_transmit(clock.now()) {
            tracing::debug!(request = request_name(&transmit), "sending");
            let sent = connect_and_send(
                &mut link,
                &mut registration,
                &transmit,
                connect_timeout,
                clock,
                &mut connected,
            )
            .await;
            let Err(e) = sent else { continue };
            // The request never went out, so its reply deadline (set by `poll_transmit`, before
            // connecting) is not the one to check: only the registration deadline bounds a
            // connection attempt, as `handle_sent` promises.
            let now = clock.now();
            if registration.deadline().is_some_and(|end| now >= end) {
                // The registration deadline cut the attempt short.
                registration.handle_timeout(now);
                connection_error = Some(e);
            } else if connected && is_transient(&e) {
                connection_lost(&mut registration, &mut link, now, e, &mut connection_error);
            } else {
                link.close().await;
                return Err(e);
            }
        }
        if let Some(event) = registration.poll_event() {
            break event;
        }
        let wait = registration.poll_timeout().map(|t| t.saturating_since(clock.now()));
        let timer = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let reply = tokio::select! {
            reply = link.recv() => Some(reply),
            () = timer => None,
        };
        match reply {
            Some(Ok(response)) => {
                tracing::debug!(status = response.status, retry_after = ?response.retry_after, "reply");
                connection_error = None;
                registration.handle_response(clock.now(), response);
            }
            Some(Err(e)) if is_transient(&e) => {
                connection_lost(&mut registration, &mut link, clock.now(), e, &mut connection_error);
            }
            Some(Err(e)) => {
                link.close().await;
                return Err(e);
            }
            None => registration.handle_timeout(clock.now()),
        }
        if let Some(wait) = registration.poll_timeout().map(|t| t.saturating_since(clock.now())) {
            tracing::debug!(wait_secs = wait.as_secs_f64(), "waiting");
        }
        if let Some(event) = registration.poll_event() {
            break event;
        }
    };
    link.close().await;
    match outcome {
        RegistrationEvent::Assigned(assignment) => Ok(assignment),
        RegistrationEvent::Failed(mut failure) => {
            if let (FailureKind::Timeout, Some(e)) = (failure.kind, connection_error) {
                failure.message = format!("{}; last connection error: {e}", failure.message);
            }
            Err(ClientError::Registration(failure))
        }
    }
}

/// Connects if need be, within the connect timeout and the time left before the registration
/// deadline (setting `connected` once a connection is up), sends `transmit` and starts its
/// reply deadline.
async fn connect_and_send<L: Link>(
    link: &mut L,
    registration: &mut Registration,
    transmit: &Transmit,
    connect_timeout: Duration,
    clock: Clock,
    connected: &mut bool,
) -> Result<(), ClientError> {
    let left = registration.deadline().map_or(connect_timeout, |end| end.saturating_since(clock.now()));
    let within = connect_timeout.min(left);
    match tokio::time::timeout(within, link.connect(transmit)).await {
        Ok(done) => done?,
        Err(_) => return Err(link.connect_timed_out(within)),
    }
    *connected = true;
    link.send(transmit).await?;
    registration.handle_sent(clock.now());
    Ok(())
}

/// Whether a connection failure may pass with a new connection: a lost or unreachable
/// connection may, and so may a CONNECT refused with CONNACK 3 "server unavailable" (what an
/// overloaded service answers); a CONNECT refused otherwise, a refused SUBSCRIBE or a bad
/// setting does not.
fn is_transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Connection(_) | ClientError::ConnectRefused { return_code: 3, .. })
}

/// Drops the failed connection and lets the machine schedule the outstanding request again.
fn connection_lost<L: Link>(
    registration: &mut Registration,
    link: &mut L,
    now: Timestamp,
    error: ClientError,
    last_error: &mut Option<ClientError>,
) {
    link.reset();
    registration.handle_connection_lost(now);
    match registration.poll_timeout() {
        Some(at) => tracing::info!(
            %error,
            retry_in_secs = at.saturating_since(now).as_secs_f64(),
            "the connection to the provisioning service failed; the request goes out again on a new one"
        ),
        None => tracing::info!(%error, "the connection to the provisioning service failed"),
    }
    *last_error = Some(error);
}

/// How a connection the service closed or reset is described, instead of the texts of the
/// TLS and MQTT libraries (which carry links to their manuals).
pub(crate) const CLOSED_BY_SERVICE: &str = "the service closed the connection";

/// Whether `e`, or an error it wraps, is an I/O error of a connection the other side closed or
/// reset.
pub(crate) fn closed_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The error of a connection to `authority` that failed with `e` because the client refused
/// the server's certificate ([`ClientError::UntrustedServer`]) or the host name does not exist
/// ([`ClientError::UnknownHost`]): failures that waiting does not cure. `None` for any other
/// failure.
pub(crate) fn permanent_connect_error(
    e: &(dyn std::error::Error + 'static),
    authority: &str,
) -> Option<ClientError> {
    let mut next = Some(e);
    while let Some(e) = next {
        // An `io::Error`'s `source` skips the error it wraps, so that one is looked at here.
        let wrapped = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        for e in std::iter::once(e).chain(wrapped.map(|w| w as &(dyn std::error::Error + 'static))) {
            if let Some(tls @ rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
                return Some(ClientError::UntrustedServer(format!("{authority}: {tls}")));
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // What std says when getaddrinfo fails; its temporary failure (EAI_AGAIN: no answer
            // from the name server) may pass.
            let text = io.to_string();
            if text.starts_with("failed to lookup address information")
                && !text.to_ascii_lowercase().contains("temporary failure")
            {
                return Some(ClientError::UnknownHost(format!("{authority}: {text}")));
            }
        }
        next = e.source();
    }
    None
}

fn request_name(transmit: &Transmit) -> &'static str {
    match transmit {
        Transmit::Register { .. } => "register",
        Transmit::PollStatus { .. } => "operation status",
    }
}

/// A registration's clock: the wall clock read once at the start (SAS expiries are absolute Unix
/// times), advanced by the monotonic clock, so that a wall clock stepped back or forth (NTP)
/// neither stretches nor cuts the waits and deadlines of a running registration.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Timestamp,
    started: tokio::time::Instant,
}

impl Clock {
    fn start() -> Self {
        Self { start: crate::service::now(), started: tokio::time::Instant::now() }
    }

    fn now(&self) -> Timestamp {
        self.start + self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioning_host_with_and_without_port() {
        let e = Endpoint::parse("global.azure-devices-provisioning.net", 8883).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("global.azure-devices-provisioning.net", 8883));
        let e = Endpoint::parse("127.0.0.1:18883", 8883).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 18883));
        let e = Endpoint::parse("[::1]:8443", 443).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.authority().as_str()), ("::1", 8443, "[::1]:8443"));
        assert!(Endpoint::parse("localhost:0", 443).is_err());
        assert!(Endpoint::parse("localhost:http", 443).is_err());
        assert!(Endpoint::parse("https://localhost", 443).is_err());
        assert!(Endpoint::parse("", 443).is_err());
    }

    #[test]
    fn group_member_signs_with_the_derived_key() {
        // Vector V1 of the spec: the derived key of sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6.
        let ca = zerotouch_testkit::certs::TestCa::root("test root");
        let client = ProvisioningClient::builder("0ne00111111", "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6")
            .group_key(
                "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            )
            .ca_pem(ca.pem())
            .build()
            .unwrap();
        let expected =
            DeviceCredential::symmetric_key_base64("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=").unwrap();
        assert_eq!(client.config().credential, expected);
        assert!(!format!("{client:?}").contains("Jsm0"));
    }

    #[test]
    fn a_registration_timeout_of_zero_is_refused() {
        let ca = zerotouch_testkit::certs::TestCa::root("test root");
        let built = ProvisioningClient::builder("0ne00111111", "dev1")
            .symmetric_key("c2VjcmV0")
            .ca_pem(ca.pem())
            .registration_timeout(Duration::ZERO)
            .build();
        assert!(matches!(built, Err(ClientError::Config(_))));
    }

    /// Review D8: the engine's wire prefix "bad request:" leaked into configuration errors.
    #[test]
    fn a_bad_key_is_a_configuration_error_without_the_wire_prefix() {
        let ca = zerotouch_testkit::certs::TestCa::root("test root");
        let builder = || ProvisioningClient::builder("0ne00111111", "dev1").ca_pem(ca.pem());
        for (built, expected) in [
            (builder().symmetric_key("no!").build(), "the symmetric key is not valid base64"),
            (builder().symmetric_key("").build(), "the symmetric key is empty"),
            (builder().group_key("no!").build(), "the group key is not valid base64"),
        ] {
            let Err(ClientError::Config(message)) = built else { panic!("{built:?}") };
            assert_eq!(message, expected);
        }
    }

    /// Operator review #13: a `--ca` file that holds no certificate was not named.
    #[test]
    fn a_ca_file_without_a_certificate_is_named() {
        let path = std::env::temp_dir().join(format!("zerotouch-ca-test-{}.json", std::process::id()));
        std::fs::write(&path, "{\"not\": \"a certificate\"}").unwrap();
        let built = ProvisioningClient::builder("0ne00111111", "dev1")
            .symmetric_key("c2VjcmV0")
            .ca_file(&path)
            .unwrap()
            .build();
        std::fs::remove_file(&path).unwrap();
        let Err(ClientError::Config(message)) = built else { panic!("{built:?}") };
        assert_eq!(message, format!("the CA file {} holds no PEM certificate", path.display()));
        // Given as bytes, it is "the CA PEM".
        let built =
            ProvisioningClient::builder("0ne00111111", "dev1").symmetric_key("c2VjcmV0").ca_pem("{}").build();
        let Err(ClientError::Config(message)) = built else { panic!("{built:?}") };
        assert_eq!(message, "the CA PEM holds no certificate");
    }

    #[test]
    fn builder_rejects_missing_credential_and_bad_ids() {
        let ca = zerotouch_testkit::certs::TestCa::root("test root");
        let no_cred = ProvisioningClient::builder("0ne00111111", "dev1").ca_pem(ca.pem()).build();
        assert!(matches!(no_cred, Err(ClientError::Config(_))));
        let bad_scope =
            ProvisioningClient::builder("scope", "dev1").symmetric_key("c2VjcmV0").ca_pem(ca.pem()).build();
        assert!(matches!(bad_scope, Err(ClientError::Config(_))));
        let bad_key =
            ProvisioningClient::builder("0ne00111111", "dev1").symmetric_key("no!").ca_pem(ca.pem()).build();
        assert!(matches!(bad_key, Err(ClientError::Config(_))));
        let bad_ca = ProvisioningClient::builder("0ne00111111", "dev1")
            .symmetric_key("c2VjcmV0")
            .ca_pem("junk")
            .build();
        assert!(matches!(bad_ca, Err(ClientError::Config(_))));
    }
}
