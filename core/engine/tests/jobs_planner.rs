//! Scheduled jobs: what a back end sees when it schedules twin updates and methods over a query
//! condition (hub spec §8).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::error::Error;
use zerotouch_engine::jobs::methods::MethodTarget;
use zerotouch_engine::jobs::planner::EXECUTION_TIME_EXCEEDED;
use zerotouch_engine::jobs::{
    hub_error, DeviceJobFilter, DeviceSelector, JobFilter, JobLimits, JobPlanner, JobStore, MemoryJobStore,
    MethodCalls, TwinPatcher,
};
use zerotouch_engine::registry::SessionId;
use zerotouch_engine::store::PageRequest;
use zerotouch_proto::jobs::{
    DeviceJob, DeviceJobStatistics, DeviceJobStatus, HubErrorCode, JobId, JobRequest, JobStatus, JobType,
    TwinUpdate,
};
use zerotouch_proto::{DeviceId, Timestamp};

fn t0() -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

/// A fleet of devices with tags and desired properties: selects by `*`,
/// `tags.<key> = '<value>'` or `deviceId = '<id>'`, and patches desired properties.
/// Tags and desired properties of one device.
type DeviceState = (Value, Map<String, Value>);

#[derive(Default)]
struct Fleet {
    devices: Mutex<BTreeMap<String, DeviceState>>,
    refuse_etag: Mutex<Vec<String>>,
}

impl Fleet {
    fn with(devices: &[(&str, Value)]) -> Arc<Self> {
        let fleet = Fleet::default();
        for (d, tags) in devices {
            fleet.devices.lock().unwrap().insert((*d).to_owned(), (tags.clone(), Map::new()));
        }
        Arc::new(fleet)
    }

    fn desired(&self, device: &str) -> Map<String, Value> {
        self.devices.lock().unwrap()[device].1.clone()
    }
}

impl DeviceSelector for Fleet {
    fn select(&self, condition: &str) -> Result<Vec<DeviceId>, Error> {
        let devices = self.devices.lock().unwrap();
        if condition == "*" {
            return Ok(devices.keys().map(|d| id(d)).collect());
        }
        let (lhs, rhs) = condition.split_once(" = ").ok_or_else(|| {
            hub_error(HubErrorCode::IotHubFormatError, "The query is invalid: expected '='.")
        })?;
        let value = rhs.trim_matches('\'');
        Ok(devices
            .iter()
            .filter(|(d, (tags, _))| match lhs.strip_prefix("tags.") {
                Some(key) => tags.get(key) == Some(&json!(value)),
                None => lhs == "deviceId" && d.as_str() == value,
            })
            .map(|(d, _)| id(d))
            .collect())
    }
}

impl TwinPatcher for Fleet {
    fn update_twin(&self, _now: Timestamp, device: &DeviceId, update: &TwinUpdate) -> Result<(), Error> {
        if self.refuse_etag.lock().unwrap().iter().any(|d| d == device.as_str()) {
            return Err(hub_error(HubErrorCode::PreconditionFailed, "The etag does not match."));
        }
        let mut devices = self.devices.lock().unwrap();
        let (_, desired) = devices
            .get_mut(device.as_str())
            .ok_or_else(|| hub_error(HubErrorCode::DeviceNotFound, "no such device"))?;
        let patch = update.properties.as_ref().and_then(|p| p.desired.clone()).unwrap_or_default();
        for (k, v) in patch {
            if v.is_null() {
                desired.remove(&k);
            } else {
                desired.insert(k, v);
            }
        }
        Ok(())
    }
}

struct Hub {
    fleet: Arc<Fleet>,
    planner: JobPlanner<Arc<MemoryJobStore>, Arc<Fleet>>,
    methods: MethodCalls,
}

impl Hub {
    fn new(fleet: Arc<Fleet>, limits: JobLimits) -> Self {
        let planner = JobPlanner::new(Arc::new(MemoryJobStore::new()), Arc::clone(&fleet), limits);
        Hub { fleet, planner, methods: MethodCalls::new(&RingCrypto::new()).unwrap() }
    }

