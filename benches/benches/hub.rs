//! Hub benches: twin patch apply against a plain JSON merge-patch, device queries over an
//! in-memory twin collection, and import-job lines (parsing alone, then through the registry).
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::query::{
    execute, execute_shared, parse, Collection, IndexedSource, Path, QueryPage, QuerySource, VecSource,
};
use zerotouch_engine::registry::{ImportJob, MemoryIdentityStore, Registry, RegistryConfig, TwinSink};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinDocument;
use zerotouch_engine::Error;
use zerotouch_proto::hub::{ExportImportDevice, ExportImportProperties, JobProperties};
use zerotouch_proto::twin::TwinPatch;
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};

const SITES: usize = 100;

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// A typical service patch: a couple of tags and a nested desired block.
fn patch_json() -> Value {
    json!({
        "tags": {"site": "site-7", "floor": 3, "owner": {"team": "ops", "oncall": null}},
        "properties": {"desired": {
            "telemetry": {"interval": 30, "enabled": true},
            "firmware": {"version": "1.4.2", "url": "https://fw.example/1.4.2.bin"},
            "threshold": 21.5
        }}
    })
}

/// RFC 7396 merge patch over plain JSON: the baseline the twin merge (metadata, versions,
/// limits) is compared with.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn twin_patch(c: &mut Criterion) {
    let value = patch_json();
    let patch: TwinPatch = serde_json::from_value(value.clone()).unwrap_or_default();
    let mut g = c.benchmark_group("twin_patch");
    g.throughput(Throughput::Elements(1));
    g.bench_function("TwinDocument::patch (tags + desired)", |b| {
        let mut doc = TwinDocument::new(now());
        b.iter(|| black_box(doc.patch(now(), black_box(&patch), &IfMatch::Any).map(|c| c.version)));
    });
    g.bench_function("TwinDocument::patch_owned (tags + desired, patch decoded per request)", |b| {
        let mut doc = TwinDocument::new(now());
        // The clone stands for decoding the request body, which happens outside the twin.
        b.iter_batched(
            || patch.clone(),
            // The change is returned, so dropping it is not timed either (nor is dropping
            // the decoded request in a server).
            |p| doc.patch_owned(now(), p, &IfMatch::Any),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("baseline: RFC 7396 merge over serde_json::Value", |b| {
        let mut doc = json!({"tags": {}, "properties": {"desired": {}, "reported": {}}});
        b.iter(|| merge_patch(&mut doc, black_box(&value)));
    });
    g.finish();
}

fn twin_docs(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "deviceId": format!("dev-{i:07}"),
                "etag": "AAAAAAAAAAE=",
                "status": if i % 10 == 0 { "disabled" } else { "enabled" },
                "version": 4,
                "tags": {"site": format!("site-{}", i % SITES), "floor": i % 8, "owner": {"team": "ops"}},
                "properties": {
                    "desired": {"telemetry": {"interval": 30}, "$version": 2},
                    "reported": {"temperature": (i % 40) as f64 + 0.5, "fw": "1.4.1", "$version": 5}
                }
            })
        })
        .collect()
}

/// `execute` or `execute_shared`.
type Exec<T> = fn(
    &zerotouch_engine::query::Query,
    &dyn QuerySource,
    &PageRequest,
) -> Result<QueryPage<T>, zerotouch_engine::Error>;

/// Runs a query to its last page with `exec`, as a client following continuation tokens does.
fn run_pages<T>(query: &zerotouch_engine::query::Query, source: &dyn QuerySource, exec: Exec<T>) -> usize {
    let mut page = PageRequest { continuation: None, max_items: 1000 };
    let mut n = 0;
    loop {
        let QueryPage { items, continuation, .. } = match exec(query, source, &page) {
            Ok(p) => p,
            Err(_) => return n,
        };
        n += items.len();
        match continuation {
            Some(t) => page.continuation = Some(t),
            None => return n,
        }
    }
}

/// Runs a query to its last page with the copying [`execute`].
fn run_all(query: &zerotouch_engine::query::Query, source: &dyn QuerySource) -> usize {
    run_pages(query, source, execute)
}

/// [`run_all`] with [`execute_shared`]: `SELECT *` items share the source's documents.
fn run_all_shared(query: &zerotouch_engine::query::Query, source: &dyn QuerySource) -> usize {
    run_pages(query, source, execute_shared)
}

