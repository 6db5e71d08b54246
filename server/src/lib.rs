//! The `zerotouch` server as a library: configuration, data directory, store commands, serve.

pub mod admin;
pub mod config;
pub mod datadir;
pub mod error;

pub use error::ServerError;
