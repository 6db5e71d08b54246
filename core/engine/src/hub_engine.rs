//! A sans-I/O embedded hub: identity registry, twins, query and jobs wired together.
//!
//! [`EmbeddedHub`] owns a [`Registry`], a [`TwinStore`], a [`JobPlanner`] and the
//! [`MethodCalls`] of one hub. Creating an identity creates its twin, deleting it removes the
//! twin, lifecycle events carry the real twin, [`crate::query::execute`] runs over the hub (it
//! is a [`QuerySource`]), jobs select devices with the query language and patch twins, and the
//! provisioner provisions into it through [`HubRegistry`]. [`EmbeddedHubs`] holds several hubs
//! by host name and also carries out [`HubAction::Migrate`] between them.
//!
//! Events for the transport: a twin write through [`EmbeddedHub::update_twin`] returns its
//! [`TwinEvent`]s in the [`TwinOutcome`]; twin writes whose caller gets no outcome (scheduled
//! twin jobs, twin data of bulk and import entries, the twin reset of reprovisioning) queue theirs
//! for [`EmbeddedHub::take_twin_events`], as provisioning queues lifecycle events for
//! [`EmbeddedHub::take_lifecycle_events`].

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use serde_json::{json, Map, Value};
use zerotouch_proto::hub::{
    AuthenticationMechanism, AuthenticationType, BulkRegistryOperationResult, Device, DeviceCapabilities,
    ExportImportDevice, ExportImportProperties, HubErrorCode, Module, SymmetricKey, X509Thumbprint,
};
use zerotouch_proto::jobs::{JobRequest, JobResponse, TwinUpdate};
use zerotouch_proto::service::InitialTwin;
use zerotouch_proto::twin::Twin;
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};

use crate::crypto::CryptoProvider;
use crate::error::{Error, StoreError};
use crate::hub::{DeviceAuth, HubAction, HubError, HubRegistry, ProvisionedDevice, TwinSetup};
use crate::jobs::{
    DeviceJobFilter, DeviceSelector, JobLimits, JobPlanner, JobStore, MemoryJobStore, MethodCalls,
    MethodCompletion, TwinPatcher,
};
use crate::query::{
    matches, parse_condition, Collection, Expr, IndexedSource, QuerySource, SourceDoc, VecSource,
};
use crate::registry::{
    hub_error, hub_error_code, Applied, IdentityStore, LifecycleEvent, LifecycleOperation,
    MemoryIdentityStore, Registry, RegistryConfig, TwinSink,
};
use crate::store::{PageRequest, Precondition};
use crate::twin::{
    apply_import_data, replace_reported, twin_not_found, twin_patch, twin_precondition_failed, update_twin,
    MemoryTwinStore, TwinChange, TwinDocument, TwinEvent, TwinKey, TwinOperation, TwinOutcome, TwinStore,
};

/// Code of a [`HubError`] for an action addressed to a hub this side does not hold (IoT Hub
/// has no documented code for it; 404000 is the generic not-found code).
pub const HUB_NOT_FOUND: u32 = 404_000;

/// Page size used when the hub walks a whole store.
const WALK_PAGE: usize = 1000;

/// Identity fields of a device that a device twin document repeats (hub spec §5.1), as
/// `(identity JSON key, twin JSON key)`.
const DEVICE_TWIN_FIELDS: &[(&str, &str)] = &[
    ("etag", "deviceEtag"),
    ("status", "status"),
    ("statusReason", "statusReason"),
    ("statusUpdatedTime", "statusUpdateTime"),
    ("connectionState", "connectionState"),
    ("lastActivityTime", "lastActivityTime"),
    ("cloudToDeviceMessageCount", "cloudToDeviceMessageCount"),
    ("capabilities", "capabilities"),
    ("deviceScope", "deviceScope"),
    ("parentScopes", "parentScopes"),
];

/// Identity fields of a module that a module twin document repeats.
const MODULE_TWIN_FIELDS: &[(&str, &str)] = &[
    ("etag", "deviceEtag"),
    ("connectionState", "connectionState"),
    ("lastActivityTime", "lastActivityTime"),
    ("cloudToDeviceMessageCount", "cloudToDeviceMessageCount"),
];

/// The registry and the twin store of one hub: what jobs, import and query need to share.
///
/// As the [`TwinSink`] of bulk and import entries and the [`TwinPatcher`] of scheduled twin
/// jobs, it queues the [`TwinEvent`]s of the twin writes it makes (their callers get no
/// [`TwinOutcome`]); [`EmbeddedHub::take_twin_events`] hands them to the transport.
pub struct HubCore<I, T> {
    registry: Registry<I>,
    twins: T,
    /// Twin events of writes made for callers that get no [`TwinOutcome`], oldest first.
    twin_events: Mutex<Vec<TwinEvent>>,
    /// Whether those events are built and queued (see [`EmbeddedHub::set_twin_events`]).
    twin_events_on: AtomicBool,
}

