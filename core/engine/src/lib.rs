//! Sans-I/O provisioning and device-identity engine.
//!
//! Attestation (symmetric key, X.509, TPM types), allocation of devices to hubs, the service-side
//! [`provisioner::Provisioner`] and the device-side [`registration::Registration`] state machine,
//! enrollment management, and the store traits with an in-memory implementation.
//!
//! Nothing here reads a clock, opens a socket or a file, or owns a random source: time comes in
//! as a [`zerotouch_proto::Timestamp`] argument, and crypto and randomness through
//! [`crypto::CryptoProvider`].

pub mod allocation;
pub mod attestation;
pub mod crypto;
pub mod enrollments;
pub mod error;
pub mod hub;
pub mod hub_engine;
pub mod jobs;
pub mod memory;
pub mod provisioner;
pub mod query;
pub mod registration;
pub mod registry;
pub mod store;
pub mod twin;

pub use error::{AllocationError, AuthError, Error, StoreError};
