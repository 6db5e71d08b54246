//! One device connection: CONNECT, then SUBSCRIBE / PUBLISH / PINGREQ until DISCONNECT or a limit cuts it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::provisioner::{OperationStatusRequest, RegisterRequest, Response, StatusLookupRequest};
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::http::is_known_api_version;
use zerotouch_proto::mqtt::{ConnectUsername, DeviceRequest, ResponseTopic, SUBSCRIBE_FILTER};

use crate::limits::{Limits, CLIENT_LOG};
use crate::service::{endpoint_error, internal_error, now, throttled, DpsService};

/// Why the server closed a connection without a DISCONNECT from the client.
type Cut = String;

/// Checks the flags of the packet at the front of `bytes`, as far as it has arrived, where the
/// codec does not: the fixed header's flags that MQTT 3.1.1 §2.2.2 fixes for each packet type
/// (a receiver must close the connection on others) and CONNECT's reserved flag (§3.1.2.3).
fn check_flags(bytes: &[u8]) -> Result<(), Cut> {
    let Some(&first) = bytes.first() else { return Ok(()) };
    let (kind, flags) = (first >> 4, first & 0x0F);
    let required = match kind {
        // PUBLISH carries DUP, QoS and RETAIN there (QoS 3 the codec refuses).
        3 => None,
        // PUBREL, SUBSCRIBE, UNSUBSCRIBE.
        6 | 8 | 10 => Some(0b0010),
        _ => Some(0),
    };
    if required.is_some_and(|required| flags != required) {
        return Err(format!("packet type {kind} with header flags {flags:#06b} (MQTT 3.1.1 §2.2.2)"));
    }
    if kind == 1 {
        // After the remaining length (1 to 4 bytes): the protocol name (length-prefixed), the
        // level, then the connect flags.
        let Some(length_bytes) = bytes.iter().skip(1).take(4).position(|b| b & 0x80 == 0) else {
            return Ok(());
        };
        let name_at = 2 + length_bytes;
        let Some(name) = bytes.get(name_at..name_at + 2) else { return Ok(()) };
        let flags_at = name_at + 2 + usize::from(u16::from_be_bytes([name[0], name[1]])) + 1;
        if bytes.get(flags_at).is_some_and(|f| f & 1 != 0) {
            return Err("CONNECT with its reserved flag set (MQTT 3.1.1 §3.1.2.3)".to_owned());
        }
    }
    Ok(())
}

/// A request of the connection being answered by the engine: its `rid` and the reply.
type InFlight = Pin<Box<dyn Future<Output = (String, Response)> + Send>>;

/// What CONNECT established.
struct Session {
    id_scope: String,
    registration_id: String,
    credential: Credential,
    keep_alive: u16,
    /// The username's api-version.
    api_version: String,
    /// Whether this server knows `api_version`. When it does not, every request is answered
    /// 400, as HTTPS answers such a request (the CONNECT itself is accepted, so the device hears
    /// why).
    api_version_known: bool,
}

