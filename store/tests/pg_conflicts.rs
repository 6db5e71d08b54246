//! Conflicts with concurrent transactions on PostgreSQL — deadlocks (SQLSTATE 40P01) and
//! serialization failures (40001) — are retried: a unit or a multi-statement write runs again,
//! and when every attempt conflicts the error is a conflict naming the cause (a device is told
//! to come back later: 429 with retry-after), not an etag mismatch or an internal error.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

use pg_support::TestDb;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub, RecordingHub};
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::provisioner::{
    Provisioner, ProvisionerConfig, RegisterRequest, Response, ResponseBody,
};
use zerotouch_engine::registry::events::LifecycleOperation;
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{
    EnrollmentRef, EnrollmentStore, OperationRecord, OperationStatus, Precondition, ProvisioningStore,
    RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::device::{DeviceRegistration, RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{
    AttestationMechanism, DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment,
    SymmetricKeyAttestation,
};
use zerotouch_proto::{
    DeviceId, EnrollmentGroupId, IdScope, IfMatch, OperationId, RegistrationId, Timestamp,
};
use zerotouch_store::postgres::PgStore;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

fn enrollment(id: &str) -> IndividualEnrollment {
    IndividualEnrollment::new(RegistrationId::new(id).unwrap(), AttestationMechanism::symmetric_key())
}

/// The work of one test unit; told whether this is the unit's first attempt.
type Unit<'a> = Box<dyn Fn(bool) -> Result<(), Error> + Send + Sync + 'a>;

/// Runs `units` on threads of their own, each as one unit of `store`, and returns each unit's
/// outcome with how many times the store ran it. `first` runs only in a unit's first attempt
/// (the point where the threads meet), `rest` in every attempt.
fn run_units<'a>(store: &PgStore, units: Vec<Unit<'a>>) -> Vec<(Result<(), Error>, u32)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = units
            .iter()
            .map(|unit| {
                s.spawn(move || {
                    let mut attempts = 0;
                    let result = store.atomically(&mut || {
                        attempts += 1;
                        unit(attempts == 1)
                    });
                    (result, attempts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_units_that_deadlock_both_commit_once_the_one_postgresql_cancelled_runs_again() {
    let db = TestDb::new();
    let store = db.store();
    let barrier = Barrier::new(2);
    // Each unit writes one enrollment, waits for the other to have written its own, then writes
    // the other's: each waits for the other's row lock, and PostgreSQL cancels one of them.
    let crossing = |a: &'static str, b: &'static str| {
        let (store, barrier) = (&store, &barrier);
        Box::new(move |first: bool| {
            store.put_enrollment(&enrollment(a), &Precondition::None)?;
            if first {
                barrier.wait();
            }
            store.put_enrollment(&enrollment(b), &Precondition::None)?;
            Ok(())
        }) as Unit<'_>
    };
    let outcomes = run_units(&store, vec![crossing("dev-a", "dev-b"), crossing("dev-b", "dev-a")]);
    for (result, _) in &outcomes {
        assert_eq!(result, &Ok(()), "{outcomes:?}");
    }
    // PostgreSQL breaks a deadlock by cancelling one of its transactions: that unit ran twice.
    let attempts: Vec<u32> = outcomes.iter().map(|(_, n)| *n).collect();
    assert_eq!(attempts.iter().sum::<u32>(), 3, "{attempts:?}");
    for id in ["dev-a", "dev-b"] {
        assert!(store.enrollment(&RegistrationId::new(id).unwrap()).unwrap().is_some(), "{id}");
    }
}

#[test]
fn units_that_fail_serialization_on_a_serializable_database_commit_once_run_again() {
    let db = TestDb::new();
    // Sessions of this store default to SERIALIZABLE, as on a database (or CockroachDB) set so.
    let url = format!("{}%20-cdefault_transaction_isolation%3Dserializable", db.fresh_url());
    assert!(url.contains("?options=-csearch_path"), "{url}");
    let store = PgStore::connect(&url, 4).unwrap();
    let level: String =
        TestDb::client(&url).query_one("SHOW default_transaction_isolation", &[]).unwrap().get(0);
    assert_eq!(level, "serializable");
    for id in ["skew-a", "skew-b"] {
        store.put_enrollment(&enrollment(id), &Precondition::None).unwrap();
    }
    let barrier = Barrier::new(2);
    // Write skew: each unit reads both enrollments, then rewrites one of them. No order of the
    // two units gives what each read, so PostgreSQL fails one of them with SQLSTATE 40001.
    let skewed = |mine: &'static str| {
        let (store, barrier) = (&store, &barrier);
        Box::new(move |first: bool| {
            for id in ["skew-a", "skew-b"] {
                store.enrollment(&RegistrationId::new(id).unwrap())?;
            }
            if first {
                barrier.wait();
            }
            store.put_enrollment(&enrollment(mine), &Precondition::None)?;
            Ok(())
        }) as Unit<'_>
    };
    let outcomes = run_units(&store, vec![skewed("skew-a"), skewed("skew-b")]);
    for (result, _) in &outcomes {
        assert_eq!(result, &Ok(()), "{outcomes:?}");
    }
    let attempts: u32 = outcomes.iter().map(|(_, n)| *n).sum();
    assert!(attempts >= 3, "one unit failed serialization and ran again: {outcomes:?}");
}

/// Makes every write to `table` of the store at `url` fail with SQLSTATE `code`, the first
/// `times` writes only (`None`: all), as a conflict with a concurrent transaction would.
/// Returns a function that tells how many writes were tried.
fn inject_conflicts(url: &str, table: &str, code: &str, times: Option<u32>) -> impl Fn() -> i64 {
    let limit = times.map_or("NULL".to_owned(), |n| n.to_string());
    let mut client = TestDb::client(url);
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE injected_writes;
             CREATE FUNCTION inject_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('injected_writes') <= coalesce({limit}, 2147483647) THEN
                     RAISE EXCEPTION 'injected conflict on {table}' USING ERRCODE = '{code}';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER inject_conflict BEFORE INSERT OR UPDATE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION inject_conflict();"
        ))
        .unwrap();
    let url = url.to_owned();
    move || {
        TestDb::client(&url)
            .query_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM injected_writes", &[])
            .unwrap()
            .get(0)
    }
}

#[test]
fn a_unit_that_conflicts_on_every_attempt_runs_3_times_then_fails_naming_the_sqlstate_not_an_etag() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let store = PgStore::connect(&url, 4).unwrap();
    let writes = inject_conflicts(&url, "enrollments", "40001", None);
    let runs = AtomicU32::new(0);
    let result = store.atomically(&mut || {
        runs.fetch_add(1, Ordering::Relaxed);
        store.put_enrollment(&enrollment("doomed"), &Precondition::None)?;
        Ok(())
    });
    let Err(Error::Store(StoreError::Conflict(message))) = &result else {
        panic!("expected a conflict error naming its cause, got {result:?}");
    };
    assert!(message.contains("40001") && message.contains("injected conflict on enrollments"), "{message}");
    let runs = runs.into_inner();
    assert_eq!(runs, 3, "the unit ran 3 times in all before giving up");
    assert_eq!(writes(), i64::from(runs));
    assert!(store.enrollment(&RegistrationId::new("doomed").unwrap()).unwrap().is_none());
}

#[test]
fn a_commit_that_conflicts_is_run_again_and_one_that_always_does_names_the_sqlstate() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let store = PgStore::connect(&url, 4).unwrap();
    // Outside units: a registration record with its operation is one transaction of its own.
    let writes = inject_conflicts(&url, "registrations", "40P01", Some(1));
    let id = RegistrationId::new("reg-1").unwrap();
    let record = |etag: &str| RegistrationRecord {
        registration_id: id.clone(),
        state: DeviceRegistrationState {
            registration_id: id.as_str().into(),
            status: Some(RegistrationStatus::Failed),
            etag: Some(etag.into()),
            ..Default::default()
        },
        enrollment: EnrollmentRef::Individual(id.clone()),
        initial_hub: None,
    };
    let operation = |op: &str| OperationRecord {
        operation_id: OperationId::new(op).unwrap(),
        registration_id: id.clone(),
        created: now(),
        status: OperationStatus::Fixed(Box::new(RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Failed,
            registration_state: None,
        })),
    };
    store
        .commit_registration(Arc::new(record("e1")), &Precondition::MustNotExist, operation("op-1"))
        .unwrap();
    assert_eq!(writes(), 2, "the deadlocked transaction ran again");
    assert!(store.operation(&OperationId::new("op-1").unwrap()).unwrap().is_some());

    // A bulk device write (several statements in one transaction) whose every attempt conflicts.
    let writes = inject_conflicts_again(&url, "devices");
    let result = store.put_devices(&[Device::new(DeviceId::new("d1").unwrap())]);
    let Err(StoreError::Conflict(message)) = &result else { panic!("{result:?}") };
    assert!(message.contains("40P01") && message.contains("injected conflict on devices"), "{message}");
    assert_eq!(writes(), 3, "the transaction ran 3 times in all before giving up");
    assert!(store.device(&DeviceId::new("d1").unwrap()).unwrap().is_none());
}

