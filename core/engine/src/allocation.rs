//! Allocation of devices to linked hubs: hashed, geoLatency, static and custom policies (spec §8.1, §8.2).
//!
//! # Hashed allocation
//!
//! Real DPS does not document its hash (spec §11), so zerotouch uses weighted rendezvous hashing
//! (highest random weight): every candidate hub gets the score `w / -ln(u)`, where `w` is its
//! allocation weight and `u ∈ (0, 1)` is a hash of the lower-cased registration id and the
//! lower-cased hub name; the highest score wins. `-ln(u) / w` is exponentially distributed with
//! rate `w`, so a hub wins with probability `w / Σw`, and adding a hub only moves devices *to* the
//! new hub.
//!
//! Decisions must be identical on every run, machine and version, because a re-registering device
//! must land on the same hub. So the hash is written out here (FxHash-style word steps with the
//! murmur3 64-bit finalizer) instead of std's randomly seeded `DefaultHasher`, and `ln` is computed
//! from IEEE-754 `+ - * /` only (which are correctly rounded everywhere and never fused by rustc)
//! instead of the platform's libm, whose last bit may differ between systems (x87-only targets
//! such as i586, which round through 80-bit registers, are the exception). Changing either
//! reshuffles every device; `pinned_decisions_never_change` guards against that.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use zerotouch_proto::service::{
    AllocationPolicy, CustomAllocationRequest, CustomAllocationResponse, DeviceRuntimeContext, InitialTwin,
};
use zerotouch_proto::{RegistrationId, Text};

use crate::error::AllocationError;
use crate::hub::LinkedHub;

/// Seeds keep an id and a hub name with the same spelling from hashing to the same value.
const ID_SEED: u64 = 0x243f_6a88_85a3_08d3;
const HUB_SEED: u64 = 0x1319_8a2e_0370_7344;
/// FxHash's multiplier (2^64 / golden ratio, odd).
const WORD_MUL: u64 = 0x517c_c1b7_2722_0a95;

/// murmur3's 64-bit finalizer: every input bit flips each output bit with probability ~1/2.
#[inline]
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Lower-cases the ASCII letters among the eight bytes of `word` at once (same result as
/// `u8::to_ascii_lowercase` on each byte; bytes ≥ 0x80 are left alone).
#[inline]
fn ascii_lowercase_word(word: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let low7 = word & LOW7;
    // Per byte, adding to a 7-bit value cannot carry into the next byte: the high bit of each
    // sum says whether the byte is ≥ 'A', respectively > 'Z'.
    let at_least_a = low7 + ONES * u64::from(0x80 - b'A');
    let above_z = low7 + ONES * u64::from(0x80 - b'Z' - 1);
    let upper = at_least_a & !above_z & !word & HIGH;
    word | (upper >> 2)
}

/// Hashes the ASCII-lower-cased bytes of `s` eight at a time, without allocating.
#[inline]
fn hash_lowercase(s: &str, seed: u64) -> u64 {
    let bytes = s.as_bytes();
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(WORD_MUL);
    let mut step = |word: [u8; 8]| {
        let word = ascii_lowercase_word(u64::from_le_bytes(word));
        h = (h.rotate_left(5) ^ word).wrapping_mul(WORD_MUL);
    };
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        step(word);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        step(word);
    }
    fmix64(h)
}

/// `-ln(u)` for `u ∈ (0, 1)`, from basic IEEE operations only, so it is bit-identical on every
/// platform (libm's `ln` is not guaranteed to be). Relative error is below 1e-13.
#[inline]
fn neg_ln_unit(u: f64) -> f64 {
    let bits = u.to_bits();
    // `u` is a normal number in [2^-53, 1), so the biased exponent is in range and non-zero.
    let mut exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2·atanh(s) with s = (m-1)/(m+1), |s| ≤ 0.172: the odd series converges fast.
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s2 = s * s;
    let tail = 1.0 / 3.0
        + s2 * (1.0 / 5.0
            + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0 + s2 / 15.0)))));
    let ln_mantissa = 2.0 * s * (1.0 + s2 * tail);
    -(f64::from(exponent) * std::f64::consts::LN_2 + ln_mantissa)
}

/// The rendezvous score of one hub for one id; the highest score wins.
#[inline]
fn score(id_hash: u64, hub_hash: u64, weight: u32) -> f64 {
    let x = fmix64(id_hash ^ hub_hash);
    // 52 bits plus one half keep u strictly inside (0, 1), so -ln(u) is finite and positive.
    let u = ((x >> 12) as f64 + 0.5) * (1.0 / 4_503_599_627_370_496.0);
    f64::from(weight.clamp(1, 1000)) / neg_ln_unit(u)
}

#[inline]
fn id_hash(registration_id: &RegistrationId) -> u64 {
    hash_lowercase(registration_id.as_str(), ID_SEED)
}

#[inline]
fn hub_hash(name: &str) -> u64 {
    hash_lowercase(name, HUB_SEED)
}

/// The item with the highest score; the first one wins exact ties.
#[inline]
fn best<T>(items: impl Iterator<Item = (T, f64)>) -> Option<T> {
    let mut best: Option<(T, f64)> = None;
    for (item, s) in items {
        if best.as_ref().is_none_or(|(_, top)| s > *top) {
            best = Some((item, s));
        }
    }
    best.map(|(item, _)| item)
}

/// Weighted rendezvous hashing: the hub `registration_id` belongs to among `hubs`, or `None` when
/// `hubs` is empty.
///
/// Every hub given takes part, whatever its `apply_allocation_policy` (callers filter first, as
/// [`Allocator`] does). The registration id and hub names are compared case-insensitively. Hub
/// names are hashed on every call; build a [`HashedPool`] to hash them once.
pub fn hashed<'h>(registration_id: &RegistrationId, hubs: &[&'h LinkedHub]) -> Option<&'h LinkedHub> {
    let id = id_hash(registration_id);
    best(hubs.iter().map(|hub| (*hub, score(id, hub_hash(&hub.name), hub.allocation_weight))))
}

