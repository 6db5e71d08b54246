//! In-memory implementation of every provisioning store trait: the reference the durable stores
//! are checked against, and the store of embedded and test deployments.

use std::borrow::Borrow;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zerotouch_proto::service::{EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{ETag, EnrollmentGroupId, OperationId, RegistrationId, Text, Timestamp};

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
    registrations: Registrations,
    /// Looked up by id and swept by age, never listed in order. The ids are random and made
    /// by the provisioner, never chosen by clients, so a fixed-seed fast hash (no clock or RNG
    /// in the core, unlike a randomly seeded one) needs no flooding resistance.
    operations: HashSet<StoredOperation, foldhash::fast::FixedState>,
}

/// Registration records by lookup key (the lower-cased registration id).
///
/// Every registration looks its record up and replaces it, so the records are found by hash;
/// the keys are also kept in order, for paging, and that order changes only when a
/// registration is added or deleted. Registration ids are chosen by devices, so the hash is
/// std's randomly keyed SipHash (flooding-resistant), not the fixed-seed one of the
/// provisioner-made operation ids.
#[derive(Debug, Default)]
struct Registrations {
    /// Shared: registrations read the record they replace without copying it.
    by_key: HashMap<Text, Arc<RegistrationRecord>>,
    order: BTreeSet<Text>,
}

/// The lookup key of `id` as a [`Text`], sharing the id's text when it is lower-case already.
fn key_text(id: &RegistrationId) -> Text {
    match id.lookup_key() {
        Cow::Borrowed(_) => id.as_text().clone(),
        Cow::Owned(key) => Text::from(key),
    }
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
    let entries = map.range::<str, _>(after(page)).map(|(k, v)| (k.as_str(), v.borrow()));
    page_of_entries(entries, page, keep)
}

/// The keys a page starts after: those after its continuation token, or all.
fn after(page: &PageRequest) -> (Bound<&str>, Bound<&str>) {
    match &page.continuation {
        Some(after) => (Bound::Excluded(after.as_str()), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// One page of key-ordered entries starting at the page's position.
fn page_of_entries<'a, T: Clone + 'a>(
    entries: impl Iterator<Item = (&'a str, &'a T)>,
    page: &PageRequest,
    keep: impl Fn(&T) -> bool,
) -> Page<T> {
    let max = page.max_items.max(1);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (k, v) in entries {
        if !keep(v) {
            continue;
        }
        if items.len() == max {
            more = true;
            break;
        }
        items.push(v.clone());
        last = Some(k);
    }
    Page { items, continuation: if more { last.map(str::to_owned) } else { None } }
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
        Ok(self.read()?.registrations.by_key.get(id.lookup_key().as_ref()).cloned())
    }

    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let registrations = &mut t.registrations;
        match registrations.by_key.get_mut(record.registration_id.lookup_key().as_ref()) {
            Some(current) => {
                pre.check_bare(Some(current.etag_bare().unwrap_or_default()))?;
                *current = record;
            }
            None => {
                pre.check(None)?;
                let key = key_text(&record.registration_id);
                registrations.order.insert(key.clone());
                registrations.by_key.insert(key, record);
            }
        }
        t.operations.replace(StoredOperation(operation));
        Ok(())
    }

    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        let mut t = self.write()?;
        let key = id.key();
        let current = t.registrations.by_key.get(key.as_str()).ok_or(StoreError::NotFound)?;
        pre.check(etag_of(current.etag().as_ref()).as_ref())?;
        t.registrations.by_key.remove(key.as_str());
        t.registrations.order.remove(key.as_str());
        Ok(())
    }

    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let key = group.key();
        let t = self.read()?;
        let Registrations { by_key, order } = &t.registrations;
        let entries = order
            .range::<str, _>(after(page))
            .filter_map(|k| by_key.get(k).map(|record| (k.as_str(), &**record)));
        Ok(page_of_entries(
            entries,
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

    /// Everything here is in memory: every stored operation.
    fn operation_in_memory(&self, id: &OperationId) -> Option<OperationRecord> {
        self.operation(id).ok().flatten()
    }

    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let mut t = self.write()?;
        let before = t.operations.len();
        t.operations.retain(|stored| stored.0.created >= cutoff);
        Ok(before - t.operations.len())
    }
}
