//! The in-memory identity store: atomic preconditions, cascading deletes, paging and counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_support;

use registry_support::*;
use zerotouch_engine::registry::{error_envelope, IdentityStore, MemoryIdentityStore};
use zerotouch_engine::store::{PageRequest, Precondition};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::{Device, DeviceStatus, HubErrorCode, Module};
use zerotouch_proto::ETag;

fn stored(name: &str, etag: &str) -> Device {
    let mut d = Device::new(id(name));
    d.etag = Some(ETag::new(etag));
    d
}

#[test]
fn memory_store_checks_each_precondition_against_the_stored_etag() {
    let s = MemoryIdentityStore::new();
    assert_eq!(s.put_device(&stored("a", "MQ=="), &Precondition::MustExist), Err(StoreError::NotFound));
    s.put_device(&stored("a", "MQ=="), &Precondition::MustNotExist).unwrap();
    assert_eq!(
        s.put_device(&stored("a", "Mg=="), &Precondition::MustNotExist),
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(
        s.put_device(&stored("a", "Mg=="), &Precondition::Matches("MA==".into())),
        Err(StoreError::PreconditionFailed)
    );
    s.put_device(&stored("a", "Mg=="), &Precondition::Matches("MQ==".into())).unwrap();
    assert_eq!(s.device(&id("a")).unwrap().unwrap().etag, Some(ETag::new("Mg==")));
    assert_eq!(
        s.delete_device(&id("a"), &Precondition::Matches("MQ==".into())).unwrap_err(),
        StoreError::PreconditionFailed
    );
    assert!(s.delete_device(&id("a"), &Precondition::Matches("Mg==".into())).is_ok());
    assert_eq!(s.delete_device(&id("a"), &Precondition::None).unwrap_err(), StoreError::NotFound);
}

#[test]
fn memory_store_deletes_modules_with_their_device_and_refuses_orphans() {
    let s = MemoryIdentityStore::new();
    let mut m = Module::new(id("d"), mid("m"));
    m.etag = Some(ETag::new("MA=="));
    assert_eq!(s.put_module(&m, &Precondition::MustNotExist), Err(StoreError::NotFound));
    s.put_device(&stored("d", "MA=="), &Precondition::MustNotExist).unwrap();
    s.put_module(&m, &Precondition::MustNotExist).unwrap();
    assert_eq!(s.modules(&id("d")).unwrap().len(), 1);
    let (_, modules) = s.delete_device(&id("d"), &Precondition::MustExist).unwrap();
    assert_eq!(modules, vec![m]);
    assert!(s.module(&id("d"), &mid("m")).unwrap().is_none());
}

#[test]
fn memory_store_pages_in_id_order_and_counts_by_status() {
    let s = MemoryIdentityStore::new();
    for name in ["c", "a", "B", "b"] {
        let mut d = stored(name, "MA==");
        if name == "b" {
            d.status = DeviceStatus::Disabled;
        }
        s.put_device(&d, &Precondition::MustNotExist).unwrap();
    }
    let first = s.devices(&PageRequest { continuation: None, max_items: 3 }).unwrap();
    let names: Vec<&str> = first.items.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(names, ["B", "a", "b"]);
    let second = s.devices(&PageRequest { continuation: first.continuation, max_items: 3 }).unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.continuation, None, "no continuation on the last page");
    let c = s.count_devices().unwrap();
    assert_eq!((c.total, c.enabled, c.disabled, c.connected), (4, 3, 1, 0));
}

#[test]
fn a_missing_device_answers_with_the_registry_error_envelope() {
    let reg = registry();
    let err = reg.device(&id("device004")).unwrap_err();
    let env = error_envelope(&err, "Tracking ID:0-G:0-TimeStamp:11/23/2026 10:00:00");
    assert_eq!(env.code(), Some(HubErrorCode::DeviceNotFound));
    assert_eq!(env.message, "ErrorCode:DeviceNotFound;Device device004 not registered");
}

/// A store where another writer changes the device just before the registry's first write.
#[derive(Debug, Default)]
struct RacingStore {
    inner: MemoryIdentityStore,
    raced: std::sync::atomic::AtomicBool,
}

