//! Bulk registry operations and streaming import/export jobs over `devices.txt` lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_support;

use proptest::prelude::*;
use registry_support::*;
use serde_json::{json, Value};
use zerotouch_engine::registry::{ExportJob, ImportJob, LifecycleOperation, MemoryIdentityStore, Registry};
use zerotouch_engine::Error;
use zerotouch_proto::hub::{
    Device, DeviceStatus, ExportImportDevice, HubErrorCode, ImportErrorLogEntry, JobProperties, JobStatus,
    JobType, Module,
};
use zerotouch_proto::IfMatch;

fn import_request() -> JobProperties {
    serde_json::from_value(json!({
        "type": "import",
        "inputBlobContainerUri": "https://blob/in?sig",
        "outputBlobContainerUri": "https://blob/out?sig",
        "storageAuthenticationType": "IdentityBased"
    }))
    .unwrap()
}

struct ImportRun {
    counts: zerotouch_engine::registry::JobCounts,
    errors: Vec<ImportErrorLogEntry>,
    events: Vec<zerotouch_engine::registry::LifecycleEvent>,
    job: ImportJob,
}

fn run_import(reg: &Registry<MemoryIdentityStore>, twins: &TestTwins, lines: Vec<String>) -> ImportRun {
    let mut job = ImportJob::new("job-1", import_request());
    assert_eq!(job.status(), JobStatus::Enqueued);
    let mut errors = Vec::new();
    let mut events = Vec::new();
    let counts = job
        .run(
            reg,
            lines,
            twins,
            later(100),
            &mut |l| errors.push(serde_json::from_str(&l).unwrap()),
            &mut |e| events.push(e),
        )
        .unwrap();
    ImportRun { counts, errors, events, job }
}

fn line(v: Value) -> String {
    v.to_string()
}

fn etag_of(reg: &Registry<MemoryIdentityStore>, name: &str) -> String {
    reg.device(&id(name)).unwrap().etag.unwrap().as_str().to_owned()
}

