//! Wire types of IoT Hub direct methods, scheduled jobs (`/jobs/v2`) and device job records.
//!
//! Field names follow the service swagger (api-version 2021-04-12) and the captured payloads of
//! hub spec §7, §8 and §6.6. Validation of values (timeouts, payload size, method names) lives in
//! the engine; these types only parse and print.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ProtoError;
use crate::time::Timestamp;

pub use crate::hub::{JobStatus, JobType};

/// Body of `POST /twins/{id}/methods` and the `cloudToDeviceMethod` of a job (spec §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMethod {
    /// Method name, matched exactly as sent.
    #[serde(default)]
    pub method_name: String,
    /// Invocation payload: any JSON value (Node sends `null`, Python `""` when none is given).
    #[serde(default)]
    pub payload: Value,
    /// Seconds to wait for the device's answer (default 30, allowed 5–300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_in_seconds: Option<i64>,
    /// Seconds to wait for the device to come online (default 0, allowed 0–300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_in_seconds: Option<i64>,
}

/// Body of a successful direct-method call: the device's status and payload. The HTTP status is
/// 200 even when the device answered 4xx/5xx.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudToDeviceMethodResult {
    /// Status the device answered with.
    pub status: i32,
    /// Payload the device answered with (`null` when it sent none).
    #[serde(default)]
    pub payload: Value,
}

/// The numeric error envelope ("envelope B" of spec §1.4). For direct methods it travels
/// stringified inside the `Message` of the registry envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumericErrorBody {
    /// Six-digit code, for example `404103`.
    pub error_code: u32,
    /// Opaque tracking id.
    pub tracking_id: String,
    /// Human-readable message.
    pub message: String,
    /// Extra facts, for example `{"timeout":"00:00:00"}`.
    #[serde(default)]
    pub info: Map<String, Value>,
    /// When the failure happened.
    pub timestamp_utc: Timestamp,
}

impl NumericErrorBody {
    /// The body a direct-method failure is sent with over REST: this envelope stringified into
    /// the `Message` of the registry envelope,
    /// `{"Message":"{\"errorCode\":404103,...}","ExceptionMessage":""}`.
    pub fn wrapped_for_rest(&self) -> Value {
        let inner = serde_json::to_string(self).unwrap_or_default();
        let mut outer = Map::new();
        outer.insert("Message".to_owned(), Value::String(inner));
        outer.insert("ExceptionMessage".to_owned(), Value::String(String::new()));
        Value::Object(outer)
    }
}

/// IoT Hub error codes of direct methods and jobs: the registry's list (one definition, in
/// [`crate::hub`]).
pub use crate::hub::HubErrorCode;

/// Maximum length of a job id (our choice: the same bound as device ids).
pub const MAX_JOB_ID_LEN: usize = 128;

/// A scheduled-job id: 1–128 printable ASCII characters without `/` (it is a path segment);
/// case-sensitive.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// Parses and validates a job id.
    ///
    /// # Errors
    /// [`ProtoError::InvalidId`] when the id is empty, too long or has a forbidden character.
    pub fn new(value: impl Into<String>) -> Result<Self, ProtoError> {
        let value = value.into();
        if value.is_empty() || value.len() > MAX_JOB_ID_LEN {
            return Err(ProtoError::InvalidId {
                kind: "job id",
                reason: format!("must be 1 to {MAX_JOB_ID_LEN} characters, got {}", value.len()),
            });
        }
        if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
            return Err(ProtoError::InvalidId {
                kind: "job id",
                reason: format!("character {c:?} is not allowed (printable ASCII other than '/')"),
            });
        }
        Ok(Self(value))
    }

    /// The id exactly as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({:?})", self.0)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

wire_enum! {
    /// `status` of one device job in `devices.jobs` (note `canceled` with one "l", as observed).
    DeviceJobStatus {
        /// Waiting to be dispatched.
        Pending => "pending",
        /// Waiting for the job's start time.
        Scheduled => "scheduled",
        /// Dispatched, waiting for the outcome.
        Running => "running",
        /// The twin was updated, or the device answered the method.
        Completed => "completed",
        /// The operation failed or ran out of time.
        Failed => "failed",
        /// The job was cancelled before this device finished.
        Canceled => "canceled",
    }
}

