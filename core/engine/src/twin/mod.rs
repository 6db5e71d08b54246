//! Device and module twins: documents with metadata and versions, limits, events and stores.
//!
//! A [`TwinDocument`] applies the three writes of the hub (service `PATCH` and `PUT`, device
//! reported patch), each checked against `If-Match`, validated against the limits of
//! [`limits`], and returning a [`TwinChange`] from which the [`TwinEvent`]s a transport pushes
//! are built. [`update_twin`] runs one write against a [`TwinStore`] with an atomic
//! read-modify-write.

mod document;
mod events;
pub mod limits;
mod store;

use std::fmt;

use serde_json::{json, Map, Value};
use zerotouch_proto::hub::{ExportImportProperties, HubErrorCode};
use zerotouch_proto::twin::TwinPatch;
use zerotouch_proto::{DeviceId, IfMatch, ModuleId, Timestamp};

pub(crate) use document::twin_precondition_failed;
pub use document::{SectionChange, TwinChange, TwinDocument};
pub use events::{DesiredPropertiesChanged, TwinChangeNotification, TwinEvent};
pub use store::{MemoryTwinStore, StoredTwin, TwinStore};

use crate::error::{Error, StoreError};
use crate::registry::hub_error;
use crate::store::Precondition;

/// Which twin: a device twin (`module_id` is `None`) or a module twin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TwinKey {
    /// The device.
    pub device_id: DeviceId,
    /// The module, for module twins.
    pub module_id: Option<ModuleId>,
}

impl TwinKey {
    /// The key of a device twin.
    pub fn device(device_id: DeviceId) -> Self {
        Self { device_id, module_id: None }
    }

    /// The key of a module twin.
    pub fn module(device_id: DeviceId, module_id: ModuleId) -> Self {
        Self { device_id, module_id: Some(module_id) }
    }
}

impl fmt::Display for TwinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module_id {
            Some(m) => write!(f, "module {m} of device {}", self.device_id),
            None => write!(f, "device {}", self.device_id),
        }
    }
}

/// One write to a twin.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinOperation {
    /// Service `PATCH`: merge tags and desired properties.
    Patch(TwinPatch),
    /// Service `PUT`: replace tags and desired properties.
    Replace(TwinPatch),
    /// Device reported patch: merge into reported properties.
    Reported(Map<String, Value>),
}

impl TwinDocument {
    /// Applies one write; see [`TwinDocument::patch`], [`TwinDocument::replace`] and
    /// [`TwinDocument::patch_reported`].
    ///
    /// # Errors
    /// `PreconditionFailed` (412001) or `ArgumentInvalid` (400004); nothing changes on error.
    pub fn apply(
        &mut self,
        now: Timestamp,
        op: &TwinOperation,
        if_match: &IfMatch,
    ) -> Result<TwinChange, Error> {
        match op {
            TwinOperation::Patch(p) => self.patch(now, p, if_match),
            TwinOperation::Replace(p) => self.replace(now, p, if_match),
            TwinOperation::Reported(p) => self.patch_reported(now, p, if_match),
        }
    }
}

/// The twin after a write and the events to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinOutcome {
    /// The twin as stored.
    pub document: TwinDocument,
    /// What changed, as applied.
    pub change: TwinChange,
    /// Desired push (if desired changed) and change notification.
    pub events: Vec<TwinEvent>,
}

/// How often [`update_twin`] retries when another writer got in between its read and write.
pub const MAX_WRITE_ATTEMPTS: usize = 8;

/// Reads a twin, applies `op` and writes it back atomically, retrying when a concurrent write
/// got in between (the `If-Match` is re-checked on every attempt).
///
/// # Errors
/// `DeviceNotFound` or `ModuleNotFound` ([`twin_not_found`]) when there is no such twin;
/// `PreconditionFailed` and `ArgumentInvalid` from the operation; [`Error::Conflict`] when concurrent writers kept
/// winning for [`MAX_WRITE_ATTEMPTS`] attempts; store failures.
pub fn update_twin(
    store: &dyn TwinStore,
    key: &TwinKey,
    now: Timestamp,
    op: &TwinOperation,
    if_match: &IfMatch,
) -> Result<TwinOutcome, Error> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let mut document = store.twin(key)?.ok_or_else(|| twin_not_found(key))?;
        let read_revision = document.revision();
        let change = document.apply(now, op, if_match)?;
        match store.put_twin(key, &document, &Precondition::Matches(read_revision.bare().to_owned())) {
            Ok(()) => {
                let events = change.events(key, &document);
                return Ok(TwinOutcome { document, change, events });
            }
            Err(StoreError::PreconditionFailed) => continue,
            Err(StoreError::NotFound) => return Err(twin_not_found(key)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict(format!("the twin of {key} kept changing concurrently; retry the request")))
}

