//! The store sub-commands: enrollment import and listing, device identity lookup.
//!
//! They act on the stores directly (no server needed) and are safe while a server runs on the
//! same database: every write goes through the engine's enrollment service.

use std::collections::HashMap;

use serde_json::Value;
use zerotouch_engine::crypto::CryptoProvider;
use zerotouch_engine::enrollments;
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{EnrollmentGroupStore, EnrollmentStore, PageRequest, RegistrationStore};
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportSummary {
    /// Individual enrollments created or replaced.
    pub individual_enrollments: usize,
    /// Enrollment groups created or replaced.
    pub enrollment_groups: usize,
}

/// Parses an import file: a JSON array of enrollments in the DPS service API schema, each an
/// individual enrollment (`registrationId`) or an enrollment group (`enrollmentGroupId`).
///
/// # Errors
/// [`ServerError::Import`] naming the first bad entry and its field; [`ServerError::Config`]
/// when the text is not a JSON array.
pub fn parse_import(text: &str) -> Result<Vec<ImportEntry>, ServerError> {
    let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        ServerError::Config(format!("the import file must be a JSON array of enrollments: {e}"))
    })?;
    let mut seen: HashMap<(bool, String), usize> = HashMap::new();
    let mut entries = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let bad = |message: String| ServerError::Import { index, message };
        let Some(object) = item.as_object() else {
            return Err(bad("expected a JSON object".into()));
        };
        let entry =
            match (object.contains_key("registrationId"), object.contains_key("enrollmentGroupId")) {
                (true, false) => ImportEntry::Individual(from_value(item).map_err(bad)?),
                (false, true) => ImportEntry::Group(from_value(item).map_err(bad)?),
                (true, true) => {
                    return Err(bad("has both registrationId and enrollmentGroupId; give one".into()));
                }
                (false, false) => return Err(bad(
                    "needs registrationId (individual enrollment) or enrollmentGroupId (enrollment group)"
                        .into(),
                )),
            };
        let key = match &entry {
            ImportEntry::Individual(e) => (true, e.registration_id.key()),
            ImportEntry::Group(g) => (false, g.enrollment_group_id.key()),
        };
        if let Some(first) = seen.insert(key.clone(), index) {
            let field = if key.0 { "registrationId" } else { "enrollmentGroupId" };
            return Err(bad(format!("{field} {:?} repeats entry {first}", key.1)));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Deserializes with the path of the offending field in the message.
fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("field {path}: {}", e.into_inner())
        }
    })
}

/// Imports `entries`: every entry is first checked by the engine against a scratch store
/// (attestation, keys, certificates), and only when all pass are they written, as upserts.
///
/// # Errors
/// [`ServerError::Import`] for the first entry the engine refuses (nothing written), or
/// [`ServerError::Engine`] when the store fails while writing.
pub fn import<S>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    entries: Vec<ImportEntry>,
) -> Result<ImportSummary, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let scratch = MemoryStore::new();
    for (index, entry) in entries.iter().enumerate() {
        let checked = match entry.clone() {
            ImportEntry::Individual(e) => {
                enrollments::put_enrollment(&scratch, crypto, now, *e, &IfMatch::Absent).map(drop)
            }
            ImportEntry::Group(g) => {
                enrollments::put_enrollment_group(&scratch, crypto, now, *g, &IfMatch::Absent).map(drop)
            }
        };
        checked.map_err(|e| ServerError::Import { index, message: e.to_string() })?;
    }
    let mut summary = ImportSummary { individual_enrollments: 0, enrollment_groups: 0 };
    for entry in entries {
        match entry {
            ImportEntry::Individual(e) => {
                enrollments::put_enrollment(store, crypto, now, *e, &IfMatch::Absent)?;
                summary.individual_enrollments += 1;
            }
            ImportEntry::Group(g) => {
                enrollments::put_enrollment_group(store, crypto, now, *g, &IfMatch::Absent)?;
                summary.enrollment_groups += 1;
            }
        }
    }
    Ok(summary)
}

/// Every enrollment without keys, individual enrollments first, in the import file's shape.
///
/// # Errors
/// Store failures.
pub fn list_enrollments<S>(store: &S) -> Result<Vec<Value>, ServerError>
where
    S: EnrollmentStore + EnrollmentGroupStore + RegistrationStore + ?Sized,
{
    let mut out = Vec::new();
    let mut page = PageRequest::default();
    loop {
        let p = enrollments::query_enrollments(store, &page)?;
        out.extend(p.items.iter().map(to_json));
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    let mut page = PageRequest::default();
    loop {
        let p = enrollments::query_enrollment_groups(store, &page)?;
        out.extend(p.items.iter().map(to_json));
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => break,
        }
    }
    Ok(out)
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // Wire types serialize to plain JSON; a failure would be a bug in a derive.
    serde_json::to_value(value).unwrap_or(Value::Null)
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
    let mut page = PageRequest { continuation: None, max_items: 1000 };
    loop {
        let p = store.devices(&page).map_err(zerotouch_engine::Error::from)?;
        out.extend(p.items);
        match p.continuation {
            Some(c) => page.continuation = Some(c),
            None => return Ok(out),
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
        assert_eq!(summary, ImportSummary { individual_enrollments: 1, enrollment_groups: 1 });
        let listed = list_enrollments(&store).unwrap();
        assert_eq!(listed[0]["registrationId"], "dev-1");
        assert_eq!(listed[1]["enrollmentGroupId"], "sensors");
        assert!(listed[0]["attestation"]["symmetricKey"]["primaryKey"].is_null(), "keys are not listed");
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
    fn a_repeated_registration_id_is_refused() {
        let err = parse_import(
            r#"[{"registrationId": "a", "attestation": {"type": "symmetricKey"}},
                {"registrationId": "a", "attestation": {"type": "symmetricKey"}}]"#,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), r#"entry 1: registrationId "a" repeats entry 0"#);
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
