//! A checkpoint moves every commit into the database file, and never waits for ever on a write
//! that does not end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use zerotouch_engine::store::{EnrollmentGroupStore, Precondition, RegistrationStore};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::EnrollmentGroupId;
use zerotouch_store::sqlite::SqliteStore;

fn group(id: &str) -> EnrollmentGroup {
    EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), AttestationMechanism::symmetric_key())
}

#[test]
fn a_checkpoint_leaves_every_commit_in_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    store.put_enrollment_group(&group("line-1"), &Precondition::None).unwrap();
    store.checkpoint().unwrap();
    // The log is empty; a copy of the file alone holds the group.
    assert_eq!(std::fs::metadata(dir.path().join("zerotouch.sqlite-wal")).map(|m| m.len()).unwrap_or(0), 0);
    let copy = dir.path().join("copy.sqlite");
    std::fs::copy(&path, &copy).unwrap();
    let copied = SqliteStore::open(&copy).unwrap();
    assert!(copied.enrollment_group(&EnrollmentGroupId::new("line-1").unwrap()).unwrap().is_some());
    drop(store);
}

#[test]
fn a_checkpoint_gives_up_on_a_write_that_does_not_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            store
                .atomically(&mut || {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_secs(8));
                    Ok(())
                })
                .unwrap();
        })
    };
    started_rx.recv().unwrap();
    let asked = Instant::now();
    let refused = store.checkpoint().unwrap_err();
    assert!(asked.elapsed() < Duration::from_secs(7), "{:?}", asked.elapsed());
    assert!(refused.to_string().contains("write still running"), "{refused}");
    writer.join().unwrap();
    store.checkpoint().unwrap();
}

#[test]
fn the_last_handle_to_close_leaves_every_commit_in_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    store.put_enrollment_group(&group("line-2"), &Precondition::None).unwrap();
    // A read, so that reader connections are open too (they cannot checkpoint).
    assert!(store.enrollment_group(&EnrollmentGroupId::new("line-2").unwrap()).unwrap().is_some());
    let clone = store.clone();
    drop(store);
    drop(clone);
    // As a command that wrote and exited leaves it: the file alone holds the group.
    assert_eq!(std::fs::metadata(dir.path().join("zerotouch.sqlite-wal")).map(|m| m.len()).unwrap_or(0), 0);
    let copy = dir.path().join("copy.sqlite");
    std::fs::copy(&path, &copy).unwrap();
    let copied = SqliteStore::open(&copy).unwrap();
    assert!(copied.enrollment_group(&EnrollmentGroupId::new("line-2").unwrap()).unwrap().is_some());
}
