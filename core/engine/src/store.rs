//! Store traits for enrollments, enrollment groups, CA certificates, registration records and
//! operations. Calls are synchronous: the engine is sans-I/O, and durable backends run them on
//! their own threads. Every conditional write is an atomic compare-and-swap in the backend.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;
use zerotouch_proto::device::{
    DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
    SymmetricKeyRegistrationResult, X509RegistrationResult,
};
use zerotouch_proto::service::{DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{ETag, EnrollmentGroupId, OperationId, RegistrationId, Text, Timestamp};

use crate::error::{Error, StoreError};

/// Condition a write must satisfy, checked atomically with the write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Unconditional (create or replace).
    #[default]
    None,
    /// Only if nothing is stored under the key (create).
    MustNotExist,
    /// Only if something is stored under the key.
    MustExist,
    /// Only if the stored etag equals this one (bare form, see [`ETag::bare`]).
    Matches(String),
}

impl Precondition {
    /// DPS service-API semantics of `If-Match`: absent = upsert, `*` = must exist, tag = match.
    pub fn from_if_match(if_match: &zerotouch_proto::IfMatch) -> Self {
        match if_match {
            zerotouch_proto::IfMatch::Absent => Precondition::None,
            zerotouch_proto::IfMatch::Any => Precondition::MustExist,
            zerotouch_proto::IfMatch::Tag(t) => Precondition::Matches(t.clone()),
        }
    }

    /// Checks the precondition against the current etag (`None` = nothing stored).
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`], [`StoreError::NotFound`] or
    /// [`StoreError::PreconditionFailed`].
    pub fn check(&self, current: Option<&ETag>) -> Result<(), StoreError> {
        self.check_bare(current.map(ETag::bare))
    }

    /// [`Precondition::check`] against the current etag's bare form (see [`ETag::bare`]), for
    /// stores that keep the etag as text.
    ///
    /// # Errors
    /// As [`Precondition::check`].
    pub fn check_bare(&self, current: Option<&str>) -> Result<(), StoreError> {
        match (self, current) {
            (Precondition::None, _) => Ok(()),
            (Precondition::MustNotExist, None) => Ok(()),
            (Precondition::MustNotExist, Some(_)) => Err(StoreError::AlreadyExists),
            (Precondition::MustExist | Precondition::Matches(_), None) => Err(StoreError::NotFound),
            (Precondition::MustExist, Some(_)) => Ok(()),
            (Precondition::Matches(t), Some(cur)) => {
                if cur == t {
                    Ok(())
                } else {
                    Err(StoreError::PreconditionFailed)
                }
            }
        }
    }
}

/// A page request: opaque continuation token from the previous page and a page size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Token returned with the previous page; `None` for the first page.
    pub continuation: Option<String>,
    /// Maximum number of items.
    pub max_items: usize,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { continuation: None, max_items: 100 }
    }
}

/// One page of results; `continuation` is `None` on the last page (spec §0 trap 12).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// Items of this page.
    pub items: Vec<T>,
    /// Token for the next page, absent on the last page.
    pub continuation: Option<String>,
}

/// Which enrollment a registration came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "camelCase")]
pub enum EnrollmentRef {
    /// An individual enrollment.
    Individual(RegistrationId),
    /// An enrollment group.
    Group(EnrollmentGroupId),
}

/// A registration record: the wire state plus what the engine needs to re-provision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// Registration id as first registered.
    pub registration_id: RegistrationId,
    /// The state shown by the service API (carries the record's etag).
    pub state: DeviceRegistrationState,
    /// The enrollment the device registered through.
    pub enrollment: EnrollmentRef,
    /// Hub of the first-ever assignment (for `reprovisionedToInitialAssignment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<Text>,
}

impl RegistrationRecord {
    /// The record's etag, if it has one.
    pub fn etag(&self) -> Option<ETag> {
        self.state.etag.as_deref().map(ETag::new)
    }

    /// The bare form of the record's etag (see [`ETag::bare`]), without copying it.
    pub fn etag_bare(&self) -> Option<&str> {
        self.state.etag.as_deref().map(zerotouch_proto::ids::bare_etag)
    }
}

