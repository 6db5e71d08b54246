//! Direct methods: validated invocations and the sans-I/O pending-call table (hub spec §6.6, §7).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use zerotouch_proto::jobs::{
    parse_method_payload, CloudToDeviceMethod, CloudToDeviceMethodResult, HubErrorCode, MethodRequestTopic,
    MethodResponseTopic, NumericErrorBody,
};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

use super::hub_error;
use crate::crypto::CryptoProvider;
use crate::error::Error;
use crate::registry::SessionId;

/// Largest method payload, request or response, in bytes of serialized JSON (128 KB).
pub const MAX_METHOD_PAYLOAD_BYTES: usize = 128 * 1024;

/// Response timeout when the request names none.
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: i64 = 30;

/// Shortest allowed response timeout.
pub const MIN_RESPONSE_TIMEOUT_SECS: i64 = 5;

/// Longest allowed response timeout.
pub const MAX_RESPONSE_TIMEOUT_SECS: i64 = 300;

/// Longest allowed connect timeout (the shortest is 0: the device must already be online).
pub const MAX_CONNECT_TIMEOUT_SECS: i64 = 300;

/// Characters a method name must not contain besides space and tab (spec §5.5).
pub const METHOD_NAME_FORBIDDEN: &str = "$()<>@,;:\\\"/[]?={}";

/// Checks a method name: printable US-ASCII, none of [`METHOD_NAME_FORBIDDEN`], no space.
///
/// # Errors
/// 400005 `ArgumentNull` when empty, 400004 `ArgumentInvalid` for a forbidden character.
pub fn validate_method_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(hub_error(HubErrorCode::ArgumentNull, "methodName must be specified."));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic() || METHOD_NAME_FORBIDDEN.contains(*c)) {
        return Err(hub_error(
            HubErrorCode::ArgumentInvalid,
            format!(
                "methodName {name:?} contains {c:?}; use printable US-ASCII without spaces \
                 or any of {METHOD_NAME_FORBIDDEN}"
            ),
        ));
    }
    Ok(())
}

/// A direct-method invocation whose name, payload size and timeouts are within the documented
/// bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInvocation {
    name: String,
    payload: Value,
    response_timeout: Duration,
    connect_timeout: Duration,
}

impl MethodInvocation {
    /// An invocation with the default timeouts (response 30 s, connect 0 s).
    ///
    /// # Errors
    /// As [`MethodInvocation::from_wire`].
    pub fn new(name: impl Into<String>, payload: Value) -> Result<Self, Error> {
        Self::from_wire(&CloudToDeviceMethod {
            method_name: name.into(),
            payload,
            response_timeout_in_seconds: None,
            connect_timeout_in_seconds: None,
        })
    }

