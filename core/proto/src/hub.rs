//! IoT Hub identity registry wire types: devices, modules, bulk and import/export bodies, errors.
//!
//! Field names and order follow what the hub emits (hub spec §2–§3); enums parse
//! case-insensitively because the SDKs disagree on casing (spec §0 trap 3).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{DeviceId, ETag, ModuleId};
use crate::time::Timestamp;

wire_enum!(
    /// `status` of a device identity: output lower-case, input any case.
    #[derive(Default)]
    DeviceStatus {
        /// The device may connect.
        #[default]
        Enabled => "enabled",
        /// The device is refused on connect.
        Disabled => "disabled",
    }
);

wire_enum!(
    /// `connectionState` of a device or module (capitalised on the wire).
    #[derive(Default)]
    ConnectionState {
        /// Connected over MQTT or AMQP.
        Connected => "Connected",
        /// Not connected (the initial state).
        #[default]
        Disconnected => "Disconnected",
    }
);

wire_enum!(
    /// `authentication.type` of an identity.
    #[derive(Default)]
    AuthenticationType {
        /// Shared access keys.
        #[default]
        Sas => "sas",
        /// X.509 certificate pinned by thumbprint.
        SelfSigned => "selfSigned",
        /// Any X.509 certificate chaining to a verified CA.
        CertificateAuthority => "certificateAuthority",
        /// No credential of its own (for example a module authenticated through its edge device).
        None => "none",
    }
);

wire_enum!(
    /// `importMode` of an [`ExportImportDevice`] (spec §3.2); case-insensitive, so the Node
    /// spellings `Update`, `UpdateIfMatchETag`, `Delete`, `DeleteIfMatchETag` parse too.
    #[derive(Default)]
    ImportMode {
        /// Create if missing, else overwrite ignoring the identity etag (the default).
        #[default]
        CreateOrUpdate => "createOrUpdate",
        /// Create; an existing identity is an error.
        Create => "create",
        /// Overwrite an existing identity ignoring its etag.
        Update => "update",
        /// Overwrite only if `eTag` matches.
        UpdateIfMatchETag => "updateIfMatchETag",
        /// Create if missing, else overwrite only if `eTag` matches.
        CreateOrUpdateIfMatchETag => "createOrUpdateIfMatchETag",
        /// Delete ignoring the etag.
        Delete => "delete",
        /// Delete only if `eTag` matches.
        DeleteIfMatchETag => "deleteIfMatchETag",
        /// Update the twin ignoring the twin etag.
        UpdateTwin => "updateTwin",
        /// Update the twin only if `twinETag` matches.
        UpdateTwinIfMatchETag => "updateTwinIfMatchETag",
    }
);

wire_enum!(
    /// `type` of a job (swagger enum; only the two `schedule*` types run on `/jobs/v2`, import
    /// and export on `/jobs/create`).
    JobType {
        /// Type not known.
        Unknown => "unknown",
        /// Export of the identity registry.
        Export => "export",
        /// Import into the identity registry.
        Import => "import",
        /// Backup.
        Backup => "backup",
        /// Read device properties.
        ReadDeviceProperties => "readDeviceProperties",
        /// Write device properties.
        WriteDeviceProperties => "writeDeviceProperties",
        /// Update device configuration.
        UpdateDeviceConfiguration => "updateDeviceConfiguration",
        /// Reboot device.
        RebootDevice => "rebootDevice",
        /// Factory reset device.
        FactoryResetDevice => "factoryResetDevice",
        /// Firmware update.
        FirmwareUpdate => "firmwareUpdate",
        /// Scheduled direct method.
        ScheduleDeviceMethod => "scheduleDeviceMethod",
        /// Scheduled twin update.
        ScheduleUpdateTwin => "scheduleUpdateTwin",
        /// Restore from backup.
        RestoreFromBackup => "restoreFromBackup",
        /// Failover data copy.
        FailoverDataCopy => "failoverDataCopy",
    }
);