/// How a device proved who it is, as far as a registration's answer tells (spec §1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttestedVia {
    /// A SAS token signed with an individual or derived group key.
    SymmetricKey,
    /// An X.509 client certificate.
    X509,
}

impl RegistrationRecord {
    /// The state the service API shows for this record (registration reads, an enrollment's
    /// `registrationState`): a failed record keeps its last assignment's substatus and payload
    /// for the next registration, but they are shown only with an assignment (spec §1.5).
    pub fn into_state(self) -> DeviceRegistrationState {
        let mut state = self.state;
        if state.status != Some(RegistrationStatus::Assigned) {
            state.substatus = None;
            state.payload = None;
        }
        state
    }

    /// The registration result a device is answered with for this record: its state, and the
    /// attestation member that tells the device how it was admitted (spec §1.5): `x509` (observed
    /// `{}` for individual enrollments), `symmetricKey` with the group id for groups.
    pub fn result(&self, via: Option<AttestedVia>) -> DeviceRegistrationResult {
        let s = &self.state;
        let assigned = s.status == Some(RegistrationStatus::Assigned);
        let group = match &self.enrollment {
            EnrollmentRef::Group(g) => Some(g.as_text().clone()),
            EnrollmentRef::Individual(_) => None,
        };
        let (x509, symmetric_key) = match via {
            Some(AttestedVia::X509) => (
                Some(Box::new(X509RegistrationResult { enrollment_group_id: group, ..Default::default() })),
                None,
            ),
            Some(AttestedVia::SymmetricKey) if group.is_some() => {
                (None, Some(SymmetricKeyRegistrationResult { enrollment_group_id: group }))
            }
            _ => (None, None),
        };
        DeviceRegistrationResult {
            tpm: None,
            x509,
            symmetric_key,
            registration_id: s.registration_id.clone(),
            created_date_time_utc: s.created_date_time_utc,
            assigned_hub: s.assigned_hub.clone(),
            device_id: s.device_id.clone(),
            status: s.status,
            // A failed record keeps these of its last assignment for the next registration;
            // a device hears them only with an assignment (spec §1.5).
            substatus: s.substatus.filter(|_| assigned),
            error_code: s.error_code,
            error_message: s.error_message.clone(),
            last_updated_date_time_utc: s.last_updated_date_time_utc,
            etag: s.etag.clone(),
            payload: s.payload.clone().filter(|_| assigned),
            issued_certificate_chain: None,
        }
    }
}

/// A provisioning operation: what a poll for `operation_id` answers.
///
/// Stored as `{"operationId", "registrationId", "created", "status"}` with `status` the wire
/// `RegistrationOperationStatus`, whichever [`OperationStatus`] it holds.
#[derive(Debug, Clone)]
pub struct OperationRecord {
    /// Operation id.
    pub operation_id: OperationId,
    /// Registration the operation belongs to.
    pub registration_id: RegistrationId,
    /// When the operation was created (operations are kept at least an hour after that).
    pub created: Timestamp,
    /// What a poll answers.
    pub status: OperationStatus,
}

/// What polling an operation answers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OperationStatus {
    /// A status as it is: a failed registration, a move in progress, a status read back from
    /// storage. (Boxed: operations are moved into tables, and most of them answer from a record.)
    Fixed(Box<RegistrationOperationStatus>),
    /// A registration's outcome, answered from the registration record it committed, shared with
    /// the store rather than copied into the operation.
    Registered {
        /// The record as the registration committed it (never changed afterwards: a later
        /// registration commits a new record).
        record: Arc<RegistrationRecord>,
        /// How the device attested.
        via: Option<AttestedVia>,
    },
}

impl From<RegistrationOperationStatus> for OperationStatus {
    fn from(status: RegistrationOperationStatus) -> Self {
        OperationStatus::Fixed(Box::new(status))
    }
}

