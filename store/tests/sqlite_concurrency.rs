//! Two SQLite stores opened on one file behave like two zerotouch instances: `If-Match` twin
//! updates from both lose no accepted update, and one registration id racing from both gets
//! exactly one record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use zerotouch_engine::registry::hub_error_code;
use zerotouch_engine::store::{
    EnrollmentRef, OperationRecord, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::twin::{update_twin, TwinDocument, TwinKey, TwinOperation, TwinStore};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::device::{RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::hub::HubErrorCode;
use zerotouch_proto::service::DeviceRegistrationState;
use zerotouch_proto::twin::TwinPatch;
use zerotouch_proto::{DeviceId, IfMatch, OperationId, RegistrationId, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

const THREADS: usize = 8;

fn two_instances() -> (tempfile::TempDir, [SqliteStore; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    (dir, [a, b])
}

#[test]
fn if_match_twin_updates_from_two_instances_lose_no_accepted_update() {
    let (_dir, stores) = two_instances();
    let now = Timestamp::from_unix_secs(1_700_000_000);
    let key = TwinKey::device(DeviceId::new("contended").unwrap());
    stores[0].put_twin(&key, &TwinDocument::new(now), &Precondition::MustNotExist).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);

    let accepted: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &stores[t % 2];
                let key = &key;
                s.spawn(move || {
                    let mut accepted = 0u64;
                    while Instant::now() < deadline {
                        let etag = store.twin(key).unwrap().unwrap().etag();
                        let patch: TwinPatch =
                            serde_json::from_value(json!({"tags": {format!("writer{t}"): accepted + 1}}))
                                .unwrap();
                        let op = TwinOperation::Patch(patch);
                        match update_twin(store, key, now, &op, &IfMatch::Tag(etag.as_str().to_owned())) {
                            Ok(_) => accepted += 1,
                            Err(Error::Conflict(_)) => {}
                            Err(e) if hub_error_code(&e) == HubErrorCode::PreconditionFailed => {}
                            Err(e) => panic!("unexpected error {e:?}"),
                        }
                    }
                    accepted
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    let total: u64 = accepted.iter().sum();
    assert!(total > THREADS as u64, "too little progress to prove anything: {accepted:?}");
    let twin = stores[1].twin(&key).unwrap().unwrap();
    assert_eq!(twin.version(), 2 + total, "every accepted update advanced the version once");
    for (t, n) in accepted.iter().enumerate() {
        let seen = twin.tags().get(&format!("writer{t}")).and_then(serde_json::Value::as_u64).unwrap_or(0);
        assert_eq!(seen, *n, "the last accepted update of writer {t} is the one stored");
    }
}

fn record(id: &str, hub: &str) -> RegistrationRecord {
    RegistrationRecord {
        registration_id: RegistrationId::new(id).unwrap(),
        state: DeviceRegistrationState {
            registration_id: id.into(),
            assigned_hub: Some(hub.into()),
            device_id: Some(id.into()),
            status: Some(RegistrationStatus::Assigned),
            etag: Some(format!("\"{hub}\"").into()),
            ..DeviceRegistrationState::default()
        },
        enrollment: EnrollmentRef::Individual(RegistrationId::new(id).unwrap()),
        initial_hub: Some(hub.into()),
    }
}

fn operation(op: &str, id: &str) -> OperationRecord {
    OperationRecord {
        operation_id: OperationId::new(op).unwrap(),
        registration_id: RegistrationId::new(id).unwrap(),
        created: Timestamp::from_unix_secs(1_700_000_000),
        status: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigned,
            registration_state: None,
        }
        .into(),
    }
}

#[test]
fn one_registration_id_racing_from_two_instances_is_assigned_exactly_once() {
    let (_dir, stores) = two_instances();
    for round in 0..20 {
        let id = format!("race-{round}");
        let winners: Vec<usize> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let store = &stores[t % 2];
                    let id = &id;
                    s.spawn(move || {
                        let rec = record(id, &format!("hub-{t}"));
                        let op = operation(&format!("op-{round}-{t}"), id);
                        match store.commit_registration(
                            Arc::new(rec.clone()),
                            &Precondition::MustNotExist,
                            op.clone(),
                        ) {
                            Ok(()) => Some(t),
                            Err(StoreError::AlreadyExists) => None,
                            Err(e) => panic!("unexpected error {e:?}"),
                        }
                    })
                })
                .collect();
            racers.into_iter().filter_map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let winner = winners[0];
        let stored = stores[0].registration(&RegistrationId::new(&id).unwrap()).unwrap().unwrap();
        assert_eq!(stored.state.assigned_hub.as_deref(), Some(format!("hub-{winner}").as_str()));
        for t in 0..THREADS {
            let op = stores[1].operation(&OperationId::new(format!("op-{round}-{t}")).unwrap()).unwrap();
            assert_eq!(op.is_some(), t == winner, "round {round}: operation of racer {t}");
        }
    }
}
