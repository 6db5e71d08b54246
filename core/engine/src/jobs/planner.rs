//! The scheduled-job planner: `scheduleUpdateTwin` and `scheduleDeviceMethod` over a query
//! condition, run as time passes (hub spec §8).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use zerotouch_proto::jobs::{
    CloudToDeviceMethodResult, DeviceJob, DeviceJobError, DeviceJobOutcome, DeviceJobStatistics,
    DeviceJobStatus, HubErrorCode, JobId, JobRequest, JobResponse, JobStatus, JobType, TwinUpdate,
};
use zerotouch_proto::{DeviceId, Timestamp};

use super::hub_error;
use super::methods::{CallId, MethodCalls, MethodCompletion, MethodFailure, MethodInvocation, MethodTarget};
use super::store::{DeviceJobFilter, JobFilter, JobRecord, JobStore};
use crate::error::{Error, StoreError};
use crate::store::{Page, PageRequest, Precondition};

/// Longest query condition accepted (the hub's query text limit).
pub const MAX_QUERY_CONDITION_LEN: usize = 8192;

/// Execution budget of a job whose request names none (the Node SDK's default).
pub const DEFAULT_MAX_EXECUTION_TIME: Duration = Duration::from_secs(3600);

/// How long finished jobs stay queryable (the hub keeps 30 days of job history).
pub const JOB_HISTORY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Error code recorded on device jobs still unfinished when the job's budget runs out
/// (our choice: the hub's name for it is not documented).
pub const EXECUTION_TIME_EXCEEDED: &str = "JobMaxExecutionTimeExceeded";

/// Resolves a job's `queryCondition` to the devices it applies to. Implemented by the query
/// engine over the twin store.
pub trait DeviceSelector: Send + Sync {
    /// Devices matching `condition`: a WHERE clause over `devices` (without `SELECT`), or `*`
    /// for every device.
    ///
    /// # Errors
    /// A condition that does not parse or cannot be evaluated; the job then fails with the
    /// error's message as `failureReason`.
    fn select(&self, condition: &str) -> Result<Vec<DeviceId>, Error>;
}

/// Applies a job's twin update to one device as a service-side PATCH (tags and desired merged,
/// `null` deletes, If-Match from `update.etag` with absent meaning `*`). Implemented by the twin
/// module.
pub trait TwinPatcher: Send + Sync {
    /// Patches the twin of `device`.
    ///
    /// # Errors
    /// Unknown device, etag mismatch, limit violations; recorded on the device job.
    fn update_twin(&self, now: Timestamp, device: &DeviceId, update: &TwinUpdate) -> Result<(), Error>;
}

impl<T: DeviceSelector + ?Sized> DeviceSelector for Arc<T> {
    fn select(&self, condition: &str) -> Result<Vec<DeviceId>, Error> {
        (**self).select(condition)
    }
}

impl<T: TwinPatcher + ?Sized> TwinPatcher for Arc<T> {
    fn update_twin(&self, now: Timestamp, device: &DeviceId, update: &TwinUpdate) -> Result<(), Error> {
        (**self).update_twin(now, device, update)
    }
}

/// Operating limits of the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs that may be queued, scheduled or running at once (S3 tier: 10); more ⇒ 403003.
    pub max_active_jobs: usize,
    /// Device operations (twin updates and method invocations) started per second across all
    /// jobs; `None` for no limit (the hub throttles at 10/s on S1, 50/s per unit on S3).
    pub device_operations_per_second: Option<u32>,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self { max_active_jobs: 10, device_operations_per_second: None }
    }
}

/// What the planner asks the hub to do for one device.
#[derive(Debug, Clone, PartialEq)]
pub enum JobAction {
    /// Apply `update` to the twin of `device`, then report with
    /// [`JobPlanner::handle_device_outcome`].
    UpdateTwin {
        /// The job.
        job_id: JobId,
        /// The device.
        device: DeviceId,
        /// The patch (shared by every device of the job).
        update: Arc<TwinUpdate>,
    },
    /// Invoke `invocation` on `device` through [`MethodCalls`], then report the completion with
    /// [`JobPlanner::handle_method_completion`] (after [`JobPlanner::handle_method_started`]).
    InvokeMethod {
        /// The job.
        job_id: JobId,
        /// The device.
        device: DeviceId,
        /// The method (shared by every device of the job).
        invocation: Arc<MethodInvocation>,
    },
    /// Forget a method call of a job that was cancelled or ran out of time.
    AbandonMethodCall {
        /// The call.
        call: CallId,
    },
}

