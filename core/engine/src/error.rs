//! The engine's single error type, mapped once to the DPS wire (HTTP status + `errorCode` + message).

use zerotouch_proto::{ProtoError, WireError};

/// Every way a provisioning operation can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be authenticated (HTTP 401).
    #[error("unauthorized: {0}")]
    Auth(#[from] AuthError),
    /// The request was malformed (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The registration id in the body, path, username or token disagree (HTTP 400, 400004).
    #[error("invalid registration id: {0}")]
    InvalidRegistrationId(String),
    /// A wire value failed to parse.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// Nothing is enrolled for this registration (HTTP 404, 404201).
    #[error("no enrollment found for registration {0:?}")]
    EnrollmentNotFound(String),
    /// The registration is enrolled but has no registration record: it has not registered
    /// (HTTP 404, 404201).
    #[error("registration {0:?} has not registered yet")]
    RegistrationNotFound(String),
    /// The operation id is unknown or expired (HTTP 404, 404202).
    #[error("operation {0:?} not found")]
    OperationNotFound(String),
    /// A named entity does not exist (HTTP 404, 404000).
    #[error("{0} not found")]
    NotFound(String),
    /// The entity exists already or the request conflicts with its state (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An If-Match precondition failed (HTTP 412).
    #[error("precondition failed: the etag does not match")]
    PreconditionFailed,
    /// Too many requests; retry after the given seconds (HTTP 429).
    #[error("throttled; retry after {retry_after_secs} s")]
    Throttled {
        /// Seconds the client should wait.
        retry_after_secs: u32,
    },
    /// Allocation could not choose a hub.
    #[error("allocation failed: {0}")]
    Allocation(#[from] AllocationError),
    /// The hub refused the device identity or twin.
    #[error("hub error {code}: {message}")]
    Hub {
        /// Six-digit code reported by the hub.
        code: u32,
        /// Hub message (may itself be JSON, as on real DPS).
        message: String,
    },
    /// The store failed.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// A crypto primitive failed (for example the random source).
    #[error("crypto failure: {0}")]
    Crypto(String),
}

/// Why a device was not authenticated. All map to HTTP 401 / `401002`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No SAS token and no client certificate.
    #[error("no credential presented")]
    MissingCredential,
    /// The SAS token signature does not match any enrolled key.
    #[error("SAS signature does not match")]
    SignatureMismatch,
    /// The SAS token's `se` lies in the past.
    #[error("SAS token expired")]
    TokenExpired,
    /// The SAS token's `sr` names another scope or registration.
    #[error("SAS token resource {0:?} does not name this registration")]
    WrongResource(String),
    /// The SAS token's `skn` is not `registration`.
    #[error("SAS key name {0:?} is not accepted")]
    WrongKeyName(String),
    /// The certificate chain is malformed.
    #[error("Invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate of the chain has expired.
    #[error("Invalid certificate: certificate expired")]
    CertificateExpired,
    /// A certificate of the chain is not valid yet.
    #[error("Invalid certificate: certificate not yet valid")]
    CertificateNotYetValid,
    /// The leaf's subject CN differs from the registration id.
    #[error("Invalid certificate: subject CN {cn:?} does not match registration id")]
    CommonNameMismatch {
        /// The CN found in the leaf.
        cn: String,
    },
    /// No enrolled or verified certificate anchors the chain.
    #[error("Invalid certificate: chain does not lead to an enrolled certificate")]
    UntrustedChain,
    /// A signature in the chain does not verify.
    #[error("Invalid certificate: bad signature")]
    BadSignature,
    /// The enrollment (or the individual entry that overrides a group) is disabled.
    #[error("enrollment is disabled")]
    EnrollmentDisabled,
    /// The attestation type of the credential does not match the enrollment.
    #[error("attestation mechanism does not match the enrollment")]
    AttestationMismatch,
}

impl AuthError {
    /// Whether the presented token itself is refused (none presented, a signature that matches
    /// no key, expired, addressed to another registration or key name) rather than the
    /// enrollment it names (disabled, of another attestation type) or a certificate. An MQTT
    /// endpoint refuses the former at CONNECT (return code 5) and accepts the latter, to answer
    /// the register with 401 (spec §2.1).
    pub fn is_bad_token(&self) -> bool {
        matches!(
            self,
            AuthError::MissingCredential
                | AuthError::SignatureMismatch
                | AuthError::TokenExpired
                | AuthError::WrongResource(_)
                | AuthError::WrongKeyName(_)
        )
    }
}

