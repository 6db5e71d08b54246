//! One HTTPS request: route, body limit, credential, engine call on the blocking pool, DPS reply.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST,
    LOCATION,
};
use hyper::{Method, Request, Response, StatusCode};
use ring::rand::{SecureRandom as _, SystemRandom};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::provisioner::{
    self, OperationStatusRequest, RegisterRequest, ResponseBody, StatusLookupRequest,
};
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::http::{is_known_api_version, Route, RouteMatch, CONTENT_TYPE_JSON};
use zerotouch_proto::ids::uuid_from_bytes;
use zerotouch_proto::{ProtoError, WireError};

use super::Connection;
use crate::limits::CLIENT_LOG;
use crate::service::{endpoint_error, internal_error, now, throttled};

/// Path of MQTT over WebSockets (the IoT Hub path, which DPS shares).
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";

/// The reply type of every request.
type Reply = Response<Body>;

/// Routes one request. Never fails: every problem becomes a DPS error reply.
pub(super) async fn handle(conn: Arc<Connection>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut reply = if is_websocket_path(&path) {
        #[cfg(feature = "ws")]
        let reply = crate::ws::upgrade(&conn, req).await;
        #[cfg(not(feature = "ws"))]
        let reply = error_reply(404, 404000, "MQTT over WebSockets is not enabled on this server.", None);
        reply
    } else {
        device_api(&conn, req).await
    };
    // As real DPS sends it (spec §1.2): this host is HTTPS only.
    reply.headers_mut().insert(
        HeaderName::from_static("strict-transport-security"),
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    let status = reply.status().as_u16();
    // Refusals are what an operator looks for (as MQTT's refused CONNECTs); successes are many.
    // Clients choose how many refusals there are: the lines they cause have a budget.
    if status >= 400 && CLIENT_LOG.allows() {
        let error_code = reply.headers().get("x-ms-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
        tracing::info!(%method, path, status, error_code, "https request refused");
    } else if status < 400 {
        tracing::debug!(%method, path, status, "https request");
    }
    Ok(reply)
}

/// Whether `path` is [`WEBSOCKET_PATH`], `$` possibly percent-encoded.
fn is_websocket_path(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    path.eq_ignore_ascii_case(WEBSOCKET_PATH) || path.eq_ignore_ascii_case("/%24iothub/websocket")
}

async fn device_api(conn: &Connection, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let matched = match RouteMatch::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query()) {
        Ok(m) if m.route.is_device_api() => m,
        Ok(_) => return not_found(parts.uri.path()),
        Err(ProtoError::InvalidRoute(_)) => {
            return match allowed_method(parts.uri.path()) {
                Some(allowed) => method_not_allowed(&parts.method, allowed),
                None => not_found(parts.uri.path()),
            };
        }
        Err(e) => return wire_error_reply(&e.to_wire()),
    };
    if !is_known_api_version(&matched.api_version) {
        return error_reply(
            400,
            400000,
            &format!("The api-version {:?} is not supported.", matched.api_version),
            None,
        );
    }
    let max = conn.limits.max_body_size;
    let bytes = match read_body(&parts.headers, body, max, conn.limits.request_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(max),
        Err(BodyError::TooSlow) => {
            let mut reply = error_reply(408, 408000, "The request body did not arrive in time.", None);
            // The rest of the body may still come: the connection cannot carry another request.
            reply.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            return reply;
        }
        Err(BodyError::Unreadable) => {
            return error_reply(400, 400000, "The request body could not be read.", None);
        }
    };
    let credential = credential(&parts.headers, &conn.client_chain);
    let location = match &matched.route {
        Route::Register { .. } => register_location(&parts, &matched.route),
        _ => None,
    };
    let call = match matched.route {
        Route::Register { id_scope, registration_id } => {
            // Decoded before the device is authenticated: the body holds strings and the
            // payload's text, never a tree of it (see `DeviceRegistration`), so it costs about
            // its size; the engine parses the payload once the credential is good.
            let body = match serde_json::from_slice::<DeviceRegistration>(&bytes) {
                Ok(b) => b,
                Err(e) => return malformed_json(&e),
            };
            let req = RegisterRequest {
                id_scope: id_scope.as_str().to_owned(),
                registration_id: registration_id.as_str().to_owned(),
                body,
                credential,
                api_version: Some(matched.api_version.clone()),
            };
            EngineCall::Register(req)
        }
        Route::OperationStatus { id_scope, registration_id, operation_id } => {
            // The body is ignored: Node sends `{}`, the C SDK nothing.
            EngineCall::OperationStatus(OperationStatusRequest {
                id_scope: id_scope.as_str().to_owned(),
                registration_id: registration_id.as_str().to_owned(),
                operation_id,
                credential,
            })
        }
        Route::RegistrationStatusLookup { id_scope, registration_id } => {
            // A body is optional; when sent it is a DeviceRegistration, checked by the engine.
            let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                match serde_json::from_slice::<DeviceRegistration>(&bytes) {
                    Ok(b) => Some(b),
                    Err(e) => return malformed_json(&e),
                }
            };
            EngineCall::StatusLookup(StatusLookupRequest {
                id_scope: id_scope.as_str().to_owned(),
                registration_id: registration_id.as_str().to_owned(),
                body,
                credential,
            })
        }
        _ => return not_found(parts.uri.path()),
    };
    let Some(permit) = conn.limits.admit() else {
        return engine_reply(&throttled(conn.limits.throttle_retry_after_secs));
    };
    let service = Arc::clone(&conn.service);
    let answered = conn
        .limits
        .run_engine(permit, move || match call {
            EngineCall::Register(r) => service.register(now(), r),
            EngineCall::OperationStatus(r) => service.operation_status(now(), r),
            EngineCall::StatusLookup(r) => service.status_lookup(now(), r),
        })
        .await;
    let response = answered.unwrap_or_else(internal_error);
    let mut reply = engine_reply(&response);
    if let (202, Some(location)) = (response.status, location) {
        reply.headers_mut().insert(LOCATION, location);
    }
    reply
}

