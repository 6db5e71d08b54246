//! Typed twin events: desired-property pushes for the device and twin change notifications.

use serde_json::Value;
use zerotouch_proto::twin::{DesiredPropertiesPatch, TwinChangeOperation};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

use super::document::{TwinChange, TwinDocument};
use super::TwinKey;

/// Desired properties changed: publish [`DesiredPropertiesChanged::patch`] on
/// [`DesiredPropertiesChanged::topic`] to the device or module if it is connected and
/// subscribed (never queued for offline devices, spec §6.5).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPropertiesChanged {
    /// Device whose twin changed.
    pub device_id: DeviceId,
    /// Module whose twin changed, for module twins.
    pub module_id: Option<ModuleId>,
    /// The update as applied (with `null`s, or the whole desired document after a replace) and
    /// its `"$version"`.
    pub patch: DesiredPropertiesPatch,
    /// Desired `$version` after the change.
    pub version: u64,
}

impl DesiredPropertiesChanged {
    /// `$iothub/twin/PATCH/properties/desired/?$version={v}`.
    pub fn topic(&self) -> String {
        self.patch.topic()
    }
}

/// A twin change notification (route source `TwinChangeEvents`, spec §4). Fired for service
/// writes and for reported patches.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinChangeNotification {
    /// Device whose twin changed.
    pub device_id: DeviceId,
    /// Module whose twin changed, for module twins.
    pub module_id: Option<ModuleId>,
    /// `updateTwin` for merges, `replaceTwin` for replacements.
    pub operation: TwinChangeOperation,
    /// When the change happened (application property `operationTimestamp`).
    pub operation_timestamp: Timestamp,
    /// Message body: for `updateTwin` `{"version":v,"tags":{..},"properties":{"desired":{..,
    /// "$metadata":{..},"$version":n}}}` with only what changed; for `replaceTwin` the full twin.
    pub body: Value,
}

impl TwinChangeNotification {
    /// System property `iothub-message-source`.
    pub const MESSAGE_SOURCE: &'static str = "twinChangeEvents";
    /// Application property `iothub-message-schema`.
    pub const MESSAGE_SCHEMA: &'static str = "twinChangeNotification";

    /// Application properties of the message, in the order the hub writes them.
    pub fn application_properties(&self, hub_name: &str) -> Vec<(&'static str, String)> {
        let mut props = vec![("hubName", hub_name.to_owned()), ("deviceId", self.device_id.to_string())];
        if let Some(m) = &self.module_id {
            props.push(("moduleId", m.to_string()));
        }
        props.push(("operationTimestamp", self.operation_timestamp.to_string()));
        props.push(("iothub-message-schema", Self::MESSAGE_SCHEMA.to_owned()));
        props.push(("opType", self.operation.as_str().to_owned()));
        props
    }
}

/// Something a transport must act on after a twin write.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinEvent {
    /// Push the desired change to the device or module.
    DesiredPropertiesChanged(DesiredPropertiesChanged),
    /// Route a twin change notification.
    TwinChanged(TwinChangeNotification),
}

impl TwinChange {
    /// The desired-properties push for this change, if it wrote desired properties.
    pub fn desired_event(&self, key: &TwinKey) -> Option<DesiredPropertiesChanged> {
        self.desired.as_ref().map(|c| DesiredPropertiesChanged {
            device_id: key.device_id.clone(),
            module_id: key.module_id.clone(),
            patch: DesiredPropertiesPatch { patch: c.patch.clone(), version: c.version },
            version: c.version,
        })
    }

    /// The twin change notification for this change; `doc` is the twin after the change.
    pub fn notification(&self, key: &TwinKey, doc: &TwinDocument) -> TwinChangeNotification {
        let body = match self.operation {
            TwinChangeOperation::ReplaceTwin => {
                serde_json::to_value(doc.to_twin(&key.device_id, key.module_id.as_ref()))
                    .unwrap_or(Value::Null)
            }
            _ => doc.update_notification_body(self),
        };
        TwinChangeNotification {
            device_id: key.device_id.clone(),
            module_id: key.module_id.clone(),
            operation: self.operation,
            operation_timestamp: self.timestamp,
            body,
        }
    }

    /// Every event of this change: the desired push first (if any), then the notification.
    pub fn events(&self, key: &TwinKey, doc: &TwinDocument) -> Vec<TwinEvent> {
        let mut events = Vec::with_capacity(2);
        if let Some(e) = self.desired_event(key) {
            events.push(TwinEvent::DesiredPropertiesChanged(e));
        }
        events.push(TwinEvent::TwinChanged(self.notification(key, doc)));
        events
    }
}