wire_enum!(
    /// `status` of a job: registry import/export jobs ([`JobProperties`]) and scheduled jobs
    /// (`crate::jobs`) share the wire enum.
    JobStatus {
        /// Not known.
        Unknown => "unknown",
        /// Accepted, waiting to run (the state a new import/export job starts in).
        Enqueued => "enqueued",
        /// Running.
        Running => "running",
        /// Finished (row failures, if any, are in the error log).
        Completed => "completed",
        /// Failed as a whole; see `failureReason`.
        Failed => "failed",
        /// Cancelled by the caller.
        Cancelled => "cancelled",
        /// Scheduled.
        Scheduled => "scheduled",
        /// Queued.
        Queued => "queued",
        /// Listed by the docs as a job status.
        Pending => "pending",
    }
);

impl JobStatus {
    /// Whether the job has reached an end state (`completed`, `failed` or `cancelled`).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }
}

wire_enum!(
    /// `storageAuthenticationType` of an import/export job (Node sends `IdentityBased`).
    StorageAuthenticationType {
        /// SAS URIs carry the storage credentials.
        KeyBased => "keyBased",
        /// The hub's managed identity is used.
        IdentityBased => "identityBased",
    }
);

/// Date-times of the registry that may be "never set": on the wire `0001-01-01T00:00:00Z`
/// (older hubs omit the `Z`), in Rust `None`.
///
/// Use with `#[serde(with = "never_set_time")]` on an `Option<Timestamp>`.
pub mod never_set_time {
    use super::*;

    /// The wire form of a time that was never set.
    pub const NEVER: &str = "0001-01-01T00:00:00Z";

    /// Writes `None` as [`NEVER`].
    ///
    /// # Errors
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(value: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(t) => s.collect_str(t),
            None => s.serialize_str(NEVER),
        }
    }

    /// Reads `null`, year-1 dates and offset-less date-times (taken as UTC).
    ///
    /// # Errors
    /// When the text is not a date-time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else { return Ok(None) };
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Parses one wire value; year-1 dates (the .NET minimum) mean "never".
    ///
    /// # Errors
    /// [`crate::ProtoError::InvalidTimestamp`] when the text is not a date-time.
    pub fn parse(s: &str) -> Result<Option<Timestamp>, crate::ProtoError> {
        if s.starts_with("0001-01-01") {
            return Ok(None);
        }
        let has_offset = s.ends_with('Z')
            || s.ends_with('z')
            || s.get(s.len().saturating_sub(6)..).is_some_and(|t| t.starts_with('+') || t.starts_with('-'));
        if has_offset {
            Timestamp::parse(s).map(Some)
        } else {
            Timestamp::parse(&format!("{s}Z")).map(Some)
        }
    }
}

/// Reads `null` as the type's default: some clients send every property of their local object,
/// including nulls for ones never set.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `authentication.symmetricKey`: base64 keys. Empty strings (what Node sends) mean "generate".
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    /// Base64 primary key.
    #[serde(default)]
    pub primary_key: Option<String>,
    /// Base64 secondary key.
    #[serde(default)]
    pub secondary_key: Option<String>,
}

impl fmt::Debug for SymmetricKey {
    /// Never prints key material, only whether each key is set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |k: &Option<String>| match k {
            Some(k) if !k.is_empty() => "<redacted>",
            Some(_) => "<empty>",
            None => "<none>",
        };
        f.debug_struct("SymmetricKey")
            .field("primary_key", &shown(&self.primary_key))
            .field("secondary_key", &shown(&self.secondary_key))
            .finish()
    }
}

/// `authentication.x509Thumbprint`: hex SHA-1 or SHA-256 thumbprints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    /// Primary thumbprint.
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    /// Secondary thumbprint.
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

