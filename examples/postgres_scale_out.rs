//! Scale-out on PostgreSQL: two engine "instances" (two connection pools, as two `zerotouch`
//! processes behind a load balancer would have) share one database with two embedded hubs.
//! Devices register through both at once, and some devices register through both instances at
//! the same moment: the database's compare-and-swap still gives each device exactly one
//! assignment, one record and one hub identity.
//!
//! Run: `cargo run -p zerotouch-examples --example postgres_scale_out -- postgres://user@host/db`
//! (or set `ZEROTOUCH_DATABASE_URL`; `scripts/pg start` prints a throwaway server's URL). The
//! example works in a schema of its own and drops it at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_engine::hub_engine::EmbeddedHubs;
use zerotouch_engine::store::RegistrationStore;
use zerotouch_examples::{group_device_request, service_over};
use zerotouch_proto::RegistrationId;
use zerotouch_store::postgres::PgStore;
use zerotouch_transport::service::{now, DpsService, EngineService};

const SCOPE: &str = "0ne0005CA1E";
const HUBS: [&str; 2] = ["hub-a.plant.local", "hub-b.plant.local"];
/// Devices each instance registers alone, and devices both register at once.
const OWN: usize = 40;
const SHARED: usize = 20;

type Instance = EngineService<PgStore, EmbeddedHubs<PgStore, PgStore, PgStore>>;

/// One "instance": its own connection pool on the shared schema, and the hubs as views of it.
fn instance(url: &str, crypto: &Arc<dyn CryptoProvider>) -> Instance {
    let store = PgStore::connect(url, 8).unwrap();
    service_over(SCOPE, store.clone(), &HUBS, |name| store.hub(name).unwrap(), crypto).unwrap()
}

fn register(service: &Instance, crypto: &dyn CryptoProvider, group_key: &[u8], id: &str) {
    let request = group_device_request(crypto, group_key, SCOPE, id);
    let reply = service.register(now(), request);
    assert_eq!(reply.status, 202, "{id}: {reply:?}");
}

fn main() {
    let server = std::env::args().nth(1).or_else(|| std::env::var("ZEROTOUCH_DATABASE_URL").ok()).expect(
        "give a PostgreSQL URL as the argument or in ZEROTOUCH_DATABASE_URL (see `scripts/pg start`)",
    );
    // A schema of our own, so the example never touches other data in the database.
    let schema = format!("zt_example_{}", std::process::id());
    let mut admin = postgres::Client::connect(&server, postgres::NoTls).unwrap();
    admin.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
    let sep = if server.contains('?') { '&' } else { '?' };
    let url = format!("{server}{sep}options=-csearch_path%3D{schema}");

    let crypto: Arc<dyn CryptoProvider> = Arc::new(RingCrypto::new());
    let (first, second) = (instance(&url, &crypto), instance(&url, &crypto));
    let group_key = zerotouch_testkit::enroll::symmetric_group(first.provisioner().store(), "meters", now());

    // Both instances register their own devices and, at the same time, the shared ones.
    std::thread::scope(|s| {
        for (name, service) in [("first", &first), ("second", &second)] {
            let (crypto, group_key) = (crypto.as_ref(), group_key.as_slice());
            s.spawn(move || {
                for n in 0..OWN {
                    register(service, crypto, group_key, &format!("meter-{name}-{n:02}"));
                }
            });
            s.spawn(move || {
                for n in 0..SHARED {
                    register(service, crypto, group_key, &format!("meter-both-{n:02}"));
                }
            });
        }
    });

    // Every device has one record; every record names the one hub holding the device.
    let store = first.provisioner().store();
    let mut devices = BTreeSet::new();
    let ids = (0..OWN)
        .flat_map(|n| [format!("meter-first-{n:02}"), format!("meter-second-{n:02}")])
        .chain((0..SHARED).map(|n| format!("meter-both-{n:02}")));
    for id in ids {
        let record = store.registration(&RegistrationId::new(&id).unwrap()).unwrap().expect("a record");
        let hub = record.state.assigned_hub.unwrap();
        devices.insert((hub, id));
    }
    let mut identities = 0;
    for name in HUBS {
        let count = store.hub(name).unwrap().device_count().unwrap();
        println!("{name}: {count} device identities");
        identities += count;
    }
    let expected = 2 * OWN + SHARED;
    println!("{} registrations through two instances, {identities} identities", 2 * OWN + 2 * SHARED);
    assert_eq!(devices.len(), expected);
    assert_eq!(identities, expected as u64, "a device registered twice at once got two identities");

    drop((first, second));
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).unwrap();
}
