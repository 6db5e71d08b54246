//! The contract between the device endpoints and the provisioning engine.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use zerotouch_engine::hub::{HubAction, HubError, HubRegistry};
use zerotouch_engine::hub_engine::EmbeddedHubs;
use zerotouch_engine::jobs::JobStore;
use zerotouch_engine::provisioner::{
    OperationStatusRequest, Provisioner, RegisterRequest, Response, ResponseBody, StatusLookupRequest,
};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::ProvisioningStore;
use zerotouch_engine::twin::TwinStore;
use zerotouch_proto::device::ErrorDetails;
use zerotouch_proto::Timestamp;

/// The DPS device API as every endpoint (MQTT, HTTPS, MQTT over WebSockets) calls it.
///
/// Methods block (stores may be databases): endpoints call them from
/// `tokio::task::spawn_blocking`, never on a runtime worker.
pub trait DpsService: Send + Sync + 'static {
    /// `PUT {idScope}/registrations/{id}/register` or the MQTT `iotdps-register` publish.
    fn register(&self, now: Timestamp, req: RegisterRequest) -> Response;
    /// The operation-status poll (`GET …/operations/{operationId}`, MQTT `iotdps-get-operationstatus`).
    fn operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response;
    /// The operation-status poll answered at once, without a blocking thread, when the engine
    /// holds the operation in memory; `None` means call [`DpsService::operation_status`].
    ///
    /// Unlike the other methods this one is called on the runtime's worker: it may only make the
    /// short reads of authentication (the default answers nothing).
    fn operation_status_in_memory(&self, now: Timestamp, req: &OperationStatusRequest) -> Option<Response> {
        let _ = (now, req);
        None
    }
    /// `POST {idScope}/registrations/{id}` (registration state lookup).
    fn status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response;

    /// Whether the credential in `req` authenticates its registration id, for endpoints that
    /// authenticate before any request (MQTT CONNECT answers a bad SAS token with return code 5).
    ///
    /// Only a bad token should count (spec §2.1): an unknown, disabled or mismatched enrollment
    /// still lets the device connect and learn the precise error from its register reply. The
    /// default asks [`DpsService::status_lookup`] and refuses on any 401, as a reply cannot tell
    /// the two apart; implementations that can (as [`EngineService`] does) override it.
    fn accepts_credential(&self, now: Timestamp, req: StatusLookupRequest) -> bool {
        self.status_lookup(now, req).status != 401
    }
}

/// An error reply decided by an endpoint rather than the engine (throttling, oversized or
/// unparsable input), in the DPS error body shape.
pub fn endpoint_error(status: u16, message: &str, retry_after: Option<u32>) -> Response {
    Response {
        status,
        retry_after,
        body: ResponseBody::Error(ErrorDetails {
            error_code: u32::from(status) * 1000,
            tracking_id: tracking_id(),
            message: message.to_owned(),
            timestamp_utc: Some(now()),
            // Real DPS sends `"info": null` (spec §1.6).
            info: Some(serde_json::Value::Null),
        }),
    }
}

/// The reply when the engine call failed or did not finish in time (the cause is logged where
/// it is known): 500 500000, as the engine's own internal errors.
pub fn internal_error() -> Response {
    endpoint_error(500, "Internal server error", None)
}

/// The reply when admission refuses a request: 429 with `retry-after` (errorCode 429001).
pub fn throttled(retry_after_secs: u32) -> Response {
    let mut reply = endpoint_error(429, "Too many requests", Some(retry_after_secs));
    if let ResponseBody::Error(e) = &mut reply.body {
        e.error_code = 429_001;
    }
    reply
}

/// A random GUID-shaped tracking id; empty if the system RNG fails (it only aids support).
fn tracking_id() -> String {
    let mut b = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return String::new();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// A [`DpsService`] over the engine's [`Provisioner`] and a [`HubRegistry`] shared by all
/// connections. The hub registry is locked while a registration's actions are applied, and
/// briefly when its store unit begins and ends.
pub struct EngineService<S, H> {
    provisioner: Provisioner<S>,
    hubs: Arc<Mutex<H>>,
}

impl<S, H> std::fmt::Debug for EngineService<S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineService").finish_non_exhaustive()
    }
}