/// Applies the twin data of a bulk entry or import line to `doc`, the twin at `key`, as the
/// import modes write it (hub spec §3.3): `tags` merged, `properties.desired` and
/// `properties.reported` each replacing the whole section (their `$metadata` / `$version` keys
/// are ignored). Returns the events of the writes, one set per section written, when
/// `with_events`; none (and builds none) otherwise.
///
/// # Errors
/// `ArgumentInvalid` when a part is not a JSON object or the data breaks a twin limit. `doc` may be partly written on error: apply to a copy when that matters.
pub fn apply_import_data(
    doc: &mut TwinDocument,
    key: &TwinKey,
    now: Timestamp,
    tags: Option<&Value>,
    properties: Option<&ExportImportProperties>,
    with_events: bool,
) -> Result<Vec<TwinEvent>, Error> {
    let mut events = Vec::new();
    let mut collect = |change: Option<&TwinChange>, doc: &TwinDocument| {
        if let (true, Some(change)) = (with_events, change) {
            events.extend(change.events(key, doc));
        }
    };
    if let Some(tags) = tags {
        let tags = plain_properties(Some(tags))?;
        let change = doc.patch(now, &twin_patch(Some(&tags), None)?, &IfMatch::Any)?;
        collect(Some(&change), doc);
    }
    if let Some(desired) = properties.and_then(|p| p.desired.as_ref()) {
        let desired = plain_properties(Some(desired))?;
        let tags = doc.tags().clone();
        let change = doc.replace(now, &twin_patch(Some(&tags), Some(&desired))?, &IfMatch::Any)?;
        collect(Some(&change), doc);
    }
    if let Some(reported) = properties.and_then(|p| p.reported.as_ref()) {
        let change = replace_reported(doc, now, &plain_properties(Some(reported))?)?;
        collect(change.as_ref(), doc);
    }
    Ok(events)
}

/// The error of a write to a twin that is not there: `DeviceNotFound` (404001) for a device
/// twin, `ModuleNotFound` (404010) for a module twin (hub spec §1.4).
pub fn twin_not_found(key: &TwinKey) -> Error {
    match &key.module_id {
        None => hub_error(HubErrorCode::DeviceNotFound, format!("Device {} not registered", key.device_id)),
        Some(m) => hub_error(
            HubErrorCode::ModuleNotFound,
            format!("Module {m} on device {} not registered", key.device_id),
        ),
    }
}

/// Properties without the `$metadata` / `$version` bookkeeping keys.
fn plain_properties(value: Option<&Value>) -> Result<Map<String, Value>, Error> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => {
            Ok(m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        Some(_) => Err(hub_error(HubErrorCode::ArgumentInvalid, "twin properties must be a JSON object")),
    }
}

/// A service patch of `tags` and desired properties.
pub(crate) fn twin_patch(
    tags: Option<&Map<String, Value>>,
    desired: Option<&Map<String, Value>>,
) -> Result<TwinPatch, Error> {
    let mut body = Map::new();
    if let Some(t) = tags {
        body.insert("tags".to_owned(), Value::Object(t.clone()));
    }
    if let Some(d) = desired {
        body.insert("properties".to_owned(), json!({ "desired": d }));
    }
    serde_json::from_value(Value::Object(body))
        .map_err(|e| hub_error(HubErrorCode::ArgumentInvalid, e.to_string()))
}

/// Sets the reported section to exactly `reported` (keys not in it are removed); returns the
/// change, if there was anything to write.
pub(crate) fn replace_reported(
    doc: &mut TwinDocument,
    now: Timestamp,
    reported: &Map<String, Value>,
) -> Result<Option<TwinChange>, Error> {
    let mut patch: Map<String, Value> = doc
        .reported()
        .keys()
        .filter(|k| !reported.contains_key(*k))
        .map(|k| (k.clone(), Value::Null))
        .collect();
    patch.extend(reported.iter().map(|(k, v)| (k.clone(), v.clone())));
    if patch.is_empty() {
        return Ok(None);
    }
    doc.patch_reported(now, &patch, &IfMatch::Any).map(Some)
}