/// A fixed set of hubs with their names hashed once, for fast repeated [`hashed`] decisions.
#[derive(Debug, Clone)]
pub struct HashedPool<'h> {
    hubs: Vec<(&'h LinkedHub, u64)>,
}

impl<'h> HashedPool<'h> {
    /// A pool over `hubs`; like [`hashed`], it does not look at `apply_allocation_policy`.
    pub fn new(hubs: &[&'h LinkedHub]) -> Self {
        Self { hubs: hubs.iter().map(|hub| (*hub, hub_hash(&hub.name))).collect() }
    }

    /// The hub `registration_id` belongs to: always the same as [`hashed`] over the same hubs.
    pub fn pick(&self, registration_id: &RegistrationId) -> Option<&'h LinkedHub> {
        let id = id_hash(registration_id);
        best(self.hubs.iter().map(|(hub, h)| (*hub, score(id, *h, hub.allocation_weight))))
    }

    /// Number of hubs in the pool.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    /// Whether the pool has no hub (then [`HashedPool::pick`] returns `None`).
    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }
}

impl<'h> FromIterator<&'h LinkedHub> for HashedPool<'h> {
    fn from_iter<I: IntoIterator<Item = &'h LinkedHub>>(iter: I) -> Self {
        Self { hubs: iter.into_iter().map(|hub| (hub, hub_hash(&hub.name))).collect() }
    }
}

/// Measured latency from this service to each hub, for geoLatency allocation. Hub names are
/// matched case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyTable {
    // A short list: at most 50 linked hubs, and a linear case-insensitive scan needs no allocation.
    entries: Vec<(String, Duration)>,
}

impl LatencyTable {
    /// An empty table (geoLatency then behaves like hashed).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the latency to `hub`, replacing an earlier measurement.
    pub fn insert(&mut self, hub: impl Into<String>, latency: Duration) {
        let hub = hub.into();
        match self.entries.iter_mut().find(|(name, _)| name.eq_ignore_ascii_case(&hub)) {
            Some(entry) => entry.1 = latency,
            None => self.entries.push((hub, latency)),
        }
    }

    /// The latency measured to `hub`, if any.
    pub fn get(&self, hub: &str) -> Option<Duration> {
        self.entries.iter().find(|(name, _)| name.eq_ignore_ascii_case(hub)).map(|(_, latency)| *latency)
    }

    /// Number of hubs with a measurement.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no hub has a measurement.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<S: Into<String>> FromIterator<(S, Duration)> for LatencyTable {
    fn from_iter<I: IntoIterator<Item = (S, Duration)>>(iter: I) -> Self {
        let mut table = Self::new();
        for (hub, latency) in iter {
            table.insert(hub, latency);
        }
        table
    }
}

/// geoLatency: the hub with the lowest measured latency among `hubs`; hubs without a measurement
/// are passed over, ties are broken by [`hashed`] among the tied hubs, and without any measurement
/// this is [`hashed`] over all of `hubs`. `None` when `hubs` is empty.
pub fn geo_latency<'h>(
    registration_id: &RegistrationId,
    hubs: &[&'h LinkedHub],
    latency: &LatencyTable,
) -> Option<&'h LinkedHub> {
    let id = id_hash(registration_id);
    pick_geo(id, hubs.iter().map(|hub| (*hub, hub_hash(&hub.name), latency.get(&hub.name))))
}

/// geoLatency over `(hub, name hash, latency)` triples; the iterator is walked twice so that no
/// list of tied hubs has to be allocated.
fn pick_geo<'h, I>(id: u64, hubs: I) -> Option<&'h LinkedHub>
where
    I: Iterator<Item = (&'h LinkedHub, u64, Option<Duration>)> + Clone,
{
    let lowest = hubs.clone().filter_map(|(_, _, latency)| latency).min();
    best(
        hubs.filter(|(_, _, latency)| lowest.is_none() || *latency == lowest)
            .map(|(hub, h, _)| (hub, score(id, h, hub.allocation_weight))),
    )
}

/// A custom allocation function: the in-process counterpart of the DPS webhook (spec §8.2).
///
/// It receives exactly what the webhook body carries (`individualEnrollment` or `enrollmentGroup`,
/// `deviceRuntimeContext`, `linkedHubs`) and answers like the webhook: a hub that must be one of
/// `linked_hubs`, and optionally an initial twin (overriding the enrollment's) and a payload
/// returned to the device. A webhook client implements this trait over HTTP.
pub trait CustomAllocator: Send + Sync {
    /// Chooses the hub for one registration.
    ///
    /// # Errors
    /// A message when the device must not be assigned; the registration then fails with it.
    fn allocate(&self, request: &CustomAllocationRequest) -> Result<CustomAllocationResponse, String>;
}

impl<F> CustomAllocator for F
where
    F: Fn(&CustomAllocationRequest) -> Result<CustomAllocationResponse, String> + Send + Sync,
{
    fn allocate(&self, request: &CustomAllocationRequest) -> Result<CustomAllocationResponse, String> {
        self(request)
    }
}

/// What the provisioner knows about one registration when it asks for a hub.
#[derive(Debug, Clone)]
pub struct AllocationRequest<'a> {
    /// The device's registration id (any case).
    pub registration_id: &'a RegistrationId,
    /// The enrollment's `allocationPolicy` (absent: the service default).
    pub policy: Option<AllocationPolicy>,
    /// The enrollment's `iotHubs`.
    pub iot_hubs: Option<&'a [String]>,
    /// The enrollment's legacy `iotHubHostName`.
    pub iot_hub_host_name: Option<&'a str>,
    /// The webhook context, built by the caller when the effective policy is custom, with
    /// `linked_hubs` left empty: the allocator fills it with the candidates. When absent, a context
    /// holding only the registration id is sent. Boxed: the context holds whole enrollments, and
    /// every request (custom or not) is moved around.
    pub custom_request: Option<Box<CustomAllocationRequest>>,
}