/// `authentication` of a device or module. Both key blocks are always written, with nulls for
/// the kinds the type does not use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationMechanism {
    /// Keys (used when `type` is `sas`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub symmetric_key: SymmetricKey,
    /// Thumbprints (used when `type` is `selfSigned`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub x509_thumbprint: X509Thumbprint,
    /// Kind of credential.
    #[serde(default, rename = "type", deserialize_with = "null_as_default")]
    pub kind: AuthenticationType,
}

/// `capabilities` of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// Whether the device is an IoT Edge device.
    #[serde(default, deserialize_with = "null_as_default")]
    pub iot_edge: bool,
}

/// A device identity (`PUT/GET /devices/{id}`), in the field order the hub emits (spec §2.1).
/// Everything except `deviceId` is optional on input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Case-sensitive device id.
    pub device_id: DeviceId,
    /// Hub-generated; distinguishes re-created identities with the same id.
    #[serde(default)]
    pub generation_id: Option<String>,
    /// Identity etag (unquoted in JSON).
    #[serde(default)]
    pub etag: Option<ETag>,
    /// Connected or disconnected.
    #[serde(default, deserialize_with = "null_as_default")]
    pub connection_state: ConnectionState,
    /// Enabled or disabled.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: DeviceStatus,
    /// Why the status was set (≤128 characters).
    #[serde(default)]
    pub status_reason: Option<String>,
    /// When `connectionState` last changed.
    #[serde(default, with = "never_set_time")]
    pub connection_state_updated_time: Option<Timestamp>,
    /// When `status` last changed.
    #[serde(default, with = "never_set_time")]
    pub status_updated_time: Option<Timestamp>,
    /// Last connect, send or receive.
    #[serde(default, with = "never_set_time")]
    pub last_activity_time: Option<Timestamp>,
    /// Queued cloud-to-device messages.
    #[serde(default, deserialize_with = "null_as_default")]
    pub cloud_to_device_message_count: i32,
    /// Credentials; absent on input means `sas` with generated keys.
    #[serde(default)]
    pub authentication: Option<AuthenticationMechanism>,
    /// Capabilities (IoT Edge).
    #[serde(default)]
    pub capabilities: Option<DeviceCapabilities>,
    /// Scope of an edge device, or the parent edge scope of a leaf device.
    #[serde(default)]
    pub device_scope: Option<String>,
    /// Parent scopes of a leaf device.
    #[serde(default, deserialize_with = "null_as_default")]
    pub parent_scopes: Vec<String>,
}

impl Device {
    /// A device body with only its id set, as a client sends it to create a device with
    /// generated keys.
    pub fn new(device_id: DeviceId) -> Self {
        Self {
            device_id,
            generation_id: None,
            etag: None,
            connection_state: ConnectionState::Disconnected,
            status: DeviceStatus::Enabled,
            status_reason: None,
            connection_state_updated_time: None,
            status_updated_time: None,
            last_activity_time: None,
            cloud_to_device_message_count: 0,
            authentication: None,
            capabilities: None,
            device_scope: None,
            parent_scopes: Vec::new(),
        }
    }
}

/// A module identity (`PUT/GET /devices/{id}/modules/{mid}`), spec §2.2. Modules have no status,
/// capabilities or scopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    /// Module id (same rules as a device id).
    pub module_id: ModuleId,
    /// Who manages the module, e.g. `IotEdge`.
    #[serde(default)]
    pub managed_by: Option<String>,
    /// The parent device.
    pub device_id: DeviceId,
    /// Hub-generated; distinguishes re-created identities with the same id.
    #[serde(default)]
    pub generation_id: Option<String>,
    /// Identity etag.
    #[serde(default)]
    pub etag: Option<ETag>,
    /// Connected or disconnected.
    #[serde(default, deserialize_with = "null_as_default")]
    pub connection_state: ConnectionState,
    /// When `connectionState` last changed.
    #[serde(default, with = "never_set_time")]
    pub connection_state_updated_time: Option<Timestamp>,
    /// Last connect, send or receive.
    #[serde(default, with = "never_set_time")]
    pub last_activity_time: Option<Timestamp>,
    /// Queued cloud-to-device messages.
    #[serde(default, deserialize_with = "null_as_default")]
    pub cloud_to_device_message_count: i32,
    /// Credentials; absent on input means `sas` with generated keys.
    #[serde(default)]
    pub authentication: Option<AuthenticationMechanism>,
}