/// The byte stream with its read and write buffers.
struct Wire<IO> {
    io: IO,
    inbound: BytesMut,
    outbound: BytesMut,
    max_packet_size: usize,
    write_timeout: Duration,
    /// The protocol level of a CONNECT this codec cannot read (MQTT 5 is level 5).
    unsupported_level: Option<u8>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire<IO> {
    /// The next packet, `None` at end of stream. Cancel-safe: bytes already read stay in
    /// `inbound`, so it can sit in a `select!` beside the request completions.
    async fn read(&mut self) -> Result<Option<Packet>, Cut> {
        loop {
            check_flags(&self.inbound)?;
            match Packet::read(&mut self.inbound, self.max_packet_size) {
                Ok(packet) => return Ok(Some(packet)),
                Err(CodecError::InsufficientBytes(missing)) => {
                    self.inbound.reserve(missing.max(256));
                    let n =
                        self.io.read_buf(&mut self.inbound).await.map_err(|e| format!("read failed: {e}"))?;
                    if n == 0 {
                        return if self.inbound.is_empty() {
                            Ok(None)
                        } else {
                            Err("stream ended inside a packet".to_owned())
                        };
                    }
                }
                Err(CodecError::PayloadSizeLimitExceeded(size)) => {
                    return Err(format!(
                        "packet of {size} bytes exceeds the limit of {}",
                        self.max_packet_size
                    ))
                }
                Err(CodecError::InvalidProtocolLevel(level)) => {
                    self.unsupported_level = Some(level);
                    return Err(format!("unsupported MQTT protocol level {level}"));
                }
                Err(e) => return Err(format!("malformed packet: {e}")),
            }
        }
    }

    /// Sends `packet` and anything queued before it, in one write.
    async fn send(&mut self, packet: Packet) -> Result<(), Cut> {
        self.queue(packet)?;
        self.flush().await
    }

    /// Encodes `packet` behind what is already queued, without writing it yet.
    fn queue(&mut self, packet: Packet) -> Result<(), Cut> {
        packet.write(&mut self.outbound, usize::MAX).map_err(|e| format!("cannot encode reply: {e}"))?;
        Ok(())
    }

    fn has_queued(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Writes the queued packets (one TLS record, one system call when they fit).
    async fn flush(&mut self) -> Result<(), Cut> {
        if self.outbound.is_empty() {
            return Ok(());
        }
        let io = &mut self.io;
        let bytes = &self.outbound;
        let written = match timeout(self.write_timeout, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err("client stopped reading".to_owned()),
        };
        self.outbound.clear();
        written
    }
}

/// On shutdown, how long a device that has just had its final answer may still send its
/// UNSUBSCRIBE and DISCONNECT before the connection is closed.
const DRAIN_LINGER: Duration = Duration::from_secs(2);

/// How long the PUBACK of a request may wait to go out together with the request's reply.
/// A device cannot tell the difference (the PUBACK still comes first), and sending both in one
/// write saves a TLS record, a system call and a wake-up of the device per request; a slower
/// request gets its PUBACK alone after this delay.
const PUBACK_HOLD: Duration = Duration::from_millis(100);

/// Runs one connection to its end and closes the stream.
pub(super) async fn run<IO>(
    io: IO,
    client_chain: Vec<Vec<u8>>,
    service: Arc<dyn DpsService>,
    limits: &Limits,
    connect_deadline: Instant,
    stop: Option<watch::Receiver<bool>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut wire = Wire {
        io,
        inbound: BytesMut::with_capacity(1024),
        outbound: BytesMut::with_capacity(1024),
        max_packet_size: limits.max_packet_size,
        write_timeout: limits.connect_timeout.max(Duration::from_secs(5)),
        unsupported_level: None,
    };
    match serve(&mut wire, client_chain, service, limits, connect_deadline, stop).await {
        Ok(()) => tracing::debug!("connection closed"),
        Err(reason) if CLIENT_LOG.allows() => tracing::info!(%reason, "connection cut"),
        Err(_) => {}
    }
    // Best effort: a TLS close_notify for clients that wait for it.
    let _ = timeout(Duration::from_secs(1), wire.io.shutdown()).await;
}

async fn serve<IO>(
    wire: &mut Wire<IO>,
    client_chain: Vec<Vec<u8>>,
    service: Arc<dyn DpsService>,
    limits: &Limits,
    connect_deadline: Instant,
    mut stop: Option<watch::Receiver<bool>>,
) -> Result<(), Cut>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    // A device that has not sent its CONNECT when the server stops is not waited for.
    let first = tokio::select! {
        read = timeout_at(connect_deadline, wire.read()) => {
            read.map_err(|_| "no CONNECT before the deadline".to_owned())?
        }
        () = stopped(&mut stop) => return Ok(()),
    };
    if let (Err(reason), Some(level)) = (&first, wire.unsupported_level) {
        // MQTT 3.1.1 §3.1.2.2: answer an unsupported level with return code 1, then close
        // (MQTT 5 clients read this as "server speaks an older version").
        if CLIENT_LOG.allows() {
            tracing::info!(%reason, level, "CONNECT refused");
        }
        wire.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false))).await?;
        return Ok(());
    }
    let first = first?;
    let connect = match first {
        Some(Packet::Connect(connect)) => connect,
        Some(other) => return Err(format!("expected CONNECT, got {:?}", packet_name(&other))),
        None => return Ok(()),
    };
    let session = match authenticate(connect, client_chain, &service, limits).await {
        Ok(session) => session,
        Err(code) => {
            if CLIENT_LOG.allows() {
                tracing::info!(?code, "CONNECT refused");
            }
            wire.send(Packet::ConnAck(ConnAck::new(code, false))).await?;
            return Ok(());
        }
    };
    // DPS keeps no sessions, whatever CleanSession says (spec §2.1).
    wire.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;

    let idle = limits.idle_timeout_for(session.keep_alive);
    // CONNECT proves little: a certificate is judged by the first request, and a token is let
    // in for more than a proven signature (an unknown scope, an enrollment of another kind: the
    // register reply explains those). Until a request is answered without error (and again
    // after a 401), the connection is unproven: it is closed at `unproven_until` (the CONNECT
    // deadline; after a reply that asks it to come back later, that wait plus the deadline)
    // and nothing it sends (pings) buys it more, so garbage credentials hold no slot.
    let mut accepted = false;
    let mut unproven_until = Instant::now() + limits.connect_timeout;
    // The client id is this connection's once the engine has answered one of its requests
    // without error, which only an authenticated device gets: a SAS token is accepted at
    // CONNECT for more than a proven signature (an enrollment of another attestation type, an
    // unknown scope: register answers those), so CONNECT alone proves nothing and takes over
    // nothing. A newer connection that claims the id closes this one.
    let taken_over = Arc::new(Notify::new());
    let claim_id = || limits.mqtt_clients.claim(&session.id_scope, &session.registration_id, &taken_over);
    let mut claim = None;
    let mut idle_deadline = (Instant::now() + idle).min(unproven_until);
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    // Replies go out even before (or without) a SUBSCRIBE: Python never re-subscribes after a
    // reconnect (spec §2.4), so the requesting connection is where the answer belongs.
    let mut reply_qos = QoS::AtLeastOnce;
    let mut last_pkid = 0u16;
    let mut draining = false;
    // Shutdown asked while the device was told to poll (its last reply was `202 assigning`), or
    // while a request is in progress whose reply may tell it so: it may still poll, within the
    // listener's grace, and the connection drains once its answer is final.
    let mut stop_asked = false;
    let mut awaiting_poll = false;
    // Once such a device has its final answer: how long it still gets to unsubscribe and
    // disconnect itself (the Node SDK reports nothing when the connection drops first).
    let mut linger: Option<Instant> = None;
    // When queued PUBACKs must go out even if their requests are still being processed.
    let mut flush_by: Option<Instant> = None;
    // One timer each for the whole connection, moved rather than made anew on every pass of
    // the loop (each new one is an insert into and a removal from the runtime's timer wheel).
    // The idle timer is moved lazily: a read only pushes `idle_deadline`, and the timer, when
    // it fires early, catches up with it.
    let idle_timer = sleep_until(idle_deadline);
    let flush_timer = sleep_until(idle_deadline);
    let linger_timer = sleep_until(idle_deadline);
    let stop_signal = stopped(&mut stop);
    let newer_connection = taken_over.notified();
    tokio::pin!(idle_timer, flush_timer, linger_timer, stop_signal, newer_connection);
    // What a reply sent to the device changes for its connection.
    macro_rules! after_reply {
        ($response:expr) => {
            let status = $response.status;
            awaiting_poll = status == 202;
            if status == 401 {
                // Its credential will not do: the device gets the CONNECT deadline to read its
                // answer and leave (closing at once loses the answer for some SDKs), no more.
                accepted = false;
                unproven_until = Instant::now() + limits.connect_timeout;
                idle_deadline = unproven_until;
                // The timer may be set later (a keep-alive's deadline): bring it forward.
                idle_timer.as_mut().reset(idle_deadline);
            } else if status < 400 && !accepted {
                accepted = true;
                idle_deadline = Instant::now() + idle;
            } else if !accepted {
                // Any other refusal before anything was proven: the device gets the CONNECT
                // deadline from now to read it, however late it came (a slow store). Throttled,
                // timed out or a server error, it is to come back on this connection, as the
                // SDKs do: after `retry-after`, or their own wait when there is none.
                let mut back = Instant::now() + limits.connect_timeout;
                if status == 429 || status == 408 || status >= 500 {
                    back +=
                        $response.retry_after.map_or(SDK_RETRY_WAIT, |s| Duration::from_secs(u64::from(s)));
                }
                unproven_until = unproven_until.max(back);
                idle_deadline = (Instant::now() + idle).min(unproven_until);
            }
            if status < 400 && claim.is_none() {
                claim = Some(claim_id());
            }
            if stop_asked && !awaiting_poll && in_flight.is_empty() && linger.is_none() {
                linger = Some(Instant::now() + DRAIN_LINGER);
                linger_timer.as_mut().reset(Instant::now() + DRAIN_LINGER);
            }
        };
    }
    loop {
        if draining && in_flight.is_empty() {
            return wire.flush().await;
        }
        let can_read = !draining && in_flight.len() < limits.max_in_flight_per_connection.max(1);
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (rid, response) = done;
                log_refusal(&response);
                last_pkid = next_pkid(last_pkid);
                wire.send(Packet::Publish(reply(&rid, &response, reply_qos, last_pkid))).await?;
                flush_by = None;
                after_reply!(response);
            }
            () = &mut flush_timer, if flush_by.is_some() => {
                wire.flush().await?;
                flush_by = None;
            }
            read = wire.read(), if can_read => {
                idle_deadline = if accepted { Instant::now() + idle } else { (Instant::now() + idle).min(unproven_until) };
                let Some(packet) = read? else { return wire.flush().await };
                match packet {
                    Packet::Publish(publish) => {
                        if let Some((rid, response)) =
                            on_publish(wire, publish, &session, &service, limits, &mut in_flight)?
                        {
                            log_refusal(&response);
                            last_pkid = next_pkid(last_pkid);
                            wire.send(Packet::Publish(reply(&rid, &response, reply_qos, last_pkid))).await?;
                            flush_by = None;
                            after_reply!(response);
                        } else if wire.has_queued() && flush_by.is_none() {
                            let deadline = Instant::now() + PUBACK_HOLD;
                            flush_by = Some(deadline);
                            flush_timer.as_mut().reset(deadline);
                        }
                    }
                    Packet::Subscribe(subscribe) => {
                        let mut codes = Vec::with_capacity(subscribe.filters.len());
                        for filter in &subscribe.filters {
                            if filter.path == SUBSCRIBE_FILTER {
                                // DPS grants QoS 2 as 1 (spec §2.1).
                                reply_qos = if filter.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                                codes.push(SubscribeReasonCode::Success(reply_qos));
                            } else {
                                codes.push(SubscribeReasonCode::Failure);
                            }
                        }
                        wire.send(Packet::SubAck(SubAck::new(subscribe.pkid, codes))).await?;
                    }
                    Packet::Unsubscribe(unsubscribe) => {
                        wire.send(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))).await?;
                    }
                    Packet::PingReq => wire.send(Packet::PingResp).await?,
                    Packet::Disconnect => return wire.flush().await,
                    // Acks of our QoS 1 replies: nothing is retransmitted, sessions are not kept.
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {}
                    other => return Err(format!("unexpected {} from the client", packet_name(&other))),
                }
            }
            () = &mut idle_timer, if !draining && in_flight.is_empty() => {
                if Instant::now() >= idle_deadline {
                    if !accepted && idle_deadline >= unproven_until {
                        return Err("no request answered without error before the CONNECT deadline".to_owned());
                    }
                    return Err(format!("silent for {idle:?}"));
                }
                idle_timer.as_mut().reset(idle_deadline);
            }
            () = &mut linger_timer, if linger.is_some() && !draining => {
                draining = true;
            }
            () = &mut newer_connection => {
                return Err("a newer connection with the same client id took over (MQTT 3.1.1 §3.1.4-2)".to_owned());
            }
            () = &mut stop_signal, if !draining && !stop_asked => {
                stop_asked = true;
                draining = !awaiting_poll && in_flight.is_empty();
            }
        }
    }
}

