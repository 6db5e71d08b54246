//! Registrations through the device service tell the shared hub registry, from their own
//! thread, where their store unit begins and how it ends, so the embedded hub announces each
//! device once its registration committed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::registration_token;
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::registry::LifecycleOperation;
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::{IdScope, Timestamp};
use zerotouch_transport::service::{DpsService, EngineService, TimedHubs};

const SCOPE: &str = "0ne00C0FFEE";
const HUB: &str = "plant-south.example.net";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Begin,
    Apply,
    End(bool),
}

/// Embedded hubs that log, per thread, the unit calls and actions they receive.
struct UnitLog {
    hubs: EmbeddedHubs,
    calls: BTreeMap<String, Vec<Call>>,
}

impl UnitLog {
    fn record(&mut self, thread: ThreadId, call: Call) {
        self.calls.entry(format!("{thread:?}")).or_default().push(call);
    }
}

impl HubRegistry for UnitLog {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.record(std::thread::current().id(), Call::Apply);
        self.hubs.apply(action)
    }

    fn begin_unit(&mut self) {
        self.record(std::thread::current().id(), Call::Begin);
        self.hubs.begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.record(std::thread::current().id(), Call::End(committed));
        self.hubs.end_unit(committed);
    }
}

impl TimedHubs for UnitLog {
    fn set_now(&mut self, now: Timestamp) {
        self.hubs.set_now(now);
    }
}

#[test]
fn registrations_on_parallel_threads_each_announce_their_device_once_after_their_unit() {
    let crypto = Arc::new(RingCrypto::new());
    let store = Arc::new(MemoryStore::new());
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store.clone(),
        crypto.clone(),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let mut hubs = EmbeddedHubs::new();
    hubs.insert(EmbeddedHub::in_memory(HUB, crypto.clone()).unwrap());
    let hubs = Arc::new(Mutex::new(UnitLog { hubs, calls: BTreeMap::new() }));
    let service = EngineService::new(provisioner, hubs.clone());
    let now = Timestamp::from_unix_secs(1_767_225_600);

    let devices = ["pump-1", "pump-2", "pump-3", "pump-4"];
    let keys: Vec<Vec<u8>> =
        devices.iter().map(|d| zerotouch_testkit::enroll::symmetric(store.as_ref(), d, now)).collect();
    std::thread::scope(|scope| {
        for (device, key) in devices.iter().zip(&keys) {
            let (service, crypto) = (&service, &crypto);
            scope.spawn(move || {
                let token = registration_token(crypto.as_ref(), key, SCOPE, device, now.unix_secs() + 60);
                let reply = service.register(
                    now,
                    RegisterRequest {
                        id_scope: SCOPE.into(),
                        registration_id: (*device).into(),
                        body: DeviceRegistration {
                            payload: None,
                            registration_id: (*device).into(),
                            tpm: None,
                            csr: None,
                        },
                        credential: Credential::Sas(token.to_string()),
                        api_version: None,
                    },
                );
                assert_eq!(reply.status, 202, "{reply:?}");
            });
        }
    });

    let log = hubs.lock().unwrap();
    assert_eq!(log.calls.len(), devices.len(), "one thread per registration: {:?}", log.calls);
    for calls in log.calls.values() {
        assert_eq!(calls, &[Call::Begin, Call::Apply, Call::End(true)]);
    }
    let events = log.hubs.hub(HUB).unwrap().take_lifecycle_events();
    let mut created: Vec<&str> = events
        .iter()
        .filter(|e| e.op_type == LifecycleOperation::CreateDeviceIdentity)
        .map(|e| e.device_id.as_str())
        .collect();
    created.sort_unstable();
    assert_eq!(created, devices);
    assert_eq!(events.len(), devices.len());
}