    /// Validates a request body of `POST /twins/{id}/methods` or a job's `cloudToDeviceMethod`.
    ///
    /// # Errors
    /// 400005 for a missing name, 400004 for a bad name or a timeout out of bounds (with the
    /// hub's message `responseTimeoutInSeconds must be within [5; 300].`), 413001 when the payload
    /// is larger than 128 KB.
    pub fn from_wire(wire: &CloudToDeviceMethod) -> Result<Self, Error> {
        validate_method_name(&wire.method_name)?;
        let response = wire.response_timeout_in_seconds.unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS);
        if !(MIN_RESPONSE_TIMEOUT_SECS..=MAX_RESPONSE_TIMEOUT_SECS).contains(&response) {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                "responseTimeoutInSeconds must be within [5; 300].",
            ));
        }
        let connect = wire.connect_timeout_in_seconds.unwrap_or(0);
        if !(0..=MAX_CONNECT_TIMEOUT_SECS).contains(&connect) {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                "connectTimeoutInSeconds must be within [0; 300].",
            ));
        }
        let size = payload_size(&wire.payload);
        if size > MAX_METHOD_PAYLOAD_BYTES {
            return Err(hub_error(
                HubErrorCode::MessageTooLarge,
                format!("The method payload is {size} bytes; the limit is {MAX_METHOD_PAYLOAD_BYTES} bytes."),
            ));
        }
        Ok(Self {
            name: wire.method_name.clone(),
            payload: wire.payload.clone(),
            response_timeout: Duration::from_secs(response.unsigned_abs()),
            connect_timeout: Duration::from_secs(connect.unsigned_abs()),
        })
    }

    /// The same invocation with another response timeout.
    ///
    /// # Errors
    /// 400004 when the timeout is outside 5–300 s.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        let secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
        if !(MIN_RESPONSE_TIMEOUT_SECS..=MAX_RESPONSE_TIMEOUT_SECS).contains(&secs) {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                "responseTimeoutInSeconds must be within [5; 300].",
            ));
        }
        self.response_timeout = Duration::from_secs(timeout.as_secs());
        Ok(self)
    }

    /// The same invocation with another connect timeout.
    ///
    /// # Errors
    /// 400004 when the timeout is longer than 300 s.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        if timeout.as_secs() > MAX_CONNECT_TIMEOUT_SECS.unsigned_abs() {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                "connectTimeoutInSeconds must be within [0; 300].",
            ));
        }
        self.connect_timeout = Duration::from_secs(timeout.as_secs());
        Ok(self)
    }

    /// Method name, exactly as requested.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Invocation payload.
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// How long to wait for the device's answer once the request is delivered.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// How long to wait for the device to come online.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The wire form, with both timeouts spelled out.
    pub fn to_wire(&self) -> CloudToDeviceMethod {
        CloudToDeviceMethod {
            method_name: self.name.clone(),
            payload: self.payload.clone(),
            response_timeout_in_seconds: i64::try_from(self.response_timeout.as_secs()).ok(),
            connect_timeout_in_seconds: i64::try_from(self.connect_timeout.as_secs()).ok(),
        }
    }
}

fn payload_size(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

/// `hh:mm:ss`, the .NET TimeSpan form the hub writes in `info.timeout`.
fn timespan(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Who a method is addressed to: a device, or one of its modules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodTarget {
    /// Device id.
    pub device: DeviceId,
    /// Module id, for module methods.
    pub module: Option<ModuleId>,
}

impl MethodTarget {
    /// A device target.
    pub fn device(device: DeviceId) -> Self {
        Self { device, module: None }
    }

    /// A module target.
    pub fn module(device: DeviceId, module: ModuleId) -> Self {
        Self { device, module: Some(module) }
    }
}

impl fmt::Display for MethodTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module {
            Some(m) => write!(f, "{}/{}", self.device, m),
            None => write!(f, "{}", self.device),
        }
    }
}

/// The 404 answer for a method addressed to an identity that does not exist or is disabled
/// (`DeviceNotFound` 404001, or `ModuleNotFound` 404010 for a missing module); checked by the
/// caller before [`MethodCalls::invoke`].
pub fn target_not_found(target: &MethodTarget, module_missing: bool) -> Error {
    if module_missing {
        hub_error(HubErrorCode::ModuleNotFound, format!("Module {target} not found."))
    } else {
        hub_error(
            HubErrorCode::DeviceNotFound,
            format!("Device {} not registered or disabled.", target.device),
        )
    }
}

/// Handle of one pending call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(u64);

/// Why a call ended without a device answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MethodFailure {
    /// The device had no live method subscription within the connect timeout (404 / 404103).
    DeviceNotOnline {
        /// The connect timeout that elapsed.
        connect_timeout: Duration,
    },
    /// The device did not answer within the response timeout (504 / 504101).
    GatewayTimeout {
        /// The response timeout that elapsed.
        response_timeout: Duration,
    },
    /// The device answered with a payload over 128 KB (413 / 413001).
    ResponseTooLarge {
        /// Size of the answer in bytes.
        size: usize,
    },
}

impl MethodFailure {
    /// The hub error code.
    pub fn code(&self) -> HubErrorCode {
        match self {
            MethodFailure::DeviceNotOnline { .. } => HubErrorCode::DeviceNotOnline,
            MethodFailure::GatewayTimeout { .. } => HubErrorCode::GatewayTimeout,
            MethodFailure::ResponseTooLarge { .. } => HubErrorCode::MessageTooLarge,
        }
    }

