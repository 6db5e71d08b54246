//! The server's one error type.

use std::path::PathBuf;

/// What can go wrong while configuring, starting or administering a zerotouch server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A flag, config file key or combination of them is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A listener could not be bound or served.
    #[error("listener {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating or loading a TLS certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// An entry of an enrollment import file is invalid; nothing was written.
    #[error("entry {index}: {message}")]
    Import {
        /// Zero-based position of the entry in the file's array.
        index: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The engine refused an operation or its store failed.
    #[error(transparent)]
    Engine(#[from] zerotouch_engine::Error),
    /// A store could not be opened.
    #[error("store: {0}")]
    Store(String),
    /// What a store command asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A device registration through the client failed.
    #[error("registration: {message}")]
    Registration {
        /// What happened, with the service's status and error code when it answered.
        message: String,
        /// Whether trying again may help, for the exit code.
        kind: RegistrationErrorKind,
    },
}

/// How a `device register` failed, as its exit code tells scripts (see
/// [`ServerError::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationErrorKind {
    /// The service refused the device as it is (credential, disabled or failed registration,
    /// a request it calls bad), or the device refused the service's TLS certificate: trying
    /// again unchanged will not help.
    Refused,
    /// The ID scope or enrollment is unknown to the service.
    NotFound,
    /// Throttled, timed out, or the connection failed: trying again later may help.
    Retryable,
    /// The service's answers could not be understood.
    Protocol,
}

impl ServerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// The process exit code for this error: 3 invalid configuration or input (a provisioning
    /// host that does not resolve included), 4 not found, 5 registration refused (by the
    /// service, or the service's certificate is not trusted), 6 registration may succeed if
    /// tried again later (throttled, timed out, no connection), 7 the service's answers were not
    /// understood, 1 anything else (I/O, store, certificates, listeners). clap's usage errors
    /// exit with 2.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Import { .. } => 3,
            Self::NotFound(_) => 4,
            Self::Registration { kind, .. } => match kind {
                RegistrationErrorKind::NotFound => 4,
                RegistrationErrorKind::Refused => 5,
                RegistrationErrorKind::Retryable => 6,
                RegistrationErrorKind::Protocol => 7,
            },
            Self::Io { .. }
            | Self::Listen { .. }
            | Self::Certificate(_)
            | Self::Engine(_)
            | Self::Store(_) => 1,
        }
    }
}
