//! The identity store trait and its in-memory implementation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use zerotouch_proto::hub::{ConnectionState, Device, DeviceStatus, Module};
use zerotouch_proto::{DeviceId, ETag, ModuleId};

use crate::error::StoreError;
use crate::store::{Page, PageRequest, Precondition};

/// Device counts for `GET /statistics/devices` and `GET /statistics/service`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Device identities.
    pub total: u64,
    /// Enabled devices.
    pub enabled: u64,
    /// Disabled devices.
    pub disabled: u64,
    /// Devices whose `connectionState` is `Connected`.
    pub connected: u64,
}

/// Device and module identities, keyed case-sensitively by device id (and module id).
///
/// Every conditional write checks its [`Precondition`] against the stored etag atomically with
/// the write. Stored identities always carry an etag.
pub trait IdentityStore: Send + Sync {
    /// Looks a device up.
    ///
    /// # Errors
    /// Backend failures.
    fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError>;
    /// Writes a device if `pre` holds.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError>;
    /// [`IdentityStore::put_device`] of an identity update: the activity fields of a stored
    /// device ([`keep_device_activity`]) keep their stored values, read atomically with the
    /// precondition check and the write; `device`'s are written only when nothing is stored.
    /// Those fields change without a new etag (a connection-state write), so a write
    /// conditional on the etag alone would put back the values its caller read before them.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError>;
    /// Deletes a device and, atomically with it, its modules, if `pre` holds. Returns the
    /// deleted device and modules.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_device(&self, id: &DeviceId, pre: &Precondition) -> Result<(Device, Vec<Module>), StoreError>;
    /// Lists devices ordered by id. The continuation token is opaque.
    ///
    /// # Errors
    /// Backend failures.
    fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError>;
    /// Counts devices by status and connection state.
    ///
    /// # Errors
    /// Backend failures.
    fn count_devices(&self) -> Result<DeviceCounts, StoreError>;
    /// Looks a module up.
    ///
    /// # Errors
    /// Backend failures.
    fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError>;
    /// Writes a module if `pre` holds and its device exists.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when the device is missing (or `pre` needs an existing module that
    /// is missing), other precondition failures and backend failures.
    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError>;
    /// [`IdentityStore::put_module`] of an identity update, keeping the stored activity fields
    /// ([`keep_module_activity`]) as [`IdentityStore::put_device_keeping_activity`] does.
    ///
    /// # Errors
    /// As [`IdentityStore::put_module`].
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError>;
    /// Deletes a module if `pre` holds; returns it.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_module(
        &self,
        device: &DeviceId,
        module: &ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError>;
    /// The modules of a device ordered by id (at most a few dozen, so no paging).
    ///
    /// # Errors
    /// Backend failures.
    fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError>;

    /// Whether a write this thread makes now joins a store unit that is still open (and is
    /// undone if that unit rolls back): true inside a unit of the database this store writes to
    /// (`RegistrationStore::atomically` of the same SQLite file or PostgreSQL pool), false for
    /// stores outside any unit, as the in-memory ones. The embedded hub asks it to tell which
    /// lifecycle events a rolled-back unit takes with it, without reading the store back.
    fn in_open_unit(&self) -> bool {
        false
    }
}

/// Shared identity stores: a registry and a hub engine can hold one store through an `Arc`.
impl<T: IdentityStore + ?Sized> IdentityStore for std::sync::Arc<T> {
    fn in_open_unit(&self) -> bool {
        (**self).in_open_unit()
    }
    fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        (**self).device(id)
    }
    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_device(device, pre)
    }
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_device_keeping_activity(device, pre)
    }
    fn delete_device(&self, id: &DeviceId, pre: &Precondition) -> Result<(Device, Vec<Module>), StoreError> {
        (**self).delete_device(id, pre)
    }
    fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError> {
        (**self).devices(page)
    }
    fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        (**self).count_devices()
    }
    fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError> {
        (**self).module(device, module)
    }
    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_module(module, pre)
    }
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_module_keeping_activity(module, pre)
    }
    fn delete_module(
        &self,
        device: &DeviceId,
        module: &ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        (**self).delete_module(device, module, pre)
    }
    fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError> {
        (**self).modules(device)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    device: Device,
    modules: BTreeMap<String, Module>,
}

/// [`IdentityStore`] in memory, behind one `RwLock`.
#[derive(Debug, Default)]
pub struct MemoryIdentityStore {
    inner: RwLock<BTreeMap<String, Entry>>,
}

impl MemoryIdentityStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, BTreeMap<String, Entry>>, StoreError> {
        self.inner.read().map_err(|_| StoreError::Backend("identity store lock poisoned".into()))
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, BTreeMap<String, Entry>>, StoreError> {
        self.inner.write().map_err(|_| StoreError::Backend("identity store lock poisoned".into()))
    }

