//! Test support for zerotouch: a simulator that drives the device-side `Registration` against the
//! service-side `Provisioner` on a virtual clock, a multi-hub registry double that really applies
//! hub actions, test certificate chains, SAS / derived-key vectors with published inputs and
//! outputs, and the store conformance suites (provisioning and hub stores) every store backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod conformance;
pub mod crypto;
pub mod enroll;
pub mod hub_conformance;
pub mod hubs;
pub mod sim;
pub mod unit_conformance;
pub mod vectors;
