//! HTTPS device API of DPS (register, operation status, status lookup) and, on the same listener, MQTT over WebSockets.

mod handler;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
}

/// Accepts HTTPS device connections on `listener` until `shutdown` completes, then stops
/// accepting and gives open connections [`Limits::shutdown_grace`] to finish what they are doing.
///
/// Serves HTTP/1.1 and HTTP/2 (hyper-util's auto builder). Routes: `PUT
/// /{idScope}/registrations/{registrationId}/register`, `GET
/// /{idScope}/registrations/{registrationId}/operations/{operationId}`, `POST
/// /{idScope}/registrations/{registrationId}` (all with `?api-version=…`), and `GET
/// /$iothub/websocket` upgraded to a WebSocket with subprotocol `mqtt` that carries the DPS MQTT
/// protocol. The credential is the `Authorization: SharedAccessSignature …` header, else the
/// client certificate chain of the TLS handshake (requested, not required, by `tls`).
/// [`Limits::connect_timeout`] bounds the TLS handshake and then the wait for the first request,
/// [`Limits::idle_timeout`] a request's headers and the wait between requests,
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
    let handle = move |tls, client_chain, _deadline, stop: watch::Receiver<bool>| {
        let (service, limits) = (Arc::clone(&service), shared.clone());
        async move {
            let mut stop_conn = stop.clone();
            let conn = Arc::new(Connection { service, limits, client_chain, stop });
            serve_connection(tls, conn, &mut stop_conn).await;
        }
    };
    let span = |peer| tracing::info_span!("https", %peer);
    serve_listener("https", listener, tls, &limits, shutdown, span, handle).await;
}

/// Serves HTTP on one TLS stream until the client closes it, it idles out, or shutdown asks
/// hyper to finish the request in progress and close.
async fn serve_connection<IO>(io: IO, conn: Arc<Connection>, stop: &mut watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (first_request, idle) = (conn.limits.connect_timeout, conn.limits.idle_timeout);
    let in_flight = u32::try_from(conn.limits.max_in_flight_per_connection).unwrap_or(u32::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // An idle keep-alive connection and a client slow to send its headers are cut off alike.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(idle);
    // HTTP/1.1 answers one request at a time; HTTP/2 gets the same per-connection cap as MQTT.
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(in_flight);
    let service = hyper::service::service_fn(move |req| handler::handle(Arc::clone(&conn), req));
    // hyper's header timeout starts only once the auto builder has read enough to tell HTTP/1
    // from HTTP/2; a client that sends nothing at all after the handshake would hold its
    // connection for ever. It gets the CONNECT deadline of MQTT devices to start a request.
    let io = FirstByte { io, seen: Arc::new(AtomicBool::new(false)) };
    let seen = Arc::clone(&io.seen);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        res = served.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "https connection ended with an error");
            }
        }
        () = async {
            tokio::time::sleep(first_request).await;
            if seen.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::debug!("https connection sent no request in time; closed");
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

/// A connection's stream that notes when its first byte comes in.
struct FirstByte<IO> {
    io: IO,
    seen: Arc<AtomicBool>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstByte<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.seen.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstByte<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
