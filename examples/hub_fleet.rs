//! Running a fleet on an embedded hub: devices planned with tags, configured through desired
//! properties and a broadcast twin job, monitored by query (with GROUP BY and the job's
//! per-device records), then retired by disabling and deleting, with the lifecycle events the
//! hub emits along the way.
//!
//! Run: `cargo run -p zerotouch-examples --example hub_fleet`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinOperation;
use zerotouch_proto::hub::{Device, DeviceStatus};
use zerotouch_proto::jobs::JobRequest;
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};

fn object(v: Value) -> Map<String, Value> {
    let Value::Object(map) = v else { panic!("not an object: {v}") };
    map
}

fn query(hub: &EmbeddedHub, sql: &str) -> Vec<Value> {
    execute(&parse(sql).unwrap(), hub, &PageRequest::default()).unwrap().items
}

fn main() {
    let mut hub = EmbeddedHub::in_memory("plant.example.net", Arc::new(RingCrypto::new())).unwrap();
    let mut now = Timestamp::from_unix_secs(1_800_000_000);

    // Plan: six presses on two floors, each with tags and a desired telemetry interval. Every
    // registry change returns the lifecycle notifications a hub routes (here: printed).
    let mut created = Vec::new();
    for i in 1..=6 {
        let id = DeviceId::new(format!("press-{i}")).unwrap();
        let tags = object(json!({ "floor": if i <= 3 { 1 } else { 2 }, "kind": "press" }));
        let desired = object(json!({ "telemetryInterval": 30 }));
        created.extend(hub.create_device(Device::new(id), Some(&tags), Some(&desired), now).unwrap().events);
    }
    println!(
        "created {} devices; first event: {} {}",
        created.len(),
        created[0].op_type.as_str(),
        created[0].device_id
    );

    // The devices report their firmware (as a device SDK's reported-properties patch would).
    for (i, firmware) in [(1, "1.0"), (2, "1.0"), (3, "0.9"), (4, "1.0"), (5, "0.9"), (6, "1.1")] {
        let id = DeviceId::new(format!("press-{i}")).unwrap();
        let patch = TwinOperation::Reported(object(json!({ "firmware": firmware })));
        hub.update_twin(&id, None, &patch, &IfMatch::Any, now).unwrap();
    }

    // Configure: one twin job lowers the interval of every device on firmware 1.0.
    let request: JobRequest = serde_json::from_value(json!({
        "jobId": "faster-telemetry",
        "type": "scheduleUpdateTwin",
        "queryCondition": "properties.reported.firmware = '1.0'",
        "updateTwin": { "etag": "*", "properties": { "desired": { "telemetryInterval": 10 } } },
        "maxExecutionTimeInSeconds": 600,
    }))
    .unwrap();
    hub.create_job(now, "faster-telemetry", &request).unwrap();
    now = now + Duration::from_secs(1);
    hub.run_jobs(now).unwrap();
    let job = hub.planner().job("faster-telemetry").unwrap();
    let stats = job.device_job_statistics.unwrap_or_default();
    println!(
        "job faster-telemetry: {:?}, {} of {} devices updated",
        job.status, stats.succeeded_count, stats.device_count
    );

    // Monitor: grouped counts, the devices the job changed, and one twin.
    for row in query(
        &hub,
        "SELECT properties.reported.firmware AS firmware, COUNT() AS devices FROM devices \
         GROUP BY properties.reported.firmware",
    ) {
        println!("firmware {}: {} devices", row["firmware"], row["devices"]);
    }
    let changed = query(&hub, "SELECT * FROM devices.jobs WHERE jobId = 'faster-telemetry'");
    let mut ids: Vec<&str> = changed.iter().map(|r| r["deviceId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    println!("updated by the job: {ids:?}");
    let twin = hub.device_twin(&DeviceId::new("press-1").unwrap()).unwrap();
    println!("press-1 desired: {}", twin["properties"]["desired"]);

    // Retire: the old-firmware devices are disabled, then deleted.
    now = now + Duration::from_secs(60);
    let mut deleted = Vec::new();
    for row in query(&hub, "SELECT deviceId FROM devices WHERE properties.reported.firmware = '0.9'") {
        let id = DeviceId::new(row["deviceId"].as_str().unwrap()).unwrap();
        hub.registry()
            .set_device_status(&id, DeviceStatus::Disabled, Some("retired".into()), &IfMatch::Any, now)
            .unwrap();
        deleted.extend(hub.delete_device(&id, &IfMatch::Any, now).unwrap().events);
    }
    let names: Vec<String> =
        deleted.iter().map(|e| format!("{} {}", e.op_type.as_str(), e.device_id)).collect();
    println!("lifecycle events: {names:?}");
    println!("devices left: {}", query(&hub, "SELECT * FROM devices").len());
}
