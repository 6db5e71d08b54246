//! The twin document: tags, desired and reported properties, their metadata and versions.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zerotouch_proto::hub::HubErrorCode;
use zerotouch_proto::service::InitialTwin;
use zerotouch_proto::twin::{Twin, TwinChangeOperation, TwinCollection, TwinPatch, TwinProperties};
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};

use super::limits::{check_growth, check_size, validate_growth, validate_patch, SectionKind};
use crate::error::Error;
use crate::registry::hub_error;

/// The `$metadata` of one object or leaf: when it was last written and, in desired properties,
/// at which desired `$version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaNode {
    last_updated: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_updated_version: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    children: BTreeMap<String, MetaNode>,
}

/// When a write happens and, for desired properties, the `$version` it produces.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    now: Timestamp,
    version: Option<u64>,
}

impl MetaNode {
    fn new(stamp: Stamp) -> Self {
        Self { last_updated: stamp.now, last_updated_version: stamp.version, children: BTreeMap::new() }
    }

    fn touch(&mut self, stamp: Stamp) {
        self.last_updated = stamp.now;
        self.last_updated_version = stamp.version;
    }

    fn stamps(&self, out: &mut Map<String, Value>) {
        out.insert("$lastUpdated".to_owned(), Value::String(self.last_updated.to_string()));
        if let Some(v) = self.last_updated_version {
            out.insert("$lastUpdatedVersion".to_owned(), Value::from(v));
        }
    }

    /// Renders this node as `$metadata` JSON, ordering children like the properties in `value`.
    fn render(&self, value: &Value) -> Value {
        match value {
            Value::Object(props) => Value::Object(self.render_object(props)),
            _ => {
                let mut out = Map::new();
                self.stamps(&mut out);
                Value::Object(out)
            }
        }
    }

    fn render_object(&self, props: &Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::new();
        self.stamps(&mut out);
        for (key, child_value) in props {
            if let Some(child) = self.children.get(key) {
                out.insert(key.clone(), child.render(child_value));
            }
        }
        out
    }
}

/// Up to this many properties, a key is found by comparing names instead of hashing it
/// (`serde_json`'s map hashes with SipHash, which costs more than a few string compares).
const SCAN_LIMIT: usize = 8;

/// The stored value of `key`, if any.
fn slot<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Value> {
    if map.len() <= SCAN_LIMIT {
        map.iter_mut().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        map.get_mut(key)
    }
}

/// Whether `key` holds an object.
fn holds_object(map: &Map<String, Value>, key: &str) -> bool {
    let found = if map.len() <= SCAN_LIMIT {
        map.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        map.get(key)
    };
    matches!(found, Some(Value::Object(_)))
}

/// Merges `patch` into `target` as JSON merge patch (RFC 7396) does: objects merge recursively,
/// other values replace, `null` deletes. Every object on the path of a change and every written
/// leaf gets a fresh metadata stamp; a delete refreshes its parent (spec §5.4).
fn merge(target: &mut Map<String, Value>, meta: &mut MetaNode, patch: &Map<String, Value>, stamp: Stamp) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.shift_remove(key);
                meta.children.remove(key);
            }
            Value::Object(child_patch) => {
                // Look up before inserting: most patches rewrite properties that exist, and
                // `entry` would allocate the key every time.
                if !meta.children.contains_key(key) {
                    meta.children.insert(key.clone(), MetaNode::new(stamp));
                }
                if !holds_object(target, key) {
                    target.insert(key.clone(), Value::Object(Map::new()));
                    if let Some(m) = meta.children.get_mut(key) {
                        m.children.clear();
                    }
                }
                if let (Some(Value::Object(child)), Some(child_meta)) =
                    (slot(target, key), meta.children.get_mut(key))
                {
                    merge(child, child_meta, child_patch, stamp);
                }
            }
            leaf => {
                match slot(target, key) {
                    Some(slot) => assign(slot, leaf),
                    None => {
                        target.insert(key.clone(), leaf.clone());
                    }
                }
                match meta.children.get_mut(key) {
                    Some(m) => *m = MetaNode::new(stamp),
                    None => {
                        meta.children.insert(key.clone(), MetaNode::new(stamp));
                    }
                }
            }
        }
    }
    meta.touch(stamp);
}