    fn run(&mut self, now: Timestamp) {
        let others = self.planner.run(now, &self.fleet, &mut self.methods).unwrap();
        assert!(others.is_empty(), "every call here belongs to a job");
    }

    fn stats(&self, job: &str) -> DeviceJobStatistics {
        self.planner.job(job).unwrap().device_job_statistics.unwrap()
    }

    fn device_job(&self, job: &str, device: &str) -> DeviceJob {
        self.planner.store().device_job(&JobId::new(job).unwrap(), device).unwrap().unwrap()
    }
}

fn stats(device: u64, succeeded: u64, failed: u64, running: u64, pending: u64) -> DeviceJobStatistics {
    DeviceJobStatistics {
        device_count: device,
        succeeded_count: succeeded,
        failed_count: failed,
        running_count: running,
        pending_count: pending,
    }
}

fn twin_job(job: &str, condition: &str, desired: Value) -> JobRequest {
    serde_json::from_value(json!({
        "jobId": job, "type": "scheduleUpdateTwin",
        "updateTwin": {"properties": {"desired": desired}, "etag": "*"},
        "queryCondition": condition, "startTime": null, "maxExecutionTimeInSeconds": 3600
    }))
    .unwrap()
}

fn method_job(job: &str, condition: &str, method: &str, connect: i64, max_exec: i64) -> JobRequest {
    serde_json::from_value(json!({
        "jobId": job, "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": method, "payload": {"delay": 1},
            "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": connect},
        "queryCondition": condition, "maxExecutionTimeInSeconds": max_exec
    }))
    .unwrap()
}

fn building_fleet() -> Arc<Fleet> {
    Fleet::with(&[
        ("sensor-1", json!({"building": "43"})),
        ("sensor-2", json!({"building": "43"})),
        ("sensor-3", json!({"building": "43"})),
        ("sensor-9", json!({"building": "7"})),
    ])
}

#[test]
fn a_broadcast_job_that_sets_desired_telemetry_interval_reaches_every_matching_device() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    let request = twin_job("set-interval", "tags.building = '43'", json!({"telemetryInterval": 30}));
    let created = hub.planner.create(t0(), "set-interval", &request).unwrap();
    assert_eq!(created.status, JobStatus::Queued);
    let wire = serde_json::to_value(&created).unwrap();
    assert_eq!(
        (wire["jobId"].clone(), wire["type"].clone()),
        (json!("set-interval"), json!("scheduleUpdateTwin"))
    );
    assert_eq!(wire["status"], "queued");

    hub.run(t0());

    for d in ["sensor-1", "sensor-2", "sensor-3"] {
        assert_eq!(hub.fleet.desired(d)["telemetryInterval"], 30, "{d}");
        let record = hub.device_job("set-interval", d);
        assert_eq!(record.status, DeviceJobStatus::Completed);
        assert_eq!(record.job_type, JobType::ScheduleUpdateTwin);
        assert_eq!(record.outcome.device_method_response, None);
    }
    assert!(hub.fleet.desired("sensor-9").is_empty(), "a device of another building is untouched");
    let job = hub.planner.job("set-interval").unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.end_time, Some(t0()));
    assert_eq!(hub.stats("set-interval"), stats(3, 3, 0, 0, 0));

    let filter = DeviceJobFilter { job_id: Some(JobId::new("set-interval").unwrap()), device_id: None };
    let page = hub.planner.store().device_jobs(&filter, &PageRequest::default()).unwrap();
    assert_eq!(page.items.len(), 3);
    assert_eq!(page.continuation, None);
}

