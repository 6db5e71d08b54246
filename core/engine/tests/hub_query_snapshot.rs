//! A query that runs while a write through the hub is under way may miss that write, but the
//! next query after the write sees it (the hub's query snapshot is never left stale).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use serde_json::json;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::jobs::{JobLimits, MemoryJobStore};
use zerotouch_engine::query::{execute, parse};
use zerotouch_engine::registry::MemoryIdentityStore;
use zerotouch_engine::store::{Page, PageRequest, Precondition};
use zerotouch_engine::twin::{MemoryTwinStore, StoredTwin, TwinDocument, TwinKey, TwinOperation, TwinStore};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::Device;
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};

/// A twin store whose next write, once armed, waits at a gate: the test sees the write begun
/// and not done, and lets it go on.
struct Gate {
    inner: MemoryTwinStore,
    armed: AtomicBool,
    entered: Barrier,
    release: Barrier,
}

impl TwinStore for Gate {
    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        self.inner.twin(key)
    }
    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            self.release.wait();
        }
        self.inner.put_twin(key, twin, pre)
    }
    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.delete_twin(key, pre)
    }
    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        self.inner.twins(page)
    }
    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        self.inner.device_twins(device_id)
    }
}

#[test]
fn a_query_during_a_twin_write_does_not_hide_the_write_from_later_queries() {
    let gate = Arc::new(Gate {
        inner: MemoryTwinStore::new(),
        armed: AtomicBool::new(false),
        entered: Barrier::new(2),
        release: Barrier::new(2),
    });
    let hub = Arc::new(
        EmbeddedHub::new(
            "h.example",
            MemoryIdentityStore::new(),
            Arc::clone(&gate),
            MemoryJobStore::new(),
            Arc::new(RingCrypto::new()),
            JobLimits::default(),
        )
        .unwrap(),
    );
    let now = Timestamp::from_unix_secs(1_767_225_600);
    let d = DeviceId::new("d").unwrap();
    hub.create_device(Device::new(d.clone()), None, None, now).unwrap();
    let q = parse("SELECT * FROM devices WHERE tags.site = 'x'").unwrap();
    let page = PageRequest { continuation: None, max_items: 100 };

    gate.armed.store(true, Ordering::SeqCst);
    let writer = {
        let hub = Arc::clone(&hub);
        let d = d.clone();
        std::thread::spawn(move || {
            let patch = serde_json::from_value(json!({"tags": {"site": "x"}})).unwrap();
            hub.update_twin(&d, None, &TwinOperation::Patch(patch), &IfMatch::Any, now)
        })
    };
    gate.entered.wait();
    // The write has begun and not reached the store: this query may not see it.
    assert!(execute(&q, &*hub, &page).unwrap().items.is_empty());
    gate.release.wait();
    writer.join().unwrap().unwrap();

    // The write is done: every query from now on sees it, with no other write in between.
    assert_eq!(execute(&q, &*hub, &page).unwrap().items.len(), 1);
    assert_eq!(execute(&q, &*hub, &page).unwrap().items.len(), 1);
}
