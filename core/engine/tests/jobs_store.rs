//! The in-memory job store: conditional writes and paging, as the planner and the job query
//! endpoint use them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use zerotouch_engine::error::StoreError;
use zerotouch_engine::jobs::{DeviceJobFilter, JobFilter, JobRecord, JobStore, MemoryJobStore};
use zerotouch_engine::store::{PageRequest, Precondition};
use zerotouch_proto::jobs::{
    DeviceJob, DeviceJobOutcome, DeviceJobStatus, JobId, JobResponse, JobStatus, JobType,
};
use zerotouch_proto::Timestamp;

fn job(id: &str, status: JobStatus) -> JobResponse {
    JobResponse {
        job_id: JobId::new(id).unwrap(),
        query_condition: Some("*".into()),
        created_time: Some(Timestamp::from_unix_secs(1)),
        start_time: Some(Timestamp::from_unix_secs(1)),
        end_time: None,
        max_execution_time_in_seconds: Some(60),
        job_type: JobType::ScheduleUpdateTwin,
        cloud_to_device_method: None,
        update_twin: None,
        status,
        failure_reason: None,
        status_message: None,
        device_job_statistics: None,
    }
}

fn device_job(job: &str, device: &str) -> DeviceJob {
    let t = Timestamp::from_unix_secs(1);
    DeviceJob {
        device_id: device.into(),
        job_id: JobId::new(job).unwrap(),
        job_type: JobType::ScheduleUpdateTwin,
        status: DeviceJobStatus::Pending,
        start_time_utc: t,
        end_time_utc: t,
        created_date_time_utc: t,
        last_updated_date_time_utc: t,
        outcome: DeviceJobOutcome::default(),
        error: None,
    }
}

#[test]
fn job_writes_honour_their_preconditions() {
    let store = MemoryJobStore::new();
    let v1 = JobRecord { job: job("j", JobStatus::Queued), version: 1 };
    assert_eq!(store.put_job(&v1, &Precondition::MustExist), Err(StoreError::NotFound));
    store.put_job(&v1, &Precondition::MustNotExist).unwrap();
    assert_eq!(store.put_job(&v1, &Precondition::MustNotExist), Err(StoreError::AlreadyExists));

    let v2 = JobRecord { job: job("j", JobStatus::Running), version: 2 };
    assert_eq!(store.put_job(&v2, &Precondition::Matches("7".into())), Err(StoreError::PreconditionFailed));
    store.put_job(&v2, &Precondition::Matches(v1.etag().as_str().into())).unwrap();
    let stored = store.job(&JobId::new("j").unwrap()).unwrap().unwrap();
    assert_eq!((stored.version, stored.job.status), (2, JobStatus::Running));
    assert_eq!(store.job(&JobId::new("J").unwrap()).unwrap(), None, "job ids are case-sensitive");
}

#[test]
fn listing_jobs_pages_through_every_match_once() {
    let store = MemoryJobStore::new();
    for i in 0..25 {
        let status = if i % 2 == 0 { JobStatus::Completed } else { JobStatus::Failed };
        store
            .put_job(&JobRecord { job: job(&format!("job-{i:02}"), status), version: 1 }, &Precondition::None)
            .unwrap();
    }
    let filter = JobFilter { job_type: None, status: Some(JobStatus::Completed) };
    let mut page = PageRequest { continuation: None, max_items: 5 };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let p = store.jobs(&filter, &page).unwrap();
        pages += 1;
        assert!(p.items.len() <= 5);
        seen.extend(p.items.into_iter().map(|j| j.job_id.as_str().to_owned()));
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 13);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 13);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(pages, 3);

    let bad = PageRequest { continuation: Some("not a token!".into()), max_items: 5 };
    assert_eq!(store.jobs(&filter, &bad).unwrap_err(), StoreError::InvalidContinuation);
}

#[test]
fn device_job_listing_stays_within_the_requested_job() {
    let store = MemoryJobStore::new();
    for j in ["a", "b", "c"] {
        for d in 0..7 {
            store.put_device_job(&device_job(j, &format!("dev-{d}"))).unwrap();
        }
    }
    let filter = DeviceJobFilter { job_id: Some(JobId::new("b").unwrap()), device_id: None };
    let mut page = PageRequest { continuation: None, max_items: 3 };
    let mut seen = Vec::new();
    loop {
        let p = store.device_jobs(&filter, &page).unwrap();
        assert!(p.items.iter().all(|r| r.job_id.as_str() == "b"));
        seen.extend(p.items.into_iter().map(|r| r.device_id));
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);

    let mut updated = device_job("b", "dev-3");
    updated.status = DeviceJobStatus::Completed;
    store.put_device_job(&updated).unwrap();
    let got = store.device_job(&JobId::new("b").unwrap(), "dev-3").unwrap().unwrap();
    assert_eq!(got.status, DeviceJobStatus::Completed);
}

#[test]
fn a_made_up_job_query_continuation_is_a_bad_request_not_a_server_error() {
    use std::sync::Arc;

    use zerotouch_engine::crypto::RingCrypto;
    use zerotouch_engine::hub_engine::EmbeddedHub;
    use zerotouch_engine::registry::hub_error_code;
    use zerotouch_proto::hub::HubErrorCode;

    let mut hub = EmbeddedHub::in_memory("h.example", Arc::new(RingCrypto::new())).unwrap();
    let page = PageRequest { continuation: Some("not a token!".into()), max_items: 10 };
    let err = hub.planner().jobs(&JobFilter::default(), &page).unwrap_err();
    let wire = err.to_wire();
    assert_eq!((wire.http_status, wire.error_code), (400, 400_004), "{err}");
    assert_eq!(hub_error_code(&err), HubErrorCode::ArgumentInvalid);
}