/// [`inject_conflicts`] on a second table of the same schema: always, SQLSTATE 40P01.
fn inject_conflicts_again(url: &str, table: &str) -> impl Fn() -> i64 {
    let mut client = TestDb::client(url);
    client
        .batch_execute(&format!(
            "DROP TRIGGER inject_conflict ON registrations;
             CREATE SEQUENCE injected_writes_2;
             CREATE FUNCTION inject_conflict_2() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM nextval('injected_writes_2');
                 RAISE EXCEPTION 'injected conflict on {table}' USING ERRCODE = '40P01';
             END $$;
             CREATE TRIGGER inject_conflict_2 BEFORE INSERT OR UPDATE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION inject_conflict_2();"
        ))
        .unwrap();
    let url = url.to_owned();
    move || TestDb::client(&url).query_one("SELECT last_value FROM injected_writes_2", &[]).unwrap().get(0)
}

/// 32 zero bytes in base64: a fixed group key the test can derive device keys from.
const GROUP_KEY_B64: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SCOPE: &str = "0ne00AB1234";
const HUB: &str = "plant.example.net";
const OTHER_HUB: &str = "annex.example.net";
const RETRY_AFTER: u32 = 7;

/// A provisioning service over a store of its own: the symmetric-key group `line` assigns to
/// `hub`, and both hubs are linked.
struct Plant {
    url: String,
    store: PgStore,
    provisioner: Provisioner<PgStore>,
    /// Failures the provisioner reported as internal (answered 5xx).
    internal_errors: Arc<AtomicU32>,
}

