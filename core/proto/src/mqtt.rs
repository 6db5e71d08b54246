//! DPS device API over MQTT: the CONNECT username and the request / response topic grammar (spec §2).
//!
//! `$rid` values are kept exactly as the device wrote them, because every SDK matches replies by
//! comparing the echoed text with what it sent (Python and Node use UUIDs, the C SDK a decimal
//! packet id, the embedded SDK the constant `1`).

use std::fmt;

use crate::error::ProtoError;
use percent_encoding::percent_decode_str;

use crate::http::encode_component;
use crate::ids::{IdScope, RegistrationId};

/// The only topic filter DPS grants: every reply arrives below it.
pub const SUBSCRIBE_FILTER: &str = "$dps/registrations/res/#";

/// Prefix of every reply topic, followed by the HTTP-like status.
pub const RESPONSE_TOPIC_PREFIX: &str = "$dps/registrations/res/";

/// Topic prefix of a register publish, followed by `?$rid={rid}`.
pub const REGISTER_TOPIC_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/";

/// Topic prefix of an operation-status poll, followed by `?$rid={rid}&operationId={id}`.
pub const POLL_TOPIC_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";

/// Payload the Python and Node SDKs publish with a poll (a single space).
pub const POLL_PAYLOAD: &str = " ";

const RID_KEY: &str = "$rid";
const OPERATION_ID_KEY: &str = "operationId";
const RETRY_AFTER_KEY: &str = "retry-after";
const API_VERSION_KEY: &str = "api-version";
const CLIENT_VERSION_KEY: &str = "ClientVersion";

/// Whether `rid` can be carried in a topic and echoed back: non-empty, and free of the MQTT
/// wildcards `#` and `+`, of NUL, and of `&` (which would end the `$rid` property).
pub fn is_valid_rid(rid: &str) -> bool {
    !rid.is_empty() && !rid.contains(['#', '+', '&', '\0'])
}

fn check_rid(rid: &str, topic: &str) -> Result<(), ProtoError> {
    if is_valid_rid(rid) {
        Ok(())
    } else {
        Err(ProtoError::InvalidTopic(format!("bad $rid {rid:?} in {topic:?}")))
    }
}

/// The CONNECT username of a DPS device:
/// `{idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion={user agent}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectUsername {
    /// ID scope of the DPS instance.
    pub id_scope: IdScope,
    /// Registration id (must agree with ClientId, SAS `sr` and the register body).
    pub registration_id: RegistrationId,
    /// `api-version` (percent-decoded).
    pub api_version: String,
    /// `ClientVersion` (percent-decoded user agent), when the SDK sends one.
    pub client_version: Option<String>,
}

impl ConnectUsername {
    /// Parses a username. Query values are percent-decoded (`+` stays `+`), keys are matched
    /// ASCII case-insensitively and unknown keys are ignored.
    ///
    /// # Errors
    /// [`ProtoError::InvalidId`] when the shape is wrong, `api-version` is missing or repeated,
    /// or the scope or registration id break their rules.
    pub fn parse(username: &str) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::InvalidId { kind: "mqtt username", reason };
        let mut parts = username.splitn(4, '/');
        let (scope, literal, id, query) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(s), Some(l), Some(i), Some(q)) => (s, l, i, q),
            _ => {
                return Err(bad(format!(
                    "expected {{idScope}}/registrations/{{registrationId}}/api-version=..., got {username:?}"
                )))
            }
        };
        if !literal.eq_ignore_ascii_case("registrations") {
            return Err(bad(format!("second segment must be `registrations`, got {literal:?}")));
        }
        let query = query.strip_prefix('?').unwrap_or(query);
        let (mut api_version, mut client_version) = (None, None);
        // Only `api-version` must percent-decode to UTF-8: `ClientVersion` is a user-agent
        // string nobody acts on (decoded lossily), and other keys are never looked at.
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let key = percent_decode_str(key).decode_utf8_lossy();
            let (slot, value) = if key.eq_ignore_ascii_case(API_VERSION_KEY) {
                let value = percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| bad(format!("{value:?} is not UTF-8 after percent-decoding")))?;
                (&mut api_version, value.into_owned())
            } else if key.eq_ignore_ascii_case(CLIENT_VERSION_KEY) {
                (&mut client_version, percent_decode_str(value).decode_utf8_lossy().into_owned())
            } else {
                continue;
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("{key} appears twice")));
            }
        }
        let api_version = api_version.ok_or_else(|| bad("missing api-version".into()))?;
        Ok(Self {
            id_scope: IdScope::new(scope)?,
            registration_id: RegistrationId::new(id)?,
            api_version,
            client_version,
        })
    }
}

