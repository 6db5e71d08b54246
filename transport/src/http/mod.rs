//! HTTPS device API of DPS (register, operation status, status lookup) and, on the same listener, MQTT over WebSockets.

mod handler;

use std::future::Future;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits::Limits;
use crate::service::DpsService;
use crate::tls::serve_listener;

#[cfg(feature = "ws")]
pub(crate) use handler::error_reply;
pub use handler::WEBSOCKET_PATH;

/// What every request of one connection needs: the shared service and limits, the client
/// certificate chain of the TLS handshake, and the shutdown signal (for WebSocket bridges, which
/// outlive the HTTP exchange that opened them).
pub(crate) struct Connection {
    pub(crate) service: Arc<dyn DpsService>,
    pub(crate) limits: Limits,
    pub(crate) client_chain: Vec<Vec<u8>>,
    #[cfg_attr(not(feature = "ws"), allow(dead_code))]
    pub(crate) stop: watch::Receiver<bool>,
    /// The connection's slot of [`Limits::max_connections`]: an upgrade to a WebSocket takes
    /// it along, since the MQTT session outlives the HTTP connection it came from.
    #[cfg_attr(not(feature = "ws"), allow(dead_code))]
    pub(crate) slot: std::sync::Mutex<Option<crate::limits::AdmissionPermit>>,
}

/// Accepts HTTPS device connections on `listener` until `shutdown` completes, then stops
/// accepting and gives open connections [`Limits::shutdown_grace`] to finish what they are doing.
///
/// Serves HTTP/1.1 (1.0 too); not HTTP/2, which no device SDK speaks to DPS. Routes: `PUT
/// /{idScope}/registrations/{registrationId}/register`, `GET
/// /{idScope}/registrations/{registrationId}/operations/{operationId}`, `POST
/// /{idScope}/registrations/{registrationId}` (all with `?api-version=…`), and `GET
/// /$iothub/websocket` upgraded to a WebSocket with subprotocol `mqtt` that carries the DPS MQTT
/// protocol. The credential is the `Authorization: SharedAccessSignature …` header, else the
/// client certificate chain of the TLS handshake (requested, not required, by `tls`).
/// [`Limits::connect_timeout`] bounds the TLS handshake, [`Limits::request_timeout`] the wait for
/// each request's headers (from the handshake, then from each reply) and then for its body,
/// [`Limits::max_body_size`] every request
/// body (413 beyond it), [`Limits::max_concurrent_requests`] the engine calls (429 beyond it).
pub async fn serve_https<F>(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: Arc<dyn DpsService>,
    limits: Limits,
    shutdown: F,
) where
    F: Future<Output = ()> + Send,
{
    let shared = limits.clone();
    let handle = move |tls, client_chain, _deadline, stop: watch::Receiver<bool>, slot| {
        let (service, limits) = (Arc::clone(&service), shared.clone());
        async move {
            let mut stop_conn = stop.clone();
            let slot = std::sync::Mutex::new(Some(slot));
            let conn = Arc::new(Connection { service, limits, client_chain, stop, slot });
            serve_connection(tls, conn, &mut stop_conn).await;
        }
    };
    let span = |peer| tracing::info_span!("https", %peer);
    // HTTP/1.1 is what this listener speaks: a client that offers only other protocols (h2, or
    // another service's) is refused at the handshake instead of being answered in the wrong one.
    let mut tls = Arc::unwrap_or_clone(tls);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    serve_listener("https", listener, Arc::new(tls), &limits, shutdown, span, handle).await;
}

/// hyper's read buffer per connection, headers included.
const MAX_HEADER_BUFFER: usize = 16 * 1024;

/// Serves HTTP on one TLS stream until the client closes it, it idles out, or shutdown asks
/// hyper to finish the request in progress and close.
async fn serve_connection<IO>(io: IO, conn: Arc<Connection>, stop: &mut watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    // hyper's header timer runs from the moment it waits for a request: a client that sends
    // nothing, dribbles its headers, or idles between requests is cut off alike. (The body has
    // its own deadline, in the handler.)
    builder.timer(TokioTimer::new()).header_read_timeout(conn.limits.request_timeout);
    // A device's headers (a SAS token is under 1 KiB) fit many times over; hyper's default
    // (~400 KiB a connection) would let a client pin gigabytes across `max_connections`. Larger
    // headers are answered 431. Bodies stream through it in chunks (their limit is their own).
    builder.max_buf_size(MAX_HEADER_BUFFER);
    let service = hyper::service::service_fn(move |req| handler::handle(Arc::clone(&conn), req));
    let served = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        res = served.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "https connection ended with an error");
            }
        }
        () = async {
            let _ = stop.wait_for(|s| *s).await;
        } => {
            served.as_mut().graceful_shutdown();
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "https connection ended with an error during shutdown");
            }
        }
    }
}
