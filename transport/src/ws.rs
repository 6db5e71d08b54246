//! MQTT over WebSockets: the upgrade at `/$iothub/websocket` and a byte stream over binary frames for the MQTT endpoint.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::FromRequestParts as _;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::{error_reply, Connection};
use crate::mqtt::run_mqtt_session;
use tracing::Instrument as _;

/// The WebSocket subprotocol of MQTT (Python and Node send `mqtt`, the C SDK `MQTT`).
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// A WebSocket as the byte stream MQTT expects: reads are the payloads of binary frames, in
/// order, so a packet may span frames and a frame may hold several packets; each write is sent
/// as one binary frame.
///
/// Text frames are read as their bytes (lenient: MQTT requires binary frames); pings are
/// answered by the WebSocket layer; a close frame or the end of the stream reads as end of file.
pub struct WsStream {
    socket: WebSocket,
    pending: Bytes,
    eof: bool,
}

impl std::fmt::Debug for WsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream").field("pending", &self.pending.len()).field("eof", &self.eof).finish()
    }
}

impl WsStream {
    /// Wraps an upgraded WebSocket.
    pub fn new(socket: WebSocket) -> Self {
        Self { socket, pending: Bytes::new(), eof: false }
    }
}

fn io_error(e: axum::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = buf.remaining().min(self.pending.len());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(text))) => {
                    self.pending = Bytes::copy_from_slice(text.as_str().as_bytes())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.socket)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_close(cx).map_err(io_error)
    }
}

/// Answers a request for the WebSocket path: `101 Switching Protocols` echoing the client's
/// spelling of `mqtt`, then the DPS MQTT protocol over the socket with the connection's TLS
/// client chain; 400 (DPS error body) when the client offers no `mqtt` subprotocol or the
/// upgrade headers are wrong.
pub(crate) async fn upgrade(conn: &Arc<Connection>, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, _body) = req.into_parts();
    let mut ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status().as_u16();
            return error_reply(status, u32::from(status) * 1000, &rejection.body_text(), None);
        }
    };
    let offered = ws
        .requested_protocols()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(MQTT_SUBPROTOCOL.as_bytes()))
        .cloned();
    let Some(protocol) = offered else {
        return error_reply(400, 400000, "MQTT over WebSockets needs the subprotocol \"mqtt\".", None);
    };
    ws.set_selected_protocol(protocol);
    let service = Arc::clone(&conn.service);
    let limits = conn.limits.clone();
    let client_chain = conn.client_chain.clone();
    let mut stop = conn.stop.clone();
    // The session counts against the connection limit until it ends, not until hyper lets go
    // of the HTTP connection after the 101.
    let slot = conn.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    // One message may carry a whole packet (or a few); the MQTT endpoint enforces the packet limit.
    let max_message = limits.max_packet_size.saturating_mul(2);
    // The upgraded connection runs in a task of its own: it keeps the HTTPS connection's span,
    // so its log lines name the peer.
    let span = tracing::Span::current();
    ws.max_message_size(max_message).max_frame_size(max_message).on_upgrade(move |socket| {
        async move {
            let _slot = slot;
            let grace = limits.shutdown_grace;
            // The session drains at shutdown like an MQTT/TLS connection; the grace is the
            // backstop for one that does not finish.
            let session_stop = Some(stop.clone());
            tokio::select! {
                () = run_mqtt_session(WsStream::new(socket), client_chain, service, &limits, session_stop) => {}
                () = async {
                    let _ = stop.wait_for(|s| *s).await;
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::info!("shutdown grace over; closing an MQTT over WebSockets connection");
                }
            }
        }
        .instrument(span)
    })
}
