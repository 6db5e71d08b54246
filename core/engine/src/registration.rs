//! Device-side DPS registration: a sans-I/O state machine from register to assigned hub.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use zerotouch_proto::device::{
    raw_payload, DeviceRegistration, DeviceRegistrationResult, ErrorDetails, RegistrationStatus, Substatus,
};
use zerotouch_proto::sas::{
    encode_resource, registration_resource, string_to_sign, SasToken, REGISTRATION_KEY_NAME,
};
use zerotouch_proto::{IdScope, OperationId, RegistrationId, Timestamp};

use crate::crypto::CryptoProvider;
use crate::error::Error;

/// Shortest wait the machine accepts from a service `retry-after` (the C SDK's lower bound).
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Longest wait the machine accepts from a service `retry-after` (the C SDK's upper bound); also
/// the cap of the exponential back-off.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The api-version our device client speaks by default (the one the C SDK and the HTTPS docs use).
pub const DEFAULT_API_VERSION: &str = "2021-06-01";

/// How a device proves its identity to DPS.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceCredential {
    /// The device's symmetric key bytes. For group enrollments this is the key already derived
    /// from the group key and the registration id (spec §4.4), never the group key itself.
    SymmetricKey(Vec<u8>),
    /// X.509: the TLS layer presents the client certificate, so requests carry no SAS token.
    X509,
}

impl DeviceCredential {
    /// A symmetric-key credential from its base64 text, as the portal and the service API show
    /// it (padding optional).
    ///
    /// # Errors
    /// [`Error::BadRequest`] when the text is not base64 or decodes to no bytes.
    pub fn symmetric_key_base64(key: &str) -> Result<Self, Error> {
        let lenient = GeneralPurpose::new(
            &alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let bytes = lenient
            .decode(key.trim())
            .map_err(|_| Error::BadRequest("the symmetric key is not valid base64".to_owned()))?;
        if bytes.is_empty() {
            return Err(Error::BadRequest("the symmetric key is empty".to_owned()));
        }
        Ok(Self::SymmetricKey(bytes))
    }
}

impl fmt::Debug for DeviceCredential {
    /// Never prints key bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SymmetricKey(_) => f.write_str("SymmetricKey(<redacted>)"),
            Self::X509 => f.write_str("X509"),
        }
    }
}

/// Everything a [`Registration`] needs to know about the device and its timing.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// The DPS instance's ID scope.
    pub id_scope: IdScope,
    /// The registration id (also the MQTT client id and the X.509 subject CN).
    pub registration_id: RegistrationId,
    /// How the device authenticates.
    pub credential: DeviceCredential,
    /// Custom payload passed to the allocation webhook; sent only when set.
    pub payload: Option<Value>,
    /// api-version the transport puts in the URL query or MQTT username.
    pub api_version: String,
    /// Lifetime of each SAS token the machine signs.
    pub token_ttl: Duration,
    /// How long to wait for each reply before failing with [`FailureKind::Timeout`].
    pub request_timeout: Duration,
    /// Wait before polling when the service gives no `retry-after`; also the base of the
    /// exponential back-off on 429 and 5xx replies that carry no `retry-after`.
    pub default_retry_after: Duration,
    /// How many times in a row a throttled (429) or failed (408, 5xx) request may be resent
    /// before the machine gives up with [`FailureKind::Throttled`]. `None` (the default) sets no
    /// count: the machine keeps resending until
    /// [`registration_timeout`](RegistrationConfig::registration_timeout), as the Python, Node
    /// MQTT and C SDKs do (spec §1.7), because a fleet that reboots together is throttled for
    /// minutes, not for a handful of retries.
    pub max_throttle_retries: Option<u32>,
    /// How long the whole registration may take, from the first request to the outcome, before
    /// it fails with [`FailureKind::Timeout`]: a service that answers `assigning` for ever, or
    /// keeps throttling, does not hold the device for ever.
    pub registration_timeout: Duration,
}

impl RegistrationConfig {
    /// A configuration with the defaults: api-version `2021-06-01`, 3600 s tokens, 30 s request
    /// timeout, 2 s default retry-after, throttle retries bounded only by the 15 min allowed for
    /// the whole registration.
    pub fn new(id_scope: IdScope, registration_id: RegistrationId, credential: DeviceCredential) -> Self {
        Self {
            id_scope,
            registration_id,
            credential,
            payload: None,
            api_version: DEFAULT_API_VERSION.to_owned(),
            token_ttl: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
            default_retry_after: Duration::from_secs(2),
            max_throttle_retries: None,
            registration_timeout: Duration::from_secs(900),
        }
    }
}

