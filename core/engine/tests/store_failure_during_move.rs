//! A store that fails while a device moves between hubs: the registration is answered 500, and
//! the move's `assigning` record does not outlive it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::error::StoreError;
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_engine::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentStore, OperationRecord, Page,
    PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_proto::device::{RegistrationStatus, Substatus};
use zerotouch_proto::service::{AllocationPolicy, EnrollmentGroup, IndividualEnrollment, ReprovisionPolicy};
use zerotouch_proto::{EnrollmentGroupId, IdScope, OperationId, RegistrationId, Timestamp};
use zerotouch_testkit::hubs::SimHubs;
use zerotouch_testkit::sim::Simulator;

const ID: &str = "boiler-3";

/// A memory store whose writes of `assigned` records fail while `down` is set (a database that
/// refused the final write of a registration: disk full, connection lost).
struct FailingAssigned {
    inner: MemoryStore,
    down: AtomicBool,
}

impl EnrollmentStore for FailingAssigned {
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
        self.inner.enrollment(id)
    }
    fn put_enrollment(&self, e: &IndividualEnrollment, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_enrollment(e, pre)
    }
    fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.delete_enrollment(id, pre)
    }
    fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
        self.inner.enrollments(page)
    }
}

impl EnrollmentGroupStore for FailingAssigned {
    fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
        self.inner.enrollment_group(id)
    }
    fn put_enrollment_group(&self, g: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_enrollment_group(g, pre)
    }
    fn delete_enrollment_group(&self, id: &EnrollmentGroupId, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.delete_enrollment_group(id, pre)
    }
    fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
        self.inner.enrollment_groups(page)
    }
    fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        self.inner.symmetric_key_groups()
    }
    fn groups_by_ca_subject(&self, subject: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        self.inner.groups_by_ca_subject(subject)
    }
}

impl CaCertificateStore for FailingAssigned {
    fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
        self.inner.ca_certificate(name)
    }
    fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_ca_certificate(cert, pre)
    }
    fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.delete_ca_certificate(name, pre)
    }
}

impl RegistrationStore for FailingAssigned {
    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
        self.inner.registration(id)
    }
    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) && record.state.status == Some(RegistrationStatus::Assigned) {
            return Err(StoreError::Backend("disk I/O error".into()));
        }
        self.inner.commit_registration(record, pre, operation)
    }
    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.delete_registration(id, pre)
    }
    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        self.inner.registrations_by_group(group, page)
    }
    fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
        self.inner.put_operation(operation)
    }
    fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
        self.inner.operation(id)
    }
    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        self.inner.purge_operations(cutoff)
    }
}

#[test]
fn a_move_whose_final_write_fails_is_answered_500_and_not_left_assigning() {
    let store = Arc::new(FailingAssigned { inner: MemoryStore::new(), down: AtomicBool::new(false) });
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        Arc::clone(&store),
        Arc::new(RingCrypto::new()),
        Allocator::new(linked_hubs()).with_custom(Arc::new(SiteAllocator)),
    );
    let mut w = Simulator::new(provisioner, SimHubs::new());
    let options = EnrollOptions {
        policy: Some(AllocationPolicy::Custom),
        reprovision: Some(ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true }),
        ..Default::default()
    };
    let key = enroll_symmetric(&w, ID, &options);
    let site = |s: &str| Some(serde_json::json!({ "site": s }));
    assigned(w.register(symmetric_device(ID, &key, site("a")), None));
    let id = RegistrationId::new(ID).unwrap();
    let before = store.registration(&id).unwrap().unwrap();

    // The move to hub b: its `assigning` record is written, then the final write fails. Each
    // register is answered 500, which the device retries until its registration times out.
    store.down.store(true, Ordering::SeqCst);
    failed(w.register(symmetric_device(ID, &key, site("b")), None));
    let record = store.registration(&id).unwrap().unwrap();
    assert_eq!(record.state.status, Some(RegistrationStatus::Failed), "{record:?}");
    assert_eq!(record.state.error_code, Some(500_000));
    assert_eq!(record.state.assigned_hub.as_deref(), Some(HUB_A));
    assert_eq!(record.state.device_id.as_deref(), Some(ID));
    assert_eq!(record.state.created_date_time_utc, before.state.created_date_time_utc);
    // (Where the identity is now depends on the store's unit: a durable store rolls the move's
    // hub writes back with the failed write; the memory store undoes nothing.)

    // The store back, the device is assigned to hub b (over the memory store, the first try's
    // migration stood: its identity is there already, and is kept).
    store.down.store(false, Ordering::SeqCst);
    let moved = assigned(w.register(symmetric_device(ID, &key, site("b")), None));
    assert_eq!((moved.assigned_hub.as_str(), moved.substatus), (HUB_B, Some(Substatus::DeviceDataMigrated)));
    assert_eq!(w.hubs.hubs_of(ID), vec![HUB_B.to_owned()]);
}