#[test]
fn a_job_scheduled_for_later_waits_for_its_start_time() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    let mut request = twin_job("night", "*", json!({"mode": "eco"}));
    request.start_time = Some(t0() + secs(3600));
    assert_eq!(hub.planner.create(t0(), "night", &request).unwrap().status, JobStatus::Scheduled);
    assert_eq!(hub.planner.poll_timeout(), Some(t0() + secs(3600)));

    hub.run(t0() + secs(3599));
    assert!(hub.fleet.desired("sensor-1").is_empty());
    assert_eq!(hub.planner.job("night").unwrap().status, JobStatus::Scheduled);

    hub.run(t0() + secs(3600));
    assert_eq!(hub.fleet.desired("sensor-9")["mode"], "eco");
    assert_eq!(hub.stats("night"), stats(4, 4, 0, 0, 0));
    assert_eq!(hub.planner.poll_timeout(), None, "nothing left to do");
}

#[test]
fn a_twin_update_refused_for_one_device_is_recorded_on_its_device_job() {
    let fleet = building_fleet();
    fleet.refuse_etag.lock().unwrap().push("sensor-2".into());
    let mut hub = Hub::new(fleet, JobLimits::default());
    hub.planner.create(t0(), "j", &twin_job("j", "tags.building = '43'", json!({"x": 1}))).unwrap();
    hub.run(t0());
    let failed = hub.device_job("j", "sensor-2");
    assert_eq!(failed.status, DeviceJobStatus::Failed);
    assert_eq!(failed.error.unwrap().code, "PreconditionFailed");
    assert_eq!(hub.planner.job("j").unwrap().status, JobStatus::Completed);
    assert_eq!(hub.stats("j"), stats(3, 2, 1, 0, 0));
}

#[test]
fn a_method_job_collects_each_answer_and_fails_devices_that_stay_offline() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    let online = MethodTarget::device(id("sensor-1"));
    hub.methods.handle_device_connected(t0(), online.clone(), SessionId::new(1));
    hub.planner
        .create(t0(), "reboot-43", &method_job("reboot-43", "tags.building = '43'", "reboot", 15, 600))
        .unwrap();
    hub.run(t0());
    assert_eq!(hub.stats("reboot-43"), stats(3, 0, 0, 3, 0));
    assert_eq!(hub.device_job("reboot-43", "sensor-2").status, DeviceJobStatus::Running);

    // sensor-1 is online: the request is published at once; it answers 200.
    let d1 = hub.methods.poll_transmit().unwrap();
    assert_eq!(d1.target, online);
    assert!(d1.topic.starts_with("$iothub/methods/POST/reboot/?$rid="));
    hub.methods
        .handle_device_response(t0() + secs(1), &online, &d1.rid, 200, br#""Reboot started""#)
        .unwrap();
    hub.run(t0() + secs(1));
    let record = hub.device_job("reboot-43", "sensor-1");
    assert_eq!(record.status, DeviceJobStatus::Completed);
    assert_eq!(
        serde_json::to_value(&record.outcome).unwrap(),
        json!({"deviceMethodResponse": {"status": 200, "payload": "Reboot started"}})
    );

    // sensor-3 comes online within the connect timeout and answers with an error status.
    let late = MethodTarget::device(id("sensor-3"));
    hub.methods.handle_device_connected(t0() + secs(5), late.clone(), SessionId::new(1));
    let d3 = hub.methods.poll_transmit().unwrap();
    hub.methods.handle_device_response(t0() + secs(6), &late, &d3.rid, 500, b"{}").unwrap();
    hub.run(t0() + secs(6));
    assert_eq!(hub.stats("reboot-43"), stats(3, 2, 0, 1, 0));

    // sensor-2 never connects: 404103 after the job's connect timeout.
    hub.run(t0() + secs(15));
    let offline = hub.device_job("reboot-43", "sensor-2");
    assert_eq!(offline.status, DeviceJobStatus::Failed);
    let error = offline.error.unwrap();
    assert_eq!(error.code, "DeviceNotOnline");
    assert_eq!(error.description, "Timed out waiting for device to connect.");
    assert_eq!(hub.stats("reboot-43"), stats(3, 2, 1, 0, 0));
    assert_eq!(hub.planner.job("reboot-43").unwrap().status, JobStatus::Completed);
}

