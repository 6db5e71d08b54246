//! The SQLite store: bulk import of identities (with and without their twins), durable
//! symmetric-key registrations through the engine `Provisioner` on SQLite next to the in-memory
//! store in the same run (alone, and with the embedded hub's identity and twin written in the
//! same unit by 1 or 8 threads, where group commit shares commits), and a selective query over
//! the twins with and without push-down.
//!
//! `ZT_SQLITE_BENCH_N` sets the number of identities (default 100 000). With
//! `ZT_SQLITE_BENCH_ONCE=1` the import and query figures are measured once each, outside
//! criterion's sampling (how the README's 1 000 000 figures are taken).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Map, Value};
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::jobs::JobStore;
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::query::{execute, parse, Query, QueryPage, QuerySource};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{
    EnrollmentRef, OperationRecord, PageRequest, Precondition, ProvisioningStore, RegistrationRecord,
    RegistrationStore,
};
use zerotouch_engine::twin::{TwinDocument, TwinStore};
use zerotouch_proto::device::{
    DeviceRegistration, RegistrationOperationStatus, RegistrationStatus, Substatus,
};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{AttestationMechanism, DeviceRegistrationState, EnrollmentGroup};
use zerotouch_proto::{
    DeviceId, EnrollmentGroupId, IdScope, IfMatch, OperationId, RegistrationId, Timestamp,
};
use zerotouch_store::sqlite::{Durability, SqliteStore};
use zerotouch_transport::service::{DpsService, EngineService};

const SCOPE: &str = "0ne00BE4C00";
const SITES: usize = 100;
const IMPORT_BATCH: usize = 10_000;

fn identities() -> usize {
    std::env::var("ZT_SQLITE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// A device as an import creates it: SAS keys, etag, generation id.
fn device_template() -> Device {
    serde_json::from_value(json!({
        "deviceId": "template",
        "generationId": "638000000000000001",
        "etag": "MQ==",
        "status": "enabled",
        "connectionState": "Disconnected",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "type": "sas",
            "symmetricKey": {
                "primaryKey": "c2VjcmV0LXByaW1hcnkta2V5LWZvci1iZW5jaG1hcmtzLW9ubHktMDA=",
                "secondaryKey": "c2VjcmV0LXNlY29uZGFyeS1rZXktZm9yLWJlbmNobWFya3Mtb25seTA="
            },
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}
        },
        "capabilities": {"iotEdge": false}
    }))
    .unwrap()
}

/// One initial twin per site: tags as an operator sets them at import.
fn site_twins() -> Vec<TwinDocument> {
    (0..SITES)
        .map(|s| {
            let tags: Map<String, Value> =
                json!({"site": format!("site-{s}"), "floor": s % 8, "owner": {"team": "ops"}})
                    .as_object()
                    .cloned()
                    .unwrap();
            let desired = json!({"telemetry": {"interval": 30}}).as_object().cloned().unwrap();
            TwinDocument::with_initial(now(), &tags, &desired).unwrap()
        })
        .collect()
}

fn device(template: &Device, i: usize) -> Device {
    let mut d = template.clone();
    d.device_id = DeviceId::new(format!("dev-{i:07}")).unwrap();
    d
}

/// Imports `n` identities (with their twins when `twins` is given) in batched transactions.
fn import(store: &SqliteStore, n: usize, template: &Device, twins: Option<&[TwinDocument]>) {
    for start in (0..n).step_by(IMPORT_BATCH) {
        let end = (start + IMPORT_BATCH).min(n);
        match twins {
            None => {
                let batch: Vec<Device> = (start..end).map(|i| device(template, i)).collect();
                store.put_devices(&batch).unwrap();
            }
            Some(t) => {
                let batch: Vec<(Device, TwinDocument)> =
                    (start..end).map(|i| (device(template, i), t[i % SITES].clone())).collect();
                store.put_devices_with_twins(&batch).unwrap();
            }
        }
    }
}

/// Time this thread has spent on a CPU (Linux; SQLite works on the calling thread), so import
/// figures can be read on a machine where the bench gets a fraction of a core.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|ns| ns.parse().ok()))
        .map_or(Duration::ZERO, Duration::from_nanos)
}

fn measured_once() -> bool {
    std::env::var("ZT_SQLITE_BENCH_ONCE").is_ok_and(|v| v == "1")
}

