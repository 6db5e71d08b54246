//! Every body in `testdata/hub/` parses into its proto type; hub-emitted bodies serialize back to
//! the same JSON, client bodies the hub normalizes parse the way hub spec §0 and §2–§3 document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use zerotouch_proto::hub::{
    AuthenticationType, BulkRegistryOperationResult, ConnectionState, Device, DeviceStatus,
    ExportImportDevice, HubErrorCode, ImportErrorLogEntry, ImportMode, JobProperties, JobStatus, JobType,
    Module, StorageAuthenticationType, DEVICES_BLOB_NAME, IMPORT_ERRORS_BLOB_NAME,
};
use zerotouch_proto::service::QuerySpecification;
use zerotouch_proto::twin::{Twin, TwinPatch};
use zerotouch_proto::{ETag, IfMatch};

fn fixture_dir() -> PathBuf {
    manifest_dir().join("../../testdata/hub")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(fixture_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn parse<T: DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&read(name)).unwrap_or_else(|e| panic!("{name} does not parse: {e}"))
}

/// Parses `text` into `T`, serializes it again and demands the same JSON value back.
fn same_json_back<T: DeserializeOwned + Serialize>(what: &str, text: &str) -> T {
    let original: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"));
    let typed: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        original,
        "{what} changed on the way through its proto type"
    );
    typed
}

fn round_trip<T: DeserializeOwned + Serialize>(name: &str) -> T {
    same_json_back(name, &read(name))
}

