//! Property test: whatever devices do (answer late, stay silent, never connect) and whenever the
//! back end cancels, a method job's statistics add up, every device ends with a terminal record,
//! and the job ends in a terminal status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::error::Error;
use zerotouch_engine::jobs::methods::MethodTarget;
use zerotouch_engine::jobs::{
    DeviceJobFilter, DeviceSelector, JobLimits, JobPlanner, JobStore, MemoryJobStore, MethodCalls,
    TwinPatcher,
};
use zerotouch_engine::registry::SessionId;
use zerotouch_engine::store::PageRequest;
use zerotouch_proto::jobs::{DeviceJobStatus, JobId, JobRequest, TwinUpdate};
use zerotouch_proto::{DeviceId, Timestamp};

#[derive(Debug, Clone)]
enum Behaviour {
    /// Online from the start; answers `delay` seconds after delivery.
    Answers { delay: u64, status: i32 },
    /// Connects at `at` seconds, then answers after one second.
    ConnectsAt { at: u64 },
    /// Online but never answers.
    Silent,
    /// Never connects.
    Offline,
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        (0u64..8, prop_oneof![Just(200), Just(404), Just(500)])
            .prop_map(|(delay, status)| Behaviour::Answers { delay, status }),
        (0u64..6).prop_map(|at| Behaviour::ConnectsAt { at }),
        Just(Behaviour::Silent),
        Just(Behaviour::Offline),
    ]
}

struct Fleet(Vec<DeviceId>);

impl DeviceSelector for Fleet {
    fn select(&self, _condition: &str) -> Result<Vec<DeviceId>, Error> {
        Ok(self.0.clone())
    }
}

struct NoTwins;

impl TwinPatcher for NoTwins {
    fn update_twin(&self, _: Timestamp, _: &DeviceId, _: &TwinUpdate) -> Result<(), Error> {
        Err(Error::BadRequest("method jobs only".into()))
    }
}

fn scenario(
    behaviours: Vec<Behaviour>,
    max_exec: i64,
    rate: Option<u32>,
    cancel_at: Option<u64>,
) -> Result<(), TestCaseError> {
    let t0 = Timestamp::from_unix_secs(1_700_000_000);
    let ids: Vec<DeviceId> =
        (0..behaviours.len()).map(|i| DeviceId::new(format!("d{i:02}")).unwrap()).collect();
    let store = Arc::new(MemoryJobStore::new());
    let limits = JobLimits { device_operations_per_second: rate, ..JobLimits::default() };
    let mut planner = JobPlanner::new(Arc::clone(&store), Fleet(ids.clone()), limits);
    let mut methods = MethodCalls::new(&RingCrypto::new()).unwrap();
    for (id, b) in ids.iter().zip(&behaviours) {
        if matches!(b, Behaviour::Answers { .. } | Behaviour::Silent) {
            methods.handle_device_connected(t0, MethodTarget::device(id.clone()), SessionId::new(1));
        }
    }
    let request: JobRequest = serde_json::from_value(json!({
        "type": "scheduleDeviceMethod", "queryCondition": "*", "maxExecutionTimeInSeconds": max_exec,
        "cloudToDeviceMethod":
            {"methodName": "m", "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 3}
    }))
    .unwrap();
    planner.create(t0, "p", &request).unwrap();
    let job_id = JobId::new("p").unwrap();

    // (due second, device index, rid) of answers still to send.
    let mut answers: Vec<(u64, usize, String)> = Vec::new();
    for second in 0..40u64 {
        let now = t0 + Duration::from_secs(second);
        for (i, b) in behaviours.iter().enumerate() {
            if matches!(b, Behaviour::ConnectsAt { at } if *at == second) {
                methods.handle_device_connected(now, MethodTarget::device(ids[i].clone()), SessionId::new(1));
            }
        }
        if cancel_at == Some(second) {
            planner.cancel(now, "p").unwrap();
        }
        for _ in 0..2 {
            planner.run(now, &NoTwins, &mut methods).unwrap();
            while let Some(d) = methods.poll_transmit() {
                let i = ids.iter().position(|id| *id == d.target.device).unwrap();
                let delay = match behaviours[i] {
                    Behaviour::Answers { delay, .. } => Some(delay),
                    Behaviour::ConnectsAt { .. } => Some(1),
                    Behaviour::Silent | Behaviour::Offline => None,
                };
                if let Some(delay) = delay {
                    answers.push((second + delay, i, d.rid));
                }
            }
            let due: Vec<_> = answers.iter().filter(|a| a.0 <= second).cloned().collect();
            answers.retain(|a| a.0 > second);
            for (_, i, rid) in due {
                let status = match behaviours[i] {
                    Behaviour::Answers { status, .. } => status,
                    _ => 200,
                };
                // Answers to abandoned or expired calls are refused; that is fine.
                let _ = methods.handle_device_response(
                    now,
                    &MethodTarget::device(ids[i].clone()),
                    &rid,
                    status,
                    b"{}",
                );
            }
        }

        let job = planner.job("p").unwrap();
        let s = job.device_job_statistics.unwrap();
        let records = store
            .device_jobs(
                &DeviceJobFilter { job_id: Some(job_id.clone()), device_id: None },
                &PageRequest { continuation: None, max_items: 1000 },
            )
            .unwrap()
            .items;
        let count = |st: DeviceJobStatus| records.iter().filter(|r| r.status == st).count() as u64;
        // A job cancelled before its first run never resolves its devices.
        let expected = if cancel_at == Some(0) { 0 } else { ids.len() };
        prop_assert_eq!(s.device_count, expected as u64);
        prop_assert_eq!(records.len(), expected);
        prop_assert_eq!(s.succeeded_count, count(DeviceJobStatus::Completed));
        prop_assert_eq!(s.failed_count, count(DeviceJobStatus::Failed));
        prop_assert_eq!(s.running_count, count(DeviceJobStatus::Running));
        prop_assert_eq!(s.pending_count, count(DeviceJobStatus::Pending));
        prop_assert_eq!(
            s.device_count,
            s.succeeded_count
                + s.failed_count
                + s.running_count
                + s.pending_count
                + count(DeviceJobStatus::Canceled)
        );
    }

    let job = planner.job("p").unwrap();
    prop_assert!(job.status.is_terminal(), "job still {:?}", job.status);
    prop_assert!(job.end_time.is_some());
    prop_assert_eq!(planner.poll_timeout(), None);
    prop_assert_eq!(methods.pending(), 0);
    let records = store
        .device_jobs(&DeviceJobFilter::default(), &PageRequest { continuation: None, max_items: 1000 })
        .unwrap()
        .items;
    prop_assert!(records.iter().all(|r| r.status.is_terminal()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn method_job_statistics_always_add_up(
        behaviours in prop::collection::vec(behaviour(), 0..12),
        max_exec in 1i64..20,
        rate in prop::option::of(1u32..6),
        cancel_at in prop::option::of(0u64..20),
    ) {
        scenario(behaviours, max_exec, rate, cancel_at)?;
    }
}