impl Plant {
    fn new(db: &TestDb) -> Self {
        let url = db.fresh_url();
        let store = PgStore::connect(&url, 4).unwrap();
        let plant_store = store.clone();
        let internal_errors = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&internal_errors);
        let mut config = ProvisionerConfig::new(IdScope::new(SCOPE).unwrap());
        config.retry_after_secs = RETRY_AFTER;
        let provisioner = Provisioner::new(
            config,
            store.clone(),
            Arc::new(RingCrypto::new()),
            Allocator::new(vec![LinkedHub::new(HUB), LinkedHub::new(OTHER_HUB)]),
        )
        .on_internal_error(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let plant = Plant { url, store: plant_store, provisioner, internal_errors };
        plant.assign_line_to(HUB, &IfMatch::Absent);
        plant
    }

    /// Writes the group `line`, pointing at `hub` alone.
    fn assign_line_to(&self, hub: &str, if_match: &IfMatch) {
        write_line_group(&self.store, hub, if_match);
    }

    /// Registers `press-1` of the group with `hub`.
    fn register(&self, hub: &mut dyn HubRegistry) -> Response {
        self.provisioner.handle_register(now(), press_request(), hub)
    }

    /// The status of the operation `r` answered with.
    fn operation_status(&self, r: &Response) -> RegistrationOperationStatus {
        let ResponseBody::Operation(op) = &r.body else { panic!("not an operation: {r:?}") };
        self.store.operation(&OperationId::new(&op.operation_id).unwrap()).unwrap().unwrap().into_status()
    }

    fn internal_errors(&self) -> u32 {
        self.internal_errors.load(Ordering::Relaxed)
    }
}

/// Writes the symmetric-key group `line` to `store`, pointing at `hub` alone.
fn write_line_group(store: &impl ProvisioningStore, hub: &str, if_match: &IfMatch) {
    let mut group =
        EnrollmentGroup::new(EnrollmentGroupId::new("line").unwrap(), AttestationMechanism::symmetric_key());
    group.attestation.symmetric_key = Some(SymmetricKeyAttestation {
        primary_key: Some(GROUP_KEY_B64.to_owned()),
        secondary_key: Some(GROUP_KEY_B64.to_owned()),
    });
    group.iot_hubs = Some(vec![hub.to_owned()]);
    enrollments::put_enrollment_group(store, &RingCrypto::new(), now(), group, if_match).unwrap();
}

