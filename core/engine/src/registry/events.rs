//! Lifecycle and connection-state notifications as typed events (hub spec §4).

use serde_json::{json, Value};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

/// How module lifecycle events are labelled: sources disagree (spec §4, §12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ModuleEventStyle {
    /// Newer captures: `deviceLifecycleEvents`, `deviceLifecycleNotification`,
    /// `createDeviceIdentity`/`deleteDeviceIdentity`, plus a `moduleId` property (the default).
    #[default]
    AsDeviceEvents,
    /// Older documentation: `moduleLifecycleEvents`, `moduleLifecycleNotification`,
    /// `createModuleIdentity`/`deleteModuleIdentity`.
    ModuleEvents,
}

/// `opType` of a lifecycle notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifecycleOperation {
    /// `createDeviceIdentity`.
    CreateDeviceIdentity,
    /// `deleteDeviceIdentity`.
    DeleteDeviceIdentity,
    /// `createModuleIdentity` (older module style only).
    CreateModuleIdentity,
    /// `deleteModuleIdentity` (older module style only).
    DeleteModuleIdentity,
}

impl LifecycleOperation {
    /// The `opType` application property value.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleOperation::CreateDeviceIdentity => "createDeviceIdentity",
            LifecycleOperation::DeleteDeviceIdentity => "deleteDeviceIdentity",
            LifecycleOperation::CreateModuleIdentity => "createModuleIdentity",
            LifecycleOperation::DeleteModuleIdentity => "deleteModuleIdentity",
        }
    }
}

/// A device or module identity was created or deleted.
///
/// The body is twin-shaped. The registry fills in the shape of a fresh twin (etag
/// `AAAAAAAAAAE=`, version 2, both sections at `$version` 1); whoever owns the twins may replace
/// it with the real twin through [`LifecycleEvent::with_twin`] before routing the event.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// What happened.
    pub op_type: LifecycleOperation,
    /// `iothub-message-source`: `deviceLifecycleEvents` or `moduleLifecycleEvents`.
    pub message_source: &'static str,
    /// `iothub-message-schema`: `deviceLifecycleNotification` or `moduleLifecycleNotification`.
    pub message_schema: &'static str,
    /// `hubName` (also the `user-id` system property).
    pub hub_name: String,
    /// The device.
    pub device_id: DeviceId,
    /// The module, for module events.
    pub module_id: Option<ModuleId>,
    /// `operationTimestamp`.
    pub operation_timestamp: Timestamp,
    /// The twin of the identity.
    pub body: Value,
}

impl LifecycleEvent {
    pub(crate) fn new(
        created: bool,
        style: ModuleEventStyle,
        hub_name: &str,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        now: Timestamp,
        with_body: bool,
    ) -> Self {
        let module_style = module_id.is_some() && style == ModuleEventStyle::ModuleEvents;
        let op_type = match (created, module_style) {
            (true, false) => LifecycleOperation::CreateDeviceIdentity,
            (false, false) => LifecycleOperation::DeleteDeviceIdentity,
            (true, true) => LifecycleOperation::CreateModuleIdentity,
            (false, true) => LifecycleOperation::DeleteModuleIdentity,
        };
        let (message_source, message_schema) = if module_style {
            ("moduleLifecycleEvents", "moduleLifecycleNotification")
        } else {
            ("deviceLifecycleEvents", "deviceLifecycleNotification")
        };
        Self {
            op_type,
            message_source,
            message_schema,
            hub_name: hub_name.to_owned(),
            device_id: device_id.clone(),
            module_id: module_id.cloned(),
            operation_timestamp: now,
            body: if with_body { fresh_twin(device_id, module_id, now) } else { Value::Null },
        }
    }

    /// The same event with `twin` (the identity's twin JSON) as body.
    pub fn with_twin(mut self, twin: Value) -> Self {
        self.body = twin;
        self
    }

    /// Application properties in the order the hub lists them: `hubName`, `deviceId`,
    /// `moduleId` (module events), `opType`, `iothub-message-schema`, `operationTimestamp`.
    pub fn application_properties(&self) -> Vec<(&'static str, String)> {
        let mut props = vec![("hubName", self.hub_name.clone()), ("deviceId", self.device_id.to_string())];
        if let Some(m) = &self.module_id {
            props.push(("moduleId", m.to_string()));
        }
        props.push(("opType", self.op_type.as_str().to_owned()));
        props.push(("iothub-message-schema", self.message_schema.to_owned()));
        props.push(("operationTimestamp", self.operation_timestamp.to_string()));
        props
    }