    /// The hub's message.
    pub fn message(&self) -> String {
        match self {
            MethodFailure::DeviceNotOnline { .. } => "Timed out waiting for device to connect.".to_owned(),
            MethodFailure::GatewayTimeout { .. } => {
                "Timed out waiting for the response from device.".to_owned()
            }
            MethodFailure::ResponseTooLarge { size } => {
                format!("The device response is {size} bytes; the limit is {MAX_METHOD_PAYLOAD_BYTES} bytes.")
            }
        }
    }

    /// `info` of the numeric envelope (`{"timeout":"00:00:00"}` for the timeouts).
    pub fn info(&self) -> Map<String, Value> {
        let mut info = Map::new();
        match self {
            MethodFailure::DeviceNotOnline { connect_timeout: t }
            | MethodFailure::GatewayTimeout { response_timeout: t } => {
                info.insert("timeout".to_owned(), Value::String(timespan(*t)));
            }
            MethodFailure::ResponseTooLarge { .. } => {}
        }
        info
    }

    /// The numeric error envelope the REST layer stringifies into `Message` (spec §1.4).
    pub fn to_body(&self, now: Timestamp, tracking_id: impl Into<String>) -> NumericErrorBody {
        NumericErrorBody {
            error_code: self.code().code(),
            tracking_id: tracking_id.into(),
            message: self.message(),
            info: self.info(),
            timestamp_utc: now,
        }
    }

    /// The same failure as an engine error.
    pub fn to_error(&self) -> Error {
        hub_error(self.code(), self.message())
    }
}

/// A request to publish to a device: the transport sends `body` on `topic` (QoS 0) to the
/// session of `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodDelivery {
    /// The call being delivered.
    pub call: CallId,
    /// Who receives it.
    pub target: MethodTarget,
    /// Request id the device must echo.
    pub rid: String,
    /// `$iothub/methods/POST/{name}/?$rid={rid}`.
    pub topic: String,
    /// The payload as JSON.
    pub body: Vec<u8>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCompletion {
    /// The call.
    pub call: CallId,
    /// Who it was addressed to.
    pub target: MethodTarget,
    /// The device's answer (HTTP 200 body) or the failure (404103 / 504101 / 413001).
    pub outcome: Result<CloudToDeviceMethodResult, MethodFailure>,
}

#[derive(Debug)]
enum CallState {
    AwaitingConnect,
    AwaitingResponse { rid: String },
}

#[derive(Debug)]
struct Call {
    target: MethodTarget,
    invocation: MethodInvocation,
    state: CallState,
    deadline: Timestamp,
}

/// The hub's table of pending direct-method calls.
///
/// Call order: report sessions with [`handle_device_connected`](Self::handle_device_connected) /
/// [`handle_device_disconnected`](Self::handle_device_disconnected) (a device counts as online
/// once it has subscribed to `$iothub/methods/POST/#`, until the close of that same session: a
/// session that a reconnect replaced closing late does not take it offline, see [`SessionId`]); [`invoke`](Self::invoke) for each REST
/// call or job; then drain [`poll_transmit`](Self::poll_transmit) (publish to the device) and
/// [`poll_event`](Self::poll_event) (answer the REST caller); feed device answers to
/// [`handle_device_response`](Self::handle_device_response); call
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout).
///
/// A call to an offline device waits up to its connect timeout for the device to connect
/// (404103 after that), then up to its response timeout for the answer (504101 after that). A
/// device that disconnects after delivery is still waited for until the response timeout.
#[derive(Debug)]
pub struct MethodCalls {
    rid_tag: String,
    next: u64,
    calls: BTreeMap<CallId, Call>,
    deadlines: BTreeSet<(Timestamp, CallId)>,
    /// The live session of each online target.
    online: HashMap<MethodTarget, SessionId>,
    waiting: HashMap<MethodTarget, Vec<CallId>>,
    by_rid: HashMap<String, CallId>,
    transmits: VecDeque<MethodDelivery>,
    events: VecDeque<MethodCompletion>,
}

