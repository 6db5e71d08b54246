//! Device-management patterns end to end: a back end reboots, resets, reconfigures and updates
//! the firmware of devices; the devices answer and report progress (hub spec §11).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Map, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::jobs::dm::{
    self, ConfigurationStatus, DmCommand, DmProgress, DmReply, FirmwareUpdate, FirmwareUpdateStatus,
};
use zerotouch_engine::jobs::methods::{DeviceMethodRequest, MethodTarget};
use zerotouch_engine::jobs::MethodCalls;
use zerotouch_engine::registry::SessionId;
use zerotouch_proto::{DeviceId, Timestamp};

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000)
}

/// Merges a reported patch into the device's reported properties, as the twin would.
fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// Delivers one pending call to the device, lets it answer with `answer`, and returns the
/// back end's view of the result.
fn round_trip(
    calls: &mut MethodCalls,
    target: &MethodTarget,
    answer: impl FnOnce(&DeviceMethodRequest) -> DmReply,
) -> (i32, Value) {
    let delivery = calls.poll_transmit().expect("delivered");
    let request = DeviceMethodRequest::from_publish(&delivery.topic, &delivery.body).unwrap();
    let reply = answer(&request);
    let (topic, body) = request.respond(reply.status, &reply.payload);
    calls.handle_device_publish(t0(), target, &topic, &body).unwrap();
    let result = calls.poll_event().unwrap().outcome.unwrap();
    (result.status, result.payload)
}

fn device_answer(request: &DeviceMethodRequest) -> DmReply {
    match DmCommand::parse(&request.name, &request.payload) {
        Some(Ok(command)) => command.accept(),
        Some(Err(reject)) => reject,
        None => DmReply { status: 404, payload: json!("unknown method") },
    }
}

fn online_device() -> (MethodCalls, MethodTarget) {
    let mut calls = MethodCalls::new(&RingCrypto::new()).unwrap();
    let target = MethodTarget::device(DeviceId::new("kiosk-7").unwrap());
    calls.handle_device_connected(t0(), target.clone(), SessionId::new(1));
    (calls, target)
}

#[test]
fn rebooting_a_device_answers_at_once_and_the_device_reports_the_reboot() {
    let (mut calls, target) = online_device();
    calls.invoke(t0(), target.clone(), dm::reboot().unwrap());
    let (status, payload) = round_trip(&mut calls, &target, device_answer);
    assert_eq!((status, payload), (200, json!("Reboot started")));

    let mut reported = json!({});
    let started = dm::reboot_started(t0());
    assert_eq!(
        started,
        json!({"iothubDM": {"reboot": {"startedRebootTime": "2023-11-14T22:13:20.0000000Z"}}})
    );
    merge(&mut reported, &started);
    merge(&mut reported, &dm::reboot_completed(t0() + Duration::from_secs(40)));

    let progress = DmProgress::from_reported(&reported);
    assert_eq!(progress.reboot_started, Some(t0()));
    assert_eq!(progress.last_reboot, Some(t0() + Duration::from_secs(40)));
    assert!(dm::REBOOT_REPORTED_QUERY.contains("is_defined(properties.reported.iothubDM.reboot)"));
}

#[test]
fn the_python_docs_reboot_name_is_recognised_too() {
    assert_eq!(DmCommand::parse("rebootDevice", &Value::Null), Some(Ok(DmCommand::Reboot)));
    assert_eq!(DmCommand::parse("setColor", &Value::Null), None);
}

#[test]
fn a_factory_reset_is_acknowledged_and_reported() {
    let (mut calls, target) = online_device();
    calls.invoke(t0(), target.clone(), dm::factory_reset().unwrap());
    let (status, _) = round_trip(&mut calls, &target, device_answer);
    assert_eq!(status, 200);
    let mut reported = json!({});
    merge(&mut reported, &dm::factory_reset_started(t0()));
    assert_eq!(DmProgress::from_reported(&reported).factory_reset_started, Some(t0()));
    assert!(dm::factory_reset_completed(t0())["iothubDM"]["factoryReset"]["lastFactoryReset"].is_string());
}

