//! Bulk registry jobs on an embedded hub stored in SQLite: an import job streams `devices.txt`
//! lines (identities with tags, plus two bad lines that land in the error log, one line each),
//! then an export job streams the registry back out, keys excluded, page by page.
//!
//! Run: `cargo run -p zerotouch-examples --example registry_import_export [-- DEVICES]`
//! (default 2 000 devices).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use serde_json::json;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::registry::{ExportJob, ImportJob};
use zerotouch_proto::hub::JobProperties;
use zerotouch_proto::Timestamp;
use zerotouch_store::sqlite::SqliteStore;

fn job(kind: &str, exclude_keys: bool) -> JobProperties {
    serde_json::from_value(json!({
        "type": kind,
        "inputBlobContainerUri": "https://storage.example/in?sig",
        "outputBlobContainerUri": "https://storage.example/out?sig",
        "excludeKeysInExport": exclude_keys,
    }))
    .unwrap()
}

fn main() {
    let devices: usize = std::env::args().nth(1).map_or(2_000, |n| n.parse().expect("a device count"));
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    let view = store.hub("plant.example.net").unwrap();
    let hub = EmbeddedHub::over("plant.example.net", view, Arc::new(RingCrypto::new())).unwrap();
    let now = Timestamp::from_unix_secs(1_800_000_000);

    // devices.txt: one JSON object per line, as IoT Hub's import reads it from blob storage.
    let mut lines: Vec<String> = (0..devices)
        .map(|i| {
            json!({
                "id": format!("meter-{i:05}"),
                "importMode": "create",
                "status": "enabled",
                "tags": { "district": format!("d{}", i % 7) },
            })
            .to_string()
        })
        .collect();
    lines.push("{ not json".to_owned());
    lines.push(json!({ "id": "meter-00000", "importMode": "create" }).to_string());

    let mut import = ImportJob::new("import-1", job("import", false));
    let mut errors = Vec::new();
    let mut created = 0usize;
    let counts = import
        .run(hub.registry(), lines, hub.core(), now, &mut |line| errors.push(line), &mut |_event| {
            created += 1
        })
        .unwrap();
    println!("import: {counts:?}, {created} identities created, status {:?}", import.status());
    for line in &errors {
        println!("  error log: {line}");
    }

    let mut export = ExportJob::new("export-1", job("export", true));
    export.start(now).unwrap();
    let (mut exported, mut first) = (0usize, None);
    while let Some(page) = export.next_lines(hub.registry(), Some(hub.core()), 500).unwrap() {
        exported += page.len();
        first = first.or_else(|| page.into_iter().next());
    }
    export.complete(now).unwrap();
    println!("export: {exported} lines, status {:?}", export.status());
    println!("  first line: {}", first.unwrap_or_default());
    assert_eq!(exported, devices);
}
