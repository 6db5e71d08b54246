//! JSON bodies of the DPS device (runtime) API: registration request, operation status,
//! registration result, error details and the TPM challenge (spec §1.3–§1.6, §6.1).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::text::Text;
use crate::time::Timestamp;

/// Serde helper for members where an explicit `null` differs from an absent member: absent
/// deserializes to `None`, `null` to `Some` of the null (`Value::Null`, or the raw text `null`);
/// the Python SDK always sends `"payload": null`.
pub mod nullable {
    use serde::{Deserialize, Deserializer};

    /// Deserializes a present member (including `null`) as `Some`.
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }
}

/// `DeviceRegistration`: the body of a register request (and of the status lookup).
///
/// The service decodes it before the device is authenticated, so it holds nothing whose size
/// is a multiple of the body's: the payload stays JSON text (syntax-checked, no tree built)
/// until [`parse_payload`](DeviceRegistration::parse_payload), and the other members are
/// strings. Two bodies are equal when their members are, payloads compared as text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// Custom payload for the allocation webhook, as the JSON text the device sent (`null`
    /// included: `Some` of the text `null`, whereas `None` is a body without the member).
    /// [`raw_payload`] makes one from a [`Value`].
    #[serde(default, deserialize_with = "nullable::deserialize", skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// Registration id; must equal the id in the path / username.
    pub registration_id: String,
    /// TPM endorsement and storage root keys (TPM attestation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestationRequest>,
    /// Base64 DER PKCS#10 certificate signing request (api-version 2025-07-01-preview and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

impl DeviceRegistration {
    /// The payload as a JSON tree: `None` when the body had no `payload` member, `Some(Null)`
    /// for `"payload": null`.
    ///
    /// A tree takes tens of times the memory of its text (a `[[[[…` or `{"a":0,"b":0,…}` of
    /// the maximal body size, tens of times that size): call it only for an authenticated
    /// device.
    ///
    /// # Errors
    /// For the well-formed text serde_json makes no tree of, which the body's decoder let
    /// through: nested deeper than 128 levels, a number beyond `f64` (`1e400`), a `\u` escape
    /// of a lone surrogate.
    pub fn parse_payload(&self) -> Result<Option<Value>, serde_json::Error> {
        self.payload.as_deref().map(|raw| serde_json::from_str(raw.get())).transpose()
    }
}

impl PartialEq for DeviceRegistration {
    fn eq(&self, other: &Self) -> bool {
        self.payload.as_deref().map(RawValue::get) == other.payload.as_deref().map(RawValue::get)
            && self.registration_id == other.registration_id
            && self.tpm == other.tpm
            && self.csr == other.csr
    }
}

/// The JSON text of `value`, for [`DeviceRegistration::payload`].
pub fn raw_payload(value: &Value) -> Box<RawValue> {
    // A `Value` always serializes (its map keys are strings, its numbers finite): the fallback
    // is never taken.
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// `TpmAttestation` as a device sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestationRequest {
    /// Base64 of the marshaled `TPM2B_PUBLIC` of the endorsement key.
    pub endorsement_key: String,
    /// Base64 of the marshaled `TPM2B_PUBLIC` of the storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

wire_enum! {
    /// `status` of an operation or registration. Only `assigning`, `assigned` and `failed` are
    /// safe to send to devices (spec §0 trap 3).
    RegistrationStatus {
        /// Not yet assigned.
        Unassigned => "unassigned",
        /// Assignment in progress.
        Assigning => "assigning",
        /// Assigned to a hub.
        Assigned => "assigned",
        /// Assignment failed; see `errorCode` / `errorMessage`.
        Failed => "failed",
        /// The enrollment or registration is disabled.
        Disabled => "disabled",
    }
}

wire_enum! {
    /// `substatus` of an assigned registration.
    Substatus {
        /// First assignment of this device.
        InitialAssignment => "initialAssignment",
        /// Moved to another hub with its twin data migrated.
        DeviceDataMigrated => "deviceDataMigrated",
        /// Re-provisioned and reset to the enrollment's initial configuration.
        DeviceDataReset => "deviceDataReset",
        /// Moved back to the hub of its first assignment.
        ReprovisionedToInitialAssignment => "reprovisionedToInitialAssignment",
    }
}

/// `RegistrationOperationStatus`: the reply to register and to operation-status polls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// Operation id, `<n>.<16 hex>.<uuid>`.
    pub operation_id: Text,
    /// Operation status.
    pub status: RegistrationStatus,
    /// Registration state (present on polls; Rust iot-identity-service requires
    /// `registrationId` in it while `assigning`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult>,
}

/// `DeviceRegistrationResult` (= `registrationState`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    /// TPM result: the activation blob carrying the hub key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Box<TpmRegistrationResult>>,
    /// X.509 result (observed `{}` for individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Box<X509RegistrationResult>>,
    /// Symmetric-key result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    /// Registration id.
    pub registration_id: Text,
    /// When the registration record was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<Timestamp>,
    /// Host name of the assigned hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<Text>,
    /// Device id in the assigned hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<Text>,
    /// Registration status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RegistrationStatus>,
    /// Substatus when assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    /// Six-digit error code when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When the registration record last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<Timestamp>,
    /// Etag of the registration record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<Text>,
    /// Payload returned by custom allocation.
    #[serde(default, deserialize_with = "nullable::deserialize", skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Issued client certificate chain (base64 DER, leaf first), api-version 2025-07-01-preview+.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

/// `TpmRegistrationResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationResult {
    /// Base64 activation blob carrying the IoT Hub device key.
    pub authentication_key: String,
}

/// `X509RegistrationResult`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    /// The device certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<crate::service::X509CertificateInfo>,
    /// The group the device registered through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<Text>,
    /// The group's signing certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<crate::service::X509CertificateInfo>,
}

/// `SymmetricKeyRegistrationResult`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    /// The group the device registered through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<Text>,
}

/// `ProvisioningServiceErrorDetails`: the body of every 4xx/5xx reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetails {
    /// Six-digit error code (HTTP status × 1000 + suffix).
    pub error_code: u32,
    /// Tracking id (a GUID). Defaults to empty so our client still reads bodies that omit it.
    #[serde(default)]
    pub tracking_id: String,
    /// Message.
    pub message: String,
    /// When the error happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_utc: Option<Timestamp>,
    /// Optional string dictionary; real DPS sends `null`.
    #[serde(default, deserialize_with = "nullable::deserialize", skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

/// The 401 body that carries a TPM challenge (spec §6.1 step 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmChallenge {
    /// `Authorization required, resend request using supplied key`.
    pub message: String,
    /// Base64 activation blob carrying the nonce key.
    pub authentication_key: String,
    /// Always `null` on real DPS.
    #[serde(default)]
    pub unencrypted_authentication_key: Option<String>,
    /// Always `registration`.
    pub key_name: String,
}
