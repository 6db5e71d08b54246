//! Store conformance suite: the behaviour every store backend must show, one fresh store per case.
//!
//! A backend's test calls [`run_all`] (or one function per trait) with a constructor of empty
//! stores. Every case panics with a message that names the case and what went wrong.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use zerotouch_engine::store::{
    AttestedVia, CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentRef, EnrollmentStore,
    OperationRecord, OperationStatus, Page, PageRequest, Precondition, ProvisioningStore, RegistrationRecord,
    RegistrationStore,
};
use zerotouch_engine::StoreError;
use zerotouch_proto::device::{
    DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus, Substatus,
};
use zerotouch_proto::service::{
    AllocationPolicy, AttestationMechanism, AttestationType, DeviceCapabilities, DeviceRegistrationState,
    EnrollmentGroup, IndividualEnrollment, InitialTwin, InitialTwinProperties, ProvisioningStatus,
    ReprovisionPolicy, SymmetricKeyAttestation, X509Attestation, X509CaReferences, X509CertificateInfo,
    X509CertificateWithInfo, X509Certificates,
};
use zerotouch_proto::{DeviceId, ETag, EnrollmentGroupId, OperationId, RegistrationId, Timestamp};

/// Runs every case of the suite, each against a store fresh from `make`.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn run_all<S: ProvisioningStore>(make: impl Fn() -> S) {
    enrollment_store(&make);
    enrollment_group_store(&make);
    ca_certificate_store(&make);
    registration_store(&make);
}

/// Individual enrollments: lookup, round-trip, case-insensitive ids, preconditions on put and
/// delete, paging.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn enrollment_store<S: EnrollmentStore>(make: impl Fn() -> S) {
    table_cases::<S, Enrollments>(&make);
    paging_cases::<S, Enrollments>(&make);
}

/// Enrollment groups: the same cases as enrollments, plus [`EnrollmentGroupStore::symmetric_key_groups`]
/// and [`EnrollmentGroupStore::groups_by_ca_subject`], which also reads CA certificates (hence the
/// second bound).
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn enrollment_group_store<S: EnrollmentGroupStore + CaCertificateStore>(make: impl Fn() -> S) {
    table_cases::<S, Groups>(&make);
    paging_cases::<S, Groups>(&make);
    run("groups: only symmetric-key groups are listed as symmetric-key groups", &make, symmetric_key_groups);
    run(
        "groups: found by the subject of a primary or secondary signing certificate",
        &make,
        groups_by_signing,
    );
    run("groups: found through caReferences to a stored CA certificate", &make, groups_by_reference);
    run(
        "groups: caReferences follow the CA certificate as it is replaced or deleted",
        &make,
        reference_follows_ca,
    );
}

/// CA certificates: lookup, round-trip, preconditions on put and delete.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn ca_certificate_store<S: CaCertificateStore>(make: impl Fn() -> S) {
    table_cases::<S, CaCertificates>(&make);
}

/// Registration records and operations: atomic commit of record and operation, compare-and-swap
/// on the record etag, case-insensitive ids, deletes, listing by group, operation purge, and 8
/// threads updating one record without losing an update.
///
/// # Panics
/// On the first case the store fails, naming the case.
pub fn registration_store<S: RegistrationStore>(make: impl Fn() -> S) {
    run("registrations: a missing record and a missing operation read as None", &make, missing_registration);
    run("registrations: commit stores the record and its operation", &make, commit_round_trip);
    run("registrations: ids are case-insensitive", &make, registration_case_insensitive);
    run(
        "registrations: commit honours every precondition and stores no rejected operation",
        &make,
        commit_cas,
    );
    run("registrations: delete honours every precondition", &make, delete_registration);
    run("registrations: listing by group filters by group and pages", &make, registrations_by_group);
    run("registrations: an operation without a record round-trips", &make, operation_round_trip);
    run("registrations: purge removes exactly the operations created before the cutoff", &make, purge);
    run("registrations: 8 threads doing read-modify-write lose no update", &make, concurrent_updates);
}

/// What one case returns: `Err` says what went wrong.
type Outcome = Result<(), String>;