fn queries(c: &mut Criterion) {
    let selective = parse("SELECT * FROM devices WHERE tags.site = 'site-7'");
    let grouped =
        parse("SELECT properties.reported.fw, COUNT() AS n FROM devices GROUP BY properties.reported.fw");
    let (Ok(selective), Ok(grouped)) = (selective, grouped) else {
        panic!("bench queries must parse");
    };
    for n in [100_000, 1_000_000] {
        // Built on the first query bench of this size that runs, so filtering the benches to
        // the twin patches (as callgrind runs do) does not build a million twins first.
        let data = OnceLock::new();
        let indexed = || {
            data.get_or_init(|| {
                let indexed = IndexedSource::new(VecSource::with_devices(twin_docs(n)));
                assert_eq!(run_all(&selective, &indexed.unindexed()), n / SITES);
                // The index on tags.site is built here, before timing (a query that names the
                // path would build it on first use otherwise); its cost is reported once.
                let site = Path { segments: vec!["tags".to_owned(), "site".to_owned()] };
                let started = std::time::Instant::now();
                assert_eq!(indexed.index(Collection::Devices, &site), SITES);
                eprintln!("query_{n}: building the tags.site index took {:?}", started.elapsed());
                assert_eq!(run_all(&selective, &indexed), n / SITES);
                assert_eq!(run_all_shared(&selective, &indexed), n / SITES);
                indexed
            })
        };
        let mut g = c.benchmark_group(format!("query_{n}"));
        g.sample_size(10);
        g.bench_function("selective: WHERE tags.site = 'site-7'", |b| {
            let source = indexed().unindexed();
            b.iter(|| black_box(run_all(&selective, &source)));
        });
        g.bench_function("selective, IndexedSource: WHERE tags.site = 'site-7'", |b| {
            let indexed = indexed();
            b.iter(|| black_box(run_all(&selective, indexed)));
        });
        g.bench_function("selective, IndexedSource, execute_shared: WHERE tags.site = 'site-7'", |b| {
            let indexed = indexed();
            b.iter(|| black_box(run_all_shared(&selective, indexed)));
        });
        g.bench_function("full scan: GROUP BY with COUNT()", |b| {
            let source = indexed().unindexed();
            b.iter(|| black_box(run_all(&grouped, &source)));
        });
        g.finish();
    }
}

fn import_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            json!({
                "id": format!("dev-{i:07}"),
                "importMode": "create",
                "status": "enabled",
                "authentication": {
                    "type": "sas",
                    "symmetricKey": {
                        "primaryKey": "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM=",
                        "secondaryKey": "c2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5YWJjZGVmMDE="
                    }
                }
            })
            .to_string()
        })
        .collect()
}

/// Twin writes go nowhere: the lines carry no twin data, and the bench measures the registry.
struct NoTwins;

impl TwinSink for NoTwins {
    fn update_twin(
        &self,
        _device_id: &DeviceId,
        _module_id: Option<&ModuleId>,
        _tags: Option<&Value>,
        _properties: Option<&ExportImportProperties>,
        _if_match: &IfMatch,
        _now: Timestamp,
    ) -> Result<(), Error> {
        Ok(())
    }

    fn twin_for_export(
        &self,
        _device_id: &DeviceId,
        _module_id: Option<&ModuleId>,
    ) -> Result<Option<(ETag, Option<Value>, ExportImportProperties)>, Error> {
        Ok(None)
    }
}

fn import(c: &mut Criterion) {
    const N: usize = 100_000;
    // Built when an import bench runs, not when the filter selects other benches.
    let data = OnceLock::new();
    let lines = || data.get_or_init(|| import_lines(N));
    let mut g = c.benchmark_group("import_100k_lines");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("parse into ExportImportDevice", |b| {
        let lines = lines();
        b.iter(|| {
            lines.iter().filter(|l| serde_json::from_str::<ExportImportDevice>(black_box(l)).is_ok()).count()
        });
    });
    g.bench_function("ImportJob::run into Registry<MemoryIdentityStore>", |b| {
        let lines = lines();
        b.iter_batched(
            || {
                let registry = Registry::new(
                    MemoryIdentityStore::new(),
                    Arc::new(RingCrypto::new()),
                    RegistryConfig::new("bench-hub"),
                );
                (registry, ImportJob::new("bench-import", JobProperties::default()), lines.clone())
            },
            |(registry, mut job, lines)| {
                let counts = job.run(&registry, lines, &NoTwins, now(), &mut |_| {}, &mut |_| {});
                // Returned so that dropping 100k identities is not timed.
                (black_box(counts.map(|c| c.succeeded)), registry)
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = twin_patch, queries, import
}
criterion_main!(benches);