#[test]
fn cancelling_a_running_job_cancels_the_devices_that_have_not_answered() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    for d in ["sensor-1", "sensor-2", "sensor-3"] {
        hub.methods.handle_device_connected(t0(), MethodTarget::device(id(d)), SessionId::new(1));
    }
    hub.planner
        .create(t0(), "long", &method_job("long", "tags.building = '43'", "selfTest", 0, 600))
        .unwrap();
    hub.run(t0());
    let deliveries: Vec<_> = std::iter::from_fn(|| hub.methods.poll_transmit()).collect();
    assert_eq!(deliveries.len(), 3);
    let first = &deliveries[0];
    hub.methods.handle_device_response(t0() + secs(1), &first.target, &first.rid, 200, b"null").unwrap();
    hub.run(t0() + secs(1));

    let cancelled = hub.planner.cancel(t0() + secs(2), "long").unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(cancelled.end_time, Some(t0() + secs(2)));
    assert_eq!(cancelled.device_job_statistics.unwrap(), stats(3, 1, 0, 0, 0));
    hub.run(t0() + secs(2));
    assert_eq!(hub.methods.pending(), 0, "the job's calls are abandoned");

    let second = &deliveries[1];
    assert_eq!(hub.device_job("long", second.target.device.as_str()).status, DeviceJobStatus::Canceled);
    assert!(
        hub.methods.handle_device_response(t0() + secs(3), &second.target, &second.rid, 200, b"{}").is_err(),
        "a late answer to a cancelled job is dropped"
    );
    let first_record = hub.device_job("long", first.target.device.as_str());
    assert_eq!(first_record.status, DeviceJobStatus::Completed);

    // Cancelling again returns the job unchanged.
    assert_eq!(hub.planner.cancel(t0() + secs(9), "long").unwrap(), hub.planner.job("long").unwrap());
    assert_eq!(hub.planner.job("long").unwrap().status, JobStatus::Cancelled);
}

#[test]
fn a_job_that_runs_out_of_execution_time_fails_the_unfinished_devices() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.methods.handle_device_connected(t0(), MethodTarget::device(id("sensor-1")), SessionId::new(1));
    hub.planner
        .create(t0(), "short", &method_job("short", "deviceId = 'sensor-1'", "slowOp", 0, 10))
        .unwrap();
    hub.run(t0());
    assert_eq!(hub.planner.poll_timeout(), Some(t0() + secs(10)));
    hub.run(t0() + secs(10));
    let job = hub.planner.job("short").unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.failure_reason.unwrap().contains("maxExecutionTimeInSeconds"));
    assert_eq!(hub.stats("short"), stats(1, 0, 1, 0, 0));
    let record = hub.device_job("short", "sensor-1");
    assert_eq!(record.status, DeviceJobStatus::Failed);
    assert_eq!(record.error.unwrap().code, EXECUTION_TIME_EXCEEDED);
    assert_eq!(record.end_time_utc, t0() + secs(10));
    assert_eq!(hub.methods.pending(), 0);
}

#[test]
fn a_job_whose_start_time_lies_in_the_past_gets_its_whole_budget_from_when_it_starts() {
    // The client's clock is two minutes behind: the start time it sends is already past.
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    let mut request = twin_job("skewed", "*", json!({"mode": "eco"}));
    request.start_time = Some(t0() - secs(120));
    request.max_execution_time_in_seconds = Some(60);
    hub.planner.create(t0(), "skewed", &request).unwrap();
    hub.run(t0());
    assert_eq!(hub.planner.job("skewed").unwrap().status, JobStatus::Completed);
    assert_eq!(hub.stats("skewed"), stats(4, 4, 0, 0, 0));
    assert_eq!(hub.fleet.desired("sensor-1")["mode"], "eco");

    // A method job that starts late also has its full budget from its start.
    hub.methods.handle_device_connected(t0(), MethodTarget::device(id("sensor-1")), SessionId::new(1));
    let mut request = method_job("late", "deviceId = 'sensor-1'", "slowOp", 0, 10);
    request.start_time = Some(t0() - secs(60));
    hub.planner.create(t0(), "late", &request).unwrap();
    hub.run(t0() + secs(5));
    assert_eq!(hub.planner.job("late").unwrap().status, JobStatus::Running);
    assert_eq!(hub.device_job("late", "sensor-1").end_time_utc, t0() + secs(15));
    assert_eq!(hub.planner.poll_timeout(), Some(t0() + secs(15)));
    hub.run(t0() + secs(15));
    assert_eq!(hub.planner.job("late").unwrap().status, JobStatus::Failed);
}