/// One import of each kind and the queries over the result, timed once (for 1M identities,
/// where ten samples of each would take many minutes).
fn once(n: usize) {
    let template = device_template();
    let twins = site_twins();
    for (name, with_twins) in [("identities", false), ("identities with twins", true)] {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("import.db")).unwrap();
        let (started, cpu_before) = (Instant::now(), thread_cpu());
        import(&store, n, &template, with_twins.then_some(twins.as_slice()));
        let (wall, cpu) = (started.elapsed(), thread_cpu().saturating_sub(cpu_before));
        assert_eq!(store.device_count().unwrap(), n as u64);
        let rate = n as f64 / wall.as_secs_f64();
        eprintln!(
            "import {n} {name}: {:.2} s wall ({rate:.0}/s), {:.2} s on-CPU",
            wall.as_secs_f64(),
            cpu.as_secs_f64()
        );
        if with_twins {
            let selective = parse("SELECT * FROM devices WHERE tags.site = 'site-7'").unwrap();
            let by_id = parse("SELECT * FROM devices WHERE deviceId = 'dev-0000777'").unwrap();
            for (what, q, hits) in
                [("selective tags.site = 'site-7'", &selective, n / SITES), ("point deviceId", &by_id, 1)]
            {
                let mut best = Duration::MAX;
                for _ in 0..5 {
                    let started = Instant::now();
                    assert_eq!(run_all(q, &store), hits);
                    best = best.min(started.elapsed());
                }
                eprintln!(
                    "query over {n} twins, {what} ({hits} hits): best of 5 {:.2} ms",
                    best.as_secs_f64() * 1e3
                );
            }
        }
    }
}

fn bulk_import(c: &mut Criterion) {
    let n = identities();
    if measured_once() {
        once(n);
        return;
    }
    let template = device_template();
    let twins = site_twins();
    let mut g = c.benchmark_group(format!("sqlite_import_{n}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    for (name, with_twins) in [("identities", false), ("identities with twins", true)] {
        let (mut cpu, mut imports) = (Duration::ZERO, 0u32);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir().unwrap();
                    let store = SqliteStore::open(dir.path().join("import.db")).unwrap();
                    let (started, cpu_before) = (Instant::now(), thread_cpu());
                    import(&store, n, &template, with_twins.then_some(twins.as_slice()));
                    total += started.elapsed();
                    cpu += thread_cpu().saturating_sub(cpu_before);
                    imports += 1;
                    assert_eq!(store.device_count().unwrap(), n as u64);
                }
                total
            })
        });
        if imports > 0 {
            eprintln!(
                "{name}: {:.2} s on-CPU per import of {n} (mean of {imports})",
                (cpu / imports).as_secs_f64()
            );
        }
    }
    g.finish();
}

/// A hub that accepts every action and keeps nothing (the hub side is not what is measured).
struct NullHub;

impl HubRegistry for NullHub {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        black_box(action);
        Ok(())
    }
}

fn provisioner<S: ProvisioningStore>(store: S) -> Provisioner<S> {
    let hubs = vec![LinkedHub::new("hub-1.example.net"), LinkedHub::new("hub-2.example.net").with_weight(2)];
    Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        Arc::new(RingCrypto::new()),
        Allocator::new(hubs),
    )
}

fn request(id: &str, credential: Credential) -> RegisterRequest {
    RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: id.into(),
        body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
        credential,
        api_version: None,
    }
}