    /// System properties: content type and encoding, source, connection ids, `user-id`.
    pub fn system_properties(&self) -> Vec<(&'static str, String)> {
        system_properties(self.message_source, &self.hub_name, &self.device_id, self.module_id.as_ref())
    }

    /// The body as UTF-8 JSON.
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.to_string().into_bytes()
    }
}

fn system_properties(
    source: &str,
    hub_name: &str,
    device_id: &DeviceId,
    module_id: Option<&ModuleId>,
) -> Vec<(&'static str, String)> {
    let mut props = vec![
        ("content-type", "application/json".to_owned()),
        ("content-encoding", "utf-8".to_owned()),
        ("iothub-message-source", source.to_owned()),
        ("iothub-connection-device-id", device_id.to_string()),
    ];
    if let Some(m) = module_id {
        props.push(("iothub-connection-module-id", m.to_string()));
    }
    props.push(("user-id", hub_name.to_owned()));
    props
}

/// The twin a new identity gets (spec §5.2): etag 1, version 2, both sections at `$version` 1.
pub(crate) fn fresh_twin(device_id: &DeviceId, module_id: Option<&ModuleId>, now: Timestamp) -> Value {
    let section = json!({"$metadata": {"$lastUpdated": now.to_string()}, "$version": 1});
    let mut twin = serde_json::Map::new();
    twin.insert("deviceId".into(), json!(device_id.as_str()));
    if let Some(m) = module_id {
        twin.insert("moduleId".into(), json!(m.as_str()));
    }
    twin.insert("etag".into(), json!("AAAAAAAAAAE="));
    twin.insert("version".into(), json!(2));
    twin.insert("properties".into(), json!({"desired": section.clone(), "reported": section}));
    Value::Object(twin)
}

/// `opType` of a connection-state notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionOperation {
    /// `deviceConnected`.
    DeviceConnected,
    /// `deviceDisconnected`.
    DeviceDisconnected,
}

impl ConnectionOperation {
    /// The `opType` application property value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionOperation::DeviceConnected => "deviceConnected",
            ConnectionOperation::DeviceDisconnected => "deviceDisconnected",
        }
    }
}

/// A device or module connected or disconnected (`deviceConnectionStateEvents`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStateEvent {
    /// Connected or disconnected.
    pub op_type: ConnectionOperation,
    /// `hubName`.
    pub hub_name: String,
    /// The device.
    pub device_id: DeviceId,
    /// The module, if a module connection changed.
    pub module_id: Option<ModuleId>,
    /// `operationTimestamp`.
    pub operation_timestamp: Timestamp,
    /// 64 upper-case hex digits, strictly increasing within one registry (compare as strings).
    pub sequence_number: String,
}

impl ConnectionStateEvent {
    /// `iothub-message-source`.
    pub const MESSAGE_SOURCE: &'static str = "deviceConnectionStateEvents";
    /// `iothub-message-schema`.
    pub const MESSAGE_SCHEMA: &'static str = "deviceConnectionStateNotification";

    /// Application properties: `hubName`, `deviceId`, `moduleId` (if any), `opType`,
    /// `iothub-message-schema`, `operationTimestamp`.
    pub fn application_properties(&self) -> Vec<(&'static str, String)> {
        let mut props = vec![("hubName", self.hub_name.clone()), ("deviceId", self.device_id.to_string())];
        if let Some(m) = &self.module_id {
            props.push(("moduleId", m.to_string()));
        }
        props.push(("opType", self.op_type.as_str().to_owned()));
        props.push(("iothub-message-schema", Self::MESSAGE_SCHEMA.to_owned()));
        props.push(("operationTimestamp", self.operation_timestamp.to_string()));
        props
    }

    /// System properties, as for lifecycle events.
    pub fn system_properties(&self) -> Vec<(&'static str, String)> {
        system_properties(Self::MESSAGE_SOURCE, &self.hub_name, &self.device_id, self.module_id.as_ref())
    }

    /// `{"sequenceNumber":"..."}`.
    pub fn body(&self) -> Value {
        json!({"sequenceNumber": self.sequence_number})
    }
}
