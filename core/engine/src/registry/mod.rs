//! The IoT Hub identity registry: devices and modules with the If-Match rules of the SDKs.
//!
//! [`Registry`] implements create / get / update / delete of device and module identities
//! exactly as hub spec §1.3 describes them, list with `top` and paging, statistics, connection
//! state, the synchronous bulk call ([`Registry::bulk`]) and the streaming import/export jobs of
//! [`jobs`]. Every operation that creates or deletes an identity returns the typed
//! [`LifecycleEvent`]s a transport routes as `DeviceLifecycleEvents`.

pub mod bulk;
pub mod events;
pub mod heartbeat;
pub mod jobs;
pub mod store;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;
use zerotouch_proto::hub::{
    AuthenticationMechanism, AuthenticationType, ConnectionState, Device, DeviceCapabilities, DeviceStatus,
    ErrorEnvelope, ExportImportProperties, HubErrorCode, Module, RegistryStatistics, ServiceStatistics,
    SymmetricKey, X509Thumbprint,
};
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};

use crate::crypto::CryptoProvider;
use crate::error::{Error, StoreError};
use crate::store::{Page, PageRequest, Precondition};
use crate::twin::{apply_import_data, TwinDocument, TwinKey};

pub use bulk::{device_from_entry, export_device_line, export_module_line, module_from_entry};
pub use events::{
    ConnectionOperation, ConnectionStateEvent, LifecycleEvent, LifecycleOperation, ModuleEventStyle,
};
pub use heartbeat::{HeartbeatTracker, MissedHeartbeat};
pub use jobs::{ExportJob, ImportJob, ImportLineOutcome, JobCounts};
pub use store::{
    keep_device_activity, keep_module_activity, DeviceCounts, IdentityStore, MemoryIdentityStore,
};

/// Most identities one `GET /devices` returns, and the value `top` is clamped to.
pub const MAX_LIST_TOP: usize = 1000;
/// Most entries in one bulk `POST /devices`.
pub const MAX_BULK_ENTRIES: usize = 100;
/// Most modules on one device (current documentation).
pub const MAX_MODULES_PER_DEVICE: usize = 50;
/// Bytes of a generated symmetric key.
pub const GENERATED_KEY_LEN: usize = 32;
/// Shortest accepted decoded symmetric key.
pub const MIN_KEY_LEN: usize = 16;
/// Longest accepted decoded symmetric key.
pub const MAX_KEY_LEN: usize = 64;
/// Longest accepted `statusReason`.
pub const MAX_STATUS_REASON_LEN: usize = 128;

/// .NET ticks (100 ns) between 0001-01-01 and the Unix epoch.
const DOTNET_EPOCH_TICKS: i64 = 621_355_968_000_000_000;

/// Builds the engine error for an IoT Hub error name (mapped to the wire by
/// [`Error::to_wire`] through its numeric code).
pub fn hub_error(code: HubErrorCode, message: impl Into<String>) -> Error {
    Error::Hub { code: code.code(), message: message.into() }
}

/// The IoT Hub error name an engine error reports as (for `iothub-errorcode`, envelope A and
/// bulk results).
pub fn hub_error_code(error: &Error) -> HubErrorCode {
    match error {
        Error::Hub { code, .. } => HubErrorCode::from_code(*code).unwrap_or(HubErrorCode::ServerError),
        Error::BadRequest(_)
        | Error::Proto(_)
        | Error::InvalidRegistrationId(_)
        | Error::Store(StoreError::InvalidContinuation) => HubErrorCode::ArgumentInvalid,
        Error::Auth(_) => HubErrorCode::IotHubUnauthorizedAccess,
        Error::PreconditionFailed | Error::Store(StoreError::PreconditionFailed) => {
            HubErrorCode::PreconditionFailed
        }
        Error::Throttled { .. } | Error::Store(StoreError::Conflict(_)) => HubErrorCode::ThrottlingException,
        _ => HubErrorCode::ServerError,
    }
}

/// The registry error envelope (A) for an engine error: `ErrorCode:<Name>;<text>`.
pub fn error_envelope(error: &Error, exception_message: impl Into<String>) -> ErrorEnvelope {
    ErrorEnvelope::new(hub_error_code(error), &error_text(error), exception_message)
}

/// One connection of a device or module to the hub, named by the transport (a counter of the
/// connections it accepted will do; two connections alive at once must differ). The hub keeps one
/// connection per identity: a new one replaces the old (which the transport then closes, spec
/// §6.1), so the close of the replaced connection, reported after the new one's connect, must
/// not take the identity offline. [`Registry::handle_connected`] /
/// [`Registry::handle_disconnected`] and [`crate::jobs::MethodCalls`] tell them apart by this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl SessionId {
    /// The session the transport numbered `n`.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// The transport's number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Which identity a session belongs to: a device (`None`) or one of its modules.