impl IdentityStore for RacingStore {
    fn device(&self, id: &zerotouch_proto::DeviceId) -> Result<Option<Device>, StoreError> {
        self.inner.device(id)
    }
    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.race(device, pre)?;
        self.inner.put_device(device, pre)
    }
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.race(device, pre)?;
        self.inner.put_device_keeping_activity(device, pre)
    }
    fn delete_device(
        &self,
        id: &zerotouch_proto::DeviceId,
        pre: &Precondition,
    ) -> Result<(Device, Vec<Module>), StoreError> {
        self.inner.delete_device(id, pre)
    }
    fn devices(&self, page: &PageRequest) -> Result<zerotouch_engine::store::Page<Device>, StoreError> {
        self.inner.devices(page)
    }
    fn count_devices(&self) -> Result<zerotouch_engine::registry::DeviceCounts, StoreError> {
        self.inner.count_devices()
    }
    fn module(
        &self,
        d: &zerotouch_proto::DeviceId,
        m: &zerotouch_proto::ModuleId,
    ) -> Result<Option<Module>, StoreError> {
        self.inner.module(d, m)
    }
    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_module(module, pre)
    }
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_module_keeping_activity(module, pre)
    }
    fn delete_module(
        &self,
        d: &zerotouch_proto::DeviceId,
        m: &zerotouch_proto::ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        self.inner.delete_module(d, m, pre)
    }
    fn modules(&self, d: &zerotouch_proto::DeviceId) -> Result<Vec<Module>, StoreError> {
        self.inner.modules(d)
    }
}

impl RacingStore {
    /// The other writer, before the first conditional write.
    fn race(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        if matches!(pre, Precondition::Matches(_))
            && !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let mut other = self.inner.device(&device.device_id)?.unwrap();
            other.etag = Some(ETag::new("b3RoZXI="));
            other.status_reason = Some("other writer".into());
            self.inner.put_device(&other, &Precondition::None)?;
        }
        Ok(())
    }
}

fn racing_registry() -> zerotouch_engine::registry::Registry<RacingStore> {
    zerotouch_engine::registry::Registry::new(
        RacingStore::default(),
        std::sync::Arc::new(counting_crypto()),
        zerotouch_engine::registry::RegistryConfig::new(HUB),
    )
}

#[test]
fn a_wildcard_update_that_loses_a_race_is_retried_on_the_new_version() {
    let reg = racing_registry();
    reg.create_device(Device::new(id("r")), now()).unwrap();
    let mut body = Device::new(id("r"));
    body.status = DeviceStatus::Disabled;
    let d = reg.update_device(body, &zerotouch_proto::IfMatch::Any, later(1)).unwrap();
    assert_eq!(d.status, DeviceStatus::Disabled);
    assert_eq!(reg.device(&id("r")).unwrap(), d);
}

#[test]
fn an_etag_update_that_loses_a_race_is_412() {
    let reg = racing_registry();
    let created = reg.create_device(Device::new(id("r")), now()).unwrap().value;
    let tag = zerotouch_proto::IfMatch::from_header(Some(&format!("\"{}\"", created.etag.unwrap())));
    let err = reg.update_device(Device::new(id("r")), &tag, later(1)).unwrap_err();
    assert_eq!(zerotouch_engine::registry::hub_error_code(&err), HubErrorCode::PreconditionFailed);
    assert_eq!(reg.device(&id("r")).unwrap().status_reason.as_deref(), Some("other writer"));
}

/// Another writer's action on the store.
type Hook = Box<dyn FnOnce(&MemoryIdentityStore) + Send>;

/// A store whose next device or module read, once armed, runs a hook right after it: another
/// writer acting between the registry's read and its write.
#[derive(Default)]
struct Hooked {
    inner: MemoryIdentityStore,
    hook: std::sync::Mutex<Option<Hook>>,
}

impl Hooked {
    fn arm(&self, hook: impl FnOnce(&MemoryIdentityStore) + Send + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(hook));
    }

    fn fire(&self) {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook(&self.inner);
        }
    }
}

