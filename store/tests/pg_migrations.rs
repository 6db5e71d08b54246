//! Schema migrations of the PostgreSQL store: applied once at connect, also when instances
//! start together, and refused when the database is newer than the binary.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use pg_support::TestDb;
use zerotouch_store::postgres::{PgStore, LATEST_SCHEMA_VERSION};

fn applied_versions(url: &str) -> Vec<i32> {
    TestDb::client(url)
        .query("SELECT version FROM zerotouch_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn connecting_to_an_empty_database_migrates_it_to_the_latest_version() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let store = PgStore::connect(&url, 2).unwrap();
    assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected, "baseline row plus one row per version");
}

#[test]
fn reconnecting_applies_nothing_twice_and_keeps_the_data() {
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::Precondition;
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::DeviceId;

    let db = TestDb::new();
    let url = db.fresh_url();
    let first = PgStore::connect(&url, 2).unwrap();
    let device = Device::new(DeviceId::new("kept").unwrap());
    first.put_device(&device, &Precondition::MustNotExist).unwrap();
    drop(first);
    let second = PgStore::connect(&url, 2).unwrap();
    assert!(second.device(&device.device_id).unwrap().is_some(), "the device survived a reconnect");
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected);
}

#[test]
fn four_instances_starting_together_migrate_the_database_once() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    PgStore::connect(&url, 1).map(drop)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected);
}

#[test]
fn a_database_newer_than_the_binary_is_refused_with_a_clear_error() {
    let db = TestDb::new();
    let url = db.fresh_url();
    drop(PgStore::connect(&url, 1).unwrap());
    let future = LATEST_SCHEMA_VERSION + 1;
    TestDb::client(&url)
        .execute(
            "INSERT INTO zerotouch_schema (version, description) VALUES ($1, 'from a newer zerotouch')",
            &[&future],
        )
        .unwrap();
    let err = PgStore::connect(&url, 1).unwrap_err().to_string();
    assert!(err.contains(&format!("version {future}")) && err.contains("newer"), "unclear error: {err}");
}

#[test]
fn a_missing_server_fails_with_a_backend_error() {
    // Port 9 (discard) on loopback has no PostgreSQL; the pool gives up after its timeout.
    let err = PgStore::connect("postgres://postgres@127.0.0.1:9/postgres?connect_timeout=1", 1).unwrap_err();
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}