impl DeviceJobStatus {
    /// Whether the device job will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, DeviceJobStatus::Completed | DeviceJobStatus::Failed | DeviceJobStatus::Canceled)
    }
}

/// The `properties` of a twin update carried by a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinUpdateProperties {
    /// Desired properties to merge (`null` deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    /// Anything else the client sent (for example `reported`, which the hub does not apply).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `updateTwin` of a `scheduleUpdateTwin` job: a partial twin (tags and desired properties).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinUpdate {
    /// Device id, when the client sent one (ignored: the job's condition picks devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Twin etag to match (`*` typical; absent means `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Tags to merge (`null` deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// Desired properties to merge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinUpdateProperties>,
    /// Any other twin field the client sent.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Body of `PUT /jobs/v2/{jobId}` (spec §8.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    /// Job id (the path segment is authoritative; a differing body id is rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `scheduleDeviceMethod` or `scheduleUpdateTwin`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub job_type: Option<JobType>,
    /// The method to invoke (method jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    /// The twin patch to apply (twin jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<TwinUpdate>,
    /// WHERE clause selecting devices, or `*` for every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    /// When to start; `null` or absent means now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// Execution budget from the start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<i64>,
}

/// `deviceJobStatistics` of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobStatistics {
    /// Devices the job selected.
    #[serde(default)]
    pub device_count: u64,
    /// Device jobs that failed.
    #[serde(default)]
    pub failed_count: u64,
    /// Device jobs that completed.
    #[serde(default)]
    pub succeeded_count: u64,
    /// Device jobs dispatched and not finished.
    #[serde(default)]
    pub running_count: u64,
    /// Device jobs not dispatched yet.
    #[serde(default)]
    pub pending_count: u64,
}

/// A job as `GET /jobs/v2/{id}`, the create and cancel calls and the job query return it
/// (spec §8.2). Absent fields are omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResponse {
    /// Job id.
    pub job_id: JobId,
    /// WHERE clause selecting devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    /// When the job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<Timestamp>,
    /// When the job starts (or started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// When the job reached a terminal status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Timestamp>,
    /// Execution budget from the start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<i64>,
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The method invoked (method jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    /// The twin patch applied (twin jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<TwinUpdate>,
    /// Job status.
    pub status: JobStatus,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Free-text status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// Per-device counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_job_statistics: Option<DeviceJobStatistics>,
}

/// Error recorded on a failed device job (the shape is our choice, spec §8.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceJobError {
    /// Error name, for example `DeviceNotOnline`.
    pub code: String,
    /// Human-readable description.
    pub description: String,
}

/// `outcome` of a device job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobOutcome {
    /// The device's answer for method jobs; `null` otherwise.
    #[serde(default)]
    pub device_method_response: Option<CloudToDeviceMethodResult>,
}

/// One row of `devices.jobs` (spec §8.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJob {
    /// Device id.
    pub device_id: String,
    /// Job id.
    pub job_id: JobId,
    /// Job type.
    pub job_type: JobType,
    /// Device job status.
    pub status: DeviceJobStatus,
    /// Start of the job's execution window.
    pub start_time_utc: Timestamp,
    /// End of the job's execution window (start + `maxExecutionTimeInSeconds`).
    pub end_time_utc: Timestamp,
    /// When this device job was created.
    pub created_date_time_utc: Timestamp,
    /// When this device job last changed.
    pub last_updated_date_time_utc: Timestamp,
    /// What the device answered.
    #[serde(default)]
    pub outcome: DeviceJobOutcome,
    /// Why the device job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<DeviceJobError>,
}

/// Topic prefix of method requests published to a device (`$iothub/methods/POST/`).
pub const METHOD_REQUEST_PREFIX: &str = "$iothub/methods/POST/";

/// Topic prefix of method responses published by a device (`$iothub/methods/res/`).
pub const METHOD_RESPONSE_PREFIX: &str = "$iothub/methods/res/";

/// Topic filter a device subscribes to for method requests.
pub const METHOD_SUBSCRIPTION: &str = "$iothub/methods/POST/#";

