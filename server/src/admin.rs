//! The store sub-commands: enrollment import and listing, device identity and twin lookup.
//!
//! They act on the stores directly (no server needed) and are safe while a server runs on the
//! same database: every write goes through the engine's enrollment service.

use std::collections::HashMap;
use std::ops::ControlFlow;

use serde_json::Value;
use zerotouch_engine::attestation::x509::Certificate;
use zerotouch_engine::crypto::CryptoProvider;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub_engine::{device_twin_value, module_twin_value};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::query::{Collection, QuerySource};
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{EnrollmentGroupStore, EnrollmentStore, PageRequest, RegistrationStore};
use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{
    AttestationMechanism, AttestationType, EnrollmentGroup, IndividualEnrollment,
};
use zerotouch_proto::{DeviceId, IfMatch, ModuleId, Timestamp};

use crate::error::ServerError;

/// One entry of an import file.
#[derive(Debug, Clone)]
pub enum ImportEntry {
    /// An entry with `registrationId`.
    Individual(Box<IndividualEnrollment>),
    /// An entry with `enrollmentGroupId`.
    Group(Box<EnrollmentGroup>),
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportSummary {
    /// Individual enrollments created or replaced.
    pub individual_enrollments: usize,
    /// Enrollment groups created or replaced.
    pub enrollment_groups: usize,
    /// How many of them replaced an enrollment (or group) of the same id, whole: a field the
    /// entry left out is gone from the enrollment (keys aside, which are kept).
    pub replaced: usize,
    /// The keys generated for symmetric-key entries that gave none and replaced no enrollment
    /// with keys: shown once, here, as DPS returns them from the PUT that made them (its reads
    /// leave keys out, spec §0 trap 13).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub generated_keys: Vec<GeneratedKeys>,
}

/// The generated keys of one imported enrollment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedKeys {
    /// The individual enrollment's registration id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The group's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
}

/// The text of an import file: UTF-8, with or without a byte-order mark (Windows editors write
/// one).
///
/// # Errors
/// [`ServerError::Config`] for UTF-16 (what PowerShell 5's `>` writes) and for bytes that are not
/// UTF-8, naming the line and byte offset of the first one.
pub fn import_text(bytes: Vec<u8>) -> Result<String, ServerError> {
    // A byte-order mark of UTF-16 or UTF-32, or a NUL among the first two bytes (JSON starts with
    // ASCII, which those encodings pad with NULs).
    let wide = bytes.starts_with(&[0xFF, 0xFE])
        || bytes.starts_with(&[0xFE, 0xFF])
        || bytes.starts_with(&[0, 0, 0xFE, 0xFF])
        || bytes.iter().take(2).any(|b| *b == 0);
    if wide {
        return Err(ServerError::Config(
            "the import file is UTF-16 or UTF-32 (PowerShell's `>` writes UTF-16); save it as UTF-8".into(),
        ));
    }
    let bytes = match bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        Some(rest) => rest.to_vec(),
        None => bytes,
    };
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        ServerError::Config(format!(
            "the import file is not UTF-8: line {line}, byte {at} (save it as UTF-8)"
        ))
    })
}

/// An import file: a JSON array of enrollments in the DPS service API schema, each an
/// individual enrollment (`registrationId`) or an enrollment group (`enrollmentGroupId`), held
/// as the text of each entry. Entries are parsed one at a time when needed, so that a file of a
/// million enrollments never exists as a million parsed entries at once.
#[derive(Debug)]
pub struct ImportFile<'t> {
    items: Vec<&'t serde_json::value::RawValue>,
}

impl<'t> ImportFile<'t> {
    /// Splits `text` into its entries.
    ///
    /// # Errors
    /// [`ServerError::Config`] when the text is not a JSON array.
    pub fn parse(text: &'t str) -> Result<Self, ServerError> {
        let items = serde_json::from_str(text).map_err(|e| {
            ServerError::Config(format!("the import file must be a JSON array of enrollments: {e}"))
        })?;
        Ok(Self { items })
    }

    /// How many entries the file has.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the file is an empty array.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Entry `index`: its JSON as given and as parsed.
    fn entry(&self, index: usize) -> Result<(Value, ImportEntry), ServerError> {
        let bad = |message: String| ServerError::Import { index, message };
        let raw = self.items.get(index).ok_or_else(|| bad("no such entry".into()))?;
        let given: Value = serde_json::from_str(raw.get()).map_err(|e| bad(e.to_string()))?;
        let Some(object) = given.as_object() else {
            return Err(bad("expected a JSON object".into()));
        };
        let entry =
            match (object.contains_key("registrationId"), object.contains_key("enrollmentGroupId")) {
                (true, false) => ImportEntry::Individual(from_value(given.clone()).map_err(bad)?),
                (false, true) => ImportEntry::Group(from_value(given.clone()).map_err(bad)?),
                (true, true) => {
                    return Err(bad("has both registrationId and enrollmentGroupId; give one".into()))
                }
                (false, false) => return Err(bad(
                    "needs registrationId (individual enrollment) or enrollmentGroupId (enrollment group)"
                        .into(),
                )),
            };
        Ok((given, entry))
    }

    /// Every entry, parsed.
    ///
    /// # Errors
    /// [`ServerError::Import`] naming the first bad entry and its field, or an id that repeats.
    pub fn entries(&self) -> Result<Vec<ImportEntry>, ServerError> {
        let mut ids = Ids::default();
        (0..self.len())
            .map(|index| {
                let (_, entry) = self.entry(index)?;
                ids.check(index, &entry)?;
                Ok(entry)
            })
            .collect()
    }
}

/// The ids of the entries seen so far, to refuse one that repeats (ids compare as DPS compares
/// them: case-insensitively).
#[derive(Default)]
struct Ids(HashMap<(bool, String), usize>);

impl Ids {
    fn check(&mut self, index: usize, entry: &ImportEntry) -> Result<(), ServerError> {
        let (key, given) = match entry {
            ImportEntry::Individual(e) => ((true, e.registration_id.key()), e.registration_id.as_str()),
            ImportEntry::Group(g) => ((false, g.enrollment_group_id.key()), g.enrollment_group_id.as_str()),
        };
        if let Some(first) = self.0.insert(key.clone(), index) {
            let field = if key.0 { "registrationId" } else { "enrollmentGroupId" };
            // As the entry spells it (ids compare case-insensitively, but the file says what it says).
            let message = format!("{field} {given:?} repeats entry {first}");
            return Err(ServerError::Import { index, message });
        }
        Ok(())
    }
}

/// Parses an import file (see [`ImportFile`]) into its entries.
///
/// # Errors
/// [`ServerError::Import`] naming the first bad entry and its field; [`ServerError::Config`]
/// when the text is not a JSON array.
pub fn parse_import(text: &str) -> Result<Vec<ImportEntry>, ServerError> {
    ImportFile::parse(text)?.entries()
}