/// The registration of `press-1`, a device of the group `line`.
fn press_request() -> RegisterRequest {
    let crypto = RingCrypto::new();
    let key = derive_device_key(&crypto, &[0u8; 32], "press-1");
    let token = registration_token(&crypto, &key, SCOPE, "press-1", now().unix_secs() + 3600);
    RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: "press-1".into(),
        body: DeviceRegistration { payload: None, registration_id: "press-1".into(), tpm: None, csr: None },
        credential: Credential::Sas(token.to_string()),
        api_version: None,
    }
}

/// Asserts that `r` tells the device to come back after the configured pause (429 429001 with
/// `retry-after`), as the SDKs retry.
fn assert_told_to_retry_later(r: &Response) {
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.retry_after, Some(RETRY_AFTER), "{r:?}");
    let ResponseBody::Error(details) = &r.body else { panic!("not an error: {r:?}") };
    assert_eq!(details.error_code, 429001, "{r:?}");
}

#[test]
fn a_registration_whose_unit_runs_again_after_a_deadlock_is_assigned_and_announced_once() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    let mut hub = EmbeddedHub::<PgStore, PgStore, PgStore>::over(
        HUB,
        plant.store.hub(HUB).unwrap(),
        Arc::new(RingCrypto::new()),
    )
    .unwrap();
    hub.set_now(now());
    // The registration record is the unit's last write, after the hub created the identity:
    // the first attempt is cancelled there, and the unit runs again from the start.
    let writes = inject_conflicts(&plant.url, "registrations", "40P01", Some(1));
    let r = plant.register(&mut hub);
    let status = plant.operation_status(&r);
    assert_eq!(status.status, RegistrationStatus::Assigned, "{status:?}");
    assert_eq!(writes(), 2, "the unit ran twice");
    assert!(plant.store.hub(HUB).unwrap().device(&DeviceId::new("press-1").unwrap()).unwrap().is_some());
    let events = hub.take_lifecycle_events();
    let created: Vec<_> =
        events.iter().filter(|e| e.op_type == LifecycleOperation::CreateDeviceIdentity).collect();
    assert_eq!(created.len(), 1, "one identity, one announcement: {events:?}");
}

#[test]
fn a_recording_hub_keeps_the_actions_of_the_run_of_a_unit_that_committed_only() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    let mut hub = RecordingHub::default();
    let writes = inject_conflicts(&plant.url, "registrations", "40P01", Some(1));
    let r = plant.register(&mut hub);
    assert_eq!(plant.operation_status(&r).status, RegistrationStatus::Assigned);
    assert_eq!(writes(), 2, "the unit ran twice");
    // The host carries these out: the cancelled run's copy must not be among them.
    assert_eq!(hub.actions.len(), 1, "{:?}", hub.actions);
    let HubAction::Provision { hub: name, device, .. } = &hub.actions[0] else { panic!("{:?}", hub.actions) };
    assert_eq!((name.as_str(), device.device_id.as_str()), (HUB, "press-1"));
}

#[test]
fn an_in_memory_hub_beside_the_store_keeps_one_identity_and_one_announcement_when_the_unit_runs_again() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    // The hub's writes are not part of the store's unit: the first run's identity stands.
    let mut hub = EmbeddedHub::in_memory(HUB, Arc::new(RingCrypto::new())).unwrap();
    hub.set_now(now());
    let writes = inject_conflicts(&plant.url, "registrations", "40P01", Some(1));
    let r = plant.register(&mut hub);
    assert_eq!(plant.operation_status(&r).status, RegistrationStatus::Assigned);
    assert_eq!(writes(), 2, "the unit ran twice");
    assert!(hub.registry().device(&DeviceId::new("press-1").unwrap()).is_ok());
    let events = hub.take_lifecycle_events();
    let ops: Vec<_> = events.iter().map(|e| e.op_type).collect();
    // The second run finds the identity the first one made, with the same credentials: it
    // writes nothing, so no delete and no second create.
    assert_eq!(ops, [LifecycleOperation::CreateDeviceIdentity], "{events:?}");
}

#[test]
fn a_registration_whose_unit_conflicts_every_time_is_told_to_retry_later() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    let mut hub = RecordingHub::default();
    let writes = inject_conflicts(&plant.url, "registrations", "40P01", None);
    let r = plant.register(&mut hub);
    assert_told_to_retry_later(&r);
    assert_eq!(plant.internal_errors(), 0, "a conflict is no internal error");
    // Each of the provisioner's 3 rounds ran its unit 3 times.
    assert_eq!(writes(), 9);
    assert!(hub.actions.is_empty(), "no unit committed: {:?}", hub.actions);
    assert!(plant.store.registration(&RegistrationId::new("press-1").unwrap()).unwrap().is_none());
}