/// Bytes of a method name that are escaped in topics: `%` (the Python SDK percent-decodes the
/// segment) and the MQTT wildcards, which must not appear in a topic name.
fn escape_topic_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '#' => out.push_str("%23"),
            '+' => out.push_str("%2B"),
            _ => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Result<String, ProtoError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ProtoError::InvalidTopic(format!("{s:?} is not UTF-8 after percent-decoding")))
}

/// Reads `$rid` from a `?k=v&k=v` property bag (keys compared without their `$`).
fn rid_from_bag(topic: &str, bag: &str) -> Result<String, ProtoError> {
    for pair in bag.split('&') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ProtoError::InvalidTopic(format!("{topic:?}: property {pair:?} has no '='")))?;
        if k.trim_start_matches('$') == "rid" {
            return unescape(v);
        }
    }
    Err(ProtoError::InvalidTopic(format!("{topic:?} carries no $rid")))
}

/// A method request as the hub publishes it to a device (spec §6.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodRequestTopic {
    /// Method name (percent-decoded).
    pub method_name: String,
    /// Opaque request id to echo in the response.
    pub rid: String,
}

impl MethodRequestTopic {
    /// The topic name, `$iothub/methods/POST/{methodName}/?$rid={rid}`.
    pub fn to_topic(&self) -> String {
        format!("{METHOD_REQUEST_PREFIX}{}/?$rid={}", escape_topic_segment(&self.method_name), self.rid)
    }

    /// Parses a request topic.
    ///
    /// # Errors
    /// [`ProtoError::InvalidTopic`] when the topic is not a method request or has no `$rid`.
    pub fn parse(topic: &str) -> Result<Self, ProtoError> {
        let rest = topic
            .strip_prefix(METHOD_REQUEST_PREFIX)
            .ok_or_else(|| ProtoError::InvalidTopic(format!("{topic:?} is not a method request")))?;
        let (name, bag) = rest
            .split_once("/?")
            .ok_or_else(|| ProtoError::InvalidTopic(format!("{topic:?} lacks the '/?' property bag")))?;
        if name.is_empty() {
            return Err(ProtoError::InvalidTopic(format!("{topic:?} names no method")));
        }
        Ok(Self { method_name: unescape(name)?, rid: rid_from_bag(topic, bag)? })
    }
}

/// A method response as a device publishes it (spec §6.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResponseTopic {
    /// Status chosen by the device.
    pub status: i32,
    /// The request id of the request being answered.
    pub rid: String,
}

impl MethodResponseTopic {
    /// The topic name, `$iothub/methods/res/{status}/?$rid={rid}`.
    pub fn to_topic(&self) -> String {
        format!("{METHOD_RESPONSE_PREFIX}{}/?$rid={}", self.status, self.rid)
    }

    /// Parses a response topic (the Python SDK percent-encodes status and rid; both are decoded).
    ///
    /// # Errors
    /// [`ProtoError::InvalidTopic`] when the topic is not a method response, the status is not an
    /// integer or there is no `$rid`.
    pub fn parse(topic: &str) -> Result<Self, ProtoError> {
        let rest = topic
            .strip_prefix(METHOD_RESPONSE_PREFIX)
            .ok_or_else(|| ProtoError::InvalidTopic(format!("{topic:?} is not a method response")))?;
        let (status, bag) = rest
            .split_once("/?")
            .ok_or_else(|| ProtoError::InvalidTopic(format!("{topic:?} lacks the '/?' property bag")))?;
        let status = unescape(status)?
            .parse::<i32>()
            .map_err(|_| ProtoError::InvalidTopic(format!("{topic:?}: status must be an integer")))?;
        Ok(Self { status, rid: rid_from_bag(topic, bag)? })
    }
}