/// Checks every entry of `file` as [`import_file`] will write it, writing nothing: its fields,
/// ids that repeat, and what the engine refuses (attestation, keys, certificates, initial twin).
/// Returns the warnings `enrollments import` prints: fields outside the schema (kept at the top
/// level, dropped deeper down), attestation members of another type than the entry's (dropped),
/// TPM attestation and custom allocation (refused, and no webhook, here), hubs not among `known_hubs` (said only when the store
/// knows some: a fresh store links its hubs when a server first starts on it), `caReferences`
/// (no command here registers a CA certificate by name), and individual X.509 enrollments whose
/// registration id is not their certificate's CN (spec §5.2: a device registers under its CN).
///
/// # Errors
/// [`ServerError::Import`] for the first entry that is malformed, repeats an id, or is refused
/// by the engine.
pub fn check_import(
    file: &ImportFile<'_>,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    known_hubs: &[String],
) -> Result<Vec<String>, ServerError> {
    let mut ids = Ids::default();
    let mut warnings = Vec::new();
    for index in 0..file.len() {
        let (given, entry) = file.entry(index)?;
        // In a file of thousands the index alone is hard to find: name the entry by its id too.
        let named = |e: ServerError| match e {
            ServerError::Import { index, message } => {
                ServerError::Import { index, message: format!("{}: {message}", entry_name(&entry)) }
            }
            other => other,
        };
        ids.check(index, &entry)?;
        engine_check(index, &entry, crypto, now).map_err(named)?;
        entry_warnings(index, &given, &entry, known_hubs, &mut warnings);
    }
    Ok(warnings)
}

/// `registrationId "dev-1"` or `enrollmentGroupId "line-3"`.
fn entry_name(entry: &ImportEntry) -> String {
    match entry {
        ImportEntry::Individual(e) => format!("registrationId {:?}", e.registration_id.as_str()),
        ImportEntry::Group(g) => format!("enrollmentGroupId {:?}", g.enrollment_group_id.as_str()),
    }
}

/// What the engine says of `entry`, written to a scratch store of its own.
fn engine_check(
    index: usize,
    entry: &ImportEntry,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
) -> Result<(), ServerError> {
    let scratch = MemoryStore::new();
    let checked = match entry.clone() {
        ImportEntry::Individual(e) => {
            enrollments::put_enrollment(&scratch, crypto, now, *e, &IfMatch::Absent).map(drop)
        }
        ImportEntry::Group(g) => {
            enrollments::put_enrollment_group(&scratch, crypto, now, *g, &IfMatch::Absent).map(drop)
        }
    };
    checked.map_err(|e| ServerError::Import { index, message: e.to_string() })
}

/// The warnings of [`check_import`] for one entry, `given` being its JSON as in the file.
fn entry_warnings(
    index: usize,
    given: &Value,
    entry: &ImportEntry,
    known_hubs: &[String],
    warnings: &mut Vec<String>,
) {
    let quoted = |fields: &[&String]| fields.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ");
    let fields = unknown_fields(given, entry);
    let (top, nested): (Vec<&String>, Vec<&String>) =
        fields.iter().partition(|f| !f.contains('.') && !f.contains('['));
    if !top.is_empty() {
        warnings.push(format!(
            "entry {index}: {} not part of the enrollment schema; kept but unused (misspelled?)",
            quoted(&top)
        ));
    }
    if !nested.is_empty() {
        warnings.push(format!(
            "entry {index}: {} not part of the enrollment schema; ignored (misspelled?)",
            quoted(&nested)
        ));
    }
    let (attestation, allocation, hubs, host_name) = match entry {
        ImportEntry::Individual(e) => {
            (&e.attestation, e.allocation_policy, &e.iot_hubs, &e.iot_hub_host_name)
        }
        ImportEntry::Group(g) => (&g.attestation, g.allocation_policy, &g.iot_hubs, &g.iot_hub_host_name),
    };
    let members = [
        ("symmetricKey", attestation.symmetric_key.is_some(), AttestationType::SymmetricKey),
        ("x509", attestation.x509.is_some(), AttestationType::X509),
        ("tpm", attestation.tpm.is_some(), AttestationType::Tpm),
    ];
    for (name, present, kind) in members {
        if present && attestation.kind != kind {
            warnings.push(format!(
                "entry {index}: attestation.{name} ignored: the attestation type is {}",
                attestation.kind
            ));
        }
    }
    if attestation.kind == AttestationType::Tpm {
        warnings.push(format!(
            "entry {index}: TPM attestation: `zerotouch serve` refuses TPM registrations (400), so its devices \
             cannot register"
        ));
    }
    if allocation == Some(zerotouch_proto::service::AllocationPolicy::Custom) {
        warnings.push(format!(
            "entry {index}: allocationPolicy \"custom\": `zerotouch serve` calls no allocation webhook, so its \
             registrations will fail"
        ));
    }
    if !known_hubs.is_empty() {
        let unknown: Vec<String> = hubs
            .iter()
            .flatten()
            .chain(host_name)
            .filter(|hub| !known_hubs.iter().any(|k| k.eq_ignore_ascii_case(hub)))
            .map(|hub| format!("{hub:?}"))
            .collect();
        if !unknown.is_empty() {
            warnings.push(format!(
                "entry {index}: {} not among the hubs of this store ({}); its devices fail until a server \
                 links it (--hub)",
                unknown.join(", "),
                known_hubs.join(", ")
            ));
        }
    }
    let x509 = attestation.x509.as_ref().filter(|_| attestation.kind == AttestationType::X509);
    if x509.is_some_and(|x| x.ca_references.is_some()) {
        warnings.push(format!(
            "entry {index}: caReferences name CA certificates registered with a DPS instance, which zerotouch \
             cannot register; its devices fail. Enroll the CA in signingCertificates instead"
        ));
    }
    if let ImportEntry::Individual(e) = entry {
        let leaf = x509.and_then(|x| x.client_certificates.as_ref()).and_then(|c| c.primary.as_ref());
        let cert = leaf.and_then(|c| c.certificate.as_deref()).and_then(|t| Certificate::from_text(t).ok());
        let cn = cert.as_ref().and_then(|c| c.common_name().map(str::to_owned));
        if let Some(cn) = cn.filter(|cn| !cn.eq_ignore_ascii_case(e.registration_id.as_str())) {
            warnings.push(format!(
                "entry {index}: registrationId {:?} is not the certificate's CN {cn:?}; a device registers \
                 under its CN, so it will not find this enrollment",
                e.registration_id.as_str()
            ));
        }
    }
}

/// The fields of an entry, by path (`reprovisionPolicy.updatehubassignment`), that are not part
/// of the enrollment schema this server knows: at the top level kept (a newer DPS API version
/// may add fields) but unused, deeper down dropped. Most often a misspelling whose setting
/// silently did not apply. Fields set to `null` are not reported.
fn unknown_fields(given: &Value, entry: &ImportEntry) -> Vec<String> {
    let (kept, extra) = match entry {
        ImportEntry::Individual(e) => (to_json(e), &e.extra),
        ImportEntry::Group(g) => (to_json(g), &g.extra),
    };
    let mut fields: Vec<String> = extra.keys().cloned().collect();
    dropped(given, &kept, "", &mut fields);
    fields
}