fn run<S>(name: &str, make: &impl Fn() -> S, case: impl FnOnce(&S) -> Outcome) {
    let store = make();
    if let Err(why) = case(&store) {
        panic!("store conformance case `{name}` failed: {why}");
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

fn fails(what: &str, result: Result<(), StoreError>, expected: &StoreError) -> Outcome {
    match result {
        Err(e) if &e == expected => Ok(()),
        Err(e) => Err(format!("{what}: expected {expected:?}, got {e:?}")),
        Ok(()) => Err(format!("{what}: expected {expected:?}, but it succeeded")),
    }
}

/// Compares two JSON values; the message names only the differing members, because the values
/// may hold (test) key material.
pub(crate) fn same_json(what: &str, expected: &Value, actual: &Value) -> Outcome {
    if expected == actual {
        return Ok(());
    }
    let differing: Vec<&str> = match (expected, actual) {
        (Value::Object(a), Value::Object(b)) => {
            a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).map(String::as_str).collect()
        }
        _ => vec!["<whole value>"],
    };
    Err(format!("{what}: what was read back differs from what was written in {differing:?}"))
}

/// Serializes a store value; a macro so the suite needs no direct serde dependency.
macro_rules! to_json {
    ($value:expr) => {
        serde_json::to_value($value).map_err(|e| format!("cannot serialize a stored value: {e}"))
    };
}

fn reg_id(s: &str) -> Result<RegistrationId, String> {
    RegistrationId::new(s).map_err(|e| format!("bad sample registration id {s:?}: {e}"))
}

fn group_id(s: &str) -> Result<EnrollmentGroupId, String> {
    EnrollmentGroupId::new(s).map_err(|e| format!("bad sample group id {s:?}: {e}"))
}

fn op_id(s: &str) -> Result<OperationId, String> {
    OperationId::new(s).map_err(|e| format!("bad sample operation id {s:?}: {e}"))
}

/// A fixed instant plus `secs`, so samples never depend on a clock.
fn at(secs: i64) -> Timestamp {
    Timestamp::from_unix_nanos(1_700_000_000_123_456_700 + secs * 1_000_000_000)
}

fn must(pre: &str) -> Precondition {
    Precondition::Matches(pre.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Shared cases of the keyed tables (enrollments, groups, CA certificates)

/// How the shared cases reach one keyed table of a store.
trait Table<S> {
    type Key;
    type Item;
    /// Singular noun used in case names.
    const WHAT: &'static str;
    /// Whether keys compare ASCII case-insensitively.
    const CASE_INSENSITIVE: bool;
    fn key(s: &str) -> Result<Self::Key, String>;
    /// A sample under key `key` with etag `etag` (bare; samples store it quoted where DPS does);
    /// `rev` varies the content so versions can be told apart.
    fn item(key: &str, etag: &str, rev: u32) -> Result<Self::Item, String>;
    fn key_of(item: &Self::Item) -> String;
    fn json(item: &Self::Item) -> Result<Value, String>;
    fn get(store: &S, key: &Self::Key) -> Result<Option<Self::Item>, StoreError>;
    fn put(store: &S, item: &Self::Item, pre: &Precondition) -> Result<(), StoreError>;
    fn delete(store: &S, key: &Self::Key, pre: &Precondition) -> Result<(), StoreError>;
}

/// A keyed table that can be listed page by page.
trait Listed<S>: Table<S> {
    fn list(store: &S, page: &PageRequest) -> Result<Page<Self::Item>, StoreError>;
}

struct Enrollments;
struct Groups;
struct CaCertificates;

impl<S: EnrollmentStore> Table<S> for Enrollments {
    type Key = RegistrationId;
    type Item = IndividualEnrollment;
    const WHAT: &'static str = "enrollments";
    const CASE_INSENSITIVE: bool = true;
    fn key(s: &str) -> Result<Self::Key, String> {
        reg_id(s)
    }
    fn item(key: &str, etag: &str, rev: u32) -> Result<Self::Item, String> {
        enrollment(key, etag, rev)
    }
    fn key_of(item: &Self::Item) -> String {
        item.registration_id.as_str().to_owned()
    }
    fn json(item: &Self::Item) -> Result<Value, String> {
        to_json!(item)
    }
    fn get(store: &S, key: &Self::Key) -> Result<Option<Self::Item>, StoreError> {
        store.enrollment(key)
    }
    fn put(store: &S, item: &Self::Item, pre: &Precondition) -> Result<(), StoreError> {
        store.put_enrollment(item, pre)
    }
    fn delete(store: &S, key: &Self::Key, pre: &Precondition) -> Result<(), StoreError> {
        store.delete_enrollment(key, pre)
    }
}

impl<S: EnrollmentStore> Listed<S> for Enrollments {
    fn list(store: &S, page: &PageRequest) -> Result<Page<Self::Item>, StoreError> {
        store.enrollments(page)
    }
}

impl<S: EnrollmentGroupStore> Table<S> for Groups {
    type Key = EnrollmentGroupId;
    type Item = EnrollmentGroup;
    const WHAT: &'static str = "groups";
    const CASE_INSENSITIVE: bool = true;
    fn key(s: &str) -> Result<Self::Key, String> {
        group_id(s)
    }
    fn item(key: &str, etag: &str, rev: u32) -> Result<Self::Item, String> {
        symmetric_group(key, etag, rev)
    }
    fn key_of(item: &Self::Item) -> String {
        item.enrollment_group_id.as_str().to_owned()
    }
    fn json(item: &Self::Item) -> Result<Value, String> {
        to_json!(item)
    }
    fn get(store: &S, key: &Self::Key) -> Result<Option<Self::Item>, StoreError> {
        store.enrollment_group(key)
    }
    fn put(store: &S, item: &Self::Item, pre: &Precondition) -> Result<(), StoreError> {
        store.put_enrollment_group(item, pre)
    }
    fn delete(store: &S, key: &Self::Key, pre: &Precondition) -> Result<(), StoreError> {
        store.delete_enrollment_group(key, pre)
    }
}

impl<S: EnrollmentGroupStore> Listed<S> for Groups {
    fn list(store: &S, page: &PageRequest) -> Result<Page<Self::Item>, StoreError> {
        store.enrollment_groups(page)
    }
}

impl<S: CaCertificateStore> Table<S> for CaCertificates {
    type Key = String;
    type Item = CaCertificate;
    const WHAT: &'static str = "CA certificates";
    const CASE_INSENSITIVE: bool = false;
    fn key(s: &str) -> Result<Self::Key, String> {
        Ok(s.to_owned())
    }
    fn item(key: &str, etag: &str, rev: u32) -> Result<Self::Item, String> {
        Ok(ca_certificate(key, &format!("CN=Sample Root {rev}"), etag, rev))
    }
    fn key_of(item: &Self::Item) -> String {
        item.name.clone()
    }
    fn json(item: &Self::Item) -> Result<Value, String> {
        to_json!(item)
    }
    fn get(store: &S, key: &Self::Key) -> Result<Option<Self::Item>, StoreError> {
        store.ca_certificate(key)
    }
    fn put(store: &S, item: &Self::Item, pre: &Precondition) -> Result<(), StoreError> {
        store.put_ca_certificate(item, pre)
    }
    fn delete(store: &S, key: &Self::Key, pre: &Precondition) -> Result<(), StoreError> {
        store.delete_ca_certificate(key, pre)
    }
}

fn table_cases<S, T: Table<S>>(make: &impl Fn() -> S) {
    let what = T::WHAT;
    run(&format!("{what}: get of a missing entry is None"), make, missing::<S, T>);
    run(&format!("{what}: put then get returns the same JSON"), make, round_trip::<S, T>);
    if T::CASE_INSENSITIVE {
        run(&format!("{what}: ids are case-insensitive"), make, case_insensitive::<S, T>);
    }
    run(&format!("{what}: put honours every precondition"), make, put_preconditions::<S, T>);
    run(&format!("{what}: delete honours every precondition"), make, delete_preconditions::<S, T>);
}

/// Reads `key` and checks it holds exactly `expected` (or nothing).
fn holds<S, T: Table<S>>(store: &S, key: &str, expected: Option<&T::Item>, step: &str) -> Outcome {
    let got = ok(step, T::get(store, &T::key(key)?))?;
    match (expected, got) {
        (None, None) => Ok(()),
        (Some(want), Some(got)) => same_json(step, &T::json(want)?, &T::json(&got)?),
        (None, Some(_)) => Err(format!("{step}: {key:?} is stored but should not be")),
        (Some(_), None) => Err(format!("{step}: {key:?} is missing")),
    }
}

fn missing<S, T: Table<S>>(store: &S) -> Outcome {
    holds::<S, T>(store, "never-written", None, "get of a key never written")
}

fn round_trip<S, T: Table<S>>(store: &S) -> Outcome {
    let item = T::item("sample-1", "e1", 1)?;
    ok("put", T::put(store, &item, &Precondition::MustNotExist))?;
    holds::<S, T>(store, "sample-1", Some(&item), "get after put")?;
    let other = T::item("sample-2", "e1", 2)?;
    ok("put of a second entry", T::put(store, &other, &Precondition::None))?;
    holds::<S, T>(store, "sample-1", Some(&item), "get of the first entry after a second put")?;
    holds::<S, T>(store, "sample-2", Some(&other), "get of the second entry")
}

fn case_insensitive<S, T: Table<S>>(store: &S) -> Outcome {
    let v1 = T::item("Dev-1", "e1", 1)?;
    ok("put of Dev-1", T::put(store, &v1, &Precondition::MustNotExist))?;
    for spelling in ["dev-1", "DEV-1", "Dev-1"] {
        holds::<S, T>(store, spelling, Some(&v1), &format!("get of {spelling:?} after put of \"Dev-1\""))?;
    }
    let read = ok("get", T::get(store, &T::key("dev-1")?))?.ok_or("get of \"dev-1\" found nothing")?;
    ensure!(
        T::key_of(&read) == "Dev-1",
        "the id must keep the case it was written with, got {:?}",
        T::key_of(&read)
    );
    let other_case = T::item("dev-1", "e2", 2)?;
    fails(
        "put of \"dev-1\" with MustNotExist over \"Dev-1\"",
        T::put(store, &other_case, &Precondition::MustNotExist),
        &StoreError::AlreadyExists,
    )?;
    let v2 = T::item("DEV-1", "e2", 2)?;
    ok("put of \"DEV-1\" matching the etag of \"Dev-1\"", T::put(store, &v2, &must("e1")))?;
    holds::<S, T>(store, "Dev-1", Some(&v2), "get of \"Dev-1\" after replacing it as \"DEV-1\"")?;
    ok("delete of \"dEV-1\"", T::delete(store, &T::key("dEV-1")?, &Precondition::None))?;
    holds::<S, T>(store, "dev-1", None, "get after delete under another case")
}

fn put_preconditions<S, T: Table<S>>(store: &S) -> Outcome {
    let key = "dev-1";
    let v = |etag: &str, rev| T::item(key, etag, rev);
    let v1 = v("e1", 1)?;
    fails(
        "put MustExist of a missing entry",
        T::put(store, &v1, &Precondition::MustExist),
        &StoreError::NotFound,
    )?;
    holds::<S, T>(store, key, None, "after the refused MustExist put")?;
    fails("put Matches of a missing entry", T::put(store, &v1, &must("e1")), &StoreError::NotFound)?;
    holds::<S, T>(store, key, None, "after the refused Matches put")?;

    ok("put MustNotExist of a missing entry", T::put(store, &v1, &Precondition::MustNotExist))?;
    holds::<S, T>(store, key, Some(&v1), "after create")?;

    let v2 = v("e2", 2)?;
    fails(
        "put MustNotExist of an existing entry",
        T::put(store, &v2, &Precondition::MustNotExist),
        &StoreError::AlreadyExists,
    )?;
    holds::<S, T>(store, key, Some(&v1), "after the refused MustNotExist put")?;
    fails("put Matches(wrong etag)", T::put(store, &v2, &must("not-e1")), &StoreError::PreconditionFailed)?;
    holds::<S, T>(store, key, Some(&v1), "after the refused Matches(wrong) put")?;

    ok("put Matches(current bare etag)", T::put(store, &v2, &must("e1")))?;
    holds::<S, T>(store, key, Some(&v2), "after Matches(right) put")?;
    fails("put Matches(superseded etag)", T::put(store, &v1, &must("e1")), &StoreError::PreconditionFailed)?;
    holds::<S, T>(store, key, Some(&v2), "after the refused put with a superseded etag")?;

    let v3 = v("e3", 3)?;
    ok("put MustExist of an existing entry", T::put(store, &v3, &Precondition::MustExist))?;
    holds::<S, T>(store, key, Some(&v3), "after MustExist put")?;

    let v4 = v("e4", 4)?;
    ok("unconditional put over an existing entry", T::put(store, &v4, &Precondition::None))?;
    holds::<S, T>(store, key, Some(&v4), "after unconditional replace")?;

    let fresh = T::item("dev-2", "e1", 1)?;
    ok("unconditional put of a missing entry", T::put(store, &fresh, &Precondition::None))?;
    holds::<S, T>(store, "dev-2", Some(&fresh), "after unconditional create")
}

fn delete_preconditions<S, T: Table<S>>(store: &S) -> Outcome {
    let key = "dev-1";
    let k = T::key(key)?;
    for pre in [Precondition::None, Precondition::MustNotExist, Precondition::MustExist, must("e1")] {
        fails(
            &format!("delete {pre:?} of a missing entry"),
            T::delete(store, &k, &pre),
            &StoreError::NotFound,
        )?;
    }
    let v1 = T::item(key, "e1", 1)?;
    ok("put", T::put(store, &v1, &Precondition::None))?;
    fails(
        "delete MustNotExist of an existing entry",
        T::delete(store, &k, &Precondition::MustNotExist),
        &StoreError::AlreadyExists,
    )?;
    holds::<S, T>(store, key, Some(&v1), "after the refused MustNotExist delete")?;
    fails(
        "delete Matches(wrong etag)",
        T::delete(store, &k, &must("not-e1")),
        &StoreError::PreconditionFailed,
    )?;
    holds::<S, T>(store, key, Some(&v1), "after the refused Matches(wrong) delete")?;
    ok("delete Matches(current bare etag)", T::delete(store, &k, &must("e1")))?;
    holds::<S, T>(store, key, None, "after Matches(right) delete")?;

    ok("put again", T::put(store, &v1, &Precondition::None))?;
    ok("delete MustExist of an existing entry", T::delete(store, &k, &Precondition::MustExist))?;
    holds::<S, T>(store, key, None, "after MustExist delete")?;

    ok("put again", T::put(store, &v1, &Precondition::None))?;
    ok("unconditional delete of an existing entry", T::delete(store, &k, &Precondition::None))?;
    holds::<S, T>(store, key, None, "after unconditional delete")?;
    fails("second delete of the same entry", T::delete(store, &k, &Precondition::None), &StoreError::NotFound)
}

// ---------------------------------------------------------------------------------------------
// Paging

/// Pages through a listing with `max_items` per page; returns the pages.
pub(crate) fn all_pages<T>(
    max_items: usize,
    mut list: impl FnMut(&PageRequest) -> Result<Page<T>, StoreError>,
) -> Result<Vec<Page<T>>, String> {
    // A store that never ends its listing must fail the case, not hang it.
    const MAX_PAGES: usize = 1000;
    let mut pages = Vec::new();
    let mut request = PageRequest { continuation: None, max_items };
    loop {
        let page = ok(&format!("listing page {}", pages.len() + 1), list(&request))?;
        ensure!(
            page.items.len() <= max_items,
            "page {} holds {} items, more than the {max_items} asked for",
            pages.len() + 1,
            page.items.len()
        );
        let next = page.continuation.clone();
        pages.push(page);
        match next {
            Some(token) => request.continuation = Some(token),
            None => return Ok(pages),
        }
        ensure!(pages.len() < MAX_PAGES, "the listing did not end after {MAX_PAGES} pages");
    }
}

/// Checks a paged listing: the expected page sizes, every key exactly once.
fn check_pages<T>(
    what: &str,
    pages: &[Page<T>],
    sizes: &[usize],
    expected: &BTreeSet<String>,
    key: impl Fn(&T) -> String,
) -> Result<Vec<String>, String> {
    let got_sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    ensure!(got_sizes == sizes, "{what}: expected pages of {sizes:?} items, got {got_sizes:?}");
    let order: Vec<String> = pages.iter().flat_map(|p| p.items.iter().map(&key)).collect();
    let distinct: BTreeSet<String> = order.iter().cloned().collect();
    ensure!(distinct.len() == order.len(), "{what}: an item was listed twice");
    let gaps: Vec<&String> = expected.difference(&distinct).take(5).collect();
    ensure!(gaps.is_empty(), "{what}: items missing from the listing, e.g. {gaps:?}");
    let extra: Vec<&String> = distinct.difference(expected).take(5).collect();
    ensure!(extra.is_empty(), "{what}: items listed that should not be, e.g. {extra:?}");
    Ok(order)
}

fn paging_cases<S, T: Listed<S>>(make: &impl Fn() -> S) {
    let what = T::WHAT;
    run(&format!("{what}: listing an empty store gives one empty last page"), make, |store| {
        let pages = all_pages(100, |r| T::list(store, r))?;
        check_pages("empty listing", &pages, &[0], &BTreeSet::new(), T::key_of).map(drop)
    });
    run(&format!("{what}: 250 entries list as 100 + 100 + 50 in a stable order"), make, paging::<S, T>);
}

fn paging<S, T: Listed<S>>(store: &S) -> Outcome {
    const N: usize = 250;
    let mut expected = BTreeSet::new();
    // Written out of key order and in mixed case, so the listing order is the store's own.
    for i in (0..N).map(|i| i * 7 % N) {
        let key = if i % 2 == 0 { format!("DEV-{i:03}") } else { format!("dev-{i:03}") };
        let rev = u32::try_from(i).map_err(|e| e.to_string())?;
        ok(&format!("put of {key}"), T::put(store, &T::item(&key, "e1", rev)?, &Precondition::MustNotExist))?;
        expected.insert(key);
    }
    let first = all_pages(100, |r| T::list(store, r))?;
    let order = check_pages("pages of 100", &first, &[100, 100, 50], &expected, T::key_of)?;
    let again = all_pages(100, |r| T::list(store, r))?;
    let order_again =
        check_pages("second listing, pages of 100", &again, &[100, 100, 50], &expected, T::key_of)?;
    ensure!(order == order_again, "two listings of an unchanged store came in different orders");
    let exact = all_pages(125, |r| T::list(store, r))?;
    let order_exact = check_pages(
        "pages of 125 (the last page exactly full has no continuation)",
        &exact,
        &[125, 125],
        &expected,
        T::key_of,
    )?;
    ensure!(order == order_exact, "listing with another page size came in a different order");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Groups by attestation and by CA subject

fn group_keys(groups: &[Arc<EnrollmentGroup>]) -> BTreeSet<String> {
    groups.iter().map(|g| g.enrollment_group_id.as_str().to_owned()).collect()
}

fn names(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

fn put_groups<S: EnrollmentGroupStore>(store: &S, groups: &[EnrollmentGroup]) -> Outcome {
    for g in groups {
        ok(
            &format!("put of group {}", g.enrollment_group_id),
            store.put_enrollment_group(g, &Precondition::MustNotExist),
        )?;
    }
    Ok(())
}

fn expect_by_subject<S: EnrollmentGroupStore>(store: &S, subject: &str, want: &[&str]) -> Outcome {
    let found =
        group_keys(&ok(&format!("groups_by_ca_subject({subject:?})"), store.groups_by_ca_subject(subject))?);
    let want = names(want);
    ensure!(found == want, "groups_by_ca_subject({subject:?}) found {found:?}, expected {want:?}");
    Ok(())
}

fn symmetric_key_groups<S: EnrollmentGroupStore + CaCertificateStore>(store: &S) -> Outcome {
    put_groups(
        store,
        &[
            symmetric_group("sym-a", "e1", 1)?,
            x509_group("x509-a", [Some("CN=Root A"), None], [None, None])?,
            symmetric_group("sym-b", "e1", 2)?,
            x509_group("x509-b", [None, None], [Some("root-a"), None])?,
            symmetric_group("Sym-C", "e1", 3)?,
        ],
    )?;
    let found = group_keys(&ok("symmetric_key_groups", store.symmetric_key_groups())?);
    let want = names(&["sym-a", "sym-b", "Sym-C"]);
    ensure!(found == want, "symmetric_key_groups returned {found:?}, expected {want:?}");
    ok("delete of sym-b", store.delete_enrollment_group(&group_id("sym-b")?, &Precondition::None))?;
    let found = group_keys(&ok("symmetric_key_groups", store.symmetric_key_groups())?);
    let want = names(&["sym-a", "Sym-C"]);
    ensure!(
        found == want,
        "after deleting sym-b, symmetric_key_groups returned {found:?}, expected {want:?}"
    );
    Ok(())
}

fn groups_by_signing<S: EnrollmentGroupStore + CaCertificateStore>(store: &S) -> Outcome {
    put_groups(
        store,
        &[
            x509_group("by-primary", [Some("CN=Root A"), None], [None, None])?,
            x509_group("by-secondary", [Some("CN=Other"), Some("CN=Root A")], [None, None])?,
            x509_group("root-b", [Some("CN=Root B"), None], [None, None])?,
            // Only the issuer is Root A: the subject decides, not the issuer.
            x509_issued_by("issued-by-a", "CN=Intermediate", "CN=Root A")?,
            symmetric_group("sym", "e1", 1)?,
        ],
    )?;
    expect_by_subject(store, "CN=Root A", &["by-primary", "by-secondary"])?;
    expect_by_subject(store, "CN=Root B", &["root-b"])?;
    expect_by_subject(store, "CN=Other", &["by-secondary"])?;
    expect_by_subject(store, "CN=Intermediate", &["issued-by-a"])?;
    expect_by_subject(store, "CN=Nobody", &[])
}

fn groups_by_reference<S: EnrollmentGroupStore + CaCertificateStore>(store: &S) -> Outcome {
    for (name, subject) in [("root-a", "CN=Root A"), ("root-b", "CN=Root B")] {
        ok(
            &format!("put of CA certificate {name}"),
            store.put_ca_certificate(&ca_certificate(name, subject, "e1", 1), &Precondition::MustNotExist),
        )?;
    }
    put_groups(
        store,
        &[
            x509_group("ref-primary", [None, None], [Some("root-a"), None])?,
            x509_group("ref-secondary", [None, None], [Some("root-b"), Some("root-a")])?,
            x509_group("ref-b", [None, None], [Some("root-b"), None])?,
            x509_group("ref-dangling", [None, None], [Some("not-stored"), None])?,
            x509_group("signed-a", [Some("CN=Root A"), None], [None, None])?,
            symmetric_group("sym", "e1", 1)?,
        ],
    )?;
    expect_by_subject(store, "CN=Root A", &["ref-primary", "ref-secondary", "signed-a"])?;
    expect_by_subject(store, "CN=Root B", &["ref-secondary", "ref-b"])?;
    // A CA certificate's name is not its subject.
    expect_by_subject(store, "root-a", &[])?;
    expect_by_subject(store, "not-stored", &[])
}

fn reference_follows_ca<S: EnrollmentGroupStore + CaCertificateStore>(store: &S) -> Outcome {
    ok(
        "put of CA certificate root-a",
        store
            .put_ca_certificate(&ca_certificate("root-a", "CN=Root A", "e1", 1), &Precondition::MustNotExist),
    )?;
    put_groups(store, &[x509_group("ref-a", [None, None], [Some("root-a"), None])?])?;
    expect_by_subject(store, "CN=Root A", &["ref-a"])?;
    ok(
        "replace of root-a with another subject",
        store.put_ca_certificate(&ca_certificate("root-a", "CN=Root A2", "e2", 2), &must("e1")),
    )?;
    expect_by_subject(store, "CN=Root A", &[])?;
    expect_by_subject(store, "CN=Root A2", &["ref-a"])?;
    ok("delete of root-a", store.delete_ca_certificate("root-a", &Precondition::None))?;
    expect_by_subject(store, "CN=Root A2", &[])
}

// ---------------------------------------------------------------------------------------------
// Registration records and operations

fn expect_record<S: RegistrationStore>(
    store: &S,
    id: &str,
    expected: Option<&RegistrationRecord>,
    step: &str,
) -> Outcome {
    let got = ok(step, store.registration(&reg_id(id)?))?;
    match (expected, got) {
        (None, None) => Ok(()),
        (Some(want), Some(got)) => same_json(step, &to_json!(want)?, &to_json!(&got)?),
        (None, Some(_)) => Err(format!("{step}: a record for {id:?} is stored but should not be")),
        (Some(_), None) => Err(format!("{step}: the record for {id:?} is missing")),
    }
}

fn expect_operation<S: RegistrationStore>(
    store: &S,
    expected: &OperationRecord,
    stored: bool,
    step: &str,
) -> Outcome {
    let got = ok(step, store.operation(&expected.operation_id))?;
    match (stored, got) {
        (false, None) => Ok(()),
        (true, Some(got)) => same_json(step, &to_json!(expected)?, &to_json!(&got)?),
        (false, Some(_)) => {
            Err(format!("{step}: operation {} is stored but should not be", expected.operation_id))
        }
        (true, None) => Err(format!("{step}: operation {} is missing", expected.operation_id)),
    }
}

fn missing_registration<S: RegistrationStore>(store: &S) -> Outcome {
    expect_record(store, "never-registered", None, "get of a record never written")?;
    let op = operation("4.0000000000000000.never-stored", "never-registered", at(0))?;
    expect_operation(store, &op, false, "get of an operation never written")
}

fn commit_round_trip<S: RegistrationStore>(store: &S) -> Outcome {
    let rec = record("dev-1", Some("Group-1"), "r1", 1)?;
    let op = operation("op-1", "dev-1", at(0))?;
    ok("commit", store.commit_registration(Arc::new(rec.clone()), &Precondition::MustNotExist, op.clone()))?;
    expect_record(store, "dev-1", Some(&rec), "get of the committed record")?;
    expect_operation(store, &op, true, "get of the committed operation")?;
    let individual = record("dev-2", None, "r1", 7)?;
    let op2 = operation("op-2", "dev-2", at(1))?;
    ok(
        "commit of an individual registration",
        store.commit_registration(Arc::new(individual.clone()), &Precondition::None, op2.clone()),
    )?;
    expect_record(store, "dev-2", Some(&individual), "get of the individual record")?;
    expect_operation(store, &op2, true, "get of the second operation")?;
    expect_record(store, "dev-1", Some(&rec), "get of the first record after the second commit")
}

fn registration_case_insensitive<S: RegistrationStore>(store: &S) -> Outcome {
    let rec = record("Dev-1", None, "r1", 1)?;
    ok(
        "commit of Dev-1",
        store.commit_registration(
            Arc::new(rec.clone()),
            &Precondition::MustNotExist,
            operation("op-1", "Dev-1", at(0))?,
        ),
    )?;
    for spelling in ["dev-1", "DEV-1"] {
        expect_record(
            store,
            spelling,
            Some(&rec),
            &format!("get of {spelling:?} after commit of \"Dev-1\""),
        )?;
    }
    let op = operation("op-2", "dev-1", at(1))?;
    fails(
        "commit of \"dev-1\" with MustNotExist over \"Dev-1\"",
        store.commit_registration(
            Arc::new(record("dev-1", None, "r2", 2)?),
            &Precondition::MustNotExist,
            op.clone(),
        ),
        &StoreError::AlreadyExists,
    )?;
    expect_operation(store, &op, false, "operation of the refused commit")?;
    ok("delete of \"DEV-1\"", store.delete_registration(&reg_id("DEV-1")?, &Precondition::None))?;
    expect_record(store, "Dev-1", None, "get after delete under another case")
}

fn commit_cas<S: RegistrationStore>(store: &S) -> Outcome {
    let id = "dev-1";
    let mut n = 0;
    let mut next_op = || {
        n += 1;
        operation(&format!("op-{n}"), id, at(n))
    };

    let r1 = record(id, None, "r1", 1)?;
    for pre in [Precondition::MustExist, must("r1")] {
        let op = next_op()?;
        fails(
            &format!("commit {pre:?} of a missing record"),
            store.commit_registration(Arc::new(r1.clone()), &pre, op.clone()),
            &StoreError::NotFound,
        )?;
        expect_record(store, id, None, &format!("after the refused commit {pre:?}"))?;
        expect_operation(store, &op, false, &format!("operation of the refused commit {pre:?}"))?;
    }

    let op = next_op()?;
    ok(
        "commit MustNotExist of a missing record",
        store.commit_registration(Arc::new(r1.clone()), &Precondition::MustNotExist, op.clone()),
    )?;
    expect_record(store, id, Some(&r1), "after create")?;
    expect_operation(store, &op, true, "operation of the create")?;

    let r2 = record(id, None, "r2", 2)?;
    let refused = [
        (Precondition::MustNotExist, StoreError::AlreadyExists),
        (must("not-r1"), StoreError::PreconditionFailed),
    ];
    for (pre, error) in refused {
        let op = next_op()?;
        fails(
            &format!("commit {pre:?} of an existing record"),
            store.commit_registration(Arc::new(r2.clone()), &pre, op.clone()),
            &error,
        )?;
        expect_record(store, id, Some(&r1), &format!("after the refused commit {pre:?}"))?;
        expect_operation(store, &op, false, &format!("operation of the refused commit {pre:?}"))?;
    }

    let op = next_op()?;
    ok(
        "commit Matches(current etag)",
        store.commit_registration(Arc::new(r2.clone()), &must("r1"), op.clone()),
    )?;
    expect_record(store, id, Some(&r2), "after Matches(right) commit")?;
    expect_operation(store, &op, true, "operation of the Matches(right) commit")?;

    let op = next_op()?;
    fails(
        "commit Matches(superseded etag)",
        store.commit_registration(Arc::new(r1.clone()), &must("r1"), op.clone()),
        &StoreError::PreconditionFailed,
    )?;
    expect_record(store, id, Some(&r2), "after the refused commit with a superseded etag")?;
    expect_operation(store, &op, false, "operation of the commit with a superseded etag")?;

    let r3 = record(id, None, "r3", 3)?;
    let op = next_op()?;
    ok(
        "commit MustExist of an existing record",
        store.commit_registration(Arc::new(r3.clone()), &Precondition::MustExist, op.clone()),
    )?;
    expect_record(store, id, Some(&r3), "after MustExist commit")?;
    expect_operation(store, &op, true, "operation of the MustExist commit")?;

    let r4 = record(id, None, "r4", 4)?;
    let op = next_op()?;
    ok(
        "unconditional commit over an existing record",
        store.commit_registration(Arc::new(r4.clone()), &Precondition::None, op.clone()),
    )?;
    expect_record(store, id, Some(&r4), "after unconditional commit")?;
    expect_operation(store, &op, true, "operation of the unconditional commit")
}

fn delete_registration<S: RegistrationStore>(store: &S) -> Outcome {
    let id = reg_id("dev-1")?;
    for pre in [Precondition::None, Precondition::MustNotExist, Precondition::MustExist, must("r1")] {
        fails(
            &format!("delete {pre:?} of a missing record"),
            store.delete_registration(&id, &pre),
            &StoreError::NotFound,
        )?;
    }
    let r1 = record("dev-1", None, "r1", 1)?;
    let commit = |op: &str| {
        store
            .commit_registration(Arc::new(r1.clone()), &Precondition::None, operation(op, "dev-1", at(0))?)
            .map_err(|e| format!("commit: {e:?}"))
    };
    commit("op-1")?;
    fails(
        "delete MustNotExist of an existing record",
        store.delete_registration(&id, &Precondition::MustNotExist),
        &StoreError::AlreadyExists,
    )?;
    fails(
        "delete Matches(wrong etag)",
        store.delete_registration(&id, &must("not-r1")),
        &StoreError::PreconditionFailed,
    )?;
    expect_record(store, "dev-1", Some(&r1), "after the refused deletes")?;
    ok("delete Matches(current etag)", store.delete_registration(&id, &must("r1")))?;
    expect_record(store, "dev-1", None, "after Matches(right) delete")?;
    commit("op-2")?;
    ok("delete MustExist", store.delete_registration(&id, &Precondition::MustExist))?;
    expect_record(store, "dev-1", None, "after MustExist delete")?;
    commit("op-3")?;
    ok("unconditional delete", store.delete_registration(&id, &Precondition::None))?;
    expect_record(store, "dev-1", None, "after unconditional delete")?;
    fails(
        "second delete of the same record",
        store.delete_registration(&id, &Precondition::None),
        &StoreError::NotFound,
    )
}

fn registrations_by_group<S: RegistrationStore>(store: &S) -> Outcome {
    let mut in_a = BTreeSet::new();
    let mut in_b = BTreeSet::new();
    // 250 records through group A, 50 through group B and 50 individual ones, interleaved by key
    // and written out of key order.
    for i in (0..350).map(|i| i * 11 % 350) {
        let id = format!("dev-{i:03}");
        let group = match i % 7 {
            3 => Some("Group-B"),
            6 => None,
            _ if i % 2 == 0 => Some("Group-A"),
            _ => Some("GROUP-a"),
        };
        match group {
            Some("Group-B") => in_b.insert(id.clone()),
            Some(_) => in_a.insert(id.clone()),
            None => false,
        };
        let op = operation(&format!("op-{i}"), &id, at(0))?;
        ok(
            &format!("commit of {id}"),
            store.commit_registration(
                Arc::new(record(&id, group, "r1", 1)?),
                &Precondition::MustNotExist,
                op.clone(),
            ),
        )?;
    }
    let key = |r: &RegistrationRecord| r.registration_id.as_str().to_owned();
    let a = group_id("group-a")?;
    let pages = all_pages(100, |r| store.registrations_by_group(&a, r))?;
    let order = check_pages("group-a in pages of 100", &pages, &[100, 100, 50], &in_a, key)?;
    let again = all_pages(100, |r| store.registrations_by_group(&a, r))?;
    let order_again = check_pages("group-a listed again", &again, &[100, 100, 50], &in_a, key)?;
    ensure!(order == order_again, "two listings of group-a came in different orders");
    let b = group_id("GROUP-B")?;
    let pages = all_pages(50, |r| store.registrations_by_group(&b, r))?;
    check_pages("group-b in one exactly full page of 50", &pages, &[50], &in_b, key)?;
    let none = group_id("group-c")?;
    let pages = all_pages(100, |r| store.registrations_by_group(&none, r))?;
    check_pages("a group nobody registered through", &pages, &[0], &BTreeSet::new(), key).map(drop)
}

fn operation_round_trip<S: RegistrationStore>(store: &S) -> Outcome {
    let mut failed = operation("op-failed", "dev-1", at(5))?;
    let mut status = failed.status();
    status.status = RegistrationStatus::Failed;
    if let Some(state) = status.registration_state.as_mut() {
        state.status = Some(RegistrationStatus::Failed);
        state.error_code = Some(401_002);
        state.error_message = Some("Unauthorized".to_owned());
        state.assigned_hub = None;
        state.device_id = None;
        state.substatus = None;
    }
    failed.status = status.into();
    ok("put_operation", store.put_operation(&failed))?;
    expect_operation(store, &failed, true, "get of the stored operation")?;
    expect_record(store, "dev-1", None, "a stored operation creates no record")?;

    // An operation that answers from the record it was committed with reads back as the same
    // answer, whether the store keeps the record or its serialized form.
    let rec = Arc::new(record("dev-2", Some("group-a"), "r1", 1)?);
    let registered = OperationRecord {
        operation_id: op_id("op-registered")?,
        registration_id: reg_id("dev-2")?,
        created: at(6),
        status: OperationStatus::Registered {
            record: Arc::clone(&rec),
            via: Some(AttestedVia::SymmetricKey),
        },
    };
    ok(
        "commit with an operation answering from its record",
        store.commit_registration(Arc::clone(&rec), &Precondition::MustNotExist, registered.clone()),
    )?;
    expect_operation(store, &registered, true, "get of an operation answering from its record")?;
    let answer = ok("get of the registered operation", store.operation(&registered.operation_id))?
        .ok_or("the registered operation is missing")?
        .into_status();
    ensure!(answer.operation_id == "op-registered", "operation id {:?} in the answer", answer.operation_id);
    ensure!(answer.status == RegistrationStatus::Assigned, "status {:?} in the answer", answer.status);
    let state = answer.registration_state.ok_or("the answer has no registrationState")?;
    let group = state.symmetric_key.as_ref().and_then(|k| k.enrollment_group_id.as_deref());
    ensure!(group == Some("group-a"), "symmetricKey.enrollmentGroupId {group:?}, expected group-a");
    ensure!(
        state.etag == rec.state.etag && state.assigned_hub == rec.state.assigned_hub,
        "the answer's etag/hub {:?}/{:?} are not the record's",
        state.etag,
        state.assigned_hub
    );
    Ok(())
}

fn purge<S: RegistrationStore>(store: &S) -> Outcome {
    let cutoff = at(300);
    let old = [operation("op-100", "dev-1", at(100))?, operation("op-299", "dev-1", at(299))?];
    let kept = [operation("op-300", "dev-1", cutoff)?, operation("op-400", "dev-1", at(400))?];
    ok("put_operation op-100", store.put_operation(&old[0]))?;
    ok("put_operation op-400", store.put_operation(&kept[1]))?;
    ok(
        "commit with op-299",
        store.commit_registration(
            Arc::new(record("dev-1", None, "r1", 1)?),
            &Precondition::None,
            old[1].clone(),
        ),
    )?;
    ok(
        "commit with op-300",
        store.commit_registration(Arc::new(record("dev-1", None, "r2", 2)?), &must("r1"), kept[0].clone()),
    )?;
    let removed = ok("purge_operations", store.purge_operations(cutoff))?;
    ensure!(removed == 2, "purge_operations removed {removed} operations, expected 2");
    for op in &old {
        expect_operation(store, op, false, "an operation created before the cutoff after purge")?;
    }
    for op in &kept {
        expect_operation(store, op, true, "an operation created at or after the cutoff after purge")?;
    }
    let again = ok("second purge_operations", store.purge_operations(cutoff))?;
    ensure!(again == 0, "a second purge with the same cutoff removed {again} operations, expected 0");
    let record = ok("get of dev-1", store.registration(&reg_id("dev-1")?))?;
    ensure!(record.is_some(), "purging operations removed the registration record");
    Ok(())
}

fn concurrent_updates<S: RegistrationStore>(store: &S) -> Outcome {
    const THREADS: usize = 8;
    const UPDATES: u64 = 50;
    let id = "contended";
    ok(
        "seed commit",
        store.commit_registration(
            Arc::new(record(id, None, "v0", 0)?),
            &Precondition::MustNotExist,
            operation("op-seed", id, at(0))?,
        ),
    )?;
    let results: Vec<Outcome> = std::thread::scope(|scope| {
        let writers: Vec<_> =
            (0..THREADS).map(|t| scope.spawn(move || writer(store, id, t, UPDATES))).collect();
        writers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a writer thread panicked".to_owned())))
            .collect()
    });
    for (t, result) in results.into_iter().enumerate() {
        result.map_err(|e| format!("writer {t}: {e}"))?;
    }
    let last = ok("final read", store.registration(&reg_id(id)?))?.ok_or("the record vanished")?;
    let total = counter(&last)?;
    let want = THREADS as u64 * UPDATES;
    ensure!(total == want, "the counter ended at {total} after {want} successful updates (lost updates)");
    let etag = last.etag().map(|e| e.bare().to_owned());
    ensure!(etag.as_deref() == Some(&*format!("v{want}")), "final etag {etag:?}, expected v{want}");
    for t in 0..THREADS {
        for k in 0..UPDATES {
            let op = op_id(&format!("op-{t}-{k}"))?;
            let stored = ok("get of an operation", store.operation(&op))?;
            ensure!(stored.is_some(), "operation {op} of a successful commit is missing");
        }
    }
    Ok(())
}

/// Increments the record's counter `updates` times, retrying on etag conflicts.
fn writer<S: RegistrationStore>(store: &S, id: &str, thread: usize, updates: u64) -> Outcome {
    // Generous, yet a store that never lets a compare-and-swap through fails instead of spinning.
    const MAX_ATTEMPTS: usize = 1_000_000;
    let key = reg_id(id)?;
    let mut done = 0;
    for _ in 0..MAX_ATTEMPTS {
        if done == updates {
            return Ok(());
        }
        let current = ok("read", store.registration(&key))?.ok_or("the record vanished")?;
        let etag = current.etag().ok_or("the record lost its etag")?;
        let n = counter(&current)?;
        let next = record(id, None, &format!("v{}", n + 1), n + 1)?;
        let op = operation(&format!("op-{thread}-{done}"), id, at(1))?;
        match store.commit_registration(
            Arc::new(next.clone()),
            &Precondition::Matches(etag.bare().to_owned()),
            op.clone(),
        ) {
            Ok(()) => done += 1,
            Err(StoreError::PreconditionFailed) => {
                let stored = ok("get of a refused operation", store.operation(&op.operation_id))?;
                ensure!(stored.is_none(), "operation {} of a refused commit was stored", op.operation_id);
            }
            Err(e) => return Err(format!("commit: unexpected error {e:?}")),
        }
    }
    Err(format!("only {done} of {updates} updates succeeded in {MAX_ATTEMPTS} attempts"))
}

fn counter(record: &RegistrationRecord) -> Result<u64, String> {
    record
        .state
        .payload
        .as_ref()
        .and_then(|p| p.get("counter"))
        .and_then(Value::as_u64)
        .ok_or_else(|| "the record's payload lost its counter".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Samples

fn enrollment(id: &str, etag: &str, rev: u32) -> Result<IndividualEnrollment, String> {
    let mut extra = Map::new();
    extra.insert("memberOfALaterApiVersion".to_owned(), json!({"nested": [1, "two", null], "rev": rev}));
    Ok(IndividualEnrollment {
        registration_id: reg_id(id)?,
        device_id: Some(DeviceId::new(format!("device-{id}")).map_err(|e| e.to_string())?),
        registration_state: Some(DeviceRegistrationState {
            registration_id: id.into(),
            created_date_time_utc: Some(at(1)),
            assigned_hub: Some("hub-1.azure-devices.net".into()),
            device_id: Some(format!("device-{id}").into()),
            status: Some(RegistrationStatus::Assigned),
            substatus: Some(Substatus::InitialAssignment),
            last_updated_date_time_utc: Some(at(2)),
            etag: Some("\"state-etag\"".into()),
            ..DeviceRegistrationState::default()
        }),
        optional_device_information: Some(json!({"model": "sensor", "rev": rev})),
        attestation: AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: Some(SymmetricKeyAttestation {
                primary_key: Some("c2FtcGxlIHByaW1hcnkga2V5IG9mIDMyIGJ5dGVzISE=".to_owned()),
                secondary_key: Some("c2FtcGxlIHNlY29uZGFyeSBrZXkgb2YgMzIgYnl0ZXM=".to_owned()),
            }),
        },
        capabilities: Some(DeviceCapabilities { iot_edge: rev % 2 == 0 }),
        iot_hub_host_name: None,
        initial_twin: Some(InitialTwin {
            tags: Some(json!({"site": "plant-7", "rev": rev})),
            properties: Some(InitialTwinProperties { desired: Some(json!({"interval": 30, "unit": "s"})) }),
        }),
        etag: Some(ETag::new(format!("\"{etag}\""))),
        provisioning_status: Some(ProvisioningStatus::Enabled),
        reprovision_policy: Some(ReprovisionPolicy {
            update_hub_assignment: true,
            migrate_device_data: false,
        }),
        created_date_time_utc: Some(at(0)),
        last_updated_date_time_utc: Some(at(i64::from(rev))),
        allocation_policy: Some(AllocationPolicy::Hashed),
        iot_hubs: Some(vec!["hub-1.azure-devices.net".to_owned(), "hub-2.azure-devices.net".to_owned()]),
        custom_allocation_definition: None,
        extra,
    })
}

fn group(
    id: &str,
    etag: &str,
    rev: u32,
    attestation: AttestationMechanism,
) -> Result<EnrollmentGroup, String> {
    let mut extra = Map::new();
    extra.insert("memberOfALaterApiVersion".to_owned(), json!({"rev": rev}));
    Ok(EnrollmentGroup {
        enrollment_group_id: group_id(id)?,
        attestation,
        capabilities: Some(DeviceCapabilities { iot_edge: false }),
        iot_hub_host_name: None,
        initial_twin: Some(InitialTwin {
            tags: Some(json!({"fleet": "north", "rev": rev})),
            properties: None,
        }),
        etag: Some(ETag::new(format!("\"{etag}\""))),
        provisioning_status: Some(if rev % 3 == 0 {
            ProvisioningStatus::Disabled
        } else {
            ProvisioningStatus::Enabled
        }),
        reprovision_policy: Some(ReprovisionPolicy::default()),
        created_date_time_utc: Some(at(0)),
        last_updated_date_time_utc: Some(at(i64::from(rev))),
        allocation_policy: Some(AllocationPolicy::Static),
        iot_hubs: Some(vec!["hub-1.azure-devices.net".to_owned()]),
        custom_allocation_definition: None,
        extra,
    })
}

fn symmetric_group(id: &str, etag: &str, rev: u32) -> Result<EnrollmentGroup, String> {
    let attestation = AttestationMechanism {
        kind: AttestationType::SymmetricKey,
        tpm: None,
        x509: None,
        symmetric_key: Some(SymmetricKeyAttestation {
            primary_key: Some("Z3JvdXAgcHJpbWFyeSBrZXkgb2YgMzIgYnl0ZXMhISE=".to_owned()),
            secondary_key: Some("Z3JvdXAgc2Vjb25kYXJ5IGtleSBvZiAzMiBieXRlcyE=".to_owned()),
        }),
    };
    group(id, etag, rev, attestation)
}

fn cert_info(subject: &str, issuer: &str) -> X509CertificateInfo {
    X509CertificateInfo {
        subject_name: subject.to_owned(),
        sha1_thumbprint: "0123456789ABCDEF0123456789ABCDEF01234567".to_owned(),
        sha256_thumbprint: "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF".to_owned(),
        issuer_name: issuer.to_owned(),
        not_before_utc: at(-86_400),
        not_after_utc: at(365 * 86_400),
        serial_number: "1A2B3C".to_owned(),
        version: 3,
    }
}

fn x509_attestation(x509: X509Attestation) -> AttestationMechanism {
    AttestationMechanism { kind: AttestationType::X509, tpm: None, x509: Some(x509), symmetric_key: None }
}

/// An X.509 group with signing certificates of the given subjects (self-issued) and the given
/// CA certificate references, primary first.
fn x509_group(
    id: &str,
    signing: [Option<&str>; 2],
    refs: [Option<&str>; 2],
) -> Result<EnrollmentGroup, String> {
    let cert = |subject: Option<&str>| {
        subject.map(|s| X509CertificateWithInfo {
            certificate: Some("TUlJQnNhbXBsZQ==".to_owned()),
            info: Some(cert_info(s, s)),
        })
    };
    let signing_certificates = match signing {
        [None, None] => None,
        [primary, secondary] => Some(X509Certificates { primary: cert(primary), secondary: cert(secondary) }),
    };
    let ca_references = match refs {
        [None, None] => None,
        [primary, secondary] => Some(X509CaReferences {
            primary: primary.map(str::to_owned),
            secondary: secondary.map(str::to_owned),
        }),
    };
    let x509 = X509Attestation { client_certificates: None, signing_certificates, ca_references };
    group(id, "e1", 1, x509_attestation(x509))
}

/// An X.509 group whose primary signing certificate has `subject` and was issued by `issuer`.
fn x509_issued_by(id: &str, subject: &str, issuer: &str) -> Result<EnrollmentGroup, String> {
    let primary = X509CertificateWithInfo {
        certificate: Some("TUlJQnNhbXBsZQ==".to_owned()),
        info: Some(cert_info(subject, issuer)),
    };
    let x509 = X509Attestation {
        client_certificates: None,
        signing_certificates: Some(X509Certificates { primary: Some(primary), secondary: None }),
        ca_references: None,
    };
    group(id, "e1", 1, x509_attestation(x509))
}

fn ca_certificate(name: &str, subject: &str, etag: &str, rev: u32) -> CaCertificate {
    CaCertificate {
        name: name.to_owned(),
        certificate_der: format!("TUlJQnNhbXBsZS1{rev}"),
        sha256_thumbprint: format!("{:064X}", rev),
        subject_name: subject.to_owned(),
        is_verified: rev % 2 == 0,
        verification_code: (rev % 2 == 1).then(|| format!("VERIFY{rev:04}")),
        etag: ETag::new(format!("\"{etag}\"")),
    }
}

pub(crate) fn record(
    id: &str,
    group: Option<&str>,
    etag: &str,
    counter: u64,
) -> Result<RegistrationRecord, String> {
    let enrollment = match group {
        Some(g) => EnrollmentRef::Group(group_id(g)?),
        None => EnrollmentRef::Individual(reg_id(id)?),
    };
    Ok(RegistrationRecord {
        registration_id: reg_id(id)?,
        state: DeviceRegistrationState {
            registration_id: id.into(),
            created_date_time_utc: Some(at(0)),
            assigned_hub: Some("hub-1.azure-devices.net".into()),
            device_id: Some(id.into()),
            status: Some(RegistrationStatus::Assigned),
            substatus: Some(if counter == 0 {
                Substatus::InitialAssignment
            } else {
                Substatus::DeviceDataMigrated
            }),
            last_updated_date_time_utc: Some(at(1)),
            etag: Some(etag.into()),
            payload: Some(json!({"counter": counter})),
            ..DeviceRegistrationState::default()
        },
        enrollment,
        initial_hub: Some("hub-0.azure-devices.net".into()),
    })
}

pub(crate) fn operation(id: &str, registration: &str, created: Timestamp) -> Result<OperationRecord, String> {
    Ok(OperationRecord {
        operation_id: op_id(id)?,
        registration_id: reg_id(registration)?,
        created,
        status: RegistrationOperationStatus {
            operation_id: id.into(),
            status: RegistrationStatus::Assigned,
            registration_state: Some(DeviceRegistrationResult {
                registration_id: registration.into(),
                created_date_time_utc: Some(created),
                assigned_hub: Some("hub-1.azure-devices.net".into()),
                device_id: Some(registration.into()),
                status: Some(RegistrationStatus::Assigned),
                substatus: Some(Substatus::InitialAssignment),
                last_updated_date_time_utc: Some(created),
                ..DeviceRegistrationResult::default()
            }),
        }
        .into(),
    })
}

/// The suite must reject stores that break the contract, or a passing backend proves nothing.
#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::time::Duration;

    use zerotouch_engine::memory::MemoryStore;

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

    /// Enrollments that ignore preconditions or never end a listing, on top of a correct store.
    #[derive(Default)]
    struct BrokenEnrollments {
        inner: MemoryStore,
        ignore_preconditions: bool,
        token_on_last_page: bool,
    }

    impl EnrollmentStore for BrokenEnrollments {
        fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
            self.inner.enrollment(id)
        }
        fn put_enrollment(&self, e: &IndividualEnrollment, pre: &Precondition) -> Result<(), StoreError> {
            let pre = if self.ignore_preconditions { &Precondition::None } else { pre };
            self.inner.put_enrollment(e, pre)
        }
        fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
            self.inner.delete_enrollment(id, pre)
        }
        fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
            let mut listed = self.inner.enrollments(page)?;
            if self.token_on_last_page && listed.continuation.is_none() && !listed.items.is_empty() {
                listed.continuation = listed.items.last().map(|e| e.registration_id.key());
            }
            Ok(listed)
        }
    }

    /// Groups whose CA-subject lookup ignores `caReferences`.
    #[derive(Default)]
    struct SigningOnly(MemoryStore);

    impl EnrollmentGroupStore for SigningOnly {
        fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
            self.0.enrollment_group(id)
        }
        fn put_enrollment_group(&self, g: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
            self.0.put_enrollment_group(g, pre)
        }
        fn delete_enrollment_group(
            &self,
            id: &EnrollmentGroupId,
            pre: &Precondition,
        ) -> Result<(), StoreError> {
            self.0.delete_enrollment_group(id, pre)
        }
        fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
            self.0.enrollment_groups(page)
        }
        fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
            self.0.symmetric_key_groups()
        }
        fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
            let found = self.0.groups_by_ca_subject(subject_name)?;
            Ok(found
                .into_iter()
                .filter(|g| g.attestation.x509.as_ref().is_some_and(|x| x.signing_certificates.is_some()))
                .collect())
        }
    }

    impl CaCertificateStore for SigningOnly {
        fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
            self.0.ca_certificate(name)
        }
        fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
            self.0.put_ca_certificate(cert, pre)
        }
        fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
            self.0.delete_ca_certificate(name, pre)
        }
    }

    /// Registrations whose commit is not atomic: the check and the write are two steps, or the
    /// operation is written before the check.
    #[derive(Default)]
    struct NonAtomicCommit {
        inner: MemoryStore,
        operation_first: bool,
    }

    impl RegistrationStore for NonAtomicCommit {
        fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
            self.inner.registration(id)
        }
        fn commit_registration(
            &self,
            record: Arc<RegistrationRecord>,
            pre: &Precondition,
            operation: OperationRecord,
        ) -> Result<(), StoreError> {
            if self.operation_first {
                self.inner.put_operation(&operation)?;
                return self.inner.commit_registration(record, pre, operation);
            }
            let current = self.inner.registration(&record.registration_id)?;
            pre.check(current.as_ref().and_then(RegistrationRecord::etag).as_ref())?;
            // Widens the window between check and write, as a slow backend would.
            std::thread::sleep(Duration::from_millis(1));
            self.inner.commit_registration(record, &Precondition::None, operation)
        }
        fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
            self.inner.delete_registration(id, pre)
        }
        fn registrations_by_group(
            &self,
            group: &EnrollmentGroupId,
            page: &PageRequest,
        ) -> Result<Page<RegistrationRecord>, StoreError> {
            self.inner.registrations_by_group(group, page)
        }
        fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
            self.inner.put_operation(operation)
        }
        fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
            self.inner.operation(id)
        }
        fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
            self.inner.purge_operations(cutoff)
        }
    }

    #[test]
    fn a_store_that_ignores_preconditions_is_caught_by_the_first_conditional_put() {
        let case = failed_case(|| {
            enrollment_store(|| BrokenEnrollments { ignore_preconditions: true, ..Default::default() })
        });
        assert_eq!(case.as_deref(), Some("enrollments: ids are case-insensitive"));
    }

    #[test]
    fn a_store_that_sends_a_continuation_on_the_last_page_fails_the_paging_case() {
        let case = failed_case(|| {
            enrollment_store(|| BrokenEnrollments { token_on_last_page: true, ..Default::default() })
        });
        assert_eq!(
            case.as_deref(),
            Some("enrollments: 250 entries list as 100 + 100 + 50 in a stable order")
        );
    }

    #[test]
    fn a_store_that_ignores_ca_references_fails_the_reference_case() {
        let case = failed_case(|| enrollment_group_store(SigningOnly::default));
        assert_eq!(case.as_deref(), Some("groups: found through caReferences to a stored CA certificate"));
    }

    #[test]
    fn a_store_that_stores_the_operation_of_a_refused_commit_is_caught() {
        let case = failed_case(|| {
            registration_store(|| NonAtomicCommit { operation_first: true, ..Default::default() })
        });
        assert_eq!(case.as_deref(), Some("registrations: ids are case-insensitive"),);
    }

    #[test]
    fn a_store_that_checks_and_writes_in_two_steps_loses_updates_under_contention() {
        let case = failed_case(|| registration_store(NonAtomicCommit::default));
        assert_eq!(case.as_deref(), Some("registrations: 8 threads doing read-modify-write lose no update"));
    }
}
