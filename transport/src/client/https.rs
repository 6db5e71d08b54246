//! The HTTPS link of the device client: hyper's HTTP/1.1 client over tokio-rustls, one kept-alive
//! connection per registration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT as UA};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zerotouch_engine::registration::{RegistrationConfig, ServiceResponse, Transmit};
use zerotouch_proto::http::{Route, RouteMatch, CONTENT_TYPE_JSON};

use super::{
    closed_by_peer, permanent_connect_error, ClientError, Endpoint, Link, ProvisioningClient,
    CLOSED_BY_SERVICE, USER_AGENT,
};

/// Largest reply body accepted (DPS caps messages at 96 KB).
const MAX_BODY: usize = 1024 * 1024;

type Pending = Pin<Box<dyn Future<Output = Result<ServiceResponse, ClientError>> + Send>>;

/// The HTTPS side of one registration.
pub(crate) struct HttpsLink {
    config: RegistrationConfig,
    endpoint: Endpoint,
    tls: Arc<ClientConfig>,
    sender: Option<SendRequest<Full<Bytes>>>,
    pending: Option<Pending>,
}

impl HttpsLink {
    /// A link that connects at its first request.
    pub(crate) fn new(client: &ProvisioningClient) -> Self {
        Self {
            config: client.config.clone(),
            endpoint: client.endpoint.clone(),
            tls: client.tls.clone(),
            sender: None,
            pending: None,
        }
    }

    fn request(&self, transmit: &Transmit) -> Result<Request<Full<Bytes>>, ClientError> {
        let id_scope = self.config.id_scope.clone();
        let registration_id = self.config.registration_id.clone();
        let (route, method, body, authorization) = match transmit {
            Transmit::Register { body, authorization } => {
                let json = serde_json::to_vec(body)
                    .map_err(|e| ClientError::Connection(format!("cannot encode the register body: {e}")))?;
                (Route::Register { id_scope, registration_id }, Method::PUT, Bytes::from(json), authorization)
            }
            Transmit::PollStatus { operation_id, authorization } => (
                Route::OperationStatus { id_scope, registration_id, operation_id: operation_id.to_string() },
                Method::GET,
                Bytes::new(),
                authorization,
            ),
        };
        let target =
            RouteMatch { route, api_version: self.config.api_version.clone(), force_registration: false }
                .target();
        let host =
            if self.endpoint.port == 443 { self.endpoint.host.clone() } else { self.endpoint.authority() };
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .header(HOST, host)
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
            .header(UA, USER_AGENT);
        if let Some(token) = authorization {
            let mut value = HeaderValue::from_str(token)
                .map_err(|_| ClientError::Config("the SAS token is not a valid header value".into()))?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        builder.body(Full::new(body)).map_err(|e| ClientError::Config(format!("bad request: {e}")))
    }
}

async fn connect(
    endpoint: Endpoint,
    tls: Arc<ClientConfig>,
) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let authority = endpoint.authority();
    let fail =
        |what: &str, e: &dyn std::fmt::Display| ClientError::Connection(format!("{what} {authority}: {e}"));
    let server_name = ServerName::try_from(endpoint.host.clone())
        .map_err(|e| ClientError::Config(format!("bad server name {:?}: {e}", endpoint.host)))?;
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| permanent_connect_error(&e, &authority).unwrap_or_else(|| fail("TCP connect to", &e)))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(tls).connect(server_name, tcp).await.map_err(|e| {
        permanent_connect_error(&e, &authority).unwrap_or_else(|| fail("TLS handshake with", &e))
    })?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| fail("HTTP/1.1 handshake with", &e))?;
    // The connection task ends when the sender is dropped or the server closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

impl Link for HttpsLink {
    /// Keeps the kept-alive connection, or opens a new one when there is none or the server
    /// closed it.
    async fn connect(&mut self, _transmit: &Transmit) -> Result<(), ClientError> {
        let alive = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            self.sender = None;
            self.sender = Some(connect(self.endpoint.clone(), self.tls.clone()).await?);
        }
        Ok(())
    }

    fn connect_timed_out(&self, within: Duration) -> ClientError {
        ClientError::Connection(format!(
            "no TLS connection to {} within {} s",
            self.endpoint.authority(),
            within.as_secs_f64()
        ))
    }

    async fn send(&mut self, transmit: &Transmit) -> Result<(), ClientError> {
        let request = self.request(transmit)?;
        let sender =
            self.sender.as_mut().ok_or_else(|| ClientError::Connection("no HTTPS connection".into()))?;
        let response = sender.send_request(request);
        let authority = self.endpoint.authority();
        self.pending = Some(Box::pin(async move {
            let response = response.await.map_err(|e| {
                if e.is_incomplete_message() || e.is_closed() || closed_by_peer(&e) {
                    ClientError::Connection(format!(
                        "HTTP request to {authority} failed: {CLOSED_BY_SERVICE}"
                    ))
                } else {
                    ClientError::Connection(format!("HTTP request to {authority} failed: {e}"))
                }
            })?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(ServiceResponse::parse_retry_after);
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    ClientError::Connection(format!("reading the reply body from {authority} failed: {e}"))
                })?
                .to_bytes();
            Ok(ServiceResponse { status, retry_after, body: body.to_vec() })
        }));
        Ok(())
    }

    async fn recv(&mut self) -> Result<ServiceResponse, ClientError> {
        match self.pending.as_mut() {
            Some(pending) => {
                let reply = pending.await;
                self.pending = None;
                reply
            }
            None => std::future::pending().await,
        }
    }

    fn reset(&mut self) {
        self.sender = None;
        self.pending = None;
    }

    async fn close(self) {
        // Dropping the sender ends the connection task, which closes the TLS session.
    }
}
