//! Streaming import and export jobs over `devices.txt` JSON lines (hub spec §3.3).
//!
//! Neither job holds the rows: the caller feeds import lines one at a time (or an iterator) and
//! writes each error-log line as it comes; export hands out one page of lines at a time.

use std::collections::HashSet;

use zerotouch_proto::hub::{
    ExportImportDevice, HubErrorCode, ImportErrorLogEntry, JobProperties, JobStatus, JobType,
    DEVICES_BLOB_NAME,
};
use zerotouch_proto::Timestamp;

use super::{
    error_text, export_device_line, export_module_line, hub_error, hub_error_code, IdentityStore,
    LifecycleEvent, Registry, TwinSink,
};
use crate::error::Error;
use crate::store::PageRequest;

/// Row counts of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Rows read (import) or written (export), blank lines excluded.
    pub processed: u64,
    /// Rows applied or exported.
    pub succeeded: u64,
    /// Rows that failed (one error-log line each).
    pub failed: u64,
}

/// Lifecycle shared by import and export: `enqueued` → `running` → `completed` | `failed` |
/// `cancelled`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobState {
    properties: JobProperties,
    counts: JobCounts,
}

impl JobState {
    fn new(job_id: String, kind: JobType, mut request: JobProperties) -> Self {
        request.job_id = Some(job_id);
        request.kind = Some(kind);
        request.status = Some(JobStatus::Enqueued);
        request.progress = Some(0);
        request.start_time_utc = None;
        request.end_time_utc = None;
        request.failure_reason = None;
        Self { properties: request, counts: JobCounts::default() }
    }

    fn status(&self) -> JobStatus {
        self.properties.status.unwrap_or(JobStatus::Unknown)
    }

    fn start(&mut self, now: Timestamp) -> Result<(), Error> {
        if self.status() != JobStatus::Enqueued {
            return Err(Error::Conflict(format!("job is {}, not enqueued", self.status())));
        }
        self.properties.status = Some(JobStatus::Running);
        self.properties.start_time_utc = Some(now);
        Ok(())
    }

    fn require_running(&self) -> Result<(), Error> {
        if self.status() == JobStatus::Running {
            Ok(())
        } else {
            Err(Error::Conflict(format!("job is {}, not running", self.status())))
        }
    }

    fn end(&mut self, status: JobStatus, reason: Option<String>, now: Timestamp) -> Result<(), Error> {
        if self.status().is_terminal() {
            return Err(Error::Conflict(format!("job is already {}", self.status())));
        }
        if status == JobStatus::Completed {
            self.properties.progress = Some(100);
        }
        self.properties.status = Some(status);
        self.properties.failure_reason = reason;
        self.properties.end_time_utc = Some(now);
        Ok(())
    }
}

macro_rules! job_lifecycle {
    () => {
        /// The job as `GET /jobs/{id}` shows it.
        pub fn properties(&self) -> &JobProperties {
            &self.state.properties
        }

        /// Row counts so far.
        pub fn counts(&self) -> JobCounts {
            self.state.counts
        }

        /// Current status.
        pub fn status(&self) -> JobStatus {
            self.state.status()
        }

        /// `enqueued` → `running`, stamping `startTimeUtc`.
        ///
        /// # Errors
        /// [`Error::Conflict`] unless the job is enqueued.
        pub fn start(&mut self, now: Timestamp) -> Result<(), Error> {
            self.state.start(now)
        }

        /// Ends the job as `completed` (progress 100), stamping `endTimeUtc`.
        ///
        /// # Errors
        /// [`Error::Conflict`] when the job already ended.
        pub fn complete(&mut self, now: Timestamp) -> Result<(), Error> {
            self.state.end(JobStatus::Completed, None, now)
        }

        /// Ends the job as `failed` with `failureReason` (for example unreadable storage).
        ///
        /// # Errors
        /// [`Error::Conflict`] when the job already ended.
        pub fn fail(&mut self, reason: impl Into<String>, now: Timestamp) -> Result<(), Error> {
            self.state.end(JobStatus::Failed, Some(reason.into()), now)
        }

        /// Ends the job as `cancelled` (`DELETE /jobs/{id}`).
        ///
        /// # Errors
        /// [`Error::Conflict`] when the job already ended.
        pub fn cancel(&mut self, now: Timestamp) -> Result<(), Error> {
            self.state.end(JobStatus::Cancelled, None, now)
        }
    };
}