impl<I: std::fmt::Debug, T> std::fmt::Debug for HubCore<I, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCore").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl<I: IdentityStore, T: TwinStore> HubCore<I, T> {
    /// The identity registry.
    pub fn registry(&self) -> &Registry<I> {
        &self.registry
    }

    /// The twin store.
    pub fn twins(&self) -> &T {
        &self.twins
    }

    /// The twin of a device (`module_id` `None`) or module.
    ///
    /// # Errors
    /// `DeviceNotFound` / `ModuleNotFound` when there is no such twin, store failures.
    pub fn twin(&self, device_id: &DeviceId, module_id: Option<&ModuleId>) -> Result<TwinDocument, Error> {
        let key = twin_key(device_id, module_id);
        self.twins.twin(&key)?.ok_or_else(|| twin_not_found(&key))
    }

    /// The device twin as the service API and the query language see it (hub spec §5.1): the
    /// twin with the identity fields of the registry filled in.
    ///
    /// # Errors
    /// `DeviceNotFound`, store failures. An identity without twin (one created through the bare
    /// registry) shows an empty twin.
    pub fn device_twin_json(&self, device_id: &DeviceId) -> Result<Value, Error> {
        let device = self.registry.device(device_id)?;
        let doc = self
            .twins
            .twin(&TwinKey::device(device_id.clone()))?
            .unwrap_or_else(|| TwinDocument::new(Timestamp::EPOCH));
        device_twin_value(&device, &doc)
    }

    /// Every device twin document, in registry order.
    fn device_docs(&self) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut continuation = None;
        loop {
            let page = self.registry.devices(Some(WALK_PAGE as i64), continuation)?;
            for device in &page.items {
                if let Some(doc) = self.twins.twin(&TwinKey::device(device.device_id.clone()))? {
                    out.push(device_twin_value(device, &doc)?);
                }
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Every module twin document, device by device.
    fn module_docs(&self) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut continuation = None;
        loop {
            let page = self.registry.devices(Some(WALK_PAGE as i64), continuation)?;
            for device in &page.items {
                for module in self.registry.modules(&device.device_id)? {
                    let key = TwinKey::module(module.device_id.clone(), module.module_id.clone());
                    if let Some(doc) = self.twins.twin(&key)? {
                        out.push(module_twin_value(&module, &doc)?);
                    }
                }
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Creates the twin of each created identity and deletes the twin of each deleted one. With
    /// `announce`, returns the events with the twin as their body; without, returns none (and
    /// reads no twin to fill them), the twins kept in step all the same.
    fn settle(
        &self,
        events: Vec<LifecycleEvent>,
        now: Timestamp,
        announce: bool,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        if !announce {
            for event in &events {
                let key = twin_key(&event.device_id, event.module_id.as_ref());
                if is_create(event.op_type) {
                    put_new_twin(&self.twins, &key, &TwinDocument::new(now))?;
                } else {
                    delete_twin(&self.twins, &key)?;
                }
            }
            self.sweep_orphans(&events)?;
            return Ok(Vec::new());
        }
        events
            .into_iter()
            .map(|event| {
                let key = twin_key(&event.device_id, event.module_id.as_ref());
                if is_create(event.op_type) {
                    let doc = match self.twins.twin(&key)? {
                        Some(doc) => doc,
                        None => {
                            let doc = TwinDocument::new(now);
                            put_new_twin(&self.twins, &key, &doc)?;
                            doc
                        }
                    };
                    let twin = self.twin_value(&key, &doc)?;
                    Ok(event.with_twin(twin))
                } else {
                    match self.twins.twin(&key)? {
                        Some(doc) => {
                            let twin = doc.to_twin(&key.device_id, key.module_id.as_ref());
                            let twin = to_value(&twin)?;
                            delete_twin(&self.twins, &key)?;
                            Ok(event.with_twin(twin))
                        }
                        None => Ok(event),
                    }
                }
            })
            .collect::<Result<Vec<_>, Error>>()
            .and_then(|events| self.sweep_orphans(&events).map(|()| events))
    }

    /// Removes twins left behind by deleted devices (module twins whose module events a
    /// registry style did not report).
    fn sweep_orphans(&self, events: &[LifecycleEvent]) -> Result<(), Error> {
        for event in events.iter().filter(|e| !is_create(e.op_type) && e.module_id.is_none()) {
            if self.registry.store().device(&event.device_id)?.is_some() {
                continue;
            }
            for stored in self.twins.device_twins(&event.device_id)? {
                delete_twin(&self.twins, &stored.key)?;
            }
        }
        Ok(())
    }

    fn twin_value(&self, key: &TwinKey, doc: &TwinDocument) -> Result<Value, Error> {
        match &key.module_id {
            None => device_twin_value(&self.registry.device(&key.device_id)?, doc),
            Some(m) => module_twin_value(&self.registry.module(&key.device_id, m)?, doc),
        }
    }

    /// Whether twin events are queued (see [`EmbeddedHub::set_twin_events`]).
    fn twin_events_on(&self) -> bool {
        self.twin_events_on.load(Ordering::Relaxed)
    }

    fn twin_queue(&self) -> std::sync::MutexGuard<'_, Vec<TwinEvent>> {
        self.twin_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues the events of a twin write just made, for [`EmbeddedHub::take_twin_events`].
    fn announce_twin(&self, events: Vec<TwinEvent>) {
        if self.twin_events_on() && !events.is_empty() {
            self.twin_queue().extend(events);
        }
    }

    /// Applies a twin write through [`update_twin`].
    fn write_twin(
        &self,
        key: &TwinKey,
        now: Timestamp,
        op: &TwinOperation,
        if_match: &IfMatch,
    ) -> Result<TwinOutcome, Error> {
        update_twin(&self.twins, key, now, op, if_match)
    }
}

fn is_create(op: LifecycleOperation) -> bool {
    matches!(op, LifecycleOperation::CreateDeviceIdentity | LifecycleOperation::CreateModuleIdentity)
}

fn twin_key(device_id: &DeviceId, module_id: Option<&ModuleId>) -> TwinKey {
    match module_id {
        None => TwinKey::device(device_id.clone()),
        Some(m) => TwinKey::module(device_id.clone(), m.clone()),
    }
}

fn to_value<S: serde::Serialize>(value: &S) -> Result<Value, Error> {
    serde_json::to_value(value).map_err(|e| Error::BadRequest(e.to_string()))
}

fn fill_identity(twin: &mut Value, identity: &Value, fields: &[(&str, &str)]) {
    let (Some(twin), Some(identity)) = (twin.as_object_mut(), identity.as_object()) else {
        return;
    };
    for (from, to) in fields {
        if let Some(v) = identity.get(*from).filter(|v| !v.is_null()) {
            twin.insert((*to).to_owned(), v.clone());
        }
    }
    if let Some(kind) = identity.get("authentication").and_then(|a| a.get("type")) {
        twin.insert("authenticationType".to_owned(), kind.clone());
    }
    if let Some(thumbs) = identity.get("authentication").and_then(|a| a.get("x509Thumbprint")) {
        twin.insert("x509Thumbprint".to_owned(), thumbs.clone());
    }
}

/// The device twin document the service API and the query language see: the twin with the
/// identity fields of `device` filled in (hub spec §5.1). Public so a store that answers queries
/// itself (a [`QuerySource`]) visits exactly the documents [`EmbeddedHub`] would.
///
/// # Errors
/// [`Error::BadRequest`] when the twin or identity does not serialize to JSON.
pub fn device_twin_value(device: &Device, doc: &TwinDocument) -> Result<Value, Error> {
    let mut twin = to_value(&with_model_id(doc.to_twin(&device.device_id, None)))?;
    fill_identity(&mut twin, &to_value(device)?, DEVICE_TWIN_FIELDS);
    Ok(twin)
}

/// The module twin document the service API and the query language see (see
/// [`device_twin_value`]).
///
/// # Errors
/// [`Error::BadRequest`] when the twin or identity does not serialize to JSON.
pub fn module_twin_value(module: &Module, doc: &TwinDocument) -> Result<Value, Error> {
    let mut twin = to_value(&with_model_id(doc.to_twin(&module.device_id, Some(&module.module_id))))?;
    fill_identity(&mut twin, &to_value(module)?, MODULE_TWIN_FIELDS);
    Ok(twin)
}

/// `twin` with the `modelId` the service API always shows (hub spec §5.1): `""`, the model id of
/// a device that announced no IoT Plug and Play model, as no device here can announce one.
fn with_model_id(mut twin: Twin) -> Twin {
    twin.model_id.get_or_insert_with(String::new);
    twin
}

/// Writes the twin of an identity just created. A twin already under its key belonged to an
/// earlier identity of that id (left behind before twins followed every removal): the new
/// identity starts from `doc` all the same.
fn put_twin_of_new_identity(store: &dyn TwinStore, key: &TwinKey, doc: &TwinDocument) -> Result<(), Error> {
    Ok(store.put_twin(key, doc, &Precondition::None)?)
}

/// Deletes the twin at `key`, if there is one.
fn delete_twin(store: &dyn TwinStore, key: &TwinKey) -> Result<(), Error> {
    match store.delete_twin(key, &Precondition::MustExist) {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn put_new_twin(store: &dyn TwinStore, key: &TwinKey, doc: &TwinDocument) -> Result<(), Error> {
    match store.put_twin(key, doc, &Precondition::MustNotExist) {
        Ok(()) | Err(StoreError::AlreadyExists) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Adds the events of `change` (made to the twin at `key`, now `doc`) to `events`, when events
/// are wanted at all (`events` is `None` otherwise, and nothing is built).
fn collect_events(
    events: &mut Option<Vec<TwinEvent>>,
    change: Option<&TwinChange>,
    key: &TwinKey,
    doc: &TwinDocument,
) {
    if let (Some(events), Some(change)) = (events.as_mut(), change) {
        events.extend(change.events(key, doc));
    }
}

impl<I: IdentityStore, T: TwinStore> TwinSink for HubCore<I, T> {
    /// As [`TwinSink::update_twin`]; the write's desired pushes and change notifications (one
    /// set per section written) are queued for [`EmbeddedHub::take_twin_events`].
    fn update_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        tags: Option<&Value>,
        properties: Option<&ExportImportProperties>,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<(), Error> {
        let key = twin_key(device_id, module_id);
        let existing = self.twins.twin(&key)?;
        let pre = match &existing {
            Some(doc) => Precondition::Matches(doc.revision().bare().to_owned()),
            None => Precondition::MustNotExist,
        };
        let mut doc = existing.unwrap_or_else(|| TwinDocument::new(now));
        doc.check_if_match(if_match)?;
        let events = apply_import_data(&mut doc, &key, now, tags, properties, self.twin_events_on())?;
        self.twins.put_twin(&key, &doc, &pre).map_err(|e| match e {
            StoreError::PreconditionFailed | StoreError::AlreadyExists => twin_precondition_failed(),
            other => other.into(),
        })?;
        self.announce_twin(events);
        Ok(())
    }

    fn twin_for_export(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> Result<Option<(ETag, Option<Value>, ExportImportProperties)>, Error> {
        let Some(doc) = self.twins.twin(&twin_key(device_id, module_id))? else {
            return Ok(None);
        };
        let twin = doc.to_twin(device_id, module_id);
        let tags = twin.tags.map(Value::Object);
        let properties = match twin.properties {
            Some(p) => ExportImportProperties {
                desired: Some(to_value(&p.desired)?),
                reported: Some(to_value(&p.reported)?),
            },
            None => ExportImportProperties::default(),
        };
        Ok(Some((doc.etag(), tags, properties)))
    }
}

impl<I: IdentityStore, T: TwinStore> DeviceSelector for HubCore<I, T> {
    fn select(&self, condition: &str) -> Result<Vec<DeviceId>, Error> {
        let condition = condition.trim();
        let filter: Option<Expr> = if condition.is_empty() || condition == "*" {
            None
        } else {
            Some(
                parse_condition(condition)
                    .map_err(|e| hub_error(HubErrorCode::ArgumentInvalid, e.to_string()))?,
            )
        };
        let mut out = Vec::new();
        for doc in self.device_docs()? {
            if filter.as_ref().is_none_or(|f| matches(f, &doc)) {
                if let Some(id) = doc.get("deviceId").and_then(Value::as_str) {
                    out.push(DeviceId::new(id).map_err(|e| Error::BadRequest(e.to_string()))?);
                }
            }
        }
        Ok(out)
    }
}

impl<I: IdentityStore, T: TwinStore> TwinPatcher for HubCore<I, T> {
    /// As [`TwinPatcher::update_twin`]; the desired push and change notification of the patch
    /// are queued for [`EmbeddedHub::take_twin_events`].
    fn update_twin(&self, now: Timestamp, device: &DeviceId, update: &TwinUpdate) -> Result<(), Error> {
        self.registry.device(device)?;
        let desired = update.properties.as_ref().and_then(|p| p.desired.as_ref());
        let patch = twin_patch(update.tags.as_ref(), desired)?;
        let if_match = IfMatch::from_header(update.etag.as_deref());
        let if_match = if if_match == IfMatch::Absent { IfMatch::Any } else { if_match };
        let outcome =
            self.write_twin(&TwinKey::device(device.clone()), now, &TwinOperation::Patch(patch), &if_match)?;
        self.announce_twin(outcome.events);
        Ok(())
    }
}

/// The credentials of a provisioned identity as a registry `authentication` block.
fn auth_mechanism(auth: &DeviceAuth) -> AuthenticationMechanism {
    match auth {
        DeviceAuth::SymmetricKey { primary_key, secondary_key } => AuthenticationMechanism {
            symmetric_key: SymmetricKey {
                primary_key: Some(primary_key.clone()),
                secondary_key: Some(secondary_key.clone()),
            },
            x509_thumbprint: X509Thumbprint::default(),
            kind: AuthenticationType::Sas,
        },
        DeviceAuth::SelfSigned { primary_thumbprint, secondary_thumbprint } => AuthenticationMechanism {
            symmetric_key: SymmetricKey::default(),
            x509_thumbprint: X509Thumbprint {
                primary_thumbprint: Some(primary_thumbprint.clone()),
                secondary_thumbprint: Some(secondary_thumbprint.clone()),
            },
            kind: AuthenticationType::SelfSigned,
        },
        DeviceAuth::CertificateAuthority => AuthenticationMechanism {
            symmetric_key: SymmetricKey::default(),
            x509_thumbprint: X509Thumbprint::default(),
            kind: AuthenticationType::CertificateAuthority,
        },
    }
}

fn hub_err(error: &Error) -> HubError {
    if let Error::Store(StoreError::Conflict(_)) = error {
        // The hub's database kept cancelling the write for conflicts with concurrent ones: its
        // state changed under the action, which the provisioner decides again
        // (`HubError::is_conflict`) rather than failing the device.
        return HubError { code: HubErrorCode::PreconditionFailed.code(), message: error.to_string() };
    }
    let wire = error.to_wire();
    HubError { code: wire.error_code, message: wire.message }
}

/// The documents of one collection as of a generation of [`EmbeddedHub`] writes.
type Snapshot = (u64, Arc<IndexedSource>);

/// A write through the hub under way: marks the query snapshots stale when it begins and again
/// when it ends (dropped). A snapshot built while the write was under way, which may or may not
/// hold it, is thus never used after the write is done.
struct Writing<'a>(&'a AtomicU64);

impl<'a> Writing<'a> {
    fn begin(generation: &'a AtomicU64) -> Self {
        generation.fetch_add(1, Ordering::AcqRel);
        Self(generation)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// An event for the transport, of either queue.
enum Announcement {
    /// For [`EmbeddedHub::take_lifecycle_events`].
    Lifecycle(LifecycleEvent),
    /// For [`EmbeddedHub::take_twin_events`].
    Twin(TwinEvent),
}

/// An event waiting for the end of the unit it was written in, and whether its write joined
/// that unit (see [`IdentityStore::in_open_unit`], [`TwinStore::in_open_unit`]): only such a
/// write is undone, and its event dropped, when the unit rolls back.
struct Staged {
    event: Announcement,
    undone_with_unit: bool,
}

/// Lifecycle events ready for [`EmbeddedHub::take_lifecycle_events`], and the events (lifecycle
/// and twin) written in units still open. Released twin events go to the queue of [`HubCore`].
#[derive(Default)]
struct Announcements {
    queued: Vec<LifecycleEvent>,
    /// Per thread with an open unit (a store runs a unit on the thread that asks for it, so
    /// concurrent registrations sharing the hub stage apart), per depth, outermost first.
    units: Vec<(ThreadId, Vec<Vec<Staged>>)>,
}

/// One embedded hub: registry, twins, jobs and direct methods behind one sans-I/O API.
///
/// Queries read a snapshot rebuilt after each write through this value. Writes to the same
/// stores through another `EmbeddedHub` (another process on the same SQLite file, another server
/// on the same PostgreSQL database) show in its queries only after its own next write.
///
/// Over stores that are not part of the provisioning store's units (in-memory stores beside a
/// SQLite or PostgreSQL provisioning store), what a registration's actions wrote stands when
/// its unit is rolled back, and their lifecycle events are announced. When the unit then runs
/// again (PostgreSQL does on a conflict with concurrent transactions) or the provisioner
/// decides the round again, the actions are applied once more on top of it (see
/// [`HubRegistry`]): a repeated `Provision` of the same identity that keeps its twin changes
/// nothing and announces nothing, but one that resets the twin (reprovisioning with reset)
/// replaces it again, bumping its version and etag and pushing the reset twice; a repeated
/// `Migrate` finds the old identity gone and the new one there, and keeps it with the data the
/// first run moved; a repeated `Remove` finds nothing to remove, which counts as done. What
/// stands, though, is the first run's move itself: a round the provisioner then decides
/// differently (another hub, a failure recorded) leaves the identity where that run put it. For
/// registrations that move devices between hubs, keep the hubs in the provisioning store's
/// database (the SQLite and PostgreSQL stores' hub views), whose writes the unit undoes.
pub struct EmbeddedHub<
    I: IdentityStore = MemoryIdentityStore,
    T: TwinStore = MemoryTwinStore,
    J: JobStore = MemoryJobStore,
> {
    host_name: String,
    core: Arc<HubCore<I, T>>,
    planner: JobPlanner<J, Arc<HubCore<I, T>>>,
    methods: MethodCalls,
    now: Timestamp,
    announcements: Mutex<Announcements>,
    /// Whether lifecycle events are built and queued (see [`EmbeddedHub::set_lifecycle_events`]).
    lifecycle_events: bool,
    /// Bumped by every call that may write the stores (at the beginning and the end of the
    /// hub's own writes); a query snapshot older than it is rebuilt.
    generation: AtomicU64,
    /// Per collection (devices, modules, jobs): the generation it was built at and the
    /// documents with their indexes, so a query does not rebuild every document per batch.
    snapshots: Mutex<[Option<Snapshot>; 3]>,
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> std::fmt::Debug for EmbeddedHub<I, T, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedHub").field("host_name", &self.host_name).finish_non_exhaustive()
    }
}

impl EmbeddedHub {
    /// A hub called `host_name` over in-memory stores with default job limits.
    ///
    /// # Errors
    /// Crypto failures while setting up method calls.
    pub fn in_memory(host_name: impl Into<String>, crypto: Arc<dyn CryptoProvider>) -> Result<Self, Error> {
        Self::new(
            host_name,
            MemoryIdentityStore::new(),
            MemoryTwinStore::new(),
            MemoryJobStore::new(),
            crypto,
            JobLimits::default(),
        )
    }
}

impl<S: IdentityStore + TwinStore + JobStore + Clone> EmbeddedHub<S, S, S> {
    /// A hub called `host_name` with default job limits over one store that keeps identities,
    /// twins and jobs alike (a database's hub view, as `zerotouch-store`'s SQLite and PostgreSQL
    /// stores give).
    ///
    /// # Errors
    /// Crypto failures while setting up method calls.
    pub fn over(
        host_name: impl Into<String>,
        stores: S,
        crypto: Arc<dyn CryptoProvider>,
    ) -> Result<Self, Error> {
        Self::new(host_name, stores.clone(), stores.clone(), stores, crypto, JobLimits::default())
    }
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> EmbeddedHub<I, T, J> {
    /// A hub called `host_name` (also the `hubName` of its notifications) over these stores.
    ///
    /// # Errors
    /// Crypto failures while setting up method calls.
    pub fn new(
        host_name: impl Into<String>,
        identities: I,
        twins: T,
        jobs: J,
        crypto: Arc<dyn CryptoProvider>,
        limits: JobLimits,
    ) -> Result<Self, Error> {
        let host_name = host_name.into();
        let methods = MethodCalls::new(crypto.as_ref())?;
        let registry = Registry::new(identities, crypto, RegistryConfig::new(host_name.clone()));
        let core = Arc::new(HubCore {
            registry,
            twins,
            twin_events: Mutex::new(Vec::new()),
            twin_events_on: AtomicBool::new(true),
        });
        let planner = JobPlanner::new(jobs, Arc::clone(&core), limits);
        Ok(Self {
            host_name,
            core,
            planner,
            methods,
            now: Timestamp::EPOCH,
            announcements: Mutex::new(Announcements::default()),
            lifecycle_events: true,
            generation: AtomicU64::new(0),
            snapshots: Mutex::new([None, None, None]),
        })
    }

    /// Sets the time stamped on what [`HubRegistry::apply`] writes (the trait carries none).
    pub fn set_now(&mut self, now: Timestamp) {
        self.now = now;
    }

    /// Takes the lifecycle events of identities created or deleted through [`HubRegistry`]
    /// (provisioning, migration, removal), oldest first, for the transport to route. Events
    /// written inside a unit ([`HubRegistry::begin_unit`]) come once the unit committed, never
    /// when it was rolled back.
    pub fn take_lifecycle_events(&self) -> Vec<LifecycleEvent> {
        std::mem::take(&mut self.announcements().queued)
    }

    fn announcements(&self) -> std::sync::MutexGuard<'_, Announcements> {
        self.announcements.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the twin events of writes whose caller got no [`TwinOutcome`], oldest first, for
    /// the transport to deliver: desired pushes and change notifications of scheduled twin jobs
    /// ([`EmbeddedHub::run_jobs`]), of twin data in bulk and import entries ([`EmbeddedHub::bulk`],
    /// an [`crate::registry::ImportJob`] given [`EmbeddedHub::core`] as its [`TwinSink`]) and of
    /// the twin reset of reprovisioning ([`HubRegistry`]). Writes through
    /// [`EmbeddedHub::update_twin`] return their events instead and queue none. The events of
    /// the reprovisioning reset, written inside a unit ([`HubRegistry::begin_unit`]), come once
    /// the unit committed, never when it rolled back a write that joined it; those of bulk,
    /// import and job writes are queued as each write returns, so a host that runs those inside
    /// a store unit it may roll back gets them even then. A host that delivers none turns them off with
    /// [`EmbeddedHub::set_twin_events`], so the queue does not grow.
    pub fn take_twin_events(&self) -> Vec<TwinEvent> {
        std::mem::take(&mut *self.core.twin_queue())
    }

    /// Whether twin writes whose caller gets no [`TwinOutcome`] queue their events for
    /// [`EmbeddedHub::take_twin_events`]; on by default. Turning them off drops the queued ones.
    pub fn set_twin_events(&mut self, on: bool) {
        self.core.twin_events_on.store(on, Ordering::Relaxed);
        if !on {
            self.core.twin_queue().clear();
            self.drop_staged(|a| matches!(a, Announcement::Twin(_)));
        }
    }

    /// Whether any event is queued, so units must be followed.
    fn announcing(&self) -> bool {
        self.lifecycle_events || self.core.twin_events_on()
    }

    /// Drops the staged events `which` selects; with nothing left to announce, forgets the units.
    fn drop_staged(&self, which: impl Fn(&Announcement) -> bool) {
        let announcing = self.announcing();
        let mut announcements = self.announcements();
        if !announcing {
            announcements.units.clear();
            return;
        }
        for (_, depths) in &mut announcements.units {
            for staged in depths.iter_mut() {
                staged.retain(|s| !which(&s.event));
            }
        }
    }

    /// Queues lifecycle `events`, or stages them in this thread's innermost open unit. Called
    /// right after the write they announce, on the thread that made it.
    fn queue(&self, events: Vec<LifecycleEvent>) {
        if !self.lifecycle_events || events.is_empty() {
            return;
        }
        let joined = self.core.registry.store().in_open_unit();
        self.stage(events.into_iter().map(Announcement::Lifecycle), joined);
    }

    /// [`EmbeddedHub::queue`] for twin events.
    fn queue_twin(&self, events: Vec<TwinEvent>) {
        if !self.core.twin_events_on() || events.is_empty() {
            return;
        }
        let joined = self.core.twins.in_open_unit();
        self.stage(events.into_iter().map(Announcement::Twin), joined);
    }

    /// Stages `events` in this thread's innermost open unit (`undone_with_unit` telling whether
    /// their write joined it), or releases them when the thread has none open.
    fn stage(&self, events: impl Iterator<Item = Announcement>, undone_with_unit: bool) {
        let mut announcements = self.announcements();
        let Announcements { queued, units } = &mut *announcements;
        let thread = std::thread::current().id();
        match units.iter_mut().find(|(t, _)| *t == thread).and_then(|(_, d)| d.last_mut()) {
            Some(unit) => unit.extend(events.map(|event| Staged { event, undone_with_unit })),
            None => self.release(queued, events),
        }
    }

    /// Hands events on to their queues: lifecycle events to `queued`, twin events to the core's.
    fn release(&self, queued: &mut Vec<LifecycleEvent>, events: impl Iterator<Item = Announcement>) {
        let mut twin = Vec::new();
        for event in events {
            match event {
                Announcement::Lifecycle(e) => queued.push(e),
                Announcement::Twin(e) => twin.push(e),
            }
        }
        self.core.announce_twin(twin);
    }

    /// Opens a unit on this thread (see [`HubRegistry::begin_unit`]).
    fn begin(&self) {
        if !self.announcing() {
            return;
        }
        let thread = std::thread::current().id();
        let mut announcements = self.announcements();
        match announcements.units.iter_mut().find(|(t, _)| *t == thread) {
            Some((_, depths)) => depths.push(Vec::new()),
            None => announcements.units.push((thread, vec![Vec::new()])),
        }
    }

    /// Closes this thread's innermost unit (see [`HubRegistry::end_unit`]).
    fn end(&self, committed: bool) {
        if !self.announcing() {
            return;
        }
        let thread = std::thread::current().id();
        let mut announcements = self.announcements();
        let Announcements { queued, units } = &mut *announcements;
        let Some(at) = units.iter().position(|(t, _)| *t == thread) else {
            return;
        };
        let staged = units[at].1.pop().unwrap_or_default();
        // A rolled-back unit took its own writes with it; writes outside it (stores that are not
        // part of the unit, as in-memory ones beside a database store) stand.
        let kept = staged.into_iter().filter(|s| committed || !s.undone_with_unit);
        match units[at].1.last_mut() {
            Some(outer) => outer.extend(kept),
            None => {
                units.swap_remove(at);
                self.release(queued, kept.map(|s| s.event));
            }
        }
    }

    /// Marks the query snapshots stale. Called by the accessors that hand out access that can
    /// write (the registry, the core, the planner), so a query made after such a write sees it;
    /// the hub's own writes mark them at their beginning and end ([`Writing`]). A write through
    /// an accessor that races a query on another thread may be missed until the next write
    /// through the hub or call of an accessor: queries are eventually consistent, as in IoT Hub
    /// itself.
    fn touched(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The documents of `collection` as of the last write through this hub, built at most once
    /// per write. Writes to the same stores through another hub instance (another process on the
    /// same SQLite file, another server on the same PostgreSQL database) do not mark it stale:
    /// such a hub's queries see them after its own next write.
    fn snapshot(&self, collection: Collection) -> Result<Arc<IndexedSource>, Error> {
        let slot = match collection {
            Collection::Devices => 0,
            Collection::Modules => 1,
            Collection::Jobs => 2,
        };
        let generation = self.generation.load(Ordering::Acquire);
        let mut snapshots = self.snapshots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((built, source)) = &snapshots[slot] {
            if *built == generation {
                return Ok(Arc::clone(source));
            }
        }
        let docs = match collection {
            Collection::Devices => VecSource { devices: self.core.device_docs()?, ..VecSource::default() },
            Collection::Modules => VecSource { modules: self.core.module_docs()?, ..VecSource::default() },
            Collection::Jobs => VecSource { jobs: self.job_docs()?, ..VecSource::default() },
        };
        let source = Arc::new(IndexedSource::new(docs));
        snapshots[slot] = Some((generation, Arc::clone(&source)));
        Ok(source)
    }

    /// Host name of the hub.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// Registry and twins (also the [`TwinSink`] to hand to import and export jobs; settle the
    /// events of an import with [`EmbeddedHub::settle_lifecycle`]).
    pub fn core(&self) -> &HubCore<I, T> {
        self.touched();
        &self.core
    }

    /// The identity registry (reads, statistics, connection state).
    pub fn registry(&self) -> &Registry<I> {
        self.touched();
        &self.core.registry
    }

    /// The job planner (job reads, cancel, timeouts).
    pub fn planner(&mut self) -> &mut JobPlanner<J, Arc<HubCore<I, T>>> {
        self.touched();
        &mut self.planner
    }

    /// Direct method calls in flight.
    pub fn methods(&mut self) -> &mut MethodCalls {
        &mut self.methods
    }

    /// Creates a device and its twin (with `tags` and `desired` when given).
    ///
    /// # Errors
    /// As [`Registry::create_device`]; `ArgumentInvalid` for twin content that breaks a limit.
    pub fn create_device(
        &self,
        body: Device,
        tags: Option<&Map<String, Value>>,
        desired: Option<&Map<String, Value>>,
        now: Timestamp,
    ) -> Result<Applied<Device>, Error> {
        let _writing = Writing::begin(&self.generation);
        let empty = Map::new();
        let doc = TwinDocument::with_initial(now, tags.unwrap_or(&empty), desired.unwrap_or(&empty))?;
        let applied = self.core.registry.create_device(body, now)?;
        put_twin_of_new_identity(&self.core.twins, &TwinKey::device(applied.value.device_id.clone()), &doc)?;
        let events = self.core.settle(applied.events, now, self.lifecycle_events)?;
        Ok(Applied { value: applied.value, events })
    }

    /// Creates a module and its twin.
    ///
    /// # Errors
    /// As [`Registry::create_module`].
    pub fn create_module(&self, body: Module, now: Timestamp) -> Result<Applied<Module>, Error> {
        let _writing = Writing::begin(&self.generation);
        let applied = self.core.registry.create_module(body, now)?;
        let events = self.core.settle(applied.events, now, self.lifecycle_events)?;
        Ok(Applied { value: applied.value, events })
    }

    /// Deletes a device with its modules and their twins; the delete events carry the twins.
    ///
    /// # Errors
    /// As [`Registry::delete_device`].
    pub fn delete_device(
        &self,
        id: &DeviceId,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Device>, Error> {
        let _writing = Writing::begin(&self.generation);
        let applied = self.core.registry.delete_device(id, if_match, now)?;
        let events = self.core.settle(applied.events, now, self.lifecycle_events)?;
        Ok(Applied { value: applied.value, events })
    }

    /// Deletes a module and its twin.
    ///
    /// # Errors
    /// As [`Registry::delete_module`].
    pub fn delete_module(
        &self,
        device_id: &DeviceId,
        module_id: &ModuleId,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Applied<Module>, Error> {
        let _writing = Writing::begin(&self.generation);
        let applied = self.core.registry.delete_module(device_id, module_id, if_match, now)?;
        let events = self.core.settle(applied.events, now, self.lifecycle_events)?;
        Ok(Applied { value: applied.value, events })
    }

    /// Synchronous bulk registry call; twins follow the created and deleted identities. The
    /// lifecycle events are returned; the twin events of the entries' twin data are queued for
    /// [`EmbeddedHub::take_twin_events`].
    ///
    /// # Errors
    /// As [`Registry::bulk`].
    pub fn bulk(
        &self,
        entries: &[ExportImportDevice],
        now: Timestamp,
    ) -> Result<Applied<BulkRegistryOperationResult>, Error> {
        let _writing = Writing::begin(&self.generation);
        let applied = self.core.registry.bulk(entries, self.core.as_ref(), now)?;
        let events = self.core.settle(applied.events, now, self.lifecycle_events)?;
        Ok(Applied { value: applied.value, events })
    }

    /// Creates the twins of created identities and removes those of deleted ones, for events
    /// produced outside this type (an import job run over [`EmbeddedHub::core`] and
    /// [`EmbeddedHub::registry`]); returns the events with the twin as body.
    ///
    /// # Errors
    /// Store failures.
    pub fn settle_lifecycle(
        &self,
        events: Vec<LifecycleEvent>,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        let _writing = Writing::begin(&self.generation);
        self.core.settle(events, now, self.lifecycle_events)
    }

    /// The device twin document (hub spec §5.1) with its identity fields.
    ///
    /// # Errors
    /// `DeviceNotFound`, store failures.
    pub fn device_twin(&self, device_id: &DeviceId) -> Result<Value, Error> {
        self.core.device_twin_json(device_id)
    }

    /// Applies a twin write (service PATCH / PUT, device reported patch) to a device or module.
    ///
    /// # Errors
    /// As [`update_twin`].
    pub fn update_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        op: &TwinOperation,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<TwinOutcome, Error> {
        let _writing = Writing::begin(&self.generation);
        self.core.write_twin(&twin_key(device_id, module_id), now, op, if_match)
    }

    /// Creates a job (`PUT /jobs/v2/{id}`).
    ///
    /// # Errors
    /// As [`JobPlanner::create`].
    pub fn create_job(
        &mut self,
        now: Timestamp,
        job_id: &str,
        request: &JobRequest,
    ) -> Result<JobResponse, Error> {
        let _writing = Writing::begin(&self.generation);
        self.planner.create(now, job_id, request)
    }

    /// Runs due jobs: twin updates are applied to this hub's twins (their desired pushes and
    /// change notifications queued for [`EmbeddedHub::take_twin_events`]), method invocations
    /// are queued on [`EmbeddedHub::methods`]. Returns completions of method calls that are not
    /// part of a job.
    ///
    /// # Errors
    /// Store failures.
    pub fn run_jobs(&mut self, now: Timestamp) -> Result<Vec<MethodCompletion>, Error> {
        let _writing = Writing::begin(&self.generation);
        let core = Arc::clone(&self.core);
        self.planner.run(now, core.as_ref(), &mut self.methods)
    }

    fn job_docs(&self) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut page = PageRequest { continuation: None, max_items: WALK_PAGE };
        loop {
            let got = self.planner.store().device_jobs(&DeviceJobFilter::default(), &page)?;
            for record in &got.items {
                out.push(to_value(record)?);
            }
            match got.continuation {
                Some(c) => page.continuation = Some(c),
                None => return Ok(out),
            }
        }
    }

    fn provision(&self, device: &ProvisionedDevice, setup: &TwinSetup, now: Timestamp) -> Result<(), Error> {
        let _writing = Writing::begin(&self.generation);
        let authentication = auth_mechanism(&device.auth);
        let capabilities = DeviceCapabilities { iot_edge: device.iot_edge };
        let existing = match self.core.registry.device(&device.device_id) {
            Ok(d) => Some(d),
            Err(Error::Hub { code, .. }) if code == HubErrorCode::DeviceNotFound.code() => None,
            Err(e) => return Err(e),
        };
        match existing {
            None => {
                let initial = match setup {
                    TwinSetup::KeepOrInitial(t) | TwinSetup::Reset(t) => t,
                };
                let body = Device {
                    authentication: Some(authentication),
                    capabilities: Some(capabilities),
                    ..Device::new(device.device_id.clone())
                };
                let doc = TwinDocument::from_initial_twin(now, initial)?;
                let applied = self.create_absent(body, now)?;
                put_twin_of_new_identity(&self.core.twins, &TwinKey::device(device.device_id.clone()), &doc)?;
                // The events carry the twin just written and the identity as created: no
                // reading either back (what `settle` does for twins it did not write).
                if self.lifecycle_events {
                    let twin = device_twin_value(&applied.value, &doc)?;
                    self.queue(applied.events.into_iter().map(|e| e.with_twin(twin.clone())).collect());
                }
            }
            Some(mut body) => {
                // A device registering again usually brings the credentials it has: then the
                // identity is left as it is (no write, no new etag).
                let unchanged = body.authentication.as_ref() == Some(&authentication)
                    && body.capabilities == Some(capabilities);
                if !unchanged {
                    body.authentication = Some(authentication);
                    body.capabilities = Some(capabilities);
                    self.core.registry.update_device(body, &IfMatch::Any, now)?;
                }
                let key = TwinKey::device(device.device_id.clone());
                match setup {
                    TwinSetup::KeepOrInitial(initial) => {
                        // An identity made through the bare registry has no twin yet.
                        if self.core.twins.twin(&key)?.is_none() {
                            put_new_twin(
                                &self.core.twins,
                                &key,
                                &TwinDocument::from_initial_twin(now, initial)?,
                            )?;
                        }
                    }
                    TwinSetup::Reset(initial) => self.reset_twin(&key, initial, now)?,
                }
            }
        }
        Ok(())
    }

    fn reset_twin(&self, key: &TwinKey, initial: &InitialTwin, now: Timestamp) -> Result<(), Error> {
        let _writing = Writing::begin(&self.generation);
        let fresh = TwinDocument::from_initial_twin(now, initial)?;
        let Some(mut doc) = self.core.twins.twin(key)? else {
            return put_new_twin(&self.core.twins, key, &fresh);
        };
        let pre = Precondition::Matches(doc.revision().bare().to_owned());
        let mut events = self.core.twin_events_on().then(Vec::new);
        let change =
            doc.replace(now, &twin_patch(Some(fresh.tags()), Some(fresh.desired()))?, &IfMatch::Any)?;
        collect_events(&mut events, Some(&change), key, &doc);
        let change = replace_reported(&mut doc, now, &Map::new())?;
        collect_events(&mut events, change.as_ref(), key, &doc);
        self.core.twins.put_twin(key, &doc, &pre)?;
        self.queue_twin(events.unwrap_or_default());
        Ok(())
    }

    /// Creates `device` with the tags, desired and reported properties of `twin` (a migrated
    /// device keeps its data).
    fn adopt(&self, device: &ProvisionedDevice, twin: &TwinDocument, now: Timestamp) -> Result<(), Error> {
        let _writing = Writing::begin(&self.generation);
        let mut doc = TwinDocument::with_initial(now, twin.tags(), twin.desired())?;
        replace_reported(&mut doc, now, twin.reported())?;
        let body: Device = serde_json::from_value(json!({
            "deviceId": device.device_id,
            "status": "enabled",
            "capabilities": { "iotEdge": device.iot_edge },
        }))
        .map_err(|e| Error::BadRequest(e.to_string()))?;
        let body = Device { authentication: Some(auth_mechanism(&device.auth)), ..body };
        if self.core.registry.device(&device.device_id).is_ok() {
            self.queue(self.delete_device(&device.device_id, &IfMatch::Any, now)?.events);
        }
        let applied = self.create_absent(body, now)?;
        put_twin_of_new_identity(&self.core.twins, &TwinKey::device(device.device_id.clone()), &doc)?;
        self.queue(self.core.settle(applied.events, now, self.lifecycle_events)?);
        Ok(())
    }

    /// Creates a device this provisioning action found absent. One that exists by now was
    /// created by a concurrent registration of the same device (another thread, or another
    /// server instance whose transaction committed after our read, as PostgreSQL's read-committed
    /// units allow): a conflict the provisioner decides again (`412`), not a failure of the device
    /// (`409 DeviceAlreadyExists`, which would end its registration).
    fn create_absent(&self, body: Device, now: Timestamp) -> Result<Applied<Device>, Error> {
        self.core.registry.create_device(body, now).map_err(|e| match e {
            Error::Hub { code, .. } if code == HubErrorCode::DeviceAlreadyExists.code() => Error::Hub {
                code: HubErrorCode::PreconditionFailed.code(),
                message: "The device was created by a concurrent registration.".into(),
            },
            other => other,
        })
    }

    /// Deletes a provisioned identity that the device leaves; one already gone (an operator
    /// deleted it in the hub) counts as removed (see [`HubAction::Remove`]).
    fn remove_provisioned(&self, device_id: &DeviceId, now: Timestamp) -> Result<(), Error> {
        match self.delete_device(device_id, &IfMatch::Any, now) {
            Ok(applied) => {
                self.queue(applied.events);
                Ok(())
            }
            Err(e) if hub_error_code(&e) == HubErrorCode::DeviceNotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn not_owned(&self, hub: &str) -> HubError {
        HubError { code: HUB_NOT_FOUND, message: format!("Hub '{hub}' is not '{}'.", self.host_name) }
    }

    /// Carries out a provisioning action at `now` (the [`HubRegistry`] implementation uses the
    /// time of [`EmbeddedHub::set_now`], since the trait carries none).
    ///
    /// # Errors
    /// [`HubError`] with the hub code of the failure; `IotHubNotFound` for a hub name other
    /// than [`EmbeddedHub::host_name`] and for `Migrate` (which needs two hubs, see
    /// [`EmbeddedHubs`]).
    pub fn apply_at(&mut self, action: &HubAction, now: Timestamp) -> Result<(), HubError> {
        let _writing = Writing::begin(&self.generation);
        match action {
            HubAction::Provision { hub, device, twin } if hub.eq_ignore_ascii_case(&self.host_name) => {
                self.provision(device, twin, now).map_err(|e| hub_err(&e))
            }
            HubAction::Remove { hub, device_id } if hub.eq_ignore_ascii_case(&self.host_name) => {
                self.remove_provisioned(device_id, now).map_err(|e| hub_err(&e))
            }
            HubAction::Provision { hub, .. } | HubAction::Remove { hub, .. } => Err(self.not_owned(hub)),
            HubAction::Migrate { to_hub, .. } => Err(self.not_owned(to_hub)),
        }
    }

    /// Whether what [`HubRegistry`] applies (provisioning, migration, removal) queues lifecycle
    /// events for [`EmbeddedHub::take_lifecycle_events`]; on by default. A host that routes no
    /// events turns them off, and each provisioned device then skips building the event's copy
    /// of its twin with the identity's fields.
    pub fn set_lifecycle_events(&mut self, on: bool) {
        self.lifecycle_events = on;
        self.core.registry.set_lifecycle_events(on);
        if !on {
            // What units open now staged is dropped with the queue; writes made after events
            // are turned back on are announced at once, as outside a unit.
            self.announcements().queued.clear();
            self.drop_staged(|a| matches!(a, Announcement::Lifecycle(_)));
        }
    }
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> HubRegistry for EmbeddedHub<I, T, J> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.apply_at(action, self.now)
    }

    /// Lifecycle events written until the matching [`HubRegistry::end_unit`] wait for it.
    fn begin_unit(&mut self) {
        self.begin();
    }

    /// Queues the unit's events when it committed (or hands them to the outer unit); after a
    /// rollback keeps only those whose write did not join the unit (stores outside it).
    fn end_unit(&mut self, committed: bool) {
        self.end(committed);
    }
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> QuerySource for EmbeddedHub<I, T, J> {
    fn scan(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        // Offsets into a snapshot kept until the next write: stable while the data is
        // unchanged, which is what `execute` asks of continuation tokens, and built once
        // instead of once per batch.
        self.snapshot(collection)?.scan(collection, filter, page, visit)
    }

    fn scan_shared(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(SourceDoc<'_>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.snapshot(collection)?.scan_shared(collection, filter, page, visit)
    }
}

/// Several embedded hubs by host name: the [`HubRegistry`] of a provisioning service whose
/// linked hubs are all embedded, including migration between them.
#[derive(Debug)]
pub struct EmbeddedHubs<
    I: IdentityStore = MemoryIdentityStore,
    T: TwinStore = MemoryTwinStore,
    J: JobStore = MemoryJobStore,
> {
    hubs: BTreeMap<String, EmbeddedHub<I, T, J>>,
    now: Timestamp,
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> Default for EmbeddedHubs<I, T, J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> EmbeddedHubs<I, T, J> {
    /// No hubs.
    pub fn new() -> Self {
        Self { hubs: BTreeMap::new(), now: Timestamp::EPOCH }
    }

    /// Adds (or replaces) a hub under its host name.
    pub fn insert(&mut self, hub: EmbeddedHub<I, T, J>) {
        self.hubs.insert(hub.host_name.clone(), hub);
    }

    /// The hub called `host_name` (host names compare without case).
    pub fn hub(&self, host_name: &str) -> Option<&EmbeddedHub<I, T, J>> {
        self.hubs.get(self.key(host_name)?)
    }

    /// The hub called `host_name`, mutably (jobs, methods).
    pub fn hub_mut(&mut self, host_name: &str) -> Option<&mut EmbeddedHub<I, T, J>> {
        let key = self.key(host_name)?.to_owned();
        self.hubs.get_mut(&key)
    }

    /// The key of the hub called `host_name`: the name as written first, then without case (a
    /// device assigned to `Hub.Example` stays on it when the hub is linked as `hub.example`).
    fn key(&self, host_name: &str) -> Option<&str> {
        match self.hubs.get_key_value(host_name) {
            Some((key, _)) => Some(key),
            None => self.hubs.keys().find(|k| k.eq_ignore_ascii_case(host_name)).map(String::as_str),
        }
    }

    /// Sets the time stamped on what [`HubRegistry::apply`] writes, here and in every hub.
    pub fn set_now(&mut self, now: Timestamp) {
        self.now = now;
        for hub in self.hubs.values_mut() {
            hub.set_now(now);
        }
    }

    fn unknown(hub: &str) -> HubError {
        HubError { code: HUB_NOT_FOUND, message: format!("Hub '{hub}' is not linked.") }
    }

    fn migrate(
        &mut self,
        from_hub: &str,
        from_device_id: &DeviceId,
        to_hub: &str,
        device: &ProvisionedDevice,
        initial_twin: &InitialTwin,
    ) -> Result<(), HubError> {
        let now = self.now;
        let old = self.hub(from_hub).ok_or_else(|| Self::unknown(from_hub))?;
        let twin = match old.core.twin(from_device_id, None) {
            Ok(t) => t,
            // Nothing to migrate. An identity already on the new hub is kept with its data (this
            // migration ran before, in a unit whose hub writes were not undone); a new one
            // starts from the initial configuration, as a new device does.
            Err(e) if hub_error_code(&e) == HubErrorCode::DeviceNotFound => {
                let new = self.hub(to_hub).ok_or_else(|| Self::unknown(to_hub))?;
                let setup = TwinSetup::KeepOrInitial(initial_twin.clone());
                return new.provision(device, &setup, now).map_err(|e| hub_err(&e));
            }
            Err(e) => return Err(hub_err(&e)),
        };
        let new = self.hub(to_hub).ok_or_else(|| Self::unknown(to_hub))?;
        new.adopt(device, &twin, now).map_err(|e| hub_err(&e))?;
        if from_hub.eq_ignore_ascii_case(to_hub) && *from_device_id == device.device_id {
            return Ok(());
        }
        let old = self.hub(from_hub).ok_or_else(|| Self::unknown(from_hub))?;
        old.remove_provisioned(from_device_id, now).map_err(|e| hub_err(&e))
    }
}

impl<I: IdentityStore, T: TwinStore, J: JobStore> HubRegistry for EmbeddedHubs<I, T, J> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        let now = self.now;
        match action {
            HubAction::Provision { hub, .. } | HubAction::Remove { hub, .. } => {
                self.hub_mut(hub).ok_or_else(|| Self::unknown(hub))?.apply_at(action, now)
            }
            HubAction::Migrate { from_hub, from_device_id, to_hub, device, initial_twin } => {
                self.migrate(from_hub, from_device_id, to_hub, device, initial_twin)
            }
        }
    }

    /// Begins the unit in every hub (an action of the unit may reach any of them).
    fn begin_unit(&mut self) {
        self.hubs.values().for_each(EmbeddedHub::begin);
    }

    fn end_unit(&mut self, committed: bool) {
        self.hubs.values().for_each(|hub| hub.end(committed));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;
    use zerotouch_proto::hub::Device;

    use super::*;
    use crate::crypto::RingCrypto;
    use crate::query::{execute, execute_shared, parse};

    /// A device `name` with symmetric keys, as provisioning hands it to a hub.
    fn keyed_device(name: &str) -> ProvisionedDevice {
        ProvisionedDevice {
            device_id: DeviceId::new(name).unwrap(),
            auth: DeviceAuth::SymmetricKey {
                primary_key: "cHJpbWFyeS1rZXktb2YtdGhlLWRldmljZQ==".to_owned(),
                secondary_key: "c2Vjb25kYXJ5LWtleS1vZi10aGUtZGV2aWNl".to_owned(),
            },
            iot_edge: false,
        }
    }

    fn provision(hub: &mut EmbeddedHub, name: &str) {
        provision_at_site(hub, name, "north");
    }

    /// Provisions `name` into `hub` with the initial twin tag `site`.
    fn provision_at_site(hub: &mut EmbeddedHub, name: &str, site: &str) {
        let action = HubAction::Provision {
            hub: hub.host_name().to_owned().into(),
            device: keyed_device(name),
            twin: TwinSetup::KeepOrInitial(InitialTwin {
                tags: Some(json!({ "site": site })),
                ..InitialTwin::default()
            }),
        };
        hub.apply_at(&action, Timestamp::from_unix_secs(1_767_225_600)).unwrap();
    }

    /// Hub spec §5.1: the service API's twin says `"modelId": ""` for a device that announced no
    /// IoT Plug and Play model, which no device here can announce.
    #[test]
    fn device_and_module_twins_carry_an_empty_model_id_as_the_service_api_shows_it() {
        let mut hub = EmbeddedHub::in_memory("models.example", Arc::new(RingCrypto::new())).unwrap();
        provision(&mut hub, "plain");
        let id = DeviceId::new("plain").unwrap();
        assert_eq!(hub.device_twin(&id).unwrap()["modelId"], "");
        let doc = TwinDocument::new(Timestamp::from_unix_secs(1_767_225_600));
        let module = Module::new(id, ModuleId::new("m1").unwrap());
        assert_eq!(module_twin_value(&module, &doc).unwrap()["modelId"], "");
    }

    #[test]
    fn a_hub_with_lifecycle_events_off_provisions_devices_and_queues_no_events() {
        let mut hub = EmbeddedHub::in_memory("quiet.example", Arc::new(RingCrypto::new())).unwrap();
        provision(&mut hub, "queued-before");
        hub.set_lifecycle_events(false);
        assert!(hub.take_lifecycle_events().is_empty(), "turning events off drops the queued ones");
        provision(&mut hub, "quiet");
        assert!(hub.take_lifecycle_events().is_empty());
        let twin = hub.device_twin(&DeviceId::new("quiet").unwrap()).unwrap();
        assert_eq!(twin["tags"]["site"], "north");
        assert!(hub.registry().device(&DeviceId::new("quiet").unwrap()).is_ok());

        hub.set_lifecycle_events(true);
        provision(&mut hub, "announced");
        let events = hub.take_lifecycle_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].device_id.as_str(), "announced");
        assert_eq!(events[0].body["tags"]["site"], "north");
    }

    #[test]
    fn a_device_assigned_to_a_hub_reaches_it_whatever_the_case_of_its_name() {
        let mut hubs: EmbeddedHubs = EmbeddedHubs::new();
        hubs.insert(EmbeddedHub::in_memory("Hub.Example", Arc::new(RingCrypto::new())).unwrap());
        hubs.set_now(Timestamp::from_unix_secs(1_767_225_600));
        let device = keyed_device("cased");
        let twin = TwinSetup::KeepOrInitial(InitialTwin::default());
        let action = HubAction::Provision { hub: "hub.example".into(), device, twin };
        hubs.apply(&action).unwrap();
        let hub = hubs.hub("HUB.EXAMPLE").unwrap();
        assert!(hub.registry().device(&DeviceId::new("cased").unwrap()).is_ok());
        let remove =
            HubAction::Remove { hub: "hub.EXAMPLE".into(), device_id: DeviceId::new("cased").unwrap() };
        hubs.apply(&remove).unwrap();
        assert!(hubs
            .apply(&HubAction::Remove { hub: "other.example".into(), device_id: DeviceId::new("x").unwrap() })
            .is_err());
    }

    #[test]
    fn twins_follow_identities_whether_or_not_lifecycle_events_are_on() {
        let now = Timestamp::from_unix_secs(1_767_225_600);
        for events in [true, false] {
            let mut hub = EmbeddedHub::in_memory("twins.example", Arc::new(RingCrypto::new())).unwrap();
            hub.set_lifecycle_events(events);
            let gone = DeviceId::new("gone").unwrap();
            let twin_of = |hub: &EmbeddedHub, module: Option<&str>| {
                let key = match module {
                    None => TwinKey::device(gone.clone()),
                    Some(m) => TwinKey::module(gone.clone(), ModuleId::new(m).unwrap()),
                };
                hub.core().twins().twin(&key).unwrap()
            };

            // Provisioned, then removed as a device that moves away is: its twin goes with it.
            provision(&mut hub, "gone");
            assert!(twin_of(&hub, None).is_some(), "events {events}");
            let remove =
                HubAction::Remove { hub: hub.host_name().to_owned().into(), device_id: gone.clone() };
            hub.apply_at(&remove, now).unwrap();
            assert!(twin_of(&hub, None).is_none(), "events {events}: the removed device's twin is left");

            // A new identity under the same id starts from its own initial twin.
            provision_at_site(&mut hub, "gone", "south");
            assert_eq!(
                hub.device_twin(&gone).unwrap()["tags"],
                json!({ "site": "south" }),
                "events {events}"
            );

            // A twin left behind under an id without identity (by a build before twins
            // followed removals) does not become the next identity's.
            let leftover = DeviceId::new("leftover").unwrap();
            let stale =
                TwinDocument::with_initial(now, json!({ "stale": true }).as_object().unwrap(), &Map::new())
                    .unwrap();
            hub.core()
                .twins()
                .put_twin(&TwinKey::device(leftover.clone()), &stale, &Precondition::None)
                .unwrap();
            provision(&mut hub, "leftover");
            assert_eq!(
                hub.device_twin(&leftover).unwrap()["tags"],
                json!({ "site": "north" }),
                "events {events}"
            );

            // Modules get a twin when created and lose it when deleted, alone or with the device.
            let module: Module =
                serde_json::from_value(json!({ "deviceId": "gone", "moduleId": "m1" })).unwrap();
            hub.create_module(module.clone(), now).unwrap();
            assert!(twin_of(&hub, Some("m1")).is_some(), "events {events}: no module twin");
            hub.delete_module(&gone, &ModuleId::new("m1").unwrap(), &IfMatch::Any, now).unwrap();
            assert!(twin_of(&hub, Some("m1")).is_none(), "events {events}: module twin left");
            hub.create_module(module, now).unwrap();
            hub.delete_device(&gone, &IfMatch::Any, now).unwrap();
            assert!(twin_of(&hub, None).is_none() && twin_of(&hub, Some("m1")).is_none(), "events {events}");
            assert_eq!(hub.take_lifecycle_events().is_empty(), !events);
        }
    }

    #[test]
    fn a_shared_query_over_the_hub_sees_the_twins_a_copied_one_sees_and_the_next_write() {
        let hub = EmbeddedHub::in_memory("shared.example", Arc::new(RingCrypto::new())).unwrap();
        let now = Timestamp::from_unix_secs(1_767_225_600);
        for (name, site) in [("a", "north"), ("b", "south"), ("c", "north")] {
            let device: Device = serde_json::from_value(json!({ "deviceId": name })).unwrap();
            let tags = json!({ "site": site });
            hub.create_device(device, tags.as_object(), None, now).unwrap();
        }
        let q = parse("SELECT * FROM devices WHERE tags.site = 'north'").unwrap();
        let page = PageRequest { continuation: None, max_items: 100 };
        let copied = execute(&q, &hub, &page).unwrap().items;
        let shared = execute_shared(&q, &hub, &page).unwrap().items;
        assert_eq!(shared.iter().map(|v| Value::clone(v)).collect::<Vec<_>>(), copied);
        assert_eq!(shared.len(), 2);

        let device: Device = serde_json::from_value(json!({ "deviceId": "d" })).unwrap();
        hub.create_device(device, json!({ "site": "north" }).as_object(), None, now).unwrap();
        let ids: Vec<Value> =
            execute_shared(&q, &hub, &page).unwrap().items.iter().map(|t| t["deviceId"].clone()).collect();
        assert_eq!(ids, vec![json!("a"), json!("c"), json!("d")]);
    }
}
