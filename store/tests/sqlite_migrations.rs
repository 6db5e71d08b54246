//! Schema migrations of the SQLite store: applied at open, idempotent, and a database written by a
//! newer zerotouch is refused with an error that says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::Precondition;
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::Device;
use zerotouch_proto::DeviceId;
use zerotouch_store::sqlite::{SqliteStore, SCHEMA_VERSION};

#[test]
fn a_new_database_is_migrated_to_the_current_schema_and_reopens_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.db");
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let id = DeviceId::new("thermostat-1").unwrap();
    store.put_device(&Device::new(id.clone()), &Precondition::MustNotExist).unwrap();
    drop(store);

    for _ in 0..2 {
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(reopened.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(reopened.device(&id).unwrap(), Some(Device::new(id.clone())));
    }
}

#[test]
fn a_database_from_a_newer_zerotouch_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(conn);

    match SqliteStore::open(&path) {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("newer"), "the error should say the database is newer: {message}");
            assert!(message.contains(&format!("schema version {}", SCHEMA_VERSION + 1)), "{message}");
        }
        other => panic!("opening a newer database must fail, got {other:?}"),
    }
}

#[test]
fn two_stores_opened_on_one_file_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.db");
    let first = SqliteStore::open(&path).unwrap();
    let second = SqliteStore::open(&path).unwrap();
    let id = DeviceId::new("shared-1").unwrap();
    first.put_device(&Device::new(id.clone()), &Precondition::MustNotExist).unwrap();
    assert_eq!(
        second.put_device(&Device::new(id.clone()), &Precondition::MustNotExist),
        Err(StoreError::AlreadyExists)
    );
    assert!(second.device(&id).unwrap().is_some());
}

#[test]
fn a_store_opened_for_power_loss_durability_keeps_what_it_wrote() {
    use zerotouch_store::sqlite::Durability;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.db");
    let id = DeviceId::new("synced-1").unwrap();
    let store = SqliteStore::open_with(&path, Durability::PowerLoss).unwrap();
    store.put_device(&Device::new(id.clone()), &Precondition::MustNotExist).unwrap();
    drop(store);
    assert!(SqliteStore::open(&path).unwrap().device(&id).unwrap().is_some());
}
