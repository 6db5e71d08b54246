//! The hub side of provisioning: linked hubs and the typed actions the provisioner asks a
//! [`HubRegistry`] to carry out (create or update a device identity, set or reset its twin,
//! migrate it between hubs, remove it).

use serde::{Deserialize, Serialize};
use zerotouch_proto::service::InitialTwin;
use zerotouch_proto::{DeviceId, Text};

/// A hub linked to the provisioning service (spec §7.6, `IotHubDefinitionDescription`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    /// Host name, e.g. `hub1.azure-devices.net`.
    pub name: Text,
    /// Allocation weight, 1–1000 (default 1).
    #[serde(default = "default_weight")]
    pub allocation_weight: u32,
    /// Whether evenly-weighted / latency allocation may choose this hub (default true).
    #[serde(default = "default_true")]
    pub apply_allocation_policy: bool,
    /// Azure region or site label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

fn default_weight() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

impl LinkedHub {
    /// A hub with weight 1 that takes part in allocation.
    pub fn new(name: impl Into<Text>) -> Self {
        Self { name: name.into(), allocation_weight: 1, apply_allocation_policy: true, location: None }
    }

    /// The same hub with another allocation weight (clamped to 1–1000).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.allocation_weight = weight.clamp(1, 1000);
        self
    }
}

/// Credentials the hub identity gets (spec §8.4).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DeviceAuth {
    /// `sas` with base64 primary and secondary keys (individual keys, derived group keys, or the
    /// key delivered to a TPM).
    #[serde(rename = "sas", rename_all = "camelCase")]
    SymmetricKey {
        /// Base64 primary key.
        primary_key: String,
        /// Base64 secondary key.
        secondary_key: String,
    },
    /// `selfSigned` with upper-case hex SHA-1 thumbprints of the device certificates.
    #[serde(rename = "selfSigned", rename_all = "camelCase")]
    SelfSigned {
        /// Primary thumbprint.
        primary_thumbprint: String,
        /// Secondary thumbprint (may repeat the primary).
        secondary_thumbprint: String,
    },
    /// `certificateAuthority`: any certificate chaining to a verified CA.
    #[serde(rename = "certificateAuthority")]
    CertificateAuthority,
}

impl std::fmt::Debug for DeviceAuth {
    /// Never prints keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuth::SymmetricKey { .. } => f.write_str("SymmetricKey { <redacted> }"),
            DeviceAuth::SelfSigned { primary_thumbprint, secondary_thumbprint } => f
                .debug_struct("SelfSigned")
                .field("primary_thumbprint", primary_thumbprint)
                .field("secondary_thumbprint", secondary_thumbprint)
                .finish(),
            DeviceAuth::CertificateAuthority => f.write_str("CertificateAuthority"),
        }
    }
}

/// The identity to create or update in a hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionedDevice {
    /// Device id.
    pub device_id: DeviceId,
    /// Credentials.
    pub auth: DeviceAuth,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
}

/// What to do with the twin of a provisioned device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", content = "twin", rename_all = "camelCase")]
pub enum TwinSetup {
    /// Leave an existing twin as it is; a new device gets this initial twin.
    KeepOrInitial(InitialTwin),
    /// Replace tags and desired properties with this twin (reset to initial configuration).
    Reset(InitialTwin),
}

/// One thing the provisioner asks the hub side to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum HubAction {
    /// Create the identity on `hub`, or update its credentials and capabilities if it exists,
    /// and set up its twin.
    #[serde(rename_all = "camelCase")]
    Provision {
        /// Target hub host name.
        hub: Text,
        /// The identity.
        device: ProvisionedDevice,
        /// Twin handling.
        twin: TwinSetup,
    },
    /// Copy the twin (tags, desired, reported) of `from_device_id` on `from_hub` to a new
    /// identity on `to_hub`, then delete the old identity. When `from_hub` has no such identity
    /// (deleted there meanwhile), there is no data to migrate: the new identity gets
    /// `initial_twin`, as a new device would.
    #[serde(rename_all = "camelCase")]
    Migrate {
        /// Hub the device leaves.
        from_hub: Text,
        /// Device id on the old hub.
        from_device_id: DeviceId,
        /// Hub the device moves to.
        to_hub: Text,
        /// The identity on the new hub.
        device: ProvisionedDevice,
        /// The twin of the new identity when the old one is gone: the enrollment's initial twin
        /// (a custom allocation that returns a twin resets the device instead of migrating it).
        #[serde(default)]
        initial_twin: InitialTwin,
    },
    /// Delete the identity from a hub (the device moved away and its data was reset). An
    /// identity already gone (deleted in the hub meanwhile) counts as removed: hubs answer
    /// `Ok`, as DPS moves such a device on instead of failing it for good.
    #[serde(rename_all = "camelCase")]
    Remove {
        /// Hub host name.
        hub: Text,
        /// Device id.
        device_id: DeviceId,
    },
}