/// New devices registering through one symmetric-key group, one `handle_register` per iteration.
fn bench_registrations<S: ProvisioningStore>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    p: &Provisioner<S>,
) {
    let crypto = RingCrypto::new();
    let group =
        EnrollmentGroup::new(EnrollmentGroupId::new("bench").unwrap(), AttestationMechanism::symmetric_key());
    let g = enrollments::put_enrollment_group(p.store(), &crypto, now(), group, &IfMatch::Absent).unwrap();
    let group_key = STANDARD.decode(g.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap();
    let mut n = 0u64;
    c.bench_function(name, |b| {
        b.iter_batched(
            || {
                n += 1;
                let id = format!("sensor-{n:08}");
                let key = derive_device_key(&crypto, &group_key, &id);
                let token = registration_token(&crypto, &key, SCOPE, &id, now().unix_secs() + 3600);
                request(&id, Credential::Sas(token.to_string()))
            },
            |req| {
                let r = p.handle_register(now(), req, &mut NullHub);
                assert_eq!(r.status, 202);
                r
            },
            BatchSize::SmallInput,
        )
    });
}

/// What one registration writes: the record and its operation, committed in one transaction.
fn registration_write(n: u64) -> (RegistrationRecord, OperationRecord) {
    let id = format!("writer-{n:08}");
    let record = RegistrationRecord {
        registration_id: RegistrationId::new(&id).unwrap(),
        state: DeviceRegistrationState {
            registration_id: id.clone().into(),
            created_date_time_utc: Some(now()),
            assigned_hub: Some("hub-1.example.net".into()),
            device_id: Some(id.clone().into()),
            status: Some(RegistrationStatus::Assigned),
            substatus: Some(Substatus::InitialAssignment),
            last_updated_date_time_utc: Some(now()),
            etag: Some(format!("\"{n:016x}\"").into()),
            ..DeviceRegistrationState::default()
        },
        enrollment: EnrollmentRef::Group(EnrollmentGroupId::new("bench").unwrap()),
        initial_hub: Some("hub-1.example.net".into()),
    };
    let op = format!("4.{n:016x}.00000000-0000-0000-0000-{n:012}");
    let operation = OperationRecord {
        operation_id: OperationId::new(&op).unwrap(),
        registration_id: record.registration_id.clone(),
        created: now(),
        status: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Assigned,
            registration_state: None,
        }
        .into(),
    };
    (record, operation)
}