/// A request the transport must send now. `Debug` leaves the SAS token out.
#[derive(Clone, PartialEq)]
pub enum Transmit {
    /// Register: HTTP `PUT {scope}/registrations/{id}/register`, or MQTT
    /// `$dps/registrations/PUT/iotdps-register/?$rid=..` with `body` as JSON.
    Register {
        /// The `DeviceRegistration` body.
        body: DeviceRegistration,
        /// The full SAS token (`SharedAccessSignature sr=..`) for the `Authorization` header or
        /// MQTT password; `None` for X.509.
        authorization: Option<String>,
    },
    /// Operation status: HTTP `GET {scope}/registrations/{id}/operations/{operationId}`, or MQTT
    /// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid=..&operationId=..`.
    PollStatus {
        /// The operation id from the register reply.
        operation_id: OperationId,
        /// The full SAS token, as for [`Transmit::Register`]; `None` for X.509.
        authorization: Option<String>,
    },
}

impl fmt::Debug for Transmit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = |authorization: &Option<String>| authorization.as_ref().map(|_| "<redacted>");
        match self {
            Self::Register { body, authorization } => f
                .debug_struct("Register")
                .field("body", body)
                .field("authorization", &token(authorization))
                .finish(),
            Self::PollStatus { operation_id, authorization } => f
                .debug_struct("PollStatus")
                .field("operation_id", operation_id)
                .field("authorization", &token(authorization))
                .finish(),
        }
    }
}

/// A reply from DPS, whatever the transport: the HTTP status and `Retry-After` header, or the
/// status and `retry-after` property of the MQTT topic `$dps/registrations/res/{status}/?..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceResponse {
    /// HTTP status (also the MQTT status topic segment).
    pub status: u16,
    /// The service's requested wait, if it sent one.
    pub retry_after: Option<Duration>,
    /// The JSON body as received.
    pub body: Vec<u8>,
}

impl ServiceResponse {
    /// Parses a `Retry-After` / `retry-after` value in whole seconds (the only form DPS sends).
    /// Returns `None` for anything else, so the machine falls back to its default wait.
    pub fn parse_retry_after(value: &str) -> Option<Duration> {
        value.trim().parse::<u64>().ok().map(Duration::from_secs)
    }
}

/// Where the device was assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Host name of the assigned IoT hub.
    pub assigned_hub: String,
    /// Device id in that hub.
    pub device_id: String,
    /// Why this assignment happened (first assignment, migrated, reset, ...); `None` when the
    /// service sent none or a value this version does not know (see
    /// [`raw_state`](Assignment::raw_state) for it).
    pub substatus: Option<Substatus>,
    /// Payload returned by custom allocation.
    pub payload: Option<Value>,
    /// TPM only: base64 activation blob carrying the hub key (spec §6.1).
    pub tpm_authentication_key: Option<String>,
    /// The `registrationState` as far as this version understands it: a member whose value it
    /// cannot read (an unknown `substatus`, an `x509` detail with fields missing) is left out
    /// here rather than failing the registration, and is kept in
    /// [`raw_state`](Assignment::raw_state).
    pub state: DeviceRegistrationResult,
    /// The `registrationState` exactly as the service sent it, members unknown to this version
    /// included.
    pub raw_state: Value,
}

/// Which way a registration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// HTTP 401: the credential was refused (wrong or group key, unknown certificate, or a TPM
    /// challenge, which this machine does not answer yet).
    Unauthorized,
    /// HTTP 404: unknown scope, enrollment or operation.
    NotFound,
    /// HTTP 400: the service rejected the request as malformed.
    BadRequest,
    /// Any other 4xx status (403, 409, 412, 415, ...); 408 and 429 are retried instead.
    Service,
    /// The operation finished with `status: "failed"` (see `error_code`), or `"disabled"`.
    Failed,
    /// No reply arrived within [`RegistrationConfig::request_timeout`], or no outcome within
    /// [`RegistrationConfig::registration_timeout`].
    Timeout,
    /// The reply could not be understood (unparsable body, unknown status, missing fields), or its
    /// status is not one a DPS reply can have (1xx, 3xx, or 600 and above: not HTTP).
    Protocol,
    /// The service kept answering 429, 408 or 5xx; gave up after
    /// [`RegistrationConfig::max_throttle_retries`] resends (only when that is set: by default
    /// a registration that stays throttled ends with [`FailureKind::Timeout`] at
    /// [`RegistrationConfig::registration_timeout`]).
    Throttled,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not found",
            Self::BadRequest => "bad request",
            Self::Service => "service error",
            Self::Failed => "assignment failed",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol error",
            Self::Throttled => "throttled",
        })
    }
}

