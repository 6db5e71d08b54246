//! Row encoding shared by the SQLite and PostgreSQL backends: documents, keys and indexed columns.
//!
//! Every table stores the entity as JSON text (`doc`) beside the columns its queries and
//! compare-and-swap statements need. Etag columns hold the *bare* etag ([`ETag::bare`]), so a
//! `Precondition::Matches(tag)` becomes `UPDATE … WHERE etag = tag` and an entity stored without
//! etag holds `''` (the in-memory store treats a missing etag as the empty one).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use zerotouch_engine::jobs::JobRecord;
use zerotouch_engine::store::{EnrollmentRef, Precondition, RegistrationRecord};
use zerotouch_engine::twin::{TwinDocument, TwinKey};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::{ConnectionState, Device, DeviceStatus};
use zerotouch_proto::jobs::{JobStatus, JobType};
use zerotouch_proto::service::EnrollmentGroup;
use zerotouch_proto::{DeviceId, ETag, ModuleId, Timestamp};

/// Serializes an entity to the JSON text of its `doc` column.
///
/// # Errors
/// [`StoreError::Backend`] when serialization fails.
pub fn to_doc<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("encoding a row: {e}")))
}

/// Parses the JSON text of a `doc` column.
///
/// # Errors
/// [`StoreError::Backend`] when the text is not a valid document (a corrupt row).
pub fn from_doc<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("decoding a row: {e}")))
}

/// The etag column of an entity: the bare etag, `''` when it has none.
pub fn etag_column(etag: Option<&ETag>) -> String {
    etag.map(|e| e.bare().to_owned()).unwrap_or_default()
}

/// Checks `pre` against the etag column of the stored row (`None` = no row), with the same
/// outcomes as [`Precondition::check`].
///
/// # Errors
/// [`StoreError::AlreadyExists`], [`StoreError::NotFound`] or [`StoreError::PreconditionFailed`].
pub fn check(pre: &Precondition, stored_etag: Option<&str>) -> Result<(), StoreError> {
    match (pre, stored_etag) {
        (Precondition::None, _) | (Precondition::MustNotExist, None) | (Precondition::MustExist, Some(_)) => {
            Ok(())
        }
        (Precondition::MustNotExist, Some(_)) => Err(StoreError::AlreadyExists),
        (Precondition::MustExist | Precondition::Matches(_), None) => Err(StoreError::NotFound),
        (Precondition::Matches(want), Some(current)) => {
            if current == want {
                Ok(())
            } else {
                Err(StoreError::PreconditionFailed)
            }
        }
    }
}

/// Whether a group attests with symmetric keys (`symmetric` column).
pub fn is_symmetric_group(group: &EnrollmentGroup) -> bool {
    group.attestation.symmetric_key.is_some()
}