/// A hub refused an action. `code` is a six-digit IoT Hub code (for example `401002`,
/// `409001`); the message may be the hub's JSON as real DPS forwards it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hub error {code}: {message}")]
pub struct HubError {
    /// Six-digit code.
    pub code: u32,
    /// Message.
    pub message: String,
}

impl HubError {
    /// Whether the hub refused because its state changed concurrently (a `412xxx` code: an etag
    /// that no longer matches, or a conflict of the hub's database transaction). The provisioner
    /// then decides the registration again instead of failing it.
    pub fn is_conflict(&self) -> bool {
        self.code / 1000 == 412
    }
}

/// Carries out hub actions. The embedded hub implements it over the identity registry; a
/// connector to remote hubs implements it over their service API.
///
/// The same actions may be applied again within one registration, after the unit they were
/// applied in ended rolled back ([`HubRegistry::end_unit`] with `false`): the store runs its
/// unit again when its transaction conflicted with concurrent ones (see
/// [`crate::store::RegistrationStore::atomically`]), and the provisioner decides a round again
/// when a concurrent registration changed the record. A registry whose writes join the store's
/// unit (an embedded hub over the same database) has them undone before the repeat, and one
/// that only stages them until the unit commits ([`RecordingHub`]) drops them. Any other (a
/// remote hub, in-memory hubs beside a database store) gets the repeat on top of what it
/// applied: a repeated `Provision` finds the identity it made and leaves it so (a twin reset,
/// though, is applied again), and a repeated `Remove` or `Migrate` finds the old identity gone:
/// a `Remove` counts that as done, and a `Migrate` should keep an identity it finds on the new
/// hub (see [`crate::hub_engine::EmbeddedHub`] for what the embedded hub does).
pub trait HubRegistry {
    /// Applies one action. Called by the provisioner during the registration, so its result
    /// decides between `assigned` and `failed`.
    ///
    /// # Errors
    /// [`HubError`] when the hub refuses.
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError>;

    /// Applies the actions of one registration in order, stopping at the first refusal. A
    /// registry shared between threads takes its lock once for all of them (see the transport's
    /// `EngineService`), so a registration never waits for the registry halfway through its
    /// actions while its store transaction holds rows another registration waits for.
    ///
    /// # Errors
    /// The first [`HubError`].
    fn apply_all(&mut self, actions: &[HubAction]) -> Result<(), HubError> {
        actions.iter().try_for_each(|action| self.apply(action))
    }

    /// A store unit ([`crate::store::RegistrationStore::atomically`]) begins on this thread: what the
    /// following actions would announce (lifecycle events) waits for the unit's end, since the
    /// unit may still be rolled back and take the actions' writes with it. Units nest; every
    /// call is matched by one [`HubRegistry::end_unit`] on the same thread. A registry that
    /// announces nothing keeps the default, which does nothing; one that forwards to another
    /// registry forwards this too.
    fn begin_unit(&mut self) {}

    /// The innermost unit this thread began ended: `committed` tells whether its writes were
    /// kept. A committed unit's announcements go out (once, in order) when no outer unit is
    /// still open, or join the outer unit's; a rolled-back unit's are dropped, except those
    /// whose write did not join the unit (stores outside it, as an in-memory hub beside a
    /// database store: see `IdentityStore::in_open_unit`), since that write stands. After a
    /// rollback the same actions may be applied again, in a new unit (see the trait's doc).
    fn end_unit(&mut self, committed: bool) {
        let _ = committed;
    }
}

/// A unit of a [`HubRegistry`] that ends when dropped: begun by [`HubUnit::begin`], ended by
/// [`HubUnit::end`] with its outcome, or as rolled back when dropped without (an early return,
/// a panic inside the store's unit), so no unit is left open on a thread that runs more.
pub struct HubUnit<'a> {
    hub: &'a mut dyn HubRegistry,
    open: bool,
}

