//! Device-management patterns (hub spec §11): reboot, factory reset, configuration and firmware
//! update as direct methods plus progress reported under `properties.reported.iothubDM`.
//!
//! These are conventions, not hub features: the service side builds invocations and reads
//! progress from reported properties; the device side recognises the methods, answers them and
//! produces reported patches in the documented shapes.

use serde_json::{json, Map, Value};
use zerotouch_proto::jobs::{TwinUpdate, TwinUpdateProperties};
use zerotouch_proto::Timestamp;

use super::methods::MethodInvocation;
use crate::error::Error;

/// Reported-properties section all patterns write under.
pub const DM_SECTION: &str = "iothubDM";

/// Method name of the reboot pattern (Node samples).
pub const REBOOT_METHOD: &str = "reboot";

/// Alternative reboot method name used by the Python docs.
pub const REBOOT_DEVICE_METHOD: &str = "rebootDevice";

/// Method name of the factory-reset pattern.
pub const FACTORY_RESET_METHOD: &str = "factoryReset";

/// Method name of the firmware-update pattern.
pub const FIRMWARE_UPDATE_METHOD: &str = "firmwareUpdate";

/// Payload field carrying the firmware package location.
pub const FW_PACKAGE_URI: &str = "fwPackageUri";

/// Query finding devices that reported reboot progress.
pub const REBOOT_REPORTED_QUERY: &str =
    "SELECT * FROM devices WHERE is_defined(properties.reported.iothubDM.reboot)";

/// Query finding devices that reported firmware-update progress.
pub const FIRMWARE_REPORTED_QUERY: &str =
    "SELECT * FROM devices WHERE is_defined(properties.reported.iothubDM.firmwareUpdate)";

/// The `reboot` invocation (no payload).
///
/// # Errors
/// None in practice; the name and payload are within bounds.
pub fn reboot() -> Result<MethodInvocation, Error> {
    MethodInvocation::new(REBOOT_METHOD, Value::Null)
}

/// The `factoryReset` invocation (no payload).
///
/// # Errors
/// None in practice; the name and payload are within bounds.
pub fn factory_reset() -> Result<MethodInvocation, Error> {
    MethodInvocation::new(FACTORY_RESET_METHOD, Value::Null)
}

/// The `firmwareUpdate` invocation with payload `{"fwPackageUri": uri}`.
///
/// # Errors
/// 413001 when the URI makes the payload larger than 128 KB.
pub fn firmware_update(package_uri: &str) -> Result<MethodInvocation, Error> {
    MethodInvocation::new(FIRMWARE_UPDATE_METHOD, json!({ FW_PACKAGE_URI: package_uri }))
}

/// A configuration update: the settings written as desired properties under `section`, for a
/// twin PATCH or a `scheduleUpdateTwin` job (etag `*`).
pub fn configuration_update(section: &str, settings: Map<String, Value>) -> TwinUpdate {
    let mut desired = Map::new();
    desired.insert(section.to_owned(), Value::Object(settings));
    TwinUpdate {
        etag: Some("*".to_owned()),
        properties: Some(TwinUpdateProperties { desired: Some(desired), other: Map::new() }),
        ..TwinUpdate::default()
    }
}

zerotouch_proto::wire_enum! {
    /// `status` of an applied configuration as the device mirrors it (the values are our choice).
    ConfigurationStatus {
        /// Received, not applied yet.
        Pending => "pending",
        /// Applied.
        Applied => "applied",
        /// Could not be applied.
        Failed => "failed",
    }
}

/// The device's reported patch after handling a configuration: the applied settings mirrored
/// under `section`, with a `status` field.
pub fn configuration_report(
    section: &str,
    applied: &Map<String, Value>,
    status: ConfigurationStatus,
) -> Value {
    let mut body = applied.clone();
    body.insert("status".to_owned(), Value::String(status.as_str().to_owned()));
    let mut root = Map::new();
    root.insert(section.to_owned(), Value::Object(body));
    Value::Object(root)
}

/// Wraps `fields` as `{"iothubDM":{operation: fields}}`: a progress report for any operation.
pub fn progress_report(operation: &str, fields: Map<String, Value>) -> Value {
    let mut op = Map::new();
    op.insert(operation.to_owned(), Value::Object(fields));
    let mut root = Map::new();
    root.insert(DM_SECTION.to_owned(), Value::Object(op));
    Value::Object(root)
}

fn one(key: &str, value: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(key.to_owned(), value);
    m
}

fn ts(t: Timestamp) -> Value {
    Value::String(t.to_string())
}

