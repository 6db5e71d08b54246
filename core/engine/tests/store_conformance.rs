//! The in-memory store passes the store conformance suite every backend must pass.

use zerotouch_engine::memory::MemoryStore;
use zerotouch_testkit::conformance;

#[test]
fn memory_store_keeps_enrollments_like_every_backend() {
    conformance::enrollment_store(MemoryStore::new);
}

#[test]
fn memory_store_keeps_enrollment_groups_like_every_backend() {
    conformance::enrollment_group_store(MemoryStore::new);
}

#[test]
fn memory_store_keeps_ca_certificates_like_every_backend() {
    conformance::ca_certificate_store(MemoryStore::new);
}

#[test]
fn memory_store_keeps_registrations_and_operations_like_every_backend() {
    conformance::registration_store(MemoryStore::new);
}

#[test]
fn memory_store_passes_the_whole_suite() {
    conformance::run_all(MemoryStore::new);
}

#[test]
fn a_shared_memory_store_passes_the_whole_suite() {
    conformance::run_all(|| std::sync::Arc::new(MemoryStore::new()));
}
