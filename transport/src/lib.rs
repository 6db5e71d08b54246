//! Device endpoints (MQTT/TLS, HTTPS, MQTT over WebSockets) and the Rust device client.
//!
//! The endpoints decode bytes with `zerotouch-proto` types, hand the requests to a
//! [`service::DpsService`] (the engine's provisioner behind it) and encode its answers; the
//! client drives the engine's device-side `Registration` state machine over the same protocols.

pub mod client;
#[cfg(feature = "http")]
pub mod http;
pub mod limits;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod service;
pub mod tls;
#[cfg(feature = "ws")]
pub mod ws;
