//! `SimHubs`: an in-memory set of IoT hubs that really carries out the provisioner's hub actions
//! (create / update identities, initial twin, reset, migrate with the twin, remove), so scenario
//! tests can assert where a device and its twin ended up.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubError, HubRegistry, ProvisionedDevice, TwinSetup};
use zerotouch_proto::service::InitialTwin;

/// A device identity with its twin sections, as a hub holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDevice {
    /// Credentials.
    pub auth: DeviceAuth,
    /// IoT Edge capability.
    pub iot_edge: bool,
    /// Twin tags.
    pub tags: Map<String, Value>,
    /// Desired properties.
    pub desired: Map<String, Value>,
    /// Reported properties.
    pub reported: Map<String, Value>,
}

/// Hubs by host name, devices by id.
#[derive(Debug, Default, Clone)]
pub struct SimHubs {
    hubs: BTreeMap<String, BTreeMap<String, SimDevice>>,
    /// Every action applied, in order.
    pub log: Vec<HubAction>,
    /// When set, every action fails with this error (to test hub failures).
    pub fail_with: Option<HubError>,
}

fn object(v: Option<&Value>) -> Map<String, Value> {
    v.and_then(Value::as_object).cloned().unwrap_or_default()
}

fn twin_parts(twin: &InitialTwin) -> (Map<String, Value>, Map<String, Value>) {
    (object(twin.tags.as_ref()), object(twin.properties.as_ref().and_then(|p| p.desired.as_ref())))
}

/// A `Provision` of `device_id` (certificate authentication) on `hub` whose initial twin
/// desires `mode`; with `reset`, the twin is reset to it (reprovisioning with reset), otherwise
/// kept when the device has one.
pub fn provision_desiring(hub: &str, device_id: &str, mode: &str, reset: bool) -> HubAction {
    let initial = InitialTwin {
        tags: None,
        properties: Some(zerotouch_proto::service::InitialTwinProperties {
            desired: Some(json!({ "mode": mode })),
        }),
    };
    HubAction::Provision {
        hub: hub.into(),
        device: ProvisionedDevice {
            device_id: zerotouch_proto::DeviceId::new(device_id).expect("a valid device id"),
            auth: DeviceAuth::CertificateAuthority,
            iot_edge: false,
        },
        twin: if reset { TwinSetup::Reset(initial) } else { TwinSetup::KeepOrInitial(initial) },
    }
}

impl SimHubs {
    /// No hubs, no devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device `device_id` on `hub`, if present.
    pub fn device(&self, hub: &str, device_id: &str) -> Option<&SimDevice> {
        self.hubs.get(&hub.to_ascii_lowercase()).and_then(|h| h.get(device_id))
    }

    /// Mutable access, e.g. to simulate the device reporting properties.
    pub fn device_mut(&mut self, hub: &str, device_id: &str) -> Option<&mut SimDevice> {
        self.hubs.get_mut(&hub.to_ascii_lowercase()).and_then(|h| h.get_mut(device_id))
    }

    /// Number of devices on `hub`.
    pub fn count(&self, hub: &str) -> usize {
        self.hubs.get(&hub.to_ascii_lowercase()).map_or(0, BTreeMap::len)
    }

    /// Which hubs hold `device_id`.
    pub fn hubs_of(&self, device_id: &str) -> Vec<String> {
        self.hubs.iter().filter(|(_, d)| d.contains_key(device_id)).map(|(h, _)| h.clone()).collect()
    }

    /// The twin of a device in the shape of `GET /twins/{id}` (tags and properties only).
    pub fn twin_json(&self, hub: &str, device_id: &str) -> Option<Value> {
        self.device(hub, device_id).map(
            |d| json!({ "tags": d.tags, "properties": { "desired": d.desired, "reported": d.reported } }),
        )
    }