/// The hub chosen for a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationDecision {
    /// Host name of the hub, spelled as the linked hub is.
    pub hub: Text,
    /// Initial twin from a custom allocator, overriding the enrollment's.
    pub initial_twin: Option<InitialTwin>,
    /// Payload from a custom allocator, returned to the device in `registrationState.payload`.
    pub payload: Option<serde_json::Value>,
}

impl AllocationDecision {
    fn hub(hub: &LinkedHub) -> Self {
        Self { hub: hub.name.clone(), initial_twin: None, payload: None }
    }
}

/// Indices into [`Allocator::hubs`] of an enrollment's candidates; "all linked hubs", the common
/// case, needs no list.
enum Candidates {
    All(usize),
    Named(Vec<usize>),
}

impl Candidates {
    fn len(&self) -> usize {
        match self {
            Candidates::All(n) => *n,
            Candidates::Named(list) => list.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = usize> + Clone + '_ {
        let (all, named): (usize, &[usize]) = match self {
            Candidates::All(n) => (*n, &[]),
            Candidates::Named(list) => (0, list),
        };
        (0..all).chain(named.iter().copied())
    }
}

/// Chooses hubs for registrations from the linked hubs, the service's default policy, latency
/// measurements and an optional custom allocator.
#[derive(Clone)]
pub struct Allocator {
    hubs: Vec<LinkedHub>,
    /// Hash of each hub's name, parallel to `hubs`.
    hub_hashes: Vec<u64>,
    /// Latency to each hub, parallel to `hubs`.
    hub_latencies: Vec<Option<Duration>>,
    latency: LatencyTable,
    default_policy: AllocationPolicy,
    custom: Option<Arc<dyn CustomAllocator>>,
}

impl fmt::Debug for Allocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocator")
            .field("hubs", &self.hubs)
            .field("latency", &self.latency)
            .field("default_policy", &self.default_policy)
            .field("custom", &self.custom.as_ref().map(|_| "<custom allocator>"))
            .finish()
    }
}

impl Allocator {
    /// An allocator over the linked hubs, with the default policy hashed, no latency data and no
    /// custom allocator.
    pub fn new(hubs: Vec<LinkedHub>) -> Self {
        let hub_hashes = hubs.iter().map(|hub| hub_hash(&hub.name)).collect();
        let hub_latencies = vec![None; hubs.len()];
        Self {
            hubs,
            hub_hashes,
            hub_latencies,
            latency: LatencyTable::new(),
            default_policy: AllocationPolicy::Hashed,
            custom: None,
        }
    }

    /// The service's default policy for enrollments that set none. Custom cannot be a default
    /// (spec §7.6), so it leaves the default unchanged.
    pub fn with_default_policy(mut self, policy: AllocationPolicy) -> Self {
        if policy != AllocationPolicy::Custom {
            self.default_policy = policy;
        }
        self
    }

    /// Latency measurements for geoLatency allocation.
    pub fn with_latency(mut self, latency: LatencyTable) -> Self {
        self.hub_latencies = self.hubs.iter().map(|hub| latency.get(&hub.name)).collect();
        self.latency = latency;
        self
    }

    /// The allocator that custom-policy enrollments use.
    pub fn with_custom(mut self, allocator: Arc<dyn CustomAllocator>) -> Self {
        self.custom = Some(allocator);
        self
    }

    /// The linked hubs.
    pub fn hubs(&self) -> &[LinkedHub] {
        &self.hubs
    }

    /// Whether `hub` is one of the linked hubs (host names compare case-insensitively). With
    /// no hubs listed, every hub counts as linked: nothing says otherwise.
    pub fn is_linked(&self, hub: &str) -> bool {
        self.hubs.is_empty() || self.hubs.iter().any(|h| h.name.eq_ignore_ascii_case(hub))
    }

    /// The latency measurements.
    pub fn latency(&self) -> &LatencyTable {
        &self.latency
    }

    /// The service's default policy.
    pub fn default_policy(&self) -> AllocationPolicy {
        self.default_policy
    }

    /// The policy that applies to an enrollment: its own, else the service default.
    pub fn effective_policy(&self, enrollment_policy: Option<AllocationPolicy>) -> AllocationPolicy {
        enrollment_policy.unwrap_or(self.default_policy)
    }

    /// The hubs an enrollment may be assigned to: its `iotHubs` if non-empty, else its legacy
    /// `iotHubHostName`, else every linked hub. Names match linked hubs case-insensitively and a
    /// hub named twice counts once. Hubs with `apply_allocation_policy == false` are kept here
    /// (static allocation, and custom allocation when the enrollment names them, may use them).
    ///
    /// # Errors
    /// [`AllocationError::UnknownHub`] when the enrollment names a hub that is not linked.
    pub fn candidates(
        &self,
        iot_hubs: Option<&[String]>,
        legacy_host_name: Option<&str>,
    ) -> Result<Vec<&LinkedHub>, AllocationError> {
        Ok(self.candidate_indices(iot_hubs, legacy_host_name)?.iter().map(|i| &self.hubs[i]).collect())
    }

    fn candidate_indices(
        &self,
        iot_hubs: Option<&[String]>,
        legacy_host_name: Option<&str>,
    ) -> Result<Candidates, AllocationError> {
        let named: &[String] = match (iot_hubs, legacy_host_name) {
            (Some(list), _) if !list.is_empty() => list,
            (_, Some(host)) if !host.is_empty() => return Ok(Candidates::Named(vec![self.index_of(host)?])),
            _ => return Ok(Candidates::All(self.hubs.len())),
        };
        let mut indices = Vec::with_capacity(named.len());
        for name in named {
            let index = self.index_of(name)?;
            if !indices.contains(&index) {
                indices.push(index);
            }
        }
        Ok(Candidates::Named(indices))
    }

    fn index_of(&self, name: &str) -> Result<usize, AllocationError> {
        self.hubs
            .iter()
            .position(|hub| hub.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| AllocationError::UnknownHub(name.to_owned()))
    }