/// What one import line did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportLineOutcome {
    /// The `importErrors.log` line to write, when the row failed.
    pub error: Option<ImportErrorLogEntry>,
    /// Lifecycle notifications the row caused.
    pub events: Vec<LifecycleEvent>,
}

/// An import job.
///
/// Call order: [`ImportJob::new`] (enqueued) → [`start`](Self::start) (running) →
/// [`import_line`](Self::import_line) for each line of `devices.txt` (or [`run`](Self::run) with
/// an iterator) → [`complete`](Self::complete), or [`fail`](Self::fail) when the input cannot be
/// read. Rows that fail are counted and reported as error-log lines; they do not fail the job.
/// Memory grows with the number of distinct identity ids (to detect duplicates), not with rows.
#[derive(Debug, Clone)]
pub struct ImportJob {
    state: JobState,
    seen: HashSet<Box<str>>,
}

impl ImportJob {
    /// A new import job from the `POST /jobs/create` request (`type` forced to `import`).
    pub fn new(job_id: impl Into<String>, request: JobProperties) -> Self {
        let mut request = request;
        if request.input_blob_name.is_none() {
            request.input_blob_name = Some(DEVICES_BLOB_NAME.to_owned());
        }
        Self { state: JobState::new(job_id.into(), JobType::Import, request), seen: HashSet::new() }
    }

    job_lifecycle!();

    /// Parses and applies one line. Blank lines are skipped; an unparsable line is logged as
    /// `DeserializationError` (400012); an identity defined twice as
    /// `DeviceDefinedMultipleTimes` (400011); other failures with their hub code.
    ///
    /// # Errors
    /// [`Error::Conflict`] unless the job is running. Row failures are not errors.
    pub fn import_line<S: IdentityStore>(
        &mut self,
        registry: &Registry<S>,
        line: &str,
        twins: &dyn TwinSink,
        now: Timestamp,
    ) -> Result<ImportLineOutcome, Error> {
        self.state.require_running()?;
        let line = line.trim();
        if line.is_empty() {
            return Ok(ImportLineOutcome { error: None, events: Vec::new() });
        }
        self.state.counts.processed += 1;
        let entry: ExportImportDevice = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => {
                return Ok(self.failed(ImportErrorLogEntry {
                    error_code: HubErrorCode::DeserializationError.code(),
                    error_status: format!("Invalid device format in line: {}. {e}", redact_line(line)),
                    device_id: None,
                    module_id: None,
                }))
            }
        };
        let key = match &entry.module_id {
            Some(m) => format!("{}/{m}", entry.id),
            None => entry.id.to_string(),
        };
        let result = if self.seen.insert(key.into_boxed_str()) {
            registry.apply_entry(&entry, twins, now)
        } else {
            Err(hub_error(
                HubErrorCode::DeviceDefinedMultipleTimes,
                format!("Device '{}' is defined more than once in the import.", entry.id),
            ))
        };
        match result {
            Ok(events) => {
                self.state.counts.succeeded += 1;
                Ok(ImportLineOutcome { error: None, events })
            }
            Err(err) => Ok(self.failed(ImportErrorLogEntry {
                error_code: hub_error_code(&err).code(),
                error_status: error_text(&err),
                device_id: Some(entry.id.to_string()),
                module_id: entry.module_id.as_ref().map(ToString::to_string),
            })),
        }
    }

    /// Starts the job if enqueued, imports every line, writes each error-log line to
    /// `error_log` and each event to `events` as they occur, then completes the job.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the job is neither enqueued nor running.
    pub fn run<S: IdentityStore>(
        &mut self,
        registry: &Registry<S>,
        lines: impl IntoIterator<Item = String>,
        twins: &dyn TwinSink,
        now: Timestamp,
        error_log: &mut dyn FnMut(String),
        events: &mut dyn FnMut(LifecycleEvent),
    ) -> Result<JobCounts, Error> {
        if self.status() == JobStatus::Enqueued {
            self.start(now)?;
        }
        for line in lines {
            let outcome = self.import_line(registry, &line, twins, now)?;
            if let Some(err) = outcome.error {
                error_log(serde_json::to_string(&err).map_err(|e| Error::BadRequest(e.to_string()))?);
            }
            outcome.events.into_iter().for_each(&mut *events);
        }
        self.complete(now)?;
        Ok(self.counts())
    }

    fn failed(&mut self, entry: ImportErrorLogEntry) -> ImportLineOutcome {
        self.state.counts.failed += 1;
        ImportLineOutcome { error: Some(entry), events: Vec::new() }
    }
}