impl fmt::Display for ConnectUsername {
    /// Writes the username with query values percent-encoded like Python's `quote(safe="")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/registrations/{}/{API_VERSION_KEY}={}",
            self.id_scope,
            self.registration_id,
            encode_component(&self.api_version)
        )?;
        if let Some(cv) = &self.client_version {
            write!(f, "&{CLIENT_VERSION_KEY}={}", encode_component(cv))?;
        }
        Ok(())
    }
}

/// A publish from a device to DPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `$dps/registrations/PUT/iotdps-register/?$rid={rid}`; payload DeviceRegistration JSON.
    Register {
        /// Request id, echoed verbatim in the reply topic.
        rid: String,
    },
    /// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`.
    PollStatus {
        /// Request id, echoed verbatim in the reply topic.
        rid: String,
        /// The operation to report on, percent-decoded (Python url-quotes it), as sent: not
        /// checked against the rules of [`OperationId`](crate::OperationId) here, because an id that breaks them
        /// names no operation and is answered 404 `404202` like any unknown one (spec §11), not
        /// left without a reply.
        operation_id: String,
    },
}

impl DeviceRequest {
    /// Parses the topic of an inbound device publish.
    ///
    /// # Errors
    /// [`ProtoError::InvalidTopic`] for any topic that is neither a register nor a poll, lacks
    /// `$rid` or repeats `$rid` or `operationId`, or whose `operationId` is not UTF-8 once
    /// percent-decoded. A poll without `operationId` asks for the operation `""`, which exists
    /// no more than a malformed one.
    pub fn parse_topic(topic: &str) -> Result<Self, ProtoError> {
        let invalid = |why: &str| ProtoError::InvalidTopic(format!("{why}: {topic:?}"));
        let (path, query) = topic.split_once('?').ok_or_else(|| invalid("no `?$rid=` part"))?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let is_register = path == REGISTER_TOPIC_PREFIX.trim_end_matches('/');
        let is_poll = path == POLL_TOPIC_PREFIX.trim_end_matches('/');
        if !is_register && !is_poll {
            return Err(invalid("not a DPS register or poll topic"));
        }
        let (mut rid, mut operation_id) = (None, None);
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = part.split_once('=').unwrap_or((part, ""));
            let slot = if key.eq_ignore_ascii_case(RID_KEY) {
                &mut rid
            } else if key.eq_ignore_ascii_case(OPERATION_ID_KEY) {
                &mut operation_id
            } else {
                continue;
            };
            if slot.replace(raw).is_some() {
                return Err(invalid(&format!("{key} appears twice")));
            }
        }
        let rid = rid.ok_or_else(|| invalid("missing $rid"))?;
        check_rid(rid, topic)?;
        let rid = rid.to_owned();
        if is_register {
            return Ok(DeviceRequest::Register { rid });
        }
        let decoded = percent_encoding::percent_decode_str(operation_id.unwrap_or_default())
            .decode_utf8()
            .map_err(|_| invalid("operationId is not UTF-8 after percent-decoding"))?;
        Ok(DeviceRequest::PollStatus { rid, operation_id: decoded.into_owned() })
    }

    /// The request id to echo.
    pub fn rid(&self) -> &str {
        match self {
            DeviceRequest::Register { rid } | DeviceRequest::PollStatus { rid, .. } => rid,
        }
    }
}