/// The `Location` real DPS sends with a register's 202 (spec §1.2): the register URL, on the
/// host the client named. None without a host to name.
fn register_location(parts: &hyper::http::request::Parts, route: &Route) -> Option<HeaderValue> {
    let host = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))?;
    HeaderValue::from_str(&format!("https://{host}{}", route.path())).ok()
}

/// A decoded request on its way to the blocking pool.
enum EngineCall {
    Register(RegisterRequest),
    OperationStatus(OperationStatusRequest),
    StatusLookup(StatusLookupRequest),
}

/// The methods `path` does answer to, when it names a device API operation under another method.
fn allowed_method(path: &str) -> Option<&'static str> {
    ["PUT", "GET", "POST"].into_iter().find(|m| Route::parse(m, path).is_ok_and(|r| r.is_device_api()))
}

/// Why a request body was not read.
enum BodyError {
    /// More than the limit (413).
    TooLarge,
    /// The client broke off or sent a malformed body (400).
    Unreadable,
    /// Not all of it came within [`Limits::request_timeout`](crate::limits::Limits::request_timeout) (408).
    TooSlow,
}

/// Reads the whole body, refusing (413) more than `max` bytes before reading them when the
/// length is announced, and as soon as they arrive otherwise.
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, BodyError> {
    let announced =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let Ok(collected) = tokio::time::timeout(deadline, Limited::new(body, max).collect()).await else {
        return Err(BodyError::TooSlow);
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(e) => {
            tracing::debug!(error = %e, "request body could not be read");
            Err(BodyError::Unreadable)
        }
    }
}

fn malformed_json(e: &serde_json::Error) -> Reply {
    // serde's message names the position and the expected field, and may quote a value of the
    // wrong type: only back to the client that sent it, never into a log.
    error_reply(400, 400000, &format!("The request body is not a valid DeviceRegistration: {e}"), None)
}

/// The SAS token of the `Authorization` header when there is one, else the TLS client chain.
fn credential(headers: &HeaderMap, client_chain: &[Vec<u8>]) -> Credential {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let token = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
        if !token.is_empty() {
            return Credential::Sas(token);
        }
    }
    if client_chain.is_empty() {
        Credential::None
    } else {
        Credential::X509(client_chain.to_vec())
    }
}

/// The engine's reply as it goes on the wire: status, JSON body, `Retry-After`, and
/// `x-ms-error-code` on errors.
fn engine_reply(r: &provisioner::Response) -> Reply {
    let error_code = match &r.body {
        ResponseBody::Error(e) => Some(e.error_code),
        _ => None,
    };
    json_reply(r.status, r.body_json(), r.retry_after, error_code)
}

fn json_reply(status: u16, body: Vec<u8>, retry_after: Option<u32>, error_code: Option<u32>) -> Reply {
    let mut reply = Response::new(Body::from(body));
    *reply.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_JSON));
    // Header names are the proto constants (`Retry-After`, `x-ms-error-code`, `x-ms-request-id`)
    // in the lower case `HeaderName::from_static` requires.
    if let Some(secs) = retry_after {
        headers.insert(HeaderName::from_static("retry-after"), HeaderValue::from(secs));
    }
    if let Some(code) = error_code {
        headers.insert(HeaderName::from_static("x-ms-error-code"), HeaderValue::from(code));
    }
    if let Ok(id) = HeaderValue::from_str(&random_uuid()) {
        headers.insert(HeaderName::from_static("x-ms-request-id"), id);
    }
    reply
}

/// A reply in the DPS error body shape (`ProvisioningServiceErrorDetails`) for failures found
/// before the engine is asked; the same shape the MQTT endpoint sends ([`endpoint_error`]).
pub(crate) fn error_reply(status: u16, error_code: u32, message: &str, retry_after: Option<u32>) -> Reply {
    let mut response = endpoint_error(status, message, retry_after);
    if let ResponseBody::Error(e) = &mut response.body {
        e.error_code = error_code;
    }
    engine_reply(&response)
}

fn wire_error_reply(w: &WireError) -> Reply {
    error_reply(w.http_status, w.error_code, &w.message, None)
}

fn not_found(path: &str) -> Reply {
    error_reply(404, 404000, &format!("No DPS device operation at {path:?}."), None)
}

fn method_not_allowed(method: &Method, allowed: &'static str) -> Reply {
    let mut reply =
        error_reply(405, 405000, &format!("The method {method} is not allowed on this resource."), None);
    reply.headers_mut().insert(ALLOW, HeaderValue::from_static(allowed));
    reply
}

fn too_large(max: usize) -> Reply {
    error_reply(413, 413000, &format!("The request body is larger than {max} bytes."), None)
}

/// A random GUID for `x-ms-request-id`; a failed random source only costs uniqueness.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut bytes);
    uuid_from_bytes(&bytes)
}
