//! The one error type of the device client.

use zerotouch_engine::registration::{FailureKind, RegistrationFailure};

/// Why [`ProvisioningClient::register`](super::ProvisioningClient::register) or the builder failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The builder was given an unusable setting (bad id, key, host, PEM, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// TCP connect, TLS handshake or WebSocket upgrade failed, or the connection dropped.
    #[error("connection to the provisioning service failed: {0}")]
    Connection(String),
    /// The client refused the service's TLS certificate: not issued by a trusted CA (see
    /// [`ca_pem`](super::ProvisioningClientBuilder::ca_pem)), not valid for the provisioning
    /// host's name, or outside its validity period. Waiting does not cure it. The text names
    /// the server (`host:port`) and what rustls found wrong.
    #[error("the provisioning service's TLS certificate is not trusted: {0}")]
    UntrustedServer(String),
    /// The provisioning host's name does not exist for the name service (a temporary failure of
    /// the name service is a [`Connection`](Self::Connection) error instead). The text names the
    /// host (`host:port`) and the resolver's answer.
    #[error("the provisioning host cannot be resolved: {0}")]
    UnknownHost(String),
    /// The MQTT broker refused the CONNECT with a non-zero return code (4 or 5 for a bad SAS
    /// token, 3 when the service is unavailable, 1 or 2 for a protocol or client id it refuses).
    #[error(
        "the provisioning service refused the MQTT connection (CONNACK return code {return_code}: {reason})"
    )]
    ConnectRefused {
        /// The CONNACK return code (1–5).
        return_code: u8,
        /// The MQTT 3.1.1 meaning of the code.
        reason: &'static str,
    },
    /// The MQTT broker did not grant the subscription to the reply topics.
    #[error("the provisioning service refused the subscription to the reply topics")]
    SubscribeRefused,
    /// The service answered, and the registration ended without an assignment (refused
    /// credential, unknown enrollment, `status: "failed"`, throttled, timeout, ...).
    #[error(transparent)]
    Registration(#[from] RegistrationFailure),
}

impl ClientError {
    /// The HTTP status (MQTT status topic segment) of the reply that ended the registration.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Registration(f) => f.status,
            _ => None,
        }
    }

    /// The six-digit DPS error code the service sent, e.g. `401002`.
    pub fn error_code(&self) -> Option<u32> {
        match self {
            Self::Registration(f) => f.error_code,
            _ => None,
        }
    }

    /// The failure category when the registration itself failed.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Self::Registration(f) => Some(f.kind),
            _ => None,
        }
    }

    /// Whether the service refused the device's credential, on any transport: a 401 reply or an
    /// MQTT CONNACK "bad user name or password" / "not authorized".
    pub fn is_unauthorized(&self) -> bool {
        match self {
            Self::Registration(f) => f.kind == FailureKind::Unauthorized,
            Self::ConnectRefused { return_code, .. } => matches!(return_code, 4 | 5),
            _ => false,
        }
    }
}