fn registrations(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let on_sqlite = provisioner(SqliteStore::open(dir.path().join("dps.db")).unwrap());
    let in_memory = provisioner(MemoryStore::new());
    let mut g = c.benchmark_group("symmetric_key_registration_store");
    g.throughput(Throughput::Elements(1));
    bench_registrations(&mut g, "MemoryStore", &in_memory);
    bench_registrations(&mut g, "SqliteStore (file, WAL, synchronous=NORMAL)", &on_sqlite);
    let synced =
        provisioner(SqliteStore::open_with(dir.path().join("dps-full.db"), Durability::PowerLoss).unwrap());
    bench_registrations(&mut g, "SqliteStore (file, WAL, synchronous=FULL)", &synced);
    // The share of the write: one commit of record + operation, nothing else.
    let store = SqliteStore::open(dir.path().join("writes.db")).unwrap();
    let mut n = 0u64;
    g.bench_function("SqliteStore::commit_registration alone", |b| {
        b.iter_batched(
            || {
                n += 1;
                registration_write(n)
            },
            |(record, operation)| {
                store
                    .commit_registration(
                        Arc::new(record.clone()),
                        &Precondition::MustNotExist,
                        operation.clone(),
                    )
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Runs a query to its last page, as a client following continuation tokens does.
fn run_all(query: &Query, source: &dyn QuerySource) -> usize {
    let mut page = PageRequest { continuation: None, max_items: 1000 };
    let mut n = 0;
    loop {
        let QueryPage { items, continuation, .. } = execute(query, source, &page).unwrap();
        n += items.len();
        match continuation {
            Some(t) => page.continuation = Some(t),
            None => return n,
        }
    }
}

fn queries(c: &mut Criterion) {
    let n = identities();
    if measured_once() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("query.db")).unwrap();
    import(&store, n, &device_template(), Some(&site_twins()));
    let selective = parse("SELECT * FROM devices WHERE tags.site = 'site-7'").unwrap();
    // The same result, but an OR the store cannot push down: every twin is read and evaluated.
    let unindexed = parse("SELECT * FROM devices WHERE tags.site = 'site-7' OR deviceId = 'none'").unwrap();
    let by_id = parse("SELECT * FROM devices WHERE deviceId = 'dev-0000777'").unwrap();
    assert_eq!(run_all(&selective, &store), n / SITES);
    assert_eq!(run_all(&by_id, &store), 1);
    let mut g = c.benchmark_group(format!("sqlite_query_{n}"));
    g.sample_size(10);
    g.bench_function("selective: WHERE tags.site = 'site-7' (pushed down)", |b| {
        b.iter(|| black_box(run_all(&selective, &store)));
    });
    g.bench_function("point: WHERE deviceId = 'dev-0000777' (primary key)", |b| {
        b.iter(|| black_box(run_all(&by_id, &store)));
    });
    if n <= 200_000 {
        g.bench_function("same selective result without push-down (full scan)", |b| {
            b.iter(|| black_box(run_all(&unindexed, &store)));
        });
    }
    g.finish();
}

/// The DPS service as `zerotouch serve` builds it: provisioner and one embedded hub over `store`
/// and `hub` (views of one database for SQLite), the hub registry behind the service's mutex.
fn service<S, I, T, J>(store: S, hub: EmbeddedHub<I, T, J>) -> EngineService<S, EmbeddedHubs<I, T, J>>
where
    S: ProvisioningStore + 'static,
    I: IdentityStore + 'static,
    T: TwinStore + 'static,
    J: JobStore + 'static,
{
    let p = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        Arc::new(RingCrypto::new()),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let mut hubs = EmbeddedHubs::new();
    hubs.insert(hub);
    EngineService::new(p, Arc::new(Mutex::new(hubs)))
}

const HUB: &str = "hub-1.example.net";

/// Registers (group key, device counter, devices, threads) and returns the wall time.
type RegisterRun<'a> = dyn Fn(&[u8], &mut u64, u64, u64) -> Duration + 'a;

/// `iters` new devices registered by `threads` threads at once through `service`; returns the
/// wall time of the registrations alone (tokens are made before the clock starts).
fn register_concurrently<D: DpsService>(
    service: &D,
    group_key: &[u8],
    next: &mut u64,
    iters: u64,
    threads: u64,
) -> Duration {
    let crypto = RingCrypto::new();
    let requests: Vec<RegisterRequest> = (0..iters)
        .map(|_| {
            *next += 1;
            let id = format!("device-{next:09}");
            let key = derive_device_key(&crypto, group_key, &id);
            let token = registration_token(&crypto, &key, SCOPE, &id, now().unix_secs() + 3600);
            request(&id, Credential::Sas(token.to_string()))
        })
        .collect();
    let per_thread = usize::try_from(iters.div_ceil(threads)).unwrap().max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        for chunk in requests.chunks(per_thread) {
            s.spawn(move || {
                for req in chunk {
                    let r = service.register(now(), req.clone());
                    assert_eq!(r.status, 202, "{r:?}");
                }
            });
        }
    });
    start.elapsed()
}

fn concurrent_registrations(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let crypto = Arc::new(RingCrypto::new());
    let group =
        EnrollmentGroup::new(EnrollmentGroupId::new("bench").unwrap(), AttestationMechanism::symmetric_key());
    let mut g = c.benchmark_group("registrations_with_hub");
    g.throughput(Throughput::Elements(1));
    let memory = {
        let store = MemoryStore::new();
        let hub = EmbeddedHub::in_memory(HUB, crypto.clone()).unwrap();
        service(store, hub)
    };
    let durable = |name: &str, durability: Durability| {
        let store = SqliteStore::open_with(dir.path().join(name), durability).unwrap();
        let view = store.hub(HUB).unwrap();
        let hub = EmbeddedHub::over(HUB, view, crypto.clone()).unwrap();
        service(store, hub)
    };
    let normal = durable("normal.db", Durability::ProcessCrash);
    let full = durable("full.db", Durability::PowerLoss);
    let services: [(&str, &RegisterRun<'_>); 3] = [
        ("MemoryStore", &|k, n, i, t| register_concurrently(&memory, k, n, i, t)),
        ("SqliteStore synchronous=NORMAL", &|k, n, i, t| register_concurrently(&normal, k, n, i, t)),
        ("SqliteStore synchronous=FULL", &|k, n, i, t| register_concurrently(&full, k, n, i, t)),
    ];
    let keys = [
        group_key(memory.provisioner().store(), &crypto, &group),
        group_key(normal.provisioner().store(), &crypto, &group),
        group_key(full.provisioner().store(), &crypto, &group),
    ];
    let mut next = 0u64;
    for ((name, run), key) in services.iter().zip(&keys) {
        for threads in [1, 8] {
            g.bench_function(format!("{name}, {threads} thread(s)"), |b| {
                b.iter_custom(|iters| run(key, &mut next, iters, threads))
            });
        }
    }
    g.finish();
}

fn group_key<S: ProvisioningStore>(store: &S, crypto: &RingCrypto, group: &EnrollmentGroup) -> Vec<u8> {
    let g = enrollments::put_enrollment_group(store, crypto, now(), group.clone(), &IfMatch::Absent).unwrap();
    STANDARD.decode(g.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap()
}

criterion_group!(benches, bulk_import, registrations, concurrent_registrations, queries);
criterion_main!(benches);