/// Non-empty lines of a JSON-lines fixture.
fn lines(name: &str) -> Vec<String> {
    read(name).lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

macro_rules! fixtures {
    ($($test:ident: $ty:ty = $file:literal;)+) => {
        /// Fixtures that must come back as the same JSON.
        const ROUND_TRIPS: &[&str] = &[$($file),+];
        $(
            #[test]
            fn $test() {
                round_trip::<$ty>($file);
            }
        )+
    };
}

fixtures! {
    sas_device_as_returned_round_trips: Device = "device_sas.json";
    self_signed_leaf_device_as_returned_round_trips: Device = "device_selfsigned.json";
    module_as_returned_round_trips: Module = "module_sas.json";
    device_twin_as_returned_round_trips: Twin = "twin_device.json";
    module_twin_as_returned_round_trips: Twin = "twin_module.json";
    twin_patch_body_round_trips: TwinPatch = "twin_patch.json";
    query_request_round_trips: QuerySpecification = "query_request.json";
    query_result_page_of_twins_round_trips: Vec<Twin> = "query_result_twins.json";
    failed_bulk_registry_result_round_trips: BulkRegistryOperationResult = "bulk_registry_result_failed.json";
    successful_bulk_registry_result_round_trips: BulkRegistryOperationResult = "bulk_registry_result_ok.json";
    python_export_job_request_round_trips: JobProperties = "job_export_request_python.json";
    completed_export_job_round_trips: JobProperties = "job_export_completed.json";
    failed_import_job_round_trips: JobProperties = "job_import_failed.json";
}

/// Fixtures checked by a dedicated test below (normalized inputs, JSON-lines files, the README).
const CHECKED_ELSEWHERE: &[&str] = &[
    "README.md",
    "device_sas_never_connected_legacy_times.json",
    "device_create_node.json",
    "device_create_python.json",
    "twin_patch_python_full_twin.json",
    "bulk_registry_request_node.json",
    "job_import_request_node.json",
    "devices.txt",
    "import_errors.log",
];

#[test]
fn legacy_never_set_times_without_zone_read_as_never_and_come_back_with_z() {
    let text = read("device_sas_never_connected_legacy_times.json");
    let device: Device = serde_json::from_str(&text).unwrap();
    assert_eq!(device.connection_state_updated_time, None);
    assert_eq!(device.status_updated_time, None);
    assert_eq!(device.last_activity_time, None);
    let expected: Value =
        serde_json::from_str(&text.replace("0001-01-01T00:00:00\"", "0001-01-01T00:00:00Z\"")).unwrap();
    assert_eq!(serde_json::to_value(&device).unwrap(), expected);
}

#[test]
fn node_create_body_with_empty_keys_means_generate_keys() {
    let device: Device = parse("device_create_node.json");
    assert_eq!(device.device_id.as_str(), "node-dev-1");
    assert_eq!(device.status, DeviceStatus::Enabled);
    assert_eq!(device.etag, None);
    assert_eq!(device.connection_state, ConnectionState::Disconnected);
    let auth = device.authentication.unwrap();
    assert_eq!(auth.kind, AuthenticationType::Sas);
    assert_eq!(auth.symmetric_key.primary_key.as_deref(), Some(""));
    assert_eq!(auth.symmetric_key.secondary_key.as_deref(), Some(""));
    assert_eq!(auth.x509_thumbprint.primary_thumbprint, None);
}

#[test]
fn python_create_body_without_keys_means_generate_keys() {
    let device: Device = parse("device_create_python.json");
    assert_eq!(device.device_id.as_str(), "py-dev-1");
    assert_eq!(device.status, DeviceStatus::Enabled);
    let auth = device.authentication.unwrap();
    assert_eq!(auth.kind, AuthenticationType::Sas);
    assert_eq!(auth.symmetric_key.primary_key, None);
    assert_eq!(auth.symmetric_key.secondary_key, None);
}

#[test]
fn python_twin_update_with_whole_twin_keeps_only_writable_sections() {
    let patch: TwinPatch = parse("twin_patch_python_full_twin.json");
    assert_eq!(patch.if_match(), IfMatch::Tag("AAAAAAAAAAE=".into()));
    let desired = patch.desired().unwrap();
    assert_eq!(desired.len(), 1, "$metadata and $version are not desired properties");
    assert_eq!(desired["telemetryConfig"]["sendFrequency"], "1m");
    assert_eq!(patch.tags.unwrap()["location"]["region"], "EU");
    let back = serde_json::to_value(parse::<TwinPatch>("twin_patch_python_full_twin.json")).unwrap();
    assert!(back.get("deviceId").is_none() && back.get("version").is_none());
}

#[test]
fn node_bulk_request_parses_with_node_mode_casing_and_device_fields() {
    let entries: Vec<ExportImportDevice> = parse("bulk_registry_request_node.json");
    let modes: Vec<ImportMode> = entries.iter().map(ExportImportDevice::mode).collect();
    assert_eq!(modes, [ImportMode::Create, ImportMode::UpdateIfMatchETag, ImportMode::Delete]);
    let created = entries[0].authentication.as_ref().unwrap();
    assert_eq!(created.symmetric_key.primary_key.as_deref(), Some(""));
    // Node sends a fetched Device renamed to `id`: its lower-case `etag` is the identity etag.
    assert_eq!(entries[1].e_tag.as_ref().map(ETag::as_str), Some("MQ=="));
    assert_eq!(entries[1].status, Some(DeviceStatus::Disabled));
    assert!(entries.len() <= 100);
}

#[test]
fn node_import_job_request_with_identity_based_storage_parses() {
    let job: JobProperties = parse("job_import_request_node.json");
    assert_eq!(job.kind, Some(JobType::Import));
    assert_eq!(job.storage_authentication_type, Some(StorageAuthenticationType::IdentityBased));
    assert!(job.input_blob_container_uri.is_some() && job.output_blob_container_uri.is_some());
    assert_eq!(job.input_blob_name, None, "absent means {DEVICES_BLOB_NAME}");
    let back = serde_json::to_value(&job).unwrap();
    assert_eq!(back["storageAuthenticationType"], "identityBased");
}

#[test]
fn job_end_states_are_terminal() {
    let done: JobProperties = parse("job_export_completed.json");
    let failed: JobProperties = parse("job_import_failed.json");
    assert!(done.status.is_some_and(JobStatus::is_terminal));
    assert_eq!(failed.status, Some(JobStatus::Failed));
    assert!(failed.failure_reason.is_some());
}

#[test]
fn every_import_line_parses_and_hub_spelled_lines_round_trip() {
    let mut seen = HashSet::new();
    for (n, line) in lines(DEVICES_BLOB_NAME).iter().enumerate() {
        let what = format!("{DEVICES_BLOB_NAME} line {}", n + 1);
        let entry: ExportImportDevice =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
        seen.insert(entry.mode());
        let raw: Value = serde_json::from_str(line).unwrap();
        let spelled = raw.get("importMode").and_then(Value::as_str);
        match spelled {
            // Node capitalises the first letter; we answer in the hub's camelCase.
            Some(s) if s != entry.mode().as_str() => {
                assert!(s.eq_ignore_ascii_case(entry.mode().as_str()), "{what}");
                let back = serde_json::to_value(&entry).unwrap();
                assert_eq!(back["importMode"], entry.mode().as_str(), "{what}");
            }
            _ => {
                same_json_back::<ExportImportDevice>(&what, line);
            }
        }
    }
    let all = [
        ImportMode::CreateOrUpdate,
        ImportMode::Create,
        ImportMode::Update,
        ImportMode::UpdateIfMatchETag,
        ImportMode::CreateOrUpdateIfMatchETag,
        ImportMode::Delete,
        ImportMode::DeleteIfMatchETag,
        ImportMode::UpdateTwin,
        ImportMode::UpdateTwinIfMatchETag,
    ];
    for mode in all {
        assert!(seen.contains(&mode), "{DEVICES_BLOB_NAME} has no {mode:?} line");
    }
}

#[test]
fn import_error_log_lines_parse_and_round_trip() {
    let entries: Vec<ImportErrorLogEntry> = lines("import_errors.log")
        .iter()
        .enumerate()
        .map(|(n, l)| same_json_back(&format!("{IMPORT_ERRORS_BLOB_NAME} line {}", n + 1), l))
        .collect();
    assert_eq!(HubErrorCode::from_code(entries[0].error_code), Some(HubErrorCode::DeserializationError));
    assert_eq!(entries[0].device_id, None);
    assert_eq!(entries[2].module_id.as_deref(), Some("filter"));
}

#[test]
fn every_fixture_is_listed_in_the_readme_and_tested() {
    let readme = read("README.md");
    let tested: BTreeSet<&str> = ROUND_TRIPS.iter().chain(CHECKED_ELSEWHERE).copied().collect();
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "README.md" {
            assert!(readme.contains(&format!("`{name}`")), "{name} is not listed in testdata/hub/README.md");
        }
        assert!(tested.contains(name.as_str()), "{name} has no test");
        on_disk.insert(name);
    }
    for name in &tested {
        assert!(on_disk.contains(*name), "{name} is tested but missing");
    }
}

/// This crate's directory as cargo gives it when running the test: a binary reused from a shared
/// build cache may have been compiled in a checkout elsewhere, so the compile-time path is only
/// the fallback.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