#[test]
fn a_firmware_update_goes_from_download_to_apply_to_reboot_with_progress_states() {
    let (mut calls, target) = online_device();
    let uri = "https://updates.example.com/fw/2.1.bin";
    let invocation = dm::firmware_update(uri).unwrap();
    assert_eq!(invocation.payload(), &json!({"fwPackageUri": uri}));
    calls.invoke(t0(), target.clone(), invocation);

    let mut update = None;
    let (status, payload) = round_trip(&mut calls, &target, |request| {
        let command = DmCommand::parse(&request.name, &request.payload).unwrap().unwrap();
        if let DmCommand::FirmwareUpdate { package_uri } = &command {
            update = Some(FirmwareUpdate::new(package_uri.clone()));
        }
        command.accept()
    });
    assert_eq!((status, payload), (200, json!("Firmware update started.")));
    let mut update = update.expect("device accepted the update");
    assert_eq!(update.package_uri(), uri);

    let mut reported = json!({});
    let mut seen = Vec::new();
    let mut at = t0();
    type Step = fn(&mut FirmwareUpdate, Timestamp) -> Result<Value, zerotouch_engine::Error>;
    let steps: [Step; 4] = [
        FirmwareUpdate::start_download,
        FirmwareUpdate::download_complete,
        FirmwareUpdate::start_apply,
        FirmwareUpdate::apply_complete,
    ];
    for step in steps {
        at = at + Duration::from_secs(10);
        let patch = step(&mut update, at).unwrap();
        merge(&mut reported, &patch);
        seen.push(DmProgress::from_reported(&reported).firmware_status.unwrap());
    }
    assert_eq!(
        seen,
        [
            FirmwareUpdateStatus::Downloading,
            FirmwareUpdateStatus::DownloadComplete,
            FirmwareUpdateStatus::Applying,
            FirmwareUpdateStatus::ApplyComplete,
        ]
    );
    let fw = &reported["iothubDM"]["firmwareUpdate"];
    assert_eq!(fw["status"], "apply firmware image complete");
    for key in
        ["startedDownloadingTime", "downloadCompleteTime", "startedApplyingImage", "lastFirmwareUpdate"]
    {
        assert!(fw[key].is_string(), "{key} reported");
    }
    assert_eq!(DmProgress::from_reported(&reported).last_firmware_update, Some(at));

    // The device then reboots into the new image.
    merge(&mut reported, &dm::reboot_started(at));
    assert_eq!(DmProgress::from_reported(&reported).reboot_started, Some(at));
}

#[test]
fn firmware_progress_steps_out_of_order_are_refused() {
    let mut update = FirmwareUpdate::new("https://x/fw.bin");
    assert!(update.start_apply(t0()).is_err(), "cannot apply before downloading");
    assert!(update.fail(t0()).is_err(), "nothing to fail yet");
    update.start_download(t0()).unwrap();
    assert!(update.start_download(t0()).is_err(), "already downloading");
    let failed = update.fail(t0()).unwrap();
    assert_eq!(failed["iothubDM"]["firmwareUpdate"]["status"], "Download image failed");
    assert_eq!(update.stage(), Some(FirmwareUpdateStatus::DownloadFailed));

    let mut update = FirmwareUpdate::new("https://x/fw.bin");
    update.start_download(t0()).unwrap();
    update.download_complete(t0()).unwrap();
    update.start_apply(t0()).unwrap();
    assert_eq!(update.fail(t0()).unwrap()["iothubDM"]["firmwareUpdate"]["status"], "Apply image failed");
}

#[test]
fn a_firmware_update_from_a_plain_http_url_is_refused_by_the_device() {
    let (mut calls, target) = online_device();
    calls.invoke(t0(), target.clone(), dm::firmware_update("http://insecure/fw.bin").unwrap());
    let (status, payload) = round_trip(&mut calls, &target, device_answer);
    assert_eq!((status, payload), (400, json!("Invalid URL format. Must use https:// protocol.")));
}

#[test]
fn a_configuration_update_is_written_as_desired_and_mirrored_in_reported() {
    let mut settings = Map::new();
    settings.insert("sendFrequency".into(), json!("5m"));
    settings.insert("units".into(), json!("metric"));
    let update = dm::configuration_update("telemetryConfig", settings.clone());
    assert_eq!(
        serde_json::to_value(&update).unwrap(),
        json!({
            "etag": "*",
            "properties": {"desired": {"telemetryConfig": {"sendFrequency": "5m", "units": "metric"}}}
        })
    );

    let desired = &update.properties.as_ref().unwrap().desired.as_ref().unwrap()["telemetryConfig"];
    let applied = desired.as_object().unwrap();
    let report = dm::configuration_report("telemetryConfig", applied, ConfigurationStatus::Applied);
    assert_eq!(
        report,
        json!({"telemetryConfig": {"sendFrequency": "5m", "units": "metric", "status": "applied"}})
    );
}

#[test]
fn progress_of_any_operation_uses_the_iothubdm_section() {
    let mut fields = Map::new();
    fields.insert("percent".into(), json!(40));
    assert_eq!(
        dm::progress_report("diagnostics", fields),
        json!({"iothubDM": {"diagnostics": {"percent": 40}}})
    );
    assert_eq!(DmProgress::from_reported(&json!({"other": 1})), DmProgress::default());
}
