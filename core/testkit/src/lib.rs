//! testkit

pub mod certs;
