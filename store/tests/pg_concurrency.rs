//! Two instances on one PostgreSQL (two `PgStore`s, two pools): concurrent If-Match twin
//! updates lose nothing, and one registration id registered by both at once gets one record.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pg_support::TestDb;
use serde_json::{json, Map, Value};
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_engine::registry::hub_error_code;
use zerotouch_engine::store::{Precondition, RegistrationStore};
use zerotouch_engine::twin::{update_twin, TwinDocument, TwinKey, TwinOperation, TwinStore};
use zerotouch_proto::device::RegistrationStatus;
use zerotouch_proto::hub::HubErrorCode;
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup, SymmetricKeyAttestation};
use zerotouch_proto::twin::TwinPatch;
use zerotouch_proto::{
    DeviceId, EnrollmentGroupId, IdScope, IfMatch, OperationId, RegistrationId, Timestamp,
};
use zerotouch_store::postgres::PgStore;
use zerotouch_testkit::hubs::SimHubs;

/// How long the writers contend, in seconds; `ZEROTOUCH_PG_CONTENTION_SECS` overrides it.
const CONTENTION_SECS: u64 = 10;

const WRITERS: usize = 8;

fn contention() -> Duration {
    let secs = std::env::var("ZEROTOUCH_PG_CONTENTION_SECS").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(CONTENTION_SECS))
}

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// Two instances: two stores with their own pools over one database.
fn two_instances(db: &TestDb) -> (String, [PgStore; 2]) {
    let url = db.fresh_url();
    let stores = [PgStore::connect(&url, 4).unwrap(), PgStore::connect(&url, 4).unwrap()];
    (url, stores)
}

#[test]
fn eight_writers_on_two_instances_updating_one_twin_with_if_match_lose_no_update() {
    let db = TestDb::new();
    let (_, instances) = two_instances(&db);
    let key = TwinKey::device(DeviceId::new("contended").unwrap());
    instances[0].put_twin(&key, &TwinDocument::new(now()), &Precondition::MustNotExist).unwrap();
    let start_version = instances[0].twin(&key).unwrap().unwrap().version();

    let accepted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let deadline = Instant::now() + contention();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let store = &instances[w % 2];
            let (key, accepted, refused) = (&key, &accepted, &refused);
            s.spawn(move || {
                while Instant::now() < deadline {
                    // Read, then write what was read plus one, only if nobody wrote in between.
                    let doc = store.twin(key).unwrap().unwrap();
                    let counter = doc.tags().get("counter").and_then(Value::as_u64).unwrap_or(0);
                    let mut tags = Map::new();
                    tags.insert("counter".to_owned(), json!(counter + 1));
                    tags.insert(format!("writer{w}"), json!(counter + 1));
                    let patch = TwinPatch { etag: None, tags: Some(tags), properties: None };
                    let if_match = IfMatch::Tag(doc.etag().bare().to_owned());
                    match update_twin(store, key, now(), &TwinOperation::Patch(patch), &if_match) {
                        Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                        Err(e) if hub_error_code(&e) == HubErrorCode::PreconditionFailed => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("writer {w}: unexpected error {e}"),
                    };
                }
            });
        }
    });

    let accepted = accepted.into_inner();
    let last = instances[1].twin(&key).unwrap().unwrap();
    let counter = last.tags().get("counter").and_then(Value::as_u64).unwrap_or(0);
    eprintln!("{accepted} updates accepted, {} refused by If-Match", refused.into_inner());
    assert!(accepted > 0, "no update went through");
    assert_eq!(counter, accepted, "every accepted update must be in the counter (none lost)");
    assert_eq!(last.version(), start_version + accepted, "one twin version per accepted update");
}

/// 32 zero bytes in base64: a fixed group key the test can derive device keys from.
const GROUP_KEY_B64: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SCOPE: &str = "0ne00AB1234";

fn provisioner(store: PgStore) -> Provisioner<PgStore> {
    let hubs = vec![LinkedHub::new("hub-1.example.net"), LinkedHub::new("hub-2.example.net")];
    Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        Arc::new(RingCrypto::new()),
        Allocator::new(hubs),
    )
}

/// The symmetric-key group `race` with the fixed [`GROUP_KEY_B64`] as both keys.
fn enroll_race_group(store: &PgStore) {
    let mut group =
        EnrollmentGroup::new(EnrollmentGroupId::new("race").unwrap(), AttestationMechanism::symmetric_key());
    group.attestation.symmetric_key = Some(SymmetricKeyAttestation {
        primary_key: Some(GROUP_KEY_B64.to_owned()),
        secondary_key: Some(GROUP_KEY_B64.to_owned()),
    });
    enrollments::put_enrollment_group(store, &RingCrypto::new(), now(), group, &IfMatch::Absent).unwrap();
}