/// Checks a CONNECT: protocol level, username grammar, client id, and a credential (a SAS
/// token is verified now so a bad one gets return code 5; a certificate chain is judged by the
/// register request, which answers 401 with details).
async fn authenticate(
    connect: Connect,
    client_chain: Vec<Vec<u8>>,
    service: &Arc<dyn DpsService>,
    limits: &Limits,
) -> Result<Session, ConnectReturnCode> {
    if connect.protocol != Protocol::V4 {
        return Err(ConnectReturnCode::RefusedProtocolVersion);
    }
    let login = connect.login.ok_or(ConnectReturnCode::BadUserNamePassword)?;
    let username = ConnectUsername::parse(&login.username).map_err(|_| {
        // Not the parser's message: it quotes the username, which a client that swapped its
        // username and password fills with its SAS token.
        tracing::debug!(
            length = login.username.len(),
            "bad CONNECT username (not {{idScope}}/registrations/{{registrationId}}/api-version=…)"
        );
        ConnectReturnCode::BadUserNamePassword
    })?;
    let registration_id = username.registration_id.as_str().to_owned();
    tracing::Span::current().record("registration_id", registration_id.as_str());
    if !connect.client_id.eq_ignore_ascii_case(&registration_id) {
        return Err(ConnectReturnCode::BadClientId);
    }
    let id_scope = username.id_scope.to_string();
    let credential = if !login.password.is_empty() {
        Credential::Sas(login.password)
    } else if !client_chain.is_empty() {
        Credential::X509(client_chain)
    } else {
        return Err(ConnectReturnCode::NotAuthorized);
    };
    if let Credential::Sas(_) = &credential {
        let permit = limits.admit().ok_or(ConnectReturnCode::ServiceUnavailable)?;
        let service = Arc::clone(service);
        let req = StatusLookupRequest {
            id_scope: id_scope.clone(),
            registration_id: registration_id.clone(),
            body: None,
            credential: credential.clone(),
        };
        let accepted = limits
            .run_engine(permit, move || service.accepts_credential(now(), req))
            .await
            .ok_or(ConnectReturnCode::ServiceUnavailable)?;
        if !accepted {
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    let api_version_known = is_known_api_version(&username.api_version);
    Ok(Session {
        id_scope,
        registration_id,
        credential,
        keep_alive: connect.keep_alive,
        api_version: username.api_version,
        api_version_known,
    })
}

/// Queues the acknowledgement of a publish and starts its request; returns a reply to send at
/// once when the request is answered without the engine (throttled, oversized, unparsable).
fn on_publish<IO>(
    wire: &mut Wire<IO>,
    publish: Publish,
    session: &Session,
    service: &Arc<dyn DpsService>,
    limits: &Limits,
    in_flight: &mut FuturesUnordered<InFlight>,
) -> Result<Option<(String, Response)>, Cut>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    if publish.topic.contains(['+', '#']) {
        return Err("a PUBLISH topic with a wildcard (MQTT 3.1.1 §3.3.2.1)".to_owned());
    }
    match publish.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => wire.queue(Packet::PubAck(PubAck::new(publish.pkid)))?,
        QoS::ExactlyOnce => return Err("QoS 2 publishes are not supported".to_owned()),
    }
    let request = match DeviceRequest::parse_topic(&publish.topic) {
        Ok(request) => request,
        Err(_) => {
            // The topic is the client's (up to a packet's size): its start is enough to see.
            tracing::debug!(
                topic = clip(&publish.topic, 128),
                length = publish.topic.len(),
                "publish to an unknown topic ignored"
            );
            return Ok(None);
        }
    };
    let rid = request.rid().to_owned();
    if publish.payload.len() > limits.max_body_size {
        return Ok(Some((rid, endpoint_error(413, "Request body too large", None))));
    }
    if !session.api_version_known {
        let message = format!("The api-version {:?} is not supported.", session.api_version);
        return Ok(Some((rid, endpoint_error(400, &message, None))));
    }
    let (id_scope, registration_id) = (session.id_scope.clone(), session.registration_id.clone());
    let credential = session.credential.clone();
    let request = match request {
        DeviceRequest::PollStatus { operation_id, .. } => {
            let req = OperationStatusRequest {
                id_scope,
                registration_id,
                operation_id: operation_id.to_string(),
                credential,
            };
            // Most polls ask for an operation the engine holds in memory: answered here, they
            // skip the hand-off to a blocking thread and back. Only with a SAS token, whose
            // check is a few HMACs and short reads; a certificate chain's verification stays
            // off the runtime's workers.
            if let Credential::Sas(_) = &req.credential {
                if let Some(response) = service.operation_status_in_memory(now(), &req) {
                    return Ok(Some((rid, response)));
                }
            }
            Request::Poll(req)
        }
        DeviceRequest::Register { .. } => Request::Register { id_scope, registration_id, credential },
    };
    let Some(permit) = limits.admit() else {
        return Ok(Some((rid, throttled(limits.throttle_retry_after_secs))));
    };
    let service = Arc::clone(service);
    let task = match request {
        Request::Register { id_scope, registration_id, credential } => {
            // Decoded before the device is authenticated (a certificate is judged by the engine):
            // the body holds strings and the payload's text, never a tree of it (see
            // `DeviceRegistration`), so it costs about its size.
            let body: DeviceRegistration = if publish.payload.trim_ascii().is_empty() {
                // The embedded C SDK's samples register with no payload at all, as DPS accepts
                // over MQTT: the registration id is the connection's, and there is no custom
                // payload.
                DeviceRegistration {
                    payload: None,
                    registration_id: registration_id.clone(),
                    tpm: None,
                    csr: None,
                }
            } else {
                match serde_json::from_slice(&publish.payload) {
                    Ok(body) => body,
                    Err(e) => {
                        let message = format!("The request body is not a DeviceRegistration: {e}");
                        return Ok(Some((rid, endpoint_error(400, &message, None))));
                    }
                }
            };
            let api_version = Some(session.api_version.clone());
            let req = RegisterRequest { id_scope, registration_id, body, credential, api_version };
            let limits = limits.clone();
            Box::pin(async move {
                let response = limits.run_engine(permit, move || service.register(now(), req)).await;
                (rid, response.unwrap_or_else(internal_error))
            }) as InFlight
        }
        Request::Poll(req) => {
            let limits = limits.clone();
            Box::pin(async move {
                let response = limits.run_engine(permit, move || service.operation_status(now(), req)).await;
                (rid, response.unwrap_or_else(internal_error))
            }) as InFlight
        }
    };
    in_flight.push(task);
    Ok(None)
}

