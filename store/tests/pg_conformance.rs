//! The testkit conformance suites, unchanged, over the PostgreSQL store.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use pg_support::TestDb;
use zerotouch_testkit::{conformance, hub_conformance};

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