/// Why a registration ended without an assignment. Displayed with the status and error code
/// the service sent, e.g. `registration failed (unauthorized; HTTP 401, error 401002):
/// Unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registration failed ({kind}{}): {message}", wire_suffix(*.status, *.error_code))]
pub struct RegistrationFailure {
    /// The category of the failure.
    pub kind: FailureKind,
    /// HTTP status of the reply that ended the registration, if a reply did.
    pub status: Option<u16>,
    /// The six-digit DPS error code (from the error body or `registrationState.errorCode`).
    pub error_code: Option<u32>,
    /// The service's message, or ours when the service sent none.
    pub message: String,
}

/// `; HTTP 401, error 401002` (what of it the service sent).
fn wire_suffix(status: Option<u16>, error_code: Option<u32>) -> String {
    match (status, error_code) {
        (Some(status), Some(code)) => format!("; HTTP {status}, error {code}"),
        (Some(status), None) => format!("; HTTP {status}"),
        (None, Some(code)) => format!("; error {code}"),
        (None, None) => String::new(),
    }
}

/// The outcome of a registration.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "produced once per registration; plain variants read better")]
pub enum RegistrationEvent {
    /// The device was assigned to a hub.
    Assigned(Assignment),
    /// The registration failed for good.
    Failed(RegistrationFailure),
}

/// What the machine sends: the register request, or a poll of the operation it started.
#[derive(Debug, Clone)]
enum Request {
    Register,
    Poll(OperationId),
}

#[derive(Debug)]
enum State {
    /// `request` goes out at the first `poll_transmit` at or after `not_before`.
    Ready { request: Request, not_before: Option<Timestamp> },
    /// `request` is on the wire; a reply is due by `deadline`.
    AwaitingReply { request: Request, deadline: Timestamp },
    /// The outcome is decided.
    Finished,
}

/// A SAS token kept until it comes close to its expiry.
struct CachedToken {
    value: String,
    issued: Timestamp,
    expiry: Timestamp,
}

/// The device side of one DPS registration, sans I/O.
///
/// Call order, in a loop until [`Registration::is_finished`] and the outcome was taken:
/// 1. [`poll_transmit`](Registration::poll_transmit)`(now)`: when it returns a [`Transmit`],
///    send it (HTTP request or MQTT publish), connecting first if need be (within
///    [`deadline`](Registration::deadline)), then tell the machine with
///    [`handle_sent`](Registration::handle_sent)`(now)`; call again until it returns `None`.
///    A request that could not be sent because its connection could not be set up is a
///    [`handle_connection_lost`](Registration::handle_connection_lost)`(now)`, not a
///    [`handle_timeout`](Registration::handle_timeout): its reply deadline only counts once it
///    is sent, and the registration deadline bounds the attempts to connect.
/// 2. When the reply arrives, [`handle_response`](Registration::handle_response)`(now, reply)`.
/// 3. Otherwise wait until [`poll_timeout`](Registration::poll_timeout) (a retry-after wait or
///    the reply deadline) and call [`handle_timeout`](Registration::handle_timeout)`(now)`.
/// 4. After each input, [`poll_event`](Registration::poll_event) yields the outcome once:
///    [`RegistrationEvent::Assigned`] or [`RegistrationEvent::Failed`]; if there is none yet,
///    go back to 1.
///
/// One request is in flight at a time. A transport that loses its connection while a request
/// is outstanding calls [`handle_connection_lost`](Registration::handle_connection_lost)`(now)`:
/// the machine sends the same request again (a poll keeps its operation id) after a back-off,
/// until the registration deadline, and the transport connects again to send it. A loss the
/// transport does not notice ends at the reply deadline with [`FailureKind::Timeout`].
///
/// The flow: register, expect `202 assigning` with an `operationId` (an immediate `200 assigned`
/// is accepted too), wait `retry-after` (clamped to 1–300 s, else
/// [`RegistrationConfig::default_retry_after`]) and poll with the operation id kept from the
/// register reply until `assigned` or `failed`. 429 and 5xx replies resend the same request,
/// until the registration deadline, after a jittered wait (see
/// [`handle_response`](Registration::handle_response)). Replies that arrive while no request is
/// outstanding are ignored.
///
/// The machine draws the jitter from its [`CryptoProvider`]'s
/// [`fill_random`](CryptoProvider::fill_random), so it stays deterministic given its inputs: a
/// provider with fixed random bytes gives fixed waits.
pub struct Registration {
    config: RegistrationConfig,
    crypto: Arc<dyn CryptoProvider>,
    state: State,
    /// Resends of the current request after 429/5xx, in a row.
    throttle_retries: u32,
    /// Connections lost in a row, without a reply in between.
    connection_losses: u32,
    token: Option<CachedToken>,
    event: Option<RegistrationEvent>,
    /// When the whole registration must have an outcome (set by the first request).
    gives_up_at: Option<Timestamp>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("config", &self.config)
            .field("state", &self.state)
            .field("throttle_retries", &self.throttle_retries)
            .field("connection_losses", &self.connection_losses)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// A registration that sends its register request at the first
    /// [`poll_transmit`](Registration::poll_transmit).
    pub fn new(config: RegistrationConfig, crypto: Arc<dyn CryptoProvider>) -> Self {
        Self {
            config,
            crypto,
            state: State::Ready { request: Request::Register, not_before: None },
            throttle_retries: 0,
            connection_losses: 0,
            token: None,
            event: None,
            gives_up_at: None,
        }
    }