/// How one device's part of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceOutcome {
    /// The twin update was applied.
    TwinUpdated,
    /// The device answered the method (any status counts as success).
    MethodAnswered(CloudToDeviceMethodResult),
    /// The operation failed.
    Failed(DeviceJobError),
}

impl DeviceOutcome {
    /// A failure from an engine error, named by its hub error code where it has one.
    pub fn from_error(error: &Error) -> Self {
        let code = match error {
            Error::Hub { code, .. } => {
                HubErrorCode::from_code(*code).map_or_else(|| code.to_string(), |c| c.name().to_owned())
            }
            Error::PreconditionFailed | Error::Store(StoreError::PreconditionFailed) => {
                HubErrorCode::PreconditionFailed.name().to_owned()
            }
            Error::NotFound(_) | Error::Store(StoreError::NotFound) => {
                HubErrorCode::DeviceNotFound.name().to_owned()
            }
            other => other.to_wire().error_code.to_string(),
        };
        let description = match error {
            Error::Hub { message, .. } => message.clone(),
            other => other.to_string(),
        };
        DeviceOutcome::Failed(DeviceJobError { code, description })
    }

    /// The outcome of a finished method call.
    pub fn from_method(outcome: &Result<CloudToDeviceMethodResult, MethodFailure>) -> Self {
        match outcome {
            Ok(result) => DeviceOutcome::MethodAnswered(result.clone()),
            Err(failure) => DeviceOutcome::Failed(DeviceJobError {
                code: failure.code().name().to_owned(),
                description: failure.message(),
            }),
        }
    }
}

#[derive(Debug)]
struct ActiveJob {
    record: JobRecord,
    start: Timestamp,
    /// `maxExecutionTimeInSeconds`, counted from when the job actually starts.
    budget: Duration,
    /// When the budget runs out: set when the job starts (a start time already past when the
    /// job is created, as a client clock behind ours sends, takes nothing from the budget).
    deadline: Timestamp,
    invocation: Option<Arc<MethodInvocation>>,
    update: Option<Arc<TwinUpdate>>,
    started: bool,
    pending: VecDeque<DeviceId>,
    open: HashMap<DeviceId, DeviceJob>,
    calls: HashMap<CallId, DeviceId>,
    device_calls: HashMap<DeviceId, CallId>,
}

impl ActiveJob {
    fn stats(&mut self) -> &mut DeviceJobStatistics {
        self.record.job.device_job_statistics.get_or_insert_with(DeviceJobStatistics::default)
    }
}

/// Runs scheduled jobs.
///
/// Call order: [`create`](Self::create) for `PUT /jobs/v2/{id}`, [`cancel`](Self::cancel) for
/// `POST /jobs/v2/{id}/cancel`, [`job`](Self::job) / [`jobs`](Self::jobs) for reads. At
/// [`poll_timeout`](Self::poll_timeout) (and after every create) call
/// [`handle_timeout`](Self::handle_timeout), then drain [`poll_action`](Self::poll_action) and
/// carry each action out — or let [`execute`](Self::execute) / [`run`](Self::run) do it with a
/// [`TwinPatcher`] and the hub's [`MethodCalls`]. Feed finished method calls to
/// [`handle_method_completion`](Self::handle_method_completion) (it says whether the call was
/// a job's; the others belong to REST callers).
///
/// A job whose start time has come resolves its condition once, creates a `pending` device job
/// per device, dispatches them (throttled by [`JobLimits`]) and completes when every device job
/// finished; when `maxExecutionTimeInSeconds` (counted from when the job starts, not from its
/// requested start time) runs out first, the unfinished device jobs and the job fail. Every change is written to the [`JobStore`] at once, so reads see live statistics.
pub struct JobPlanner<S: JobStore, D: DeviceSelector> {
    store: S,
    selector: D,
    limits: JobLimits,
    active: BTreeMap<JobId, ActiveJob>,
    actions: VecDeque<JobAction>,
    next_operation: Timestamp,
}

impl<S: JobStore, D: DeviceSelector> JobPlanner<S, D> {
    /// A planner with no active jobs.
    pub fn new(store: S, selector: D, limits: JobLimits) -> Self {
        Self {
            store,
            selector,
            limits,
            active: BTreeMap::new(),
            actions: VecDeque::new(),
            next_operation: Timestamp::EPOCH,
        }
    }

