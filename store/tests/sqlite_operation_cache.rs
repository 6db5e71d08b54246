//! A device polls the operation its register wrote a few seconds earlier: the SQLite store
//! answers operations it committed lately from memory, so what it serves must be exactly what
//! is committed (never a rolled-back write, never a purged row).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use zerotouch_engine::store::{OperationRecord, Precondition, RegistrationRecord, RegistrationStore};
use zerotouch_engine::Error;
use zerotouch_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::service::DeviceRegistrationState;
use zerotouch_proto::{OperationId, RegistrationId, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_unix_nanos(1_700_000_000_000_000_000 + secs * 1_000_000_000)
}

fn record(id: &str, etag: &str) -> RegistrationRecord {
    RegistrationRecord {
        registration_id: RegistrationId::new(id).unwrap(),
        state: DeviceRegistrationState {
            registration_id: id.into(),
            status: Some(RegistrationStatus::Assigned),
            assigned_hub: Some("hub-1.localhost".into()),
            device_id: Some(id.into()),
            etag: Some(etag.into()),
            ..DeviceRegistrationState::default()
        },
        enrollment: zerotouch_engine::store::EnrollmentRef::Individual(RegistrationId::new(id).unwrap()),
        initial_hub: Some("hub-1.localhost".into()),
    }
}

fn operation(
    id: &str,
    registration: &str,
    status: RegistrationStatus,
    created: Timestamp,
) -> OperationRecord {
    OperationRecord {
        operation_id: OperationId::new(id).unwrap(),
        registration_id: RegistrationId::new(registration).unwrap(),
        created,
        status: RegistrationOperationStatus {
            operation_id: id.into(),
            status,
            registration_state: Some(DeviceRegistrationResult {
                registration_id: registration.into(),
                status: Some(status),
                ..DeviceRegistrationResult::default()
            }),
        }
        .into(),
    }
}

fn polled(store: &SqliteStore, id: &str) -> Option<OperationRecord> {
    store.operation(&OperationId::new(id).unwrap()).unwrap()
}

#[test]
fn a_poll_finds_the_committed_operation_and_never_a_rolled_back_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let server = SqliteStore::open(&path).unwrap();

    // A registration whose unit fails after writing its record and operation leaves neither.
    let failed = server.atomically(&mut || {
        let op = operation("op-rolled-back", "dev-1", RegistrationStatus::Assigned, at(0));
        server.commit_registration(
            Arc::new(record("dev-1", "e1")),
            &Precondition::MustNotExist,
            op.clone(),
        )?;
        // Inside the unit its own write is visible...
        assert_eq!(polled(&server, "op-rolled-back"), Some(op));
        Err(Error::BadRequest("give up".into()))
    });
    assert!(failed.is_err());
    // ...and after the rollback it is not, neither here nor in the file.
    assert_eq!(polled(&server, "op-rolled-back"), None);
    assert_eq!(polled(&SqliteStore::open(&path).unwrap(), "op-rolled-back"), None);

    // The same registration committed: the poll answers what the file holds.
    let op = operation("op-1", "dev-1", RegistrationStatus::Assigned, at(0));
    server
        .commit_registration(Arc::new(record("dev-1", "e1")), &Precondition::MustNotExist, op.clone())
        .unwrap();
    assert_eq!(polled(&server, "op-1"), Some(op.clone()));
    assert_eq!(polled(&SqliteStore::open(&path).unwrap(), "op-1"), Some(op));

    // A move writes its operation twice (assigning, then assigned): the last write is served.
    let assigning = operation("op-2", "dev-1", RegistrationStatus::Assigning, at(1));
    server
        .commit_registration(Arc::new(record("dev-1", "e2")), &Precondition::Matches("e1".into()), assigning)
        .unwrap();
    let assigned = operation("op-2", "dev-1", RegistrationStatus::Assigned, at(1));
    server
        .commit_registration(
            Arc::new(record("dev-1", "e3")),
            &Precondition::Matches("e2".into()),
            assigned.clone(),
        )
        .unwrap();
    assert_eq!(polled(&server, "op-2"), Some(assigned));

    // A failed assignment's operation (written alone) is served too; a refused compare-and-swap
    // (stale etag) writes nothing, so its operation is not.
    let failure = operation("op-3", "dev-2", RegistrationStatus::Failed, at(2));
    server.put_operation(&failure).unwrap();
    assert_eq!(polled(&server, "op-3"), Some(failure));
    let stale = operation("op-4", "dev-1", RegistrationStatus::Assigned, at(3));
    assert!(server
        .commit_registration(Arc::new(record("dev-1", "e4")), &Precondition::Matches("e1".into()), stale)
        .is_err());
    assert_eq!(polled(&server, "op-4"), None);
}

#[test]
fn purged_operations_are_not_served_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    server.put_operation(&operation("op-old", "dev-1", RegistrationStatus::Assigned, at(0))).unwrap();
    let kept = operation("op-new", "dev-2", RegistrationStatus::Assigned, at(100));
    server.put_operation(&kept).unwrap();
    assert!(polled(&server, "op-old").is_some());

    assert_eq!(server.purge_operations(at(50)).unwrap(), 1);
    assert_eq!(polled(&server, "op-old"), None);
    assert_eq!(polled(&server, "op-new"), Some(kept));
}

#[test]
fn only_committed_operations_are_handed_out_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let server = SqliteStore::open(&path).unwrap();
    let in_memory = |id: &str| server.operation_in_memory(&OperationId::new(id).unwrap());

    let failed = server.atomically(&mut || {
        let op = operation("op-rolled-back", "dev-1", RegistrationStatus::Assigned, at(0));
        server.commit_registration(Arc::new(record("dev-1", "e1")), &Precondition::MustNotExist, op)?;
        // Inside the unit its write is not committed yet: not handed out from memory.
        assert_eq!(in_memory("op-rolled-back"), None);
        Err(Error::BadRequest("give up".into()))
    });
    assert!(failed.is_err());
    assert_eq!(in_memory("op-rolled-back"), None);

    let op = operation("op-1", "dev-1", RegistrationStatus::Assigned, at(0));
    server
        .commit_registration(Arc::new(record("dev-1", "e1")), &Precondition::MustNotExist, op.clone())
        .unwrap();
    assert_eq!(in_memory("op-1"), Some(op));

    // Another handle of the file (another process) never wrote it: it must read the file.
    let other = SqliteStore::open(&path).unwrap();
    assert_eq!(other.operation_in_memory(&OperationId::new("op-1").unwrap()), None);
    assert!(other.operation(&OperationId::new("op-1").unwrap()).unwrap().is_some());

    assert_eq!(server.purge_operations(at(50)).unwrap(), 1);
    assert_eq!(in_memory("op-1"), None);
}