#[test]
fn import_applies_every_mode_and_logs_one_line_per_failed_row() {
    let reg = registry();
    let twins = TestTwins::default();
    for name in [
        "upd",
        "upd-etag",
        "upd-etag-bad",
        "del",
        "del-etag",
        "del-etag-bad",
        "twin",
        "twin-etag",
        "twin-etag-bad",
        "exists",
    ] {
        reg.create_device(Device::new(id(name)), now()).unwrap();
    }
    twins.update_twin_for_test("twin-etag");
    twins.update_twin_for_test("twin-etag-bad");
    let lines = vec![
        line(json!({"id": "new-default"})),
        line(json!({"id": "new-create", "importMode": "create", "tags": {"site": "a"}})),
        line(json!({"id": "exists", "importMode": "create"})),
        line(json!({"id": "upd", "importMode": "Update", "status": "disabled", "statusReason": "bulk"})),
        line(json!({"id": "missing", "importMode": "update"})),
        line(
            json!({"id": "upd-etag", "importMode": "UpdateIfMatchETag", "eTag": etag_of(&reg, "upd-etag"), "status": "disabled"}),
        ),
        line(json!({"id": "upd-etag-bad", "importMode": "updateIfMatchETag", "eTag": "MTIzNA=="})),
        line(json!({"id": "del", "importMode": "Delete"})),
        line(json!({"id": "gone", "importMode": "delete"})),
        line(json!({"id": "del-etag", "importMode": "DeleteIfMatchETag", "eTag": etag_of(&reg, "del-etag")})),
        line(json!({"id": "del-etag-bad", "importMode": "deleteIfMatchETag", "eTag": "MTIzNA=="})),
        line(json!({"id": "twin", "importMode": "updateTwin", "tags": {"floor": 3}})),
        line(
            json!({"id": "twin-etag", "importMode": "updateTwinIfMatchETag", "twinETag": twin_etag(2), "properties": {"desired": {"rate": 5}}}),
        ),
        line(
            json!({"id": "twin-etag-bad", "importMode": "UpdateTwinIfMatchETag", "twinETag": twin_etag(9), "tags": {"x": 1}}),
        ),
        line(json!({"id": "no-such-twin", "importMode": "updateTwin", "tags": {"x": 1}})),
        line(json!({"id": "new-default", "importMode": "update"})),
        "{\"id\": \"broken\", \"authentication\": {\"type\": \"SELF_SIGNED\"}}".to_owned(),
        "   ".to_owned(),
    ];
    let run = run_import(&reg, &twins, lines);

    assert_eq!(run.job.status(), JobStatus::Completed);
    assert_eq!(run.job.properties().progress, Some(100));
    assert_eq!(run.job.properties().start_time_utc, Some(later(100)));
    assert_eq!(run.job.properties().end_time_utc, Some(later(100)));
    assert_eq!((run.counts.processed, run.counts.succeeded, run.counts.failed), (17, 8, 9));

    // Successful rows.
    assert_eq!(reg.device(&id("new-default")).unwrap().status, DeviceStatus::Enabled);
    assert!(reg.device(&id("new-create")).is_ok());
    assert_eq!(twins.twin("new-create", None).unwrap().tags, Some(json!({"site": "a"})));
    let upd = reg.device(&id("upd")).unwrap();
    assert_eq!((upd.status, upd.status_reason.as_deref()), (DeviceStatus::Disabled, Some("bulk")));
    assert_eq!(reg.device(&id("upd-etag")).unwrap().status, DeviceStatus::Disabled);
    assert!(reg.device(&id("del")).is_err());
    assert!(reg.device(&id("del-etag")).is_err());
    assert_eq!(twins.twin("twin", None).unwrap().tags, Some(json!({"floor": 3})));
    assert_eq!(twins.twin("twin-etag", None).unwrap().properties.desired, Some(json!({"rate": 5})));

    // Failed rows leave things as they were and are logged in order.
    assert_eq!(reg.device(&id("upd-etag-bad")).unwrap().status, DeviceStatus::Enabled);
    assert!(reg.device(&id("del-etag-bad")).is_ok());
    assert_eq!(twins.twin("twin-etag-bad", None).unwrap().tags, Some(json!({"touched": true})));
    assert_eq!(twins.twin("twin-etag-bad", None).unwrap().etag, 2);
    let logged: Vec<(Option<&str>, u32)> =
        run.errors.iter().map(|e| (e.device_id.as_deref(), e.error_code)).collect();
    assert_eq!(
        logged,
        [
            (Some("exists"), HubErrorCode::DeviceAlreadyExists.code()),
            (Some("missing"), HubErrorCode::DeviceNotFound.code()),
            (Some("upd-etag-bad"), HubErrorCode::EtagDoesNotMatch.code()),
            (Some("gone"), HubErrorCode::DeviceNotFound.code()),
            (Some("del-etag-bad"), HubErrorCode::EtagDoesNotMatch.code()),
            (Some("twin-etag-bad"), HubErrorCode::EtagDoesNotMatch.code()),
            (Some("no-such-twin"), HubErrorCode::DeviceNotFound.code()),
            (Some("new-default"), HubErrorCode::DeviceDefinedMultipleTimes.code()),
            (None, 400012),
        ]
    );
    assert!(run.errors.last().unwrap().error_status.starts_with("Invalid device format in line:"));

    // Lifecycle events for the identities the import created and deleted.
    let ops: Vec<(LifecycleOperation, &str)> =
        run.events.iter().map(|e| (e.op_type, e.device_id.as_str())).collect();
    assert_eq!(
        ops,
        [
            (LifecycleOperation::CreateDeviceIdentity, "new-default"),
            (LifecycleOperation::CreateDeviceIdentity, "new-create"),
            (LifecycleOperation::DeleteDeviceIdentity, "del"),
            (LifecycleOperation::DeleteDeviceIdentity, "del-etag"),
        ]
    );
}