impl OperationRecord {
    /// The wire status a poll answers.
    pub fn status(&self) -> RegistrationOperationStatus {
        match &self.status {
            OperationStatus::Fixed(status) => RegistrationOperationStatus::clone(status),
            OperationStatus::Registered { record, via } => RegistrationOperationStatus {
                operation_id: self.operation_id.as_text().clone(),
                status: record.state.status.unwrap_or(RegistrationStatus::Assigned),
                registration_state: Some(record.result(*via)),
            },
        }
    }

    /// [`OperationRecord::status`], without copying a fixed status.
    pub fn into_status(self) -> RegistrationOperationStatus {
        match self.status {
            OperationStatus::Fixed(status) => *status,
            OperationStatus::Registered { .. } => self.status(),
        }
    }
}

/// Records are equal when they answer the same.
impl PartialEq for OperationRecord {
    fn eq(&self, other: &Self) -> bool {
        self.operation_id == other.operation_id
            && self.registration_id == other.registration_id
            && self.created == other.created
            && self.status() == other.status()
    }
}

/// The stored form of an [`OperationRecord`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationDoc<'a> {
    operation_id: Cow<'a, OperationId>,
    registration_id: Cow<'a, RegistrationId>,
    created: Timestamp,
    status: Cow<'a, RegistrationOperationStatus>,
}

impl Serialize for OperationRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let status = match &self.status {
            OperationStatus::Fixed(status) => Cow::Borrowed(&**status),
            OperationStatus::Registered { .. } => Cow::Owned(self.status()),
        };
        OperationDoc {
            operation_id: Cow::Borrowed(&self.operation_id),
            registration_id: Cow::Borrowed(&self.registration_id),
            created: self.created,
            status,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for OperationRecord {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let doc = OperationDoc::deserialize(deserializer)?;
        Ok(OperationRecord {
            operation_id: doc.operation_id.into_owned(),
            registration_id: doc.registration_id.into_owned(),
            created: doc.created,
            status: doc.status.into_owned().into(),
        })
    }
}

/// Individual enrollments, keyed case-insensitively by registration id.
pub trait EnrollmentStore: Send + Sync {
    /// Looks an enrollment up.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on backend failure.
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError>;
    /// Looks an enrollment up as [`EnrollmentStore::enrollment`] does, shared: what every
    /// registration reads first (and, for group devices, finds nothing). A store that keeps
    /// enrollments in memory hands its own out; the default wraps the owned one.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on backend failure.
    fn enrollment_shared(
        &self,
        id: &RegistrationId,
    ) -> Result<Option<Arc<IndividualEnrollment>>, StoreError> {
        Ok(self.enrollment(id)?.map(Arc::new))
    }
    /// Writes an enrollment (its etag and timestamps already set by the caller) if `pre` holds.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_enrollment(&self, enrollment: &IndividualEnrollment, pre: &Precondition)
        -> Result<(), StoreError>;
    /// Deletes an enrollment if `pre` holds.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError>;
    /// Lists enrollments in a stable order.
    ///
    /// # Errors
    /// Backend failures or a bad continuation token.
    fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError>;
}

/// Enrollment groups, keyed case-insensitively by group id.
pub trait EnrollmentGroupStore: Send + Sync {
    /// Looks a group up.
    ///
    /// # Errors
    /// Backend failures.
    fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError>;
    /// Writes a group if `pre` holds.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_enrollment_group(&self, group: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError>;
    /// Deletes a group if `pre` holds.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_enrollment_group(&self, id: &EnrollmentGroupId, pre: &Precondition) -> Result<(), StoreError>;
    /// Lists groups in a stable order.
    ///
    /// # Errors
    /// Backend failures or a bad continuation token.
    fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError>;
    /// Every group with symmetric-key attestation (DPS allows at most 100).
    ///
    /// # Errors
    /// Backend failures.
    fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError>;
    /// Groups whose primary or secondary signing certificate has this subject distinguished name
    /// (`info.subjectName`, filled in by the engine on write), or that reference, via
    /// `caReferences`, a CA certificate with this subject. Used to find the groups that may have
    /// issued a presented certificate (looked up by that certificate's issuer name).
    ///
    /// # Errors
    /// Backend failures.
    fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError>;
}