impl<S: ProvisioningStore, H: HubRegistry + TimedHubs + Send> EngineService<S, H> {
    /// A service answering with `provisioner` and provisioning into `hubs`.
    pub fn new(provisioner: Provisioner<S>, hubs: Arc<Mutex<H>>) -> Self {
        Self { provisioner, hubs }
    }

    /// The provisioner.
    pub fn provisioner(&self) -> &Provisioner<S> {
        &self.provisioner
    }

    /// The hubs devices are provisioned into.
    pub fn hubs(&self) -> &Arc<Mutex<H>> {
        &self.hubs
    }
}

/// A hub registry that stamps what it writes with a time given before each action.
pub trait TimedHubs {
    /// Sets the time of the next actions.
    fn set_now(&mut self, now: Timestamp);
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> TimedHubs for EmbeddedHubs<I, T, J> {
    fn set_now(&mut self, now: Timestamp) {
        EmbeddedHubs::set_now(self, now);
    }
}

/// Locks the shared hubs for one action at a time, so registrations run in parallel except
/// while they write into the hub registry.
struct LockedHubs<'a, H> {
    hubs: &'a Mutex<H>,
    now: Timestamp,
}

impl<H: HubRegistry + TimedHubs> LockedHubs<'_, H> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, H>, HubError> {
        let mut hubs = self.hubs.lock().map_err(|_| HubError {
            code: 500_000,
            message: "The hub registry is unavailable after an earlier failure.".to_owned(),
        })?;
        hubs.set_now(self.now);
        Ok(hubs)
    }
}

impl<H: HubRegistry + TimedHubs> HubRegistry for LockedHubs<'_, H> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.lock()?.apply(action)
    }

    /// One lock for all the actions of a registration: released between two actions, the lock
    /// could be taken by a registration that then waits on rows this one's open transaction
    /// holds (PostgreSQL), while this one waits for the lock.
    fn apply_all(&mut self, actions: &[HubAction]) -> Result<(), HubError> {
        self.lock()?.apply_all(actions)
    }

    /// Locks only to begin: the registry tells this thread's unit from those of registrations
    /// running beside it, so the lock need not be held through the store's unit. A poisoned
    /// lock is taken anyway: a unit begun must end, or its thread's later events stay staged.
    fn begin_unit(&mut self) {
        self.hubs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.hubs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).end_unit(committed);
    }
}

impl<S, H> DpsService for EngineService<S, H>
where
    S: ProvisioningStore + 'static,
    H: HubRegistry + TimedHubs + Send + 'static,
{
    fn register(&self, now: Timestamp, req: RegisterRequest) -> Response {
        let mut hubs = LockedHubs { hubs: &self.hubs, now };
        self.provisioner.handle_register(now, req, &mut hubs)
    }

    fn operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response {
        self.provisioner.handle_operation_status(now, req)
    }

    fn operation_status_in_memory(&self, now: Timestamp, req: &OperationStatusRequest) -> Option<Response> {
        self.provisioner.operation_status_in_memory(now, req)
    }

    fn status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response {
        self.provisioner.handle_status_lookup(now, req)
    }

    /// Authentication alone, without the registration-record read of a status lookup. Only a
    /// bad token is refused: a disabled enrollment, or one of another attestation type, lets the
    /// device connect and hear 401 in its register reply (spec §2.1).
    fn accepts_credential(&self, now: Timestamp, req: StatusLookupRequest) -> bool {
        match self.provisioner.check_credential(now, &req.id_scope, &req.registration_id, &req.credential) {
            Err(zerotouch_engine::Error::Auth(e)) => !e.is_bad_token(),
            Ok(()) | Err(_) => true,
        }
    }
}

/// The wall clock as the engine's [`Timestamp`] (the transport is where time comes from).
pub fn now() -> Timestamp {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Timestamp::from_unix_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}