/// A device request bound for the engine.
enum Request {
    Register { id_scope: String, registration_id: String, credential: Credential },
    Poll(OperationStatusRequest),
}

fn reply(rid: &str, response: &Response, qos: QoS, pkid: u16) -> Publish {
    let topic =
        ResponseTopic { status: response.status, rid: rid.to_owned(), retry_after: response.retry_after };
    let mut publish = Publish::new(topic.to_string(), qos, response.body_json());
    if qos != QoS::AtMostOnce {
        publish.pkid = pkid;
    }
    publish
}

/// Packet ids of our replies: 1..=65535, wrapping (0 is not a valid id).
fn next_pkid(last: u16) -> u16 {
    last.checked_add(1).unwrap_or(1)
}

/// Logs a refused request at info, as a refused CONNECT is: what an operator looks for (within
/// the budget of lines clients may cause).
fn log_refusal(response: &Response) {
    if response.status >= 400 && CLIENT_LOG.allows() {
        tracing::info!(status = response.status, error_code = response.error_code(), "request refused");
    }
}

/// Completes once the server asks connections to finish; never without a stop signal.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                // The server dropped the sender without stopping: nothing will ever stop us.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// How long an unproven connection may wait before it re-sends after a refusal that carries no
/// `retry-after` (a 5xx): the SDKs wait 1–2 s (spec §1.7), our client a jittered back-off from
/// 2 s; the CONNECT deadline comes on top.
const SDK_RETRY_WAIT: Duration = Duration::from_secs(5);

/// At most `max` bytes of the start of `text`, cut at a character boundary.
fn clip(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod clip_tests {
    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(super::clip("abc", 128), "abc");
        assert_eq!(super::clip("abcdef", 3), "abc");
        assert_eq!(super::clip("aé", 2), "a", "é is two bytes");
        assert_eq!(super::clip("", 4), "");
    }
}