    /// The job store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Takes over the unfinished jobs of the store after a restart: queued and scheduled jobs
    /// run as planned; jobs that were running fail, since their in-flight device operations are
    /// lost. Returns how many jobs were taken over.
    ///
    /// # Errors
    /// Store failures.
    pub fn recover(&mut self, now: Timestamp) -> Result<usize, Error> {
        let mut page = PageRequest { continuation: None, max_items: 1000 };
        let mut found = Vec::new();
        loop {
            let Page { items, continuation } = self.store.jobs(&JobFilter::default(), &page)?;
            found.extend(items.into_iter().filter(|j| !j.status.is_terminal()));
            match continuation {
                Some(c) => page.continuation = Some(c),
                None => break,
            }
        }
        let mut taken = 0;
        for job in found {
            let Some(record) = self.store.job(&job.job_id)? else { continue };
            let start = record.job.start_time.unwrap_or(now);
            let budget = budget_of(&record.job);
            let invocation = match &record.job.cloud_to_device_method {
                Some(m) => Some(Arc::new(MethodInvocation::from_wire(m)?)),
                None => None,
            };
            let update = record.job.update_twin.clone().map(Arc::new);
            let mut active = ActiveJob {
                record,
                start,
                budget,
                deadline: start + budget,
                update,
                invocation,
                started: false,
                pending: VecDeque::new(),
                open: HashMap::new(),
                calls: HashMap::new(),
                device_calls: HashMap::new(),
            };
            if active.record.job.status == JobStatus::Running {
                self.fail_interrupted_devices(&mut active, now)?;
                active.record.job.status = JobStatus::Failed;
                active.record.job.failure_reason = Some("The job was interrupted by a restart.".to_owned());
                active.record.job.end_time = Some(now);
                self.write_job(&mut active)?;
            } else {
                self.active.insert(active.record.job.job_id.clone(), active);
            }
            taken += 1;
        }
        Ok(taken)
    }

