//! In-memory implementation of every provisioning store trait: the reference the durable stores
//! are checked against, and the store of embedded and test deployments.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zerotouch_proto::service::{EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{ETag, EnrollmentGroupId, OperationId, RegistrationId, Timestamp};

use crate::error::StoreError;
use crate::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentRef, EnrollmentStore, OperationRecord,
    Page, PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};

#[derive(Debug, Default)]
struct Tables {
    /// Shared, as the groups are.
    enrollments: BTreeMap<String, Arc<IndividualEnrollment>>,
    /// Shared: registrations hand the groups out without copying them.
    groups: BTreeMap<String, Arc<EnrollmentGroup>>,
    cas: BTreeMap<String, CaCertificate>,
    /// Shared: registrations read the record they replace without copying it (and a B-tree
    /// node moves its values as keys are inserted, so large values would cost at every insert).
    registrations: BTreeMap<String, Arc<RegistrationRecord>>,
    /// Looked up by id and swept by age, never listed in order. The ids are random and made
    /// by the provisioner, never chosen by clients, so a fixed-seed fast hash (no clock or RNG
    /// in the core, unlike a randomly seeded one) needs no flooding resistance.
    operations: HashSet<StoredOperation, foldhash::fast::FixedState>,
}

/// An operation in the operations table, keyed by its own id (no second copy of the id as a
/// separate key: one is stored for every registration).
#[derive(Debug)]
struct StoredOperation(OperationRecord);

impl Borrow<str> for StoredOperation {
    fn borrow(&self) -> &str {
        self.0.operation_id.as_str()
    }
}

/// Hashes as its id, as `Borrow<str>` requires.
impl std::hash::Hash for StoredOperation {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.operation_id.as_str().hash(state);
    }
}

impl PartialEq for StoredOperation {
    fn eq(&self, other: &Self) -> bool {
        self.0.operation_id == other.0.operation_id
    }
}

impl Eq for StoredOperation {}

/// All provisioning tables behind one lock, so multi-table writes are atomic.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: RwLock<Tables>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Tables>, StoreError> {
        self.tables.read().map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Tables>, StoreError> {
        self.tables.write().map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }
}

/// One page of a key-ordered map; the continuation token is the last key returned.
fn page_of<V: Borrow<T>, T: Clone>(
    map: &BTreeMap<String, V>,
    page: &PageRequest,
    keep: impl Fn(&T) -> bool,
) -> Page<T> {
    use std::ops::Bound;
    let start = match &page.continuation {
        Some(after) => Bound::Excluded(after.clone()),
        None => Bound::Unbounded,
    };
    let max = page.max_items.max(1);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (k, v) in map.range((start, Bound::Unbounded)) {
        let v = v.borrow();
        if !keep(v) {
            continue;
        }
        if items.len() == max {
            more = true;
            break;
        }
        items.push(v.clone());
        last = Some(k.clone());
    }
    Page { items, continuation: if more { last } else { None } }
}

fn etag_of(e: Option<&ETag>) -> Option<ETag> {
    e.cloned().or_else(|| Some(ETag::new("")))
}

impl EnrollmentStore for MemoryStore {
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
        Ok(self.enrollment_shared(id)?.map(|e| IndividualEnrollment::clone(&e)))
    }

    fn enrollment_shared(
        &self,
        id: &RegistrationId,
    ) -> Result<Option<Arc<IndividualEnrollment>>, StoreError> {
        Ok(self.read()?.enrollments.get(id.lookup_key().as_ref()).cloned())
    }

    fn put_enrollment(
        &self,
        enrollment: &IndividualEnrollment,
        pre: &Precondition,
    ) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = enrollment.registration_id.key();
        pre.check(t.enrollments.get(&key).and_then(|e| etag_of(e.etag.as_ref())).as_ref())?;
        t.enrollments.insert(key, Arc::new(enrollment.clone()));
        Ok(())
    }

    fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = id.key();
        let current = t.enrollments.get(&key).ok_or(StoreError::NotFound)?;
        pre.check(etag_of(current.etag.as_ref()).as_ref())?;
        t.enrollments.remove(&key);
        Ok(())
    }

    fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
        Ok(page_of(&self.read()?.enrollments, page, |_| true))
    }
}