/// Subjects of a group's primary and secondary signing certificates (`group_subjects` rows).
pub fn signing_subjects(group: &EnrollmentGroup) -> Vec<String> {
    let Some(certs) = group.attestation.x509.as_ref().and_then(|x| x.signing_certificates.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = [&certs.primary, &certs.secondary]
        .into_iter()
        .flatten()
        .filter_map(|c| c.info.as_ref().map(|i| i.subject_name.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Names of the CA certificates a group references through `caReferences` (`group_ca_refs`
/// rows); the subject is looked up at query time, so a replaced certificate is followed.
pub fn ca_references(group: &EnrollmentGroup) -> Vec<String> {
    let Some(refs) = group.attestation.x509.as_ref().and_then(|x| x.ca_references.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = [&refs.primary, &refs.secondary].into_iter().flatten().cloned().collect();
    out.sort();
    out.dedup();
    out
}

/// The `group_key` column of a registration record: the lower-cased group id, or `None` for a
/// record of an individual enrollment.
pub fn registration_group(record: &RegistrationRecord) -> Option<String> {
    match &record.enrollment {
        EnrollmentRef::Group(g) => Some(g.key()),
        EnrollmentRef::Individual(_) => None,
    }
}

/// Nanoseconds since the Unix epoch: how timestamps are stored, so they compare as integers.
///
/// The unit of these columns since the first schema. They hold clock readings (an operation's
/// creation, a job's end, a purge cutoff), which lie inside the nanosecond range (1677 to 2262);
/// an instant beyond it is stored saturated ([`Timestamp::unix_nanos`]), which still orders
/// correctly against every instant inside it.
pub fn time_column(t: Timestamp) -> i64 {
    t.unix_nanos()
}

/// The `status` column of a device (its wire name, e.g. `enabled`).
///
/// # Errors
/// [`StoreError::Backend`] when the status does not serialize to a string.
pub fn device_status_column(status: DeviceStatus) -> Result<String, StoreError> {
    enum_name(&status)
}

/// The `connected` column of a device.
pub fn device_connected(device: &Device) -> bool {
    device.connection_state == ConnectionState::Connected
}

/// The `job_type` column of a job (its wire name).
///
/// # Errors
/// [`StoreError::Backend`] when the type does not serialize to a string.
pub fn job_type_column(job_type: JobType) -> Result<String, StoreError> {
    enum_name(&job_type)
}

/// The `status` column of a job (its wire name).
///
/// # Errors
/// [`StoreError::Backend`] when the status does not serialize to a string.
pub fn job_status_column(status: JobStatus) -> Result<String, StoreError> {
    enum_name(&status)
}

/// The `etag` column of a job: its version as text, as [`JobRecord::etag`] gives it.
pub fn job_etag(record: &JobRecord) -> String {
    record.version.to_string()
}

/// The `end_time` column of a job that can be purged: set only for terminal jobs with an end
/// time, so `purge` is one range delete.
pub fn job_purge_time(record: &JobRecord) -> Option<i64> {
    if record.job.status.is_terminal() {
        record.job.end_time.map(time_column)
    } else {
        None
    }
}

/// The `module_id` column of a twin: `''` for a device twin, which sorts it before the module
/// twins of its device (ids are never empty).
pub fn twin_module_column(key: &TwinKey) -> &str {
    key.module_id.as_ref().map_or("", ModuleId::as_str)
}

/// The twin key of a `(device_id, module_id)` row.
///
/// # Errors
/// [`StoreError::Backend`] when a stored id is not a valid id.
pub fn twin_key(device_id: &str, module_id: &str) -> Result<TwinKey, StoreError> {
    let device_id =
        DeviceId::new(device_id).map_err(|e| StoreError::Backend(format!("stored device id: {e}")))?;
    if module_id.is_empty() {
        return Ok(TwinKey { device_id, module_id: None });
    }
    let module_id =
        ModuleId::new(module_id).map_err(|e| StoreError::Backend(format!("stored module id: {e}")))?;
    Ok(TwinKey { device_id, module_id: Some(module_id) })
}

/// The `twin_tags` rows of a twin: every string leaf under `tags` as (lower-cased dotted path,
/// value). Query property names compare case-insensitively, so the path is lower-cased; a row
/// only ever makes a twin a *candidate* for `tags.a.b = 'v'`, which the evaluator re-checks.
pub fn tag_rows(twin: &TwinDocument) -> Vec<(String, String)> {
    fn walk(prefix: &str, map: &serde_json::Map<String, serde_json::Value>, out: &mut Vec<(String, String)>) {
        for (key, value) in map {
            let path = if prefix.is_empty() {
                key.to_lowercase()
            } else {
                format!("{prefix}.{}", key.to_lowercase())
            };
            match value {
                serde_json::Value::String(s) => out.push((path, s.clone())),
                serde_json::Value::Object(inner) => walk(&path, inner, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk("", twin.tags(), &mut out);
    out.sort();
    out.dedup();
    out
}

/// The `twin_tags` path a query path under `tags` looks up (`None` for other paths).
pub fn tag_path(segments: &[String]) -> Option<String> {
    match segments {
        [first, rest @ ..] if first.eq_ignore_ascii_case("tags") && !rest.is_empty() => {
            Some(rest.iter().map(|s| s.to_lowercase()).collect::<Vec<_>>().join("."))
        }
        _ => None,
    }
}

/// Encodes the parts of a composite continuation token (hex of a JSON array: opaque and safe in
/// an HTTP header).
pub fn encode_token(parts: &[&str]) -> String {
    let json = serde_json::to_string(parts).unwrap_or_default();
    let mut out = String::with_capacity(json.len() * 2);
    for b in json.bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// Decodes a token of [`encode_token`] that must have `n` parts.
///
/// # Errors
/// [`StoreError::InvalidContinuation`] for a token this store did not issue.
pub fn decode_token(token: &str, n: usize) -> Result<Vec<String>, StoreError> {
    let bad = || StoreError::InvalidContinuation;
    let digits = token.as_bytes();
    if digits.len() % 2 != 0 {
        return Err(bad());
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = digits
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let parts: Vec<String> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if parts.len() == n {
        Ok(parts)
    } else {
        Err(bad())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn enum_name<T: Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(StoreError::Backend(format!("expected a name, got {other}"))),
        Err(e) => Err(StoreError::Backend(format!("encoding a name: {e}"))),
    }
}

/// Groups as the engine's lookups hand them out (shared, so a store that keeps them in memory
/// need not copy them).
pub(crate) fn shared(groups: Vec<EnrollmentGroup>) -> Vec<Arc<EnrollmentGroup>> {
    groups.into_iter().map(Arc::new).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Databases written before `Timestamp` reached years 1 to 9999 hold nanoseconds: the unit
    /// stays, and instants beyond it keep their order against every stored value.
    #[test]
    fn time_columns_hold_unix_nanoseconds_saturated_outside_their_range() {
        let t = Timestamp::parse("2023-11-14T22:13:20.1234567Z").unwrap();
        assert_eq!(time_column(t), 1_700_000_000_123_456_700);
        assert_eq!(time_column(Timestamp::EPOCH), 0);
        let never_expires = Timestamp::parse("9999-12-31T23:59:59Z").unwrap();
        let never = Timestamp::parse("0001-01-01T00:00:00Z").unwrap();
        assert_eq!(time_column(never_expires), i64::MAX);
        assert_eq!(time_column(never), i64::MIN);
        assert!(time_column(never) < time_column(t) && time_column(t) < time_column(never_expires));
    }

    #[test]
    fn a_continuation_token_round_trips_and_a_foreign_one_is_refused() {
        let token = encode_token(&["job/1", "dev\"ice"]);
        assert_eq!(decode_token(&token, 2).unwrap(), vec!["job/1".to_owned(), "dev\"ice".to_owned()]);
        assert!(decode_token(&token, 1).is_err());
        assert!(decode_token("zz", 1).is_err());
        assert!(decode_token("abc", 1).is_err());
    }

    #[test]
    fn preconditions_compare_the_bare_etag_column() {
        assert_eq!(check(&Precondition::MustNotExist, Some("")), Err(StoreError::AlreadyExists));
        assert_eq!(check(&Precondition::MustExist, None), Err(StoreError::NotFound));
        assert_eq!(check(&Precondition::Matches("e1".into()), Some("e1")), Ok(()));
        assert_eq!(
            check(&Precondition::Matches("e1".into()), Some("e2")),
            Err(StoreError::PreconditionFailed)
        );
        assert_eq!(etag_column(Some(&ETag::new("\"e1\""))), "e1");
        assert_eq!(etag_column(None), "");
    }
}
