//! The in-memory hub stores pass the hub store conformance suite every backend must pass.

use std::sync::Arc;

use zerotouch_engine::jobs::MemoryJobStore;
use zerotouch_engine::registry::MemoryIdentityStore;
use zerotouch_engine::twin::MemoryTwinStore;
use zerotouch_testkit::hub_conformance;

#[test]
fn memory_identity_store_keeps_devices_and_modules_like_every_backend() {
    hub_conformance::identity_store(MemoryIdentityStore::new);
}

#[test]
fn memory_twin_store_keeps_twins_like_every_backend() {
    hub_conformance::twin_store(MemoryTwinStore::new);
}

#[test]
fn memory_job_store_keeps_jobs_and_device_jobs_like_every_backend() {
    hub_conformance::job_store(MemoryJobStore::new);
}

#[test]
fn a_shared_memory_job_store_keeps_jobs_like_every_backend() {
    hub_conformance::job_store(|| Arc::new(MemoryJobStore::new()));
}

#[test]
fn memory_hub_stores_pass_the_whole_suite() {
    hub_conformance::run_all(MemoryIdentityStore::new, MemoryTwinStore::new, MemoryJobStore::new);
}

#[test]
fn shared_memory_identity_and_twin_stores_pass_the_whole_suite() {
    hub_conformance::run_all(
        || Arc::new(MemoryIdentityStore::new()),
        || Arc::new(MemoryTwinStore::new()),
        || Arc::new(MemoryJobStore::new()),
    );
}