/// Overwrites a stored leaf, reusing the stored string's buffer when both are strings (a
/// property rewritten with a value of similar length then allocates nothing).
fn assign(slot: &mut Value, leaf: &Value) {
    match (slot, leaf) {
        (Value::String(old), Value::String(new)) => old.clone_from(new),
        (slot, leaf) => *slot = leaf.clone(),
    }
}

/// Plain JSON merge without metadata (tags carry none).
fn merge_plain(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.shift_remove(key);
            }
            Value::Object(child_patch) => {
                // Look up before inserting, so a key that exists is not allocated again.
                if !holds_object(target, key) {
                    target.insert(key.clone(), Value::Object(Map::new()));
                }
                if let Some(Value::Object(child)) = slot(target, key) {
                    merge_plain(child, child_patch);
                }
            }
            leaf => match slot(target, key) {
                Some(slot) => assign(slot, leaf),
                None => {
                    target.insert(key.clone(), leaf.clone());
                }
            },
        }
    }
}

/// One part of an `initialTwin`, which must be an object when present.
fn initial_part<'a>(
    part: &str,
    value: Option<&'a Value>,
    empty: &'a Map<String, Value>,
) -> Result<&'a Map<String, Value>, Error> {
    match value {
        None | Some(Value::Null) => Ok(empty),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => {
            Err(hub_error(HubErrorCode::ArgumentInvalid, format!("initialTwin {part} must be a JSON object")))
        }
    }
}

/// Desired or reported properties with their `$metadata` tree and `$version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Section {
    properties: Map<String, Value>,
    metadata: MetaNode,
    version: u64,
}

impl Section {
    fn new(now: Timestamp) -> Self {
        Self { properties: Map::new(), metadata: MetaNode::new(Stamp { now, version: None }), version: 1 }
    }

    fn collection(&self, with_metadata: bool) -> TwinCollection {
        let metadata = with_metadata.then(|| self.metadata.render_object(&self.properties));
        TwinCollection { properties: self.properties.clone(), metadata, version: Some(self.version) }
    }

    /// The changed part of the section for a twin change notification: the patch as applied,
    /// `$metadata` of the root and of each changed key still present, and `$version`.
    fn changed_view(&self, patch: &Map<String, Value>) -> Value {
        let mut out = patch.clone();
        let mut meta = Map::new();
        self.metadata.stamps(&mut meta);
        for key in patch.keys() {
            if let (Some(value), Some(node)) = (self.properties.get(key), self.metadata.children.get(key)) {
                meta.insert(key.clone(), node.render(value));
            }
        }
        out.insert("$metadata".to_owned(), Value::Object(meta));
        out.insert("$version".to_owned(), Value::from(self.version));
        Value::Object(out)
    }
}

/// What one accepted write changed: enough to build the events a transport pushes
/// (see [`TwinChange::events`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TwinChange {
    /// Whether the write merged or replaced.
    pub operation: TwinChangeOperation,
    /// When the write happened.
    pub timestamp: Timestamp,
    /// Twin `version` after the write.
    pub version: u64,
    /// Tags as written: the patch (with `null`s) or, after a replace, all tags.
    pub tags: Option<Map<String, Value>>,
    /// Desired properties as written (the patch, or after a replace the whole section).
    pub desired: Option<SectionChange>,
    /// Reported properties as written (the patch); its `version` goes into the device's
    /// `$iothub/twin/res/204/?$rid=..&$version=..` answer.
    pub reported: Option<SectionChange>,
}

/// What a write did to desired or reported properties.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionChange {
    /// The properties as written, `null`s included.
    pub patch: Map<String, Value>,
    /// The section's `$version` after the write.
    pub version: u64,
}

/// A device or module twin: tags, desired and reported properties with `$metadata` on every
/// object and leaf, a `$version` per section, and the twin `version` and `etag` (spec §5).
///
/// Versions follow what the hub is observed to do (spec §5.2): a new twin is at `version` 2 with
/// both sections at `$version` 1 and etag `AAAAAAAAAAE=`; every write advances `version`; writes
/// of the back end (tags, desired) also advance the etag, a counter written as base64 of its
/// 8 big-endian bytes; desired `$version` advances when desired properties are written, reported
/// `$version` on every reported patch. Every write is validated first and applied completely or
/// not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinDocument {
    version: u64,
    etag_counter: u64,
    tags: Map<String, Value>,
    desired: Section,
    reported: Section,
}