    /// The configuration this registration runs with.
    pub fn config(&self) -> &RegistrationConfig {
        &self.config
    }

    /// The operation id of the running registration, once the register reply gave one.
    pub fn operation_id(&self) -> Option<&OperationId> {
        match &self.state {
            State::Ready { request: Request::Poll(id), .. }
            | State::AwaitingReply { request: Request::Poll(id), .. } => Some(id),
            _ => None,
        }
    }

    /// The next request to send, if one is due at `now`. The reply deadline starts now, and again
    /// at [`handle_sent`](Registration::handle_sent); the whole registration's deadline starts at
    /// the first request.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        let request = match &self.state {
            State::Ready { request, not_before } if not_before.is_none_or(|t| now >= t) => request.clone(),
            _ => return None,
        };
        let gives_up_at = *self.gives_up_at.get_or_insert(now + self.config.registration_timeout);
        if now >= gives_up_at {
            self.give_up();
            return None;
        }
        let authorization = self.authorization(now);
        let transmit = match &request {
            Request::Register => Transmit::Register {
                body: DeviceRegistration {
                    payload: self.config.payload.as_ref().map(raw_payload),
                    registration_id: self.config.registration_id.as_str().to_owned(),
                    tpm: None,
                    csr: None,
                },
                authorization,
            },
            Request::Poll(id) => Transmit::PollStatus { operation_id: id.clone(), authorization },
        };
        self.state = State::AwaitingReply { request, deadline: now + self.config.request_timeout };
        Some(transmit)
    }

    /// The request last returned by [`poll_transmit`](Registration::poll_transmit) went on the
    /// wire at `now`: its reply deadline
    /// ([`request_timeout`](RegistrationConfig::request_timeout)) starts again from here, so that
    /// the time a transport spends connecting between the two calls is not taken from the wait
    /// for the reply. Does nothing when no request is outstanding.
    pub fn handle_sent(&mut self, now: Timestamp) {
        if let State::AwaitingReply { deadline, .. } = &mut self.state {
            *deadline = now + self.config.request_timeout;
        }
    }

    /// When the whole registration gives up
    /// ([`registration_timeout`](RegistrationConfig::registration_timeout) after the first
    /// request); `None` before the first [`poll_transmit`](Registration::poll_transmit). A
    /// transport bounds its connection setup by it.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.gives_up_at
    }

    /// The connection that carried (or was to carry) the outstanding request was lost at `now`:
    /// closed by the service, reset, or it could not be opened again. DPS keeps no sessions and
    /// a poll is idempotent, so the same request is scheduled again (the poll with the operation
    /// id kept from the register reply, or the register) after the "equal jitter" back-off of
    /// [`handle_response`](Registration::handle_response): uniform in `(b/2, b]` for
    /// `b = default_retry_after × 2^n`, n = connections lost since the last reply, capped at
    /// 300 s. Losses do not count against
    /// [`max_throttle_retries`](RegistrationConfig::max_throttle_retries); the registration
    /// deadline bounds them. Does nothing when no request is outstanding (a connection dropped
    /// during a retry-after wait is simply opened again for the next request) or when the
    /// registration is finished; fails with [`FailureKind::Timeout`] once the deadline has
    /// passed.
    pub fn handle_connection_lost(&mut self, now: Timestamp) {
        if !matches!(self.state, State::Finished) && self.gives_up_at.is_some_and(|end| now >= end) {
            return self.give_up();
        }
        let State::AwaitingReply { request, .. } = &self.state else {
            return;
        };
        let request = request.clone();
        let b = backoff(self.config.default_retry_after, self.connection_losses);
        let wait = b - self.random_part_of(b / 2);
        self.connection_losses = self.connection_losses.saturating_add(1);
        self.state = State::Ready { request, not_before: Some(now + wait) };
    }

    /// Feeds the reply to the request last returned by
    /// [`poll_transmit`](Registration::poll_transmit).
    ///
    /// A 429, 408 or 5xx reply schedules the same request again, after a wait with jitter so
    /// that devices throttled together do not come back together:
    /// - with a `retry-after` (clamped to 1–300 s), after that wait plus a random extra of up to
    ///   half of it; never sooner than the service asked;
    /// - without one, after "equal jitter" of the exponential back-off: uniform in `(b/2, b]`
    ///   for `b = default_retry_after × 2^n` (n = resends so far, capped at 300 s).
    ///
    /// If the random source fails, the wait is the one without jitter (`retry-after`, or `b`).
    pub fn handle_response(&mut self, now: Timestamp, response: ServiceResponse) {
        let request = match &self.state {
            State::AwaitingReply { request, .. } => request.clone(),
            _ => return,
        };
        self.connection_losses = 0;
        match response.status {
            200..=299 => self.on_success_status(now, request, &response),
            // 408 (the service timed the request out) is transient like 5xx; statuses of 600 and
            // above are not HTTP and fall to the protocol failure below.
            408 | 429 | 500..=599 => self.on_transient(now, request, &response),
            401 => {
                let mut failure = error_reply(FailureKind::Unauthorized, &response);
                if is_tpm_challenge(&response.body) {
                    failure.message =
                        "the service sent a TPM challenge; TPM attestation is not supported by this client yet".to_owned();
                }
                self.finish(RegistrationEvent::Failed(failure));
            }
            404 => self.fail_with(error_reply(FailureKind::NotFound, &response)),
            400 => self.fail_with(error_reply(FailureKind::BadRequest, &response)),
            402..=499 => self.fail_with(error_reply(FailureKind::Service, &response)),
            _ => self.fail_with(RegistrationFailure {
                kind: FailureKind::Protocol,
                status: Some(response.status),
                error_code: None,
                message: format!("unexpected HTTP status {} from the service", response.status),
            }),
        }
    }

    /// When the machine next needs [`handle_timeout`](Registration::handle_timeout) (the reply
    /// deadline) or can send again (the end of a retry-after wait). `None` when finished or when
    /// a request is due immediately.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let next = match &self.state {
            State::Ready { not_before, .. } => *not_before,
            State::AwaitingReply { deadline, .. } => Some(*deadline),
            State::Finished => return None,
        };
        match (next, self.gives_up_at) {
            (Some(next), Some(end)) => Some(next.min(end)),
            (next, _) => next,
        }
    }

    /// Advances timers: fails with [`FailureKind::Timeout`] when the reply deadline has passed.
    /// A finished retry-after wait needs nothing here; the next
    /// [`poll_transmit`](Registration::poll_transmit) sends.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if !matches!(self.state, State::Finished) && self.gives_up_at.is_some_and(|end| now >= end) {
            return self.give_up();
        }
        if let State::AwaitingReply { request, deadline } = &self.state {
            if now >= *deadline {
                let what = match request {
                    Request::Register => "register",
                    Request::Poll(_) => "operation status",
                };
                let message = format!(
                    "no reply to the {what} request within {} s",
                    self.config.request_timeout.as_secs_f64()
                );
                self.time_out(message);
            }
        }
    }

    /// The outcome, once: after it is taken this returns `None`.
    pub fn poll_event(&mut self) -> Option<RegistrationEvent> {
        self.event.take()
    }

    /// Whether the outcome is decided (it may still be waiting in
    /// [`poll_event`](Registration::poll_event)).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    fn on_success_status(&mut self, now: Timestamp, request: Request, response: &ServiceResponse) {
        let reply = match parse_reply(&response.body) {
            Ok(reply) => reply,
            Err(message) => return self.fail_with(protocol(response.status, message)),
        };
        self.throttle_retries = 0;
        match reply.status {
            RegistrationStatus::Assigning => {
                // The C SDK keeps the first operation id; poll replies may carry none (spec §10.2).
                let operation_id = match request {
                    Request::Poll(id) => id,
                    Request::Register => match reply.operation_id.as_deref().map(OperationId::new) {
                        Some(Ok(id)) => id,
                        Some(Err(e)) => {
                            return self.fail_with(protocol(response.status, format!("register reply: {e}")));
                        }
                        None => {
                            let message = "register reply `assigning` has no operationId".to_owned();
                            return self.fail_with(protocol(response.status, message));
                        }
                    },
                };
                let wait = response.retry_after.map_or(self.config.default_retry_after, clamp_retry_after);
                self.state =
                    State::Ready { request: Request::Poll(operation_id), not_before: Some(now + wait) };
            }
            RegistrationStatus::Assigned => {
                let registration_id = self.config.registration_id.as_str();
                let event = match assignment(reply.registration_state, registration_id) {
                    Ok(a) => RegistrationEvent::Assigned(a),
                    Err(message) => RegistrationEvent::Failed(protocol(response.status, message)),
                };
                self.finish(event);
            }
            RegistrationStatus::Failed | RegistrationStatus::Disabled => {
                let raw = reply.registration_state.unwrap_or(Value::Null);
                let message = raw
                    .get("errorMessage")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("registration status is {}", reply.status), str::to_owned);
                self.fail_with(RegistrationFailure {
                    kind: FailureKind::Failed,
                    status: Some(response.status),
                    error_code: raw.get("errorCode").and_then(error_code_value),
                    message,
                });
            }
            other => {
                self.fail_with(protocol(response.status, format!("unexpected registration status {other:?}")))
            }
        }
    }

    fn on_transient(&mut self, now: Timestamp, request: Request, response: &ServiceResponse) {
        if self.config.max_throttle_retries.is_some_and(|max| self.throttle_retries >= max) {
            let (error_code, message) = error_details(&response.body);
            let mut message_text = format!(
                "gave up after {} retries; last reply HTTP {}",
                self.throttle_retries, response.status
            );
            if let Some(message) = message {
                message_text = format!("{message_text}: {message}");
            }
            return self.fail_with(RegistrationFailure {
                kind: FailureKind::Throttled,
                status: Some(response.status),
                error_code,
                message: message_text,
            });
        }
        let wait = match response.retry_after {
            Some(asked) => {
                let asked = clamp_retry_after(asked);
                asked + self.random_part_of(asked / 2)
            }
            None => {
                let b = backoff(self.config.default_retry_after, self.throttle_retries);
                b - self.random_part_of(b / 2)
            }
        };
        self.throttle_retries = self.throttle_retries.saturating_add(1);
        self.state = State::Ready { request, not_before: Some(now + wait) };
    }

    /// A random duration in `[0, span)` from the provider's randomness (`span × r / 2^64` for a
    /// random 64-bit `r`); zero when the random source fails.
    fn random_part_of(&self, span: Duration) -> Duration {
        let mut bytes = [0u8; 8];
        if self.crypto.fill_random(&mut bytes).is_err() {
            return Duration::ZERO;
        }
        let nanos = span.as_nanos().saturating_mul(u128::from(u64::from_le_bytes(bytes))) >> 64;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Ends the registration that ran out of [`RegistrationConfig::registration_timeout`].
    fn give_up(&mut self) {
        let message = format!(
            "no outcome within {} s (the registration timeout)",
            self.config.registration_timeout.as_secs_f64()
        );
        self.time_out(message);
    }

    /// Ends the registration with [`FailureKind::Timeout`] (no reply from the service).
    fn time_out(&mut self, message: String) {
        self.fail_with(RegistrationFailure {
            kind: FailureKind::Timeout,
            status: None,
            error_code: None,
            message,
        });
    }

    fn fail_with(&mut self, failure: RegistrationFailure) {
        self.finish(RegistrationEvent::Failed(failure));
    }

    fn finish(&mut self, event: RegistrationEvent) {
        self.state = State::Finished;
        self.token = None;
        self.event = Some(event);
    }

    /// The SAS token for a request sent at `now`, signed again once a quarter of its lifetime is
    /// left so that a token never expires while a request is in flight.
    fn authorization(&mut self, now: Timestamp) -> Option<String> {
        let DeviceCredential::SymmetricKey(key) = &self.config.credential else {
            return None;
        };
        let ttl = self.config.token_ttl;
        let fresh = self.token.as_ref().is_some_and(|t| {
            let remaining = t.expiry.saturating_since(now);
            now >= t.issued && remaining > ttl / 4 && remaining > self.config.request_timeout
        });
        if !fresh {
            let sr = encode_resource(&registration_resource(
                self.config.id_scope.as_str(),
                self.config.registration_id.as_str(),
            ));
            let expiry = (now + ttl).unix_secs();
            let sig = self.crypto.hmac_sha256(key, string_to_sign(&sr, expiry).as_bytes());
            let token = SasToken::build(&sr, expiry, Some(REGISTRATION_KEY_NAME), &sig);
            self.token = Some(CachedToken {
                value: token.to_string(),
                issued: now,
                expiry: Timestamp::from_unix_secs(expiry),
            });
        }
        self.token.as_ref().map(|t| t.value.clone())
    }
}

