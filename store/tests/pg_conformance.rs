//! The testkit conformance suites, unchanged, over the PostgreSQL store.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use pg_support::TestDb;
use zerotouch_testkit::{conformance, hub_conformance, unit_conformance};

#[test]
fn provisioning_stores_pass_the_conformance_suite_on_postgres() {
    let db = TestDb::new();
    conformance::run_all(|| db.empty_store());
}

#[test]
fn identity_store_passes_the_hub_conformance_suite_on_postgres() {
    let db = TestDb::new();
    hub_conformance::identity_store(|| db.empty_store());
}

#[test]
fn twin_store_passes_the_hub_conformance_suite_on_postgres() {
    let db = TestDb::new();
    hub_conformance::twin_store(|| db.empty_store());
}

#[test]
fn job_store_passes_the_hub_conformance_suite_on_postgres() {
    let db = TestDb::new();
    hub_conformance::job_store(|| db.empty_store());
}

#[test]
fn registrations_with_their_hub_identities_and_twins_commit_as_one_unit_on_postgres() {
    let db = TestDb::new();
    let store = db.store();
    unit_conformance::atomic_units(|| (store.clone(), store.hub("h1").unwrap(), store.hub("h1").unwrap()));
}

#[test]
fn a_named_hubs_identity_twin_and_job_stores_pass_the_hub_conformance_suite_on_postgres() {
    let db = TestDb::new();
    hub_conformance::identity_store(|| db.empty_store().hub("North.Example.net").unwrap());
    hub_conformance::twin_store(|| db.empty_store().hub("North.Example.net").unwrap());
    hub_conformance::job_store(|| db.empty_store().hub("North.Example.net").unwrap());
}