/// Reported patch when a reboot starts: `iothubDM.reboot.startedRebootTime`.
pub fn reboot_started(now: Timestamp) -> Value {
    progress_report("reboot", one("startedRebootTime", ts(now)))
}

/// Reported patch after the device came back: `iothubDM.reboot.lastReboot`.
pub fn reboot_completed(now: Timestamp) -> Value {
    progress_report("reboot", one("lastReboot", ts(now)))
}

/// Reported patch when a factory reset starts: `iothubDM.factoryReset.startedFactoryResetTime`
/// (field name is our choice, mirroring the reboot shape).
pub fn factory_reset_started(now: Timestamp) -> Value {
    progress_report("factoryReset", one("startedFactoryResetTime", ts(now)))
}

/// Reported patch after a factory reset: `iothubDM.factoryReset.lastFactoryReset` (field name is our choice).
pub fn factory_reset_completed(now: Timestamp) -> Value {
    progress_report("factoryReset", one("lastFactoryReset", ts(now)))
}

/// A device's answer to a management method.
#[derive(Debug, Clone, PartialEq)]
pub struct DmReply {
    /// Status of the method response.
    pub status: i32,
    /// Payload of the method response.
    pub payload: Value,
}

/// A management method a device recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmCommand {
    /// `reboot` or `rebootDevice`.
    Reboot,
    /// `factoryReset`.
    FactoryReset,
    /// `firmwareUpdate` with an `https://` package URI.
    FirmwareUpdate {
        /// Where to download the image from.
        package_uri: String,
    },
}

impl DmCommand {
    /// Recognises a management method. `None` for other methods; `Some(Err(reply))` for a
    /// management method with a bad payload (a firmware URI that is not `https://` gets
    /// 400 "Invalid URL format. Must use https:// protocol.").
    pub fn parse(method_name: &str, payload: &Value) -> Option<Result<DmCommand, DmReply>> {
        match method_name {
            REBOOT_METHOD | REBOOT_DEVICE_METHOD => Some(Ok(DmCommand::Reboot)),
            FACTORY_RESET_METHOD => Some(Ok(DmCommand::FactoryReset)),
            FIRMWARE_UPDATE_METHOD => {
                let uri = payload.get(FW_PACKAGE_URI).and_then(Value::as_str).unwrap_or_default();
                if uri.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")) {
                    Some(Ok(DmCommand::FirmwareUpdate { package_uri: uri.to_owned() }))
                } else {
                    Some(Err(DmReply {
                        status: 400,
                        payload: Value::String("Invalid URL format. Must use https:// protocol.".to_owned()),
                    }))
                }
            }
            _ => None,
        }
    }

    /// The immediate 200 answer that acknowledges the command (the work continues afterwards
    /// and is reported through reported properties).
    pub fn accept(&self) -> DmReply {
        let text = match self {
            DmCommand::Reboot => "Reboot started",
            DmCommand::FactoryReset => "Factory reset started",
            DmCommand::FirmwareUpdate { .. } => "Firmware update started.",
        };
        DmReply { status: 200, payload: Value::String(text.to_owned()) }
    }
}

zerotouch_proto::wire_enum! {
    /// `iothubDM.firmwareUpdate.status` through the stages of an update.
    FirmwareUpdateStatus {
        /// Downloading the image.
        Downloading => "downloading",
        /// The image is downloaded.
        DownloadComplete => "download complete",
        /// Applying the image.
        Applying => "applying",
        /// The image is applied; a reboot follows.
        ApplyComplete => "apply firmware image complete",
        /// The download failed.
        DownloadFailed => "Download image failed",
        /// Applying failed.
        ApplyFailed => "Apply image failed",
    }
}

/// Device-side progress of one firmware update: download → apply → reboot. Each step returns
/// the reported patch to send; steps out of order are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareUpdate {
    package_uri: String,
    stage: Option<FirmwareUpdateStatus>,
}

impl FirmwareUpdate {
    /// An update accepted from a `firmwareUpdate` command, nothing reported yet.
    pub fn new(package_uri: impl Into<String>) -> Self {
        Self { package_uri: package_uri.into(), stage: None }
    }

    /// Where the image comes from.
    pub fn package_uri(&self) -> &str {
        &self.package_uri
    }

    /// The last reported stage.
    pub fn stage(&self) -> Option<FirmwareUpdateStatus> {
        self.stage
    }

    fn advance(
        &mut self,
        from: Option<FirmwareUpdateStatus>,
        to: FirmwareUpdateStatus,
        time_key: &str,
        now: Timestamp,
    ) -> Result<Value, Error> {
        if self.stage != from {
            return Err(Error::BadRequest(format!(
                "firmware update cannot go to {to:?} from {:?}",
                self.stage.map_or("accepted", FirmwareUpdateStatus::as_str)
            )));
        }
        self.stage = Some(to);
        let mut fields = one("status", Value::String(to.as_str().to_owned()));
        fields.insert(time_key.to_owned(), ts(now));
        Ok(progress_report("firmwareUpdate", fields))
    }

