//! The DPS device API over MQTT 3.1.1: a TLS listener and the per-connection protocol (also used by the WebSocket bridge).
//!
//! Packets are framed with rumqttc's `mqttbytes::v4` codec; topics and usernames with
//! `zerotouch_proto::mqtt`. Every request goes to the [`DpsService`] on a blocking thread and its
//! answer is published on `$dps/registrations/res/{status}/?$rid=…`.
//!
//! CONNECT outcomes (spec §2.1): protocol level other than 4 → return code 1; missing or
//! malformed username → 4; client id other than the username's registration id → 2; no
//! password and no client certificate, or a SAS token the engine refuses (bad signature,
//! expired, wrong `sr`) → 5; admission full while checking the token → 3. A client certificate
//! is judged by the register request instead, which answers 401 with the engine's details.
//! Sessions are never kept (CONNACK session-present is always 0), and replies go to the
//! requesting connection even without a SUBSCRIBE, because Python never re-subscribes.

mod connection;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::limits::Limits;
use crate::service::DpsService;
use crate::tls::accept_by;

/// Accepts MQTT-over-TLS device connections on `listener` until `shutdown` completes, then stops
/// accepting and gives open connections [`Limits::shutdown_grace`] to finish the requests they
/// are processing (their replies are still sent) before closing them.
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
    let acceptor = TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "mqtt accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = limits.admit_connection(peer) else { continue };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let service = Arc::clone(&service);
                let limits = limits.clone();
                let stop = stop_rx.clone();
                let span = tracing::info_span!("mqtt", %peer, registration_id = tracing::field::Empty);
                connections.spawn(
                    async move {
                        let _slot = slot;
                        let deadline = Instant::now() + limits.connect_timeout;
                        let Some((tls, chain)) = accept_by(&acceptor, tcp, deadline).await else { return };
                        connection::run(tls, chain, service, &limits, deadline, Some(stop)).await;
                    }
                    .instrument(span),
                );
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(open = connections.len(), "mqtt shutdown grace over; closing remaining connections");
        connections.shutdown().await;
    }
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
    let deadline = Instant::now() + limits.connect_timeout;
    let span = tracing::info_span!("mqtt", registration_id = tracing::field::Empty);
    connection::run(io, client_chain, service, limits, deadline, None).instrument(span).await;
}