type SessionKey = (DeviceId, Option<ModuleId>);

/// Stripes of the live-session table: a connection-state write holds its identity's stripe, so
/// writes of identities in other stripes go on meanwhile.
const SESSION_STRIPES: usize = 64;

/// Something an operation did, plus the lifecycle events it caused.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied<T> {
    /// The operation's result (the identity as stored, or as it was before deletion).
    pub value: T,
    /// Lifecycle notifications to route.
    pub events: Vec<LifecycleEvent>,
}

/// The twin side of import and export. The registry does not own twins; whoever does
/// implements this so the `updateTwin*` import modes and twin data on import lines reach it.
pub trait TwinSink {
    /// Merges `tags` and replaces the given sections of the twin of an identity, if `if_match`
    /// holds against the twin etag (`IfMatch::Any` ignores it). Sections that carry `$metadata`
    /// keep it; otherwise `$lastUpdated` becomes `now` (hub spec §3.2).
    ///
    /// # Errors
    /// [`Error::PreconditionFailed`] on a twin etag mismatch, a hub error for invalid twin data,
    /// store failures.
    fn update_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        tags: Option<&Value>,
        properties: Option<&ExportImportProperties>,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<(), Error>;

    /// Checks, before the identity of a create entry (or of a `createOrUpdate*` entry whose
    /// identity does not exist) is written, that the twin of the new identity would accept the
    /// entry's twin data, so an entry refused for its twin data creates nothing. The default
    /// applies the data to a fresh twin document ([`crate::twin::apply_import_data`]).
    ///
    /// # Errors
    /// As [`TwinSink::update_twin`] for invalid twin data.
    fn check_new_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        tags: Option<&Value>,
        properties: Option<&ExportImportProperties>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let key = match module_id {
            None => TwinKey::device(device_id.clone()),
            Some(m) => TwinKey::module(device_id.clone(), m.clone()),
        };
        apply_import_data(&mut TwinDocument::new(now), &key, now, tags, properties, false).map(|_| ())
    }

    /// The twin data an export line carries: twin etag, tags and properties. `None` exports the
    /// identity without twin data.
    ///
    /// # Errors
    /// Store failures.
    fn twin_for_export(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> Result<Option<(ETag, Option<Value>, ExportImportProperties)>, Error>;
}

/// Registry settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Hub name for notifications (`hubName`, `user-id`).
    pub hub_name: String,
    /// How module lifecycle events are labelled.
    pub module_events: ModuleEventStyle,
    /// Most modules per device.
    pub max_modules_per_device: usize,
}

impl RegistryConfig {
    /// Defaults for a hub called `hub_name`.
    pub fn new(hub_name: impl Into<String>) -> Self {
        Self {
            hub_name: hub_name.into(),
            module_events: ModuleEventStyle::default(),
            max_modules_per_device: MAX_MODULES_PER_DEVICE,
        }
    }
}