    /// Accepts `PUT /jobs/v2/{job_id}`: validates the request and stores the job as `queued`
    /// (start time now or past) or `scheduled` (future start).
    ///
    /// # Errors
    /// 400004 for a bad id, an id differing from the body's, an unsupported type, a bad method
    /// or a non-positive budget; 400005 for a missing condition, method or twin; 413001 for a
    /// method payload over 128 KB; 409104 when the id is taken; 403003 when
    /// [`JobLimits::max_active_jobs`] jobs are active; store failures.
    pub fn create(
        &mut self,
        now: Timestamp,
        job_id: &str,
        request: &JobRequest,
    ) -> Result<JobResponse, Error> {
        let id = JobId::new(job_id).map_err(|e| hub_error(HubErrorCode::ArgumentInvalid, e.to_string()))?;
        if let Some(body_id) = &request.job_id {
            if body_id != job_id {
                return Err(hub_error(
                    HubErrorCode::ArgumentInvalid,
                    format!("The jobId {body_id:?} in the body does not match {job_id:?} in the path."),
                ));
            }
        }
        let job_type = request
            .job_type
            .ok_or_else(|| hub_error(HubErrorCode::ArgumentNull, "type must be specified."))?;
        let mut invocation = None;
        match job_type {
            JobType::ScheduleDeviceMethod => {
                let m = request.cloud_to_device_method.as_ref().ok_or_else(|| {
                    hub_error(
                        HubErrorCode::ArgumentNull,
                        "cloudToDeviceMethod must be specified for scheduleDeviceMethod jobs.",
                    )
                })?;
                invocation = Some(Arc::new(MethodInvocation::from_wire(m)?));
            }
            JobType::ScheduleUpdateTwin => {
                if request.update_twin.is_none() {
                    return Err(hub_error(
                        HubErrorCode::ArgumentNull,
                        "updateTwin must be specified for scheduleUpdateTwin jobs.",
                    ));
                }
            }
            other => {
                return Err(hub_error(
                    HubErrorCode::ArgumentInvalid,
                    format!(
                        "type {other} cannot be scheduled; use scheduleDeviceMethod or scheduleUpdateTwin."
                    ),
                ))
            }
        }
        let condition = request.query_condition.as_deref().map(str::trim).unwrap_or_default();
        if condition.is_empty() {
            return Err(hub_error(HubErrorCode::ArgumentNull, "queryCondition must be specified."));
        }
        if condition.len() > MAX_QUERY_CONDITION_LEN {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                format!("queryCondition is longer than {MAX_QUERY_CONDITION_LEN} characters."),
            ));
        }
        let budget = match request.max_execution_time_in_seconds {
            None => DEFAULT_MAX_EXECUTION_TIME,
            Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs()),
            Some(_) => {
                return Err(hub_error(
                    HubErrorCode::ArgumentInvalid,
                    "maxExecutionTimeInSeconds must be greater than 0.",
                ))
            }
        };
        if self.store.job(&id)?.is_some() {
            return Err(already_exists(&id));
        }
        if self.active.len() >= self.limits.max_active_jobs {
            return Err(hub_error(HubErrorCode::JobQuotaExceeded, "Job quota has been exceeded"));
        }
        let start = request.start_time.unwrap_or(now);
        let job = JobResponse {
            job_id: id.clone(),
            query_condition: Some(condition.to_owned()),
            created_time: Some(now),
            start_time: Some(start),
            end_time: None,
            max_execution_time_in_seconds: i64::try_from(budget.as_secs()).ok(),
            job_type,
            cloud_to_device_method: invocation.as_deref().map(MethodInvocation::to_wire),
            update_twin: if job_type == JobType::ScheduleUpdateTwin {
                request.update_twin.clone()
            } else {
                None
            },
            status: if start <= now { JobStatus::Queued } else { JobStatus::Scheduled },
            failure_reason: None,
            status_message: None,
            device_job_statistics: Some(DeviceJobStatistics::default()),
        };
        let record = JobRecord { job: job.clone(), version: 1 };
        self.store.put_job(&record, &Precondition::MustNotExist).map_err(|e| match e {
            StoreError::AlreadyExists => already_exists(&id),
            other => Error::Store(other),
        })?;
        self.active.insert(
            id,
            ActiveJob {
                record,
                start,
                budget,
                deadline: start + budget,
                update: request
                    .update_twin
                    .clone()
                    .filter(|_| job_type == JobType::ScheduleUpdateTwin)
                    .map(Arc::new),
                invocation,
                started: false,
                pending: VecDeque::new(),
                open: HashMap::new(),
                calls: HashMap::new(),
                device_calls: HashMap::new(),
            },
        );
        Ok(job)
    }

    /// `GET /jobs/v2/{id}`.
    ///
    /// # Errors
    /// 404002 `JobNotFound`; store failures.
    pub fn job(&self, id: &str) -> Result<JobResponse, Error> {
        let id = JobId::new(id).map_err(|_| not_found(id))?;
        self.store.job(&id)?.map(|r| r.job).ok_or_else(|| not_found(id.as_str()))
    }

    /// `GET /jobs/v2/query?jobType=&jobStatus=`.
    ///
    /// # Errors
    /// Store failures; [`StoreError::InvalidContinuation`] (400 / `ArgumentInvalid`) for an
    /// `x-ms-continuation` the store did not issue.
    pub fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, Error> {
        Ok(self.store.jobs(filter, page)?)
    }

    /// Forgets jobs that finished more than [`JOB_HISTORY`] before `now`, with their device job
    /// records. Returns how many jobs were removed.
    ///
    /// # Errors
    /// Store failures.
    pub fn purge_history(&self, now: Timestamp) -> Result<usize, Error> {
        Ok(self.store.purge_jobs(now - JOB_HISTORY)?)
    }

    /// `POST /jobs/v2/{id}/cancel`: an unfinished job becomes `cancelled` and its unfinished
    /// device jobs `canceled`; a finished job is returned unchanged.
    ///
    /// # Errors
    /// 404002 `JobNotFound`; store failures.
    pub fn cancel(&mut self, now: Timestamp, id: &str) -> Result<JobResponse, Error> {
        let job_id = JobId::new(id).map_err(|_| not_found(id))?;
        let Some(mut active) = self.active.remove(&job_id) else {
            return self.job(id);
        };
        self.close_open(&mut active, now, DeviceJobStatus::Canceled, None)?;
        active.record.job.status = JobStatus::Cancelled;
        active.record.job.end_time = Some(now);
        self.write_job(&mut active)?;
        Ok(active.record.job)
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) has work: a start time, a
    /// job's execution deadline or the next throttled dispatch.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut next: Option<Timestamp> = None;
        let mut consider = |t: Timestamp| next = Some(next.map_or(t, |n| n.min(t)));
        for job in self.active.values() {
            if job.started {
                consider(job.deadline);
                if !job.pending.is_empty() {
                    consider(self.next_operation);
                }
            } else {
                consider(job.start);
            }
        }
        next
    }

    /// Starts due jobs, fails jobs past their budget and dispatches pending devices.
    ///
    /// # Errors
    /// Store failures.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Result<(), Error> {
        let ids: Vec<JobId> = self.active.keys().cloned().collect();
        for id in ids {
            let Some(mut job) = self.active.remove(&id) else { continue };
            if !job.started && job.start <= now {
                self.start(&mut job, now)?;
            }
            if job.started && !job.record.job.status.is_terminal() && job.deadline <= now {
                let error = DeviceJobError {
                    code: EXECUTION_TIME_EXCEEDED.to_owned(),
                    description: "The job's maxExecutionTimeInSeconds elapsed before this device finished."
                        .to_owned(),
                };
                self.close_open(&mut job, now, DeviceJobStatus::Failed, Some(error))?;
                job.record.job.status = JobStatus::Failed;
                job.record.job.failure_reason =
                    Some("The job did not finish within maxExecutionTimeInSeconds.".to_owned());
                job.record.job.end_time = Some(now);
                self.write_job(&mut job)?;
            }
            if job.started && !job.record.job.status.is_terminal() {
                self.dispatch(&mut job, now)?;
                self.finish_if_done(&mut job, now)?;
            }
            if !job.record.job.status.is_terminal() {
                self.active.insert(id, job);
            }
        }
        Ok(())
    }

    /// The next device operation to carry out.
    pub fn poll_action(&mut self) -> Option<JobAction> {
        self.actions.pop_front()
    }

    /// Records which [`MethodCalls`] call carries the method of `device` in `job_id`, so its
    /// completion can be attributed. Returns whether the device job is still running.
    pub fn handle_method_started(&mut self, job_id: &JobId, device: &DeviceId, call: CallId) -> bool {
        match self.active.get_mut(job_id) {
            Some(job) if job.open.contains_key(device) => {
                job.calls.insert(call, device.clone());
                job.device_calls.insert(device.clone(), call);
                true
            }
            _ => false,
        }
    }

    /// Attributes a finished method call to its device job. Returns `false` when the call is
    /// not a job's (it belongs to a REST caller) or its job is over.
    ///
    /// # Errors
    /// Store failures.
    pub fn handle_method_completion(
        &mut self,
        now: Timestamp,
        completion: &MethodCompletion,
    ) -> Result<bool, Error> {
        let found = self
            .active
            .iter_mut()
            .find_map(|(id, job)| job.calls.remove(&completion.call).map(|device| (id.clone(), device)));
        let Some((job_id, device)) = found else { return Ok(false) };
        self.handle_device_outcome(now, &job_id, &device, DeviceOutcome::from_method(&completion.outcome))
    }

    /// Records how one device's operation ended. Returns `false` (and changes nothing) when the
    /// job is over or the device job is not running — late outcomes after a cancel land here.
    ///
    /// # Errors
    /// Store failures.
    pub fn handle_device_outcome(
        &mut self,
        now: Timestamp,
        job_id: &JobId,
        device: &DeviceId,
        outcome: DeviceOutcome,
    ) -> Result<bool, Error> {
        let Some(mut job) = self.active.remove(job_id) else { return Ok(false) };
        let Some(mut record) = job.open.remove(device) else {
            self.active.insert(job_id.clone(), job);
            return Ok(false);
        };
        if let Some(call) = job.device_calls.remove(device) {
            job.calls.remove(&call);
        }
        record.last_updated_date_time_utc = now;
        let stats = job.stats();
        stats.running_count = stats.running_count.saturating_sub(1);
        match outcome {
            DeviceOutcome::TwinUpdated => {
                record.status = DeviceJobStatus::Completed;
                stats.succeeded_count += 1;
            }
            DeviceOutcome::MethodAnswered(result) => {
                record.status = DeviceJobStatus::Completed;
                record.outcome = DeviceJobOutcome { device_method_response: Some(result) };
                stats.succeeded_count += 1;
            }
            DeviceOutcome::Failed(error) => {
                record.status = DeviceJobStatus::Failed;
                record.error = Some(error);
                stats.failed_count += 1;
            }
        }
        self.store.put_device_job(&record)?;
        self.write_job(&mut job)?;
        self.finish_if_done(&mut job, now)?;
        if !job.record.job.status.is_terminal() {
            self.active.insert(job_id.clone(), job);
        }
        Ok(true)
    }

    /// Carries one action out: twin updates through `twins` (reporting the outcome at once),
    /// method invocations through `methods` (their completions arrive later through
    /// [`handle_method_completion`](Self::handle_method_completion)).
    ///
    /// # Errors
    /// Store failures.
    pub fn execute(
        &mut self,
        now: Timestamp,
        action: JobAction,
        twins: &dyn TwinPatcher,
        methods: &mut MethodCalls,
    ) -> Result<(), Error> {
        match action {
            JobAction::UpdateTwin { job_id, device, update } => {
                let outcome = match twins.update_twin(now, &device, &update) {
                    Ok(()) => DeviceOutcome::TwinUpdated,
                    Err(e) => DeviceOutcome::from_error(&e),
                };
                self.handle_device_outcome(now, &job_id, &device, outcome)?;
            }
            JobAction::InvokeMethod { job_id, device, invocation } => {
                let call = methods.invoke(now, MethodTarget::device(device.clone()), (*invocation).clone());
                if !self.handle_method_started(&job_id, &device, call) {
                    methods.cancel(call);
                }
            }
            JobAction::AbandonMethodCall { call } => {
                methods.cancel(call);
            }
        }
        Ok(())
    }

    /// [`handle_timeout`](Self::handle_timeout), then [`execute`](Self::execute) every action,
    /// then attribute the method completions that belong to jobs. Completions of other calls
    /// are returned for their REST callers.
    ///
    /// # Errors
    /// Store failures.
    pub fn run(
        &mut self,
        now: Timestamp,
        twins: &dyn TwinPatcher,
        methods: &mut MethodCalls,
    ) -> Result<Vec<MethodCompletion>, Error> {
        methods.handle_timeout(now);
        self.handle_timeout(now)?;
        let mut others = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(action) = self.poll_action() {
                progressed = true;
                self.execute(now, action, twins, methods)?;
            }
            while let Some(done) = methods.poll_event() {
                progressed = true;
                if !self.handle_method_completion(now, &done)? {
                    others.push(done);
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(others)
    }

    fn start(&mut self, job: &mut ActiveJob, now: Timestamp) -> Result<(), Error> {
        job.started = true;
        job.deadline = now.max(job.start) + job.budget;
        let condition = job.record.job.query_condition.clone().unwrap_or_default();
        let devices = match self.selector.select(&condition) {
            Ok(d) => d,
            Err(e) => {
                job.record.job.status = JobStatus::Failed;
                job.record.job.failure_reason = Some(match &e {
                    Error::Hub { message, .. } => message.clone(),
                    other => other.to_string(),
                });
                job.record.job.end_time = Some(now);
                return self.write_job(job);
            }
        };
        let mut seen = HashSet::new();
        for device in devices {
            if !seen.insert(device.clone()) {
                continue;
            }
            let record = DeviceJob {
                device_id: device.as_str().to_owned(),
                job_id: job.record.job.job_id.clone(),
                job_type: job.record.job.job_type,
                status: DeviceJobStatus::Pending,
                start_time_utc: job.start,
                end_time_utc: job.deadline,
                created_date_time_utc: now,
                last_updated_date_time_utc: now,
                outcome: DeviceJobOutcome::default(),
                error: None,
            };
            self.store.put_device_job(&record)?;
            job.open.insert(device.clone(), record);
            job.pending.push_back(device);
        }
        let count = job.pending.len() as u64;
        *job.stats() =
            DeviceJobStatistics { device_count: count, pending_count: count, ..Default::default() };
        job.record.job.status = JobStatus::Running;
        self.write_job(job)
    }

    fn dispatch(&mut self, job: &mut ActiveJob, now: Timestamp) -> Result<(), Error> {
        let interval =
            self.limits.device_operations_per_second.filter(|r| *r > 0).map(|r| Duration::from_secs(1) / r);
        let mut dispatched = 0u64;
        while !job.pending.is_empty() {
            if let Some(interval) = interval {
                if self.next_operation > now {
                    break;
                }
                self.next_operation = self.next_operation.max(now) + interval;
            }
            let Some(device) = job.pending.pop_front() else { break };
            let Some(record) = job.open.get_mut(&device) else { continue };
            record.status = DeviceJobStatus::Running;
            record.last_updated_date_time_utc = now;
            self.store.put_device_job(record)?;
            let job_id = job.record.job.job_id.clone();
            let action = match (&job.invocation, &job.update) {
                (Some(invocation), _) => {
                    JobAction::InvokeMethod { job_id, device, invocation: Arc::clone(invocation) }
                }
                (None, Some(update)) => JobAction::UpdateTwin { job_id, device, update: Arc::clone(update) },
                (None, None) => JobAction::UpdateTwin { job_id, device, update: Arc::default() },
            };
            self.actions.push_back(action);
            dispatched += 1;
        }
        if dispatched > 0 {
            let stats = job.stats();
            stats.pending_count = stats.pending_count.saturating_sub(dispatched);
            stats.running_count += dispatched;
            self.write_job(job)?;
        }
        Ok(())
    }

    fn finish_if_done(&mut self, job: &mut ActiveJob, now: Timestamp) -> Result<(), Error> {
        if job.started && job.open.is_empty() && !job.record.job.status.is_terminal() {
            job.record.job.status = JobStatus::Completed;
            job.record.job.end_time = Some(now);
            self.write_job(job)?;
        }
        Ok(())
    }

    /// Ends every unfinished device job with `status` (and `error`), abandoning its method call.
    fn close_open(
        &mut self,
        job: &mut ActiveJob,
        now: Timestamp,
        status: DeviceJobStatus,
        error: Option<DeviceJobError>,
    ) -> Result<(), Error> {
        job.device_calls.clear();
        for call in job.calls.drain().map(|(c, _)| c) {
            self.actions.push_back(JobAction::AbandonMethodCall { call });
        }
        let mut closed = 0u64;
        let mut open: Vec<(DeviceId, DeviceJob)> = job.open.drain().collect();
        open.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut record) in open {
            record.status = status;
            record.error = error.clone();
            record.last_updated_date_time_utc = now;
            self.store.put_device_job(&record)?;
            closed += 1;
        }
        job.pending.clear();
        let stats = job.stats();
        stats.pending_count = 0;
        stats.running_count = 0;
        if status == DeviceJobStatus::Failed {
            stats.failed_count += closed;
        }
        Ok(())
    }

    /// Fails the device jobs a lost process left pending or running.
    fn fail_interrupted_devices(&mut self, job: &mut ActiveJob, now: Timestamp) -> Result<(), Error> {
        let filter = DeviceJobFilter { job_id: Some(job.record.job.job_id.clone()), device_id: None };
        let mut page = PageRequest { continuation: None, max_items: 1000 };
        let mut failed = 0u64;
        loop {
            let Page { items, continuation } = self.store.device_jobs(&filter, &page)?;
            for mut record in items.into_iter().filter(|r| !r.status.is_terminal()) {
                record.status = DeviceJobStatus::Failed;
                record.error = Some(DeviceJobError {
                    code: HubErrorCode::ServerError.name().to_owned(),
                    description: "The job was interrupted by a restart.".to_owned(),
                });
                record.last_updated_date_time_utc = now;
                self.store.put_device_job(&record)?;
                failed += 1;
            }
            match continuation {
                Some(c) => page.continuation = Some(c),
                None => break,
            }
        }
        let stats = job.stats();
        stats.failed_count += failed;
        stats.pending_count = 0;
        stats.running_count = 0;
        Ok(())
    }

    fn write_job(&mut self, job: &mut ActiveJob) -> Result<(), Error> {
        let pre = Precondition::Matches(job.record.etag().as_str().to_owned());
        let next = JobRecord { job: job.record.job.clone(), version: job.record.version + 1 };
        self.store.put_job(&next, &pre)?;
        job.record = next;
        Ok(())
    }
}

fn budget_of(job: &JobResponse) -> Duration {
    match job.max_execution_time_in_seconds {
        Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs()),
        _ => DEFAULT_MAX_EXECUTION_TIME,
    }
}

fn already_exists(id: &JobId) -> Error {
    hub_error(HubErrorCode::JobAlreadyExists, format!("A job with id '{id}' already exists."))
}

fn not_found(id: &str) -> Error {
    hub_error(HubErrorCode::JobNotFound, format!("Job with id '{id}' was not found."))
}
