//! A PostgreSQL store opened read-only: it reads what writers committed, never migrates, records
//! nothing, and every write is refused by PostgreSQL itself (the sessions are read-only) with an
//! error that says so; a database without a zerotouch schema is not found.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use std::sync::Arc;

use pg_support::TestDb;
use serde_json::json;
use zerotouch_engine::jobs::{DeviceJobFilter, JobFilter, JobRecord, JobStore};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentRef, EnrollmentStore, OperationRecord,
    OperationStatus, PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::device::{RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::hub::{Device, Module};
use zerotouch_proto::jobs::{DeviceJob, JobId, JobResponse};
use zerotouch_proto::service::{
    AttestationMechanism, DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment,
};
use zerotouch_proto::{DeviceId, ETag, EnrollmentGroupId, ModuleId, OperationId, RegistrationId, Timestamp};
use zerotouch_store::postgres::{migration_sql, PgStore, LATEST_SCHEMA_VERSION};

/// Every table of the schema, for before/after comparisons.
const TABLES: &[&str] = &[
    "zerotouch_schema",
    "enrollments",
    "enrollment_groups",
    "ca_certificates",
    "registrations",
    "operations",
    "devices",
    "modules",
    "twins",
    "jobs",
    "device_jobs",
    "hubs",
    "settings",
];

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// Every row of every table of the schema of `url`, as text, in a stable order.
fn dump(url: &str) -> Vec<(String, Vec<String>)> {
    let mut client = TestDb::client(url);
    TABLES
        .iter()
        .map(|table| {
            let rows =
                client.query(&format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY 1"), &[]).unwrap();
            ((*table).to_owned(), rows.iter().map(|r| r.get(0)).collect())
        })
        .collect()
}

/// The tables in the schema of `url`.
fn tables(url: &str) -> Vec<String> {
    TestDb::client(url)
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() \
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn applied_versions(url: &str) -> Vec<i32> {
    TestDb::client(url)
        .query("SELECT version FROM zerotouch_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn backend_message(result: Result<impl std::fmt::Debug, StoreError>) -> String {
    match result {
        Err(StoreError::Backend(message)) => message,
        other => panic!("expected a backend error, got {other:?}"),
    }
}

fn group(id: &str) -> EnrollmentGroup {
    EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), AttestationMechanism::symmetric_key())
}

fn enrollment(id: &str) -> IndividualEnrollment {
    IndividualEnrollment::new(RegistrationId::new(id).unwrap(), AttestationMechanism::symmetric_key())
}

fn ca(name: &str) -> CaCertificate {
    CaCertificate {
        name: name.to_owned(),
        certificate_der: "TUlJQnNhbXBsZQ==".to_owned(),
        sha256_thumbprint: format!("{:064X}", 1),
        subject_name: "CN=root".to_owned(),
        is_verified: true,
        verification_code: None,
        etag: ETag::new("\"c1\""),
    }
}

fn record(id: &str, etag: &str) -> RegistrationRecord {
    let id = RegistrationId::new(id).unwrap();
    RegistrationRecord {
        registration_id: id.clone(),
        state: DeviceRegistrationState {
            registration_id: id.as_str().into(),
            status: Some(RegistrationStatus::Failed),
            etag: Some(etag.into()),
            ..Default::default()
        },
        enrollment: EnrollmentRef::Individual(id),
        initial_hub: None,
    }
}

fn operation(op: &str, registration: &str) -> OperationRecord {
    OperationRecord {
        operation_id: OperationId::new(op).unwrap(),
        registration_id: RegistrationId::new(registration).unwrap(),
        created: now(),
        status: OperationStatus::Fixed(Box::new(RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Failed,
            registration_state: None,
        })),
    }
}

fn job(id: &str) -> JobRecord {
    let job: JobResponse =
        serde_json::from_value(json!({"jobId": id, "type": "scheduleUpdateTwin", "status": "completed",
            "endTime": "2025-01-01T00:00:00Z"}))
        .unwrap();
    JobRecord { job, version: 1 }
}

fn device_job(job: &str, device: &str) -> DeviceJob {
    serde_json::from_value(json!({"deviceId": device, "jobId": job, "jobType": "scheduleUpdateTwin",
        "status": "completed", "startTimeUtc": "2025-01-01T00:00:00Z", "endTimeUtc": "2025-01-01T00:00:00Z",
        "createdDateTimeUtc": "2025-01-01T00:00:00Z", "lastUpdatedDateTimeUtc": "2025-01-01T00:00:00Z",
        "outcome": {}}))
    .unwrap()
}

/// A schema at `url` holding one row of every kind, written by a store that has closed since.
fn written(url: &str) {
    let store = PgStore::connect(url, 2).unwrap();
    store.put_enrollment(&enrollment("dev-1"), &Precondition::MustNotExist).unwrap();
    store.put_enrollment_group(&group("line-1"), &Precondition::MustNotExist).unwrap();
    store.put_ca_certificate(&ca("root-1"), &Precondition::MustNotExist).unwrap();
    store
        .commit_registration(
            Arc::new(record("dev-1", "r1")),
            &Precondition::MustNotExist,
            operation("op-1", "dev-1"),
        )
        .unwrap();
    let north = store.hub("north.localhost").unwrap();
    let pump = DeviceId::new("pump-1").unwrap();
    north.put_device(&Device::new(pump.clone()), &Precondition::MustNotExist).unwrap();
    north
        .put_module(&Module::new(pump.clone(), ModuleId::new("m1").unwrap()), &Precondition::MustNotExist)
        .unwrap();
    north.put_twin(&TwinKey::device(pump), &TwinDocument::new(now()), &Precondition::MustNotExist).unwrap();
    north.put_job(&job("job-1"), &Precondition::MustNotExist).unwrap();
    north.put_device_job(&device_job("job-1", "pump-1")).unwrap();
    assert_eq!(store.setting_or_insert("id-scope", "0ne00FACADE").unwrap(), "0ne00FACADE");
}

#[test]
fn a_read_only_store_reads_what_a_writer_committed() {
    let db = TestDb::new();
    let url = db.fresh_url();
    written(&url);

    let store = PgStore::connect_read_only(&url, 2).unwrap();
    assert!(store.is_read_only());
    assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
    assert!(store.enrollment(&RegistrationId::new("dev-1").unwrap()).unwrap().is_some());
    let groups = store.enrollment_groups(&PageRequest::default()).unwrap().items;
    assert_eq!(groups.len(), 1);
    assert!(store.ca_certificate("root-1").unwrap().is_some());
    assert!(store.registration(&RegistrationId::new("dev-1").unwrap()).unwrap().is_some());
    assert!(store.operation(&OperationId::new("op-1").unwrap()).unwrap().is_some());
    assert_eq!(store.setting("id-scope").unwrap().as_deref(), Some("0ne00FACADE"));
    assert_eq!(store.setting("nothing-here").unwrap(), None);
    assert_eq!(store.hub_names().unwrap(), ["north.localhost"]);

    let north = store.hub("north.localhost").unwrap();
    assert!(north.is_read_only(), "a hub view of a read-only store is read-only");
    let pump = DeviceId::new("pump-1").unwrap();
    assert!(north.device(&pump).unwrap().is_some());
    assert_eq!(north.modules(&pump).unwrap().len(), 1);
    assert!(north.twin(&TwinKey::device(pump.clone())).unwrap().is_some());
    assert!(north.job(&JobId::new("job-1").unwrap()).unwrap().is_some());
    let all = DeviceJobFilter { job_id: None, device_id: None };
    assert_eq!(north.device_jobs(&all, &PageRequest::default()).unwrap().items.len(), 1);
    assert_eq!(north.jobs(&JobFilter::default(), &PageRequest::default()).unwrap().items.len(), 1);
    let mut exported = Vec::new();
    north
        .export_devices(10, |d| {
            exported.push(d.device_id);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(exported, std::slice::from_ref(&pump));
    // A hub view of a hub never recorded reads as empty, and opening it records nothing.
    let south = store.hub("south.localhost").unwrap();
    assert!(south.device(&pump).unwrap().is_none());
    assert_eq!(store.hub_names().unwrap(), ["north.localhost"]);
}

#[test]
fn every_write_through_a_read_only_store_is_refused_by_postgresql_and_changes_nothing() {
    let db = TestDb::new();
    let url = db.fresh_url();
    written(&url);
    let before = dump(&url);

    let store = PgStore::connect_read_only(&url, 2).unwrap();
    let north = store.hub("north.localhost").unwrap();
    let pump = DeviceId::new("pump-1").unwrap();
    let m1 = ModuleId::new("m1").unwrap();
    let dev1 = RegistrationId::new("dev-1").unwrap();
    let line1 = EnrollmentGroupId::new("line-1").unwrap();
    let twin_key = TwinKey::device(pump.clone());
    let stale = Precondition::Matches("stale".to_owned());
    let later = Timestamp::from_unix_secs(4_000_000_000);

    // Each of these reaches PostgreSQL, which refuses it (SQLSTATE 25006).
    let refused_by_postgresql = [
        (
            "put_enrollment None",
            backend_message(store.put_enrollment(&enrollment("dev-2"), &Precondition::None)),
        ),
        (
            "put_enrollment MustNotExist",
            backend_message(store.put_enrollment(&enrollment("dev-2"), &Precondition::MustNotExist)),
        ),
        (
            "put_enrollment MustExist",
            backend_message(store.put_enrollment(&enrollment("dev-1"), &Precondition::MustExist)),
        ),
        ("put_enrollment Matches", backend_message(store.put_enrollment(&enrollment("dev-1"), &stale))),
        ("delete_enrollment None", backend_message(store.delete_enrollment(&dev1, &Precondition::None))),
        ("delete_enrollment Matches", backend_message(store.delete_enrollment(&dev1, &stale))),
        (
            "put_enrollment_group",
            backend_message(store.put_enrollment_group(&group("line-2"), &Precondition::None)),
        ),
        (
            "delete_enrollment_group",
            backend_message(store.delete_enrollment_group(&line1, &Precondition::None)),
        ),
        ("put_ca_certificate", backend_message(store.put_ca_certificate(&ca("root-2"), &Precondition::None))),
        (
            "delete_ca_certificate",
            backend_message(store.delete_ca_certificate("root-1", &Precondition::None)),
        ),
        (
            "commit_registration",
            backend_message(store.commit_registration(
                Arc::new(record("dev-2", "r1")),
                &Precondition::None,
                operation("op-2", "dev-2"),
            )),
        ),
        ("delete_registration", backend_message(store.delete_registration(&dev1, &Precondition::None))),
        ("put_operation", backend_message(store.put_operation(&operation("op-3", "dev-1")))),
        ("purge_operations", backend_message(store.purge_operations(later))),
        (
            "put_device",
            backend_message(
                north.put_device(&Device::new(DeviceId::new("pump-2").unwrap()), &Precondition::None),
            ),
        ),
        ("delete_device", backend_message(north.delete_device(&pump, &Precondition::None))),
        (
            "put_module",
            backend_message(
                north.put_module(
                    &Module::new(pump.clone(), ModuleId::new("m2").unwrap()),
                    &Precondition::None,
                ),
            ),
        ),
        ("delete_module", backend_message(north.delete_module(&pump, &m1, &Precondition::None))),
        (
            "put_twin",
            backend_message(north.put_twin(&twin_key, &TwinDocument::new(now()), &Precondition::None)),
        ),
        ("delete_twin", backend_message(north.delete_twin(&twin_key, &Precondition::None))),
        ("put_job", backend_message(north.put_job(&job("job-2"), &Precondition::None))),
        ("put_device_job", backend_message(north.put_device_job(&device_job("job-2", "pump-1")))),
        ("purge_jobs", backend_message(north.purge_jobs(later))),
        ("put_devices", backend_message(north.put_devices(&[Device::new(DeviceId::new("pump-3").unwrap())]))),
        (
            "put_devices_with_twins",
            backend_message(north.put_devices_with_twins(&[(
                Device::new(DeviceId::new("pump-4").unwrap()),
                TwinDocument::new(now()),
            )])),
        ),
    ];
    for (write, message) in &refused_by_postgresql {
        assert!(message.contains("read-only"), "{write}: {message}");
        assert!(message.contains("25006"), "{write}: refused by PostgreSQL itself: {message}");
    }

    // A unit: its writes are refused as well, and the unit is rolled back.
    let unit = store.atomically(&mut || {
        store.put_enrollment(&enrollment("dev-5"), &Precondition::None)?;
        north.put_device(&Device::new(DeviceId::new("pump-5").unwrap()), &Precondition::None)?;
        Ok(())
    });
    match unit {
        Err(Error::Store(StoreError::Backend(message))) => {
            assert!(message.contains("read-only"), "{message}")
        }
        other => panic!("a unit that writes succeeded or failed otherwise: {other:?}"),
    }

    // Writes the store itself refuses before asking the database.
    let message = backend_message(north.claim_unnamed_hub());
    assert!(message.contains("read-only"), "{message}");
    let message = backend_message(store.setting_or_insert("another", "value"));
    assert!(message.contains("read-only"), "{message}");
    // A setting that exists is read, as the name promises.
    assert_eq!(store.setting_or_insert("id-scope", "0ne00OTHER").unwrap(), "0ne00FACADE");

    assert_eq!(dump(&url), before, "a refused write changed the database");
    // The store still reads after all those refusals (no connection left mid-transaction).
    assert!(north.device(&pump).unwrap().is_some());
}

#[test]
fn a_read_only_store_sees_the_commits_of_a_writer_working_beside_it() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let writer = PgStore::connect(&url, 2).unwrap();
    let reader = PgStore::connect_read_only(&url, 2).unwrap();
    let id = RegistrationId::new("late-1").unwrap();
    assert!(reader.enrollment(&id).unwrap().is_none());
    writer.put_enrollment(&enrollment("late-1"), &Precondition::MustNotExist).unwrap();
    assert!(reader.enrollment(&id).unwrap().is_some(), "the reader missed a commit made after it opened");
    // And a writer is not held up by a reader (nothing locks).
    writer.delete_enrollment(&id, &Precondition::None).unwrap();
    assert!(reader.enrollment(&id).unwrap().is_none());
}

/// A schema at `url` made as the migrations up to `version` left it (the version table too).
fn schema_at(url: &str, version: i32) {
    let mut client = TestDb::client(url);
    client
        .batch_execute(
            "CREATE TABLE zerotouch_schema (version integer PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO zerotouch_schema (version, description) VALUES (0, 'baseline');",
        )
        .unwrap();
    for v in 1..=version {
        client.batch_execute(migration_sql(v).unwrap()).unwrap();
        client
            .execute("INSERT INTO zerotouch_schema (version, description) VALUES ($1, 'old')", &[&v])
            .unwrap();
    }
}

#[test]
fn a_database_of_an_older_schema_is_refused_not_migrated() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let older = LATEST_SCHEMA_VERSION - 1;
    schema_at(&url, older);
    let tables_before = tables(&url);

    let message = backend_message(PgStore::connect_read_only(&url, 2));
    assert!(message.contains(&format!("schema version {older}")), "{message}");
    assert!(message.contains("older"), "{message}");
    assert!(message.contains("not migrate"), "{message}");
    assert!(message.contains("zerotouch serve"), "the error says how to migrate it: {message}");
    assert_eq!(applied_versions(&url), (0..=older).collect::<Vec<_>>(), "migrated anyway");
    assert_eq!(tables(&url), tables_before);
}

#[test]
fn a_database_of_a_newer_schema_is_refused_with_upgrade_advice() {
    let db = TestDb::new();
    let (url, newer) = db.newer_schema_url();
    let message = backend_message(PgStore::connect_read_only(&url, 1));
    assert!(message.contains(&format!("schema version {newer}")), "{message}");
    assert!(message.contains("newer") && message.contains("upgrade zerotouch"), "{message}");
}

#[test]
fn a_database_without_a_zerotouch_schema_is_not_found_and_stays_empty() {
    let db = TestDb::new();
    let url = db.fresh_url();
    assert_eq!(PgStore::connect_read_only(&url, 1).unwrap_err(), StoreError::NotFound);
    assert_eq!(tables(&url), Vec::<String>::new(), "a read-only open created tables");
}

#[test]
fn a_read_only_view_tells_when_a_writer_would_claim_the_unnamed_hub_and_does_not() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let writer = PgStore::connect(&url, 2).unwrap();
    // A device of the unnamed hub (a database from before hubs had names), and one named hub
    // recorded that holds nothing yet: the first writer to open that hub takes the device.
    let old = DeviceId::new("old-1").unwrap();
    writer.put_device(&Device::new(old.clone()), &Precondition::MustNotExist).unwrap();
    drop(writer.hub("localhost").unwrap());
    let before = dump(&url);

    let reader = PgStore::connect_read_only(&url, 2).unwrap();
    let localhost = reader.hub("localhost").unwrap();
    assert!(localhost.would_claim_unnamed_hub().unwrap());
    assert!(!reader.hub("elsewhere").unwrap().would_claim_unnamed_hub().unwrap(), "not the one named hub");
    assert!(!reader.would_claim_unnamed_hub().unwrap(), "the unnamed hub claims nothing");
    assert!(backend_message(localhost.claim_unnamed_hub()).contains("read-only"));
    assert!(localhost.device(&old).unwrap().is_none());
    assert_eq!(dump(&url), before);

    assert_eq!(writer.hub("localhost").unwrap().claim_unnamed_hub().unwrap(), 1);
    assert!(!localhost.would_claim_unnamed_hub().unwrap(), "claimed already");
    assert!(localhost.device(&old).unwrap().is_some());
}