/// A 2xx reply as the device reads it: a lenient view of `RegistrationOperationStatus`.
///
/// The server writes replies with the strict, closed types of [`zerotouch_proto::device`],
/// whose JSON must stay byte-exact; the device reads strictly only what decides the outcome
/// (`status`, plus `operationId` when a register reply asks to poll and `assignedHub` +
/// `deviceId` when assigned, checked where they are used) and everything else leniently. A service newer than this client
/// may send a `substatus` it does not know yet, or an `x509` detail with fewer fields: such a
/// member is left out of [`Assignment::state`] (and kept in [`Assignment::raw_state`]) instead
/// of failing a registration that succeeded. A lenient view here, rather than an
/// `Other(String)` variant in the closed proto enums, keeps those enums `Copy` and exhaustive
/// for the server, which never needs an unknown value.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    /// The operation status: the one member whose unknown values fail the reply.
    status: RegistrationStatus,
    /// Needed on register replies only: polls keep the id they polled (spec §10.2).
    #[serde(default)]
    operation_id: Option<String>,
    /// Read member by member by [`lenient_state`].
    #[serde(default)]
    registration_state: Option<Value>,
}

/// Parses a 2xx body as a [`Reply`].
fn parse_reply(body: &[u8]) -> Result<Reply, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("reply body is not JSON: {e}"))?;
    serde_json::from_value(value)
        .map_err(|e| format!("reply body is not a registration operation status: {e}"))
}