/// Why allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocationError {
    /// No linked hub is a candidate (HTTP 400, 400208 "hub not specified").
    #[error("no IoT hub is available for allocation")]
    NoHub,
    /// Static allocation needs exactly one hub on the enrollment (400208).
    #[error("static allocation requires exactly one IoT hub, found {0}")]
    StaticNeedsOneHub(usize),
    /// The enrollment names a hub that is not linked (400209).
    #[error("IoT hub {0:?} is not linked to this service")]
    UnknownHub(String),
    /// Custom allocation is configured but no allocator is installed (400210).
    #[error("custom allocation is configured but no custom allocator is installed")]
    NoCustomAllocator,
    /// The custom allocator failed or returned a hub outside the candidates (400211).
    #[error("custom allocation failed: {0}")]
    Custom(String),
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The entity does not exist.
    #[error("not found")]
    NotFound,
    /// The entity exists already.
    #[error("already exists")]
    AlreadyExists,
    /// The etag precondition failed.
    #[error("precondition failed")]
    PreconditionFailed,
    /// A continuation token the store did not issue: client input (the `x-ms-continuation` of
    /// a listing), so a bad request, not a backend failure.
    #[error("invalid continuation token")]
    InvalidContinuation,
    /// The write conflicted with concurrent writes (a deadlock, a serialization failure) and
    /// the database cancelled it, each time the store ran it: nothing was written, and the same
    /// write may succeed when tried again shortly. The text names the cause (on PostgreSQL its
    /// SQLSTATE and message) for logs; the wire says only "try again later" (HTTP 429 429001).
    #[error("conflicted with concurrent writes, try again: {0}")]
    Conflict(String),
    /// The backend failed (I/O, SQL, serialization).
    #[error("backend: {0}")]
    Backend(String),
}

impl Error {
    /// The one mapping of every failure to the wire.
    pub fn to_wire(&self) -> WireError {
        let (http_status, error_code, message) = match self {
            Error::Auth(AuthError::InvalidCertificate(_))
            | Error::Auth(AuthError::CertificateExpired)
            | Error::Auth(AuthError::CertificateNotYetValid)
            | Error::Auth(AuthError::CommonNameMismatch { .. })
            | Error::Auth(AuthError::UntrustedChain)
            | Error::Auth(AuthError::BadSignature) => (401, 401002, "Invalid certificate.".to_owned()),
            Error::Auth(_) => (401, 401002, "Unauthorized".to_owned()),
            Error::BadRequest(m) => (400, 400000, m.clone()),
            Error::InvalidRegistrationId(m) => (400, 400004, format!("Invalid RegistrationId: {m}")),
            Error::Proto(p) => {
                let w = p.to_wire();
                (w.http_status, w.error_code, w.message)
            }
            Error::EnrollmentNotFound(_) | Error::RegistrationNotFound(_) => (404, 404201, self.to_string()),
            Error::OperationNotFound(_) => (404, 404202, self.to_string()),
            Error::NotFound(_) => (404, 404000, self.to_string()),
            Error::Conflict(_) => (409, 409000, self.to_string()),
            Error::PreconditionFailed => (412, 412000, self.to_string()),
            Error::Throttled { .. } | Error::Store(StoreError::Conflict(_)) => {
                (429, 429001, "Too many requests".to_owned())
            }
            Error::Allocation(a) => {
                let code = match a {
                    AllocationError::NoHub | AllocationError::StaticNeedsOneHub(_) => 400208,
                    AllocationError::UnknownHub(_) => 400209,
                    AllocationError::NoCustomAllocator => 400210,
                    _ => 400211,
                };
                (400, code, a.to_string())
            }
            Error::Hub { code, message } => {
                (u16::try_from(code / 1000).unwrap_or(500), *code, message.clone())
            }
            Error::Store(StoreError::NotFound) => (404, 404000, self.to_string()),
            Error::Store(StoreError::AlreadyExists) => (409, 409000, self.to_string()),
            Error::Store(StoreError::PreconditionFailed) => (412, 412000, self.to_string()),
            // Only the hub's listings take client tokens into a store: its ArgumentInvalid.
            Error::Store(StoreError::InvalidContinuation) => {
                (400, 400004, "Invalid continuation token.".to_owned())
            }
            Error::Store(_) | Error::Crypto(_) => (500, 500000, "Internal server error".to_owned()),
        };
        WireError { http_status, error_code, message }
    }
}