impl TwinDocument {
    /// A fresh twin created at `now`: no tags or properties, `version` 2, both sections at
    /// `$version` 1, each with `$metadata` `{"$lastUpdated": now}`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            version: 2,
            etag_counter: 1,
            tags: Map::new(),
            desired: Section::new(now),
            reported: Section::new(now),
        }
    }

    /// A fresh twin that starts with tags and desired properties (an initial twin given at
    /// provisioning or device creation). Versions are those of [`TwinDocument::new`]; every
    /// desired leaf's metadata carries `$lastUpdatedVersion` 1.
    ///
    /// # Errors
    /// `ArgumentInvalid` (400004) when the content breaks a twin limit.
    pub fn with_initial(
        now: Timestamp,
        tags: &Map<String, Value>,
        desired: &Map<String, Value>,
    ) -> Result<Self, Error> {
        validate_patch(SectionKind::Tags, tags)?;
        validate_patch(SectionKind::Desired, desired)?;
        let mut doc = Self::new(now);
        merge_plain(&mut doc.tags, tags);
        check_size(SectionKind::Tags, &doc.tags)?;
        if !desired.is_empty() {
            merge(
                &mut doc.desired.properties,
                &mut doc.desired.metadata,
                desired,
                Stamp { now, version: Some(1) },
            );
            check_size(SectionKind::Desired, &doc.desired.properties)?;
        }
        Ok(doc)
    }

    /// A fresh twin from the `initialTwin` of a DPS enrollment (see
    /// [`TwinDocument::with_initial`]).
    ///
    /// # Errors
    /// `ArgumentInvalid` (400004) when `tags` or `properties.desired` is not a JSON object or the
    /// content breaks a twin limit.
    pub fn from_initial_twin(now: Timestamp, initial: &InitialTwin) -> Result<Self, Error> {
        let empty = Map::new();
        let tags = initial_part("tags", initial.tags.as_ref(), &empty)?;
        let desired = initial.properties.as_ref().and_then(|p| p.desired.as_ref());
        let desired = initial_part("properties.desired", desired, &empty)?;
        Self::with_initial(now, tags, desired)
    }

    /// Twin `version`: advances on every write.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Twin etag (unquoted), what `If-Match` on twin writes is compared with.
    pub fn etag(&self) -> ETag {
        ETag::new(base64::engine::general_purpose::STANDARD.encode(self.etag_counter.to_be_bytes()))
    }

    /// The token a store compares to detect concurrent writes: unlike the etag, it changes on
    /// every write, so two reported patches cannot overwrite each other.
    pub fn revision(&self) -> ETag {
        ETag::new(self.version.to_string())
    }

    /// Tags.
    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// Desired properties (without `$metadata` and `$version`).
    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired.properties
    }

    /// Reported properties (without `$metadata` and `$version`).
    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported.properties
    }

    /// Desired `$version`.
    pub fn desired_version(&self) -> u64 {
        self.desired.version
    }

    /// Reported `$version`.
    pub fn reported_version(&self) -> u64 {
        self.reported.version
    }

    /// Checks an `If-Match` against the twin etag: absent and `*` always pass.
    ///
    /// # Errors
    /// `PreconditionFailed` (412001) when a specific etag differs.
    pub fn check_if_match(&self, if_match: &IfMatch) -> Result<(), Error> {
        // Only a specific tag needs the etag formatted.
        if matches!(if_match, IfMatch::Absent | IfMatch::Any) || if_match.allows(&self.etag()) {
            Ok(())
        } else {
            Err(twin_precondition_failed())
        }
    }

    /// Service `PATCH`: merges `tags` and `properties.desired` of `patch` (nested objects merge,
    /// `null` deletes). Tags-only patches leave desired `$version` alone.
    ///
    /// # Errors
    /// `PreconditionFailed` (412001) on an etag mismatch; `ArgumentInvalid` (400004) when the patch or
    /// its result breaks a twin limit. Nothing changes on error.
    pub fn patch(
        &mut self,
        now: Timestamp,
        patch: &TwinPatch,
        if_match: &IfMatch,
    ) -> Result<TwinChange, Error> {
        let desired_patch = patch.desired();
        let desired_version = self.merge_service_patch(now, patch.tags.as_ref(), desired_patch, if_match)?;
        Ok(self.update_change(now, patch.tags.clone(), desired_patch.cloned().zip(desired_version)))
    }

    /// [`TwinDocument::patch`] of a patch the caller no longer needs (one just decoded from a
    /// request): the returned change takes the patch's maps instead of copying them.
    ///
    /// # Errors
    /// As [`TwinDocument::patch`].
    pub fn patch_owned(
        &mut self,
        now: Timestamp,
        patch: TwinPatch,
        if_match: &IfMatch,
    ) -> Result<TwinChange, Error> {
        let desired_version =
            self.merge_service_patch(now, patch.tags.as_ref(), patch.desired(), if_match)?;
        let TwinPatch { tags, properties, .. } = patch;
        let desired = properties.and_then(|p| p.desired).map(|c| c.properties);
        Ok(self.update_change(now, tags, desired.zip(desired_version)))
    }

    /// Validates and merges a service patch; returns the new desired `$version` when desired
    /// properties were written.
    fn merge_service_patch(
        &mut self,
        now: Timestamp,
        tags_patch: Option<&Map<String, Value>>,
        desired_patch: Option<&Map<String, Value>>,
        if_match: &IfMatch,
    ) -> Result<Option<u64>, Error> {
        self.check_if_match(if_match)?;
        let tags_growth = tags_patch.map(|p| validate_growth(SectionKind::Tags, p)).transpose()?;
        let desired_growth = desired_patch.map(|p| validate_growth(SectionKind::Desired, p)).transpose()?;
        // Check both sizes before writing anything, so a refused patch changes nothing.
        if let (Some(p), Some(growth)) = (tags_patch, tags_growth) {
            check_growth(SectionKind::Tags, &self.tags, p, growth)?;
        }
        if let (Some(p), Some(growth)) = (desired_patch, desired_growth) {
            check_growth(SectionKind::Desired, &self.desired.properties, p, growth)?;
        }
        if let Some(p) = tags_patch {
            merge_plain(&mut self.tags, p);
        }
        let desired_version = desired_patch.map(|p| {
            let d = &mut self.desired;
            d.version += 1;
            merge(&mut d.properties, &mut d.metadata, p, Stamp { now, version: Some(d.version) });
            d.version
        });
        self.version += 1;
        self.etag_counter += 1;
        Ok(desired_version)
    }

    fn update_change(
        &self,
        now: Timestamp,
        tags: Option<Map<String, Value>>,
        desired: Option<(Map<String, Value>, u64)>,
    ) -> TwinChange {
        TwinChange {
            operation: TwinChangeOperation::UpdateTwin,
            timestamp: now,
            version: self.version,
            tags,
            desired: desired.map(|(patch, version)| SectionChange { patch, version }),
            reported: None,
        }
    }

    /// Service `PUT`: replaces all tags and all desired properties (a missing part becomes
    /// empty; `null` values are dropped). Reported properties are untouched.
    ///
    /// # Errors
    /// `PreconditionFailed` (412001) on an etag mismatch; `ArgumentInvalid` (400004) when the new
    /// content breaks a twin limit. Nothing changes on error.
    pub fn replace(
        &mut self,
        now: Timestamp,
        twin: &TwinPatch,
        if_match: &IfMatch,
    ) -> Result<TwinChange, Error> {
        self.check_if_match(if_match)?;
        let empty = Map::new();
        let new_tags = twin.tags.as_ref().unwrap_or(&empty);
        let new_desired = twin.desired().unwrap_or(&empty);
        validate_patch(SectionKind::Tags, new_tags)?;
        validate_patch(SectionKind::Desired, new_desired)?;
        let mut tags = Map::new();
        merge_plain(&mut tags, new_tags);
        check_size(SectionKind::Tags, &tags)?;
        let version = self.desired.version + 1;
        let stamp = Stamp { now, version: Some(version) };
        let mut desired = Section { properties: Map::new(), metadata: MetaNode::new(stamp), version };
        merge(&mut desired.properties, &mut desired.metadata, new_desired, stamp);
        check_size(SectionKind::Desired, &desired.properties)?;
        self.tags = tags;
        self.desired = desired;
        self.version += 1;
        self.etag_counter += 1;
        Ok(TwinChange {
            operation: TwinChangeOperation::ReplaceTwin,
            timestamp: now,
            version: self.version,
            tags: Some(self.tags.clone()),
            desired: Some(SectionChange { patch: self.desired.properties.clone(), version }),
            reported: None,
        })
    }

    /// Device reported patch (`$iothub/twin/PATCH/properties/reported/`): merges into the
    /// reported properties. The twin etag stays as it is.
    ///
    /// # Errors
    /// `PreconditionFailed` (412001) on an etag mismatch; `ArgumentInvalid` (400004) when the patch
    /// (for example one with `"$version"`) or its result breaks a twin limit. Nothing changes on
    /// error.
    pub fn patch_reported(
        &mut self,
        now: Timestamp,
        patch: &Map<String, Value>,
        if_match: &IfMatch,
    ) -> Result<TwinChange, Error> {
        self.check_if_match(if_match)?;
        let growth = validate_growth(SectionKind::Reported, patch)?;
        check_growth(SectionKind::Reported, &self.reported.properties, patch, growth)?;
        let r = &mut self.reported;
        r.version += 1;
        merge(&mut r.properties, &mut r.metadata, patch, Stamp { now, version: None });
        self.version += 1;
        Ok(TwinChange {
            operation: TwinChangeOperation::UpdateTwin,
            timestamp: now,
            version: self.version,
            tags: None,
            desired: None,
            reported: Some(SectionChange { patch: patch.clone(), version: self.reported.version }),
        })
    }

    /// The twin as the service REST API returns it, with `$metadata` and `$version` in both
    /// sections and `tags` omitted when empty. Identity fields (`deviceEtag`, `status`, ...) are
    /// left `None` for the registry to fill in.
    pub fn to_twin(&self, device_id: &DeviceId, module_id: Option<&ModuleId>) -> Twin {
        Twin {
            device_id: device_id.clone(),
            module_id: module_id.cloned(),
            etag: Some(self.etag()),
            device_etag: None,
            status: None,
            status_reason: None,
            status_update_time: None,
            connection_state: None,
            last_activity_time: None,
            cloud_to_device_message_count: None,
            authentication_type: None,
            x509_thumbprint: None,
            model_id: None,
            version: Some(self.version),
            tags: (!self.tags.is_empty()).then(|| self.tags.clone()),
            properties: Some(TwinProperties {
                desired: self.desired.collection(true),
                reported: self.reported.collection(true),
            }),
            capabilities: None,
            device_scope: None,
            parent_scopes: None,
        }
    }

    /// The body of the device-MQTT twin GET response:
    /// `{"desired":{...,"$version":n},"reported":{...,"$version":m}}`, without metadata or tags.
    pub fn device_view(&self) -> TwinProperties {
        TwinProperties { desired: self.desired.collection(false), reported: self.reported.collection(false) }
    }

    /// Body of an `updateTwin` change notification (spec §4): the new `version` and, per changed
    /// part, what was written with `$metadata` of the changed keys and the section `$version`.
    pub(crate) fn update_notification_body(&self, change: &TwinChange) -> Value {
        let mut body = Map::new();
        body.insert("version".to_owned(), Value::from(change.version));
        if let Some(tags) = &change.tags {
            body.insert("tags".to_owned(), Value::Object(tags.clone()));
        }
        let mut props = Map::new();
        if let Some(c) = &change.desired {
            props.insert("desired".to_owned(), self.desired.changed_view(&c.patch));
        }
        if let Some(c) = &change.reported {
            props.insert("reported".to_owned(), self.reported.changed_view(&c.patch));
        }
        if !props.is_empty() {
            body.insert("properties".to_owned(), Value::Object(props));
        }
        Value::Object(body)
    }
}

/// The error of a twin write whose `If-Match` names another etag.
pub(crate) fn twin_precondition_failed() -> Error {
    hub_error(HubErrorCode::PreconditionFailed, "The etag does not match the twin's etag.")
}