/// A CA certificate registered with the service (the ARM-plane certificates of spec §5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// Name (alphanumerics and `-._`).
    pub name: String,
    /// Base64 DER of the certificate.
    pub certificate_der: String,
    /// Upper-case hex SHA-256 thumbprint.
    pub sha256_thumbprint: String,
    /// Subject distinguished name (RFC 4514 form, as [`crate::attestation::x509`] prints it).
    pub subject_name: String,
    /// Whether possession of the private key was proven (or self-attested).
    pub is_verified: bool,
    /// Outstanding verification code, if one was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// Etag.
    pub etag: ETag,
}

/// CA certificates, keyed by name.
pub trait CaCertificateStore: Send + Sync {
    /// Looks a certificate up by name.
    ///
    /// # Errors
    /// Backend failures.
    fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError>;
    /// Writes a certificate if `pre` holds.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError>;
    /// Deletes a certificate if `pre` holds.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError>;
}

/// Registration records and operations.
pub trait RegistrationStore: Send + Sync {
    /// Looks a record up (case-insensitive id).
    ///
    /// # Errors
    /// Backend failures.
    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError>;
    /// Looks a record up as [`RegistrationStore::registration`] does, shared: what every
    /// registration reads before deciding. A store that keeps records in memory hands its own
    /// out instead of copying one; the default wraps the owned record.
    ///
    /// # Errors
    /// Backend failures.
    fn registration_shared(
        &self,
        id: &RegistrationId,
    ) -> Result<Option<Arc<RegistrationRecord>>, StoreError> {
        Ok(self.registration(id)?.map(Arc::new))
    }
    /// Atomically writes a registration record (if `pre` holds against the stored record's
    /// etag) together with the operation that produced it: either both are stored or neither.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError>;
    /// Deletes a record if `pre` holds.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError>;
    /// Records of devices that registered through a group, in a stable order.
    ///
    /// # Errors
    /// Backend failures or a bad continuation token.
    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError>;
    /// Stores an operation that changed no record (a failed registration).
    ///
    /// # Errors
    /// Backend failures.
    fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError>;
    /// Looks an operation up.
    ///
    /// # Errors
    /// Backend failures.
    fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError>;
    /// The operation `id` when this store holds it in memory and can hand it out without
    /// blocking; `None` means ask [`RegistrationStore::operation`] (the default: always).
    fn operation_in_memory(&self, id: &OperationId) -> Option<OperationRecord> {
        let _ = id;
        None
    }
    /// Removes operations created before `cutoff`; returns how many were removed.
    ///
    /// # Errors
    /// Backend failures.
    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError>;

    /// Runs `unit` as one atomic write: every write it makes through this store, or through a
    /// store sharing its database (an embedded hub's identities and twins opened on the same
    /// database), is kept together with the others or not at all, and reads made inside `unit`
    /// see its earlier writes. The provisioner runs a registration's hub actions and its final
    /// [`RegistrationStore::commit_registration`] as one unit, so no device is assigned
    /// without its record and no record points at a device that was not created.
    ///
    /// When `unit` fails, what it wrote is undone and its error returned. A backend may commit
    /// several concurrent units together (group commit); this returns only once the unit is
    /// durable.
    ///
    /// A backend may also undo `unit` and run it again, more than once: PostgreSQL does when
    /// its transaction conflicts with concurrent ones (a deadlock, a serialization failure).
    /// So `unit` must be re-runnable: each run starts afresh from what it reads, and whatever
    /// it keeps outside the store (counts, results, staged announcements) is reset at the
    /// start of a run, since only the last run's writes are kept. When every run conflicted,
    /// the error is [`StoreError::Conflict`]: nothing was written, and the caller may try
    /// again later (the provisioner decides the registration again, then answers 429).
    ///
    /// The default runs `unit` directly and undoes nothing: it suits stores a crash cannot leave
    /// half-written (the in-memory store loses everything at once), but a unit that fails keeps
    /// the writes it made before failing. With [`crate::memory::MemoryStore`] and in-memory hubs,
    /// a failed registration unit can so leave a hub identity it created (its record is written
    /// last, so never a record without its identity); the SQLite and PostgreSQL stores undo it.
    ///
    /// # Errors
    /// The error of `unit`, or a backend failure to begin or commit.
    fn atomically(&self, unit: &mut dyn FnMut() -> Result<(), Error>) -> Result<(), Error> {
        unit()
    }
}

