//! Storage of scheduled jobs and their `devices.jobs` records, with an in-memory implementation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zerotouch_proto::jobs::{DeviceJob, JobId, JobResponse, JobStatus, JobType};
use zerotouch_proto::{ETag, Timestamp};

use crate::error::StoreError;
use crate::store::{Page, PageRequest, Precondition};

/// A stored job: the wire state plus a version for compare-and-swap writes.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The job as the service API shows it.
    pub job: JobResponse,
    /// Increases by one on every write.
    pub version: u64,
}

impl JobRecord {
    /// The record's etag (its version as text), compared by [`Precondition::Matches`].
    pub fn etag(&self) -> ETag {
        ETag::new(self.version.to_string())
    }
}

/// Filters of `GET /jobs/v2/query?jobType=&jobStatus=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs of this type.
    pub job_type: Option<JobType>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
}

impl JobFilter {
    /// Whether `job` passes the filter.
    pub fn accepts(&self, job: &JobResponse) -> bool {
        self.job_type.is_none_or(|t| t == job.job_type) && self.status.is_none_or(|s| s == job.status)
    }
}

/// Which device job records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceJobFilter {
    /// Only records of this job.
    pub job_id: Option<JobId>,
    /// Only records of this device (case-sensitive).
    pub device_id: Option<String>,
}

impl DeviceJobFilter {
    /// Whether `record` passes the filter.
    pub fn accepts(&self, record: &DeviceJob) -> bool {
        self.job_id.as_ref().is_none_or(|j| *j == record.job_id)
            && self.device_id.as_ref().is_none_or(|d| *d == record.device_id)
    }
}

/// Scheduled jobs keyed by job id (case-sensitive) and device job records keyed by job id and
/// device id.
pub trait JobStore: Send + Sync {
    /// Looks a job up.
    ///
    /// # Errors
    /// Backend failures.
    fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError>;
    /// Writes a job if `pre` holds against the stored record's etag.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError>;
    /// Lists jobs passing `filter`, ordered by job id.
    ///
    /// # Errors
    /// Backend failures; [`StoreError::InvalidContinuation`] for a token this store did not
    /// issue.
    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError>;
    /// Writes (creates or replaces) a device job record.
    ///
    /// # Errors
    /// Backend failures.
    fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError>;
    /// Looks one device job record up.
    ///
    /// # Errors
    /// Backend failures.
    fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError>;
    /// Lists device job records passing `filter`, ordered by job id then device id.
    ///
    /// # Errors
    /// Backend failures; [`StoreError::InvalidContinuation`] for a token this store did not
    /// issue.
    fn device_jobs(
        &self,
        filter: &DeviceJobFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceJob>, StoreError>;
    /// Removes finished jobs whose `endTime` lies before `cutoff`, together with their device
    /// job records; returns how many jobs were removed.
    ///
    /// # Errors
    /// Backend failures.
    fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError>;
}

impl<T: JobStore + ?Sized> JobStore for Arc<T> {
    fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        (**self).job(id)
    }
    fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_job(record, pre)
    }
    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError> {
        (**self).jobs(filter, page)
    }
    fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError> {
        (**self).put_device_job(record)
    }
    fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError> {
        (**self).device_job(job, device_id)
    }
    fn device_jobs(
        &self,
        filter: &DeviceJobFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceJob>, StoreError> {
        (**self).device_jobs(filter, page)
    }
    fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        (**self).purge_jobs(cutoff)
    }
}

type DeviceJobKey = (String, String);

/// [`JobStore`] in memory.
#[derive(Debug, Default)]
pub struct MemoryJobStore {
    jobs: Mutex<BTreeMap<String, JobRecord>>,
    device_jobs: Mutex<BTreeMap<DeviceJobKey, DeviceJob>>,
}

impl MemoryJobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    m.lock().map_err(|_| StoreError::Backend("job store lock poisoned".to_owned()))
}

fn encode_token(parts: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(parts).unwrap_or_default())
}

