//! Bulk registry operations (`POST /devices`) and the import modes they share with import jobs.

use std::collections::HashMap;

use zerotouch_proto::hub::{
    AuthenticationMechanism, BulkRegistryOperationResult, Device, DeviceRegistryOperationError,
    ExportImportDevice, HubErrorCode, ImportMode, Module, SymmetricKey,
};
use zerotouch_proto::{IfMatch, ModuleId, Timestamp};

use super::{
    error_text, hub_error, hub_error_code, Applied, IdentityStore, LifecycleEvent, Registry, TwinSink,
    MAX_BULK_ENTRIES,
};
use crate::error::Error;

impl<S: IdentityStore> Registry<S> {
    /// `POST /devices` with 1–100 entries, applied one by one (not transactional). An id that
    /// appears more than once fails every time with `DeviceDefinedMultipleTimes` and is not
    /// applied. Failures in the `*IfMatchETag` modes report `EtagDoesNotMatch`.
    ///
    /// # Errors
    /// `ArgumentInvalid` when the request has no or more than 100 entries. Per-entry failures
    /// are in the result, not errors.
    pub fn bulk(
        &self,
        entries: &[ExportImportDevice],
        twins: &dyn TwinSink,
        now: Timestamp,
    ) -> Result<Applied<BulkRegistryOperationResult>, Error> {
        if entries.is_empty() || entries.len() > MAX_BULK_ENTRIES {
            return Err(hub_error(
                HubErrorCode::ArgumentInvalid,
                format!("A bulk operation takes 1 to {MAX_BULK_ENTRIES} devices, got {}.", entries.len()),
            ));
        }
        let mut counts = HashMap::new();
        for e in entries {
            *counts.entry((e.id.as_str(), e.module_id.as_ref().map(ModuleId::as_str))).or_insert(0usize) += 1;
        }
        let mut errors = Vec::new();
        let mut events = Vec::new();
        for e in entries {
            let key = (e.id.as_str(), e.module_id.as_ref().map(ModuleId::as_str));
            let outcome = if counts.get(&key).copied().unwrap_or(0) > 1 {
                Err(hub_error(
                    HubErrorCode::DeviceDefinedMultipleTimes,
                    format!("Device '{}' is defined more than once in the request.", e.id),
                ))
            } else {
                self.apply_entry(e, twins, now)
            };
            match outcome {
                Ok(mut ev) => events.append(&mut ev),
                Err(err) => errors.push(DeviceRegistryOperationError {
                    device_id: e.id.to_string(),
                    module_id: e.module_id.as_ref().map(ToString::to_string),
                    error_code: hub_error_code(&err),
                    error_status: error_text(&err),
                    operation: Some(e.mode().as_str().to_owned()),
                }),
            }
        }
        let value =
            BulkRegistryOperationResult { is_successful: errors.is_empty(), errors, warnings: Vec::new() };
        Ok(Applied { value, events })
    }

    /// Applies one bulk entry or import line according to its import mode.
    ///
    /// # Errors
    /// The hub error the entry fails with; etag mismatches are `EtagDoesNotMatch`.
    pub fn apply_entry(
        &self,
        entry: &ExportImportDevice,
        twins: &dyn TwinSink,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        self.apply_entry_inner(entry, twins, now).map_err(|e| match hub_error_code(&e) {
            HubErrorCode::PreconditionFailed => hub_error(
                HubErrorCode::EtagDoesNotMatch,
                format!("The etag of '{}' does not match the stored one.", entry_name(entry)),
            ),
            _ => e,
        })
    }