impl MethodCalls {
    /// An empty table. Request ids start with 8 random hex digits drawn once from `crypto`, so a
    /// late answer to a request of an earlier process never matches a new call.
    ///
    /// # Errors
    /// [`Error::Crypto`] when the random source fails.
    pub fn new(crypto: &dyn CryptoProvider) -> Result<Self, Error> {
        let mut tag = [0u8; 4];
        crypto.fill_random(&mut tag).map_err(|_| Error::Crypto("random source failed".to_owned()))?;
        Ok(Self {
            rid_tag: tag.iter().map(|b| format!("{b:02x}")).collect(),
            next: 1,
            calls: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            online: HashMap::new(),
            waiting: HashMap::new(),
            by_rid: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Whether `target` has a live method subscription.
    pub fn is_online(&self, target: &MethodTarget) -> bool {
        self.online.contains_key(target)
    }

    /// Number of calls not finished yet.
    pub fn pending(&self) -> usize {
        self.calls.len()
    }

    /// Starts a call. The caller has already checked that the identity exists and is enabled
    /// (404001 otherwise). Delivers at once when the target is online; otherwise waits for it
    /// (failing at once with 404103 when the connect timeout is zero).
    pub fn invoke(&mut self, now: Timestamp, target: MethodTarget, invocation: MethodInvocation) -> CallId {
        let id = CallId(self.next);
        self.next += 1;
        let online = self.online.contains_key(&target);
        let deadline = now + invocation.connect_timeout;
        let call = Call { target: target.clone(), invocation, state: CallState::AwaitingConnect, deadline };
        self.calls.insert(id, call);
        self.deadlines.insert((deadline, id));
        if online {
            self.deliver(now, id);
        } else if deadline <= now {
            self.expire(id);
        } else {
            self.waiting.entry(target).or_default().push(id);
        }
        id
    }

    /// Records that `target` connected in `session` and subscribed to method requests, and
    /// delivers the calls that were waiting for it. `session` replaces any other live session of
    /// `target` (one connection per identity).
    pub fn handle_device_connected(&mut self, now: Timestamp, target: MethodTarget, session: SessionId) {
        let waiting = self.waiting.remove(&target).unwrap_or_default();
        self.online.insert(target, session);
        for id in waiting {
            self.deliver(now, id);
        }
    }

    /// Records that `session` of `target` ended: `target` goes offline unless that session was
    /// already replaced by a newer one (a reconnect kicks the old connection, whose close the
    /// transport reports after the new connect).
    pub fn handle_device_disconnected(&mut self, _now: Timestamp, target: &MethodTarget, session: SessionId) {
        if self.online.get(target) == Some(&session) {
            self.online.remove(target);
        }
    }

    /// Feeds a device's answer, received on `$iothub/methods/res/{status}/?$rid={rid}` from the
    /// session of `from`. An empty body means `null`; a body that is not JSON is returned as a
    /// JSON string (our choice; spec §7 leaves it open). Returns the call it completed.
    ///
    /// # Errors
    /// [`Error::NotFound`] when no pending call of `from` has this request id (late, duplicate or
    /// forged answers); the transport acknowledges and drops those.
    pub fn handle_device_response(
        &mut self,
        _now: Timestamp,
        from: &MethodTarget,
        rid: &str,
        status: i32,
        body: &[u8],
    ) -> Result<CallId, Error> {
        let id = *self
            .by_rid
            .get(rid)
            .filter(|id| self.calls.get(id).is_some_and(|c| &c.target == from))
            .ok_or_else(|| Error::NotFound(format!("pending method request {rid:?} of {from}")))?;
        self.by_rid.remove(rid);
        let Some(call) = self.calls.remove(&id) else {
            return Err(Error::NotFound(format!("pending method request {rid:?} of {from}")));
        };
        self.deadlines.remove(&(call.deadline, id));
        let outcome = if body.len() > MAX_METHOD_PAYLOAD_BYTES {
            Err(MethodFailure::ResponseTooLarge { size: body.len() })
        } else {
            let payload = parse_method_payload(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
            Ok(CloudToDeviceMethodResult { status, payload })
        };
        self.events.push_back(MethodCompletion { call: id, target: call.target, outcome });
        Ok(id)
    }

    /// Same as [`handle_device_response`](Self::handle_device_response) for a raw publish.
    ///
    /// # Errors
    /// A malformed topic, or no matching pending call.
    pub fn handle_device_publish(
        &mut self,
        now: Timestamp,
        from: &MethodTarget,
        topic: &str,
        body: &[u8],
    ) -> Result<CallId, Error> {
        let t = MethodResponseTopic::parse(topic)?;
        self.handle_device_response(now, from, &t.rid, t.status, body)
    }

    /// Abandons a call without an outcome (for example when its job is cancelled). A later
    /// answer from the device is then rejected as unknown. Returns whether the call was pending.
    pub fn cancel(&mut self, id: CallId) -> bool {
        match self.calls.remove(&id) {
            Some(call) => {
                self.deadlines.remove(&(call.deadline, id));
                match &call.state {
                    CallState::AwaitingResponse { rid } => {
                        self.by_rid.remove(rid);
                    }
                    CallState::AwaitingConnect => self.unwait(&call.target, id),
                }
                true
            }
            None => false,
        }
    }

    /// The next publish to perform.
    pub fn poll_transmit(&mut self) -> Option<MethodDelivery> {
        self.transmits.pop_front()
    }

    /// The next finished call.
    pub fn poll_event(&mut self) -> Option<MethodCompletion> {
        self.events.pop_front()
    }

    /// The earliest deadline of a pending call.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Fails every call whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.expire(id);
        }
    }

    fn unwait(&mut self, target: &MethodTarget, id: CallId) {
        if let Some(ids) = self.waiting.get_mut(target) {
            ids.retain(|w| *w != id);
            if ids.is_empty() {
                self.waiting.remove(target);
            }
        }
    }

    fn deliver(&mut self, now: Timestamp, id: CallId) {
        let rid = format!("{}{:x}", self.rid_tag, id.0);
        let Some(call) = self.calls.get_mut(&id) else { return };
        self.deadlines.remove(&(call.deadline, id));
        call.deadline = now + call.invocation.response_timeout;
        call.state = CallState::AwaitingResponse { rid: rid.clone() };
        self.deadlines.insert((call.deadline, id));
        let topic =
            MethodRequestTopic { method_name: call.invocation.name.clone(), rid: rid.clone() }.to_topic();
        let body = serde_json::to_vec(&call.invocation.payload).unwrap_or_else(|_| b"null".to_vec());
        self.by_rid.insert(rid.clone(), id);
        self.transmits.push_back(MethodDelivery { call: id, target: call.target.clone(), rid, topic, body });
    }

    fn expire(&mut self, id: CallId) {
        let Some(call) = self.calls.remove(&id) else { return };
        self.deadlines.remove(&(call.deadline, id));
        let failure = match &call.state {
            CallState::AwaitingConnect => {
                self.unwait(&call.target, id);
                MethodFailure::DeviceNotOnline { connect_timeout: call.invocation.connect_timeout }
            }
            CallState::AwaitingResponse { rid } => {
                self.by_rid.remove(rid);
                MethodFailure::GatewayTimeout { response_timeout: call.invocation.response_timeout }
            }
        };
        self.events.push_back(MethodCompletion { call: id, target: call.target, outcome: Err(failure) });
    }
}

/// A method request as the device receives it (device side of spec §6.6).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMethodRequest {
    /// Method name.
    pub name: String,
    /// Request id to echo.
    pub rid: String,
    /// Payload (`null` when the body was empty).
    pub payload: Value,
}

impl DeviceMethodRequest {
    /// Parses a publish received on `$iothub/methods/POST/{name}/?$rid={rid}`.
    ///
    /// # Errors
    /// [`Error::Proto`] when the topic is not a method request or the body is not JSON.
    pub fn from_publish(topic: &str, body: &[u8]) -> Result<Self, Error> {
        let t = MethodRequestTopic::parse(topic)?;
        Ok(Self { name: t.method_name, rid: t.rid, payload: parse_method_payload(body)? })
    }

    /// The topic and body of the answer: `$iothub/methods/res/{status}/?$rid={rid}`, the payload
    /// as JSON.
    pub fn respond(&self, status: i32, payload: &Value) -> (String, Vec<u8>) {
        let topic = MethodResponseTopic { status, rid: self.rid.clone() }.to_topic();
        let body = serde_json::to_vec(payload).unwrap_or_else(|_| b"null".to_vec());
        (topic, body)
    }
}
