//! Hub store conformance suite: what every identity, twin and job store must do, one fresh store per case.
//!
//! A backend's test calls [`run_all`] (or [`identity_store`], [`twin_store`], [`job_store`]) with
//! constructors of empty stores. Every case panics with a message that names the case and what
//! went wrong. Unlike DPS ids, hub device, module and job ids are case-sensitive; listings are
//! checked to come in byte-wise id order, as the traits document.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use zerotouch_engine::jobs::{DeviceJobFilter, JobFilter, JobRecord, JobStore};
use zerotouch_engine::registry::{keep_device_activity, keep_module_activity, DeviceCounts, IdentityStore};
use zerotouch_engine::store::{Page, PageRequest, Precondition};
use zerotouch_engine::twin::{StoredTwin, TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::{
    AuthenticationMechanism, AuthenticationType, ConnectionState, Device, DeviceCapabilities, DeviceStatus,
    Module, SymmetricKey, X509Thumbprint,
};
use zerotouch_proto::jobs::{
    CloudToDeviceMethod, DeviceJob, DeviceJobOutcome, DeviceJobStatus, JobId, JobResponse, JobStatus, JobType,
};
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};

use crate::conformance::{all_pages, same_json};

/// Runs every case of the three suites, each against a store fresh from its constructor.
///
/// # Panics
/// On the first case a store fails, naming the case.
pub fn run_all<I: IdentityStore, T: TwinStore, J: JobStore>(
    identities: impl Fn() -> I,
    twins: impl Fn() -> T,
    jobs: impl Fn() -> J,
) {
    identity_store(identities);
    twin_store(twins);
    job_store(jobs);
}

/// Device and module identities: lookup, round-trip, case-sensitive ids, every precondition on
/// put and delete, modules under their device and the cascade of a device delete, paging,
/// counts, and 8 threads doing compare-and-swap updates of one device without losing one.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn identity_store<S: IdentityStore>(make: impl Fn() -> S) {
    let make = &make;
    run("identities: a missing device or module reads as None", make, missing_identities);
    keyed_cases::<S, Devices>(make);
    keyed_cases::<S, Modules>(make);
    run("identities: a module needs its device", make, module_needs_device);
    run("identities: modules are listed per device in id order", make, modules_per_device);
    run("identities: deleting a device deletes its modules", make, cascade_delete);
    run("identities: listing an empty store gives one empty last page", make, |store| {
        let pages = all_pages(100, |r| store.devices(r))?;
        check_pages("empty listing", &pages, &[0], &BTreeSet::new(), device_key, |_, _| true).map(drop)
    });
    run("identities: 250 devices list as 100 + 100 + 50 in id order", make, device_paging);
    run(
        "identities: deleting the last device of a page does not break its continuation",
        make,
        delete_while_paging,
    );
    run("identities: counts follow status, connection state and deletes", make, device_counts);
    run("identities: 8 threads doing compare-and-swap updates lose no update", make, concurrent_devices);
    run(
        "identities: an identity update keeps the activity fields the store holds",
        make,
        update_keeps_activity,
    );
    run(
        "identities: identity updates racing connection-state writes lose no activity",
        make,
        concurrent_activity,
    );
}

/// Device and module twins: lookup, round-trip, every precondition on put and delete checked
/// against the twin revision (not its etag), case-sensitive ids, listing per device, paging, and
/// 8 threads doing compare-and-swap updates of one twin without losing one.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn twin_store<S: TwinStore>(make: impl Fn() -> S) {
    let make = &make;
    run("twins: a missing twin reads as None", make, missing_twins);
    keyed_cases::<S, DeviceTwins>(make);
    keyed_cases::<S, ModuleTwins>(make);
    run("twins: preconditions compare the revision, not the etag", make, twin_revision);
    run("twins: device and module twins are separate entries", make, device_and_module_twins);
    run("twins: device_twins returns exactly the twins of one device", make, twins_of_device);
    run("twins: listing an empty store gives one empty last page", make, |store| {
        let pages = all_pages(100, |r| store.twins(r))?;
        check_pages("empty listing", &pages, &[0], &BTreeSet::new(), twin_name, |_, _| true).map(drop)
    });
    run("twins: 250 twins list as 100 + 100 + 50, device twin before module twins", make, twin_paging);
    run("twins: 8 threads doing compare-and-swap updates lose no update", make, concurrent_twins);
}

/// Scheduled jobs and device job records: lookup, round-trip, every precondition on put,
/// case-sensitive ids, filters, paging, record replacement, purge, and 8 threads doing
/// compare-and-swap updates of one job without losing one.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn job_store<S: JobStore>(make: impl Fn() -> S) {
    let make = &make;
    run("jobs: a missing job or device job reads as None", make, missing_jobs);
    keyed_cases::<S, Jobs>(make);
    run("jobs: 250 jobs list as 100 + 100 + 50 in id order", make, job_paging);
    run("jobs: listing filters by type and status across pages", make, job_filters);
    run("jobs: a continuation token the store did not issue is refused as such", make, forged_job_tokens);
    run(
        "jobs: a device job record is created, replaced and found by job and device",
        make,
        device_job_records,
    );
    run("jobs: device job listing filters by job and device across pages", make, device_job_filters);
    run("jobs: purge removes finished jobs ended before the cutoff with their records", make, purge_jobs);
    run("jobs: 8 threads doing compare-and-swap updates lose no update", make, concurrent_jobs);
}

/// What one case returns: `Err` says what went wrong.
type Outcome = Result<(), String>;