    fn provision(&mut self, hub: &str, device: &ProvisionedDevice, twin: &TwinSetup) {
        let devices = self.hubs.entry(hub.to_ascii_lowercase()).or_default();
        let entry = devices.entry(device.device_id.to_string());
        match (entry, twin) {
            (std::collections::btree_map::Entry::Occupied(mut o), TwinSetup::KeepOrInitial(_)) => {
                let d = o.get_mut();
                d.auth = device.auth.clone();
                d.iot_edge = device.iot_edge;
            }
            (std::collections::btree_map::Entry::Occupied(mut o), TwinSetup::Reset(t)) => {
                let (tags, desired) = twin_parts(t);
                *o.get_mut() = SimDevice {
                    auth: device.auth.clone(),
                    iot_edge: device.iot_edge,
                    tags,
                    desired,
                    reported: Map::new(),
                };
            }
            (
                std::collections::btree_map::Entry::Vacant(v),
                TwinSetup::KeepOrInitial(t) | TwinSetup::Reset(t),
            ) => {
                let (tags, desired) = twin_parts(t);
                v.insert(SimDevice {
                    auth: device.auth.clone(),
                    iot_edge: device.iot_edge,
                    tags,
                    desired,
                    reported: Map::new(),
                });
            }
        }
    }
}

impl HubRegistry for SimHubs {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        if let Some(e) = &self.fail_with {
            return Err(e.clone());
        }
        self.log.push(action.clone());
        match action {
            HubAction::Provision { hub, device, twin } => self.provision(hub, device, twin),
            HubAction::Migrate { from_hub, from_device_id, to_hub, device, initial_twin } => {
                let old = self
                    .hubs
                    .get_mut(&from_hub.to_ascii_lowercase())
                    .and_then(|h| h.remove(from_device_id.as_str()));
                let there = self
                    .hubs
                    .get_mut(&to_hub.to_ascii_lowercase())
                    .and_then(|h| h.remove(device.device_id.as_str()));
                let moved = match old.or(there) {
                    Some(d) => SimDevice { auth: device.auth.clone(), iot_edge: device.iot_edge, ..d },
                    // Nothing to migrate, and nothing there yet (a migration applied again keeps
                    // what the first run moved): the initial configuration.
                    None => {
                        let (tags, desired) = twin_parts(initial_twin);
                        SimDevice {
                            auth: device.auth.clone(),
                            iot_edge: device.iot_edge,
                            tags,
                            desired,
                            reported: Map::new(),
                        }
                    }
                };
                self.hubs
                    .entry(to_hub.to_ascii_lowercase())
                    .or_default()
                    .insert(device.device_id.to_string(), moved);
            }
            HubAction::Remove { hub, device_id } => {
                if let Some(h) = self.hubs.get_mut(&hub.to_ascii_lowercase()) {
                    h.remove(device_id.as_str());
                }
            }
        }
        Ok(())
    }
}

/// A hub registry that carries out each action on `hub` and then refuses it, as many times as
/// `refusals` says, with `code`: a hub failing after its write. A `412…` code (a concurrent
/// change) makes the provisioner decide the round again, any other fails the registration; in
/// both cases the provisioner's store unit ends rolled back, which is what tests of unit
/// outcomes need. Units are forwarded to `hub`.
#[derive(Debug)]
pub struct RefuseAfterWrite<'a, H: HubRegistry + ?Sized> {
    /// The registry that writes.
    pub hub: &'a mut H,
    /// Refusals still to come.
    pub refusals: usize,
    /// The hub error code of each refusal.
    pub code: u32,
}

impl<H: HubRegistry + ?Sized> HubRegistry for RefuseAfterWrite<'_, H> {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        self.hub.apply(action)?;
        if self.refusals > 0 {
            self.refusals -= 1;
            return Err(HubError { code: self.code, message: "refused after the write".into() });
        }
        Ok(())
    }

    fn begin_unit(&mut self) {
        self.hub.begin_unit();
    }

    fn end_unit(&mut self, committed: bool) {
        self.hub.end_unit(committed);
    }
}
