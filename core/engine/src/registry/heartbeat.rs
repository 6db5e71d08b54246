//! Heartbeat tracking: a last-seen map with a deadline per device, as the heartbeat pattern of
//! hub spec §11 describes (the back end alerts when a device is overdue).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

/// A device (or module) that has been silent past its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissedHeartbeat {
    /// The device.
    pub device_id: DeviceId,
    /// The module, when modules are tracked.
    pub module_id: Option<ModuleId>,
    /// When it was last heard from.
    pub last_seen: Timestamp,
    /// When it became overdue.
    pub deadline: Timestamp,
}

type Key = (DeviceId, Option<ModuleId>);

/// Sans-I/O last-seen tracker.
///
/// Call order: [`record_activity`](Self::record_activity) whenever a message or connection
/// arrives; arm a timer for [`poll_timeout`](Self::poll_timeout); when it fires, call
/// [`handle_timeout`](Self::handle_timeout) and act on the returned events. A device is reported
/// once per silence: it is reported again only after new activity and a new overdue period.
#[derive(Debug, Clone)]
pub struct HeartbeatTracker {
    interval: Duration,
    last_seen: HashMap<Key, Timestamp>,
    deadlines: BTreeSet<(Timestamp, Key)>,
}

impl HeartbeatTracker {
    /// A tracker that reports devices silent for longer than `interval`.
    pub fn new(interval: Duration) -> Self {
        Self { interval, last_seen: HashMap::new(), deadlines: BTreeSet::new() }
    }

    /// The overdue interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records that the device (or module) was heard from at `now`. Out-of-order older
    /// timestamps are ignored.
    pub fn record_activity(&mut self, device_id: &DeviceId, module_id: Option<&ModuleId>, now: Timestamp) {
        let key = (device_id.clone(), module_id.cloned());
        if let Some(prev) = self.last_seen.get(&key).copied() {
            if prev > now {
                return;
            }
            self.deadlines.remove(&(prev + self.interval, key.clone()));
        }
        self.deadlines.insert((now + self.interval, key.clone()));
        self.last_seen.insert(key, now);
    }

    /// Stops tracking a device (for example after it was deleted).
    pub fn forget(&mut self, device_id: &DeviceId, module_id: Option<&ModuleId>) {
        let key = (device_id.clone(), module_id.cloned());
        if let Some(prev) = self.last_seen.remove(&key) {
            self.deadlines.remove(&(prev + self.interval, key));
        }
    }

    /// When it was last heard from, if tracked.
    pub fn last_seen(&self, device_id: &DeviceId, module_id: Option<&ModuleId>) -> Option<Timestamp> {
        self.last_seen.get(&(device_id.clone(), module_id.cloned())).copied()
    }

    /// The earliest pending deadline, if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Reports every device whose deadline is at or before `now`, oldest first.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Vec<MissedHeartbeat> {
        let mut missed = Vec::new();
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let Some((deadline, (device_id, module_id))) = self.deadlines.pop_first() else { break };
            let last_seen = deadline - self.interval;
            missed.push(MissedHeartbeat { device_id, module_id, last_seen, deadline });
        }
        missed
    }
}