impl fmt::Display for DeviceRequest {
    /// Writes the publish topic; `rid` is written verbatim (see [`is_valid_rid`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Register { rid } => write!(f, "{REGISTER_TOPIC_PREFIX}?{RID_KEY}={rid}"),
            DeviceRequest::PollStatus { rid, operation_id } => {
                write!(f, "{POLL_TOPIC_PREFIX}?{RID_KEY}={rid}&{OPERATION_ID_KEY}={operation_id}")
            }
        }
    }
}

/// A reply topic `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={secs}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    /// HTTP-like status: 202 while assigning, 200 when final, 4xx/5xx on errors.
    pub status: u16,
    /// The request id of the publish being answered, verbatim.
    pub rid: String,
    /// Seconds the device should wait before its next request.
    pub retry_after: Option<u32>,
}

impl ResponseTopic {
    /// The topic answering `request`, echoing its `$rid`.
    pub fn reply_to(request: &DeviceRequest, status: u16, retry_after: Option<u32>) -> Self {
        Self { status, rid: request.rid().to_owned(), retry_after }
    }

    /// Parses a reply topic as our device client receives it. Unknown properties are ignored,
    /// and so is a `retry-after` that is not a whole number of seconds (`None`: the device waits
    /// its default, as the SDKs do, spec §1.7); the reply itself still counts.
    ///
    /// # Errors
    /// [`ProtoError::InvalidTopic`] when the prefix, status or `$rid` is missing or malformed,
    /// or a property repeats.
    pub fn parse(topic: &str) -> Result<Self, ProtoError> {
        let invalid = |why: &str| ProtoError::InvalidTopic(format!("{why}: {topic:?}"));
        let rest =
            topic.strip_prefix(RESPONSE_TOPIC_PREFIX).ok_or_else(|| invalid("not a DPS reply topic"))?;
        let (status, query) = rest.split_once('/').ok_or_else(|| invalid("no `/` after the status"))?;
        if status.is_empty() || !status.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("status is not a number"));
        }
        let status: u16 = status.parse().map_err(|_| invalid("status out of range"))?;
        let query = query.strip_prefix('?').ok_or_else(|| invalid("no `?$rid=` part"))?;
        let (mut rid, mut retry_after) = (None, None);
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = part.split_once('=').unwrap_or((part, ""));
            let slot = if key.eq_ignore_ascii_case(RID_KEY) {
                &mut rid
            } else if key.eq_ignore_ascii_case(RETRY_AFTER_KEY) {
                &mut retry_after
            } else {
                continue;
            };
            if slot.replace(raw).is_some() {
                return Err(invalid(&format!("{key} appears twice")));
            }
        }
        let rid = rid.ok_or_else(|| invalid("missing $rid"))?;
        check_rid(rid, topic)?;
        let retry_after = retry_after.and_then(|v| v.parse::<u32>().ok());
        Ok(Self { status, rid: rid.to_owned(), retry_after })
    }
}