/// The members of a `registrationState` that parse as [`DeviceRegistrationResult`] members,
/// each tried on its own, so that one unreadable member drops only itself. A missing or
/// unreadable `registrationId` is the device's own. `None` when the state is not an object.
fn lenient_state(raw: &Value, registration_id: &str) -> Option<DeviceRegistrationResult> {
    let members = raw.as_object()?;
    if let Ok(state) = serde_json::from_value(raw.clone()) {
        return Some(state);
    }
    let id = match members.get("registrationId") {
        Some(Value::String(id)) => id.as_str(),
        _ => registration_id,
    };
    let alone = |name: &String, value: &Value| {
        let mut map = Map::new();
        map.insert("registrationId".to_owned(), Value::String(id.to_owned()));
        map.insert(name.clone(), value.clone());
        Value::Object(map)
    };
    let mut kept = Map::new();
    for (name, value) in members.iter().filter(|(name, _)| name.as_str() != "registrationId") {
        if serde_json::from_value::<DeviceRegistrationResult>(alone(name, value)).is_ok() {
            kept.insert(name.clone(), value.clone());
        }
    }
    kept.insert("registrationId".to_owned(), Value::String(id.to_owned()));
    // Members that parse one by one parse together; the fallback is for safety only.
    Some(serde_json::from_value(Value::Object(kept)).unwrap_or_else(|_| DeviceRegistrationResult {
        registration_id: id.into(),
        ..DeviceRegistrationResult::default()
    }))
}