    /// Chooses the hub for one registration (spec §8.1, §8.2).
    ///
    /// - hashed: weighted rendezvous hash over the candidates that apply allocation policies;
    /// - geoLatency: the lowest measured latency among them, ties and missing data hashed;
    /// - static: the single candidate, even one that does not apply allocation policies;
    /// - custom: the custom allocator's choice among the candidates it is offered as the
    ///   webhook's `linkedHubs`: the hubs the enrollment names, else those that apply allocation
    ///   policies.
    ///
    /// # Errors
    /// - [`AllocationError::UnknownHub`]: the enrollment names a hub that is not linked;
    /// - [`AllocationError::NoHub`]: no candidate is left for hashed, geoLatency or custom;
    /// - [`AllocationError::StaticNeedsOneHub`]: static with zero or several candidates;
    /// - [`AllocationError::NoCustomAllocator`]: custom without an installed allocator;
    /// - [`AllocationError::Custom`]: the custom allocator failed or chose a hub outside the
    ///   candidates.
    pub fn allocate(&self, request: AllocationRequest<'_>) -> Result<AllocationDecision, AllocationError> {
        let candidates = self.candidate_indices(request.iot_hubs, request.iot_hub_host_name)?;
        let id = id_hash(request.registration_id);
        let participating = || candidates.iter().filter(|&i| self.hubs[i].apply_allocation_policy);
        match self.effective_policy(request.policy) {
            AllocationPolicy::Static => match (candidates.len(), candidates.iter().next()) {
                (1, Some(only)) => Ok(AllocationDecision::hub(&self.hubs[only])),
                (n, _) => Err(AllocationError::StaticNeedsOneHub(n)),
            },
            AllocationPolicy::Custom => self.allocate_custom(request, &candidates),
            AllocationPolicy::GeoLatency => pick_geo(
                id,
                participating().map(|i| (&self.hubs[i], self.hub_hashes[i], self.hub_latencies[i])),
            )
            .map(AllocationDecision::hub)
            .ok_or(AllocationError::NoHub),
            // Hashed, and any policy a later protocol version adds, spread devices by weight.
            _ => best(participating().map(|i| {
                let hub = &self.hubs[i];
                (hub, score(id, self.hub_hashes[i], hub.allocation_weight))
            }))
            .map(AllocationDecision::hub)
            .ok_or(AllocationError::NoHub),
        }
    }

