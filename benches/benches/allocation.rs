//! Throughput of allocation decisions: hashed (precomputed pool and one-shot) and geoLatency.
// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zerotouch_engine::allocation::{
    geo_latency, hashed, AllocationRequest, Allocator, HashedPool, LatencyTable,
};
use zerotouch_engine::hub::LinkedHub;
use zerotouch_proto::service::AllocationPolicy;
use zerotouch_proto::RegistrationId;

fn hubs() -> Vec<LinkedHub> {
    vec![
        LinkedHub::new("contoso-west.azure-devices.net").with_weight(1),
        LinkedHub::new("contoso-east.azure-devices.net").with_weight(2),
        LinkedHub::new("contoso-north.azure-devices.net").with_weight(3),
    ]
}

/// Distinct, realistic ids, so the bench does not measure one cached branch pattern.
fn ids() -> Vec<RegistrationId> {
    (0..1024)
        .map(|n| RegistrationId::new(format!("sn-{n:06}-factory-line-7")).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn allocation(c: &mut Criterion) {
    let hubs = hubs();
    let refs: Vec<&LinkedHub> = hubs.iter().collect();
    let ids = ids();
    let pool = HashedPool::new(&refs);
    let latency: LatencyTable = [
        ("contoso-west.azure-devices.net", Duration::from_millis(20)),
        ("contoso-east.azure-devices.net", Duration::from_millis(20)),
        ("contoso-north.azure-devices.net", Duration::from_millis(45)),
    ]
    .into_iter()
    .collect();
    let allocator = Allocator::new(hubs.clone()).with_latency(latency.clone());

    let mut group = c.benchmark_group("allocation");
    group.throughput(Throughput::Elements(1));

    let mut n = 0usize;
    group.bench_function("one hashed allocation decision", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            black_box(pool.pick(black_box(&ids[n])))
        })
    });
    group.bench_function("one hashed allocation decision (names hashed per call)", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            black_box(hashed(black_box(&ids[n]), black_box(&refs)))
        })
    });
    group.bench_function("one geoLatency allocation decision", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            black_box(geo_latency(black_box(&ids[n]), black_box(&refs), &latency))
        })
    });
    group.bench_function("Allocator::allocate geoLatency (candidates + owned decision)", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            black_box(allocator.allocate(AllocationRequest {
                registration_id: black_box(&ids[n]),
                policy: Some(AllocationPolicy::GeoLatency),
                iot_hubs: None,
                iot_hub_host_name: None,
                custom_request: None,
            }))
        })
    });
    group.finish();
}

criterion_group!(benches, allocation);
criterion_main!(benches);
