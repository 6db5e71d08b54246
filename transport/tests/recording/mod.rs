//! Engine service wrappers for endpoint tests: one records what each register request carried,
//! one answers late (a store that hangs).

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use zerotouch_engine::provisioner::{OperationStatusRequest, RegisterRequest, Response, StatusLookupRequest};
use zerotouch_proto::Timestamp;
use zerotouch_transport::service::DpsService;

/// The api-versions of the register requests, in arrival order.
pub type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// Passes every call on to `inner`, keeping each register request's api-version.
pub struct ApiVersions {
    pub inner: Arc<dyn DpsService>,
    pub seen: Seen,
}

impl ApiVersions {
    /// A wrapper for `Server::start_wrapped` and the list it fills.
    pub fn recorder() -> (impl FnOnce(Arc<dyn DpsService>) -> Arc<dyn DpsService>, Seen) {
        let seen = Seen::default();
        let list = Arc::clone(&seen);
        (move |inner| Arc::new(ApiVersions { inner, seen }) as Arc<dyn DpsService>, list)
    }
}

impl DpsService for ApiVersions {
    fn register(&self, now: Timestamp, req: RegisterRequest) -> Response {
        self.seen.lock().unwrap().push(req.api_version.clone());
        self.inner.register(now, req)
    }

    fn operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response {
        self.inner.operation_status(now, req)
    }

    fn operation_status_in_memory(&self, now: Timestamp, req: &OperationStatusRequest) -> Option<Response> {
        self.inner.operation_status_in_memory(now, req)
    }

    fn status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response {
        self.inner.status_lookup(now, req)
    }

    fn accepts_credential(&self, now: Timestamp, req: StatusLookupRequest) -> bool {
        self.inner.accepts_credential(now, req)
    }
}

/// An engine that answers every register and poll `delay` late (a store that hangs); status
/// lookups, and so MQTT's CONNECT check, are not delayed.
pub struct SlowService {
    pub inner: Arc<dyn DpsService>,
    pub delay: std::time::Duration,
}

impl SlowService {
    /// A wrapper for `Server::start_wrapped` delaying calls by `delay`.
    pub fn by(delay: std::time::Duration) -> impl FnOnce(Arc<dyn DpsService>) -> Arc<dyn DpsService> {
        move |inner| Arc::new(SlowService { inner, delay }) as Arc<dyn DpsService>
    }
}

impl DpsService for SlowService {
    fn register(&self, now: Timestamp, req: RegisterRequest) -> Response {
        std::thread::sleep(self.delay);
        self.inner.register(now, req)
    }

    fn operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response {
        std::thread::sleep(self.delay);
        self.inner.operation_status(now, req)
    }

    fn status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response {
        self.inner.status_lookup(now, req)
    }
}