/// The identity registry over an [`IdentityStore`].
///
/// Operations take `now` and return the stored identity with the lifecycle events to route;
/// keys, generation ids and etags come from the [`CryptoProvider`] and `now`.
pub struct Registry<S> {
    store: S,
    crypto: Arc<dyn CryptoProvider>,
    config: RegistryConfig,
    last_sequence: Mutex<(i64, u64)>,
    /// Whether lifecycle events carry their twin body (see [`Registry::set_lifecycle_events`]).
    lifecycle_events: AtomicBool,
    /// The live session of each connected identity, in stripes by identity.
    sessions: Vec<Mutex<HashMap<SessionKey, SessionId>>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Registry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: IdentityStore> Registry<S> {
    /// A registry over `store`.
    pub fn new(store: S, crypto: Arc<dyn CryptoProvider>, config: RegistryConfig) -> Self {
        Self {
            store,
            crypto,
            config,
            last_sequence: Mutex::new((0, 0)),
            lifecycle_events: AtomicBool::new(true),
            sessions: (0..SESSION_STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    // ---- devices -------------------------------------------------------------------------

    /// Reads a device.
    ///
    /// # Errors
    /// `DeviceNotFound` (404), store failures.
    pub fn device(&self, id: &DeviceId) -> Result<Device, Error> {
        self.store.device(id)?.ok_or_else(|| device_not_found(id))
    }

    /// `PUT /devices/{id}`: no If-Match creates (`DeviceAlreadyExists` when present); `*`
    /// updates any existing device; an etag updates only that version (`PreconditionFailed`
    /// otherwise). Updating a missing device is `DeviceNotFound`.
    ///
    /// # Errors
    /// `ArgumentInvalid` when the body id differs from `path_id` or a field is invalid,
    /// `DeviceAlreadyExists`, `DeviceNotFound`, `PreconditionFailed`, store failures.
    pub fn put_device(
        &self,
        path_id: &DeviceId,
        body: Device,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Device>, Error> {
        if body.device_id != *path_id {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                format!(
                    "The device id in the body ({}) does not match the path ({path_id}).",
                    body.device_id
                ),
            ));
        }
        match if_match {
            IfMatch::Absent => self.create_device(body, now),
            _ => self.update_device(body, if_match, now).map(|value| Applied { value, events: Vec::new() }),
        }
    }

    /// Creates a device (`DeviceAlreadyExists` when present).
    ///
    /// # Errors
    /// `DeviceAlreadyExists`, invalid fields, store failures.
    pub fn create_device(&self, body: Device, now: Timestamp) -> Result<Applied<Device>, Error> {
        check_status_reason(body.status_reason.as_deref())?;
        let authentication = self.resolve_auth(body.authentication.as_ref(), None)?;
        let generation_id = generation_id(now);
        let capabilities = body.capabilities.unwrap_or_default();
        let device_scope = if capabilities.iot_edge {
            Some(edge_scope(&body.device_id, &generation_id))
        } else {
            body.device_scope.clone()
        };
        let parent_scopes = leaf_parent_scopes(&capabilities, &device_scope, body.parent_scopes);
        let device = Device {
            generation_id: Some(generation_id),
            etag: Some(self.new_etag(None)?),
            connection_state: ConnectionState::Disconnected,
            status: body.status,
            status_reason: body.status_reason,
            connection_state_updated_time: None,
            status_updated_time: None,
            last_activity_time: None,
            cloud_to_device_message_count: 0,
            authentication: Some(authentication),
            capabilities: Some(capabilities),
            device_scope,
            parent_scopes,
            device_id: body.device_id,
        };
        self.store.put_device(&device, &Precondition::MustNotExist).map_err(|e| match e {
            StoreError::AlreadyExists => hub_error(
                HubErrorCode::DeviceAlreadyExists,
                format!("A device with ID '{}' is already registered.", device.device_id),
            ),
            other => other.into(),
        })?;
        let events = vec![self.lifecycle(true, &device.device_id, None, now)];
        Ok(Applied { value: device, events })
    }

    /// Updates an existing device if `if_match` holds (`Absent` behaves like `*` here).
    /// Server-owned fields (generation id, connection state, times, message count) are kept;
    /// absent keys keep the stored keys; a status change sets `statusUpdatedTime`.
    ///
    /// The device returned carries the connection state and activity as read before the write:
    /// the store keeps its own, so a connection that changed them meanwhile is not undone, but
    /// it then shows in the next read, not in what this returns.
    ///
    /// # Errors
    /// `DeviceNotFound`, `PreconditionFailed`, invalid fields, store failures.
    pub fn update_device(&self, body: Device, if_match: &IfMatch, now: Timestamp) -> Result<Device, Error> {
        retry_lost_race(if_match, || self.update_device_once(body.clone(), if_match, now))
    }

    fn update_device_once(&self, body: Device, if_match: &IfMatch, now: Timestamp) -> Result<Device, Error> {
        check_status_reason(body.status_reason.as_deref())?;
        let existing = self.device(&body.device_id)?;
        let pre = update_precondition(if_match, existing.etag.as_ref())?;
        let authentication =
            self.resolve_auth(body.authentication.as_ref(), existing.authentication.as_ref())?;
        let was_edge = existing.capabilities.is_some_and(|c| c.iot_edge);
        let capabilities = body.capabilities.or(existing.capabilities).unwrap_or_default();
        let generation_id = existing.generation_id.clone().unwrap_or_else(|| generation_id(now));
        let device_scope = match (was_edge, capabilities.iot_edge) {
            // The scope of an edge device is immutable once assigned.
            (true, true) => existing.device_scope.clone(),
            (false, true) => Some(edge_scope(&body.device_id, &generation_id)),
            _ => body.device_scope.clone(),
        };
        let parent_scopes = leaf_parent_scopes(&capabilities, &device_scope, body.parent_scopes);
        let status_updated_time =
            if body.status != existing.status { Some(now) } else { existing.status_updated_time };
        let device = Device {
            device_id: body.device_id,
            generation_id: Some(generation_id),
            etag: Some(self.new_etag(existing.etag.as_ref())?),
            connection_state: existing.connection_state,
            status: body.status,
            status_reason: body.status_reason,
            connection_state_updated_time: existing.connection_state_updated_time,
            status_updated_time,
            last_activity_time: existing.last_activity_time,
            cloud_to_device_message_count: existing.cloud_to_device_message_count,
            authentication: Some(authentication),
            capabilities: Some(capabilities),
            device_scope,
            parent_scopes,
        };
        // The connection state and activity just read may be stale by the time of the write: a
        // connection-state write keeps the etag, so `pre` would not notice it. The store keeps
        // the stored ones instead, read in the same atomic step as the check. (Chosen over a
        // per-row write version compared by the stores: no new column, no schema migration, and
        // the write's precondition stays the etag the caller knows.)
        self.store
            .put_device_keeping_activity(&device, &pre)
            .map_err(|e| device_store_error(e, &device.device_id))?;
        Ok(device)
    }

    /// Sets `status` (and `statusReason`), stamping `statusUpdatedTime` when it changes.
    ///
    /// # Errors
    /// As [`Registry::update_device`].
    pub fn set_device_status(
        &self,
        id: &DeviceId,
        status: DeviceStatus,
        reason: Option<String>,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Device, Error> {
        let mut body = self.device(id)?;
        body.status = status;
        body.status_reason = reason;
        self.update_device(body, if_match, now)
    }

    /// `DELETE /devices/{id}`: no If-Match or `*` deletes unconditionally, an etag only that
    /// version. Modules go with the device; one event per deleted identity.
    ///
    /// # Errors
    /// `DeviceNotFound`, `PreconditionFailed`, store failures.
    pub fn delete_device(
        &self,
        id: &DeviceId,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Device>, Error> {
        let pre = match if_match {
            IfMatch::Absent | IfMatch::Any => Precondition::MustExist,
            IfMatch::Tag(t) => Precondition::Matches(t.clone()),
        };
        let (device, modules) = self.store.delete_device(id, &pre).map_err(|e| device_store_error(e, id))?;
        let mut events: Vec<LifecycleEvent> =
            modules.iter().map(|m| self.lifecycle(false, id, Some(&m.module_id), now)).collect();
        events.push(self.lifecycle(false, id, None, now));
        Ok(Applied { value: device, events })
    }

    /// `GET /devices?top=N`: `top` outside 1–1000 (or absent) means 1000. Pages follow the
    /// store order; the continuation is `None` on the last page.
    ///
    /// # Errors
    /// Store failures.
    pub fn devices(&self, top: Option<i64>, continuation: Option<String>) -> Result<Page<Device>, Error> {
        let max_items = match top {
            Some(n) if (1..=MAX_LIST_TOP as i64).contains(&n) => n as usize,
            _ => MAX_LIST_TOP,
        };
        Ok(self.store.devices(&PageRequest { continuation, max_items })?)
    }

    /// `GET /statistics/devices`.
    ///
    /// # Errors
    /// Store failures.
    pub fn statistics(&self) -> Result<RegistryStatistics, Error> {
        let c = self.store.count_devices()?;
        Ok(RegistryStatistics {
            total_device_count: c.total,
            enabled_device_count: c.enabled,
            disabled_device_count: c.disabled,
        })
    }

    /// `GET /statistics/service`.
    ///
    /// # Errors
    /// Store failures.
    pub fn service_statistics(&self) -> Result<ServiceStatistics, Error> {
        Ok(ServiceStatistics { connected_device_count: self.store.count_devices()?.connected })
    }

    /// Records that a device (or module) connected in `session`: sets `connectionState`,
    /// `connectionStateUpdatedTime` and `lastActivityTime` without changing the etag, and returns
    /// the `deviceConnected` notification. `session` becomes the identity's live session (it
    /// replaces any other: one connection per identity). An identity already connected returns
    /// `None`.
    ///
    /// Sessions are kept by this value: a deployment whose instances share the identity store
    /// must report all the connections of one identity to the same instance.
    ///
    /// # Errors
    /// `DeviceNotFound`, `ModuleNotFound`, store failures.
    pub fn handle_connected(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        session: SessionId,
        now: Timestamp,
    ) -> Result<Option<ConnectionStateEvent>, Error> {
        let key = (device_id.clone(), module_id.cloned());
        // Held across the write, so a close of the same identity cannot land between.
        let mut sessions = self.sessions_of(&key);
        let changed = self.write_connection_state(device_id, module_id, ConnectionState::Connected, now)?;
        sessions.insert(key, session);
        Ok(changed.then(|| self.connection_event(device_id, module_id, ConnectionState::Connected, now)))
    }

    /// Records that `session` of a device (or module) closed: unless another session replaced
    /// it meanwhile (see [`SessionId`]; then nothing changes and this returns `None`), sets
    /// `connectionState` to `Disconnected` as [`Registry::handle_connected`] sets `Connected`,
    /// and returns the `deviceDisconnected` notification. An identity already disconnected
    /// returns `None`. The close of a session this value never saw connect (one of a process
    /// that ended) disconnects the identity when no other session is live.
    ///
    /// # Errors
    /// `DeviceNotFound`, `ModuleNotFound`, store failures.
    pub fn handle_disconnected(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        session: SessionId,
        now: Timestamp,
    ) -> Result<Option<ConnectionStateEvent>, Error> {
        let key = (device_id.clone(), module_id.cloned());
        let mut sessions = self.sessions_of(&key);
        if sessions.get(&key).is_some_and(|live| *live != session) {
            return Ok(None);
        }
        sessions.remove(&key);
        let changed =
            self.write_connection_state(device_id, module_id, ConnectionState::Disconnected, now)?;
        Ok(changed.then(|| self.connection_event(device_id, module_id, ConnectionState::Disconnected, now)))
    }

    /// The stripe of the live-session table that holds `key`.
    fn sessions_of(&self, key: &SessionKey) -> MutexGuard<'_, HashMap<SessionKey, SessionId>> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % SESSION_STRIPES as u64).unwrap_or(0);
        self.sessions[stripe].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `state`; returns whether it changed.
    fn write_connection_state(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        state: ConnectionState,
        now: Timestamp,
    ) -> Result<bool, Error> {
        retry_lost_race(&IfMatch::Any, || self.set_connection_state_once(device_id, module_id, state, now))
    }

    fn connection_event(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        state: ConnectionState,
        now: Timestamp,
    ) -> ConnectionStateEvent {
        let op_type = match state {
            ConnectionState::Connected => ConnectionOperation::DeviceConnected,
            _ => ConnectionOperation::DeviceDisconnected,
        };
        ConnectionStateEvent {
            op_type,
            hub_name: self.config.hub_name.clone(),
            device_id: device_id.clone(),
            module_id: module_id.cloned(),
            operation_timestamp: now,
            sequence_number: self.next_sequence_number(now),
        }
    }

    fn set_connection_state_once(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        state: ConnectionState,
        now: Timestamp,
    ) -> Result<bool, Error> {
        match module_id {
            None => {
                let mut device = self.device(device_id)?;
                if device.connection_state == state {
                    return Ok(false);
                }
                let pre = tag_precondition(device.etag.as_ref());
                device.connection_state = state;
                device.connection_state_updated_time = Some(now);
                device.last_activity_time = Some(now);
                self.store.put_device(&device, &pre).map_err(|e| device_store_error(e, device_id))?;
            }
            Some(mid) => {
                let mut module = self.module(device_id, mid)?;
                if module.connection_state == state {
                    return Ok(false);
                }
                let pre = tag_precondition(module.etag.as_ref());
                module.connection_state = state;
                module.connection_state_updated_time = Some(now);
                module.last_activity_time = Some(now);
                self.store.put_module(&module, &pre).map_err(|e| module_store_error(e, device_id, mid))?;
            }
        }
        Ok(true)
    }

    // ---- modules -------------------------------------------------------------------------

    /// Reads a module.
    ///
    /// # Errors
    /// `ModuleNotFound` (or `DeviceNotFound` when the device is missing), store failures.
    pub fn module(&self, device_id: &DeviceId, module_id: &ModuleId) -> Result<Module, Error> {
        match self.store.module(device_id, module_id)? {
            Some(m) => Ok(m),
            None => {
                self.device(device_id)?;
                Err(module_not_found(device_id, module_id))
            }
        }
    }

    /// `GET /devices/{id}/modules`.
    ///
    /// # Errors
    /// `DeviceNotFound`, store failures.
    pub fn modules(&self, device_id: &DeviceId) -> Result<Vec<Module>, Error> {
        self.device(device_id)?;
        Ok(self.store.modules(device_id)?)
    }

    /// `PUT /devices/{id}/modules/{mid}` with the If-Match rules of devices.
    ///
    /// # Errors
    /// `ArgumentInvalid` for an id mismatch, `DeviceNotFound`, `ModuleAlreadyExistsOnDevice`,
    /// `ModuleNotFound`, `PreconditionFailed`, `TooManyModulesOnDevice`, store failures.
    pub fn put_module(
        &self,
        device_id: &DeviceId,
        module_id: &ModuleId,
        body: Module,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Module>, Error> {
        if body.device_id != *device_id || body.module_id != *module_id {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                format!(
                    "The ids in the body ({}/{}) do not match the path ({device_id}/{module_id}).",
                    body.device_id, body.module_id
                ),
            ));
        }
        match if_match {
            IfMatch::Absent => self.create_module(body, now),
            _ => self.update_module(body, if_match).map(|value| Applied { value, events: Vec::new() }),
        }
    }

    /// Creates a module on an existing device.
    ///
    /// # Errors
    /// `DeviceNotFound`, `ModuleAlreadyExistsOnDevice`, `TooManyModulesOnDevice`, invalid
    /// fields, store failures.
    pub fn create_module(&self, body: Module, now: Timestamp) -> Result<Applied<Module>, Error> {
        self.device(&body.device_id)?;
        let count = self.store.modules(&body.device_id)?.len();
        if count >= self.config.max_modules_per_device {
            return Err(hub_error(
                HubErrorCode::TooManyModulesOnDevice,
                format!("Device '{}' already has {count} modules.", body.device_id),
            ));
        }
        let module = Module {
            authentication: Some(self.resolve_auth(body.authentication.as_ref(), None)?),
            generation_id: Some(generation_id(now)),
            etag: Some(self.new_etag(None)?),
            connection_state: ConnectionState::Disconnected,
            connection_state_updated_time: None,
            last_activity_time: None,
            cloud_to_device_message_count: 0,
            ..body
        };
        self.store.put_module(&module, &Precondition::MustNotExist).map_err(|e| match e {
            StoreError::AlreadyExists => hub_error(
                HubErrorCode::ModuleAlreadyExistsOnDevice,
                format!(
                    "A module with ID '{}' already exists on device '{}'.",
                    module.module_id, module.device_id
                ),
            ),
            StoreError::NotFound => device_not_found(&module.device_id),
            other => other.into(),
        })?;
        let events = vec![self.lifecycle(true, &module.device_id, Some(&module.module_id), now)];
        Ok(Applied { value: module, events })
    }

    /// Updates an existing module if `if_match` holds (`Absent` behaves like `*`).
    ///
    /// # Errors
    /// `DeviceNotFound`, `ModuleNotFound`, `PreconditionFailed`, invalid fields, store failures.
    pub fn update_module(&self, body: Module, if_match: &IfMatch) -> Result<Module, Error> {
        retry_lost_race(if_match, || self.update_module_once(body.clone(), if_match))
    }

    fn update_module_once(&self, body: Module, if_match: &IfMatch) -> Result<Module, Error> {
        let existing = self.module(&body.device_id, &body.module_id)?;
        let pre = update_precondition(if_match, existing.etag.as_ref())?;
        let module = Module {
            authentication: Some(
                self.resolve_auth(body.authentication.as_ref(), existing.authentication.as_ref())?,
            ),
            generation_id: existing.generation_id.clone(),
            etag: Some(self.new_etag(existing.etag.as_ref())?),
            connection_state: existing.connection_state,
            connection_state_updated_time: existing.connection_state_updated_time,
            last_activity_time: existing.last_activity_time,
            cloud_to_device_message_count: existing.cloud_to_device_message_count,
            ..body
        };
        // As in `update_device_once`: the activity fields are the store's to keep.
        self.store
            .put_module_keeping_activity(&module, &pre)
            .map_err(|e| module_store_error(e, &module.device_id, &module.module_id))?;
        Ok(module)
    }

    /// `DELETE /devices/{id}/modules/{mid}` with the If-Match rules of devices.
    ///
    /// # Errors
    /// `DeviceNotFound`, `ModuleNotFound`, `PreconditionFailed`, store failures.
    pub fn delete_module(
        &self,
        device_id: &DeviceId,
        module_id: &ModuleId,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Module>, Error> {
        self.device(device_id)?;
        let pre = match if_match {
            IfMatch::Absent | IfMatch::Any => Precondition::MustExist,
            IfMatch::Tag(t) => Precondition::Matches(t.clone()),
        };
        let module = self
            .store
            .delete_module(device_id, module_id, &pre)
            .map_err(|e| module_store_error(e, device_id, module_id))?;
        let events = vec![self.lifecycle(false, device_id, Some(module_id), now)];
        Ok(Applied { value: module, events })
    }

    // ---- helpers -------------------------------------------------------------------------

    fn lifecycle(
        &self,
        created: bool,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        now: Timestamp,
    ) -> LifecycleEvent {
        LifecycleEvent::new(
            created,
            self.config.module_events,
            &self.config.hub_name,
            device_id,
            module_id,
            now,
            self.lifecycle_events.load(Ordering::Relaxed),
        )
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        self.crypto.fill_random(&mut out).map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(out)
    }

    fn generate_key(&self) -> Result<String, Error> {
        Ok(B64.encode(self.random::<GENERATED_KEY_LEN>()?))
    }

    /// Etags as observed: base64 of an ASCII decimal number. A new identity starts at a random
    /// 31-bit value (so re-created ids do not repeat old etags); each update adds one.
    fn new_etag(&self, previous: Option<&ETag>) -> Result<ETag, Error> {
        let next = match previous.and_then(etag_number) {
            Some(n) => n.wrapping_add(1) & 0x7fff_ffff,
            None => u64::from(u32::from_be_bytes(self.random::<4>()?) & 0x7fff_ffff),
        };
        Ok(ETag::new(B64.encode(next.to_string())))
    }

    fn resolve_auth(
        &self,
        given: Option<&AuthenticationMechanism>,
        existing: Option<&AuthenticationMechanism>,
    ) -> Result<AuthenticationMechanism, Error> {
        let Some(given) = given else {
            if let Some(existing) = existing {
                return Ok(existing.clone());
            }
            return Ok(AuthenticationMechanism {
                symmetric_key: SymmetricKey {
                    primary_key: Some(self.generate_key()?),
                    secondary_key: Some(self.generate_key()?),
                },
                x509_thumbprint: X509Thumbprint::default(),
                kind: AuthenticationType::Sas,
            });
        };
        let kept = existing.filter(|e| e.kind == AuthenticationType::Sas).map(|e| &e.symmetric_key);
        match given.kind {
            AuthenticationType::Sas => {
                let pick = |given: &Option<String>, kept: Option<&String>| -> Result<String, Error> {
                    match given.as_deref() {
                        Some(k) if !k.is_empty() => {
                            check_key(k)?;
                            Ok(k.to_owned())
                        }
                        _ => match kept {
                            Some(k) => Ok(k.clone()),
                            None => self.generate_key(),
                        },
                    }
                };
                Ok(AuthenticationMechanism {
                    symmetric_key: SymmetricKey {
                        primary_key: Some(pick(
                            &given.symmetric_key.primary_key,
                            kept.and_then(|k| k.primary_key.as_ref()),
                        )?),
                        secondary_key: Some(pick(
                            &given.symmetric_key.secondary_key,
                            kept.and_then(|k| k.secondary_key.as_ref()),
                        )?),
                    },
                    x509_thumbprint: X509Thumbprint::default(),
                    kind: AuthenticationType::Sas,
                })
            }
            AuthenticationType::SelfSigned => {
                let t = &given.x509_thumbprint;
                let primary = t.primary_thumbprint.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
                    hub_error(HubErrorCode::ArgumentNull, "A selfSigned identity needs a primary thumbprint.")
                })?;
                check_thumbprint(primary)?;
                let secondary = t.secondary_thumbprint.as_deref().filter(|s| !s.is_empty());
                if let Some(s) = secondary {
                    check_thumbprint(s)?;
                }
                Ok(AuthenticationMechanism {
                    symmetric_key: SymmetricKey::default(),
                    x509_thumbprint: X509Thumbprint {
                        primary_thumbprint: Some(primary.to_owned()),
                        secondary_thumbprint: secondary.map(str::to_owned),
                    },
                    kind: AuthenticationType::SelfSigned,
                })
            }
            kind => Ok(AuthenticationMechanism {
                symmetric_key: SymmetricKey::default(),
                x509_thumbprint: X509Thumbprint::default(),
                kind,
            }),
        }
    }

    /// 64 hex digits: 16 zeros, the .NET ticks of `now` (never going back), then a counter, so
    /// consecutive values compare increasing as strings.
    fn next_sequence_number(&self, now: Timestamp) -> String {
        let ticks = dotnet_ticks(now);
        let mut guard = match self.last_sequence.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (last_ticks, counter) = *guard;
        let ticks = ticks.max(last_ticks);
        let counter = counter.wrapping_add(1);
        *guard = (ticks, counter);
        format!("{:016X}{:016X}{:032X}", 0u64, ticks, counter)
    }

    /// Whether the lifecycle events that identity creations and deletions return in
    /// [`Applied::events`] carry the identity's fresh twin as their body; on by default. Off, the
    /// events are bare (`null` body): enough for the caller to keep twins in step with the
    /// identities, not to announce, and they skip building the twin.
    pub fn set_lifecycle_events(&self, on: bool) {
        self.lifecycle_events.store(on, Ordering::Relaxed);
    }
}

/// The human text of an error, without the engine's category prefix for hub errors.
pub(crate) fn error_text(error: &Error) -> String {
    match error {
        Error::Hub { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn device_not_found(id: &DeviceId) -> Error {
    hub_error(HubErrorCode::DeviceNotFound, format!("Device {id} not registered"))
}

fn module_not_found(device: &DeviceId, module: &ModuleId) -> Error {
    hub_error(HubErrorCode::ModuleNotFound, format!("Module {module} on device {device} not registered"))
}

fn device_store_error(e: StoreError, id: &DeviceId) -> Error {
    match e {
        StoreError::NotFound => device_not_found(id),
        StoreError::PreconditionFailed => {
            hub_error(HubErrorCode::PreconditionFailed, format!("The etag of device {id} does not match."))
        }
        StoreError::AlreadyExists => hub_error(
            HubErrorCode::DeviceAlreadyExists,
            format!("A device with ID '{id}' is already registered."),
        ),
        other => other.into(),
    }
}

fn module_store_error(e: StoreError, device: &DeviceId, module: &ModuleId) -> Error {
    match e {
        StoreError::NotFound => module_not_found(device, module),
        StoreError::PreconditionFailed => hub_error(
            HubErrorCode::PreconditionFailed,
            format!("The etag of module {module} on device {device} does not match."),
        ),
        StoreError::AlreadyExists => hub_error(
            HubErrorCode::ModuleAlreadyExistsOnDevice,
            format!("A module with ID '{module}' already exists on device '{device}'."),
        ),
        other => other.into(),
    }
}

/// Attempts of a read-modify-write before a lost race is reported.
const WRITE_ATTEMPTS: usize = 4;

/// Writes are conditional on the version read, so a concurrent writer makes them fail with
/// `PreconditionFailed`. Without a caller etag that is a lost race, not the caller's mistake:
/// read and try again.
fn retry_lost_race<T>(if_match: &IfMatch, mut attempt: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    let mut tries = 1;
    loop {
        match attempt() {
            Err(e)
                if tries < WRITE_ATTEMPTS
                    && !matches!(if_match, IfMatch::Tag(_))
                    && hub_error_code(&e) == HubErrorCode::PreconditionFailed =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// For an update of a read identity: the caller's If-Match is checked now (412 early) and the
/// write is made conditional on the version that was read, so a concurrent write fails.
fn update_precondition(if_match: &IfMatch, current: Option<&ETag>) -> Result<Precondition, Error> {
    if let (IfMatch::Tag(t), Some(cur)) = (if_match, current) {
        if t != cur.bare() {
            return Err(hub_error(
                HubErrorCode::PreconditionFailed,
                "The etag does not match the stored identity.",
            ));
        }
    }
    Ok(tag_precondition(current))
}

fn tag_precondition(current: Option<&ETag>) -> Precondition {
    match current {
        Some(cur) => Precondition::Matches(cur.bare().to_owned()),
        None => Precondition::MustExist,
    }
}

fn etag_number(etag: &ETag) -> Option<u64> {
    let bytes = B64.decode(etag.bare()).ok()?;
    std::str::from_utf8(&bytes).ok()?.parse().ok()
}

fn dotnet_ticks(now: Timestamp) -> i64 {
    now.unix_nanos().div_euclid(100).saturating_add(DOTNET_EPOCH_TICKS)
}

/// Generation ids as observed: the .NET ticks of the creation time (18 decimal digits).
fn generation_id(now: Timestamp) -> String {
    dotnet_ticks(now).to_string()
}

fn edge_scope(id: &DeviceId, generation_id: &str) -> String {
    format!("ms-azure-iot-edge://{id}-{generation_id}")
}

fn leaf_parent_scopes(caps: &DeviceCapabilities, scope: &Option<String>, given: Vec<String>) -> Vec<String> {
    match (caps.iot_edge, scope, given.is_empty()) {
        (false, Some(scope), true) => vec![scope.clone()],
        _ => given,
    }
}

fn check_status_reason(reason: Option<&str>) -> Result<(), Error> {
    match reason {
        Some(r) if r.chars().count() > MAX_STATUS_REASON_LEN => Err(hub_error(
            HubErrorCode::ArgumentInvalid,
            format!("statusReason is longer than {MAX_STATUS_REASON_LEN} characters."),
        )),
        _ => Ok(()),
    }
}

/// Checks a symmetric key: base64 that decodes to 16–64 bytes.
///
/// # Errors
/// `ArgumentInvalid` otherwise (the key itself is never echoed).
pub fn check_key(key: &str) -> Result<(), Error> {
    let len = B64
        .decode(key)
        .map_err(|_| hub_error(HubErrorCode::ArgumentInvalid, "A symmetric key is not valid base64."))?
        .len();
    if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&len) {
        Ok(())
    } else {
        Err(hub_error(
            HubErrorCode::ArgumentInvalid,
            format!("A symmetric key must decode to {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes, got {len}."),
        ))
    }
}

fn check_thumbprint(t: &str) -> Result<(), Error> {
    if (t.len() == 40 || t.len() == 64) && t.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(hub_error(
            HubErrorCode::ArgumentInvalid,
            format!("Thumbprint {t:?} is not 40 or 64 hexadecimal digits (SHA-1 or SHA-256)."),
        ))
    }
}
