//! testkit

pub mod conformance;