    fn apply_entry_inner(
        &self,
        entry: &ExportImportDevice,
        twins: &dyn TwinSink,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        let identity_tag = || match &entry.e_tag {
            Some(t) => Ok(IfMatch::Tag(t.bare().to_owned())),
            None => Err(hub_error(
                HubErrorCode::EtagDoesNotMatch,
                format!("'{}' has no eTag for an IfMatchETag import mode.", entry_name(entry)),
            )),
        };
        let twin_if_match = match &entry.twin_etag {
            Some(t) => IfMatch::Tag(t.bare().to_owned()),
            None => IfMatch::Any,
        };
        let mut events = Vec::new();
        match entry.mode() {
            mode @ (ImportMode::CreateOrUpdate | ImportMode::CreateOrUpdateIfMatchETag) => {
                if self.exists(entry)? {
                    let if_match =
                        if mode == ImportMode::CreateOrUpdate { IfMatch::Any } else { identity_tag()? };
                    check_twin_data(entry, twins, now)?;
                    self.update_from_entry(entry, &if_match, now)?;
                    self.twin_from_entry(entry, twins, &twin_if_match, now)?;
                } else {
                    events = self.create_with_twin(entry, twins, now)?;
                }
            }
            ImportMode::Create => events = self.create_with_twin(entry, twins, now)?,
            ImportMode::Update => {
                check_twin_data(entry, twins, now)?;
                self.update_from_entry(entry, &IfMatch::Any, now)?;
                self.twin_from_entry(entry, twins, &twin_if_match, now)?;
            }
            ImportMode::UpdateIfMatchETag => {
                let if_match = identity_tag()?;
                check_twin_data(entry, twins, now)?;
                self.update_from_entry(entry, &if_match, now)?;
                self.twin_from_entry(entry, twins, &twin_if_match, now)?;
            }
            ImportMode::Delete => events = self.delete_from_entry(entry, &IfMatch::Any, now)?,
            ImportMode::DeleteIfMatchETag => events = self.delete_from_entry(entry, &identity_tag()?, now)?,
            ImportMode::UpdateTwin => {
                self.require_exists(entry)?;
                self.twin_from_entry(entry, twins, &IfMatch::Any, now)?;
            }
            ImportMode::UpdateTwinIfMatchETag => {
                self.require_exists(entry)?;
                let Some(tag) = &entry.twin_etag else {
                    return Err(hub_error(
                        HubErrorCode::EtagDoesNotMatch,
                        format!("'{}' has no twinETag for updateTwinIfMatchETag.", entry_name(entry)),
                    ));
                };
                self.twin_from_entry(entry, twins, &IfMatch::Tag(tag.bare().to_owned()), now)?;
            }
            other => {
                return Err(hub_error(
                    HubErrorCode::ArgumentInvalid,
                    format!("Import mode {other} is not supported."),
                ))
            }
        }
        Ok(events)
    }

    fn exists(&self, entry: &ExportImportDevice) -> Result<bool, Error> {
        Ok(match &entry.module_id {
            None => self.store.device(&entry.id)?.is_some(),
            Some(m) => self.store.module(&entry.id, m)?.is_some(),
        })
    }

    fn require_exists(&self, entry: &ExportImportDevice) -> Result<(), Error> {
        match &entry.module_id {
            None => self.device(&entry.id).map(|_| ()),
            Some(m) => self.module(&entry.id, m).map(|_| ()),
        }
    }

    fn create_from_entry(
        &self,
        entry: &ExportImportDevice,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        match &entry.module_id {
            None => Ok(self.create_device(device_from_entry(entry), now)?.events),
            Some(m) => Ok(self.create_module(module_from_entry(entry, m), now)?.events),
        }
    }

    /// Creates the identity of `entry` with its twin data, or nothing: the twin data is checked
    /// before the identity is written, and should the twin write fail all the same (the store),
    /// the identity is taken back, so an entry reported as failed is not half-applied.
    fn create_with_twin(
        &self,
        entry: &ExportImportDevice,
        twins: &dyn TwinSink,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        check_twin_data(entry, twins, now)?;
        let events = self.create_from_entry(entry, now)?;
        // A new identity has a new twin: an exported twinETag from elsewhere cannot match it.
        if let Err(e) = self.twin_from_entry(entry, twins, &IfMatch::Any, now) {
            // Best effort: the entry fails with the twin's error whether or not this succeeds.
            let _ = self.delete_from_entry(entry, &IfMatch::Any, now);
            return Err(e);
        }
        Ok(events)
    }

