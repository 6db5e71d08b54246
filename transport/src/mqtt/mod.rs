//! The DPS device API over MQTT 3.1.1: a TLS listener and the per-connection protocol (also used by the WebSocket bridge).
//!
//! Packets are framed with rumqttc's `mqttbytes::v4` codec; topics and usernames with
//! `zerotouch_proto::mqtt`. Every request goes to the [`DpsService`] on a blocking thread (except
//! a poll the engine answers from memory, answered on the connection's task) and its answer is
//! published on `$dps/registrations/res/{status}/?$rid=…`.
//!
//! CONNECT outcomes (spec §2.1): protocol level other than 4 → return code 1; missing or
//! malformed username → 4; client id other than the username's registration id → 2; no
//! password and no client certificate, or a SAS token the engine refuses (bad signature,
//! expired, wrong `sr`) → 5; admission full while checking the token → 3. A client certificate
//! is judged by the register request instead, which answers 401 with the engine's details.
//! Sessions are never kept (CONNACK session-present is always 0), and replies go to the
//! requesting connection even without a SUBSCRIBE, because Python never re-subscribes. A
//! connection holds its client id once a request of it was answered without error (which proves
//! its credential): a later one with the same id that gets that far closes it (MQTT 3.1.1
//! §3.1.4-2; see [`crate::limits::ClientIds`]).

mod connection;

use std::future::Future;
use std::sync::Arc;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument;

use crate::limits::Limits;
use crate::service::DpsService;
use crate::tls::serve_listener;

/// Accepts MQTT-over-TLS device connections on `listener` until `shutdown` completes, then stops
/// accepting and gives open connections [`Limits::shutdown_grace`] to finish the requests they
/// are processing (their replies are still sent) before closing them. A device whose last reply
/// was `202 assigning` may still poll within the grace and hear its result; idle connections
/// are closed at once.
///
/// Each connection gets [`Limits::connect_timeout`] for the TLS handshake plus CONNECT together.
pub async fn serve_mqtt<F>(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: Arc<dyn DpsService>,
    limits: Limits,
    shutdown: F,
) where
    F: Future<Output = ()> + Send,
{
    let shared = limits.clone();
    let handle = move |tls, chain, deadline, stop, slot| {
        let (service, limits) = (Arc::clone(&service), shared.clone());
        async move {
            let _slot = slot;
            connection::run(tls, chain, service, &limits, deadline, Some(stop)).await;
        }
    };
    let span = |peer| tracing::info_span!("mqtt", %peer, registration_id = tracing::field::Empty);
    serve_listener("mqtt", listener, tls, &limits, shutdown, span, handle).await;
}

/// Runs the DPS MQTT protocol on one already-established byte stream (TLS, or a WebSocket
/// carrying MQTT) until the client disconnects or a limit cuts it off.
///
/// `client_chain` is the client certificate chain from the TLS handshake (leaf first, DER; empty
/// without one). The CONNECT must arrive within [`Limits::connect_timeout`] of this call.
pub async fn run_mqtt_connection<IO>(
    io: IO,
    client_chain: Vec<Vec<u8>>,
    service: Arc<dyn DpsService>,
    limits: &Limits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    run_mqtt_session(io, client_chain, service, limits, None).await;
}

/// [`run_mqtt_connection`] for a session the server stops: once `stop` says so, the session
/// drains as an MQTT/TLS connection does (an idle device is closed at once, a device awaiting
/// its poll is answered first).
pub(crate) async fn run_mqtt_session<IO>(
    io: IO,
    client_chain: Vec<Vec<u8>>,
    service: Arc<dyn DpsService>,
    limits: &Limits,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let deadline = Instant::now() + limits.connect_timeout;
    let span = tracing::info_span!("mqtt", registration_id = tracing::field::Empty);
    connection::run(io, client_chain, service, limits, deadline, stop).instrument(span).await;
}