impl Module {
    /// A module body with only its ids set.
    pub fn new(device_id: DeviceId, module_id: ModuleId) -> Self {
        Self {
            module_id,
            managed_by: None,
            device_id,
            generation_id: None,
            etag: None,
            connection_state: ConnectionState::Disconnected,
            connection_state_updated_time: None,
            last_activity_time: None,
            cloud_to_device_message_count: 0,
            authentication: None,
        }
    }
}

/// `properties` of an import/export line: twin sections as JSON objects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportImportProperties {
    /// Desired properties (may carry `$metadata` and `$version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<serde_json::Value>,
    /// Reported properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<serde_json::Value>,
}

/// One entry of a bulk `POST /devices` and one line of `devices.txt` (spec §3.1, §3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportImportDevice {
    /// Device id (`deviceId` accepted too).
    #[serde(alias = "deviceId")]
    pub id: DeviceId,
    /// Module id for module lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<ModuleId>,
    /// Identity etag, checked by the `*IfMatchETag` modes. `etag` is accepted too: Node sends
    /// the fields of a fetched `Device` as they are, and the hub matches names case-insensitively.
    #[serde(
        default,
        rename = "eTag",
        alias = "etag",
        alias = "ETag",
        skip_serializing_if = "Option::is_none"
    )]
    pub e_tag: Option<ETag>,
    /// What to do with the line (default `createOrUpdate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_mode: Option<ImportMode>,
    /// Device status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// Status reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Credentials; absent means `sas` with generated keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationMechanism>,
    /// Twin etag, checked by `updateTwinIfMatchETag` and, if given, by the create modes.
    #[serde(default, rename = "twinETag", alias = "twinEtag", skip_serializing_if = "Option::is_none")]
    pub twin_etag: Option<ETag>,
    /// Twin tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<serde_json::Value>,
    /// Twin desired and reported properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<ExportImportProperties>,
    /// Capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Device scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    /// Parent scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
    /// Module `managedBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

impl ExportImportDevice {
    /// A line for a device with every optional field absent.
    pub fn new(id: DeviceId, import_mode: Option<ImportMode>) -> Self {
        Self {
            id,
            module_id: None,
            e_tag: None,
            import_mode,
            status: None,
            status_reason: None,
            authentication: None,
            twin_etag: None,
            tags: None,
            properties: None,
            capabilities: None,
            device_scope: None,
            parent_scopes: None,
            managed_by: None,
        }
    }

    /// The import mode, defaulting to `createOrUpdate`.
    pub fn mode(&self) -> ImportMode {
        self.import_mode.unwrap_or_default()
    }

    /// Whether the line carries twin data.
    pub fn has_twin_data(&self) -> bool {
        self.tags.is_some() || self.properties.is_some()
    }
}

/// One failed entry of a bulk registry operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationError {
    /// Device id of the entry.
    pub device_id: String,
    /// Module id of the entry, if any.
    #[serde(default)]
    pub module_id: Option<String>,
    /// Error name, e.g. `DeviceAlreadyExists`.
    pub error_code: HubErrorCode,
    /// Human-readable text.
    pub error_status: String,
    /// The import mode of the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

/// One warning of a bulk registry operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationWarning {
    /// Device id of the entry.
    pub device_id: String,
    /// Warning name, e.g. `DeviceRegisteredWithoutTwin`.
    pub warning_code: String,
    /// Human-readable text.
    pub warning_status: String,
}

/// Response of `POST /devices` (HTTP 200 when every entry succeeded, else 400 with the same body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkRegistryOperationResult {
    /// Whether every entry succeeded.
    pub is_successful: bool,
    /// Failed entries.
    #[serde(default)]
    pub errors: Vec<DeviceRegistryOperationError>,
    /// Warnings.
    #[serde(default)]
    pub warnings: Vec<DeviceRegistryOperationWarning>,
}