fn assignment(raw_state: Option<Value>, registration_id: &str) -> Result<Assignment, String> {
    let raw_state = raw_state.unwrap_or(Value::Null);
    let state =
        lenient_state(&raw_state, registration_id).ok_or("assigned reply has no registrationState")?;
    let assigned_hub =
        state.assigned_hub.clone().filter(|s| !s.is_empty()).ok_or("assigned reply has no assignedHub")?;
    let device_id =
        state.device_id.clone().filter(|s| !s.is_empty()).ok_or("assigned reply has no deviceId")?;
    Ok(Assignment {
        assigned_hub: assigned_hub.into(),
        device_id: device_id.into(),
        substatus: state.substatus,
        payload: state.payload.clone(),
        tpm_authentication_key: state.tpm.as_ref().map(|t| t.authentication_key.clone()),
        state,
        raw_state,
    })
}

/// A failure from an error reply, with the code and message of its body when it has them.
fn error_reply(kind: FailureKind, response: &ServiceResponse) -> RegistrationFailure {
    let (error_code, message) = error_details(&response.body);
    let message = message.unwrap_or_else(|| format!("HTTP {}", response.status));
    RegistrationFailure { kind, status: Some(response.status), error_code, message }
}

/// The error code and message of an error body, as far as it has them.
fn error_details(body: &[u8]) -> (Option<u32>, Option<String>) {
    match serde_json::from_slice::<ErrorDetails>(body) {
        Ok(details) => (Some(details.error_code), Some(details.message)),
        // Tolerate bodies that miss `trackingId` or spell the message `errorMessage`.
        Err(_) => match serde_json::from_slice::<Value>(body) {
            Ok(v) => (
                v.get("errorCode").and_then(error_code_value),
                v.get("message").or_else(|| v.get("errorMessage")).and_then(Value::as_str).map(str::to_owned),
            ),
            Err(_) => (None, None),
        },
    }
}