#[test]
fn a_job_over_no_matching_device_completes_with_zero_devices() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.planner.create(t0(), "none", &twin_job("none", "tags.building = '99'", json!({"a": 1}))).unwrap();
    hub.run(t0());
    assert_eq!(hub.planner.job("none").unwrap().status, JobStatus::Completed);
    assert_eq!(hub.stats("none"), stats(0, 0, 0, 0, 0));
}

#[test]
fn a_condition_the_query_engine_rejects_fails_the_job_with_its_message() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.planner.create(t0(), "bad", &twin_job("bad", "SELECT * FROM devices", json!({"a": 1}))).unwrap();
    hub.run(t0());
    let job = hub.planner.job("bad").unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.failure_reason.as_deref(), Some("The query is invalid: expected '='."));
}

#[test]
fn device_operations_are_throttled_to_the_configured_rate() {
    let fleet =
        Fleet::with(&(0..5).map(|i| (["d0", "d1", "d2", "d3", "d4"][i], json!({}))).collect::<Vec<_>>());
    let limits = JobLimits { device_operations_per_second: Some(2), ..JobLimits::default() };
    let mut hub = Hub::new(fleet, limits);
    hub.planner.create(t0(), "slow", &twin_job("slow", "*", json!({"v": 1}))).unwrap();
    hub.run(t0());
    assert_eq!(hub.stats("slow"), stats(5, 1, 0, 0, 4));
    assert_eq!(hub.planner.poll_timeout(), Some(t0() + Duration::from_millis(500)));
    hub.run(t0() + Duration::from_millis(500));
    assert_eq!(hub.stats("slow").succeeded_count, 2);
    hub.run(t0() + secs(2));
    assert_eq!(hub.stats("slow").succeeded_count, 3, "no burst after a pause");
    let mut now = t0() + secs(2);
    while let Some(next) = hub.planner.poll_timeout() {
        now = next;
        hub.run(now);
    }
    assert_eq!(now, t0() + secs(3));
    assert_eq!(hub.planner.job("slow").unwrap().status, JobStatus::Completed);
}

#[test]
fn creating_a_job_with_a_taken_id_is_refused_with_409104() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.planner.create(t0(), "j1", &twin_job("j1", "*", json!({"a": 1}))).unwrap();
    let w = hub.planner.create(t0(), "j1", &twin_job("j1", "*", json!({"a": 2}))).unwrap_err().to_wire();
    assert_eq!((w.http_status, w.error_code), (409, 409104));
}

#[test]
fn too_many_active_jobs_is_refused_with_403003() {
    let limits = JobLimits { max_active_jobs: 1, ..JobLimits::default() };
    let mut hub = Hub::new(building_fleet(), limits);
    let mut later = twin_job("a", "*", json!({"a": 1}));
    later.start_time = Some(t0() + secs(60));
    hub.planner.create(t0(), "a", &later).unwrap();
    let w = hub.planner.create(t0(), "b", &twin_job("b", "*", json!({}))).unwrap_err().to_wire();
    assert_eq!(
        (w.http_status, w.error_code, w.message.as_str()),
        (403, 403003, "Job quota has been exceeded")
    );
    hub.planner.cancel(t0(), "a").unwrap();
    assert!(hub.planner.create(t0(), "b", &twin_job("b", "*", json!({}))).is_ok());
}