    fn allocate_custom(
        &self,
        request: AllocationRequest<'_>,
        candidates: &Candidates,
    ) -> Result<AllocationDecision, AllocationError> {
        let allocator = self.custom.as_ref().ok_or(AllocationError::NoCustomAllocator)?;
        // The webhook's `linkedHubs` are the enrollment's candidates (spec §8.2): the hubs it
        // names, opted out of allocation or not (§7.6), else the linked hubs that apply
        // allocation policies (§8.1).
        let offered: Vec<usize> = match candidates {
            Candidates::Named(named) => named.clone(),
            Candidates::All(_) => {
                candidates.iter().filter(|&i| self.hubs[i].apply_allocation_policy).collect()
            }
        };
        if offered.is_empty() {
            return Err(AllocationError::NoHub);
        }
        let mut custom = request.custom_request.map(|c| *c).unwrap_or_else(|| CustomAllocationRequest {
            individual_enrollment: None,
            enrollment_group: None,
            device_runtime_context: DeviceRuntimeContext {
                registration_id: request.registration_id.as_str().to_owned(),
                ..DeviceRuntimeContext::default()
            },
            linked_hubs: Vec::new(),
        });
        custom.linked_hubs = offered.iter().map(|&i| self.hubs[i].name.to_string()).collect();
        let response = allocator.allocate(&custom).map_err(AllocationError::Custom)?;
        let chosen = offered
            .iter()
            .map(|&i| &self.hubs[i])
            .find(|hub| hub.name.eq_ignore_ascii_case(&response.iot_hub_host_name))
            .ok_or_else(|| {
                AllocationError::Custom(format!(
                    "the custom allocator chose hub {:?}, which is not one of linkedHubs {:?}",
                    response.iot_hub_host_name, custom.linked_hubs
                ))
            })?;
        Ok(AllocationDecision {
            hub: chosen.name.clone(),
            initial_twin: response.initial_twin,
            payload: response.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;
    use zerotouch_proto::service::InitialTwinProperties;

    use super::*;

    fn id(s: &str) -> RegistrationId {
        RegistrationId::new(s).unwrap()
    }

    fn three_hubs() -> Vec<LinkedHub> {
        vec![
            LinkedHub::new("hub-a.azure-devices.net"),
            LinkedHub::new("hub-b.azure-devices.net"),
            LinkedHub::new("hub-c.azure-devices.net"),
        ]
    }

    fn request(registration_id: &RegistrationId) -> AllocationRequest<'_> {
        AllocationRequest {
            registration_id,
            policy: None,
            iot_hubs: None,
            iot_hub_host_name: None,
            custom_request: None,
        }
    }

    fn opted_out(name: &str) -> LinkedHub {
        LinkedHub { apply_allocation_policy: false, ..LinkedHub::new(name) }
    }

    fn hub_of(allocator: &Allocator, req: AllocationRequest<'_>) -> String {
        allocator.allocate(req).unwrap().hub.into()
    }

    #[test]
    fn pinned_decisions_never_change() {
        // Changing the hash or the score reassigns every device on upgrade: these must not move.
        let hubs = three_hubs();
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let picks: Vec<&str> = ["dev-1", "dev-2", "dev-3", "sensor-0042", "x509-device", "tpm-abc"]
            .iter()
            .map(|s| hashed(&id(s), &refs).unwrap().name.as_str())
            .collect();
        assert_eq!(
            picks,
            [
                "hub-b.azure-devices.net",
                "hub-a.azure-devices.net",
                "hub-a.azure-devices.net",
                "hub-b.azure-devices.net",
                "hub-b.azure-devices.net",
                "hub-c.azure-devices.net",
            ]
        );
        assert_eq!(hash_lowercase("dev-1", ID_SEED), 1_898_848_933_245_525_580);
        assert_eq!(hash_lowercase("DEV-1", ID_SEED), 1_898_848_933_245_525_580);
        // Bit-exact, so a platform whose float arithmetic differs is caught here.
        let s = score(id_hash(&id("dev-1")), hub_hash("hub-a.azure-devices.net"), 3);
        assert_eq!(s.to_bits(), 4_609_227_493_965_855_771);
    }

    #[test]
    fn word_lower_casing_matches_byte_lower_casing() {
        for byte in 0..=255u8 {
            for position in 0..8 {
                let mut bytes = *b"aZ-9.q_M";
                bytes[position] = byte;
                let expected = bytes.map(|b| b.to_ascii_lowercase());
                assert_eq!(ascii_lowercase_word(u64::from_le_bytes(bytes)).to_le_bytes(), expected);
            }
        }
    }

    #[test]
    fn neg_ln_matches_std_ln_closely() {
        for u in [
            1e-16,
            2.0f64.powi(-53),
            0.001,
            0.25,
            0.5,
            std::f64::consts::FRAC_1_SQRT_2,
            0.75,
            0.999,
            1.0 - 2.0f64.powi(-52),
        ] {
            let ours = neg_ln_unit(u);
            let std = -u.ln();
            assert!(ours > 0.0);
            assert!(((ours - std) / std).abs() < 1e-12, "u={u}: {ours} vs {std}");
        }
    }

    #[test]
    fn hashed_enrollment_always_gets_the_same_hub_for_the_same_device() {
        let allocator = Allocator::new(three_hubs());
        for n in 0..200 {
            let rid = id(&format!("device-{n}"));
            let first = hub_of(&allocator, request(&rid));
            assert_eq!(hub_of(&allocator, request(&rid)), first);
            assert!(allocator.hubs().iter().any(|hub| hub.name == first));
        }
    }

    #[test]
    fn device_registering_with_upper_case_id_lands_on_the_same_hub() {
        let allocator = Allocator::new(three_hubs());
        for n in 0..100 {
            let lower = id(&format!("sensor-{n}-abc"));
            let upper = id(&format!("SENSOR-{n}-ABC"));
            assert_eq!(hub_of(&allocator, request(&lower)), hub_of(&allocator, request(&upper)));
        }
    }

    #[test]
    fn hub_name_case_does_not_change_the_hashed_hub() {
        let lower = three_hubs();
        let upper: Vec<LinkedHub> =
            lower.iter().map(|hub| LinkedHub::new(hub.name.to_ascii_uppercase())).collect();
        let lower_refs: Vec<&LinkedHub> = lower.iter().collect();
        let upper_refs: Vec<&LinkedHub> = upper.iter().collect();
        for n in 0..100 {
            let rid = id(&format!("d{n}"));
            let a = hashed(&rid, &lower_refs).unwrap();
            let b = hashed(&rid, &upper_refs).unwrap();
            assert!(a.name.eq_ignore_ascii_case(&b.name));
        }
    }

    #[test]
    fn hashed_pool_agrees_with_hashed() {
        let hubs = [
            LinkedHub::new("a.azure-devices.net").with_weight(1),
            LinkedHub::new("b.azure-devices.net").with_weight(2),
            LinkedHub::new("c.azure-devices.net").with_weight(3),
        ];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let pool = HashedPool::new(&refs);
        assert_eq!(pool.len(), 3);
        let collected: HashedPool<'_> = hubs.iter().collect();
        for n in 0..500 {
            let rid = id(&format!("dev-{n}"));
            let expected = hashed(&rid, &refs).map(|hub| &hub.name);
            assert_eq!(pool.pick(&rid).map(|hub| &hub.name), expected);
            assert_eq!(collected.pick(&rid).map(|hub| &hub.name), expected);
        }
        assert!(HashedPool::new(&[]).pick(&id("dev")).is_none());
        assert!(HashedPool::new(&[]).is_empty());
    }

    #[test]
    fn heavier_hub_receives_more_devices() {
        let allocator = Allocator::new(vec![
            LinkedHub::new("light.azure-devices.net").with_weight(1),
            LinkedHub::new("heavy.azure-devices.net").with_weight(9),
        ]);
        let heavy = (0..2000)
            .filter(|n| {
                let rid = id(&format!("dev-{n}"));
                hub_of(&allocator, request(&rid)) == "heavy.azure-devices.net"
            })
            .count();
        // Expected 1800 of 2000 (σ ≈ 13).
        assert!((1700..=1900).contains(&heavy), "heavy got {heavy}");
    }

    #[test]
    fn hashed_allocation_never_picks_a_hub_that_opted_out() {
        let allocator =
            Allocator::new(vec![LinkedHub::new("in.azure-devices.net"), opted_out("out.azure-devices.net")]);
        for n in 0..200 {
            let rid = id(&format!("dev-{n}"));
            assert_eq!(hub_of(&allocator, request(&rid)), "in.azure-devices.net");
        }
    }

    #[test]
    fn hashed_allocation_fails_when_every_candidate_opted_out() {
        let allocator = Allocator::new(vec![opted_out("out.azure-devices.net")]);
        let rid = id("dev-1");
        assert_eq!(allocator.allocate(request(&rid)), Err(AllocationError::NoHub));
    }

    #[test]
    fn service_without_linked_hubs_cannot_allocate() {
        let allocator = Allocator::new(Vec::new());
        let rid = id("dev-1");
        assert_eq!(allocator.allocate(request(&rid)), Err(AllocationError::NoHub));
        let geo = AllocationRequest { policy: Some(AllocationPolicy::GeoLatency), ..request(&rid) };
        assert_eq!(allocator.allocate(geo), Err(AllocationError::NoHub));
    }

    #[test]
    fn enrollment_hub_list_restricts_where_devices_go() {
        let allocator = Allocator::new(three_hubs());
        let list = vec!["hub-b.azure-devices.net".to_owned(), "HUB-C.azure-devices.net".to_owned()];
        for n in 0..200 {
            let rid = id(&format!("dev-{n}"));
            let hub = hub_of(&allocator, AllocationRequest { iot_hubs: Some(&list), ..request(&rid) });
            assert!(hub == "hub-b.azure-devices.net" || hub == "hub-c.azure-devices.net", "{hub}");
        }
    }

    #[test]
    fn enrollment_naming_an_unlinked_hub_is_refused() {
        let allocator = Allocator::new(three_hubs());
        let list = vec!["hub-a.azure-devices.net".to_owned(), "elsewhere.azure-devices.net".to_owned()];
        let rid = id("dev-1");
        assert_eq!(
            allocator.allocate(AllocationRequest { iot_hubs: Some(&list), ..request(&rid) }),
            Err(AllocationError::UnknownHub("elsewhere.azure-devices.net".into()))
        );
        assert_eq!(
            allocator.candidates(None, Some("elsewhere.azure-devices.net")),
            Err(AllocationError::UnknownHub("elsewhere.azure-devices.net".into()))
        );
    }

    #[test]
    fn legacy_iot_hub_host_name_acts_as_a_one_hub_list() {
        let allocator = Allocator::new(three_hubs());
        let candidates = allocator.candidates(None, Some("Hub-B.Azure-Devices.net")).unwrap();
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].name, "hub-b.azure-devices.net");
        for n in 0..50 {
            let rid = id(&format!("dev-{n}"));
            let req =
                AllocationRequest { iot_hub_host_name: Some("hub-b.azure-devices.net"), ..request(&rid) };
            assert_eq!(hub_of(&allocator, req), "hub-b.azure-devices.net");
        }
    }

