//! The proto crate's single error type and the wire shape every failure is mapped to.

use serde::{Deserialize, Serialize};

/// Everything that can go wrong while parsing wire input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// An identifier broke its documented rules.
    #[error("invalid {kind}: {reason}")]
    InvalidId {
        /// Which identifier (for example `registration id`).
        kind: &'static str,
        /// What rule it broke, in words a person can act on.
        reason: String,
    },
    /// A SAS token could not be parsed.
    #[error("invalid SAS token: {0}")]
    InvalidSas(String),
    /// A timestamp was not ISO 8601 UTC.
    #[error("invalid timestamp: {0}")]
    InvalidTimestamp(String),
    /// An MQTT topic did not follow the DPS topic grammar.
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    /// An HTTP route did not match the DPS route grammar.
    #[error("invalid route: {0}")]
    InvalidRoute(String),
    /// A JSON body did not match its schema.
    #[error("invalid body: {0}")]
    InvalidBody(String),
}

/// A failure as it travels on the wire: HTTP status (also the MQTT status topic segment), the
/// six-digit DPS `errorCode` (HTTP status × 1000 + suffix) and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// HTTP status code, also used in `$dps/registrations/res/{status}/`.
    pub http_status: u16,
    /// DPS numeric error code, for example `401002`.
    pub error_code: u32,
    /// Human-readable message.
    pub message: String,
}

impl ProtoError {
    /// Maps the parse failure to its DPS wire error (all are client errors).
    pub fn to_wire(&self) -> WireError {
        let (http_status, error_code) = match self {
            ProtoError::InvalidId { kind, .. } if *kind == "registration id" => (400, 400004),
            ProtoError::InvalidSas(_) => (401, 401002),
            ProtoError::InvalidRoute(_) => (404, 404000),
            _ => (400, 400000),
        };
        WireError { http_status, error_code, message: self.to_string() }
    }
}