    /// `downloading` + `startedDownloadingTime`.
    ///
    /// # Errors
    /// [`Error::BadRequest`] unless the update was just accepted.
    pub fn start_download(&mut self, now: Timestamp) -> Result<Value, Error> {
        self.advance(None, FirmwareUpdateStatus::Downloading, "startedDownloadingTime", now)
    }

    /// `download complete` + `downloadCompleteTime`.
    ///
    /// # Errors
    /// [`Error::BadRequest`] unless downloading.
    pub fn download_complete(&mut self, now: Timestamp) -> Result<Value, Error> {
        self.advance(
            Some(FirmwareUpdateStatus::Downloading),
            FirmwareUpdateStatus::DownloadComplete,
            "downloadCompleteTime",
            now,
        )
    }

    /// `applying` + `startedApplyingImage`.
    ///
    /// # Errors
    /// [`Error::BadRequest`] unless the download completed.
    pub fn start_apply(&mut self, now: Timestamp) -> Result<Value, Error> {
        self.advance(
            Some(FirmwareUpdateStatus::DownloadComplete),
            FirmwareUpdateStatus::Applying,
            "startedApplyingImage",
            now,
        )
    }

    /// `apply firmware image complete` + `lastFirmwareUpdate`; the device reboots next and
    /// reports [`reboot_started`].
    ///
    /// # Errors
    /// [`Error::BadRequest`] unless applying.
    pub fn apply_complete(&mut self, now: Timestamp) -> Result<Value, Error> {
        self.advance(
            Some(FirmwareUpdateStatus::Applying),
            FirmwareUpdateStatus::ApplyComplete,
            "lastFirmwareUpdate",
            now,
        )
    }

    /// Reports the failure of the current stage (`Download image failed` while downloading,
    /// `Apply image failed` while applying), with `failedTime` (field name is our choice).
    ///
    /// # Errors
    /// [`Error::BadRequest`] when no download or apply is in progress.
    pub fn fail(&mut self, now: Timestamp) -> Result<Value, Error> {
        match self.stage {
            Some(FirmwareUpdateStatus::Downloading) => self.advance(
                Some(FirmwareUpdateStatus::Downloading),
                FirmwareUpdateStatus::DownloadFailed,
                "failedTime",
                now,
            ),
            Some(FirmwareUpdateStatus::Applying) => self.advance(
                Some(FirmwareUpdateStatus::Applying),
                FirmwareUpdateStatus::ApplyFailed,
                "failedTime",
                now,
            ),
            other => Err(Error::BadRequest(format!(
                "firmware update has nothing in progress to fail (stage {:?})",
                other.map_or("accepted", FirmwareUpdateStatus::as_str)
            ))),
        }
    }
}

/// Management progress read back from a twin's reported properties (service side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmProgress {
    /// `iothubDM.reboot.startedRebootTime`.
    pub reboot_started: Option<Timestamp>,
    /// `iothubDM.reboot.lastReboot`.
    pub last_reboot: Option<Timestamp>,
    /// `iothubDM.factoryReset.startedFactoryResetTime`.
    pub factory_reset_started: Option<Timestamp>,
    /// `iothubDM.firmwareUpdate.status` (unrecognised strings are left out).
    pub firmware_status: Option<FirmwareUpdateStatus>,
    /// `iothubDM.firmwareUpdate.lastFirmwareUpdate`.
    pub last_firmware_update: Option<Timestamp>,
}

impl DmProgress {
    /// Reads the `iothubDM` section of `reported` (the twin's `properties.reported`);
    /// `$metadata` and unknown fields are ignored.
    pub fn from_reported(reported: &Value) -> Self {
        let dm = reported.get(DM_SECTION);
        let time = |op: &str, key: &str| {
            dm.and_then(|d| d.get(op))
                .and_then(|o| o.get(key))
                .and_then(Value::as_str)
                .and_then(|s| Timestamp::parse(s).ok())
        };
        Self {
            reboot_started: time("reboot", "startedRebootTime"),
            last_reboot: time("reboot", "lastReboot"),
            factory_reset_started: time("factoryReset", "startedFactoryResetTime"),
            firmware_status: dm
                .and_then(|d| d.get("firmwareUpdate"))
                .and_then(|f| f.get("status"))
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok()),
            last_firmware_update: time("firmwareUpdate", "lastFirmwareUpdate"),
        }
    }
}
