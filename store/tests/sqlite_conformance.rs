//! The SQLite store passes the provisioning and hub store conformance suites, in memory and on a
//! database file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use zerotouch_store::sqlite::SqliteStore;
use zerotouch_testkit::{conformance, hub_conformance, unit_conformance};

fn memory() -> SqliteStore {
    SqliteStore::open_in_memory().expect("in-memory database")
}

/// A constructor of fresh database files in `dir`, one per store the suite asks for.
fn files<'a>(dir: &'a Path, prefix: &'a str) -> impl Fn() -> SqliteStore + 'a {
    let n = AtomicUsize::new(0);
    move || {
        let name = format!("{prefix}-{}.db", n.fetch_add(1, Ordering::Relaxed));
        SqliteStore::open(dir.join(name)).expect("database file")
    }
}

#[test]
fn sqlite_store_keeps_enrollments_like_every_backend() {
    conformance::enrollment_store(memory);
}

#[test]
fn sqlite_store_keeps_enrollment_groups_like_every_backend() {
    conformance::enrollment_group_store(memory);
}

#[test]
fn sqlite_store_keeps_ca_certificates_like_every_backend() {
    conformance::ca_certificate_store(memory);
}

#[test]
fn sqlite_store_keeps_registrations_and_operations_like_every_backend() {
    conformance::registration_store(memory);
}

#[test]
fn sqlite_file_store_passes_the_whole_provisioning_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(files(dir.path(), "case"));
}

#[test]
fn a_shared_sqlite_store_passes_the_whole_provisioning_suite() {
    conformance::run_all(|| Arc::new(memory()));
}

#[test]
fn sqlite_identity_store_keeps_devices_and_modules_like_every_backend() {
    hub_conformance::identity_store(memory);
}

#[test]
fn sqlite_twin_store_keeps_twins_like_every_backend() {
    hub_conformance::twin_store(memory);
}

#[test]
fn sqlite_job_store_keeps_jobs_and_device_jobs_like_every_backend() {
    hub_conformance::job_store(memory);
}

#[test]
fn sqlite_file_store_passes_the_whole_hub_suite() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    hub_conformance::run_all(files(dir, "identities"), files(dir, "twins"), files(dir, "jobs"));
}

#[test]
fn one_shared_sqlite_handle_serves_as_identity_twin_and_job_store() {
    hub_conformance::run_all(|| Arc::new(memory()), || Arc::new(memory()), || Arc::new(memory()));
}

/// A hub view of a fresh in-memory database.
fn hub_view() -> SqliteStore {
    memory().hub("hub-a.localhost").expect("hub view")
}

#[test]
fn a_hub_view_passes_the_whole_hub_suite() {
    hub_conformance::run_all(hub_view, hub_view, hub_view);
}

#[test]
fn registrations_and_hub_writes_are_one_unit_in_memory() {
    unit_conformance::atomic_units(|| {
        let store = memory();
        let hub = store.hub("hub-a.localhost").unwrap();
        (store, hub.clone(), hub)
    });
}

#[test]
fn registrations_and_hub_writes_are_one_unit_on_a_file_with_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let make = files(dir.path(), "units");
    unit_conformance::atomic_units(|| {
        let store = make();
        let hub = store.hub("hub-a.localhost").unwrap();
        (store, hub.clone(), hub)
    });
}