fn run<S>(name: &str, make: &impl Fn() -> S, case: impl FnOnce(&S) -> Outcome) {
    let store = make();
    if let Err(why) = case(&store) {
        panic!("hub store conformance case `{name}` failed: {why}");
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn ok<T>(what: &str, result: Result<T, StoreError>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: unexpected error {e:?}"))
}

fn fails<T>(what: &str, result: Result<T, StoreError>, expected: &StoreError) -> Outcome {
    match result {
        Err(e) if &e == expected => Ok(()),
        Err(e) => Err(format!("{what}: expected {expected:?}, got {e:?}")),
        Ok(_) => Err(format!("{what}: expected {expected:?}, but it succeeded")),
    }
}

macro_rules! to_json {
    ($value:expr) => {
        serde_json::to_value($value).map_err(|e| format!("cannot serialize a stored value: {e}"))
    };
}

fn dev_id(s: &str) -> Result<DeviceId, String> {
    DeviceId::new(s).map_err(|e| format!("bad sample device id {s:?}: {e}"))
}

fn mod_id(s: &str) -> Result<ModuleId, String> {
    ModuleId::new(s).map_err(|e| format!("bad sample module id {s:?}: {e}"))
}

fn job_id(s: &str) -> Result<JobId, String> {
    JobId::new(s).map_err(|e| format!("bad sample job id {s:?}: {e}"))
}

/// A fixed instant plus `secs`, so samples never depend on a clock.
fn at(secs: i64) -> Timestamp {
    Timestamp::from_unix_nanos(1_700_000_000_123_456_700 + secs * 1_000_000_000)
}

fn must(token: &str) -> Precondition {
    Precondition::Matches(token.to_owned())
}

fn names<'a>(ids: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    ids.into_iter().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Shared cases of the keyed tables (devices, modules, twins, jobs)

/// How the shared cases reach one keyed table of a store.
trait Keyed<S> {
    type Item;
    /// Plural noun used in case names.
    const WHAT: &'static str;
    /// Whether the table has a delete.
    const DELETES: bool = true;
    /// Writes what an entry needs to exist first (the parent device of a module).
    fn setup(_store: &S) -> Outcome {
        Ok(())
    }
    /// A sample under `key`; different `rev`s give different content and tokens.
    fn item(key: &str, rev: u32) -> Result<Self::Item, String>;
    /// What [`Precondition::Matches`] is compared with (etag, revision or version).
    fn token(item: &Self::Item) -> String;
    fn json(item: &Self::Item) -> Result<Value, String>;
    fn get(store: &S, key: &str) -> Result<Option<Self::Item>, String>;
    fn put(store: &S, item: &Self::Item, pre: &Precondition) -> Result<(), StoreError>;
    /// `None` when the table has no delete.
    fn delete(store: &S, key: &str, pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String>;
}

fn keyed_cases<S, K: Keyed<S>>(make: &impl Fn() -> S) {
    let what = K::WHAT;
    run(&format!("{what}: put then get returns the same JSON"), make, round_trip::<S, K>);
    run(&format!("{what}: ids are case-sensitive"), make, case_sensitive::<S, K>);
    run(&format!("{what}: put honours every precondition"), make, put_preconditions::<S, K>);
    if K::DELETES {
        run(&format!("{what}: delete honours every precondition"), make, delete_preconditions::<S, K>);
    }
}

fn holds<S, K: Keyed<S>>(store: &S, key: &str, expected: Option<&K::Item>, step: &str) -> Outcome {
    match (expected, K::get(store, key).map_err(|e| format!("{step}: {e}"))?) {
        (None, None) => Ok(()),
        (Some(want), Some(got)) => same_json(step, &K::json(want)?, &K::json(&got)?),
        (None, Some(_)) => Err(format!("{step}: {key:?} is stored but should not be")),
        (Some(_), None) => Err(format!("{step}: {key:?} is missing")),
    }
}

fn deleted<S, K: Keyed<S>>(
    store: &S,
    key: &str,
    pre: &Precondition,
) -> Result<Result<(), StoreError>, String> {
    K::delete(store, key, pre)?.ok_or_else(|| format!("{} have no delete", K::WHAT))
}

fn round_trip<S, K: Keyed<S>>(store: &S) -> Outcome {
    K::setup(store)?;
    let first = K::item("sample-1", 1)?;
    ok("put", K::put(store, &first, &Precondition::MustNotExist))?;
    holds::<S, K>(store, "sample-1", Some(&first), "get after put")?;
    let second = K::item("sample-2", 2)?;
    ok("put of a second entry", K::put(store, &second, &Precondition::None))?;
    holds::<S, K>(store, "sample-1", Some(&first), "get of the first entry after a second put")?;
    holds::<S, K>(store, "sample-2", Some(&second), "get of the second entry")
}

fn case_sensitive<S, K: Keyed<S>>(store: &S) -> Outcome {
    K::setup(store)?;
    let upper = K::item("Dev-1", 1)?;
    ok("put of \"Dev-1\"", K::put(store, &upper, &Precondition::MustNotExist))?;
    for other in ["dev-1", "DEV-1"] {
        holds::<S, K>(store, other, None, &format!("get of {other:?} after put of \"Dev-1\""))?;
    }
    let lower = K::item("dev-1", 2)?;
    ok(
        "put MustNotExist of \"dev-1\" next to \"Dev-1\"",
        K::put(store, &lower, &Precondition::MustNotExist),
    )?;
    holds::<S, K>(store, "Dev-1", Some(&upper), "get of \"Dev-1\" after put of \"dev-1\"")?;
    holds::<S, K>(store, "dev-1", Some(&lower), "get of \"dev-1\"")?;
    let mismatched = K::item("DEV-1", 3)?;
    fails(
        "put MustExist of \"DEV-1\" while only \"Dev-1\" and \"dev-1\" exist",
        K::put(store, &mismatched, &Precondition::MustExist),
        &StoreError::NotFound,
    )?;
    if K::DELETES {
        fails(
            "delete of \"DEV-1\"",
            deleted::<S, K>(store, "DEV-1", &Precondition::None)?,
            &StoreError::NotFound,
        )?;
        ok("delete of \"dev-1\"", deleted::<S, K>(store, "dev-1", &Precondition::None)?)?;
        holds::<S, K>(store, "dev-1", None, "get of \"dev-1\" after its delete")?;
        holds::<S, K>(store, "Dev-1", Some(&upper), "get of \"Dev-1\" after deleting \"dev-1\"")?;
    }
    Ok(())
}

fn put_preconditions<S, K: Keyed<S>>(store: &S) -> Outcome {
    K::setup(store)?;
    let key = "dev-1";
    let v1 = K::item(key, 1)?;
    fails(
        "put MustExist of a missing entry",
        K::put(store, &v1, &Precondition::MustExist),
        &StoreError::NotFound,
    )?;
    fails(
        "put Matches of a missing entry",
        K::put(store, &v1, &must(&K::token(&v1))),
        &StoreError::NotFound,
    )?;
    holds::<S, K>(store, key, None, "after the refused puts of a missing entry")?;
    ok("put MustNotExist of a missing entry", K::put(store, &v1, &Precondition::MustNotExist))?;
    holds::<S, K>(store, key, Some(&v1), "after create")?;

    let v2 = K::item(key, 2)?;
    fails(
        "put MustNotExist of an existing entry",
        K::put(store, &v2, &Precondition::MustNotExist),
        &StoreError::AlreadyExists,
    )?;
    fails(
        "put Matches(wrong token)",
        K::put(store, &v2, &must("not-a-token")),
        &StoreError::PreconditionFailed,
    )?;
    holds::<S, K>(store, key, Some(&v1), "after the refused puts of an existing entry")?;
    ok("put Matches(current token)", K::put(store, &v2, &must(&K::token(&v1))))?;
    holds::<S, K>(store, key, Some(&v2), "after Matches(right) put")?;
    fails(
        "put Matches(superseded token)",
        K::put(store, &v1, &must(&K::token(&v1))),
        &StoreError::PreconditionFailed,
    )?;
    holds::<S, K>(store, key, Some(&v2), "after the refused put with a superseded token")?;

    let v3 = K::item(key, 3)?;
    ok("put MustExist of an existing entry", K::put(store, &v3, &Precondition::MustExist))?;
    holds::<S, K>(store, key, Some(&v3), "after MustExist put")?;
    let v4 = K::item(key, 4)?;
    ok("unconditional put over an existing entry", K::put(store, &v4, &Precondition::None))?;
    holds::<S, K>(store, key, Some(&v4), "after unconditional replace")?;
    let fresh = K::item("dev-2", 1)?;
    ok("unconditional put of a missing entry", K::put(store, &fresh, &Precondition::None))?;
    holds::<S, K>(store, "dev-2", Some(&fresh), "after unconditional create")
}

fn delete_preconditions<S, K: Keyed<S>>(store: &S) -> Outcome {
    K::setup(store)?;
    let key = "dev-1";
    let v1 = K::item(key, 1)?;
    for pre in [Precondition::None, Precondition::MustNotExist, Precondition::MustExist, must(&K::token(&v1))]
    {
        fails(
            &format!("delete {pre:?} of a missing entry"),
            deleted::<S, K>(store, key, &pre)?,
            &StoreError::NotFound,
        )?;
    }
    ok("put", K::put(store, &v1, &Precondition::None))?;
    fails(
        "delete MustNotExist of an existing entry",
        deleted::<S, K>(store, key, &Precondition::MustNotExist)?,
        &StoreError::AlreadyExists,
    )?;
    fails(
        "delete Matches(wrong token)",
        deleted::<S, K>(store, key, &must("not-a-token"))?,
        &StoreError::PreconditionFailed,
    )?;
    holds::<S, K>(store, key, Some(&v1), "after the refused deletes")?;
    ok("delete Matches(current token)", deleted::<S, K>(store, key, &must(&K::token(&v1)))?)?;
    holds::<S, K>(store, key, None, "after Matches(right) delete")?;
    ok("put again", K::put(store, &v1, &Precondition::None))?;
    ok("delete MustExist of an existing entry", deleted::<S, K>(store, key, &Precondition::MustExist)?)?;
    holds::<S, K>(store, key, None, "after MustExist delete")?;
    ok("put again", K::put(store, &v1, &Precondition::None))?;
    ok("unconditional delete", deleted::<S, K>(store, key, &Precondition::None)?)?;
    holds::<S, K>(store, key, None, "after unconditional delete")?;
    fails(
        "second delete of the same entry",
        deleted::<S, K>(store, key, &Precondition::None)?,
        &StoreError::NotFound,
    )
}

// ---------------------------------------------------------------------------------------------
// Paging

/// Checks a paged listing: the expected page sizes, every key exactly once, each item in order
/// after the one before it.
fn check_pages<T>(
    what: &str,
    pages: &[Page<T>],
    sizes: &[usize],
    expected: &BTreeSet<String>,
    key: impl Fn(&T) -> String,
    in_order: impl Fn(&T, &T) -> bool,
) -> Result<Vec<String>, String> {
    let got_sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    ensure!(got_sizes == sizes, "{what}: expected pages of {sizes:?} items, got {got_sizes:?}");
    let items: Vec<&T> = pages.iter().flat_map(|p| p.items.iter()).collect();
    if let Some(pair) = items.windows(2).find(|w| !in_order(w[0], w[1])) {
        return Err(format!("{what}: {:?} is listed before {:?}, out of order", key(pair[0]), key(pair[1])));
    }
    let order: Vec<String> = items.iter().map(|i| key(i)).collect();
    let distinct: BTreeSet<String> = order.iter().cloned().collect();
    ensure!(distinct.len() == order.len(), "{what}: an item was listed twice");
    let gaps: Vec<&String> = expected.difference(&distinct).take(5).collect();
    ensure!(gaps.is_empty(), "{what}: items missing from the listing, e.g. {gaps:?}");
    let extra: Vec<&String> = distinct.difference(expected).take(5).collect();
    ensure!(extra.is_empty(), "{what}: items listed that should not be, e.g. {extra:?}");
    Ok(order)
}

/// Lists with pages of 100, twice, and of `exact` (which must divide the count); all three in
/// the same order.
fn pages_agree<T>(
    mut list: impl FnMut(&PageRequest) -> Result<Page<T>, StoreError>,
    sizes: &[usize],
    exact: usize,
    expected: &BTreeSet<String>,
    key: impl Fn(&T) -> String + Copy,
    in_order: impl Fn(&T, &T) -> bool + Copy,
) -> Outcome {
    let first = all_pages(100, &mut list)?;
    let order = check_pages("pages of 100", &first, sizes, expected, key, in_order)?;
    let again = all_pages(100, &mut list)?;
    let order_again = check_pages("second listing, pages of 100", &again, sizes, expected, key, in_order)?;
    ensure!(order == order_again, "two listings of an unchanged store came in different orders");
    let whole = vec![exact; expected.len() / exact];
    let exact_pages = all_pages(exact, &mut list)?;
    let order_exact = check_pages(
        &format!("pages of {exact} (the last page exactly full has no continuation)"),
        &exact_pages,
        &whole,
        expected,
        key,
        in_order,
    )?;
    ensure!(order == order_exact, "listing with another page size came in a different order");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Identities

struct Devices;
struct Modules;

/// The device every module sample belongs to.
const PARENT: &str = "parent-device";

impl<S: IdentityStore> Keyed<S> for Devices {
    type Item = Device;
    const WHAT: &'static str = "devices";
    fn item(key: &str, rev: u32) -> Result<Device, String> {
        device(key, &format!("etag-{rev}"), rev)
    }
    fn token(item: &Device) -> String {
        item.etag.as_ref().map(|e| e.bare().to_owned()).unwrap_or_default()
    }
    fn json(item: &Device) -> Result<Value, String> {
        to_json!(item)
    }
    fn get(store: &S, key: &str) -> Result<Option<Device>, String> {
        ok("get of a device", store.device(&dev_id(key)?))
    }
    fn put(store: &S, item: &Device, pre: &Precondition) -> Result<(), StoreError> {
        store.put_device(item, pre)
    }
    fn delete(store: &S, key: &str, pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String> {
        let id = dev_id(key)?;
        Ok(Some(store.delete_device(&id, pre).and_then(|(gone, _)| {
            if gone.device_id == id {
                Ok(())
            } else {
                Err(StoreError::Backend(format!("delete returned device {}", gone.device_id)))
            }
        })))
    }
}

impl<S: IdentityStore> Keyed<S> for Modules {
    type Item = Module;
    const WHAT: &'static str = "modules";
    fn setup(store: &S) -> Outcome {
        ok(
            "put of the parent device",
            store.put_device(&device(PARENT, "p1", 1)?, &Precondition::MustNotExist),
        )
    }
    fn item(key: &str, rev: u32) -> Result<Module, String> {
        module(PARENT, key, &format!("etag-{rev}"), rev)
    }
    fn token(item: &Module) -> String {
        item.etag.as_ref().map(|e| e.bare().to_owned()).unwrap_or_default()
    }
    fn json(item: &Module) -> Result<Value, String> {
        to_json!(item)
    }
    fn get(store: &S, key: &str) -> Result<Option<Module>, String> {
        ok("get of a module", store.module(&dev_id(PARENT)?, &mod_id(key)?))
    }
    fn put(store: &S, item: &Module, pre: &Precondition) -> Result<(), StoreError> {
        store.put_module(item, pre)
    }
    fn delete(store: &S, key: &str, pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String> {
        let id = mod_id(key)?;
        Ok(Some(store.delete_module(&dev_id(PARENT)?, &id, pre).and_then(|gone| {
            if gone.module_id == id {
                Ok(())
            } else {
                Err(StoreError::Backend(format!("delete returned module {}", gone.module_id)))
            }
        })))
    }
}

pub(crate) fn device(id: &str, etag: &str, rev: u32) -> Result<Device, String> {
    let mut d = Device::new(dev_id(id)?);
    d.generation_id = Some(format!("638{rev:015}"));
    d.etag = Some(ETag::new(etag));
    d.status = if rev % 3 == 0 { DeviceStatus::Disabled } else { DeviceStatus::Enabled };
    d.status_reason = (rev % 3 == 0).then(|| format!("maintenance {rev}"));
    d.connection_state =
        if rev % 2 == 0 { ConnectionState::Connected } else { ConnectionState::Disconnected };
    d.connection_state_updated_time = Some(at(i64::from(rev)));
    d.status_updated_time = Some(at(0));
    d.last_activity_time = Some(at(i64::from(rev) + 1));
    d.cloud_to_device_message_count = i32::try_from(rev).map_err(|e| e.to_string())?;
    d.authentication = Some(sas());
    d.capabilities = Some(DeviceCapabilities { iot_edge: rev % 2 == 0 });
    d.device_scope = Some(format!("ms-azure-iot-edge://{id}-{rev}"));
    d.parent_scopes = vec![format!("ms-azure-iot-edge://parent-{rev}")];
    Ok(d)
}

fn module(device: &str, id: &str, etag: &str, rev: u32) -> Result<Module, String> {
    let mut m = Module::new(dev_id(device)?, mod_id(id)?);
    m.managed_by = (rev % 2 == 0).then(|| "IotEdge".to_owned());
    m.generation_id = Some(format!("638{rev:015}"));
    m.etag = Some(ETag::new(etag));
    m.connection_state =
        if rev % 2 == 0 { ConnectionState::Connected } else { ConnectionState::Disconnected };
    m.connection_state_updated_time = Some(at(i64::from(rev)));
    m.last_activity_time = Some(at(i64::from(rev) + 1));
    m.cloud_to_device_message_count = i32::try_from(rev).map_err(|e| e.to_string())?;
    m.authentication = Some(sas());
    Ok(m)
}

fn sas() -> AuthenticationMechanism {
    AuthenticationMechanism {
        symmetric_key: SymmetricKey {
            primary_key: Some("aHViIHNhbXBsZSBwcmltYXJ5IGtleSBvZiAzMiBieXQ=".to_owned()),
            secondary_key: Some("aHViIHNhbXBsZSBzZWNvbmRhcnkga2V5IG9mIDMyIGI=".to_owned()),
        },
        x509_thumbprint: X509Thumbprint::default(),
        kind: AuthenticationType::Sas,
    }
}

fn device_key(d: &Device) -> String {
    d.device_id.as_str().to_owned()
}

fn module_names(modules: &[Module]) -> Vec<String> {
    modules.iter().map(|m| m.module_id.as_str().to_owned()).collect()
}

fn missing_identities<S: IdentityStore>(store: &S) -> Outcome {
    let never = dev_id("never-written")?;
    ensure!(ok("get of a device", store.device(&never))?.is_none(), "a device never written reads as stored");
    let m = ok("get of a module", store.module(&never, &mod_id("m")?))?;
    ensure!(m.is_none(), "a module of a device never written reads as stored");
    let listed = ok("modules of a missing device", store.modules(&never))?;
    ensure!(listed.is_empty(), "a device never written lists modules {:?}", module_names(&listed));
    fails(
        "delete of a module of a missing device",
        store.delete_module(&never, &mod_id("m")?, &Precondition::None),
        &StoreError::NotFound,
    )
}

fn module_needs_device<S: IdentityStore>(store: &S) -> Outcome {
    let orphan = module("no-such-device", "m1", "e1", 1)?;
    for pre in [Precondition::None, Precondition::MustNotExist] {
        fails(
            &format!("put {pre:?} of a module of a missing device"),
            store.put_module(&orphan, &pre),
            &StoreError::NotFound,
        )?;
    }
    let m = ok("get", store.module(&dev_id("no-such-device")?, &mod_id("m1")?))?;
    ensure!(m.is_none(), "a refused module put stored the module");
    ok("put of the device", store.put_device(&device("no-such-device", "e1", 1)?, &Precondition::None))?;
    ok("put of the module once its device exists", store.put_module(&orphan, &Precondition::MustNotExist))?;
    // A module under "Dev-1" is not a module of "dev-1".
    ok("put of Dev-1", store.put_device(&device("Dev-1", "e1", 1)?, &Precondition::None))?;
    fails(
        "put of a module under \"dev-1\" while only \"Dev-1\" exists",
        store.put_module(&module("dev-1", "m1", "e1", 1)?, &Precondition::None),
        &StoreError::NotFound,
    )
}

fn modules_per_device<S: IdentityStore>(store: &S) -> Outcome {
    for d in ["dev-1", "dev-10", "Dev-1"] {
        ok(&format!("put of {d}"), store.put_device(&device(d, "e1", 1)?, &Precondition::MustNotExist))?;
    }
    let on_dev1 = ["m-b", "M-a", "m-a", "m-c"];
    for (i, m) in (1..).zip(on_dev1) {
        ok(
            &format!("put of module {m}"),
            store.put_module(&module("dev-1", m, "e1", i)?, &Precondition::MustNotExist),
        )?;
    }
    ok(
        "put of a module of dev-10",
        store.put_module(&module("dev-10", "m-z", "e1", 1)?, &Precondition::None),
    )?;
    ok("put of a module of Dev-1", store.put_module(&module("Dev-1", "m-y", "e1", 1)?, &Precondition::None))?;
    let got = module_names(&ok("modules of dev-1", store.modules(&dev_id("dev-1")?))?);
    let mut want: Vec<String> = on_dev1.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    ensure!(got == want, "modules of dev-1 listed as {got:?}, expected {want:?}");
    let got = module_names(&ok("modules of dev-10", store.modules(&dev_id("dev-10")?))?);
    ensure!(got == ["m-z"], "modules of dev-10 listed as {got:?}");
    let got = module_names(&ok("modules of Dev-1", store.modules(&dev_id("Dev-1")?))?);
    ensure!(got == ["m-y"], "modules of Dev-1 listed as {got:?}");
    let m = ok("get", store.module(&dev_id("dev-1")?, &mod_id("m-y")?))?;
    ensure!(m.is_none(), "a module of Dev-1 reads as a module of dev-1");
    let pages = all_pages(100, |r| store.devices(r))?;
    check_pages(
        "devices with modules",
        &pages,
        &[3],
        &names(["dev-1", "dev-10", "Dev-1"]),
        device_key,
        |_, _| true,
    )
    .map(drop)
}

fn cascade_delete<S: IdentityStore>(store: &S) -> Outcome {
    let d = device("dev-1", "e1", 1)?;
    ok("put of dev-1", store.put_device(&d, &Precondition::MustNotExist))?;
    ok("put of dev-2", store.put_device(&device("dev-2", "e1", 1)?, &Precondition::MustNotExist))?;
    let mods = [module("dev-1", "m-1", "e1", 1)?, module("dev-1", "m-2", "e1", 2)?];
    for m in &mods {
        ok("put of a module", store.put_module(m, &Precondition::MustNotExist))?;
    }
    ok("put of a module of dev-2", store.put_module(&module("dev-2", "m-1", "e1", 1)?, &Precondition::None))?;
    let id = dev_id("dev-1")?;
    fails(
        "delete Matches(wrong etag) of dev-1",
        store.delete_device(&id, &must("nope")),
        &StoreError::PreconditionFailed,
    )?;
    ensure!(ok("modules", store.modules(&id))?.len() == 2, "a refused device delete removed modules");
    let (gone, gone_modules) = ok("delete of dev-1", store.delete_device(&id, &must("e1")))?;
    same_json("the deleted device returned", &to_json!(&d)?, &to_json!(&gone)?)?;
    let mut returned = module_names(&gone_modules);
    returned.sort();
    ensure!(returned == ["m-1", "m-2"], "delete_device returned modules {returned:?}, expected [m-1, m-2]");
    for m in ["m-1", "m-2"] {
        let left = ok("get of a module", store.module(&id, &mod_id(m)?))?;
        ensure!(left.is_none(), "module {m} outlived its device");
    }
    ok("re-create of dev-1", store.put_device(&device("dev-1", "e9", 9)?, &Precondition::MustNotExist))?;
    let left = module_names(&ok("modules of the re-created dev-1", store.modules(&id))?);
    ensure!(left.is_empty(), "a re-created device inherited modules {left:?}");
    let other = module_names(&ok("modules of dev-2", store.modules(&dev_id("dev-2")?))?);
    ensure!(other == ["m-1"], "deleting dev-1 changed the modules of dev-2 to {other:?}");
    Ok(())
}

fn device_paging<S: IdentityStore>(store: &S) -> Outcome {
    const N: usize = 250;
    let mut expected = BTreeSet::new();
    // Out of id order and in mixed case, so the order is the store's own.
    for i in (0..N).map(|i| i * 7 % N) {
        let id = if i % 2 == 0 { format!("DEV-{i:03}") } else { format!("dev-{i:03}") };
        let rev = u32::try_from(i).map_err(|e| e.to_string())?;
        ok(&format!("put of {id}"), store.put_device(&device(&id, "e1", rev)?, &Precondition::MustNotExist))?;
        expected.insert(id);
    }
    // Modules are not devices and must not show up in the device listing.
    ok("put of a module", store.put_module(&module("dev-001", "m-1", "e1", 1)?, &Precondition::None))?;
    pages_agree(
        |r| store.devices(r),
        &[100, 100, 50],
        125,
        &expected,
        device_key,
        |a, b| a.device_id.as_str() < b.device_id.as_str(),
    )
}

fn delete_while_paging<S: IdentityStore>(store: &S) -> Outcome {
    let mut expected = BTreeSet::new();
    for i in 0..250 {
        let id = format!("dev-{i:03}");
        ok(&format!("put of {id}"), store.put_device(&device(&id, "e1", 1)?, &Precondition::MustNotExist))?;
        expected.insert(id);
    }
    let first = ok("first page", store.devices(&PageRequest { continuation: None, max_items: 100 }))?;
    let token = first.continuation.clone().ok_or("the first of three pages has no continuation")?;
    let last = first.items.last().ok_or("the first page is empty")?;
    ok(
        "delete of the last device of the first page",
        store.delete_device(&last.device_id, &Precondition::None),
    )?;
    let rest = all_pages(100, |r| {
        let r = if r.continuation.is_none() {
            PageRequest { continuation: Some(token.clone()), ..r.clone() }
        } else {
            r.clone()
        };
        store.devices(&r)
    })?;
    let mut pages = vec![first];
    pages.extend(rest);
    check_pages("listing across a delete", &pages, &[100, 100, 50], &expected, device_key, |a, b| {
        a.device_id.as_str() < b.device_id.as_str()
    })
    .map(drop)
}

fn device_counts<S: IdentityStore>(store: &S) -> Outcome {
    let zero = ok("count of an empty store", store.count_devices())?;
    ensure!(zero == DeviceCounts::default(), "an empty store counts {zero:?}");
    // rev % 3 == 0 is disabled, rev % 2 == 0 is connected.
    for rev in 1..=12 {
        ok("put", store.put_device(&device(&format!("dev-{rev}"), "e1", rev)?, &Precondition::None))?;
    }
    ok("put of a module", store.put_module(&module("dev-1", "m-1", "e1", 2)?, &Precondition::None))?;
    let want = DeviceCounts { total: 12, enabled: 8, disabled: 4, connected: 6 };
    let got = ok("count", store.count_devices())?;
    ensure!(got == want, "counted {got:?}, expected {want:?}");
    ok("delete of dev-6", store.delete_device(&dev_id("dev-6")?, &Precondition::None))?;
    ok(
        "replace of dev-1 as disabled and connected",
        store.put_device(&device("dev-1", "e2", 6)?, &Precondition::None),
    )?;
    let want = DeviceCounts { total: 11, enabled: 7, disabled: 4, connected: 6 };
    let got = ok("count after a delete and a replace", store.count_devices())?;
    ensure!(got == want, "after a delete and a replace counted {got:?}, expected {want:?}");
    Ok(())
}

const THREADS: usize = 8;
const UPDATES: u64 = 50;
/// Generous, yet a store that never lets a compare-and-swap through fails instead of spinning.
const MAX_ATTEMPTS: usize = 1_000_000;

/// Runs `THREADS` writers of `UPDATES` successful compare-and-swap updates each.
fn contend(attempt: impl Fn() -> Result<bool, String> + Sync) -> Outcome {
    let attempt = &attempt;
    let results: Vec<Outcome> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(move || {
                    let mut done = 0;
                    for _ in 0..MAX_ATTEMPTS {
                        if done == UPDATES {
                            return Ok(());
                        }
                        if attempt()? {
                            done += 1;
                        }
                    }
                    Err(format!("only {done} of {UPDATES} updates succeeded in {MAX_ATTEMPTS} attempts"))
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a writer thread panicked".to_owned())))
            .collect()
    });
    for (t, result) in results.into_iter().enumerate() {
        result.map_err(|e| format!("writer {t}: {e}"))?;
    }
    Ok(())
}

/// Whether a compare-and-swap went through: a precondition failure is a lost race, not an error.
fn swapped(result: Result<(), StoreError>) -> Result<bool, String> {
    match result {
        Ok(()) => Ok(true),
        Err(StoreError::PreconditionFailed) => Ok(false),
        Err(e) => Err(format!("compare-and-swap: unexpected error {e:?}")),
    }
}

fn concurrent_devices<S: IdentityStore>(store: &S) -> Outcome {
    let id = dev_id("contended")?;
    let mut seed = device("contended", "v0", 1)?;
    seed.cloud_to_device_message_count = 0;
    ok("seed put", store.put_device(&seed, &Precondition::MustNotExist))?;
    contend(|| {
        let mut current = ok("read", store.device(&id))?.ok_or("the device vanished")?;
        let etag = current.etag.clone().ok_or("the device lost its etag")?;
        let n = current.cloud_to_device_message_count + 1;
        current.cloud_to_device_message_count = n;
        current.etag = Some(ETag::new(format!("v{n}")));
        swapped(store.put_device(&current, &Precondition::Matches(etag.bare().to_owned())))
    })?;
    let last = ok("final read", store.device(&id))?.ok_or("the device vanished")?;
    let want = THREADS as u64 * UPDATES;
    let total = u64::try_from(last.cloud_to_device_message_count).map_err(|e| e.to_string())?;
    ensure!(total == want, "the counter ended at {total} after {want} successful updates (lost updates)");
    Ok(())
}

/// `put_*_keeping_activity`: the identity fields are written, the stored activity fields
/// (connection state and its time, last activity, message count) stay; with nothing stored the
/// identity is written as given; preconditions are those of `put_*`.
fn update_keeps_activity<S: IdentityStore>(store: &S) -> Outcome {
    // rev 2 is enabled and connected; rev 3 is disabled and disconnected, with other times.
    let stored = device("dev-a", "e1", 2)?;
    ok("put", store.put_device(&stored, &Precondition::None))?;
    let update = device("dev-a", "e2", 3)?;
    ok("update keeping activity", store.put_device_keeping_activity(&update, &must("e1")))?;
    let mut want = update.clone();
    keep_device_activity(&mut want, &stored);
    let got = ok("read", store.device(&dev_id("dev-a")?))?.ok_or("the device vanished")?;
    ensure!(to_json!(&got)? == to_json!(&want)?, "stored {got:?}, expected {want:?}");
    let counts = ok("count", store.count_devices())?;
    ensure!(
        (counts.connected, counts.disabled) == (1, 1),
        "the counts follow the kept connection state and the new status: {counts:?}"
    );
    fails(
        "update keeping activity with a superseded etag",
        store.put_device_keeping_activity(&device("dev-a", "e3", 4)?, &must("e1")),
        &StoreError::PreconditionFailed,
    )?;
    fails(
        "update keeping activity of a missing device",
        store.put_device_keeping_activity(&device("dev-b", "e1", 4)?, &Precondition::MustExist),
        &StoreError::NotFound,
    )?;
    let fresh = device("dev-c", "e1", 2)?;
    ok("create keeping activity", store.put_device_keeping_activity(&fresh, &Precondition::MustNotExist))?;
    let got = ok("read", store.device(&dev_id("dev-c")?))?.ok_or("the device vanished")?;
    ensure!(to_json!(&got)? == to_json!(&fresh)?, "a new device is written as given: {got:?}");

    let stored = module("dev-a", "m-1", "e1", 2)?;
    ok("put of a module", store.put_module(&stored, &Precondition::None))?;
    let update = module("dev-a", "m-1", "e2", 3)?;
    ok("module update keeping activity", store.put_module_keeping_activity(&update, &must("e1")))?;
    let mut want = update.clone();
    keep_module_activity(&mut want, &stored);
    let got = ok("read", store.module(&dev_id("dev-a")?, &mod_id("m-1")?))?.ok_or("the module vanished")?;
    ensure!(to_json!(&got)? == to_json!(&want)?, "stored {got:?}, expected {want:?}");
    fails(
        "module update keeping activity with a superseded etag",
        store.put_module_keeping_activity(&module("dev-a", "m-1", "e3", 4)?, &must("e1")),
        &StoreError::PreconditionFailed,
    )?;
    fails(
        "module keeping activity under a missing device",
        store.put_module_keeping_activity(&module("dev-x", "m-1", "e1", 4)?, &Precondition::None),
        &StoreError::NotFound,
    )?;
    Ok(())
}

/// Connection-state writes (the etag kept, `lastActivityTime` counting them) race identity
/// updates (a new etag, written keeping the activity): no connection write is undone.
fn concurrent_activity<S: IdentityStore>(store: &S) -> Outcome {
    const CONNECTIONS: i64 = 300;
    let id = dev_id("busy")?;
    let mut seed = device("busy", "v0", 1)?;
    seed.last_activity_time = Some(at(0));
    ok("seed put", store.put_device(&seed, &Precondition::MustNotExist))?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (connections, updates) = std::thread::scope(|scope| {
        let connect = scope.spawn(|| -> Result<i64, String> {
            let mut written = 0;
            for _ in 0..MAX_ATTEMPTS {
                if written == CONNECTIONS {
                    break;
                }
                let mut d = ok("read", store.device(&id))?.ok_or("the device vanished")?;
                let etag = d.etag.clone().ok_or("the device lost its etag")?;
                let n =
                    d.last_activity_time.map_or(0, |t| (t.unix_nanos() - at(0).unix_nanos()) / 1_000_000_000);
                d.last_activity_time = Some(at(n + 1));
                if swapped(store.put_device(&d, &Precondition::Matches(etag.bare().to_owned())))? {
                    written += 1;
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(written)
        });
        let update = scope.spawn(|| -> Result<i64, String> {
            let mut written = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let mut d = ok("read", store.device(&id))?.ok_or("the device vanished")?;
                let etag = d.etag.clone().ok_or("the device lost its etag")?;
                written += 1;
                d.etag = Some(ETag::new(format!("u{written}")));
                d.status_reason = Some(format!("update {written}"));
                let pre = Precondition::Matches(etag.bare().to_owned());
                if !swapped(store.put_device_keeping_activity(&d, &pre))? {
                    written -= 1;
                }
            }
            Ok(written)
        });
        let join = |r: std::thread::Result<Result<i64, String>>| {
            r.unwrap_or_else(|_| Err("a writer thread panicked".to_owned()))
        };
        (join(connect.join()), join(update.join()))
    });
    let (connections, updates) = (connections?, updates?);
    ensure!(connections == CONNECTIONS, "only {connections} of {CONNECTIONS} connection writes went through");
    let last = ok("final read", store.device(&id))?.ok_or("the device vanished")?;
    ensure!(
        last.last_activity_time == Some(at(CONNECTIONS)),
        "lastActivityTime ended at {:?} after {CONNECTIONS} connection writes and {updates} updates \
         (an update put back an older one)",
        last.last_activity_time
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Twins

struct DeviceTwins;
struct ModuleTwins;

/// A twin written `rev` times by its device after creation, so `rev` sets its revision and
/// leaves its etag alone.
pub(crate) fn twin(rev: u32) -> Result<TwinDocument, String> {
    let mut tags = Map::new();
    tags.insert("site".to_owned(), json!({"plant": 7, "line": "B"}));
    let mut desired = Map::new();
    desired.insert("interval".to_owned(), json!(30));
    let mut doc =
        TwinDocument::with_initial(at(0), &tags, &desired).map_err(|e| format!("sample twin: {e}"))?;
    for r in 0..rev {
        let mut patch = Map::new();
        patch.insert("rev".to_owned(), json!(r + 1));
        doc.patch_reported(at(i64::from(r) + 1), &patch, &IfMatch::Absent)
            .map_err(|e| format!("sample reported patch: {e}"))?;
    }
    Ok(doc)
}

fn twin_revision_token(doc: &TwinDocument) -> String {
    doc.revision().bare().to_owned()
}

impl<S: TwinStore> Keyed<S> for DeviceTwins {
    type Item = StoredTwin;
    const WHAT: &'static str = "device twins";
    fn item(key: &str, rev: u32) -> Result<StoredTwin, String> {
        Ok(StoredTwin { key: TwinKey::device(dev_id(key)?), document: twin(rev)? })
    }
    fn token(item: &StoredTwin) -> String {
        twin_revision_token(&item.document)
    }
    fn json(item: &StoredTwin) -> Result<Value, String> {
        Ok(json!({"key": twin_name(item), "document": to_json!(&item.document)?}))
    }
    fn get(store: &S, key: &str) -> Result<Option<StoredTwin>, String> {
        let key = TwinKey::device(dev_id(key)?);
        let found = ok("get of a twin", store.twin(&key))?;
        Ok(found.map(|document| StoredTwin { key, document }))
    }
    fn put(store: &S, item: &StoredTwin, pre: &Precondition) -> Result<(), StoreError> {
        store.put_twin(&item.key, &item.document, pre)
    }
    fn delete(store: &S, key: &str, pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String> {
        Ok(Some(store.delete_twin(&TwinKey::device(dev_id(key)?), pre)))
    }
}

/// Module twins of one device; no device twin is needed for them.
impl<S: TwinStore> Keyed<S> for ModuleTwins {
    type Item = StoredTwin;
    const WHAT: &'static str = "module twins";
    fn item(key: &str, rev: u32) -> Result<StoredTwin, String> {
        Ok(StoredTwin { key: TwinKey::module(dev_id(PARENT)?, mod_id(key)?), document: twin(rev)? })
    }
    fn token(item: &StoredTwin) -> String {
        twin_revision_token(&item.document)
    }
    fn json(item: &StoredTwin) -> Result<Value, String> {
        Ok(json!({"key": twin_name(item), "document": to_json!(&item.document)?}))
    }
    fn get(store: &S, key: &str) -> Result<Option<StoredTwin>, String> {
        let key = TwinKey::module(dev_id(PARENT)?, mod_id(key)?);
        let found = ok("get of a twin", store.twin(&key))?;
        Ok(found.map(|document| StoredTwin { key, document }))
    }
    fn put(store: &S, item: &StoredTwin, pre: &Precondition) -> Result<(), StoreError> {
        store.put_twin(&item.key, &item.document, pre)
    }
    fn delete(store: &S, key: &str, pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String> {
        Ok(Some(store.delete_twin(&TwinKey::module(dev_id(PARENT)?, mod_id(key)?), pre)))
    }
}

fn missing_twins<S: TwinStore>(store: &S) -> Outcome {
    let never = dev_id("never-written")?;
    ensure!(
        ok("get", store.twin(&TwinKey::device(never.clone())))?.is_none(),
        "a device twin never written reads as stored"
    );
    ensure!(
        ok("get", store.twin(&TwinKey::module(never.clone(), mod_id("m")?)))?.is_none(),
        "a module twin never written reads as stored"
    );
    let listed = ok("device_twins of a device never written", store.device_twins(&never))?;
    ensure!(listed.is_empty(), "a device never written has {} twins", listed.len());
    Ok(())
}

fn twin_name(t: &StoredTwin) -> String {
    match &t.key.module_id {
        Some(m) => format!("{}/{}", t.key.device_id, m),
        None => t.key.device_id.as_str().to_owned(),
    }
}

fn twin_revision<S: TwinStore>(store: &S) -> Outcome {
    let key = TwinKey::device(dev_id("dev-1")?);
    let v0 = twin(0)?;
    ok("put of a new twin", store.put_twin(&key, &v0, &Precondition::MustNotExist))?;
    let v1 = twin(1)?;
    ensure!(v0.etag() == v1.etag(), "sample error: a reported patch changed the etag");
    fails(
        "put Matches(etag) where the etag is not the revision",
        store.put_twin(&key, &v1, &must(v0.etag().bare())),
        &StoreError::PreconditionFailed,
    )?;
    ok(
        "put Matches(revision) of a reported patch",
        store.put_twin(&key, &v1, &must(&twin_revision_token(&v0))),
    )?;
    // A second reported patch from the same read must lose, although the etag is unchanged.
    let concurrent = twin(1)?;
    fails(
        "put of a concurrent reported patch with the superseded revision",
        store.put_twin(&key, &concurrent, &must(&twin_revision_token(&v0))),
        &StoreError::PreconditionFailed,
    )?;
    fails(
        "delete Matches(etag) where the etag is not the revision",
        store.delete_twin(&key, &must(v1.etag().bare())),
        &StoreError::PreconditionFailed,
    )?;
    ok("delete Matches(revision)", store.delete_twin(&key, &must(&twin_revision_token(&v1))))
}

fn device_and_module_twins<S: TwinStore>(store: &S) -> Outcome {
    let d = TwinKey::device(dev_id("dev-1")?);
    let m = TwinKey::module(dev_id("dev-1")?, mod_id("m-1")?);
    ok("put of the device twin", store.put_twin(&d, &twin(1)?, &Precondition::MustNotExist))?;
    ensure!(ok("get", store.twin(&m))?.is_none(), "a device twin reads as its module's twin");
    ok("put of the module twin", store.put_twin(&m, &twin(2)?, &Precondition::MustNotExist))?;
    let got = ok("get", store.twin(&d))?.ok_or("the device twin vanished")?;
    same_json("device twin after the module twin was written", &to_json!(&twin(1)?)?, &to_json!(&got)?)?;
    ok("delete of the module twin", store.delete_twin(&m, &Precondition::None))?;
    ensure!(ok("get", store.twin(&d))?.is_some(), "deleting a module twin deleted the device twin");
    Ok(())
}

fn twins_of_device<S: TwinStore>(store: &S) -> Outcome {
    let mut keys = Vec::new();
    for (d, m) in [
        ("dev-1", None),
        ("dev-1", Some("m-b")),
        ("dev-1", Some("m-a")),
        ("dev-10", None),
        ("dev-10", Some("m-a")),
        ("Dev-1", None),
        ("dev-0", Some("m-a")),
        ("dev-2", None),
    ] {
        let key = match m {
            Some(m) => TwinKey::module(dev_id(d)?, mod_id(m)?),
            None => TwinKey::device(dev_id(d)?),
        };
        ok("put", store.put_twin(&key, &twin(1)?, &Precondition::MustNotExist))?;
        keys.push(key);
    }
    for (device, want) in [
        ("dev-1", vec!["dev-1", "dev-1/m-a", "dev-1/m-b"]),
        ("dev-10", vec!["dev-10", "dev-10/m-a"]),
        ("Dev-1", vec!["Dev-1"]),
        ("dev-0", vec!["dev-0/m-a"]),
        ("DEV-1", vec![]),
    ] {
        let got = ok(&format!("device_twins({device:?})"), store.device_twins(&dev_id(device)?))?;
        let got_names: BTreeSet<String> = got.iter().map(twin_name).collect();
        ensure!(got_names.len() == got.len(), "device_twins({device:?}) returned a twin twice");
        let want = names(want);
        ensure!(got_names == want, "device_twins({device:?}) returned {got_names:?}, expected {want:?}");
        for t in &got {
            let stored = ok("get", store.twin(&t.key))?;
            ensure!(
                stored.as_ref() == Some(&t.document),
                "device_twins returned another document for {}",
                t.key
            );
        }
    }
    Ok(())
}

fn twin_in_order(a: &StoredTwin, b: &StoredTwin) -> bool {
    let (da, db) = (a.key.device_id.as_str(), b.key.device_id.as_str());
    da < db || (da == db && b.key.module_id.is_some() && a.key.module_id != b.key.module_id)
}

fn twin_paging<S: TwinStore>(store: &S) -> Outcome {
    let mut expected = BTreeSet::new();
    // 200 device twins, 50 of them with a module twin; out of order and in mixed case.
    for i in (0..200).map(|i| i * 7 % 200) {
        let id = if i % 2 == 0 { format!("DEV-{i:03}") } else { format!("dev-{i:03}") };
        if i % 4 == 1 {
            let key = TwinKey::module(dev_id(&id)?, mod_id("m-1")?);
            ok("put of a module twin", store.put_twin(&key, &twin(0)?, &Precondition::MustNotExist))?;
            expected.insert(format!("{id}/m-1"));
        }
        ok(
            "put of a device twin",
            store.put_twin(&TwinKey::device(dev_id(&id)?), &twin(0)?, &Precondition::None),
        )?;
        expected.insert(id);
    }
    ensure!(expected.len() == 250, "sample error: {} twins written", expected.len());
    pages_agree(|r| store.twins(r), &[100, 100, 50], 125, &expected, twin_name, twin_in_order)
}

fn concurrent_twins<S: TwinStore>(store: &S) -> Outcome {
    let key = TwinKey::device(dev_id("contended")?);
    ok("seed put", store.put_twin(&key, &twin(0)?, &Precondition::MustNotExist))?;
    contend(|| {
        let mut doc = ok("read", store.twin(&key))?.ok_or("the twin vanished")?;
        let read = doc.revision();
        let n = doc.reported().get("counter").and_then(Value::as_u64).unwrap_or(0);
        let mut patch = Map::new();
        patch.insert("counter".to_owned(), json!(n + 1));
        doc.patch_reported(at(1), &patch, &IfMatch::Absent).map_err(|e| format!("reported patch: {e}"))?;
        swapped(store.put_twin(&key, &doc, &Precondition::Matches(read.bare().to_owned())))
    })?;
    let last = ok("final read", store.twin(&key))?.ok_or("the twin vanished")?;
    let want = THREADS as u64 * UPDATES;
    let total = last.reported().get("counter").and_then(Value::as_u64).unwrap_or(0);
    ensure!(total == want, "the counter ended at {total} after {want} successful updates (lost updates)");
    ensure!(last.version() == 2 + want, "twin version {} after {want} updates of a new twin", last.version());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Jobs

struct Jobs;

impl<S: JobStore> Keyed<S> for Jobs {
    type Item = JobRecord;
    const WHAT: &'static str = "jobs";
    const DELETES: bool = false;
    fn item(key: &str, rev: u32) -> Result<JobRecord, String> {
        let status = if rev % 2 == 0 { JobStatus::Running } else { JobStatus::Scheduled };
        Ok(JobRecord { job: job(key, JobType::ScheduleDeviceMethod, status, rev)?, version: u64::from(rev) })
    }
    fn token(item: &JobRecord) -> String {
        item.etag().bare().to_owned()
    }
    fn json(item: &JobRecord) -> Result<Value, String> {
        Ok(json!({"job": to_json!(&item.job)?, "version": item.version}))
    }
    fn get(store: &S, key: &str) -> Result<Option<JobRecord>, String> {
        ok("get of a job", store.job(&job_id(key)?))
    }
    fn put(store: &S, item: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
        store.put_job(item, pre)
    }
    fn delete(_store: &S, _key: &str, _pre: &Precondition) -> Result<Option<Result<(), StoreError>>, String> {
        Ok(None)
    }
}

fn job(id: &str, job_type: JobType, status: JobStatus, rev: u32) -> Result<JobResponse, String> {
    let method = (job_type == JobType::ScheduleDeviceMethod).then(|| CloudToDeviceMethod {
        method_name: "reboot".to_owned(),
        payload: json!({"delay": rev}),
        response_timeout_in_seconds: Some(30),
        connect_timeout_in_seconds: Some(0),
    });
    Ok(JobResponse {
        job_id: job_id(id)?,
        query_condition: Some(format!("tags.rev = {rev}")),
        created_time: Some(at(0)),
        start_time: Some(at(10)),
        end_time: status.is_terminal().then(|| at(100 + i64::from(rev))),
        max_execution_time_in_seconds: Some(3600),
        job_type,
        cloud_to_device_method: method,
        update_twin: None,
        status,
        failure_reason: (status == JobStatus::Failed).then(|| "timed out".to_owned()),
        status_message: Some(format!("rev {rev}")),
        device_job_statistics: None,
    })
}

fn device_job(job: &str, device: &str, status: DeviceJobStatus, rev: i64) -> Result<DeviceJob, String> {
    Ok(DeviceJob {
        device_id: device.to_owned(),
        job_id: job_id(job)?,
        job_type: JobType::ScheduleUpdateTwin,
        status,
        start_time_utc: at(10),
        end_time_utc: at(3610),
        created_date_time_utc: at(0),
        last_updated_date_time_utc: at(rev),
        outcome: DeviceJobOutcome::default(),
        error: None,
    })
}

fn job_name(j: &JobResponse) -> String {
    j.job_id.as_str().to_owned()
}

fn device_job_name(d: &DeviceJob) -> String {
    format!("{}/{}", d.job_id, d.device_id)
}

fn device_job_in_order(a: &DeviceJob, b: &DeviceJob) -> bool {
    (a.job_id.as_str(), a.device_id.as_str()) < (b.job_id.as_str(), b.device_id.as_str())
}

fn missing_jobs<S: JobStore>(store: &S) -> Outcome {
    ensure!(ok("get", store.job(&job_id("never")?))?.is_none(), "a job never written reads as stored");
    ensure!(
        ok("get", store.device_job(&job_id("never")?, "dev-1"))?.is_none(),
        "a device job never written reads as stored"
    );
    let pages = all_pages(100, |r| store.jobs(&JobFilter::default(), r))?;
    check_pages("empty job listing", &pages, &[0], &BTreeSet::new(), job_name, |_, _| true)?;
    let pages = all_pages(100, |r| store.device_jobs(&DeviceJobFilter::default(), r))?;
    check_pages("empty device job listing", &pages, &[0], &BTreeSet::new(), device_job_name, |_, _| true)
        .map(drop)
}

fn job_paging<S: JobStore>(store: &S) -> Outcome {
    let mut expected = BTreeSet::new();
    for i in (0..250).map(|i| i * 7 % 250) {
        let id = if i % 2 == 0 { format!("JOB-{i:03}") } else { format!("job-{i:03}") };
        let record =
            JobRecord { job: job(&id, JobType::ScheduleUpdateTwin, JobStatus::Running, 1)?, version: 1 };
        ok("put", store.put_job(&record, &Precondition::MustNotExist))?;
        expected.insert(id);
    }
    pages_agree(
        |r| store.jobs(&JobFilter::default(), r),
        &[100, 100, 50],
        125,
        &expected,
        job_name,
        |a, b| a.job_id.as_str() < b.job_id.as_str(),
    )
}

/// A token a client made up (the job query's `x-ms-continuation` is client input) is
/// [`StoreError::InvalidContinuation`], which the hub answers with 400, not a backend failure.
fn forged_job_tokens<S: JobStore>(store: &S) -> Outcome {
    let record =
        JobRecord { job: job("job-1", JobType::ScheduleUpdateTwin, JobStatus::Running, 1)?, version: 1 };
    ok("put", store.put_job(&record, &Precondition::MustNotExist))?;
    ok(
        "put of a device job",
        store.put_device_job(&device_job("job-1", "dev-1", DeviceJobStatus::Running, 1)?),
    )?;
    for token in ["not a token!", "", "e30", "5b5d", "7b7d"] {
        let page = PageRequest { continuation: Some(token.to_owned()), max_items: 10 };
        fails(
            &format!("jobs after the token {token:?}"),
            store.jobs(&JobFilter::default(), &page),
            &StoreError::InvalidContinuation,
        )?;
        fails(
            &format!("device jobs after the token {token:?}"),
            store.device_jobs(&DeviceJobFilter::default(), &page),
            &StoreError::InvalidContinuation,
        )?;
    }
    Ok(())
}

fn job_filters<S: JobStore>(store: &S) -> Outcome {
    let statuses = [JobStatus::Running, JobStatus::Completed, JobStatus::Scheduled];
    let mut all = Vec::new();
    for i in 0..300 {
        let job_type = if i % 2 == 0 { JobType::ScheduleUpdateTwin } else { JobType::ScheduleDeviceMethod };
        let status = statuses[i % 3];
        let id = format!("job-{i:03}");
        let record = JobRecord { job: job(&id, job_type, status, 1)?, version: 1 };
        ok("put", store.put_job(&record, &Precondition::MustNotExist))?;
        all.push((id, job_type, status));
    }
    let cases = [
        JobFilter { job_type: Some(JobType::ScheduleUpdateTwin), status: None },
        JobFilter { job_type: None, status: Some(JobStatus::Completed) },
        JobFilter { job_type: Some(JobType::ScheduleDeviceMethod), status: Some(JobStatus::Running) },
        JobFilter { job_type: Some(JobType::Export), status: None },
    ];
    for filter in cases {
        let expected: BTreeSet<String> = all
            .iter()
            .filter(|(_, t, s)| {
                filter.job_type.is_none_or(|f| f == *t) && filter.status.is_none_or(|f| f == *s)
            })
            .map(|(id, _, _)| id.clone())
            .collect();
        let pages = all_pages(40, |r| store.jobs(&filter, r))?;
        let mut sizes = vec![40; expected.len() / 40];
        if expected.len() % 40 != 0 || expected.is_empty() {
            sizes.push(expected.len() % 40);
        }
        check_pages(
            &format!("jobs with {filter:?} in pages of 40"),
            &pages,
            &sizes,
            &expected,
            job_name,
            |a, b| a.job_id.as_str() < b.job_id.as_str(),
        )?;
    }
    Ok(())
}

fn device_job_records<S: JobStore>(store: &S) -> Outcome {
    let j = job_id("job-1")?;
    let first = device_job("job-1", "Dev-1", DeviceJobStatus::Scheduled, 1)?;
    ok("put", store.put_device_job(&first))?;
    let got = ok("get", store.device_job(&j, "Dev-1"))?;
    ensure!(got.as_ref() == Some(&first), "the device job read back differs from the one written");
    for other in ["dev-1", "DEV-1"] {
        ensure!(
            ok("get", store.device_job(&j, other))?.is_none(),
            "device job of \"Dev-1\" found as {other:?}"
        );
    }
    ensure!(
        ok("get", store.device_job(&job_id("JOB-1")?, "Dev-1"))?.is_none(),
        "device job of job-1 found under JOB-1"
    );
    let mut done = device_job("job-1", "Dev-1", DeviceJobStatus::Failed, 2)?;
    done.error = Some(zerotouch_proto::jobs::DeviceJobError {
        code: "DeviceNotOnline".to_owned(),
        description: "the device did not connect".to_owned(),
    });
    ok("replace", store.put_device_job(&done))?;
    let got = ok("get after replace", store.device_job(&j, "Dev-1"))?;
    ensure!(got.as_ref() == Some(&done), "the replaced device job reads back as the old one or another");
    let pages = all_pages(100, |r| store.device_jobs(&DeviceJobFilter::default(), r))?;
    check_pages(
        "device jobs after a replace",
        &pages,
        &[1],
        &names(["job-1/Dev-1"]),
        device_job_name,
        device_job_in_order,
    )
    .map(drop)
}

fn device_job_filters<S: JobStore>(store: &S) -> Outcome {
    let mut all = BTreeSet::new();
    // 5 jobs × 50 devices, written out of order.
    for i in (0..250).map(|i| i * 7 % 250) {
        let job = format!("job-{}", i % 5);
        let device = if i % 2 == 0 { format!("Dev-{:02}", i / 5) } else { format!("dev-{:02}", i / 5) };
        ok("put", store.put_device_job(&device_job(&job, &device, DeviceJobStatus::Pending, 1)?))?;
        all.insert(format!("{job}/{device}"));
    }
    pages_agree(
        |r| store.device_jobs(&DeviceJobFilter::default(), r),
        &[100, 100, 50],
        125,
        &all,
        device_job_name,
        device_job_in_order,
    )?;
    let of_job: BTreeSet<String> = all.iter().filter(|n| n.starts_with("job-3/")).cloned().collect();
    let filter = DeviceJobFilter { job_id: Some(job_id("job-3")?), device_id: None };
    let pages = all_pages(20, |r| store.device_jobs(&filter, r))?;
    check_pages(
        "device jobs of job-3 in pages of 20",
        &pages,
        &[20, 20, 10],
        &of_job,
        device_job_name,
        device_job_in_order,
    )?;
    let device = all.iter().find_map(|n| n.strip_prefix("job-3/")).ok_or("sample error")?.to_owned();
    let of_device: BTreeSet<String> =
        all.iter().filter(|n| n.ends_with(&format!("/{device}"))).cloned().collect();
    let filter = DeviceJobFilter { job_id: None, device_id: Some(device.clone()) };
    let pages = all_pages(100, |r| store.device_jobs(&filter, r))?;
    check_pages(
        &format!("device jobs of {device}"),
        &pages,
        &[of_device.len()],
        &of_device,
        device_job_name,
        device_job_in_order,
    )?;
    let filter = DeviceJobFilter { job_id: None, device_id: Some(device.to_ascii_uppercase()) };
    let pages = all_pages(100, |r| store.device_jobs(&filter, r))?;
    check_pages(
        "device jobs of a device id in another case",
        &pages,
        &[0],
        &BTreeSet::new(),
        device_job_name,
        device_job_in_order,
    )?;
    let filter = DeviceJobFilter { job_id: Some(job_id("job-3")?), device_id: Some(device.clone()) };
    let pages = all_pages(100, |r| store.device_jobs(&filter, r))?;
    check_pages(
        "device jobs of one job and device",
        &pages,
        &[1],
        &names([format!("job-3/{device}").as_str()]),
        device_job_name,
        device_job_in_order,
    )?;
    let filter = DeviceJobFilter { job_id: Some(job_id("JOB-3")?), device_id: None };
    let pages = all_pages(100, |r| store.device_jobs(&filter, r))?;
    check_pages(
        "device jobs of a job id in another case",
        &pages,
        &[0],
        &BTreeSet::new(),
        device_job_name,
        device_job_in_order,
    )
    .map(drop)
}

fn purge_jobs<S: JobStore>(store: &S) -> Outcome {
    // `job` gives terminal jobs the end time 100 + rev.
    let cutoff = at(150);
    let jobs = [
        ("old-completed", JobStatus::Completed, 10, true),
        ("old-failed", JobStatus::Failed, 49, true),
        ("at-cutoff", JobStatus::Cancelled, 50, false),
        ("recent", JobStatus::Completed, 90, false),
        ("still-running", JobStatus::Running, 10, false),
    ];
    for (id, status, rev, _) in jobs {
        let mut record = JobRecord { job: job(id, JobType::ScheduleUpdateTwin, status, rev)?, version: 1 };
        if status == JobStatus::Running {
            // A running job with an end time in the past is still not finished.
            record.job.end_time = Some(at(100));
        }
        ok("put", store.put_job(&record, &Precondition::MustNotExist))?;
        for d in ["dev-1", "dev-2"] {
            ok(
                "put of a device job",
                store.put_device_job(&device_job(id, d, DeviceJobStatus::Completed, 1)?),
            )?;
        }
    }
    let removed = ok("purge_jobs", store.purge_jobs(cutoff))?;
    ensure!(removed == 2, "purge_jobs removed {removed} jobs, expected 2");
    for (id, _, _, purged) in jobs {
        let j = job_id(id)?;
        let stored = ok("get", store.job(&j))?.is_some();
        ensure!(
            stored != purged,
            "after purge, job {id} is {}",
            if stored { "still stored" } else { "gone" }
        );
        for d in ["dev-1", "dev-2"] {
            let record = ok("get", store.device_job(&j, d))?.is_some();
            ensure!(
                record != purged,
                "after purge, the device job {id}/{d} is {}",
                if record { "still stored" } else { "gone" }
            );
        }
    }
    let pages = all_pages(100, |r| store.device_jobs(&DeviceJobFilter::default(), r))?;
    let left: BTreeSet<String> = jobs
        .iter()
        .filter(|j| !j.3)
        .flat_map(|j| ["dev-1", "dev-2"].map(|d| format!("{}/{d}", j.0)))
        .collect();
    check_pages("device jobs after purge", &pages, &[6], &left, device_job_name, device_job_in_order)?;
    let again = ok("second purge_jobs", store.purge_jobs(cutoff))?;
    ensure!(again == 0, "a second purge with the same cutoff removed {again} jobs, expected 0");
    Ok(())
}

fn concurrent_jobs<S: JobStore>(store: &S) -> Outcome {
    let id = job_id("contended")?;
    let seed =
        JobRecord { job: job("contended", JobType::ScheduleUpdateTwin, JobStatus::Running, 0)?, version: 0 };
    ok("seed put", store.put_job(&seed, &Precondition::MustNotExist))?;
    contend(|| {
        let mut current = ok("read", store.job(&id))?.ok_or("the job vanished")?;
        let etag = current.etag();
        current.version += 1;
        let stats = current.job.device_job_statistics.get_or_insert_with(Default::default);
        stats.succeeded_count += 1;
        swapped(store.put_job(&current, &Precondition::Matches(etag.bare().to_owned())))
    })?;
    let last = ok("final read", store.job(&id))?.ok_or("the job vanished")?;
    let want = THREADS as u64 * UPDATES;
    let total = last.job.device_job_statistics.map(|s| s.succeeded_count).unwrap_or(0);
    ensure!(total == want, "the counter ended at {total} after {want} successful updates (lost updates)");
    ensure!(last.version == want, "version {} after {want} updates", last.version);
    Ok(())
}

/// The suite must reject stores that break the contract, or a passing backend proves nothing.
#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::time::Duration;

    use zerotouch_engine::jobs::MemoryJobStore;
    use zerotouch_engine::registry::MemoryIdentityStore;
    use zerotouch_engine::twin::MemoryTwinStore;

    use super::*;

    /// Runs `suite` and returns the name of the case it failed, if any.
    fn failed_case(suite: impl FnOnce()) -> Option<String> {
        let payload = catch_unwind(AssertUnwindSafe(suite)).err()?;
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        message.split('`').nth(1).map(str::to_owned)
    }

    /// Identities over a correct store with one fault: device lookups that fall back to a
    /// case-insensitive match (a SQL backend with a case-insensitive collation), or a
    /// compare-and-swap that checks and writes in two steps.
    #[derive(Default)]
    struct FaultyIdentities {
        inner: MemoryIdentityStore,
        case_insensitive_lookup: bool,
        check_then_write: bool,
    }

    impl IdentityStore for FaultyIdentities {
        fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
            let found = self.inner.device(id)?;
            if found.is_some() || !self.case_insensitive_lookup {
                return Ok(found);
            }
            let all = self.inner.devices(&PageRequest { continuation: None, max_items: 10_000 })?;
            Ok(all.items.into_iter().find(|d| d.device_id.as_str().eq_ignore_ascii_case(id.as_str())))
        }
        fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
            if !self.check_then_write {
                return self.inner.put_device(device, pre);
            }
            let current = self.inner.device(&device.device_id)?;
            pre.check(current.as_ref().and_then(|d| d.etag.as_ref()))?;
            // Widens the window between check and write, as a slow backend would.
            std::thread::sleep(Duration::from_micros(200));
            self.inner.put_device(device, &Precondition::None)
        }
        fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
            self.inner.put_device_keeping_activity(device, pre)
        }
        fn delete_device(
            &self,
            id: &DeviceId,
            pre: &Precondition,
        ) -> Result<(Device, Vec<Module>), StoreError> {
            self.inner.delete_device(id, pre)
        }
        fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError> {
            self.inner.devices(page)
        }
        fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
            self.inner.count_devices()
        }
        fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError> {
            self.inner.module(device, module)
        }
        fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
            self.inner.put_module(module, pre)
        }
        fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
            self.inner.put_module_keeping_activity(module, pre)
        }
        fn delete_module(
            &self,
            device: &DeviceId,
            module: &ModuleId,
            pre: &Precondition,
        ) -> Result<Module, StoreError> {
            self.inner.delete_module(device, module, pre)
        }
        fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError> {
            self.inner.modules(device)
        }
    }

    /// Twins whose preconditions are checked against the twin etag instead of the revision.
    #[derive(Default)]
    struct EtagCheckedTwins(MemoryTwinStore);

    impl TwinStore for EtagCheckedTwins {
        fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
            self.0.twin(key)
        }
        fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
            pre.check(self.0.twin(key)?.map(|t| t.etag()).as_ref())?;
            self.0.put_twin(key, twin, &Precondition::None)
        }
        fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
            pre.check(self.0.twin(key)?.map(|t| t.etag()).as_ref())?;
            self.0.delete_twin(key, &Precondition::None)
        }
        fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
            self.0.twins(page)
        }
        fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
            self.0.device_twins(device_id)
        }
    }

    /// Jobs whose purge leaves the device job records of the purged jobs behind.
    #[derive(Default)]
    struct OrphaningPurge(MemoryJobStore);

    impl JobStore for OrphaningPurge {
        fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
            self.0.job(id)
        }
        fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
            self.0.put_job(record, pre)
        }
        fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError> {
            self.0.jobs(filter, page)
        }
        fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError> {
            self.0.put_device_job(record)
        }
        fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError> {
            self.0.device_job(job, device_id)
        }
        fn device_jobs(
            &self,
            filter: &DeviceJobFilter,
            page: &PageRequest,
        ) -> Result<Page<DeviceJob>, StoreError> {
            self.0.device_jobs(filter, page)
        }
        fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
            let all = PageRequest { continuation: None, max_items: 10_000 };
            let records = self.0.device_jobs(&DeviceJobFilter::default(), &all)?;
            let purged = self.0.purge_jobs(cutoff)?;
            for r in &records.items {
                self.0.put_device_job(r)?;
            }
            Ok(purged)
        }
    }

    #[test]
    fn a_store_that_finds_devices_in_any_case_fails_the_case_sensitivity_case() {
        let case = failed_case(|| {
            identity_store(|| FaultyIdentities { case_insensitive_lookup: true, ..Default::default() })
        });
        assert_eq!(case.as_deref(), Some("devices: ids are case-sensitive"));
    }

    #[test]
    fn a_store_that_checks_and_writes_in_two_steps_loses_device_updates_under_contention() {
        let case = failed_case(|| {
            identity_store(|| FaultyIdentities { check_then_write: true, ..Default::default() })
        });
        assert_eq!(
            case.as_deref(),
            Some("identities: 8 threads doing compare-and-swap updates lose no update")
        );
    }

    #[test]
    fn a_twin_store_that_compares_etags_instead_of_revisions_is_caught() {
        let case = failed_case(|| twin_store(EtagCheckedTwins::default));
        assert_eq!(case.as_deref(), Some("device twins: put honours every precondition"));
    }

    #[test]
    fn a_job_store_whose_purge_leaves_device_jobs_behind_fails_the_purge_case() {
        let case = failed_case(|| job_store(OrphaningPurge::default));
        assert_eq!(
            case.as_deref(),
            Some("jobs: purge removes finished jobs ended before the cutoff with their records")
        );
    }

    #[test]
    fn the_memory_stores_pass_every_case() {
        assert_eq!(
            failed_case(|| run_all(MemoryIdentityStore::new, MemoryTwinStore::new, MemoryJobStore::new)),
            None
        );
    }
}