#[test]
fn invalid_job_requests_are_rejected_with_the_hub_codes() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    let code = |r: Result<_, Error>| r.unwrap_err().to_wire().error_code;

    let mut no_condition = twin_job("x", "*", json!({}));
    no_condition.query_condition = None;
    assert_eq!(code(hub.planner.create(t0(), "x", &no_condition)), 400005);

    let mismatch = twin_job("other", "*", json!({}));
    assert_eq!(code(hub.planner.create(t0(), "x", &mismatch)), 400004);

    let mut bad_timeout = method_job("x", "*", "m", 0, 60);
    bad_timeout.cloud_to_device_method.as_mut().unwrap().response_timeout_in_seconds = Some(301);
    assert_eq!(code(hub.planner.create(t0(), "x", &bad_timeout)), 400004);

    let mut no_method = method_job("x", "*", "m", 0, 60);
    no_method.cloud_to_device_method = None;
    assert_eq!(code(hub.planner.create(t0(), "x", &no_method)), 400005);

    let mut export = twin_job("x", "*", json!({}));
    export.job_type = Some(JobType::Export);
    assert_eq!(code(hub.planner.create(t0(), "x", &export)), 400004);

    let mut no_budget = twin_job("x", "*", json!({}));
    no_budget.max_execution_time_in_seconds = Some(0);
    assert_eq!(code(hub.planner.create(t0(), "x", &no_budget)), 400004);

    assert_eq!(code(hub.planner.create(t0(), "a/b", &twin_job("a/b", "*", json!({})))), 400004);

    let missing = hub.planner.job("nope").unwrap_err().to_wire();
    assert_eq!((missing.http_status, missing.error_code), (404, 404002));
    assert_eq!(code(hub.planner.cancel(t0(), "nope")), 404002);
}

#[test]
fn listing_jobs_filters_by_type_and_status_and_pages() {
    let mut hub = Hub::new(building_fleet(), JobLimits { max_active_jobs: 100, ..JobLimits::default() });
    for i in 0..5 {
        let name = format!("twin-{i}");
        hub.planner.create(t0(), &name, &twin_job(&name, "*", json!({"i": i}))).unwrap();
    }
    let mut later = method_job("method-0", "*", "m", 0, 60);
    later.start_time = Some(t0() + secs(600));
    hub.planner.create(t0(), "method-0", &later).unwrap();
    hub.run(t0());

    let completed_twins =
        JobFilter { job_type: Some(JobType::ScheduleUpdateTwin), status: Some(JobStatus::Completed) };
    let mut page = PageRequest { continuation: None, max_items: 2 };
    let mut seen = Vec::new();
    loop {
        let p = hub.planner.jobs(&completed_twins, &page).unwrap();
        seen.extend(p.items.into_iter().map(|j| j.job_id.as_str().to_owned()));
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, ["twin-0", "twin-1", "twin-2", "twin-3", "twin-4"]);

    let scheduled = JobFilter { job_type: None, status: Some(JobStatus::Scheduled) };
    let p = hub.planner.jobs(&scheduled, &PageRequest::default()).unwrap();
    assert_eq!(p.items.len(), 1);
    assert_eq!(p.items[0].job_type, JobType::ScheduleDeviceMethod);
    assert_eq!(p.items[0].cloud_to_device_method.as_ref().unwrap().connect_timeout_in_seconds, Some(0));
}

#[test]
fn a_restarted_planner_runs_queued_jobs_and_fails_interrupted_ones() {
    let store = Arc::new(MemoryJobStore::new());
    let fleet = building_fleet();
    let mut methods = MethodCalls::new(&RingCrypto::new()).unwrap();
    {
        let mut first = JobPlanner::new(Arc::clone(&store), Arc::clone(&fleet), JobLimits::default());
        first.create(t0(), "interrupted", &method_job("interrupted", "*", "m", 30, 600)).unwrap();
        first.run(t0(), &fleet, &mut methods).unwrap();
        let mut later = twin_job("later", "*", json!({"after": "restart"}));
        later.start_time = Some(t0() + secs(60));
        first.create(t0(), "later", &later).unwrap();
    }
    let mut second = JobPlanner::new(Arc::clone(&store), Arc::clone(&fleet), JobLimits::default());
    assert_eq!(second.recover(t0() + secs(30)).unwrap(), 2);
    let interrupted = second.job("interrupted").unwrap();
    assert_eq!(interrupted.status, JobStatus::Failed);
    assert_eq!(interrupted.device_job_statistics.unwrap(), stats(4, 0, 4, 0, 0));
    let record = store.device_job(&JobId::new("interrupted").unwrap(), "sensor-1").unwrap().unwrap();
    assert_eq!(record.status, DeviceJobStatus::Failed);
    second.run(t0() + secs(60), &fleet, &mut methods).unwrap();
    assert_eq!(second.job("later").unwrap().status, JobStatus::Completed);
    assert_eq!(fleet.desired("sensor-9")["after"], "restart");
}

