//! The `zerotouch` server as a library: configuration, data directory, store commands, serve.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod error;
pub mod logging;
pub mod server;
pub mod service;

pub use error::ServerError;