impl BulkRegistryOperationResult {
    /// HTTP status to answer with: 200 when successful, 400 otherwise.
    pub fn http_status(&self) -> u16 {
        if self.is_successful {
            200
        } else {
            400
        }
    }
}

/// `GET /statistics/devices`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatistics {
    /// Device identities.
    pub total_device_count: u64,
    /// Enabled devices.
    pub enabled_device_count: u64,
    /// Disabled devices.
    pub disabled_device_count: u64,
}

/// `GET /statistics/service`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatistics {
    /// Devices currently connected.
    pub connected_device_count: u64,
}

/// `identity` of an import/export job that uses a managed identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedIdentity {
    /// ARM id of the user-assigned identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_assigned_identity: Option<String>,
}

/// An import/export job (`POST /jobs/create`, `GET /jobs/{id}`), spec §3.3.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobProperties {
    /// Server-generated job id (ignored on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// When the job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_utc: Option<Timestamp>,
    /// When the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time_utc: Option<Timestamp>,
    /// `import` or `export`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobType>,
    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    /// 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// Import: container holding the input blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_blob_container_uri: Option<String>,
    /// Import: input blob name (default `devices.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_blob_name: Option<String>,
    /// Export: where `devices.txt` goes; import: where `importErrors.log` goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_container_uri: Option<String>,
    /// Export: output blob name (default `devices.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_name: Option<String>,
    /// Export keys as null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_keys_in_export: Option<bool>,
    /// How storage is authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_authentication_type: Option<StorageAuthenticationType>,
    /// Managed identity for identity-based storage access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<ManagedIdentity>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Whether configurations are exported/imported too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_configurations: Option<bool>,
    /// Blob name for configurations (default `configurations.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configurations_blob_name: Option<String>,
}

/// Default name of the blob import reads and export writes.
pub const DEVICES_BLOB_NAME: &str = "devices.txt";

/// Name of the per-row error log an import writes into the output container.
pub const IMPORT_ERRORS_BLOB_NAME: &str = "importErrors.log";

/// One line of `importErrors.log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportErrorLogEntry {
    /// Numeric error code, e.g. `400012`.
    pub error_code: u32,
    /// Human-readable text.
    pub error_status: String,
    /// Device id of the row, when the row could be parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Module id of the row, for module rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
}