#[test]
fn device_job_records_are_listed_per_device_across_jobs() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.planner.create(t0(), "a", &twin_job("a", "*", json!({"a": 1}))).unwrap();
    hub.planner.create(t0(), "b", &twin_job("b", "deviceId = 'sensor-9'", json!({"b": 1}))).unwrap();
    hub.run(t0());
    let filter = DeviceJobFilter { job_id: None, device_id: Some("sensor-9".into()) };
    let records = hub.planner.store().device_jobs(&filter, &PageRequest::default()).unwrap().items;
    let jobs: Vec<&str> = records.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(jobs, ["a", "b"]);
    let wire = serde_json::to_value(&records[0]).unwrap();
    assert_eq!(wire["deviceId"], "sensor-9");
    assert_eq!(wire["jobType"], "scheduleUpdateTwin");
    assert_eq!(wire["status"], "completed");
    assert_eq!(wire["startTimeUtc"], "2023-11-14T22:13:20.0000000Z");
    assert_eq!(wire["endTimeUtc"], "2023-11-14T23:13:20.0000000Z");
}

#[test]
fn finished_jobs_are_forgotten_after_thirty_days() {
    let mut hub = Hub::new(building_fleet(), JobLimits::default());
    hub.planner.create(t0(), "old", &twin_job("old", "*", json!({"a": 1}))).unwrap();
    let mut pending = twin_job("future", "*", json!({"a": 2}));
    pending.start_time = Some(t0() + secs(90 * 24 * 3600));
    hub.planner.create(t0(), "future", &pending).unwrap();
    hub.run(t0());
    let day = 24 * 3600;
    assert_eq!(hub.planner.purge_history(t0() + secs(30 * day)).unwrap(), 0);
    assert_eq!(hub.planner.purge_history(t0() + secs(30 * day + 1)).unwrap(), 1);
    assert_eq!(hub.planner.job("old").unwrap_err().to_wire().error_code, 404002);
    assert_eq!(hub.planner.store().device_job(&JobId::new("old").unwrap(), "sensor-1").unwrap(), None);
    assert_eq!(hub.planner.job("future").unwrap().status, JobStatus::Scheduled, "unfinished jobs stay");
}

#[test]
fn a_method_job_over_twenty_thousand_devices_that_connect_late_completes() {
    let names: Vec<String> = (0..20_000).map(|i| format!("meter-{i:05}")).collect();
    let fleet = Fleet::with(&names.iter().map(|n| (n.as_str(), json!({}))).collect::<Vec<_>>());
    let mut hub = Hub::new(fleet, JobLimits::default());
    hub.planner.create(t0(), "read", &method_job("read", "*", "readMeter", 60, 600)).unwrap();
    hub.run(t0());
    assert_eq!(hub.methods.pending(), 20_000);
    let now = t0() + secs(10);
    for n in &names {
        hub.methods.handle_device_connected(now, MethodTarget::device(id(n)), SessionId::new(1));
    }
    let deliveries: Vec<_> = std::iter::from_fn(|| hub.methods.poll_transmit()).collect();
    assert_eq!(deliveries.len(), 20_000);
    for d in &deliveries {
        hub.methods.handle_device_response(now, &d.target, &d.rid, 200, b"1").unwrap();
    }
    hub.run(now);
    assert_eq!(hub.stats("read"), stats(20_000, 20_000, 0, 0, 0));
    assert_eq!(hub.planner.job("read").unwrap().status, JobStatus::Completed);
}