/// A hub that refuses every action (a hub error that fails the registration).
struct RefusingHub;

impl HubRegistry for RefusingHub {
    fn apply(&mut self, _: &HubAction) -> Result<(), HubError> {
        Err(HubError { code: 403002, message: "IotHubQuotaExceeded".to_owned() })
    }
}

#[test]
fn a_failed_registration_whose_record_conflicts_every_time_is_told_to_retry_later() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    // The hub refuses, so the registration is recorded as failed, outside the unit: that
    // record (with its operation, one transaction) conflicts in each attempt.
    let writes = inject_conflicts(&plant.url, "registrations", "40001", None);
    let r = plant.register(&mut RefusingHub);
    assert_told_to_retry_later(&r);
    assert_eq!(plant.internal_errors(), 0, "a conflict is no internal error");
    assert_eq!(writes(), 9, "3 rounds, each recording the failure in 3 attempts");
    assert!(plant.store.registration(&RegistrationId::new("press-1").unwrap()).unwrap().is_none());
}

#[test]
fn a_move_whose_first_record_conflicts_every_time_is_told_to_retry_later() {
    let db = TestDb::new();
    let plant = Plant::new(&db);
    let mut hub = RecordingHub::default();
    let r = plant.register(&mut hub);
    assert_eq!(plant.operation_status(&r).status, RegistrationStatus::Assigned);
    let id = RegistrationId::new("press-1").unwrap();
    let before = plant.store.registration(&id).unwrap().unwrap();
    // The group now assigns to the other hub: the device moves, and the `assigning` record
    // that makes the move visible is written before the unit, as a transaction of its own.
    plant.assign_line_to(OTHER_HUB, &IfMatch::Any);
    let writes = inject_conflicts(&plant.url, "registrations", "40P01", None);
    let r = plant.register(&mut hub);
    assert_told_to_retry_later(&r);
    assert_eq!(plant.internal_errors(), 0, "a conflict is no internal error");
    assert_eq!(writes(), 9, "3 rounds, each writing the move in 3 attempts");
    assert_eq!(hub.actions.len(), 1, "only the first registration's action: {:?}", hub.actions);
    assert_eq!(plant.store.registration(&id).unwrap().unwrap(), before);
}

#[test]
fn a_single_statement_write_that_conflicts_is_not_run_again_and_fails_as_a_conflict() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let store = PgStore::connect(&url, 4).unwrap();
    let writes = inject_conflicts(&url, "enrollments", "40001", Some(1));
    let result = store.put_enrollment(&enrollment("once"), &Precondition::None);
    let Err(StoreError::Conflict(message)) = &result else { panic!("{result:?}") };
    assert!(message.contains("40001") && message.contains("injected conflict on enrollments"), "{message}");
    assert_eq!(writes(), 1, "a single statement outside units is not run again");
    // Tried again, it succeeds.
    store.put_enrollment(&enrollment("once"), &Precondition::None).unwrap();
}

#[cfg(feature = "sqlite")]
#[test]
fn a_hub_on_postgresql_whose_writes_conflict_every_time_beside_another_store_tells_the_device_to_retry_later()
{
    use zerotouch_store::sqlite::SqliteStore;

    let db = TestDb::new();
    let url = db.fresh_url();
    let hub_store = PgStore::connect(&url, 4).unwrap().hub(HUB).unwrap();
    // The provisioning store is another database: the hub's writes are no part of its units.
    let store = SqliteStore::open_in_memory().unwrap();
    write_line_group(&store, HUB, &IfMatch::Absent);
    let mut config = ProvisionerConfig::new(IdScope::new(SCOPE).unwrap());
    config.retry_after_secs = RETRY_AFTER;
    let provisioner = Provisioner::new(
        config,
        store.clone(),
        Arc::new(RingCrypto::new()),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let mut hub = EmbeddedHub::over(HUB, hub_store, Arc::new(RingCrypto::new())).unwrap();
    hub.set_now(now());
    let writes = inject_conflicts(&url, "devices", "40P01", None);
    let r = provisioner.handle_register(now(), press_request(), &mut hub);
    // Not a `failed` registration: the hub's state changed under each round.
    assert_told_to_retry_later(&r);
    assert_eq!(writes(), 3, "one identity write per round");
    assert!(store.registration(&RegistrationId::new("press-1").unwrap()).unwrap().is_none());
}