    #[test]
    fn enrollment_hub_list_wins_over_legacy_host_name() {
        let allocator = Allocator::new(three_hubs());
        let list = vec!["hub-c.azure-devices.net".to_owned()];
        let candidates = allocator.candidates(Some(&list), Some("hub-a.azure-devices.net")).unwrap();
        assert_eq!(
            candidates.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["hub-c.azure-devices.net"]
        );
    }

    #[test]
    fn empty_enrollment_hub_list_means_every_linked_hub() {
        let allocator = Allocator::new(three_hubs());
        let empty: Vec<String> = Vec::new();
        assert_eq!(allocator.candidates(Some(&empty), None).unwrap().len(), 3);
        assert_eq!(allocator.candidates(None, None).unwrap().len(), 3);
        assert_eq!(allocator.candidates(None, Some("")).unwrap().len(), 3);
        let legacy = allocator.candidates(Some(&empty), Some("hub-a.azure-devices.net")).unwrap();
        assert_eq!(legacy.len(), 1);
    }

    #[test]
    fn hub_named_twice_on_an_enrollment_counts_once() {
        let allocator = Allocator::new(three_hubs());
        let list = vec!["hub-a.azure-devices.net".to_owned(), "HUB-A.azure-devices.net".to_owned()];
        assert_eq!(allocator.candidates(Some(&list), None).unwrap().len(), 1);
        let rid = id("dev-1");
        let req = AllocationRequest {
            policy: Some(AllocationPolicy::Static),
            iot_hubs: Some(&list),
            ..request(&rid)
        };
        assert_eq!(hub_of(&allocator, req), "hub-a.azure-devices.net");
    }

    #[test]
    fn opted_out_hubs_are_still_candidates_for_static_and_custom() {
        let allocator =
            Allocator::new(vec![LinkedHub::new("in.azure-devices.net"), opted_out("out.azure-devices.net")]);
        assert_eq!(allocator.candidates(None, None).unwrap().len(), 2);
    }

    #[test]
    fn static_enrollment_gets_its_single_hub_even_if_it_opted_out() {
        let allocator =
            Allocator::new(vec![LinkedHub::new("in.azure-devices.net"), opted_out("out.azure-devices.net")]);
        let list = vec!["OUT.azure-devices.net".to_owned()];
        for n in 0..20 {
            let rid = id(&format!("dev-{n}"));
            let req = AllocationRequest {
                policy: Some(AllocationPolicy::Static),
                iot_hubs: Some(&list),
                ..request(&rid)
            };
            assert_eq!(hub_of(&allocator, req), "out.azure-devices.net");
        }
    }

    #[test]
    fn static_enrollment_with_several_hubs_fails() {
        let allocator = Allocator::new(three_hubs());
        let list = vec!["hub-a.azure-devices.net".to_owned(), "hub-b.azure-devices.net".to_owned()];
        let rid = id("dev-1");
        let req = AllocationRequest {
            policy: Some(AllocationPolicy::Static),
            iot_hubs: Some(&list),
            ..request(&rid)
        };
        assert_eq!(allocator.allocate(req), Err(AllocationError::StaticNeedsOneHub(2)));
    }

    #[test]
    fn static_enrollment_without_hubs_uses_the_only_linked_hub_or_fails() {
        let rid = id("dev-1");
        let one = Allocator::new(vec![LinkedHub::new("solo.azure-devices.net")]);
        let req = AllocationRequest { policy: Some(AllocationPolicy::Static), ..request(&rid) };
        assert_eq!(hub_of(&one, req.clone()), "solo.azure-devices.net");
        let three = Allocator::new(three_hubs());
        assert_eq!(three.allocate(req.clone()), Err(AllocationError::StaticNeedsOneHub(3)));
        let none = Allocator::new(Vec::new());
        assert_eq!(none.allocate(req), Err(AllocationError::StaticNeedsOneHub(0)));
    }

    #[test]
    fn service_default_policy_applies_when_enrollment_sets_none() {
        let allocator = Allocator::new(three_hubs()).with_default_policy(AllocationPolicy::Static);
        assert_eq!(allocator.default_policy(), AllocationPolicy::Static);
        assert_eq!(allocator.effective_policy(None), AllocationPolicy::Static);
        assert_eq!(
            allocator.effective_policy(Some(AllocationPolicy::GeoLatency)),
            AllocationPolicy::GeoLatency
        );
        let rid = id("dev-1");
        assert_eq!(allocator.allocate(request(&rid)), Err(AllocationError::StaticNeedsOneHub(3)));
        let hashed_req = AllocationRequest { policy: Some(AllocationPolicy::Hashed), ..request(&rid) };
        assert!(allocator.allocate(hashed_req).is_ok());
    }