macro_rules! hub_error_codes {
    ($($(#[$doc:meta])* $variant:ident => ($status:literal, $code:literal)),+ $(,)?) => {
        /// IoT Hub error names with their HTTP status and numeric code (spec §1.4).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum HubErrorCode {
            $($(#[$doc])* $variant),+
        }

        impl HubErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [HubErrorCode] = &[$(HubErrorCode::$variant),+];

            /// The error name as the hub writes it (`iothub-errorcode` header, envelope A).
            pub fn name(self) -> &'static str {
                match self {
                    $(HubErrorCode::$variant => stringify!($variant)),+
                }
            }

            /// HTTP status.
            pub fn http_status(self) -> u16 {
                match self {
                    $(HubErrorCode::$variant => $status),+
                }
            }

            /// Six-digit numeric code (envelope B).
            pub fn code(self) -> u32 {
                match self {
                    $(HubErrorCode::$variant => $code),+
                }
            }
        }
    };
}

hub_error_codes! {
    /// Bad id characters, key length, body/path id mismatch and similar.
    ArgumentInvalid => (400, 400004),
    /// A required field is missing.
    ArgumentNull => (400, 400005),
    /// Malformed JSON or query.
    IotHubFormatError => (400, 400006),
    /// The same id appears twice in a bulk request or import.
    DeviceDefinedMultipleTimes => (400, 400011),
    /// A `devices.txt` line could not be parsed.
    DeserializationError => (400, 400012),
    /// A bulk operation failed.
    BulkRegistryOperationFailure => (400, 400013),
    /// Etag mismatch inside a bulk request or import.
    EtagDoesNotMatch => (400, 400023),
    /// Bad or expired SAS, or wrong policy.
    IotHubUnauthorizedAccess => (401, 401002),
    /// Daily quota exceeded or registry full.
    IotHubQuotaExceeded => (403, 403002),
    /// Too many concurrent jobs.
    JobQuotaExceeded => (403, 403003),
    /// Too many pending cloud-to-device messages.
    DeviceMaximumQueueDepthExceeded => (403, 403004),
    /// Unknown (or, for methods and C2D, disabled) device.
    DeviceNotFound => (404, 404001),
    /// Unknown job.
    JobNotFound => (404, 404002),
    /// Unknown module.
    ModuleNotFound => (404, 404010),
    /// Direct method: the device is not connected.
    DeviceNotOnline => (404, 404103),
    /// A device with this id exists.
    DeviceAlreadyExists => (409, 409001),
    /// A device job with this id exists.
    DeviceJobAlreadyExists => (409, 409103),
    /// A job with this id exists.
    JobAlreadyExists => (409, 409104),
    /// A module with this id exists on the device.
    ModuleAlreadyExistsOnDevice => (409, 409301),
    /// If-Match etag mismatch.
    PreconditionFailed => (412, 412001),
    /// Payload too large.
    MessageTooLarge => (413, 413001),
    /// Registry cap reached.
    TooManyDevices => (413, 413002),
    /// More than 50 modules on one device.
    TooManyModulesOnDevice => (413, 413003),
    /// Rate limit.
    ThrottlingException => (429, 429001),
    /// Traffic-shaping backlog overflow.
    ThrottleBacklogLimitExceeded => (429, 429002),
    /// Traffic-shaping backlog timeout.
    ThrottlingBacklogTimeout => (429, 429003),
    /// Too many active jobs.
    ThrottlingMaxActiveJobCountExceeded => (429, 429004),
    /// Internal failure.
    ServerError => (500, 500001),
    /// Service unavailable.
    ServiceUnavailable => (503, 503001),
    /// Direct method response timeout.
    GatewayTimeout => (504, 504101),
}

impl HubErrorCode {
    /// Looks a code up by name (ASCII case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// Looks a code up by its six-digit number.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.code() == code)
    }
}

impl fmt::Display for HubErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for HubErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for HubErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown IoT Hub error name {s:?}")))
    }
}

/// Error envelope A, the registry default:
/// `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"..."}`. Node reads the name from
/// `Message.split(';')[0].split(':')[1]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// `ErrorCode:<Name>;<text>`.
    #[serde(rename = "Message")]
    pub message: String,
    /// Tracking information.
    #[serde(rename = "ExceptionMessage", default)]
    pub exception_message: String,
}

impl ErrorEnvelope {
    /// Builds the envelope for `code` with a human-readable `text` and a tracking line.
    pub fn new(code: HubErrorCode, text: &str, exception_message: impl Into<String>) -> Self {
        Self {
            message: format!("ErrorCode:{};{text}", code.name()),
            exception_message: exception_message.into(),
        }
    }

    /// The error name carried in `Message`, parsed the way the Node SDK does.
    pub fn error_name(&self) -> Option<&str> {
        let head = self.message.split(';').next()?;
        head.split(':').nth(1)
    }

    /// The known error code carried in `Message`.
    pub fn code(&self) -> Option<HubErrorCode> {
        self.error_name().and_then(HubErrorCode::from_name)
    }
}

/// Error envelope B, numeric:
/// `{"errorCode":404103,"trackingId":"...","message":"...","info":{...},"timestampUtc":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumericErrorEnvelope {
    /// Six-digit code.
    pub error_code: u32,
    /// Tracking id.
    #[serde(default)]
    pub tracking_id: String,
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
    /// Extra details (an object, possibly empty).
    #[serde(default)]
    pub info: serde_json::Value,
    /// When the error happened.
    pub timestamp_utc: Timestamp,
}