/// Everything the provisioning service needs, in one bound.
pub trait ProvisioningStore:
    EnrollmentStore + EnrollmentGroupStore + CaCertificateStore + RegistrationStore
{
}

impl<T: EnrollmentStore + EnrollmentGroupStore + CaCertificateStore + RegistrationStore> ProvisioningStore
    for T
{
}

/// Shared stores: a provisioner and a service API can hold the same store through an `Arc`.
mod shared {
    use std::sync::Arc;

    use super::*;

    impl<T: EnrollmentStore + ?Sized> EnrollmentStore for Arc<T> {
        fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
            (**self).enrollment(id)
        }
        fn enrollment_shared(
            &self,
            id: &RegistrationId,
        ) -> Result<Option<Arc<IndividualEnrollment>>, StoreError> {
            (**self).enrollment_shared(id)
        }
        fn put_enrollment(&self, e: &IndividualEnrollment, pre: &Precondition) -> Result<(), StoreError> {
            (**self).put_enrollment(e, pre)
        }
        fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
            (**self).delete_enrollment(id, pre)
        }
        fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
            (**self).enrollments(page)
        }
    }

    impl<T: EnrollmentGroupStore + ?Sized> EnrollmentGroupStore for Arc<T> {
        fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
            (**self).enrollment_group(id)
        }
        fn put_enrollment_group(&self, g: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
            (**self).put_enrollment_group(g, pre)
        }
        fn delete_enrollment_group(
            &self,
            id: &EnrollmentGroupId,
            pre: &Precondition,
        ) -> Result<(), StoreError> {
            (**self).delete_enrollment_group(id, pre)
        }
        fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
            (**self).enrollment_groups(page)
        }
        fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
            (**self).symmetric_key_groups()
        }
        fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
            (**self).groups_by_ca_subject(subject_name)
        }
    }

    impl<T: CaCertificateStore + ?Sized> CaCertificateStore for Arc<T> {
        fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
            (**self).ca_certificate(name)
        }
        fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
            (**self).put_ca_certificate(cert, pre)
        }
        fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
            (**self).delete_ca_certificate(name, pre)
        }
    }

    impl<T: RegistrationStore + ?Sized> RegistrationStore for Arc<T> {
        fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
            (**self).registration(id)
        }
        fn registration_shared(
            &self,
            id: &RegistrationId,
        ) -> Result<Option<Arc<RegistrationRecord>>, StoreError> {
            (**self).registration_shared(id)
        }
        fn commit_registration(
            &self,
            record: Arc<RegistrationRecord>,
            pre: &Precondition,
            operation: OperationRecord,
        ) -> Result<(), StoreError> {
            (**self).commit_registration(record, pre, operation)
        }
        fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
            (**self).delete_registration(id, pre)
        }
        fn registrations_by_group(
            &self,
            group: &EnrollmentGroupId,
            page: &PageRequest,
        ) -> Result<Page<RegistrationRecord>, StoreError> {
            (**self).registrations_by_group(group, page)
        }
        fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
            (**self).put_operation(operation)
        }
        fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
            (**self).operation(id)
        }
        fn operation_in_memory(&self, id: &OperationId) -> Option<OperationRecord> {
            (**self).operation_in_memory(id)
        }
        fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
            (**self).purge_operations(cutoff)
        }
        fn atomically(&self, unit: &mut dyn FnMut() -> Result<(), Error>) -> Result<(), Error> {
            (**self).atomically(unit)
        }
    }
}