impl IdentityStore for Hooked {
    fn device(&self, id: &zerotouch_proto::DeviceId) -> Result<Option<Device>, StoreError> {
        let found = self.inner.device(id);
        self.fire();
        found
    }
    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_device(device, pre)
    }
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_device_keeping_activity(device, pre)
    }
    fn delete_device(
        &self,
        id: &zerotouch_proto::DeviceId,
        pre: &Precondition,
    ) -> Result<(Device, Vec<Module>), StoreError> {
        self.inner.delete_device(id, pre)
    }
    fn devices(&self, page: &PageRequest) -> Result<zerotouch_engine::store::Page<Device>, StoreError> {
        self.inner.devices(page)
    }
    fn count_devices(&self) -> Result<zerotouch_engine::registry::DeviceCounts, StoreError> {
        self.inner.count_devices()
    }
    fn module(
        &self,
        d: &zerotouch_proto::DeviceId,
        m: &zerotouch_proto::ModuleId,
    ) -> Result<Option<Module>, StoreError> {
        let found = self.inner.module(d, m);
        self.fire();
        found
    }
    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_module(module, pre)
    }
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.inner.put_module_keeping_activity(module, pre)
    }
    fn delete_module(
        &self,
        d: &zerotouch_proto::DeviceId,
        m: &zerotouch_proto::ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        self.inner.delete_module(d, m, pre)
    }
    fn modules(&self, d: &zerotouch_proto::DeviceId) -> Result<Vec<Module>, StoreError> {
        self.inner.modules(d)
    }
}

#[test]
fn a_connection_state_written_during_an_identity_update_is_not_put_back() {
    use zerotouch_proto::hub::ConnectionState;
    let store = std::sync::Arc::new(Hooked::default());
    let reg = zerotouch_engine::registry::Registry::new(
        std::sync::Arc::clone(&store),
        std::sync::Arc::new(counting_crypto()),
        zerotouch_engine::registry::RegistryConfig::new(HUB),
    );
    reg.create_device(Device::new(id("d")), now()).unwrap();
    reg.create_module(Module::new(id("d"), mid("m")), now()).unwrap();

    // The device connects (a write that keeps the etag) between the update's read and write.
    let connect = |stored: &MemoryIdentityStore| {
        let mut d = stored.device(&id("d")).unwrap().unwrap();
        let pre = Precondition::Matches(d.etag.as_ref().unwrap().bare().to_owned());
        d.connection_state = ConnectionState::Connected;
        d.connection_state_updated_time = Some(later(1));
        d.last_activity_time = Some(later(1));
        stored.put_device(&d, &pre).unwrap();
    };
    let mut body = reg.device(&id("d")).unwrap();
    body.status_reason = Some("maintenance".into());
    store.arm(connect);
    let updated = reg.update_device(body, &zerotouch_proto::IfMatch::Any, later(2)).unwrap();
    let stored = reg.device(&id("d")).unwrap();
    assert_eq!(stored.status_reason.as_deref(), Some("maintenance"), "the update is applied");
    assert_eq!(stored.etag, updated.etag);
    assert_eq!(stored.connection_state, ConnectionState::Connected, "the connection is not lost");
    assert_eq!(stored.last_activity_time, Some(later(1)));
    assert_eq!(reg.service_statistics().unwrap().connected_device_count, 1);

    // The same for a module.
    let connect_module = |stored: &MemoryIdentityStore| {
        let mut m = stored.module(&id("d"), &mid("m")).unwrap().unwrap();
        let pre = Precondition::Matches(m.etag.as_ref().unwrap().bare().to_owned());
        m.connection_state = ConnectionState::Connected;
        m.last_activity_time = Some(later(3));
        stored.put_module(&m, &pre).unwrap();
    };
    let mut body = reg.module(&id("d"), &mid("m")).unwrap();
    body.managed_by = Some("me".into());
    store.arm(connect_module);
    reg.update_module(body, &zerotouch_proto::IfMatch::Any).unwrap();
    let stored = reg.module(&id("d"), &mid("m")).unwrap();
    assert_eq!(stored.managed_by.as_deref(), Some("me"));
    assert_eq!(stored.connection_state, ConnectionState::Connected, "the module connection is not lost");
    assert_eq!(stored.last_activity_time, Some(later(3)));
}
