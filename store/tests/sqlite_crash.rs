//! A process importing identities and registering devices is killed with SIGKILL at a random
//! point; the reopened database holds every write it acknowledged, every row parses, and every
//! registration is whole: its record, hub identity and twin are all there or none is (they are
//! written as one unit, by several threads at once so units share commits).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{
    EnrollmentRef, OperationRecord, PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_proto::device::{RegistrationOperationStatus, RegistrationStatus, Substatus};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::DeviceRegistrationState;
use zerotouch_proto::{DeviceId, ETag, EnrollmentGroupId, OperationId, RegistrationId, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

/// Environment variable that makes the child test write into this database until killed.
const CHILD_DB: &str = "ZEROTOUCH_CRASH_CHILD_DB";
const CHILD_TEST: &str = "importer_acknowledges_only_committed_writes";
const BATCH: usize = 200;
const GROUP: &str = "crash-group";
const HUB: &str = "hub-1.example.net";
/// Threads registering at once in each round.
const REGISTRARS: usize = 4;

fn device_id(batch: usize, i: usize) -> DeviceId {
    DeviceId::new(format!("dev-{batch:06}-{i:03}")).unwrap()
}

fn registration(n: usize) -> (RegistrationRecord, OperationRecord) {
    let id = format!("reg-{n:06}");
    let at = Timestamp::from_unix_secs(1_700_000_000 + i64::try_from(n).unwrap());
    let record = RegistrationRecord {
        registration_id: RegistrationId::new(&id).unwrap(),
        state: DeviceRegistrationState {
            registration_id: id.clone().into(),
            created_date_time_utc: Some(at),
            assigned_hub: Some("hub-1.example.net".into()),
            device_id: Some(id.clone().into()),
            status: Some(RegistrationStatus::Assigned),
            substatus: Some(Substatus::InitialAssignment),
            last_updated_date_time_utc: Some(at),
            etag: Some(format!("\"etag-{n}\"").into()),
            ..DeviceRegistrationState::default()
        },
        enrollment: EnrollmentRef::Group(EnrollmentGroupId::new(GROUP).unwrap()),
        initial_hub: Some("hub-1.example.net".into()),
    };
    let op = format!("4.{n:016x}.{n:08}");
    let operation = OperationRecord {
        operation_id: OperationId::new(&op).unwrap(),
        registration_id: record.registration_id.clone(),
        created: at,
        status: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigned,
            registration_state: None,
        }
        .into(),
    };
    (record, operation)
}

/// Registration `n` as the provisioner writes it: hub identity, twin, then record, one unit.
fn register(store: &SqliteStore, hub: &SqliteStore, n: usize) {
    let (record, operation) = registration(n);
    let id = DeviceId::new(record.registration_id.to_string()).unwrap();
    let twin = TwinDocument::new(Timestamp::from_unix_secs(1_700_000_000));
    store
        .atomically(&mut || {
            hub.put_device(&Device::new(id.clone()), &Precondition::MustNotExist)?;
            hub.put_twin(&TwinKey::device(id.clone()), &twin, &Precondition::MustNotExist)?;
            store.commit_registration(
                Arc::new(record.clone()),
                &Precondition::MustNotExist,
                operation.clone(),
            )?;
            Ok(())
        })
        .unwrap();
}