impl std::fmt::Debug for HubUnit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubUnit").field("open", &self.open).finish_non_exhaustive()
    }
}

impl<'a> HubUnit<'a> {
    /// Begins a unit on `hub` ([`HubRegistry::begin_unit`]).
    pub fn begin(hub: &'a mut dyn HubRegistry) -> Self {
        hub.begin_unit();
        Self { hub, open: true }
    }

    /// The registry, to apply the unit's actions.
    pub fn hub(&mut self) -> &mut dyn HubRegistry {
        &mut *self.hub
    }

    /// Ends the unit as rolled back and begins a new one, for a store unit that runs its work
    /// again after rolling it back (see [`crate::store::RegistrationStore::atomically`]): what
    /// the undone attempt staged is not announced, except writes that did not join the store's
    /// unit, which stand.
    pub fn restart(&mut self) {
        self.hub.end_unit(false);
        self.hub.begin_unit();
    }

    /// Ends the unit ([`HubRegistry::end_unit`]) as committed or rolled back.
    pub fn end(mut self, committed: bool) {
        self.open = false;
        self.hub.end_unit(committed);
    }
}

impl Drop for HubUnit<'_> {
    fn drop(&mut self) {
        if self.open {
            self.open = false;
            self.hub.end_unit(false);
        }
    }
}

/// A hub registry that records every action and accepts them all (for embedding without a hub:
/// the host carries out what [`RecordingHub::actions`] holds; and for tests that assert which
/// actions happened).
///
/// Actions applied inside a unit ([`HubRegistry::begin_unit`]) are recorded only when the unit
/// commits: a rolled-back unit's actions are dropped, so a store unit that runs again (see
/// [`crate::store::RegistrationStore::atomically`]) or a provisioner round that is decided
/// again leaves the actions of the run whose writes were kept, once.
#[derive(Debug, Default, Clone)]
pub struct RecordingHub {
    /// Every action applied outside units or in committed ones, in order.
    pub actions: Vec<HubAction>,
    /// The actions of the units open, outermost first.
    staged: Vec<Vec<HubAction>>,
}

impl HubRegistry for RecordingHub {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.staged.last_mut().unwrap_or(&mut self.actions).push(action.clone());
        Ok(())
    }

    /// Actions applied until the matching [`HubRegistry::end_unit`] wait for it.
    fn begin_unit(&mut self) {
        self.staged.push(Vec::new());
    }

    /// Records the unit's actions when it committed (or hands them to the outer unit); drops
    /// them when it was rolled back.
    fn end_unit(&mut self, committed: bool) {
        let Some(unit) = self.staged.pop() else { return };
        if committed {
            self.staged.last_mut().unwrap_or(&mut self.actions).extend(unit);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn remove(id: &str) -> HubAction {
        HubAction::Remove { hub: "hub.example".into(), device_id: DeviceId::new(id).unwrap() }
    }

    #[test]
    fn a_recording_hub_records_the_actions_of_committed_units_once_and_drops_rolled_back_ones() {
        let mut hub = RecordingHub::default();
        hub.apply(&remove("outside")).unwrap();
        hub.begin_unit();
        hub.apply(&remove("kept")).unwrap();
        // A nested unit joins its outer one when it commits, and is dropped when it does not.
        hub.begin_unit();
        hub.apply(&remove("inner-kept")).unwrap();
        hub.end_unit(true);
        hub.begin_unit();
        hub.apply(&remove("inner-undone")).unwrap();
        hub.end_unit(false);
        assert_eq!(hub.actions, [remove("outside")], "nothing before the outermost unit commits");
        hub.end_unit(true);
        assert_eq!(hub.actions, [remove("outside"), remove("kept"), remove("inner-kept")]);

        // A store unit that runs again: only the run that committed is recorded.
        let mut hub = RecordingHub::default();
        let mut unit = HubUnit::begin(&mut hub);
        unit.hub().apply(&remove("press-1")).unwrap();
        unit.restart();
        unit.hub().apply(&remove("press-1")).unwrap();
        unit.end(true);
        assert_eq!(hub.actions, [remove("press-1")]);

        // A unit dropped without an end was rolled back.
        let mut unit = HubUnit::begin(&mut hub);
        unit.hub().apply(&remove("undone")).unwrap();
        drop(unit);
        assert_eq!(hub.actions, [remove("press-1")]);
    }
}