impl NumericErrorEnvelope {
    /// Builds the envelope for `code` with empty `info`.
    pub fn new(
        code: HubErrorCode,
        message: impl Into<String>,
        tracking_id: impl Into<String>,
        now: Timestamp,
    ) -> Self {
        Self {
            error_code: code.code(),
            tracking_id: tracking_id.into(),
            message: message.into(),
            info: serde_json::Value::Object(serde_json::Map::new()),
            timestamp_utc: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_device_response_parses_and_keeps_wire_order() {
        let text = r#"{"deviceId":"MbedDeviceTest","generationId":"637394137160664574","etag":"MTU4MjY3MDc5","connectionState":"Disconnected","status":"enabled","statusReason":null,"connectionStateUpdatedTime":"0001-01-01T00:00:00","statusUpdatedTime":"0001-01-01T00:00:00","lastActivityTime":"0001-01-01T00:00:00","cloudToDeviceMessageCount":0,"authentication":{"symmetricKey":{"primaryKey":"AAECAwQFBgcICQoLDA0ODw==","secondaryKey":"AAECAwQFBgcICQoLDA0ODw=="},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"capabilities":{"iotEdge":false},"deviceScope":null,"parentScopes":[]}"#;
        let d: Device = serde_json::from_str(text).unwrap();
        assert_eq!(d.device_id.as_str(), "MbedDeviceTest");
        assert_eq!(d.status_updated_time, None);
        let out = serde_json::to_string(&d).unwrap();
        assert_eq!(out, text.replace("0001-01-01T00:00:00\"", "0001-01-01T00:00:00Z\""));
    }

    #[test]
    fn node_sdk_create_body_with_empty_keys_parses() {
        let d: Device = serde_json::from_str(
            r#"{"deviceId":"n1","status":"Enabled","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}"#,
        )
        .unwrap();
        let auth = d.authentication.unwrap();
        assert_eq!(auth.symmetric_key.primary_key.as_deref(), Some(""));
        assert_eq!(auth.kind, AuthenticationType::Sas);
        assert_eq!(d.status, DeviceStatus::Enabled);
        assert!(!format!("{auth:?}").contains("primaryKey\":"));
    }

    #[test]
    fn client_bodies_with_nulls_and_lowercase_states_parse() {
        let d: Device = serde_json::from_str(
            r#"{"deviceId":"n2","generationId":null,"etag":null,"connectionState":"disconnected","status":null,"connectionStateUpdatedTime":null,"cloudToDeviceMessageCount":null,"authentication":{"type":null,"symmetricKey":null,"x509Thumbprint":null},"capabilities":{"iotEdge":null},"parentScopes":null}"#,
        )
        .unwrap();
        assert_eq!(d.status, DeviceStatus::Enabled);
        assert_eq!(d.connection_state, ConnectionState::Disconnected);
        assert_eq!(d.authentication.unwrap().kind, AuthenticationType::Sas);
        assert!(d.parent_scopes.is_empty());
    }

    #[test]
    fn never_set_times_parse_in_every_observed_form() {
        for never in ["0001-01-01T00:00:00", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00.0000000Z"] {
            assert_eq!(never_set_time::parse(never).unwrap(), None);
        }
        let t = Timestamp::parse("2019-06-10T10:50:14Z").unwrap();
        assert_eq!(never_set_time::parse("2019-06-10T10:50:14").unwrap(), Some(t));
        assert_eq!(never_set_time::parse("2019-06-10T12:50:14+02:00").unwrap(), Some(t));
        assert!(never_set_time::parse("yesterday").is_err());
    }

    #[test]
    fn module_response_round_trips() {
        let text = r#"{"moduleId":"Testing","managedBy":null,"deviceId":"mydevice","generationId":"636904759703045768","etag":"ODM2NjI3ODg=","connectionState":"Disconnected","connectionStateUpdatedTime":"0001-01-01T00:00:00Z","lastActivityTime":"0001-01-01T00:00:00Z","cloudToDeviceMessageCount":0,"authentication":{"symmetricKey":{"primaryKey":null,"secondaryKey":null},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"none"}}"#;
        let m: Module = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), text);
    }