/// Collects the paths of `given` that `kept` (what was parsed from it, serialized again) lacks.
fn dropped(given: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (given, kept) {
        (Value::Object(given), Value::Object(kept)) => {
            for (key, value) in given {
                let at = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match kept.get(key) {
                    Some(k) => dropped(value, k, &at, out),
                    // A null is what the schema's absent fields serialize to, as much as nothing.
                    None if !value.is_null() => out.push(at),
                    None => {}
                }
            }
        }
        (Value::Array(given), Value::Array(kept)) => {
            for (n, (g, k)) in given.iter().zip(kept).enumerate() {
                dropped(g, k, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Deserializes with the path of the offending field in the message, and without the value
/// serde quotes for a field of the wrong type or value (`invalid type: string "…"`): that is
/// where a key given in the wrong shape lands, and these messages go to logs.
fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = without_invalid_value(&e.into_inner().to_string());
        if path == "." {
            message
        } else {
            format!("field {path}: {message}")
        }
    })
}

/// serde's `invalid type: string "VALUE", expected …` (and `invalid value: …`) with the value
/// left out.
fn without_invalid_value(message: &str) -> String {
    let Some(rest) =
        message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_owned();
    };
    let kind = &message[..message.len() - rest.len()];
    match (rest.strip_prefix("string \""), rest.rfind(", expected")) {
        (Some(_), Some(end)) => format!("{kind}string{}", &rest[end..]),
        (Some(_), None) => format!("{kind}string"),
        _ => message.to_owned(),
    }
}

/// Imports `entries`: every entry is first checked by the engine against a scratch store
/// (attestation, keys, certificates), and only when all pass are they written, as upserts, in
/// one store unit (a failure while writing leaves nothing written either).
///
/// A symmetric-key entry without keys (or with one) keeps the keys it lacks from the enrollment
/// it replaces (the output of [`list_enrollments`] leaves keys out, and importing it back must
/// not change them); keys still missing are generated and reported in the summary.
///
/// # Errors
/// [`ServerError::Import`] for the first entry the engine refuses (nothing written), or
/// [`ServerError::Engine`] when the store fails while writing (nothing written).
pub fn import<S>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    entries: Vec<ImportEntry>,
) -> Result<ImportSummary, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    for (index, entry) in entries.iter().enumerate() {
        engine_check(index, entry, crypto, now)?;
    }
    write_all(store, crypto, now, entries.len(), &|index| Ok(entries[index].clone()))
}

/// Imports the entries of `file` as [`import`] does, parsing each as it is written: call
/// [`check_import`] first, which checks them all (an entry that still fails here fails the whole
/// unit, and nothing is written).
///
/// # Errors
/// [`ServerError::Engine`] when an entry is refused or the store fails (nothing written).
pub fn import_file<S>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    file: &ImportFile<'_>,
) -> Result<ImportSummary, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let entry = |index| {
        file.entry(index)
            .map(|(_, entry)| entry)
            .map_err(|e| zerotouch_engine::Error::BadRequest(e.to_string()))
    };
    write_all(store, crypto, now, file.len(), &entry)
}

/// Writes entries `0..count` as `entry` gives them, in one store unit.
fn write_all<S>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    count: usize,
    entry: &dyn Fn(usize) -> Result<ImportEntry, zerotouch_engine::Error>,
) -> Result<ImportSummary, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let empty = || ImportSummary {
        individual_enrollments: 0,
        enrollment_groups: 0,
        replaced: 0,
        generated_keys: Vec::new(),
    };
    let mut summary = empty();
    store.atomically(&mut || {
        // A unit may be run again (a backend's retry): count afresh.
        summary = empty();
        for index in 0..count {
            let mut entry = entry(index)?;
            forget_blank_keys(&mut entry);
            keep_keys(store, &mut entry)?;
            match entry {
                ImportEntry::Individual(e) => {
                    let keyless = lacks_keys(&e.attestation);
                    if store.enrollment(&e.registration_id).map_err(zerotouch_engine::Error::from)?.is_some()
                    {
                        summary.replaced += 1;
                    }
                    let stored = enrollments::put_enrollment(store, crypto, now, *e, &IfMatch::Absent)?;
                    if keyless {
                        summary.generated_keys.push(generated(
                            &stored.attestation,
                            Some(&stored.registration_id),
                            None,
                        ));
                    }
                    summary.individual_enrollments += 1;
                }
                ImportEntry::Group(g) => {
                    let keyless = lacks_keys(&g.attestation);
                    if store
                        .enrollment_group(&g.enrollment_group_id)
                        .map_err(zerotouch_engine::Error::from)?
                        .is_some()
                    {
                        summary.replaced += 1;
                    }
                    let stored = enrollments::put_enrollment_group(store, crypto, now, *g, &IfMatch::Absent)?;
                    if keyless {
                        summary.generated_keys.push(generated(
                            &stored.attestation,
                            None,
                            Some(&stored.enrollment_group_id),
                        ));
                    }
                    summary.enrollment_groups += 1;
                }
            }
        }
        Ok(())
    })?;
    Ok(summary)
}

/// Takes a blank symmetric key (`""`, spaces) for an absent one, as the engine does: kept from
/// the enrollment replaced, or generated and reported.
fn forget_blank_keys(entry: &mut ImportEntry) {
    let attestation = match entry {
        ImportEntry::Individual(e) => &mut e.attestation,
        ImportEntry::Group(g) => &mut g.attestation,
    };
    if let Some(keys) = &mut attestation.symmetric_key {
        for key in [&mut keys.primary_key, &mut keys.secondary_key] {
            if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                *key = None;
            }
        }
    }
}

/// Whether `attestation` is a symmetric-key one that lacks a key (the engine generates it).
fn lacks_keys(attestation: &AttestationMechanism) -> bool {
    attestation.kind == AttestationType::SymmetricKey
        && attestation
            .symmetric_key
            .as_ref()
            .is_none_or(|k| k.primary_key.is_none() || k.secondary_key.is_none())
}

/// Gives a symmetric-key `entry` each key it lacks from the enrollment it replaces, if that one
/// is a symmetric-key enrollment too.
fn keep_keys<S>(store: &S, entry: &mut ImportEntry) -> Result<(), zerotouch_engine::Error>
where
    S: EnrollmentStore + EnrollmentGroupStore + ?Sized,
{
    let engine = zerotouch_engine::Error::from;
    let (attestation, existing) = match entry {
        ImportEntry::Individual(e) => {
            if !lacks_keys(&e.attestation) {
                return Ok(());
            }
            let existing = store.enrollment(&e.registration_id).map_err(engine)?.map(|old| old.attestation);
            (&mut e.attestation, existing)
        }
        ImportEntry::Group(g) => {
            if !lacks_keys(&g.attestation) {
                return Ok(());
            }
            let existing =
                store.enrollment_group(&g.enrollment_group_id).map_err(engine)?.map(|old| old.attestation);
            (&mut g.attestation, existing)
        }
    };
    let old =
        existing.filter(|old| old.kind == AttestationType::SymmetricKey).and_then(|old| old.symmetric_key);
    if let Some(old) = old {
        let keys = attestation.symmetric_key.get_or_insert_with(Default::default);
        keys.primary_key = keys.primary_key.take().or(old.primary_key);
        keys.secondary_key = keys.secondary_key.take().or(old.secondary_key);
    }
    Ok(())
}