    fn update_from_entry(
        &self,
        entry: &ExportImportDevice,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<(), Error> {
        match &entry.module_id {
            None => self.update_device(device_from_entry(entry), if_match, now).map(|_| ()),
            Some(m) => self.update_module(module_from_entry(entry, m), if_match).map(|_| ()),
        }
    }

    fn delete_from_entry(
        &self,
        entry: &ExportImportDevice,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<Vec<LifecycleEvent>, Error> {
        match &entry.module_id {
            None => Ok(self.delete_device(&entry.id, if_match, now)?.events),
            Some(m) => Ok(self.delete_module(&entry.id, m, if_match, now)?.events),
        }
    }

    fn twin_from_entry(
        &self,
        entry: &ExportImportDevice,
        twins: &dyn TwinSink,
        if_match: &IfMatch,
        now: Timestamp,
    ) -> Result<(), Error> {
        if !entry.has_twin_data() {
            return Ok(());
        }
        twins.update_twin(
            &entry.id,
            entry.module_id.as_ref(),
            entry.tags.as_ref(),
            entry.properties.as_ref(),
            if_match,
            now,
        )
    }
}

/// Device identity fields of an import line.
pub fn device_from_entry(entry: &ExportImportDevice) -> Device {
    let mut d = Device::new(entry.id.clone());
    d.status = entry.status.unwrap_or_default();
    d.status_reason = entry.status_reason.clone();
    d.authentication = entry.authentication.clone();
    d.capabilities = entry.capabilities;
    d.device_scope = entry.device_scope.clone();
    d.parent_scopes = entry.parent_scopes.clone().unwrap_or_default();
    d
}

/// Module identity fields of an import line.
pub fn module_from_entry(entry: &ExportImportDevice, module_id: &ModuleId) -> Module {
    let mut m = Module::new(entry.id.clone(), module_id.clone());
    m.authentication = entry.authentication.clone();
    m.managed_by = entry.managed_by.clone();
    m
}

/// The export line of a device (keys nulled when `exclude_keys`).
pub fn export_device_line(device: &Device, exclude_keys: bool) -> ExportImportDevice {
    let mut line = ExportImportDevice::new(device.device_id.clone(), None);
    line.e_tag = device.etag.clone();
    line.status = Some(device.status);
    line.status_reason = device.status_reason.clone();
    line.authentication = device.authentication.clone().map(|a| strip_keys(a, exclude_keys));
    line.capabilities = device.capabilities;
    line.device_scope = device.device_scope.clone();
    line.parent_scopes = Some(device.parent_scopes.clone());
    line
}

/// The export line of a module (keys nulled when `exclude_keys`).
pub fn export_module_line(module: &Module, exclude_keys: bool) -> ExportImportDevice {
    let mut line = ExportImportDevice::new(module.device_id.clone(), None);
    line.module_id = Some(module.module_id.clone());
    line.e_tag = module.etag.clone();
    line.authentication = module.authentication.clone().map(|a| strip_keys(a, exclude_keys));
    line.managed_by = module.managed_by.clone();
    line
}

fn strip_keys(mut auth: AuthenticationMechanism, exclude: bool) -> AuthenticationMechanism {
    if exclude {
        auth.symmetric_key = SymmetricKey::default();
    }
    auth
}

fn entry_name(entry: &ExportImportDevice) -> String {
    match &entry.module_id {
        Some(m) => format!("{}/{m}", entry.id),
        None => entry.id.to_string(),
    }
}

/// Checks an entry's twin data on its own (names, values, depth and sizes of what it carries)
/// before its identity is written, so that an entry refused for its twin data changes nothing.
/// What only the stored twin can tell (its etag, the size of the merged twin) is checked by the
/// twin write itself, after the identity.
fn check_twin_data(entry: &ExportImportDevice, twins: &dyn TwinSink, now: Timestamp) -> Result<(), Error> {
    if !entry.has_twin_data() {
        return Ok(());
    }
    twins.check_new_twin(
        &entry.id,
        entry.module_id.as_ref(),
        entry.tags.as_ref(),
        entry.properties.as_ref(),
        now,
    )
}
