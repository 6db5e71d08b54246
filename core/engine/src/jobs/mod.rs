//! Direct methods, scheduled jobs and device-management patterns (hub spec §6.6, §7, §8, §11).
//!
//! - [`methods`]: validation of invocations and the sans-I/O pending-call table
//!   [`methods::MethodCalls`] with its connect and response deadlines (404103 / 504101).
//! - [`planner`]: the [`planner::JobPlanner`] that runs `scheduleUpdateTwin` and
//!   `scheduleDeviceMethod` jobs as time passes and keeps `devices.jobs` records.
//! - [`store`]: the [`store::JobStore`] trait and its in-memory implementation.
//! - [`dm`]: typed helpers for reboot, factory reset, configuration and firmware update.

use zerotouch_proto::jobs::HubErrorCode;

use crate::error::Error;

pub mod dm;
pub mod methods;
pub mod planner;
pub mod store;

pub use methods::{CallId, MethodCalls, MethodCompletion, MethodDelivery, MethodFailure, MethodInvocation};
pub use planner::{DeviceOutcome, DeviceSelector, JobAction, JobLimits, JobPlanner, TwinPatcher};
pub use store::{DeviceJobFilter, JobFilter, JobRecord, JobStore, MemoryJobStore};

/// An engine error carrying a hub error code; [`Error::to_wire`] derives the HTTP status from the
/// code, and [`HubErrorCode::from_code`] recovers the name for `ErrorCode:<Name>`.
pub fn hub_error(code: HubErrorCode, message: impl Into<String>) -> Error {
    Error::Hub { code: code.code(), message: message.into() }
}