/// Parses a method body as the device SDKs do: empty means `null`.
///
/// # Errors
/// [`ProtoError::InvalidBody`] when the body is not JSON.
pub fn parse_method_payload(body: &[u8]) -> Result<Value, ProtoError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| ProtoError::InvalidBody(format!("method payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_topics_round_trip() {
        let req = MethodRequestTopic { method_name: "fw#1+%".into(), rid: "a1".into() };
        let t = req.to_topic();
        assert_eq!(t, "$iothub/methods/POST/fw%231%2B%25/?$rid=a1");
        assert_eq!(MethodRequestTopic::parse(&t).unwrap(), req);
        let res = MethodResponseTopic::parse("$iothub/methods/res/200/?$rid=a1").unwrap();
        assert_eq!(res, MethodResponseTopic { status: 200, rid: "a1".into() });
        assert!(MethodResponseTopic::parse("$iothub/methods/res/ok/?$rid=1").is_err());
        assert!(MethodResponseTopic::parse("$iothub/methods/res/200/?$x=1").is_err());
    }

    #[test]
    fn job_request_parses_node_and_python_shapes() {
        let node = r#"{"jobId":"job01","type":"scheduleDeviceMethod",
          "cloudToDeviceMethod":{"methodName":"testMethod","payload":{},"responseTimeoutInSeconds":30,
          "connectTimeoutInSeconds":15},"queryCondition":"*","startTime":null,
          "maxExecutionTimeInSeconds":3600}"#;
        let r: JobRequest = serde_json::from_str(node).unwrap();
        assert_eq!(r.job_type, Some(JobType::ScheduleDeviceMethod));
        assert_eq!(r.start_time, None);
        let twin = r#"{"jobId":"job02","type":"scheduleUpdateTwin",
          "updateTwin":{"properties":{"desired":{"test1":"value1"}},"tags":{"a":1},"etag":"*"},
          "queryCondition":"deviceId = 'test-device'","startTime":"2019-05-08T12:19:56.868Z",
          "maxExecutionTimeInSeconds":20}"#;
        let r: JobRequest = serde_json::from_str(twin).unwrap();
        let u = r.update_twin.unwrap();
        assert_eq!(u.etag.as_deref(), Some("*"));
        assert_eq!(u.properties.unwrap().desired.unwrap()["test1"], "value1");
    }

    #[test]
    fn device_job_prints_the_observed_field_names() {
        let t = Timestamp::from_unix_secs(0);
        let j = DeviceJob {
            device_id: "d".into(),
            job_id: JobId::new("j").unwrap(),
            job_type: JobType::ScheduleUpdateTwin,
            status: DeviceJobStatus::Canceled,
            start_time_utc: t,
            end_time_utc: t,
            created_date_time_utc: t,
            last_updated_date_time_utc: t,
            outcome: DeviceJobOutcome::default(),
            error: None,
        };
        let v = serde_json::to_value(&j).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "deviceId",
                "jobId",
                "jobType",
                "status",
                "startTimeUtc",
                "endTimeUtc",
                "createdDateTimeUtc",
                "lastUpdatedDateTimeUtc",
                "outcome"
            ]
        );
        assert_eq!(v["status"], "canceled");
        assert_eq!(v["outcome"], serde_json::json!({"deviceMethodResponse": null}));
    }

    #[test]
    fn method_failures_travel_stringified_inside_the_registry_envelope() {
        let body = NumericErrorBody {
            error_code: 404103,
            tracking_id: "t".into(),
            message: "Timed out waiting for device to connect.".into(),
            info: serde_json::from_str(r#"{"timeout":"00:00:00"}"#).unwrap(),
            timestamp_utc: Timestamp::from_unix_secs(0),
        };
        let outer = body.wrapped_for_rest();
        assert_eq!(outer["ExceptionMessage"], "");
        let inner: NumericErrorBody = serde_json::from_str(outer["Message"].as_str().unwrap()).unwrap();
        assert_eq!(inner, body);
        assert!(outer["Message"].as_str().unwrap().starts_with(r#"{"errorCode":404103,"trackingId":"t","#));
    }

    #[test]
    fn error_codes_know_their_status_and_name() {
        assert_eq!(HubErrorCode::DeviceNotOnline.http_status(), 404);
        assert_eq!(HubErrorCode::GatewayTimeout.http_status(), 504);
        assert_eq!(HubErrorCode::from_code(409104), Some(HubErrorCode::JobAlreadyExists));
        assert_eq!(HubErrorCode::MessageTooLarge.name(), "MessageTooLarge");
    }
}