fn generated(
    attestation: &AttestationMechanism,
    registration_id: Option<&zerotouch_proto::RegistrationId>,
    enrollment_group_id: Option<&zerotouch_proto::EnrollmentGroupId>,
) -> GeneratedKeys {
    let keys = attestation.symmetric_key.clone().unwrap_or_default();
    GeneratedKeys {
        registration_id: registration_id.map(|id| id.as_str().to_owned()),
        enrollment_group_id: enrollment_group_id.map(|id| id.as_str().to_owned()),
        primary_key: keys.primary_key.unwrap_or_default(),
        secondary_key: keys.secondary_key.unwrap_or_default(),
    }
}

/// Every enrollment, individual enrollments first, in the import file's shape; symmetric keys
/// only `with_keys` (as DPS reads leave them out).
///
/// # Errors
/// Store failures.
pub fn list_enrollments<S>(store: &S, with_keys: bool) -> Result<Vec<Value>, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let mut out = Vec::new();
    for_each_enrollment(store, with_keys, &mut |entry| {
        out.push(entry);
        Ok(())
    })?;
    Ok(out)
}

/// Hands `visit` every enrollment as [`list_enrollments`] lists them, a page at a time, so that
/// a store of a million enrollments is never in memory at once.
///
/// # Errors
/// Store failures, and whatever `visit` fails with (which ends the walk).
pub fn for_each_enrollment<S>(
    store: &S,
    with_keys: bool,
    visit: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<(), ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let mut page = PageRequest::default();
    loop {
        let p = if with_keys {
            store.enrollments(&page).map_err(zerotouch_engine::Error::from)?
        } else {
            enrollments::query_enrollments(store, &page)?
        };
        // With the device's registration state and the effective provisioning status, as DPS
        // reads show them (an import ignores the state; the status imports back unchanged).
        for enrollment in p.items {
            let enrollment = enrollments::as_returned(enrollment);
            visit(to_json(&enrollments::with_registration_state(store, enrollment)?))?;
        }
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    let mut page = PageRequest::default();
    loop {
        let p = if with_keys {
            store.enrollment_groups(&page).map_err(zerotouch_engine::Error::from)?
        } else {
            enrollments::query_enrollment_groups(store, &page)?
        };
        for group in p.items {
            visit(to_json(&enrollments::group_as_returned(group)))?;
        }
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => return Ok(()),
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // Wire types serialize to plain JSON; a failure would be a bug in a derive.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Deletes the individual enrollment `registration_id` or the group `enrollment_group_id`
/// (exactly one is given); returns what was deleted, as JSON, its id spelt as stored (and as
/// [`list_enrollments`] shows it): ids compare case-insensitively, so `device-a` deletes
/// `Device-A`.
///
/// # Errors
/// [`ServerError::NotFound`] when there is no such enrollment, [`ServerError::Config`] for a
/// malformed id or not exactly one id, store failures.
pub fn delete_enrollment<S>(
    store: &S,
    registration_id: Option<&str>,
    enrollment_group_id: Option<&str>,
) -> Result<Value, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + ?Sized,
{
    let not_found = |e: zerotouch_engine::Error| match e {
        zerotouch_engine::Error::NotFound(what) => ServerError::NotFound(what),
        other => ServerError::Engine(other),
    };
    let engine = zerotouch_engine::Error::from;
    // The stored enrollment is read first for the id as it is spelt there.
    match (registration_id, enrollment_group_id) {
        (Some(id), None) => {
            let id = zerotouch_proto::RegistrationId::new(id)
                .map_err(|e| ServerError::Config(format!("registration id: {e}")))?;
            let stored = store.enrollment(&id).map_err(engine)?.map_or(id, |e| e.registration_id);
            enrollments::delete_enrollment(store, &stored, &IfMatch::Absent).map_err(not_found)?;
            Ok(serde_json::json!({ "deleted": { "registrationId": stored.as_str() } }))
        }
        (None, Some(id)) => {
            let id = zerotouch_proto::EnrollmentGroupId::new(id)
                .map_err(|e| ServerError::Config(format!("enrollment group id: {e}")))?;
            let stored = store.enrollment_group(&id).map_err(engine)?.map_or(id, |g| g.enrollment_group_id);
            enrollments::delete_enrollment_group(store, &stored, &IfMatch::Absent).map_err(not_found)?;
            Ok(serde_json::json!({ "deleted": { "enrollmentGroupId": stored.as_str() } }))
        }
        _ => Err(ServerError::Config("give one of --registration-id and --enrollment-group-id".into())),
    }
}

/// A device identity in a hub registry, credentials included.
///
/// # Errors
/// Store failures.
pub fn device<I: IdentityStore + ?Sized>(store: &I, id: &DeviceId) -> Result<Option<Device>, ServerError> {
    Ok(store.device(id).map_err(zerotouch_engine::Error::from)?)
}

/// Every device identity of a hub registry, ordered by id.
///
/// # Errors
/// Store failures.
pub fn devices<I: IdentityStore + ?Sized>(store: &I) -> Result<Vec<Device>, ServerError> {
    let mut out = Vec::new();
    for_each_device(store, &mut |device| {
        out.push(device);
        Ok(())
    })?;
    Ok(out)
}

/// Hands `visit` every device identity of a hub registry, ordered by id, a page at a time.
///
/// # Errors
/// Store failures, and whatever `visit` fails with (which ends the walk).
pub fn for_each_device<I: IdentityStore + ?Sized>(
    store: &I,
    visit: &mut dyn FnMut(Device) -> Result<(), ServerError>,
) -> Result<(), ServerError> {
    let mut page = PageRequest { continuation: None, max_items: 1000 };
    loop {
        let p = store.devices(&page).map_err(zerotouch_engine::Error::from)?;
        for device in p.items {
            visit(device)?;
        }
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => return Ok(()),
        }
    }
}

/// The twin of device `device_id` (of its module `module_id` when given) in a hub, as the IoT
/// Hub service API returns it (`GET /twins/{id}`, hub spec §5.1): the twin document with the
/// identity's fields (`deviceEtag`, `status`, `authenticationType`, `capabilities`, …) filled
/// in. `None` when the hub has no such identity. An identity without a stored twin reads as a
/// fresh one, as the engine's hub shows it (`HubCore::device_twin_json`).
///
/// # Errors
/// Store failures.
pub fn twin<I, T>(
    identities: &I,
    twins: &T,
    device_id: &DeviceId,
    module_id: Option<&ModuleId>,
) -> Result<Option<Value>, ServerError>
where
    I: IdentityStore + ?Sized,
    T: TwinStore + ?Sized,
{
    let engine = zerotouch_engine::Error::from;
    let stored = |key: TwinKey| -> Result<TwinDocument, ServerError> {
        Ok(twins.twin(&key).map_err(engine)?.unwrap_or_else(|| TwinDocument::new(Timestamp::EPOCH)))
    };
    let value = match module_id {
        None => match identities.device(device_id).map_err(engine)? {
            Some(device) => device_twin_value(&device, &stored(TwinKey::device(device_id.clone()))?)?,
            None => return Ok(None),
        },
        Some(m) => match identities.module(device_id, m).map_err(engine)? {
            Some(module) => {
                module_twin_value(&module, &stored(TwinKey::module(device_id.clone(), m.clone()))?)?
            }
            None => return Ok(None),
        },
    };
    Ok(Some(value))
}

/// Hands `visit` every device twin of a hub as [`twin`] shows it, ordered by device id, a page
/// of identities at a time: the documents of the query `SELECT * FROM devices` (a device
/// without a stored twin is left out, as the query leaves it out). One twin read per device:
/// stores that answer queries themselves give the same documents with [`scan_device_twins`].
///
/// # Errors
/// Store failures, and whatever `visit` fails with (which ends the walk).
pub fn for_each_device_twin<I, T>(
    identities: &I,
    twins: &T,
    visit: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<(), ServerError>
where
    I: IdentityStore + ?Sized,
    T: TwinStore + ?Sized,
{
    for_each_device(identities, &mut |device| {
        let key = TwinKey::device(device.device_id.clone());
        match twins.twin(&key).map_err(zerotouch_engine::Error::from)? {
            Some(doc) => visit(device_twin_value(&device, &doc)?),
            None => Ok(()),
        }
    })
}

/// [`for_each_device_twin`] for a hub store that answers queries itself: one read per page
/// (SQLite and PostgreSQL join identities and twins).
///
/// # Errors
/// Store failures, and whatever `visit` fails with (which ends the walk).
pub fn scan_device_twins<Q: QuerySource + ?Sized>(
    source: &Q,
    visit: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<(), ServerError> {
    let mut page = PageRequest { continuation: None, max_items: 1000 };
    loop {
        let mut failed = None;
        let next = source.scan(Collection::Devices, None, &page, &mut |doc| match visit(doc.clone()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        match next {
            Some(c) => page.continuation = Some(c),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use zerotouch_engine::crypto::RingCrypto;
    use zerotouch_proto::RegistrationId;

    use super::*;

    const NOW: Timestamp = Timestamp::EPOCH;

    #[test]
    fn a_malformed_entry_is_named_without_echoing_its_values() {
        let secret = "VE9QU0VDUkVUS0VZVE9QU0VDUkVUS0VZ";
        let text = format!(
            r#"[{{"registrationId": "dev-1", "attestation": {{"type": "symmetricKey", "symmetricKey": "{secret}"}}}}]"#
        );
        let refused = parse_import(&text).unwrap_err().to_string();
        assert!(refused.contains("entry 0") && refused.contains("attestation.symmetricKey"), "{refused}");
        assert!(refused.contains("invalid type: string"), "{refused}");
        assert!(!refused.contains(secret), "{refused}");
        // A misspelt attestation type is quoted: it is what the file got wrong.
        let typo = r#"[{"registrationId": "dev-2", "attestation": {"type": "symetricKey"}}]"#;
        let refused = parse_import(typo).unwrap_err().to_string();
        assert!(refused.contains("symetricKey"), "{refused}");
    }

    #[test]
    fn import_writes_individual_enrollments_and_groups() {
        let store = MemoryStore::new();
        let entries = parse_import(
            r#"[
              {"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}},
              {"enrollmentGroupId": "sensors", "attestation": {"type": "symmetricKey"}}
            ]"#,
        )
        .unwrap();
        let summary = import(&store, &RingCrypto::new(), NOW, entries).unwrap();
        assert_eq!((summary.individual_enrollments, summary.enrollment_groups), (1, 1));
        assert_eq!(summary.generated_keys.len(), 2, "{summary:?}");
        assert_eq!(summary.replaced, 0);
        // Imported again: the same two, each replacing what was there.
        let again = parse_import(
            r#"[{"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}},
            {"enrollmentGroupId": "sensors", "attestation": {"type": "symmetricKey"}},
            {"registrationId": "dev-2", "attestation": {"type": "symmetricKey"}}]"#,
        )
        .unwrap();
        let summary_again = import(&store, &RingCrypto::new(), NOW, again).unwrap();
        assert_eq!(summary_again.replaced, 2, "{summary_again:?}");
        let listed = list_enrollments(&store, false).unwrap();
        assert_eq!(listed[0]["registrationId"], "dev-1");
        assert_eq!(listed[1]["registrationId"], "dev-2");
        assert_eq!(listed[2]["enrollmentGroupId"], "sensors");
        assert!(listed[0]["attestation"]["symmetricKey"]["primaryKey"].is_null(), "keys are not listed");
    }

    fn stored_keys(store: &MemoryStore) -> Vec<Option<zerotouch_proto::service::SymmetricKeyAttestation>> {
        let individual = store.enrollment(&RegistrationId::new("dev-1").unwrap()).unwrap().unwrap();
        let group = store
            .enrollment_group(&zerotouch_proto::EnrollmentGroupId::new("sensors").unwrap())
            .unwrap()
            .unwrap();
        vec![individual.attestation.symmetric_key, group.attestation.symmetric_key]
    }

    const KEYLESS: &str = r#"[
      {"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}},
      {"enrollmentGroupId": "sensors", "attestation": {"type": "symmetricKey"}}
    ]"#;

    #[test]
    fn generated_keys_are_reported_once_and_importing_the_list_back_keeps_them() {
        let store = MemoryStore::new();
        let summary = import(&store, &RingCrypto::new(), NOW, parse_import(KEYLESS).unwrap()).unwrap();
        let keys = stored_keys(&store);
        let [individual, group] = [&keys[0], &keys[1]].map(|k| k.clone().unwrap());
        assert_eq!(summary.generated_keys[0].registration_id.as_deref(), Some("dev-1"));
        assert_eq!(Some(&summary.generated_keys[0].primary_key), individual.primary_key.as_ref());
        assert_eq!(Some(&summary.generated_keys[0].secondary_key), individual.secondary_key.as_ref());
        assert_eq!(summary.generated_keys[1].enrollment_group_id.as_deref(), Some("sensors"));
        assert_eq!(Some(&summary.generated_keys[1].primary_key), group.primary_key.as_ref());

        // `enrollments list` leaves the keys out; importing its output changes none of them.
        let listed = serde_json::to_string(&list_enrollments(&store, false).unwrap()).unwrap();
        let again = import(&store, &RingCrypto::new(), NOW, parse_import(&listed).unwrap()).unwrap();
        assert!(again.generated_keys.is_empty(), "{again:?}");
        assert_eq!(stored_keys(&store), keys);
    }

    #[test]
    fn an_entry_with_one_key_keeps_the_other_or_reports_it_generated() {
        let store = MemoryStore::new();
        import(&store, &RingCrypto::new(), NOW, parse_import(KEYLESS).unwrap()).unwrap();
        let before = stored_keys(&store)[0].clone().unwrap();
        let primary = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let one_key = format!(
            r#"[{{"registrationId": "dev-1", "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{primary}"}}}}}},
                {{"registrationId": "dev-2", "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{primary}"}}}}}}]"#
        );
        let summary = import(&store, &RingCrypto::new(), NOW, parse_import(&one_key).unwrap()).unwrap();
        let after = stored_keys(&store)[0].clone().unwrap();
        assert_eq!(after.primary_key.as_deref(), Some(primary));
        assert_eq!(after.secondary_key, before.secondary_key, "the secondary key stays");
        // The new enrollment's secondary key was generated: reported.
        assert_eq!(summary.generated_keys.len(), 1, "{summary:?}");
        assert_eq!(summary.generated_keys[0].registration_id.as_deref(), Some("dev-2"));
        assert_eq!(summary.generated_keys[0].primary_key, primary);
    }

    #[test]
    fn blank_keys_are_absent_ones_kept_from_the_enrollment_replaced_or_generated_and_reported() {
        let store = MemoryStore::new();
        let blank = r#"[
          {"registrationId": "dev-1", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "", "secondaryKey": " "}}},
          {"enrollmentGroupId": "sensors", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": ""}}}
        ]"#;
        let summary = import(&store, &RingCrypto::new(), NOW, parse_import(blank).unwrap()).unwrap();
        assert_eq!(summary.generated_keys.len(), 2, "{summary:?}");
        let keys = stored_keys(&store);
        assert_eq!(
            Some(&summary.generated_keys[0].primary_key),
            keys[0].as_ref().unwrap().primary_key.as_ref()
        );
        let again = import(&store, &RingCrypto::new(), NOW, parse_import(blank).unwrap()).unwrap();
        assert!(again.generated_keys.is_empty(), "{again:?}");
        assert_eq!(stored_keys(&store), keys, "importing blank keys again changes no key");
    }

    #[test]
    fn a_key_with_spaces_around_it_is_stored_as_it_is_used() {
        let store = MemoryStore::new();
        let key = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let spaced = format!(
            r#"[{{"registrationId": "dev-1", "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": " {key} ", "secondaryKey": "{key}\n"}}}}}}]"#
        );
        import(&store, &RingCrypto::new(), NOW, parse_import(&spaced).unwrap()).unwrap();
        let stored = store.enrollment(&RegistrationId::new("dev-1").unwrap()).unwrap().unwrap();
        let keys = stored.attestation.symmetric_key.unwrap();
        assert_eq!((keys.primary_key.as_deref(), keys.secondary_key.as_deref()), (Some(key), Some(key)));
    }

    #[test]
    fn an_initial_twin_the_hub_would_refuse_is_refused_at_import() {
        for (twin, expected) in [
            (r#"{"tags": [1, 2]}"#, "tags must be a JSON object"),
            (r#"{"properties": {"desired": {"$bad": 1}}}"#, "`$`"),
            (r#"{"tags": {"a.b": 1}}"#, "`.`"),
            (r#"{"properties": {"desired": {"a b": 1}}}"#, "space"),
        ] {
            let store = MemoryStore::new();
            let file = format!(
                r#"[{{"registrationId": "ok", "attestation": {{"type": "symmetricKey"}}}},
                    {{"enrollmentGroupId": "g", "attestation": {{"type": "symmetricKey"}}, "initialTwin": {twin}}}]"#
            );
            let err = import(&store, &RingCrypto::new(), NOW, parse_import(&file).unwrap()).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("entry 1: ") && text.contains("initialTwin"), "{twin}: {text}");
            assert!(text.contains(expected), "{twin}: {text}");
            assert!(list_enrollments(&store, false).unwrap().is_empty(), "nothing imported");
        }
    }

    #[test]
    fn enrollments_listed_with_keys_move_to_another_store_unchanged() {
        let store = MemoryStore::new();
        import(&store, &RingCrypto::new(), NOW, parse_import(KEYLESS).unwrap()).unwrap();
        let listed = serde_json::to_string(&list_enrollments(&store, true).unwrap()).unwrap();
        let other = MemoryStore::new();
        let summary = import(&other, &RingCrypto::new(), NOW, parse_import(&listed).unwrap()).unwrap();
        assert!(summary.generated_keys.is_empty(), "{summary:?}");
        assert_eq!(stored_keys(&other), stored_keys(&store));
    }

    #[test]
    fn a_keyless_entry_replacing_a_certificate_enrollment_gets_new_keys() {
        let store = MemoryStore::new();
        let ca = zerotouch_testkit::certs::TestCa::root("Line Root");
        let x509 = serde_json::json!([{"enrollmentGroupId": "sensors",
            "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca.pem()}}}}}]);
        import(&store, &RingCrypto::new(), NOW, parse_import(&x509.to_string()).unwrap()).unwrap();
        let summary = import(&store, &RingCrypto::new(), NOW, parse_import(KEYLESS).unwrap()).unwrap();
        assert_eq!(summary.generated_keys.len(), 2, "{summary:?}");
    }

    #[test]
    fn an_entry_with_a_bad_field_is_named_by_index_and_field() {
        let err = parse_import(
            r#"[{"registrationId": "ok", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "dev 2", "attestation": {"type": "symmetricKey"}}]"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("entry 1: field registrationId"), "{text}");

        let err =
            parse_import(r#"[{"enrollmentGroupId": "g", "attestation": {"type": "nope"}}]"#).unwrap_err();
        assert!(err.to_string().starts_with("entry 0: field attestation.type"), "{err}");

        let err = parse_import(r#"[{"attestation": {"type": "symmetricKey"}}]"#).unwrap_err();
        assert!(err.to_string().contains("needs registrationId"), "{err}");
    }

    #[test]
    fn import_warnings_say_which_fields_are_kept_and_which_are_ignored() {
        let text = r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}, "deviceID": "d",
                        "reprovisionPolicy": {"updatehubassignment": false},
                        "initialTwin": {"properties": {"reported": {"x": 1}}}},
                       {"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey",
                        "x509": {"signingCertificates": {"primary": {"certificate": "PEM"}}}}}]"#;
        let warnings = check_import(&ImportFile::parse(text).unwrap(), &RingCrypto::new(), NOW, &[]).unwrap();
        assert_eq!(
            warnings,
            vec![
                r#"entry 0: "deviceID" not part of the enrollment schema; kept but unused (misspelled?)"#,
                r#"entry 0: "reprovisionPolicy.updatehubassignment", "initialTwin.properties.reported" not part of the enrollment schema; ignored (misspelled?)"#,
                "entry 1: attestation.x509 ignored: the attestation type is symmetricKey",
            ]
        );
    }

    #[test]
    fn an_x509_enrollment_as_dps_reads_return_it_is_refused_with_what_to_put_back() {
        let reply = include_str!("../../testdata/dps/service_enrollment_x509_reply.json");
        let entries = parse_import(&format!("[{reply}]")).unwrap();
        let err = import(&MemoryStore::new(), &RingCrypto::new(), NOW, entries).unwrap_err().to_string();
        assert!(err.starts_with("entry 0: ") && err.contains("no `certificate`"), "{err}");
    }

    #[test]
    fn entries_whose_devices_cannot_be_provisioned_are_named() {
        let ca = zerotouch_testkit::certs::TestCa::root("Line Root");
        let device = ca.device("meter-1");
        let text = serde_json::json!([
            {"registrationId": "a", "attestation": {"type": "symmetricKey"}, "iotHubs": ["Hub-1.example", "azure.example"]},
            {"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey"}, "iotHubHostName": "hub-1.example"},
            {"enrollmentGroupId": "r", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "line-ca"}}}},
            {"registrationId": "meter-2", "attestation": {"type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": device.pem()}}}}},
            {"registrationId": "meter-1", "attestation": {"type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": device.pem()}}}}}
        ])
        .to_string();
        let file = ImportFile::parse(&text).unwrap();
        let warnings = check_import(&file, &RingCrypto::new(), NOW, &["hub-1.example".to_owned()]).unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].starts_with(r#"entry 0: "azure.example" not among the hubs"#), "{}", warnings[0]);
        assert!(warnings[1].starts_with("entry 2: caReferences"), "{}", warnings[1]);
        assert!(warnings[2]
            .starts_with(r#"entry 3: registrationId "meter-2" is not the certificate's CN "meter-1""#));
        // A store that knows no hub yet says nothing of them.
        assert_eq!(check_import(&file, &RingCrypto::new(), NOW, &[]).unwrap().len(), 2);
    }

    #[test]
    fn an_import_file_may_start_with_a_byte_order_mark_but_must_be_utf8() {
        let text = import_text(b"\xEF\xBB\xBF[]".to_vec()).unwrap();
        assert!(parse_import(&text).unwrap().is_empty());
        for wide in [&b"\xFF\xFE[\0]\0"[..], b"[\0]\0", b"\0[\0]", b"\xFF\xFE\0\0[\0\0\0"] {
            let refused = import_text(wide.to_vec()).unwrap_err().to_string();
            assert!(refused.contains("UTF-16"), "{wide:?}: {refused}");
        }
        let latin1 = import_text(b"[\n{\"registrationId\": \"caf\xE9\"}]".to_vec()).unwrap_err().to_string();
        assert!(latin1.contains("not UTF-8: line 2, byte 25"), "{latin1}");
    }

    /// A hub with twins in a SQLite store: `boiler-1` (tags, desired, module `pump`) and
    /// `boiler-2` created through the hub, `bare-3` written to the registry alone (no twin).
    fn hub_with_twins() -> zerotouch_store::sqlite::SqliteStore {
        use zerotouch_engine::hub_engine::EmbeddedHub;
        use zerotouch_engine::store::Precondition;

        let store =
            zerotouch_store::sqlite::SqliteStore::open_in_memory().unwrap().hub("north.example").unwrap();
        let hub = EmbeddedHub::over("north.example", store.clone(), std::sync::Arc::new(RingCrypto::new()))
            .unwrap();
        let object = |v: Value| v.as_object().unwrap().clone();
        let now = Timestamp::from_unix_secs(1_700_000_000);
        let boiler = DeviceId::new("boiler-1").unwrap();
        let (tags, desired) =
            (object(serde_json::json!({"site": "oslo"})), object(serde_json::json!({"c": 21})));
        hub.create_device(Device::new(boiler.clone()), Some(&tags), Some(&desired), now).unwrap();
        let pump = zerotouch_proto::hub::Module::new(boiler, ModuleId::new("pump").unwrap());
        hub.create_module(pump, now).unwrap();
        hub.create_device(Device::new(DeviceId::new("boiler-2").unwrap()), None, None, now).unwrap();
        store
            .put_device(&Device::new(DeviceId::new("bare-3").unwrap()), &Precondition::MustNotExist)
            .unwrap();
        store
    }

    #[test]
    fn a_device_or_module_twin_reads_as_the_service_api_returns_it() {
        let store = hub_with_twins();
        let boiler = DeviceId::new("boiler-1").unwrap();
        let twin = twin(&store, &store, &boiler, None).unwrap().unwrap();
        assert_eq!(twin["tags"], serde_json::json!({"site": "oslo"}), "{twin:#}");
        assert_eq!(twin["properties"]["desired"]["c"], 21, "{twin:#}");
        assert_eq!(twin["status"], "enabled", "{twin:#}");
        let pump = ModuleId::new("pump").unwrap();
        let module = super::twin(&store, &store, &boiler, Some(&pump)).unwrap().unwrap();
        assert_eq!((&module["deviceId"], &module["moduleId"]), (&"boiler-1".into(), &"pump".into()));
        assert!(module.get("tags").is_none() && module.get("capabilities").is_none(), "{module:#}");
        assert_eq!(module["properties"]["desired"]["$version"], 1, "{module:#}");
        let other = ModuleId::new("fan").unwrap();
        assert_eq!(super::twin(&store, &store, &boiler, Some(&other)).unwrap(), None);
        assert_eq!(super::twin(&store, &store, &DeviceId::new("nobody").unwrap(), None).unwrap(), None);
        // An identity without a stored twin reads as a fresh twin, as the engine's hub shows it.
        let bare = super::twin(&store, &store, &DeviceId::new("bare-3").unwrap(), None).unwrap().unwrap();
        assert_eq!((&bare["version"], &bare["etag"]), (&2.into(), &"AAAAAAAAAAE=".into()), "{bare:#}");
    }

    #[test]
    fn walking_a_hubs_device_twins_gives_what_its_store_answers_to_select_star_from_devices() {
        let store = hub_with_twins();
        let mut walked = Vec::new();
        for_each_device_twin(&store, &store, &mut |t| {
            walked.push(t);
            Ok(())
        })
        .unwrap();
        let mut scanned = Vec::new();
        scan_device_twins(&store, &mut |t| {
            scanned.push(t);
            Ok(())
        })
        .unwrap();
        let ids: Vec<&str> = walked.iter().map(|t| t["deviceId"].as_str().unwrap()).collect();
        assert_eq!(ids, ["boiler-1", "boiler-2"], "device twins only, and only stored ones");
        assert_eq!(walked, scanned);
        assert_eq!(
            walked[0],
            twin(&store, &store, &DeviceId::new("boiler-1").unwrap(), None).unwrap().unwrap()
        );
        // A visit that fails ends the walk with its error.
        let mut seen = 0;
        let failed = scan_device_twins(&store, &mut |_| {
            seen += 1;
            Err(ServerError::NotFound("stop".into()))
        });
        assert!(matches!(failed, Err(ServerError::NotFound(_))) && seen == 1);
    }

    #[test]
    fn enrollments_imported_without_a_provisioning_status_list_as_enabled_as_dps_reads_show_them() {
        let store = MemoryStore::new();
        let text = r#"[{"registrationId": "dev-1", "attestation": {"type": "symmetricKey"}},
                       {"registrationId": "dev-2", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"}},
                       {"enrollmentGroupId": "sensors", "attestation": {"type": "symmetricKey"}}]"#;
        import(&store, &RingCrypto::new(), NOW, parse_import(text).unwrap()).unwrap();
        for with_keys in [false, true] {
            let listed = list_enrollments(&store, with_keys).unwrap();
            let statuses: Vec<&str> =
                listed.iter().map(|e| e["provisioningStatus"].as_str().unwrap_or("(absent)")).collect();
            assert_eq!(statuses, ["enabled", "disabled", "enabled"], "with_keys {with_keys}");
        }
    }

    #[test]
    fn an_enrollment_is_deleted_once_and_then_not_found() {
        let store = MemoryStore::new();
        import(&store, &RingCrypto::new(), NOW, parse_import(KEYLESS).unwrap()).unwrap();
        let deleted = delete_enrollment(&store, Some("dev-1"), None).unwrap();
        assert_eq!(deleted["deleted"]["registrationId"], "dev-1");
        assert_eq!(
            delete_enrollment(&store, None, Some("sensors")).unwrap()["deleted"]["enrollmentGroupId"],
            "sensors"
        );
        assert!(list_enrollments(&store, false).unwrap().is_empty());
        assert!(matches!(delete_enrollment(&store, Some("dev-1"), None), Err(ServerError::NotFound(_))));
        assert!(matches!(delete_enrollment(&store, Some("bad id"), None), Err(ServerError::Config(_))));
        assert!(matches!(delete_enrollment(&store, None, None), Err(ServerError::Config(_))));
    }

    #[test]
    fn a_deleted_enrollment_is_named_as_stored_and_listed_whatever_the_case_it_was_asked_for_in() {
        let store = MemoryStore::new();
        let text = r#"[{"registrationId": "Device-A", "attestation": {"type": "symmetricKey"}},
                       {"enrollmentGroupId": "Line-3", "attestation": {"type": "symmetricKey"}}]"#;
        import(&store, &RingCrypto::new(), NOW, parse_import(text).unwrap()).unwrap();
        let listed = list_enrollments(&store, false).unwrap();
        assert_eq!(
            (&listed[0]["registrationId"], &listed[1]["enrollmentGroupId"]),
            (&"Device-A".into(), &"Line-3".into())
        );
        let deleted = delete_enrollment(&store, Some("device-a"), None).unwrap();
        assert_eq!(deleted, serde_json::json!({"deleted": {"registrationId": "Device-A"}}));
        let deleted = delete_enrollment(&store, None, Some("LINE-3")).unwrap();
        assert_eq!(deleted, serde_json::json!({"deleted": {"enrollmentGroupId": "Line-3"}}));
        assert!(list_enrollments(&store, false).unwrap().is_empty());
        let Err(ServerError::NotFound(message)) = delete_enrollment(&store, Some("DEVICE-A"), None) else {
            panic!("deleted twice")
        };
        assert!(message.contains("DEVICE-A"), "nothing stored: named as asked for: {message}");
    }

    #[test]
    fn misspelled_fields_are_reported_by_entry_and_path() {
        let text = r#"[{"registrationId": "ok", "deviceId": "d-1", "attestation": {"type": "symmetricKey"},
                 "capabilities": {"iotEdge": false}, "initialTwin": {"tags": {"site": "a"}}},
                {"registrationId": "typo", "deviceID": "d-2", "provisioningstatus": "disabled",
                 "attestation": {"type": "symmetricKey", "symmetricKey": {"primarykey": "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="}}},
                {"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey"},
                 "reprovisionPolicy": {"updatehubassignment": false, "migrateDeviceData": true},
                 "initialTwin": {"tag": {"site": "b"}}}]"#;
        assert_eq!(
            unknown_by_entry(text),
            vec![
                (
                    1,
                    vec![
                        "deviceID".to_owned(),
                        "provisioningstatus".to_owned(),
                        "attestation.symmetricKey.primarykey".to_owned()
                    ]
                ),
                (2, vec!["reprovisionPolicy.updatehubassignment".to_owned(), "initialTwin.tag".to_owned()]),
            ]
        );
    }

    #[test]
    fn the_enrollments_the_sdks_send_have_no_unknown_fields() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/dps");
        for name in [
            "service_enrollment_symkey.json",
            "service_enrollment_tpm.json",
            "service_enrollment_x509.json",
            "service_enrollment_x509_reply.json",
            "service_group_symkey.json",
            "service_group_x509_ca_references.json",
            "service_group_x509_signing.json",
        ] {
            let text = format!("[{}]", std::fs::read_to_string(dir.join(name)).unwrap());
            assert_eq!(unknown_by_entry(&text), Vec::new(), "{name}");
        }
    }

    /// The unknown fields of each entry of `text` that has some.
    fn unknown_by_entry(text: &str) -> Vec<(usize, Vec<String>)> {
        let file = ImportFile::parse(text).unwrap();
        (0..file.len())
            .filter_map(|index| {
                let (given, entry) = file.entry(index).unwrap();
                let fields = unknown_fields(&given, &entry);
                (!fields.is_empty()).then_some((index, fields))
            })
            .collect()
    }

    #[test]
    fn entries_asking_for_custom_allocation_are_named() {
        let text = r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "b", "allocationPolicy": "custom", "attestation": {"type": "symmetricKey"}}]"#;
        let warnings = check_import(&ImportFile::parse(text).unwrap(), &RingCrypto::new(), NOW, &[]).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with(r#"entry 1: allocationPolicy "custom""#), "{warnings:?}");
    }

    #[test]
    fn tpm_entries_are_named_since_serve_refuses_their_devices() {
        use base64::Engine as _;
        let ek = base64::engine::general_purpose::STANDARD.encode([0u8; 300]);
        let text = format!(
            r#"[{{"registrationId": "tpm-1", "attestation": {{"type": "tpm", "tpm": {{"endorsementKey": "{ek}"}}}}}}]"#
        );
        let warnings =
            check_import(&ImportFile::parse(&text).unwrap(), &RingCrypto::new(), NOW, &[]).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("entry 0: TPM attestation"), "{warnings:?}");
    }

    #[test]
    fn a_checked_file_is_imported_entry_by_entry_all_or_nothing() {
        let text = r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}},
                       {"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey"}}]"#;
        let file = ImportFile::parse(text).unwrap();
        assert!(check_import(&file, &RingCrypto::new(), NOW, &[]).unwrap().is_empty());
        let store = MemoryStore::new();
        let summary = import_file(&store, &RingCrypto::new(), NOW, &file).unwrap();
        assert_eq!((summary.individual_enrollments, summary.enrollment_groups), (1, 1));
        assert_eq!(summary.generated_keys.len(), 2);

        let repeated = r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}},
                          {"registrationId": "A", "attestation": {"type": "symmetricKey"}}]"#;
        let err =
            check_import(&ImportFile::parse(repeated).unwrap(), &RingCrypto::new(), NOW, &[]).unwrap_err();
        assert!(err.to_string().starts_with("entry 1: registrationId"), "{err}");
        // An entry the engine refuses while writing undoes the whole unit (of a store with
        // transactions: the in-memory store has none).
        let bad = r#"[{"registrationId": "b", "attestation": {"type": "symmetricKey"}},
                      {"registrationId": "c", "attestation": {"type": "x509", "x509": {}}}]"#;
        let other = zerotouch_store::sqlite::SqliteStore::open_in_memory().unwrap();
        assert!(import_file(&other, &RingCrypto::new(), NOW, &ImportFile::parse(bad).unwrap()).is_err());
        assert!(list_enrollments(&other, false).unwrap().is_empty());
    }

    #[test]
    fn a_repeated_registration_id_is_refused() {
        let err = parse_import(
            r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "a", "attestation": {"type": "symmetricKey"}}]"#,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), r#"entry 1: registrationId "a" repeats entry 0"#);
        let err = parse_import(
            r#"[{"registrationId": "dup", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "DUP", "attestation": {"type": "symmetricKey"}}]"#,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), r#"entry 1: registrationId "DUP" repeats entry 0"#);
    }

    #[test]
    fn nothing_is_imported_when_a_later_entry_is_refused_by_the_engine() {
        let store = MemoryStore::new();
        let entries = parse_import(
            r#"[{"registrationId": "first", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "second",
                 "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64!"}}}]"#,
        )
        .unwrap();
        let err = import(&store, &RingCrypto::new(), NOW, entries).unwrap_err();
        assert!(matches!(err, ServerError::Import { index: 1, .. }), "{err}");
        assert!(store.enrollment(&RegistrationId::new("first").unwrap()).unwrap().is_none());
    }
}