#[test]
fn one_device_registering_through_two_instances_at_once_gets_exactly_one_assignment_record() {
    let db = TestDb::new();
    let (url, [a, b]) = two_instances(&db);
    enroll_race_group(&a);
    let instances = [provisioner(a), provisioner(b)];

    for round in 0..20 {
        let id = format!("racer-{round:02}");
        let barrier = Barrier::new(2);
        let operations: Vec<zerotouch_proto::Text> = std::thread::scope(|s| {
            let handles: Vec<_> = instances
                .iter()
                .map(|p| {
                    let (barrier, id) = (&barrier, &id);
                    s.spawn(move || {
                        let req = pg_support::register_request(SCOPE, id, now(), None);
                        barrier.wait();
                        let r = p.handle_register(now(), req, &mut SimHubs::new());
                        assert_eq!(r.status, 202, "{id}: {:?}", r.body);
                        match r.body {
                            zerotouch_engine::provisioner::ResponseBody::Operation(op) => op.operation_id,
                            other => panic!("{id}: not an operation: {other:?}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        let rows: i64 = TestDb::client(&url)
            .query_one("SELECT count(*) FROM registrations WHERE id = $1", &[&id])
            .unwrap()
            .get(0);
        assert_eq!(rows, 1, "{id}: exactly one registration record");
        let record = instances[0].store().registration(&RegistrationId::new(&id).unwrap()).unwrap().unwrap();
        assert_eq!(record.state.status, Some(RegistrationStatus::Assigned), "{id}");
        assert_eq!(record.state.device_id.as_deref(), Some(id.as_str()));
        for op in &operations {
            let stored = instances[1].store().operation(&OperationId::new(op).unwrap()).unwrap().unwrap();
            let stored = stored.into_status();
            assert_eq!(stored.status, RegistrationStatus::Assigned, "{id}: operation {op}");
            let state = stored.registration_state.unwrap();
            assert_eq!(state.device_id.as_deref(), Some(id.as_str()), "{id}: operation {op}");
        }
    }
}

/// One instance's embedded hub that, once it has applied a registration's hub actions, lets the
/// other instance start and holds its unit's transaction open a while before it commits.
struct HoldingHub<'a> {
    hub: zerotouch_engine::hub_engine::EmbeddedHub<PgStore, PgStore, PgStore>,
    applied: Option<&'a Barrier>,
    hold: Duration,
}

impl zerotouch_engine::hub::HubRegistry for HoldingHub<'_> {
    fn apply(
        &mut self,
        action: &zerotouch_engine::hub::HubAction,
    ) -> Result<(), zerotouch_engine::hub::HubError> {
        self.hub.apply(action)
    }

    fn apply_all(
        &mut self,
        actions: &[zerotouch_engine::hub::HubAction],
    ) -> Result<(), zerotouch_engine::hub::HubError> {
        self.hub.apply_all(actions)?;
        if let Some(applied) = self.applied.take() {
            applied.wait();
            std::thread::sleep(self.hold);
        }
        Ok(())
    }

    fn begin_unit(&mut self) {
        self.hub.begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.hub.end_unit(committed);
    }
}

#[test]
fn a_device_registering_through_a_second_instance_while_the_first_creates_its_identity_is_assigned_by_both() {
    const HUB: &str = "plant.example.net";
    let db = TestDb::new();
    let (_, [a, b]) = two_instances(&db);
    enroll_race_group(&a);
    let instance = |store: PgStore| {
        let mut hub = zerotouch_engine::hub_engine::EmbeddedHub::<PgStore, PgStore, PgStore>::over(
            HUB,
            store.hub(HUB).unwrap(),
            Arc::new(RingCrypto::new()),
        )
        .unwrap();
        hub.set_now(now());
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
            store,
            Arc::new(RingCrypto::new()),
            Allocator::new(vec![LinkedHub::new(HUB)]),
        );
        (provisioner, hub)
    };
    let ((first, first_hub), (second, mut second_hub)) = (instance(a), instance(b));

    // The first instance has written the identity, uncommitted; the second reads no identity,
    // creates one, and its insert waits for the first to commit.
    let applied = Barrier::new(2);
    let mut holding =
        HoldingHub { hub: first_hub, applied: Some(&applied), hold: Duration::from_millis(500) };
    let operations: Vec<zerotouch_proto::Text> = std::thread::scope(|s| {
        let one = s.spawn(|| {
            first.handle_register(
                now(),
                pg_support::register_request(SCOPE, "press-4", now(), None),
                &mut holding,
            )
        });
        let two = s.spawn(|| {
            applied.wait();
            second.handle_register(
                now(),
                pg_support::register_request(SCOPE, "press-4", now(), None),
                &mut second_hub,
            )
        });
        [one.join().unwrap(), two.join().unwrap()]
            .into_iter()
            .map(|r| match r.body {
                zerotouch_engine::provisioner::ResponseBody::Operation(op) => op.operation_id,
                other => panic!("not an operation: {other:?}"),
            })
            .collect()
    });
    for op in &operations {
        let stored = second.store().operation(&OperationId::new(op).unwrap()).unwrap().unwrap().into_status();
        let state = stored.registration_state.clone().unwrap();
        assert_eq!(stored.status, RegistrationStatus::Assigned, "operation {op}: {state:?}");
        assert_eq!(state.device_id.as_deref(), Some("press-4"));
    }
}