#[test]
fn import_handles_module_rows_and_create_or_update_if_match_etag() {
    let reg = registry();
    let twins = TestTwins::default();
    reg.create_device(Device::new(id("gw")), now()).unwrap();
    let lines = vec![
        line(json!({"id": "gw", "moduleId": "m1", "importMode": "create", "managedBy": "IotEdge"})),
        line(json!({"id": "nodev", "moduleId": "m1", "importMode": "create"})),
        line(json!({"id": "fresh", "importMode": "createOrUpdateIfMatchETag"})),
        line(
            json!({"id": "gw", "importMode": "createOrUpdateIfMatchETag", "eTag": "d3Jvbmc=", "status": "disabled"}),
        ),
    ];
    let run = run_import(&reg, &twins, lines);
    assert_eq!(reg.module(&id("gw"), &mid("m1")).unwrap().managed_by.as_deref(), Some("IotEdge"));
    assert!(reg.device(&id("fresh")).is_ok());
    assert_eq!(reg.device(&id("gw")).unwrap().status, DeviceStatus::Enabled);
    let codes: Vec<u32> = run.errors.iter().map(|e| e.error_code).collect();
    assert_eq!(codes, [404001, 400023]);
    assert_eq!(run.errors[0].module_id.as_deref(), Some("m1"));
}

#[test]
fn import_job_moves_through_enqueued_running_completed_and_can_fail() {
    let reg = registry();
    let twins = TestTwins::default();
    let mut job = ImportJob::new("j", import_request());
    assert_eq!(job.properties().kind, Some(JobType::Import));
    assert_eq!(job.properties().job_id.as_deref(), Some("j"));
    assert_eq!(job.properties().input_blob_name.as_deref(), Some("devices.txt"));
    assert!(matches!(job.import_line(&reg, "{\"id\":\"a\"}", &twins, now()), Err(Error::Conflict(_))));
    job.start(now()).unwrap();
    assert_eq!(job.status(), JobStatus::Running);
    job.import_line(&reg, "{\"id\":\"a\"}", &twins, now()).unwrap();
    job.fail("output container not writable", later(1)).unwrap();
    assert_eq!(job.status(), JobStatus::Failed);
    assert_eq!(job.properties().failure_reason.as_deref(), Some("output container not writable"));
    assert!(job.complete(later(2)).is_err(), "an ended job stays ended");
    let json = serde_json::to_value(job.properties()).unwrap();
    assert_eq!(json["status"], "failed");
    assert_eq!(json["type"], "import");
}

#[test]
fn bulk_create_with_a_duplicate_and_an_existing_id_reports_each_entry() {
    let reg = registry();
    let twins = TestTwins::default();
    reg.create_device(Device::new(id("old")), now()).unwrap();
    let entries: Vec<ExportImportDevice> = serde_json::from_value(json!([
        {"id": "b1", "importMode": "create"},
        {"id": "dup", "importMode": "create"},
        {"id": "dup", "importMode": "create"},
        {"id": "old", "importMode": "create"},
        {"id": "b2", "importMode": "create", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}}
    ]))
    .unwrap();
    let out = reg.bulk(&entries, &twins, now()).unwrap();
    let result = out.value;
    assert!(!result.is_successful);
    assert_eq!(result.http_status(), 400);
    let errs: Vec<(&str, HubErrorCode)> =
        result.errors.iter().map(|e| (e.device_id.as_str(), e.error_code)).collect();
    assert_eq!(
        errs,
        [
            ("dup", HubErrorCode::DeviceDefinedMultipleTimes),
            ("dup", HubErrorCode::DeviceDefinedMultipleTimes),
            ("old", HubErrorCode::DeviceAlreadyExists),
        ]
    );
    assert_eq!(result.errors[2].operation.as_deref(), Some("create"));
    assert!(reg.device(&id("b1")).is_ok() && reg.device(&id("b2")).is_ok());
    assert!(reg.device(&id("dup")).is_err());
    assert_eq!(out.events.len(), 2);
    let wire = serde_json::to_value(&result).unwrap();
    assert_eq!(wire["errors"][2]["errorCode"], "DeviceAlreadyExists");
}