/// Imports batches of devices, then registers [`REGISTRARS`] devices from as many threads,
/// printing `ack devices N` / `ack registration N` only after the write returned. Stops after
/// `limit` rounds if given.
fn import_and_register(db: &Path, limit: Option<usize>, out: &mut (impl Write + Send)) {
    let store = SqliteStore::open(db).unwrap();
    let hub = store.hub(HUB).unwrap();
    let out = std::sync::Mutex::new(out);
    let ack = |line: String| {
        let mut out = out.lock().unwrap();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    for round in 0..limit.unwrap_or(usize::MAX) {
        let devices: Vec<Device> = (0..BATCH).map(|i| Device::new(device_id(round, i))).collect();
        store.put_devices(&devices).unwrap();
        ack(format!("ack devices {round}"));
        std::thread::scope(|s| {
            for t in 0..REGISTRARS {
                let (store, hub, ack) = (&store, &hub, &ack);
                s.spawn(move || {
                    let n = round * REGISTRARS + t;
                    register(store, hub, n);
                    ack(format!("ack registration {n}"));
                });
            }
        });
    }
}

/// Checks every acknowledged write is in the database and every row of the tables written
/// parses; returns the number of acknowledged writes.
fn check_acknowledged(db: &Path, acks: &[String]) -> usize {
    let store = SqliteStore::open(db).expect("the database reopens after the kill");
    let hub = store.hub(HUB).unwrap();
    for ack in acks {
        let (kind, n) = ack.rsplit_once(' ').unwrap();
        let n: usize = n.parse().unwrap();
        match kind {
            "ack devices" => {
                for i in 0..BATCH {
                    assert!(
                        store.device(&device_id(n, i)).unwrap().is_some(),
                        "acknowledged device {n}/{i} is lost"
                    );
                }
            }
            "ack registration" => {
                let (record, operation) = registration(n);
                let stored = store.registration(&record.registration_id).unwrap();
                assert_eq!(stored.as_ref(), Some(&record), "acknowledged registration {n} is lost");
                let op = store.operation(&operation.operation_id).unwrap();
                assert_eq!(op.as_ref(), Some(&operation), "operation of registration {n} is lost");
            }
            other => panic!("unexpected line {other:?}"),
        }
    }
    // Whole batches only: a transaction is never half applied.
    let mut devices = 0;
    store
        .export_devices(1000, |d| {
            assert_eq!(d.etag, None::<ETag>);
            devices += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(devices % BATCH, 0, "a device batch was half written");
    // Whole registrations only: each record has its identity and twin, each identity its record.
    let group = EnrollmentGroupId::new(GROUP).unwrap();
    let mut page = PageRequest { continuation: None, max_items: 500 };
    let mut records = 0;
    loop {
        let got = store.registrations_by_group(&group, &page).unwrap();
        for record in &got.items {
            let id = DeviceId::new(record.registration_id.to_string()).unwrap();
            assert!(hub.device(&id).unwrap().is_some(), "registration {id} has no hub identity");
            assert!(
                hub.twin(&TwinKey::device(id.clone())).unwrap().is_some(),
                "registration {id} has no twin"
            );
            records += 1;
        }
        match got.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    let mut identities = 0;
    hub.export_devices(1000, |_| {
        identities += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(identities, records, "a hub identity exists without its registration record");
    let conn = rusqlite::Connection::open(db).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    acks.len()
}

/// In the child role it writes into the parent's database until killed; run on its own it
/// does a short bounded import and checks what it acknowledged.
#[test]
fn importer_acknowledges_only_committed_writes() {
    if let Ok(db) = std::env::var(CHILD_DB) {
        import_and_register(Path::new(&db), None, &mut std::io::stdout());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("zerotouch.db");
    let mut out = Vec::new();
    import_and_register(&db, Some(3), &mut out);
    let acks: Vec<String> = String::from_utf8(out).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(check_acknowledged(&db, &acks), 3 * (1 + REGISTRARS));
}

#[test]
fn an_importer_killed_at_a_random_point_loses_no_acknowledged_write() {
    let exe = std::env::current_exe().unwrap();
    let mut total = 0;
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("zerotouch.db");
        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.starts_with("ack "))
                .collect::<Vec<String>>()
        });
        let delay = rand::random_range(400..1200) + round * 150;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        let checked = check_acknowledged(&db, &acks);
        eprintln!("round {round}: killed after {delay} ms, {checked} acknowledged writes present");
        total += checked;
    }
    assert!(total > 0, "the children acknowledged no write before being killed");
}