impl EnrollmentGroupStore for MemoryStore {
    fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
        Ok(self.read()?.groups.get(&id.key()).map(|g| EnrollmentGroup::clone(g)))
    }

    fn put_enrollment_group(&self, group: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = group.enrollment_group_id.key();
        pre.check(t.groups.get(&key).and_then(|g| etag_of(g.etag.as_ref())).as_ref())?;
        t.groups.insert(key, Arc::new(group.clone()));
        Ok(())
    }

    fn delete_enrollment_group(&self, id: &EnrollmentGroupId, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = id.key();
        let current = t.groups.get(&key).ok_or(StoreError::NotFound)?;
        pre.check(etag_of(current.etag.as_ref()).as_ref())?;
        t.groups.remove(&key);
        Ok(())
    }

    fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
        Ok(page_of(&self.read()?.groups, page, |_| true))
    }

    fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        Ok(self
            .read()?
            .groups
            .values()
            .filter(|g| g.attestation.symmetric_key.is_some())
            .map(Arc::clone)
            .collect())
    }

    fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        let t = self.read()?;
        let matches = |g: &&Arc<EnrollmentGroup>| {
            let Some(x509) = &g.attestation.x509 else { return false };
            let by_signing = x509.signing_certificates.as_ref().is_some_and(|certs| {
                [&certs.primary, &certs.secondary]
                    .into_iter()
                    .flatten()
                    .any(|c| c.info.as_ref().is_some_and(|i| i.subject_name == subject_name))
            });
            let by_reference = x509.ca_references.as_ref().is_some_and(|refs| {
                [&refs.primary, &refs.secondary]
                    .into_iter()
                    .flatten()
                    .any(|name| t.cas.get(name).is_some_and(|ca| ca.subject_name == subject_name))
            });
            by_signing || by_reference
        };
        Ok(t.groups.values().filter(matches).map(Arc::clone).collect())
    }
}

impl CaCertificateStore for MemoryStore {
    fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
        Ok(self.read()?.cas.get(name).cloned())
    }

    fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        pre.check(t.cas.get(&cert.name).map(|c| c.etag.clone()).as_ref())?;
        t.cas.insert(cert.name.clone(), cert.clone());
        Ok(())
    }

    fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let current = t.cas.get(name).ok_or(StoreError::NotFound)?;
        pre.check(Some(&current.etag))?;
        t.cas.remove(name);
        Ok(())
    }
}

impl RegistrationStore for MemoryStore {
    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
        Ok(self.registration_shared(id)?.map(|r| RegistrationRecord::clone(&r)))
    }

    fn registration_shared(
        &self,
        id: &RegistrationId,
    ) -> Result<Option<Arc<RegistrationRecord>>, StoreError> {
        Ok(self.read()?.registrations.get(id.lookup_key().as_ref()).cloned())
    }

    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = record.registration_id.lookup_key();
        match t.registrations.get_mut(key.as_ref()) {
            Some(current) => {
                pre.check_bare(Some(current.etag_bare().unwrap_or_default()))?;
                *current = record;
            }
            None => {
                pre.check(None)?;
                let key = key.into_owned();
                t.registrations.insert(key, record);
            }
        }
        t.operations.replace(StoredOperation(operation));
        Ok(())
    }

    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = id.key();
        let current = t.registrations.get(&key).ok_or(StoreError::NotFound)?;
        pre.check(etag_of(current.etag().as_ref()).as_ref())?;
        t.registrations.remove(&key);
        Ok(())
    }

    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let key = group.key();
        Ok(page_of(
            &self.read()?.registrations,
            page,
            |r: &RegistrationRecord| matches!(&r.enrollment, EnrollmentRef::Group(g) if g.key() == key),
        ))
    }

    fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
        self.write()?.operations.replace(StoredOperation(operation.clone()));
        Ok(())
    }

    fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
        Ok(self.read()?.operations.get(id.as_str()).map(|stored| stored.0.clone()))
    }

    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let mut t = self.write()?;
        let before = t.operations.len();
        t.operations.retain(|stored| stored.0.created >= cutoff);
        Ok(before - t.operations.len())
    }
}