#[test]
fn bulk_with_node_casing_updates_and_deletes_and_succeeds_with_200() {
    let reg = registry();
    let twins = TestTwins::default();
    reg.create_device(Device::new(id("n1")), now()).unwrap();
    reg.create_device(Device::new(id("n2")), now()).unwrap();
    let entries: Vec<ExportImportDevice> = serde_json::from_value(json!([
        {"deviceId": "n1", "importMode": "Update", "status": "Disabled"},
        {"deviceId": "n2", "importMode": "DeleteIfMatchETag", "eTag": etag_of(&reg, "n2")},
    ]))
    .unwrap();
    let result = reg.bulk(&entries, &twins, now()).unwrap().value;
    assert!(result.is_successful, "{result:?}");
    assert_eq!(result.http_status(), 200);
    assert_eq!(reg.device(&id("n1")).unwrap().status, DeviceStatus::Disabled);
    assert!(reg.device(&id("n2")).is_err());
}

#[test]
fn bulk_rejects_empty_and_over_100_entry_requests() {
    let reg = registry();
    let twins = TestTwins::default();
    let err = reg.bulk(&[], &twins, now()).unwrap_err();
    assert_eq!(err.to_wire().error_code, 400004);
    let many: Vec<ExportImportDevice> =
        (0..101).map(|i| ExportImportDevice::new(id(&format!("d{i}")), None)).collect();
    assert!(reg.bulk(&many, &twins, now()).is_err());
    assert!(reg.bulk(&many[..100], &twins, now()).unwrap().value.is_successful);
}

fn export_all(reg: &Registry<MemoryIdentityStore>, twins: &TestTwins, exclude_keys: bool) -> Vec<String> {
    let mut job = ExportJob::new(
        "exp",
        JobProperties {
            exclude_keys_in_export: Some(exclude_keys),
            output_blob_container_uri: Some("https://blob/out?sig".into()),
            ..JobProperties::default()
        },
    );
    job.start(now()).unwrap();
    let mut lines = Vec::new();
    while let Some(batch) = job.next_lines(reg, Some(twins), 7).unwrap() {
        assert!(!batch.is_empty());
        lines.extend(batch);
    }
    job.complete(later(1)).unwrap();
    assert_eq!(job.counts().processed, lines.len() as u64);
    assert_eq!(job.properties().output_blob_name.as_deref(), Some("devices.txt"));
    lines
}

#[test]
fn export_streams_devices_with_their_modules_and_twins() {
    let reg = registry();
    let twins = TestTwins::default();
    for i in 0..20 {
        reg.create_device(Device::new(id(&format!("d{i:02}"))), now()).unwrap();
    }
    reg.create_module(Module::new(id("d03"), mid("m")), now()).unwrap();
    twins.update_twin_for_test("d05");
    let lines = export_all(&reg, &twins, false);
    assert_eq!(lines.len(), 21);
    let d03: Value = serde_json::from_str(&lines[3]).unwrap();
    let m: Value = serde_json::from_str(&lines[4]).unwrap();
    assert_eq!(
        (d03["id"].as_str(), m["id"].as_str(), m["moduleId"].as_str()),
        (Some("d03"), Some("d03"), Some("m"))
    );
    assert!(d03["authentication"]["symmetricKey"]["primaryKey"].is_string());
    assert_eq!(d03["status"], "enabled");
    assert!(d03.get("importMode").is_none());
    let d05: Value = serde_json::from_str(&lines[6]).unwrap();
    assert_eq!(d05["twinETag"], twin_etag(2));
    assert_eq!(d05["tags"], json!({"touched": true}));
}

#[test]
fn export_with_exclude_keys_writes_null_keys() {
    let reg = registry();
    let twins = TestTwins::default();
    reg.create_device(Device::new(id("k")), now()).unwrap();
    let lines = export_all(&reg, &twins, true);
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(v["authentication"]["symmetricKey"]["primaryKey"].is_null());
    assert!(v["authentication"]["symmetricKey"]["secondaryKey"].is_null());
    // Importing such a line elsewhere generates fresh keys.
    let other = registry();
    run_import(&other, &TestTwins::default(), lines);
    let k = other.device(&id("k")).unwrap().authentication.unwrap().symmetric_key;
    assert_eq!(k.primary_key.unwrap().len(), 44);
}

