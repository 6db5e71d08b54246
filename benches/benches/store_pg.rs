//! The PostgreSQL store: batched import of identities with their twins, and a selective query
//! over the twins (pushed down to the GIN tag index) next to a point query and, for smaller
//! runs, the same result without push-down.
//!
//! Needs a server: `ZEROTOUCH_TEST_DATABASE_URL` (see `scripts/pg`); without it the bench says so
//! and does nothing. `ZT_PG_BENCH_N` sets the number of identities (default 1 000 000). The data
//! goes into a schema of its own, dropped at the end.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use zerotouch_engine::query::{execute, parse, Query, QueryPage, QuerySource};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinDocument;
use zerotouch_proto::hub::Device;
use zerotouch_proto::Timestamp;
use zerotouch_store::postgres::PgStore;

const SITES: usize = 100;
const IMPORT_BATCH: usize = 10_000;
const QUERY_RUNS: usize = 5;

fn identities() -> usize {
    std::env::var("ZT_PG_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

fn now() -> Timestamp {
    Timestamp::from_unix_secs(1_767_225_600)
}

/// A device as an import creates it: SAS keys, etag, generation id.
fn imported_device(i: usize) -> Device {
    serde_json::from_value(json!({
        "deviceId": format!("dev-{i:07}"),
        "generationId": "638000000000000001",
        "etag": "MQ==",
        "status": if i.is_multiple_of(7) { "disabled" } else { "enabled" },
        "connectionState": "Disconnected",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "type": "sas",
            "symmetricKey": {
                "primaryKey": "YmVuY2gtcHJpbWFyeS1rZXktZm9yLXBvc3RncmVzLW9ubHktMDAwMA==",
                "secondaryKey": "YmVuY2gtc2Vjb25kYXJ5LWtleS1mb3ItcG9zdGdyZXMtb25seS0wMA=="
            }
        },
        "capabilities": {"iotEdge": false}
    }))
    .unwrap()
}

/// The initial twin of each site: tags as an operator sets them at import.
fn site_twin(site: usize) -> TwinDocument {
    let tags: Map<String, Value> =
        json!({"site": format!("site-{site}"), "floor": site % 8, "owner": {"team": "ops"}})
            .as_object()
            .cloned()
            .unwrap();
    let desired = json!({"telemetry": {"interval": 30}}).as_object().cloned().unwrap();
    TwinDocument::with_initial(now(), &tags, &desired).unwrap()
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

/// Median wall time of `runs` runs of `query`, checking the result count each time.
fn time_query(store: &PgStore, text: &str, expected: usize, runs: usize) -> Duration {
    let query = parse(text).unwrap();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(run_all(&query, store), expected, "{text}");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let Ok(url) = std::env::var("ZEROTOUCH_TEST_DATABASE_URL") else {
        println!(
            "store_pg: skipped, ZEROTOUCH_TEST_DATABASE_URL is not set (start a server with \
             `scripts/pg start` and export ZEROTOUCH_TEST_DATABASE_URL=$(scripts/pg url))"
        );
        return;
    };
    // `cargo bench` passes `--bench`; a plain `cargo test` of benches runs nothing here.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = identities();
    let schema = format!("bench_{:08x}", rand::random::<u32>());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = PgStore::connect(&format!("{url}{sep}options=-csearch_path%3D{schema}"), 4).unwrap();

    let twins: Vec<TwinDocument> = (0..SITES).map(site_twin).collect();
    let started = Instant::now();
    let mut build = Duration::ZERO;
    for start in (0..n).step_by(IMPORT_BATCH) {
        let t = Instant::now();
        let batch: Vec<(Device, TwinDocument)> = (start..(start + IMPORT_BATCH).min(n))
            .map(|i| (imported_device(i), twins[i % SITES].clone()))
            .collect();
        build += t.elapsed();
        store.put_devices_with_twins(&batch).unwrap();
    }
    let import = started.elapsed();
    assert_eq!(store.device_count().unwrap(), n as u64);
    println!(
        "import of {n} identities with twins, {IMPORT_BATCH} per transaction: {:.1} s ({:.0} identities/s; \
         building the rows in the bench: {:.1} s)",
        import.as_secs_f64(),
        n as f64 / import.as_secs_f64(),
        build.as_secs_f64()
    );
    // Fresh statistics, as autovacuum would gather them soon after an import.
    let analyzed = Instant::now();
    admin.batch_execute(&format!("ANALYZE {schema}.devices, {schema}.twins")).unwrap();
    println!("ANALYZE after the import: {:.1} s", analyzed.elapsed().as_secs_f64());

    let selective = "SELECT * FROM devices WHERE tags.site = 'site-7'";
    let t = time_query(&store, selective, n / SITES, QUERY_RUNS);
    println!("{selective}: {} results, median of {QUERY_RUNS}: {:.3} s", n / SITES, t.as_secs_f64());
    let projected = "SELECT deviceId FROM devices WHERE tags.site = 'site-7' AND status = 'disabled'";
    let disabled = (0..n).filter(|i| i % SITES == 7 && i.is_multiple_of(7)).count();
    let t = time_query(&store, projected, disabled, QUERY_RUNS);
    println!("{projected}: {disabled} results, median of {QUERY_RUNS}: {:.3} s", t.as_secs_f64());
    let point = "SELECT * FROM devices WHERE deviceId = 'dev-0000777'";
    let t = time_query(&store, point, 1, QUERY_RUNS);
    println!("{point}: median of {QUERY_RUNS}: {:.4} s", t.as_secs_f64());
    if n <= 200_000 || std::env::var("ZT_PG_BENCH_FULL_SCAN").is_ok() {
        let scan = "SELECT * FROM devices WHERE tags.site = 'site-7' OR deviceId = 'none'";
        let t = time_query(&store, scan, n / SITES, 1);
        println!("{scan} (not pushed down: every twin read and evaluated): {:.2} s", t.as_secs_f64());
    }

    drop(store);
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).unwrap();
}
