//! Bulk paths of the PostgreSQL store: batched import of identities with their twins, and an
//! export that streams them back in id order.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use std::ops::ControlFlow;

use pg_support::TestDb;
use serde_json::{json, Map};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_proto::hub::{Device, DeviceStatus};
use zerotouch_proto::{DeviceId, ETag, Timestamp};

fn device(n: usize) -> (Device, TwinDocument) {
    let mut d = Device::new(DeviceId::new(format!("meter-{n:05}")).unwrap());
    d.etag = Some(ETag::new(format!("e{n}")));
    if n % 10 == 0 {
        d.status = DeviceStatus::Disabled;
    }
    let mut tags = Map::new();
    tags.insert("site".to_owned(), json!(format!("site-{}", n % 7)));
    let twin =
        TwinDocument::with_initial(Timestamp::from_unix_secs(1_767_225_600), &tags, &Map::new()).unwrap();
    (d, twin)
}

#[test]
fn importing_2500_devices_in_batches_then_exporting_streams_them_back_in_id_order() {
    let db = TestDb::new();
    let store = db.store_with(2);
    let all: Vec<(Device, TwinDocument)> = (0..2500).map(device).collect();
    for batch in all.chunks(1000) {
        store.put_devices_with_twins(batch).unwrap();
    }
    assert_eq!(store.device_count().unwrap(), 2500);
    let counts = store.count_devices().unwrap();
    assert_eq!((counts.total, counts.disabled, counts.enabled), (2500, 250, 2250));
    let twin = store.twin(&TwinKey::device(DeviceId::new("meter-01234").unwrap())).unwrap().unwrap();
    assert_eq!(twin.tags().get("site"), Some(&json!("site-2")), "the twin came with its device");

    let mut exported = Vec::new();
    let visited = store
        .export_devices(300, |d| {
            exported.push(d);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(visited, 2500);
    let expected: Vec<&Device> = all.iter().map(|(d, _)| d).collect();
    assert_eq!(exported.iter().collect::<Vec<_>>(), expected, "every device, as imported, in id order");
}

#[test]
fn an_export_stops_when_the_visitor_breaks() {
    let db = TestDb::new();
    let store = db.store_with(2);
    let devices: Vec<Device> = (0..50).map(|n| device(n).0).collect();
    store.put_devices(&devices).unwrap();
    let mut seen = 0;
    let visited = store
        .export_devices(7, |_| {
            seen += 1;
            if seen == 12 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!((visited, seen), (12, 12));
}

#[test]
fn a_device_listed_twice_in_one_import_batch_ends_as_its_last_line() {
    let db = TestDb::new();
    let store = db.store_with(2);
    let first = device(1).0;
    let mut second = first.clone();
    second.status = DeviceStatus::Disabled;
    second.etag = Some(ETag::new("later"));
    store.put_devices(&[first.clone(), device(2).0, second.clone()]).unwrap();
    assert_eq!(store.device(&first.device_id).unwrap(), Some(second));
    assert_eq!(store.device_count().unwrap(), 2);
}