    #[test]
    fn import_modes_parse_in_node_spellings() {
        for (s, m) in [
            ("create", ImportMode::Create),
            ("Update", ImportMode::Update),
            ("UpdateIfMatchETag", ImportMode::UpdateIfMatchETag),
            ("Delete", ImportMode::Delete),
            ("DeleteIfMatchETag", ImportMode::DeleteIfMatchETag),
            ("UPDATETWIN", ImportMode::UpdateTwin),
            ("updatetwinifmatchetag", ImportMode::UpdateTwinIfMatchETag),
        ] {
            assert_eq!(s.parse::<ImportMode>().unwrap(), m);
        }
        let line: ExportImportDevice =
            serde_json::from_str(r#"{"deviceId":"d","importMode":"Update","eTag":"MA=="}"#).unwrap();
        assert_eq!(line.mode(), ImportMode::Update);
        assert_eq!(ExportImportDevice::new(line.id.clone(), None).mode(), ImportMode::CreateOrUpdate);
        // Node bulk updates send a fetched Device with `deviceId` renamed to `id`.
        let node: ExportImportDevice = serde_json::from_str(
            r#"{"id":"d","generationId":"1","etag":"MQ==","connectionState":"Disconnected","status":"enabled","importMode":"UpdateIfMatchETag"}"#,
        )
        .unwrap();
        assert_eq!(node.e_tag.as_ref().map(ETag::as_str), Some("MQ=="));
    }

    #[test]
    fn export_line_matches_documented_example() {
        let text = r#"{"id":"Device1","eTag":"MA==","status":"enabled","authentication":{"symmetricKey":{"primaryKey":"abc=","secondaryKey":"def="},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"}}"#;
        let line: ExportImportDevice = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&line).unwrap(), text);
    }

    #[test]
    fn error_envelopes_carry_name_and_number() {
        let a = ErrorEnvelope::new(
            HubErrorCode::DeviceAlreadyExists,
            "A device with ID 'device004' is already registered.",
            "",
        );
        assert_eq!(
            a.message,
            "ErrorCode:DeviceAlreadyExists;A device with ID 'device004' is already registered."
        );
        assert_eq!(a.code(), Some(HubErrorCode::DeviceAlreadyExists));
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("Message").is_some() && json.get("ExceptionMessage").is_some());
        let b = NumericErrorEnvelope::new(HubErrorCode::DeviceNotOnline, "x", "t", Timestamp::EPOCH);
        assert_eq!(serde_json::to_value(&b).unwrap()["errorCode"], 404103);
        assert_eq!(HubErrorCode::from_code(412001), Some(HubErrorCode::PreconditionFailed));
        assert_eq!(HubErrorCode::ModuleAlreadyExistsOnDevice.http_status(), 409);
        let e: DeviceRegistryOperationError = serde_json::from_str(
            r#"{"deviceId":"d1","moduleId":null,"errorCode":"DeviceAlreadyExists","errorStatus":"t","operation":"create"}"#,
        )
        .unwrap();
        assert_eq!(e.error_code, HubErrorCode::DeviceAlreadyExists);
    }

    #[test]
    fn job_properties_accept_node_identity_based_storage() {
        let j: JobProperties = serde_json::from_str(
            r#"{"type":"export","outputBlobContainerUri":"https://x/c?sig","excludeKeysInExport":true,"storageAuthenticationType":"IdentityBased"}"#,
        )
        .unwrap();
        assert_eq!(j.kind, Some(JobType::Export));
        assert_eq!(j.storage_authentication_type, Some(StorageAuthenticationType::IdentityBased));
        assert_eq!(j.exclude_keys_in_export, Some(true));
    }
}