    #[test]
    fn custom_cannot_become_the_service_default() {
        let allocator = Allocator::new(three_hubs()).with_default_policy(AllocationPolicy::Custom);
        assert_eq!(allocator.effective_policy(None), AllocationPolicy::Hashed);
        let geo_then_custom = Allocator::new(three_hubs())
            .with_default_policy(AllocationPolicy::GeoLatency)
            .with_default_policy(AllocationPolicy::Custom);
        assert_eq!(geo_then_custom.effective_policy(None), AllocationPolicy::GeoLatency);
    }

    fn geo_request(rid: &RegistrationId) -> AllocationRequest<'_> {
        AllocationRequest { policy: Some(AllocationPolicy::GeoLatency), ..request(rid) }
    }

    #[test]
    fn geo_latency_enrollment_goes_to_the_nearest_hub() {
        let latency: LatencyTable = [
            ("hub-a.azure-devices.net", Duration::from_millis(80)),
            ("HUB-B.azure-devices.net", Duration::from_millis(12)),
            ("hub-c.azure-devices.net", Duration::from_millis(40)),
        ]
        .into_iter()
        .collect();
        let allocator = Allocator::new(three_hubs()).with_latency(latency);
        for n in 0..50 {
            let rid = id(&format!("dev-{n}"));
            assert_eq!(hub_of(&allocator, geo_request(&rid)), "hub-b.azure-devices.net");
        }
    }

    #[test]
    fn geo_latency_passes_over_hubs_without_measurement() {
        let mut latency = LatencyTable::new();
        latency.insert("hub-c.azure-devices.net", Duration::from_millis(300));
        let allocator = Allocator::new(three_hubs()).with_latency(latency);
        for n in 0..50 {
            let rid = id(&format!("dev-{n}"));
            assert_eq!(hub_of(&allocator, geo_request(&rid)), "hub-c.azure-devices.net");
        }
    }

    #[test]
    fn geo_latency_never_picks_a_nearest_hub_that_opted_out() {
        let hubs = vec![
            opted_out("near.azure-devices.net"),
            LinkedHub::new("far.azure-devices.net"),
            LinkedHub::new("farther.azure-devices.net"),
        ];
        let latency: LatencyTable = [
            ("near.azure-devices.net", Duration::from_millis(1)),
            ("far.azure-devices.net", Duration::from_millis(50)),
            ("farther.azure-devices.net", Duration::from_millis(90)),
        ]
        .into_iter()
        .collect();
        let allocator = Allocator::new(hubs).with_latency(latency);
        let rid = id("dev-1");
        assert_eq!(hub_of(&allocator, geo_request(&rid)), "far.azure-devices.net");
    }

    #[test]
    fn geo_latency_ties_are_spread_like_hashed_among_the_tied_hubs() {
        let hubs = three_hubs();
        let latency: LatencyTable = [
            ("hub-a.azure-devices.net", Duration::from_millis(10)),
            ("hub-b.azure-devices.net", Duration::from_millis(10)),
            ("hub-c.azure-devices.net", Duration::from_millis(30)),
        ]
        .into_iter()
        .collect();
        let allocator = Allocator::new(hubs.clone()).with_latency(latency.clone());
        let tied: Vec<&LinkedHub> = hubs[..2].iter().collect();
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..200 {
            let rid = id(&format!("dev-{n}"));
            let hub = hub_of(&allocator, geo_request(&rid));
            assert_eq!(hub, hashed(&rid, &tied).unwrap().name);
            let all: Vec<&LinkedHub> = hubs.iter().collect();
            assert_eq!(geo_latency(&rid, &all, &latency).unwrap().name, hub);
            seen.insert(hub);
        }
        assert_eq!(seen.len(), 2, "both tied hubs receive devices");
    }

    #[test]
    fn geo_latency_without_measurements_behaves_like_hashed() {
        let hashed_alloc = Allocator::new(three_hubs());
        let geo_alloc = Allocator::new(three_hubs()).with_latency(LatencyTable::new());
        for n in 0..200 {
            let rid = id(&format!("dev-{n}"));
            assert_eq!(hub_of(&geo_alloc, geo_request(&rid)), hub_of(&hashed_alloc, request(&rid)));
        }
    }

    #[test]
    fn latency_table_replaces_measurements_case_insensitively() {
        let mut table = LatencyTable::new();
        assert!(table.is_empty());
        table.insert("Hub-A.azure-devices.net", Duration::from_millis(5));
        table.insert("hub-a.AZURE-devices.net", Duration::from_millis(7));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get("HUB-A.azure-devices.net"), Some(Duration::from_millis(7)));
        assert_eq!(table.get("hub-b.azure-devices.net"), None);
    }

    fn custom_response(hub: &str) -> CustomAllocationResponse {
        CustomAllocationResponse { iot_hub_host_name: hub.to_owned(), initial_twin: None, payload: None }
    }

    fn custom_request(rid: &RegistrationId) -> AllocationRequest<'_> {
        AllocationRequest { policy: Some(AllocationPolicy::Custom), ..request(rid) }
    }

    #[test]
    fn custom_enrollment_without_installed_allocator_fails() {
        let allocator = Allocator::new(three_hubs());
        let rid = id("dev-1");
        assert_eq!(allocator.allocate(custom_request(&rid)), Err(AllocationError::NoCustomAllocator));
    }

    #[test]
    fn custom_allocator_sees_the_webhook_context_and_its_choice_is_used() {
        let seen: Arc<Mutex<Vec<CustomAllocationRequest>>> = Arc::default();
        let log = Arc::clone(&seen);
        let custom = move |req: &CustomAllocationRequest| {
            log.lock().unwrap().push(req.clone());
            Ok(CustomAllocationResponse {
                iot_hub_host_name: "HUB-C.azure-devices.net".into(),
                initial_twin: Some(InitialTwin {
                    tags: Some(json!({"floor": 3})),
                    properties: Some(InitialTwinProperties { desired: Some(json!({"rate": 5})) }),
                }),
                payload: Some(json!({"greeting": "hello"})),
            })
        };
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let rid = id("Dev-1");
        let list = vec!["hub-a.azure-devices.net".to_owned(), "hub-c.azure-devices.net".to_owned()];
        let context = CustomAllocationRequest {
            individual_enrollment: None,
            enrollment_group: None,
            device_runtime_context: DeviceRuntimeContext {
                registration_id: "Dev-1".into(),
                current_iot_hub_host_name: Some("hub-a.azure-devices.net".into()),
                symmetric_key: Some(json!({})),
                payload: Some(json!({"model": "x"})),
                ..DeviceRuntimeContext::default()
            },
            linked_hubs: Vec::new(),
        };
        let decision = allocator
            .allocate(AllocationRequest {
                iot_hubs: Some(&list),
                custom_request: Some(Box::new(context.clone())),
                ..custom_request(&rid)
            })
            .unwrap();
        assert_eq!(decision.hub, "hub-c.azure-devices.net");
        assert_eq!(decision.payload, Some(json!({"greeting": "hello"})));
        assert_eq!(decision.initial_twin.unwrap().tags, Some(json!({"floor": 3})));
        let calls = seen.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].linked_hubs, list);
        assert_eq!(calls[0].device_runtime_context, context.device_runtime_context);
    }

    #[test]
    fn custom_allocator_is_offered_opted_out_hubs_only_when_the_enrollment_names_them() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = Arc::clone(&seen);
        let custom = move |req: &CustomAllocationRequest| {
            log.lock().unwrap().clone_from(&req.linked_hubs);
            Ok(custom_response("out.azure-devices.net"))
        };
        let allocator =
            Allocator::new(vec![LinkedHub::new("in.azure-devices.net"), opted_out("out.azure-devices.net")])
                .with_custom(Arc::new(custom));
        let rid = id("dev-1");
        // Spec §8.1: without hubs of its own, the candidates leave out hubs that opted out of
        // allocation, and the allocator may not pick one.
        let refused = allocator.allocate(custom_request(&rid)).unwrap_err();
        assert!(
            matches!(&refused, AllocationError::Custom(m) if m.contains("not one of linkedHubs")),
            "{refused}"
        );
        assert_eq!(*seen.lock().unwrap(), ["in.azure-devices.net"]);
        // Spec §7.6: an enrollment may still name such a hub, and then it is offered.
        let named = vec!["in.azure-devices.net".to_owned(), "OUT.azure-devices.net".to_owned()];
        let request = AllocationRequest { iot_hubs: Some(&named), ..custom_request(&rid) };
        assert_eq!(hub_of(&allocator, request), "out.azure-devices.net");
        assert_eq!(*seen.lock().unwrap(), ["in.azure-devices.net", "out.azure-devices.net"]);
        // Only opted-out hubs and no names: nothing to offer.
        let none = Allocator::new(vec![opted_out("out.azure-devices.net")]).with_custom(Arc::new(
            |_: &CustomAllocationRequest| -> Result<CustomAllocationResponse, String> { unreachable!() },
        ));
        assert_eq!(none.allocate(custom_request(&rid)), Err(AllocationError::NoHub));
    }

    #[test]
    fn custom_allocation_without_caller_context_sends_the_registration_id() {
        let seen: Arc<Mutex<Option<String>>> = Arc::default();
        let log = Arc::clone(&seen);
        let custom = move |req: &CustomAllocationRequest| {
            *log.lock().unwrap() = Some(req.device_runtime_context.registration_id.clone());
            Ok(custom_response("hub-a.azure-devices.net"))
        };
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let rid = id("Sensor-9");
        assert_eq!(hub_of(&allocator, custom_request(&rid)), "hub-a.azure-devices.net");
        assert_eq!(seen.lock().unwrap().as_deref(), Some("Sensor-9"));
    }

    #[test]
    fn custom_allocator_refusal_fails_the_registration_with_its_message() {
        let custom = |_: &CustomAllocationRequest| Err("device not allowed this week".to_owned());
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let rid = id("dev-1");
        assert_eq!(
            allocator.allocate(custom_request(&rid)),
            Err(AllocationError::Custom("device not allowed this week".into()))
        );
    }

    #[test]
    fn custom_allocator_choosing_a_hub_outside_the_candidates_fails() {
        let custom = |_: &CustomAllocationRequest| Ok(custom_response("hub-b.azure-devices.net"));
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let rid = id("dev-1");
        let list = vec!["hub-a.azure-devices.net".to_owned()];
        match allocator.allocate(AllocationRequest { iot_hubs: Some(&list), ..custom_request(&rid) }) {
            Err(AllocationError::Custom(msg)) => assert!(msg.contains("not one of linkedHubs"), "{msg}"),
            other => panic!("expected a custom failure, got {other:?}"),
        }
    }

    #[test]
    fn custom_enrollment_naming_an_unlinked_hub_is_refused_before_calling_the_allocator() {
        let custom = |_: &CustomAllocationRequest| -> Result<CustomAllocationResponse, String> {
            panic!("must not be called")
        };
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let rid = id("dev-1");
        let list = vec!["nowhere.azure-devices.net".to_owned()];
        assert_eq!(
            allocator.allocate(AllocationRequest { iot_hubs: Some(&list), ..custom_request(&rid) }),
            Err(AllocationError::UnknownHub("nowhere.azure-devices.net".into()))
        );
    }

    #[test]
    fn custom_enrollment_on_a_service_without_hubs_fails_with_no_hub() {
        let custom = |_: &CustomAllocationRequest| Ok(custom_response("x.azure-devices.net"));
        let allocator = Allocator::new(Vec::new()).with_custom(Arc::new(custom));
        let rid = id("dev-1");
        assert_eq!(allocator.allocate(custom_request(&rid)), Err(AllocationError::NoHub));
    }

    #[test]
    fn allocator_debug_output_hides_the_custom_allocator() {
        let custom = |_: &CustomAllocationRequest| Ok(custom_response("hub-a.azure-devices.net"));
        let allocator = Allocator::new(three_hubs()).with_custom(Arc::new(custom));
        let text = format!("{allocator:?}");
        assert!(text.contains("<custom allocator>") && text.contains("hub-a.azure-devices.net"));
    }
}