fn decode_token(token: &str) -> Result<Vec<String>, StoreError> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| StoreError::InvalidContinuation)?;
    serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidContinuation)
}

/// Collects up to `max` accepted items after the cursor; the token names the last one returned
/// when more may follow.
fn collect_page<K: Ord + Clone, V, T>(
    iter: impl Iterator<Item = (K, V)>,
    max: usize,
    accept: impl Fn(&V) -> Option<T>,
    token: impl Fn(&K) -> String,
) -> Page<T> {
    let max = max.max(1);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (k, v) in iter {
        if let Some(t) = accept(&v) {
            if items.len() == max {
                more = true;
                break;
            }
            items.push(t);
            last = Some(k);
        }
    }
    Page { items, continuation: if more { last.as_ref().map(token) } else { None } }
}

impl JobStore for MemoryJobStore {
    fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(lock(&self.jobs)?.get(id.as_str()).cloned())
    }

    fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
        let mut jobs = lock(&self.jobs)?;
        let key = record.job.job_id.as_str();
        pre.check(jobs.get(key).map(JobRecord::etag).as_ref())?;
        jobs.insert(key.to_owned(), record.clone());
        Ok(())
    }

    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError> {
        let jobs = lock(&self.jobs)?;
        let start = match &page.continuation {
            Some(t) => {
                let parts = decode_token(t)?;
                let last = parts.first().cloned().ok_or(StoreError::InvalidContinuation)?;
                Bound::Excluded(last)
            }
            None => Bound::Unbounded,
        };
        let iter = jobs.range::<String, _>((start, Bound::Unbounded));
        Ok(collect_page(
            iter,
            page.max_items,
            |r: &&JobRecord| filter.accepts(&r.job).then(|| r.job.clone()),
            |k: &&String| encode_token(&[k.as_str()]),
        ))
    }

    fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError> {
        lock(&self.device_jobs)?
            .insert((record.job_id.as_str().to_owned(), record.device_id.clone()), record.clone());
        Ok(())
    }

    fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError> {
        Ok(lock(&self.device_jobs)?.get(&(job.as_str().to_owned(), device_id.to_owned())).cloned())
    }

    fn device_jobs(
        &self,
        filter: &DeviceJobFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceJob>, StoreError> {
        let records = lock(&self.device_jobs)?;
        let lower = match &page.continuation {
            Some(t) => match decode_token(t)?.as_slice() {
                [job, device] => Bound::Excluded((job.clone(), device.clone())),
                _ => return Err(StoreError::InvalidContinuation),
            },
            // Narrow the scan to one job's records when the filter names the job.
            None => match &filter.job_id {
                Some(j) => Bound::Included((j.as_str().to_owned(), String::new())),
                None => Bound::Unbounded,
            },
        };
        let iter = records.range::<DeviceJobKey, _>((lower, Bound::Unbounded));
        let job_filter = filter.job_id.as_ref().map(JobId::as_str);
        let iter = iter.take_while(|((j, _), _)| job_filter.is_none_or(|f| f == j));
        Ok(collect_page(
            iter,
            page.max_items,
            |r: &&DeviceJob| filter.accepts(r).then(|| (*r).clone()),
            |(j, d): &&DeviceJobKey| encode_token(&[j.as_str(), d.as_str()]),
        ))
    }

    fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let mut jobs = lock(&self.jobs)?;
        let expired: Vec<String> = jobs
            .iter()
            .filter(|(_, r)| r.job.status.is_terminal() && r.job.end_time.is_some_and(|t| t < cutoff))
            .map(|(k, _)| k.clone())
            .collect();
        let mut records = lock(&self.device_jobs)?;
        for id in &expired {
            jobs.remove(id);
            let keys: Vec<DeviceJobKey> = records
                .range::<DeviceJobKey, _>((Bound::Included((id.clone(), String::new())), Bound::Unbounded))
                .take_while(|((j, _), _)| j == id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                records.remove(&k);
            }
        }
        Ok(expired.len())
    }
}