impl fmt::Display for ResponseTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{RESPONSE_TOPIC_PREFIX}{}/?{RID_KEY}={}", self.status, self.rid)?;
        if let Some(secs) = self.retry_after {
            write!(f, "&{RETRY_AFTER_KEY}={secs}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_username_decodes_client_version() {
        let u = ConnectUsername::parse(
            "0ne00111111/registrations/dev1/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%28Linux%3B%20x86%29",
        )
        .unwrap();
        assert_eq!(u.id_scope.as_str(), "0ne00111111");
        assert_eq!(u.registration_id.as_str(), "dev1");
        assert_eq!(u.api_version, "2019-03-31");
        assert_eq!(u.client_version.as_deref(), Some("azure-iot-device-provisioning-py/2.14.0(Linux; x86)"));
    }

    #[test]
    fn embedded_username_without_client_version_and_unknown_keys() {
        let u =
            ConnectUsername::parse("0ne00111111/registrations/dev1/api-version=2021-06-01&foo=bar").unwrap();
        assert_eq!(u.client_version, None);
        assert!(ConnectUsername::parse("0ne00111111/registrations/dev1/ClientVersion=1").is_err());
        assert!(ConnectUsername::parse("0ne00111111/devices/dev1/api-version=1").is_err());
        assert!(ConnectUsername::parse("0ne00111111/registrations/dev1").is_err());
    }

    /// Only `api-version` must decode: the user-agent string and keys nobody reads do not
    /// refuse a device (spec §2.1: ignore unknown keys).
    #[test]
    fn a_client_version_or_unknown_key_that_does_not_decode_does_not_refuse_the_username() {
        let u = ConnectUsername::parse(
            "0ne00111111/registrations/dev1/api-version=2019-03-31&ClientVersion=c%2F1.0%E9%ZZ&x%FF=%FE",
        )
        .unwrap();
        assert_eq!(u.api_version, "2019-03-31");
        assert_eq!(u.client_version.as_deref(), Some("c/1.0\u{fffd}%ZZ"));
        assert!(ConnectUsername::parse("0ne00111111/registrations/dev1/api-version=%FF").is_err());
    }

    #[test]
    fn c_sdk_poll_with_integer_rid() {
        let r = DeviceRequest::parse_topic(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=4.a1b2c3d4e5f60718.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550",
        )
        .unwrap();
        assert_eq!(r.rid(), "7");
        assert!(matches!(r, DeviceRequest::PollStatus { .. }));
    }

    #[test]
    fn a_poll_for_a_malformed_or_missing_operation_id_is_still_a_poll_to_answer() {
        for (query, id) in [
            ("&operationId=bad_op", "bad_op"),
            ("&operationId=", ""),
            ("", ""),
            ("&operationId=A%2FB", "A/B"),
        ] {
            let t = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9{query}");
            assert_eq!(
                DeviceRequest::parse_topic(&t).unwrap(),
                DeviceRequest::PollStatus { rid: "9".into(), operation_id: id.into() },
                "{t}"
            );
        }
    }

    #[test]
    fn other_topics_are_rejected() {
        for t in [
            "$dps/registrations/PUT/iotdps-register/",
            "$dps/registrations/PUT/iotdps-other/?$rid=1",
            "devices/d1/messages/events/",
            "$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2",
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=a&operationId=b",
        ] {
            assert!(matches!(DeviceRequest::parse_topic(t), Err(ProtoError::InvalidTopic(_))), "{t}");
        }
    }

    #[test]
    fn reply_topic_with_retry_after() {
        let t = ResponseTopic::parse("$dps/registrations/res/202/?$rid=1&retry-after=3").unwrap();
        assert_eq!(t, ResponseTopic { status: 202, rid: "1".into(), retry_after: Some(3) });
        assert_eq!(t.to_string(), "$dps/registrations/res/202/?$rid=1&retry-after=3");
        assert!(ResponseTopic::parse("$dps/registrations/res/200/").is_err());
        for odd in ["soon", "-1", "", "1.5", "99999999999"] {
            let t = ResponseTopic::parse(&format!("$dps/registrations/res/202/?$rid=1&retry-after={odd}"))
                .unwrap();
            assert_eq!((t.status, t.rid.as_str(), t.retry_after), (202, "1", None), "retry-after={odd}");
        }
        let req =
            DeviceRequest::parse_topic("$dps/registrations/PUT/iotdps-register/?$rid=2a6c1e77-5b1a").unwrap();
        assert_eq!(
            ResponseTopic::reply_to(&req, 401, None).to_string(),
            "$dps/registrations/res/401/?$rid=2a6c1e77-5b1a"
        );
    }
}
