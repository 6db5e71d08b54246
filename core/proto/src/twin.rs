//! Twin JSON of the IoT Hub service REST API and the device-MQTT twin bodies (hub spec §5, §6.3–6.5).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ProtoError;
use crate::ids::{DeviceId, ETag, IfMatch, ModuleId};
use crate::service::DeviceCapabilities;

/// The value the hub writes for a time that never happened (`statusUpdateTime`,
/// `lastActivityTime` of a device that never connected): .NET `DateTime.MinValue`, which is
/// [`crate::Timestamp::MIN`]. The twin's identity times are carried as the strings the hub
/// writes (see [`Twin`]).
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// Identity fields a twin repeats use the registry's enums (one definition, in [`crate::hub`]).
pub use crate::hub::{AuthenticationType, ConnectionState, DeviceStatus};

wire_enum! {
    /// `opType` application property of a twin change notification (spec §4).
    TwinChangeOperation {
        /// A merge patch (service PATCH or device reported patch).
        UpdateTwin => "updateTwin",
        /// A replacement of tags and desired properties (service PUT).
        ReplaceTwin => "replaceTwin",
    }
}

/// `x509Thumbprint` of a twin; both members are written as `null` when unset, as the hub does.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    /// Thumbprint of the primary certificate.
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    /// Thumbprint of the secondary certificate.
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

/// One twin section (`properties.desired` or `properties.reported`): the properties themselves,
/// followed by `$metadata` and `$version` when present.
///
/// The same shape carries the device-MQTT views, where `$metadata` is absent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TwinCollection {
    /// The properties (every key that is not `$metadata` or `$version`).
    #[serde(flatten)]
    pub properties: Map<String, Value>,
    /// `$metadata`: `$lastUpdated` (and for desired `$lastUpdatedVersion`) of every object and
    /// leaf, mirroring [`TwinCollection::properties`].
    #[serde(rename = "$metadata", default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// `$version` of the section.
    #[serde(rename = "$version", default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// `properties` of a twin: `{"desired": {...}, "reported": {...}}`.
///
/// Without `$metadata` this is also the body of the device-MQTT twin GET response
/// `$iothub/twin/res/200/?$rid=..` (spec §6.3): `{"desired":{...,"$version":n},"reported":{...,"$version":m}}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TwinProperties {
    /// Desired properties, written by the back end.
    #[serde(default)]
    pub desired: TwinCollection,
    /// Reported properties, written by the device.
    #[serde(default)]
    pub reported: TwinCollection,
}

/// A device or module twin as the service REST API returns it (`GET /twins/{id}`,
/// `GET /twins/{id}/modules/{mid}`, spec §5.1).
///
/// The identity fields (`deviceEtag`, `status`, `connectionState`, ...) are read-only copies of
/// the identity. The twin writes `statusUpdateTime`; the identity JSON writes
/// `statusUpdatedTime` (spec §0 trap 11). Times are kept as the exact strings the hub writes,
/// because the hub uses [`NEVER`] for "never".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// Device id (the Node SDK refuses a twin without it).
    pub device_id: DeviceId,
    /// Module id, present on module twins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<ModuleId>,
    /// Twin etag: base64 of a big-endian 64-bit counter, distinct from the identity etag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<ETag>,
    /// Etag of the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_etag: Option<ETag>,
    /// Identity status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// Why the status was set, present when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// When the status last changed (note: not `statusUpdatedTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_update_time: Option<String>,
    /// Connection state of the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// Last time the identity was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// Pending cloud-to-device messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    /// How the identity authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication_type: Option<AuthenticationType>,
    /// Certificate thumbprints of the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// IoT Plug and Play model id (`""` when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Twin version: advances on every write, including reported patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Tags (omitted when empty, as on a fresh twin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// Desired and reported properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    /// Device capabilities (device twins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Scope of the device (edge hierarchies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    /// Scopes of the parent edge devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
}

/// The body of a service `PATCH` or `PUT` of a twin (spec §5.3), and the twin of an import line
/// or an `updateTwin` job.
///
/// Only `tags` and `properties.desired` are applied; every read-only field the SDKs may echo
/// back (`deviceId`, `version`, `status`, ...) is ignored. `etag` is kept because jobs and imports
/// carry their precondition there. `$metadata` and `$version` inside `desired` are ignored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinPatch {
    /// Etag the sender expects (jobs and imports; REST uses the `If-Match` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<ETag>,
    /// Tags to merge (PATCH) or the new tags (PUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// Properties; only `desired` is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinPatchProperties>,
}

impl TwinPatch {
    /// The precondition the body's `etag` expresses (jobs and `updateTwinIfMatchETag` imports):
    /// none, `*` (quoted or not) or a specific etag.
    pub fn if_match(&self) -> IfMatch {
        IfMatch::from_header(self.etag.as_ref().map(ETag::as_str))
    }

    /// The desired properties of the patch, if it has any.
    pub fn desired(&self) -> Option<&Map<String, Value>> {
        self.properties.as_ref().and_then(|p| p.desired.as_ref()).map(|c| &c.properties)
    }
}

/// `properties` of a [`TwinPatch`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TwinPatchProperties {
    /// Desired properties to merge or set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinCollection>,
    /// Reported properties: never written from the service side (spec §5.3 choice), kept only so
    /// a round-trip of an SDK body loses nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinCollection>,
}

