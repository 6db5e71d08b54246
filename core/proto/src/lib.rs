//! Wire vocabulary of the Azure IoT Hub Device Provisioning Service and IoT Hub.
//!
//! Validated identifiers, SAS tokens, timestamps, MQTT topic and HTTP route grammar, and every JSON
//! body of the DPS device and service APIs, field-exact with what the official SDKs send. Parsing
//! only: the behaviour lives in `zerotouch-engine`.

#[macro_use]
mod macros;

pub mod device;
pub mod error;
pub mod http;
pub mod hub;
pub mod ids;
pub mod jobs;
pub mod mqtt;
pub mod sas;
pub mod service;
pub mod text;
pub mod time;
pub mod twin;

pub use error::{ProtoError, WireError};
pub use ids::{DeviceId, ETag, EnrollmentGroupId, IdScope, IfMatch, ModuleId, OperationId, RegistrationId};
pub use sas::SasToken;
pub use text::Text;
pub use time::Timestamp;