/// An `errorCode` given as a JSON number or as a string of digits (`"401002"`).
fn error_code_value(code: &Value) -> Option<u32> {
    match code {
        Value::Number(n) => n.as_u64().and_then(|c| u32::try_from(c).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn is_tpm_challenge(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|v| v.get("authenticationKey").is_some_and(Value::is_string))
}

fn protocol(status: u16, message: String) -> RegistrationFailure {
    RegistrationFailure { kind: FailureKind::Protocol, status: Some(status), error_code: None, message }
}

fn clamp_retry_after(d: Duration) -> Duration {
    d.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER)
}

/// `base × 2^attempt`, capped at [`MAX_RETRY_AFTER`].
fn backoff(base: Duration, attempt: u32) -> Duration {
    base.checked_mul(1u32 << attempt.min(16)).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(2);
        assert_eq!(backoff(base, 0), Duration::from_secs(2));
        assert_eq!(backoff(base, 3), Duration::from_secs(16));
        assert_eq!(backoff(base, 10), MAX_RETRY_AFTER);
        assert_eq!(backoff(base, u32::MAX), MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_is_clamped_to_one_to_three_hundred_seconds() {
        assert_eq!(clamp_retry_after(Duration::ZERO), MIN_RETRY_AFTER);
        assert_eq!(clamp_retry_after(Duration::from_secs(3)), Duration::from_secs(3));
        assert_eq!(clamp_retry_after(Duration::from_secs(3600)), MAX_RETRY_AFTER);
    }

    #[test]
    fn credential_debug_hides_the_key() {
        let c = DeviceCredential::symmetric_key_base64("c2VjcmV0LWtleS1ieXRlcw==").unwrap();
        assert_eq!(format!("{c:?}"), "SymmetricKey(<redacted>)");
        assert!(DeviceCredential::symmetric_key_base64("c2VjcmV0LWtleS1ieXRlcw").is_ok());
        assert!(DeviceCredential::symmetric_key_base64("not base64!").is_err());
        assert!(DeviceCredential::symmetric_key_base64("").is_err());
    }

    #[test]
    fn retry_after_values_parse_as_whole_seconds() {
        assert_eq!(ServiceResponse::parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(ServiceResponse::parse_retry_after(" 10 "), Some(Duration::from_secs(10)));
        assert_eq!(ServiceResponse::parse_retry_after("soon"), None);
    }
}