/// An unparsable line may hold keys: quote it only up to its key block, and at most 200
/// characters.
fn redact_line(line: &str) -> String {
    const SHOWN: usize = 200;
    let head = line.find("\"symmetricKey\"").map_or(line, |i| &line[..i]);
    let cut = head.char_indices().nth(SHOWN).map_or(head, |(i, _)| &head[..i]);
    if cut.len() < line.len() {
        format!("{cut}...")
    } else {
        cut.to_owned()
    }
}

/// An export job.
///
/// Call order: [`ExportJob::new`] (enqueued) → [`start`](Self::start) → call
/// [`next_lines`](Self::next_lines) until it returns `None`, appending each batch to
/// `devices.txt` → [`complete`](Self::complete) (or [`fail`](Self::fail) when storage fails).
/// Each device line is followed by the lines of its modules. Keys are null when
/// `excludeKeysInExport` is set.
#[derive(Debug, Clone)]
pub struct ExportJob {
    state: JobState,
    continuation: Option<String>,
    done: bool,
}

impl ExportJob {
    /// A new export job from the `POST /jobs/create` request (`type` forced to `export`).
    pub fn new(job_id: impl Into<String>, request: JobProperties) -> Self {
        let mut request = request;
        if request.output_blob_name.is_none() {
            request.output_blob_name = Some(DEVICES_BLOB_NAME.to_owned());
        }
        Self {
            state: JobState::new(job_id.into(), JobType::Export, request),
            continuation: None,
            done: false,
        }
    }

    job_lifecycle!();

    /// Whether keys are left out of the export.
    pub fn exclude_keys(&self) -> bool {
        self.state.properties.exclude_keys_in_export.unwrap_or(false)
    }

    /// The next batch of `devices.txt` lines (without newlines) for up to `page_size` devices
    /// and their modules; `None` when every identity was exported. Twin data comes from
    /// `twins` when given.
    ///
    /// # Errors
    /// [`Error::Conflict`] unless the job is running; store failures (the page can be retried).
    pub fn next_lines<S: IdentityStore>(
        &mut self,
        registry: &Registry<S>,
        twins: Option<&dyn TwinSink>,
        page_size: usize,
    ) -> Result<Option<Vec<String>>, Error> {
        self.state.require_running()?;
        if self.done {
            return Ok(None);
        }
        let page = registry
            .store()
            .devices(&PageRequest { continuation: self.continuation.clone(), max_items: page_size.max(1) })?;
        let exclude = self.exclude_keys();
        let mut lines = Vec::new();
        for device in &page.items {
            let mut line = export_device_line(device, exclude);
            add_twin(&mut line, twins)?;
            lines.push(to_line(&line)?);
            for module in registry.store().modules(&device.device_id)? {
                let mut line = export_module_line(&module, exclude);
                add_twin(&mut line, twins)?;
                lines.push(to_line(&line)?);
            }
        }
        self.state.counts.processed += lines.len() as u64;
        self.state.counts.succeeded += lines.len() as u64;
        self.continuation = page.continuation;
        self.done = self.continuation.is_none();
        if lines.is_empty() && self.done {
            return Ok(None);
        }
        Ok(Some(lines))
    }
}

fn add_twin(line: &mut ExportImportDevice, twins: Option<&dyn TwinSink>) -> Result<(), Error> {
    if let Some(twins) = twins {
        if let Some((etag, tags, properties)) = twins.twin_for_export(&line.id, line.module_id.as_ref())? {
            line.twin_etag = Some(etag);
            line.tags = tags;
            line.properties = Some(properties);
        }
    }
    Ok(())
}

fn to_line(line: &ExportImportDevice) -> Result<String, Error> {
    serde_json::to_string(line).map_err(|e| Error::BadRequest(format!("cannot serialize export line: {e}")))
}
