//! The fleet both SQL backends' query tests load, and a pager that follows continuation tokens.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::{json, Map, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::jobs::JobStore;
use zerotouch_engine::query::{execute, parse, QuerySource};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::{TwinOperation, TwinStore};
use zerotouch_proto::hub::{Device, DeviceStatus, Module};
use zerotouch_proto::jobs::{DeviceJob, DeviceJobOutcome, DeviceJobStatus, JobId, JobType};
use zerotouch_proto::{DeviceId, IfMatch, ModuleId, Timestamp};

fn object(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// 120 devices with mixed-case tag names (with `colliding_tags`, two of them also carry names
/// that collide in lower case), some disabled, modules with reported properties and device job
/// records, written through an embedded hub over `store`.
pub fn fleet<S>(store: S, colliding_tags: bool) -> EmbeddedHub<S, S, S>
where
    S: IdentityStore + TwinStore + JobStore + Clone,
{
    let hub = EmbeddedHub::over("plant.example.net", store.clone(), Arc::new(RingCrypto::new())).unwrap();
    let now = Timestamp::from_unix_secs(1_700_000_000);
    for i in 0..120 {
        let id = DeviceId::new(format!("dev-{i:03}")).unwrap();
        let mut body = Device::new(id.clone());
        if i % 4 == 0 {
            body.status = DeviceStatus::Disabled;
        }
        let region = ["eu", "us", "Eu"][i % 3];
        let tags = if colliding_tags && i % 60 == 1 {
            json!({ "region": "zz", "REGION": region, "floor": { "level": "f1" } })
        } else if i % 2 == 0 {
            json!({ "region": region, "floor": { "level": format!("f{}", i % 5) } })
        } else {
            json!({ "Region": region, "Floor": { "LEVEL": format!("f{}", i % 5) }, "note": "eu" })
        };
        hub.create_device(body, Some(&object(tags)), None, now).unwrap();
        if i % 3 == 0 {
            let reported = object(json!({ "temp": if i % 2 == 0 { "hot" } else { "cold" } }));
            hub.update_twin(&id, None, &TwinOperation::Reported(reported), &IfMatch::Absent, now).unwrap();
        }
        if i % 10 == 0 {
            for m in ["m1", "m2"] {
                hub.create_module(Module::new(id.clone(), ModuleId::new(m).unwrap()), now).unwrap();
            }
            let reported = object(json!({ "mode": "eco" }));
            let m1 = ModuleId::new("m1").unwrap();
            hub.update_twin(&id, Some(&m1), &TwinOperation::Reported(reported), &IfMatch::Absent, now)
                .unwrap();
        }
        if i % 7 == 0 {
            for job in ["job-a", "job-b"] {
                store
                    .put_device_job(&DeviceJob {
                        device_id: id.to_string(),
                        job_id: JobId::new(job).unwrap(),
                        job_type: JobType::ScheduleUpdateTwin,
                        status: if i % 2 == 0 { DeviceJobStatus::Completed } else { DeviceJobStatus::Failed },
                        start_time_utc: now,
                        end_time_utc: now,
                        created_date_time_utc: now,
                        last_updated_date_time_utc: now,
                        outcome: DeviceJobOutcome::default(),
                        error: None,
                    })
                    .unwrap();
            }
        }
    }
    hub
}

/// Every result of `query` over `source`, fetched in pages of `size`.
pub fn all_results(query: &str, source: &dyn QuerySource, size: usize) -> Vec<Value> {
    let q = parse(query).unwrap();
    let mut page = PageRequest { continuation: None, max_items: size };
    let mut out = Vec::new();
    loop {
        let got = execute(&q, source, &page).unwrap();
        out.extend(got.items);
        match got.continuation {
            Some(c) => page.continuation = Some(c),
            None => return out,
        }
    }
}