    /// `put_device`, keeping the stored activity fields when `keep_activity`.
    fn put_device_with(
        &self,
        device: &Device,
        pre: &Precondition,
        keep_activity: bool,
    ) -> Result<(), StoreError> {
        let mut map = self.write()?;
        let current = map.get(device.device_id.as_str());
        check(pre, current.map(|e| e.device.etag.as_ref()))?;
        match map.get_mut(device.device_id.as_str()) {
            Some(entry) => {
                let mut device = device.clone();
                if keep_activity {
                    keep_device_activity(&mut device, &entry.device);
                }
                entry.device = device;
            }
            None => {
                map.insert(
                    device.device_id.as_str().to_owned(),
                    Entry { device: device.clone(), modules: BTreeMap::new() },
                );
            }
        }
        Ok(())
    }

    /// `put_module`, keeping the stored activity fields when `keep_activity`.
    fn put_module_with(
        &self,
        module: &Module,
        pre: &Precondition,
        keep_activity: bool,
    ) -> Result<(), StoreError> {
        let mut map = self.write()?;
        let entry = map.get_mut(module.device_id.as_str()).ok_or(StoreError::NotFound)?;
        let current = entry.modules.get(module.module_id.as_str());
        check(pre, current.map(|m| m.etag.as_ref()))?;
        let mut module = module.clone();
        if let (true, Some(stored)) = (keep_activity, current) {
            keep_module_activity(&mut module, stored);
        }
        entry.modules.insert(module.module_id.as_str().to_owned(), module);
        Ok(())
    }
}

/// Copies the activity fields of `stored` into `device`: `connectionState`,
/// `connectionStateUpdatedTime`, `lastActivityTime` and `cloudToDeviceMessageCount`, the fields
/// written without a new etag (for [`IdentityStore::put_device_keeping_activity`]).
pub fn keep_device_activity(device: &mut Device, stored: &Device) {
    device.connection_state = stored.connection_state;
    device.connection_state_updated_time = stored.connection_state_updated_time;
    device.last_activity_time = stored.last_activity_time;
    device.cloud_to_device_message_count = stored.cloud_to_device_message_count;
}

/// [`keep_device_activity`] for modules.
pub fn keep_module_activity(module: &mut Module, stored: &Module) {
    module.connection_state = stored.connection_state;
    module.connection_state_updated_time = stored.connection_state_updated_time;
    module.last_activity_time = stored.last_activity_time;
    module.cloud_to_device_message_count = stored.cloud_to_device_message_count;
}

impl IdentityStore for MemoryIdentityStore {
    fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(self.read()?.get(id.as_str()).map(|e| e.device.clone()))
    }

    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.put_device_with(device, pre, false)
    }

    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        self.put_device_with(device, pre, true)
    }

    fn delete_device(&self, id: &DeviceId, pre: &Precondition) -> Result<(Device, Vec<Module>), StoreError> {
        let mut map = self.write()?;
        let entry = map.get(id.as_str()).ok_or(StoreError::NotFound)?;
        check(pre, Some(entry.device.etag.as_ref()))?;
        let entry = map.remove(id.as_str()).ok_or(StoreError::NotFound)?;
        Ok((entry.device, entry.modules.into_values().collect()))
    }

    fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError> {
        let map = self.read()?;
        let start = match &page.continuation {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Unbounded,
        };
        let max = page.max_items.max(1);
        let mut items: Vec<Device> =
            map.range((start, Bound::Unbounded)).take(max + 1).map(|(_, e)| e.device.clone()).collect();
        let continuation = if items.len() > max {
            items.truncate(max);
            items.last().map(|d| d.device_id.as_str().to_owned())
        } else {
            None
        };
        Ok(Page { items, continuation })
    }

    fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        let map = self.read()?;
        let mut counts = DeviceCounts::default();
        for e in map.values() {
            counts.total += 1;
            match e.device.status {
                DeviceStatus::Disabled => counts.disabled += 1,
                _ => counts.enabled += 1,
            }
            if e.device.connection_state == ConnectionState::Connected {
                counts.connected += 1;
            }
        }
        Ok(counts)
    }

    fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError> {
        Ok(self.read()?.get(device.as_str()).and_then(|e| e.modules.get(module.as_str())).cloned())
    }

    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.put_module_with(module, pre, false)
    }

    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.put_module_with(module, pre, true)
    }

    fn delete_module(
        &self,
        device: &DeviceId,
        module: &ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        let mut map = self.write()?;
        let entry = map.get_mut(device.as_str()).ok_or(StoreError::NotFound)?;
        let current = entry.modules.get(module.as_str()).ok_or(StoreError::NotFound)?;
        check(pre, Some(current.etag.as_ref()))?;
        entry.modules.remove(module.as_str()).ok_or(StoreError::NotFound)
    }

    fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError> {
        Ok(self
            .read()?
            .get(device.as_str())
            .map(|e| e.modules.values().cloned().collect())
            .unwrap_or_default())
    }
}

/// Checks `pre` against what is stored: `None` = nothing, `Some(None)` = an identity stored
/// without an etag (never written by the registry, but a precondition must still see it exists).
fn check(pre: &Precondition, current: Option<Option<&ETag>>) -> Result<(), StoreError> {
    match current {
        None => pre.check(None),
        Some(Some(tag)) => pre.check(Some(tag)),
        Some(None) => pre.check(Some(&ETag::new(""))),
    }
}