/// Body of a desired-properties push to a device or module,
/// `$iothub/twin/PATCH/properties/desired/?$version={v}` (spec §6.5): the update as applied
/// (with `null` for removed keys, or the whole desired document after a replace) plus
/// `"$version"`, which the Python device SDK requires (spec §0 trap 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredPropertiesPatch {
    /// The changed desired properties.
    #[serde(flatten)]
    pub patch: Map<String, Value>,
    /// Desired `$version` after the change.
    #[serde(rename = "$version")]
    pub version: u64,
}

impl DesiredPropertiesPatch {
    /// The topic the hub publishes this patch on.
    pub fn topic(&self) -> String {
        format!("$iothub/twin/PATCH/properties/desired/?$version={}", self.version)
    }
}

/// Parses a twin patch body that must be a JSON object, such as the payload of a device
/// reported patch (`$iothub/twin/PATCH/properties/reported/?$rid=..`, spec §6.4).
///
/// # Errors
/// [`ProtoError::InvalidBody`] when the body is not JSON or not an object.
pub fn parse_patch_body(body: &[u8]) -> Result<Map<String, Value>, ProtoError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ProtoError::InvalidBody(format!(
            "a twin patch must be a JSON object, got {}",
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            }
        ))),
        Err(e) => Err(ProtoError::InvalidBody(format!("a twin patch must be JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const REST_TWIN: &str = r#"{"deviceId":"devA","etag":"AAAAAAAAAAE=","deviceEtag":"NTgwMDg5MDAz","status":"enabled","statusUpdateTime":"0001-01-01T00:00:00Z","connectionState":"Disconnected","lastActivityTime":"0001-01-01T00:00:00Z","cloudToDeviceMessageCount":0,"authenticationType":"sas","x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"modelId":"","version":2,"tags":{"location":{"region":"US"}},"properties":{"desired":{"telemetryConfig":{"sendFrequency":"5m"},"$metadata":{"$lastUpdated":"2016-03-30T16:24:48.789Z","$lastUpdatedVersion":2,"telemetryConfig":{"$lastUpdated":"2016-03-30T16:24:48.789Z","$lastUpdatedVersion":2,"sendFrequency":{"$lastUpdated":"2016-03-30T16:24:48.789Z","$lastUpdatedVersion":2}}},"$version":2},"reported":{"batteryLevel":55,"$metadata":{"$lastUpdated":"2016-04-01T16:24:48.789Z","batteryLevel":{"$lastUpdated":"2016-04-01T16:35:48.789Z"}},"$version":4}},"capabilities":{"iotEdge":false},"deviceScope":"scope","parentScopes":[]}"#;

    #[test]
    fn rest_twin_round_trips_byte_for_byte() {
        let twin: Twin = serde_json::from_str(REST_TWIN).unwrap();
        assert_eq!(twin.status_update_time.as_deref(), Some(NEVER));
        let props = twin.properties.as_ref().unwrap();
        assert_eq!(props.desired.version, Some(2));
        assert_eq!(props.reported.properties["batteryLevel"], 55);
        assert_eq!(serde_json::to_string(&twin).unwrap(), REST_TWIN);
    }

    #[test]
    fn python_patch_body_ignores_read_only_fields() {
        let body = r#"{"deviceId":"d","version":9,"properties":{"desired":{"a":1,"$version":3,"$metadata":{}}},"tags":{"t":null}}"#;
        let patch: TwinPatch = serde_json::from_str(body).unwrap();
        assert_eq!(patch.desired().unwrap().len(), 1);
        assert_eq!(patch.if_match(), IfMatch::Absent);
        let job: TwinPatch = serde_json::from_str(r#"{"etag":"*","tags":{}}"#).unwrap();
        assert_eq!(job.if_match(), IfMatch::Any);
        assert_eq!(patch.tags.unwrap()["t"], Value::Null);
    }

    #[test]
    fn desired_push_carries_version() {
        let mut patch = Map::new();
        patch.insert("telemetryDelay".into(), 2.into());
        let push = DesiredPropertiesPatch { patch, version: 2 };
        assert_eq!(serde_json::to_string(&push).unwrap(), r#"{"telemetryDelay":2,"$version":2}"#);
        assert_eq!(push.topic(), "$iothub/twin/PATCH/properties/desired/?$version=2");
        assert!(serde_json::from_str::<DesiredPropertiesPatch>(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn reported_patch_body_must_be_an_object() {
        assert_eq!(parse_patch_body(br#"{"a":null}"#).unwrap()["a"], Value::Null);
        assert!(parse_patch_body(b"[1]").unwrap_err().to_string().contains("an array"));
        assert!(parse_patch_body(b" ").is_err());
    }

    #[test]
    fn mqtt_get_body_has_both_sections() {
        let body = r#"{"desired":{"a":1,"$version":12},"reported":{"$version":123}}"#;
        let state: TwinProperties = serde_json::from_str(body).unwrap();
        assert_eq!(state.desired.version, Some(12));
        assert_eq!(state.reported.version, Some(123));
        assert_eq!(serde_json::to_string(&state).unwrap(), body);
    }
}
