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
    #[error("registration: {0}")]
    Registration(String),
}

impl ServerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