impl TestTwins {
    fn update_twin_for_test(&self, device: &str) {
        use zerotouch_engine::registry::TwinSink as _;
        self.update_twin(&id(device), None, Some(&json!({"touched": true})), None, &IfMatch::Any, now())
            .unwrap();
    }
}

/// Export lines without the identity and twin etags, which a registry always assigns itself.
fn comparable(lines: &[String]) -> Vec<Value> {
    let mut out: Vec<Value> = lines
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("eTag");
            v.as_object_mut().unwrap().remove("twinETag");
            v
        })
        .collect();
    out.sort_by_key(|v| v.to_string());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn export_then_import_round_trips_a_random_registry(
        devices in proptest::collection::btree_map(
            "[A-Za-z0-9][A-Za-z0-9:._%#*?!(),=@;$'-]{0,20}",
            (
                any::<bool>(),
                proptest::option::of("[a-z ]{0,20}"),
                any::<bool>(),
                proptest::collection::btree_set("[a-z]{1,8}", 0..3),
                proptest::option::of(proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 1..4)),
            ),
            0..25,
        )
    ) {
        let source = registry();
        let twins = TestTwins::default();
        for (name, (disabled, reason, edge, modules, tags)) in &devices {
            let mut d = Device::new(id(name));
            if *disabled { d.status = DeviceStatus::Disabled; }
            d.status_reason = reason.clone();
            if *edge { d.capabilities = Some(zerotouch_proto::hub::DeviceCapabilities { iot_edge: true }); }
            source.create_device(d, now()).unwrap();
            if let Some(tags) = tags {
                use zerotouch_engine::registry::TwinSink as _;
                twins.update_twin(&id(name), None, Some(&json!(tags)), None, &IfMatch::Any, now()).unwrap();
            }
            for m in modules {
                source.create_module(Module::new(id(name), mid(m)), now()).unwrap();
            }
        }
        let exported = export_all(&source, &twins, false);

        let target = registry();
        let target_twins = TestTwins::default();
        let run = run_import(&target, &target_twins, exported.clone());
        prop_assert!(run.errors.is_empty(), "{:?}", run.errors);
        let reexported = export_all(&target, &target_twins, false);
        let mut expected = comparable(&exported);
        let mut actual = comparable(&reexported);
        // Edge scopes embed the generation id, which a re-created identity does not keep.
        for v in expected.iter_mut().chain(actual.iter_mut()) {
            if v["capabilities"]["iotEdge"] == json!(true) {
                v.as_object_mut().unwrap().remove("deviceScope");
            }
        }
        expected.sort_by_key(|v| v.to_string());
        actual.sort_by_key(|v| v.to_string());
        prop_assert_eq!(expected, actual);
    }
}

#[test]
fn importing_ten_thousand_generated_lines_streams_from_an_iterator() {
    let reg = registry();
    let twins = TestTwins::default();
    let lines = (0..10_000).map(|i| format!("{{\"id\":\"bulk-{i:05}\",\"importMode\":\"create\"}}"));
    let mut job = ImportJob::new("big", import_request());
    let mut errors = 0;
    let counts = job.run(&reg, lines, &twins, now(), &mut |_| errors += 1, &mut |_| {}).unwrap();
    assert_eq!(errors, 0);
    assert_eq!((counts.processed, counts.succeeded), (10_000, 10_000));
    assert_eq!(reg.statistics().unwrap().total_device_count, 10_000);
}

#[test]
fn a_malformed_line_with_keys_is_logged_without_the_keys() {
    let reg = registry();
    let secret = "c2VjcmV0c2VjcmV0c2VjcmV0";
    let bad = format!(
        "{{\"id\":\"leak\",\"authentication\":{{\"symmetricKey\":{{\"primaryKey\":\"{secret}\"}},\"type\":\"BAD\"}}}}"
    );
    let run = run_import(&reg, &TestTwins::default(), vec![bad]);
    assert_eq!(run.errors.len(), 1);
    assert_eq!(run.errors[0].error_code, 400012);
    assert!(run.errors[0].error_status.contains("\"id\":\"leak\""));
    assert!(!run.errors[0].error_status.contains(secret));
}
