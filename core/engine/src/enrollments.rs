//! The DPS service API's logic: create, read, update, delete, query and bulk-edit individual
//! enrollments and enrollment groups, manage CA certificates with proof of possession, and read
//! registration records. Fills what the service computes (keys when absent, certificate `info`,
//! etags, timestamps), says the default `provisioningStatus` in replies, and strips secrets from
//! reads (spec §0 trap 13).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zerotouch_proto::ids::uuid_from_bytes;
use zerotouch_proto::service::{
    AttestationMechanism, AttestationType, BulkEnrollmentGroupOperation, BulkEnrollmentGroupOperationError,
    BulkEnrollmentGroupOperationResult, BulkEnrollmentMode, BulkEnrollmentOperation,
    BulkEnrollmentOperationError, BulkEnrollmentOperationResult, DeviceRegistrationState, EnrollmentGroup,
    IndividualEnrollment, InitialTwin, ProvisioningStatus, SymmetricKeyAttestation, X509Certificates,
};
use zerotouch_proto::{ETag, EnrollmentGroupId, IfMatch, RegistrationId, Timestamp};

use crate::attestation::symmetric;
use crate::attestation::tpm::TpmKeys;
use crate::attestation::x509::{generate_verification_code, verify_proof_of_possession, Certificate};
use crate::crypto::CryptoProvider;
use crate::error::{Error, StoreError};
use crate::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentRef, EnrollmentStore, Page,
    PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use crate::twin::TwinDocument;

/// Most items one bulk operation may carry (spec §9).
pub const MAX_BULK_ITEMS: usize = 10;

/// Bytes of a key the service generates (64, as in the docs' examples).
pub const GENERATED_KEY_LEN: usize = 64;

fn random<const N: usize>(crypto: &dyn CryptoProvider) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    crypto.fill_random(&mut out).map_err(|e| Error::Crypto(e.to_string()))?;
    Ok(out)
}

/// A fresh enrollment etag: a quoted GUID-like string, quotes included, as real DPS writes them.
fn new_etag(crypto: &dyn CryptoProvider) -> Result<ETag, Error> {
    Ok(ETag::new(format!("\"{}\"", uuid_from_bytes(&random::<16>(crypto)?))))
}

fn generated_key(crypto: &dyn CryptoProvider) -> Result<String, Error> {
    Ok(STANDARD.encode(random::<GENERATED_KEY_LEN>(crypto)?))
}

fn store_error(e: StoreError, what: impl Into<String>) -> Error {
    match e {
        StoreError::NotFound => Error::NotFound(what.into()),
        StoreError::AlreadyExists => Error::Conflict(format!("{} already exists", what.into())),
        StoreError::PreconditionFailed => Error::PreconditionFailed,
        other => Error::Store(other),
    }
}

/// Refuses an initial twin that the hub would refuse at every assignment: tags or desired
/// properties that are not objects, or that break a twin rule (reserved or illegal key
/// characters, depth, size; hub-registry-twin §5.5).
fn check_initial_twin(now: Timestamp, initial: Option<&InitialTwin>) -> Result<(), Error> {
    let Some(initial) = initial else { return Ok(()) };
    // The twin raises the hub's errors (400004 ArgumentInvalid); the provisioning service API
    // answers a bad request its own way (400000), with the part named.
    TwinDocument::from_initial_twin(now, initial).map(drop).map_err(|e| match e {
        Error::Hub { message: m, .. } | Error::BadRequest(m) => {
            if m.starts_with("initialTwin") {
                Error::BadRequest(m)
            } else {
                Error::BadRequest(format!("initialTwin: {m}"))
            }
        }
        other => other,
    })
}

/// Fills generated keys and certificate info; rejects attestation that cannot work.
fn normalize_attestation(
    crypto: &dyn CryptoProvider,
    attestation: &mut AttestationMechanism,
    individual: bool,
) -> Result<(), Error> {
    match attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = attestation.symmetric_key.get_or_insert_with(SymmetricKeyAttestation::default);
            // A blank key is an absent one (generated); a key is stored as it is used, trimmed.
            for key in [&mut keys.primary_key, &mut keys.secondary_key] {
                match key.as_deref().map(str::trim) {
                    None | Some("") => *key = Some(generated_key(crypto)?),
                    Some(k) => {
                        symmetric::decode_key(k)?;
                        if k.len() != key.as_deref().map_or(0, str::len) {
                            *key = Some(k.to_owned());
                        }
                    }
                }
            }
            attestation.x509 = None;
            attestation.tpm = None;
        }
        AttestationType::X509 => {
            let x509 = attestation
                .x509
                .as_mut()
                .ok_or_else(|| Error::BadRequest("attestation type x509 needs an x509 member".into()))?;
            let used = [
                x509.client_certificates.is_some(),
                x509.signing_certificates.is_some(),
                x509.ca_references.is_some(),
            ]
            .into_iter()
            .filter(|b| *b)
            .count();
            if used != 1 {
                return Err(Error::BadRequest(
                    "x509 attestation needs exactly one of clientCertificates, signingCertificates, caReferences".into(),
                ));
            }
            if individual && x509.client_certificates.is_none() {
                return Err(Error::BadRequest(
                    "an individual enrollment's x509 attestation needs clientCertificates".into(),
                ));
            }
            if !individual && x509.client_certificates.is_some() {
                return Err(Error::BadRequest(
                    "an enrollment group's x509 attestation needs signingCertificates or caReferences".into(),
                ));
            }
            for certs in [&mut x509.client_certificates, &mut x509.signing_certificates].into_iter().flatten()
            {
                fill_certificate_info(crypto, certs)?;
            }
            if let Some(refs) = &x509.ca_references {
                if refs.primary.is_none() && refs.secondary.is_none() {
                    return Err(Error::BadRequest("caReferences needs a primary or secondary name".into()));
                }
            }
            attestation.symmetric_key = None;
            attestation.tpm = None;
        }
        AttestationType::Tpm => {
            if !individual {
                return Err(Error::BadRequest(
                    "TPM attestation is only valid on individual enrollments".into(),
                ));
            }
            let tpm = attestation
                .tpm
                .as_ref()
                .ok_or_else(|| Error::BadRequest("attestation type tpm needs a tpm member".into()))?;
            TpmKeys::from_base64(&tpm.endorsement_key, tpm.storage_root_key.as_deref())?;
            attestation.symmetric_key = None;
            attestation.x509 = None;
        }
        _ => {
            return Err(Error::BadRequest(format!(
                "attestation type {} cannot be enrolled",
                attestation.kind
            )))
        }
    }
    Ok(())
}

fn fill_certificate_info(crypto: &dyn CryptoProvider, certs: &mut X509Certificates) -> Result<(), Error> {
    match &certs.primary {
        Some(primary) if primary.certificate.is_some() => {}
        // What DPS reads return: `info` only. The certificate itself must come back to enroll.
        Some(primary) if primary.info.is_some() => {
            return Err(Error::BadRequest(
                "x509 primary has `info` but no `certificate`; DPS reads leave the certificate out, so \
                 put the certificate (PEM or base64 DER) back into `certificate`"
                    .into(),
            ))
        }
        _ => return Err(Error::BadRequest("x509 certificates need a primary `certificate`".into())),
    }
    for slot in [&mut certs.primary, &mut certs.secondary].into_iter().flatten() {
        if let Some(text) = &slot.certificate {
            let cert =
                Certificate::from_text(text).map_err(|e| Error::BadRequest(format!("certificate: {e}")))?;
            slot.info = Some(cert.info(crypto));
        }
    }
    Ok(())
}

/// `enrollment` as the service API returns it: with `provisioningStatus` always said, `enabled`
/// when it was written without one (the service default, which DPS replies spell out). The wire
/// type keeps an absent member absent, so that a body round-trips as sent (recorded bodies in
/// `testdata/dps/` leave it out), and the store keeps what was written: the default is filled
/// here, on the way out.
pub fn as_returned(mut enrollment: IndividualEnrollment) -> IndividualEnrollment {
    enrollment.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    enrollment
}

/// `group` as the service API returns it (see [`as_returned`]).
pub fn group_as_returned(mut group: EnrollmentGroup) -> EnrollmentGroup {
    group.provisioning_status.get_or_insert(ProvisioningStatus::Enabled);
    group
}

/// Removes symmetric keys from an enrollment (GET and query replies never carry them).
pub fn strip_enrollment_secrets(mut e: IndividualEnrollment) -> IndividualEnrollment {
    strip_attestation(&mut e.attestation);
    e
}

/// Removes symmetric keys from a group.
pub fn strip_group_secrets(mut g: EnrollmentGroup) -> EnrollmentGroup {
    strip_attestation(&mut g.attestation);
    g
}

fn strip_attestation(a: &mut AttestationMechanism) {
    if let Some(keys) = &mut a.symmetric_key {
        keys.primary_key = None;
        keys.secondary_key = None;
    }
}

/// Creates or replaces an individual enrollment (`PUT /enrollments/{id}`). Without `If-Match`
/// this is an upsert; `*` requires an existing enrollment; an etag must match. Returns the stored
/// enrollment, keys included.
///
/// # Errors
/// [`Error::BadRequest`] for invalid attestation, [`Error::PreconditionFailed`],
/// [`Error::NotFound`], store failures.
pub fn put_enrollment<S: EnrollmentStore + RegistrationStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    mut enrollment: IndividualEnrollment,
    if_match: &IfMatch,
) -> Result<IndividualEnrollment, Error> {
    normalize_attestation(crypto, &mut enrollment.attestation, true)?;
    check_initial_twin(now, enrollment.initial_twin.as_ref())?;
    let existing = store.enrollment(&enrollment.registration_id)?;
    enrollment.registration_state = None;
    enrollment.created_date_time_utc =
        Some(existing.as_ref().and_then(|e| e.created_date_time_utc).unwrap_or(now));
    enrollment.last_updated_date_time_utc = Some(now);
    enrollment.etag = Some(new_etag(crypto)?);
    let what = format!("enrollment {}", enrollment.registration_id);
    store
        .put_enrollment(&enrollment, &Precondition::from_if_match(if_match))
        .map_err(|e| store_error(e, what))?;
    with_registration_state(store, as_returned(enrollment))
}

/// `enrollment` with the state of its device's registration, if the device registered under it
/// (`registrationState`, as DPS reads of an individual enrollment carry it).
///
/// # Errors
/// Store failures.
pub fn with_registration_state<S: RegistrationStore + ?Sized>(
    store: &S,
    mut enrollment: IndividualEnrollment,
) -> Result<IndividualEnrollment, Error> {
    enrollment.registration_state = store
        .registration(&enrollment.registration_id)?
        .filter(|r| matches!(&r.enrollment, EnrollmentRef::Individual(_)))
        .map(RegistrationRecord::into_state);
    Ok(enrollment)
}

/// Reads an enrollment with its registration state and without keys.
///
/// # Errors
/// [`Error::NotFound`] and store failures.
pub fn get_enrollment<S: EnrollmentStore + RegistrationStore + ?Sized>(
    store: &S,
    id: &RegistrationId,
) -> Result<IndividualEnrollment, Error> {
    let e = store.enrollment(id)?.ok_or_else(|| Error::NotFound(format!("enrollment {id}")))?;
    with_registration_state(store, as_returned(strip_enrollment_secrets(e)))
}

/// The attestation mechanism of an enrollment, keys included (`POST …/attestationmechanism`).
///
/// # Errors
/// [`Error::NotFound`] and store failures.
pub fn enrollment_attestation<S: EnrollmentStore + ?Sized>(
    store: &S,
    id: &RegistrationId,
) -> Result<AttestationMechanism, Error> {
    Ok(store.enrollment(id)?.ok_or_else(|| Error::NotFound(format!("enrollment {id}")))?.attestation)
}

/// Deletes an enrollment (`DELETE /enrollments/{id}`).
///
/// # Errors
/// [`Error::NotFound`], [`Error::PreconditionFailed`], store failures.
pub fn delete_enrollment<S: EnrollmentStore + ?Sized>(
    store: &S,
    id: &RegistrationId,
    if_match: &IfMatch,
) -> Result<(), Error> {
    store
        .delete_enrollment(id, &Precondition::from_if_match(if_match))
        .map_err(|e| store_error(e, format!("enrollment {id}")))
}

/// One page of enrollments without keys (`POST /enrollments/query`).
///
/// # Errors
/// Store failures.
pub fn query_enrollments<S: EnrollmentStore + ?Sized>(
    store: &S,
    page: &PageRequest,
) -> Result<Page<IndividualEnrollment>, Error> {
    let p = store.enrollments(page)?;
    Ok(Page {
        items: p.items.into_iter().map(|e| as_returned(strip_enrollment_secrets(e))).collect(),
        continuation: p.continuation,
    })
}

/// Applies a bulk operation (≤ 10 items). Duplicate ids fail the whole call; per-item failures
/// are reported in the result.
///
/// # Errors
/// [`Error::BadRequest`] for too many items or duplicates.
pub fn bulk_enrollments<S: EnrollmentStore + RegistrationStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    op: BulkEnrollmentOperation,
) -> Result<BulkEnrollmentOperationResult, Error> {
    check_bulk(op.enrollments.iter().map(|e| e.registration_id.key()))?;
    let mut errors = Vec::new();
    for e in op.enrollments {
        let id = e.registration_id.clone();
        let result = match op.mode {
            BulkEnrollmentMode::Create => {
                put_enrollment_with(store, crypto, now, e, Precondition::MustNotExist)
            }
            BulkEnrollmentMode::Update => put_enrollment(store, crypto, now, e, &IfMatch::Absent).map(drop),
            BulkEnrollmentMode::UpdateIfMatchETag => {
                let tag = IfMatch::from_header(e.etag.as_ref().map(ETag::as_str).or(Some("")));
                put_enrollment(store, crypto, now, e, &tag).map(drop)
            }
            _ => {
                let tag = e.etag.as_ref().map_or(IfMatch::Absent, |t| IfMatch::from_header(Some(t.as_str())));
                delete_enrollment(store, &id, &tag)
            }
        };
        if let Err(err) = result {
            let w = err.to_wire();
            errors.push(BulkEnrollmentOperationError {
                registration_id: id.to_string(),
                error_code: w.error_code,
                error_status: w.message,
            });
        }
    }
    Ok(BulkEnrollmentOperationResult { is_successful: errors.is_empty(), errors })
}

fn put_enrollment_with<S: EnrollmentStore + RegistrationStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    mut enrollment: IndividualEnrollment,
    pre: Precondition,
) -> Result<(), Error> {
    normalize_attestation(crypto, &mut enrollment.attestation, true)?;
    check_initial_twin(now, enrollment.initial_twin.as_ref())?;
    enrollment.registration_state = None;
    enrollment.created_date_time_utc = Some(now);
    enrollment.last_updated_date_time_utc = Some(now);
    enrollment.etag = Some(new_etag(crypto)?);
    let what = format!("enrollment {}", enrollment.registration_id);
    store.put_enrollment(&enrollment, &pre).map_err(|e| store_error(e, what))
}

fn check_bulk(keys: impl Iterator<Item = String>) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    let mut n = 0;
    for k in keys {
        n += 1;
        if !seen.insert(k.clone()) {
            return Err(Error::BadRequest(format!("id {k:?} appears more than once in the bulk operation")));
        }
    }
    if n == 0 || n > MAX_BULK_ITEMS {
        return Err(Error::BadRequest(format!(
            "a bulk operation carries 1 to {MAX_BULK_ITEMS} items, got {n}"
        )));
    }
    Ok(())
}

/// Creates or replaces an enrollment group (`PUT /enrollmentGroups/{id}`); returns it with keys.
///
/// # Errors
/// As [`put_enrollment`].
pub fn put_enrollment_group<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    mut group: EnrollmentGroup,
    if_match: &IfMatch,
) -> Result<EnrollmentGroup, Error> {
    put_group_with(store, crypto, now, &mut group, Precondition::from_if_match(if_match))?;
    Ok(group_as_returned(group))
}

fn put_group_with<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    group: &mut EnrollmentGroup,
    pre: Precondition,
) -> Result<(), Error> {
    if !matches!(group.attestation.kind, AttestationType::SymmetricKey | AttestationType::X509) {
        return Err(Error::BadRequest("an enrollment group needs x509 or symmetricKey attestation".into()));
    }
    normalize_attestation(crypto, &mut group.attestation, false)?;
    check_initial_twin(now, group.initial_twin.as_ref())?;
    let existing = store.enrollment_group(&group.enrollment_group_id)?;
    group.created_date_time_utc =
        Some(existing.as_ref().and_then(|g| g.created_date_time_utc).unwrap_or(now));
    group.last_updated_date_time_utc = Some(now);
    group.etag = Some(new_etag(crypto)?);
    let what = format!("enrollment group {}", group.enrollment_group_id);
    store.put_enrollment_group(group, &pre).map_err(|e| store_error(e, what))
}

/// Reads a group without keys.
///
/// # Errors
/// [`Error::NotFound`] and store failures.
pub fn get_enrollment_group<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    id: &EnrollmentGroupId,
) -> Result<EnrollmentGroup, Error> {
    let g = store.enrollment_group(id)?.ok_or_else(|| Error::NotFound(format!("enrollment group {id}")))?;
    Ok(group_as_returned(strip_group_secrets(g)))
}

/// A group's attestation mechanism, keys included.
///
/// # Errors
/// [`Error::NotFound`] and store failures.
pub fn enrollment_group_attestation<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    id: &EnrollmentGroupId,
) -> Result<AttestationMechanism, Error> {
    Ok(store
        .enrollment_group(id)?
        .ok_or_else(|| Error::NotFound(format!("enrollment group {id}")))?
        .attestation)
}

/// Deletes a group. Devices registered through it keep their records; they can no longer
/// register through it.
///
/// # Errors
/// [`Error::NotFound`], [`Error::PreconditionFailed`], store failures.
pub fn delete_enrollment_group<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    id: &EnrollmentGroupId,
    if_match: &IfMatch,
) -> Result<(), Error> {
    store
        .delete_enrollment_group(id, &Precondition::from_if_match(if_match))
        .map_err(|e| store_error(e, format!("enrollment group {id}")))
}

/// One page of groups without keys.
///
/// # Errors
/// Store failures.
pub fn query_enrollment_groups<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    page: &PageRequest,
) -> Result<Page<EnrollmentGroup>, Error> {
    let p = store.enrollment_groups(page)?;
    Ok(Page {
        items: p.items.into_iter().map(|g| group_as_returned(strip_group_secrets(g))).collect(),
        continuation: p.continuation,
    })
}

/// Applies a bulk group operation (≤ 10 items).
///
/// # Errors
/// [`Error::BadRequest`] for too many items or duplicates.
pub fn bulk_enrollment_groups<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    op: BulkEnrollmentGroupOperation,
) -> Result<BulkEnrollmentGroupOperationResult, Error> {
    check_bulk(op.enrollment_groups.iter().map(|g| g.enrollment_group_id.key()))?;
    let mut errors = Vec::new();
    for mut g in op.enrollment_groups {
        let id = g.enrollment_group_id.clone();
        let tag = g.etag.as_ref().map_or(IfMatch::Absent, |t| IfMatch::from_header(Some(t.as_str())));
        let result = match op.mode {
            BulkEnrollmentMode::Create => {
                put_group_with(store, crypto, now, &mut g, Precondition::MustNotExist)
            }
            BulkEnrollmentMode::Update => put_group_with(store, crypto, now, &mut g, Precondition::None),
            BulkEnrollmentMode::UpdateIfMatchETag => {
                let pre = match tag {
                    IfMatch::Absent => Precondition::Matches(String::new()),
                    other => Precondition::from_if_match(&other),
                };
                put_group_with(store, crypto, now, &mut g, pre)
            }
            _ => delete_enrollment_group(store, &id, &tag),
        };
        if let Err(err) = result {
            let w = err.to_wire();
            errors.push(BulkEnrollmentGroupOperationError {
                enrollment_group_id: id.to_string(),
                error_code: w.error_code,
                error_status: w.message,
            });
        }
    }
    Ok(BulkEnrollmentGroupOperationResult { is_successful: errors.is_empty(), errors })
}

/// Registers a CA certificate under `name` (PEM or base64 DER). `verified = true` is the
/// "self-attest on upload" path; otherwise prove possession with
/// [`ca_verification_code`] and [`verify_ca_certificate`].
///
/// # Errors
/// [`Error::BadRequest`] for a bad name or certificate, [`Error::Conflict`] when the name exists.
pub fn add_ca_certificate<S: CaCertificateStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    name: &str,
    certificate: &str,
    verified: bool,
) -> Result<CaCertificate, Error> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err(Error::BadRequest(format!(
            "CA certificate name {name:?} may use only alphanumerics and -._"
        )));
    }
    let cert =
        Certificate::from_text(certificate).map_err(|e| Error::BadRequest(format!("certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(Error::BadRequest(
            "the certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
        ));
    }
    let record = CaCertificate {
        name: name.to_owned(),
        certificate_der: STANDARD.encode(cert.der()),
        sha256_thumbprint: cert.sha256_thumbprint(crypto),
        subject_name: cert.subject_name().to_owned(),
        is_verified: verified,
        verification_code: None,
        etag: new_etag(crypto)?,
    };
    store
        .put_ca_certificate(&record, &Precondition::MustNotExist)
        .map_err(|e| store_error(e, format!("CA certificate {name}")))?;
    Ok(record)
}

/// Generates (and stores) a verification code for proof of possession; `if_match` must carry
/// the certificate's etag (spec §5.3).
///
/// # Errors
/// [`Error::NotFound`], [`Error::PreconditionFailed`], store failures.
pub fn ca_verification_code<S: CaCertificateStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    name: &str,
    if_match: &IfMatch,
) -> Result<CaCertificate, Error> {
    let mut record =
        store.ca_certificate(name)?.ok_or_else(|| Error::NotFound(format!("CA certificate {name}")))?;
    let pre = Precondition::Matches(match if_match {
        IfMatch::Tag(t) => t.clone(),
        _ => return Err(Error::PreconditionFailed),
    });
    record.verification_code = Some(generate_verification_code(&random::<32>(crypto)?));
    record.etag = new_etag(crypto)?;
    store.put_ca_certificate(&record, &pre).map_err(|e| store_error(e, format!("CA certificate {name}")))?;
    Ok(record)
}

/// Completes proof of possession: `verification_certificate` must have CN = the outstanding
/// code and be signed by the CA's key. Marks the CA verified.
///
/// # Errors
/// [`Error::NotFound`], [`Error::BadRequest`] without an outstanding code, [`Error::Auth`] when
/// the proof fails, store failures.
pub fn verify_ca_certificate<S: CaCertificateStore + ?Sized>(
    store: &S,
    crypto: &dyn CryptoProvider,
    now: Timestamp,
    name: &str,
    verification_certificate: &str,
) -> Result<CaCertificate, Error> {
    let mut record =
        store.ca_certificate(name)?.ok_or_else(|| Error::NotFound(format!("CA certificate {name}")))?;
    let code = record
        .verification_code
        .clone()
        .ok_or_else(|| Error::BadRequest("no verification code was generated for this certificate".into()))?;
    let ca = Certificate::from_text(&record.certificate_der)?;
    let proof = Certificate::from_text(verification_certificate)?;
    verify_proof_of_possession(&ca, &proof, &code, now, crypto)?;
    let pre = Precondition::Matches(record.etag.bare().to_owned());
    record.is_verified = true;
    record.verification_code = None;
    record.etag = new_etag(crypto)?;
    store.put_ca_certificate(&record, &pre).map_err(|e| store_error(e, format!("CA certificate {name}")))?;
    Ok(record)
}

/// A device's registration state (`GET /registrations/{id}`).
///
/// # Errors
/// [`Error::NotFound`] and store failures.
pub fn get_registration_state<S: RegistrationStore + ?Sized>(
    store: &S,
    id: &RegistrationId,
) -> Result<DeviceRegistrationState, Error> {
    Ok(store.registration(id)?.ok_or_else(|| Error::NotFound(format!("registration {id}")))?.into_state())
}

/// Deletes a registration record (`DELETE /registrations/{id}`); the device's next
/// registration is an initial assignment again.
///
/// # Errors
/// [`Error::NotFound`], [`Error::PreconditionFailed`], store failures.
pub fn delete_registration_state<S: RegistrationStore + ?Sized>(
    store: &S,
    id: &RegistrationId,
    if_match: &IfMatch,
) -> Result<(), Error> {
    store
        .delete_registration(id, &Precondition::from_if_match(if_match))
        .map_err(|e| store_error(e, format!("registration {id}")))
}

/// One page of registration states of a group (`POST /registrations/{groupId}/query`).
///
/// # Errors
/// Store failures.
pub fn query_group_registrations<S: RegistrationStore + ?Sized>(
    store: &S,
    group: &EnrollmentGroupId,
    page: &PageRequest,
) -> Result<Page<DeviceRegistrationState>, Error> {
    let p = store.registrations_by_group(group, page)?;
    Ok(Page {
        items: p.items.into_iter().map(RegistrationRecord::into_state).collect(),
        continuation: p.continuation,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::RingCrypto;
    use crate::memory::MemoryStore;

    fn symmetric_key() -> AttestationMechanism {
        serde_json::from_value(serde_json::json!({"type": "symmetricKey"})).unwrap()
    }

    /// DPS replies always carry `provisioningStatus`; an enrollment PUT without it is `enabled`.
    #[test]
    fn reads_and_writes_of_an_enrollment_put_without_a_provisioning_status_return_it_enabled() {
        let (store, crypto) = (MemoryStore::new(), RingCrypto::new());
        let enabled = Some(ProvisioningStatus::Enabled);
        let id = RegistrationId::new("dev-1").unwrap();
        let put = IndividualEnrollment::new(id.clone(), symmetric_key());
        let written = put_enrollment(&store, &crypto, Timestamp::EPOCH, put, &IfMatch::Absent).unwrap();
        assert_eq!(written.provisioning_status, enabled);
        assert_eq!(get_enrollment(&store, &id).unwrap().provisioning_status, enabled);
        assert_eq!(
            query_enrollments(&store, &PageRequest::default()).unwrap().items[0].provisioning_status,
            enabled
        );

        let group_id = EnrollmentGroupId::new("sensors").unwrap();
        let put = EnrollmentGroup::new(group_id.clone(), symmetric_key());
        let written = put_enrollment_group(&store, &crypto, Timestamp::EPOCH, put, &IfMatch::Absent).unwrap();
        assert_eq!(written.provisioning_status, enabled);
        assert_eq!(get_enrollment_group(&store, &group_id).unwrap().provisioning_status, enabled);
        let page = query_enrollment_groups(&store, &PageRequest::default()).unwrap();
        assert_eq!(page.items[0].provisioning_status, enabled);

        // What was stored is what was written: the default is the reply's, not the record's.
        assert_eq!(store.enrollment(&id).unwrap().unwrap().provisioning_status, None);
        assert_eq!(store.enrollment_group(&group_id).unwrap().unwrap().provisioning_status, None);
        // A disabled enrollment reads as disabled.
        let mut put = IndividualEnrollment::new(id.clone(), symmetric_key());
        put.provisioning_status = Some(ProvisioningStatus::Disabled);
        put_enrollment(&store, &crypto, Timestamp::EPOCH, put, &IfMatch::Absent).unwrap();
        assert_eq!(
            get_enrollment(&store, &id).unwrap().provisioning_status,
            Some(ProvisioningStatus::Disabled)
        );
    }

    /// Every write of an individual enrollment checks its initial twin, bulk create included:
    /// a twin the hub would refuse fails the item, not each registration of the device later.
    #[test]
    fn every_bulk_mode_refuses_an_individual_enrollment_whose_initial_twin_the_hub_would_refuse() {
        let (store, crypto) = (MemoryStore::new(), RingCrypto::new());
        for mode in ["create", "update", "updateIfMatchETag"] {
            let op: BulkEnrollmentOperation = serde_json::from_value(serde_json::json!({
                "mode": mode,
                "enrollments": [{
                    "registrationId": "dev-twin",
                    "attestation": { "type": "symmetricKey" },
                    "initialTwin": { "tags": "not an object" },
                }],
            }))
            .unwrap();
            let result = bulk_enrollments(&store, &crypto, Timestamp::EPOCH, op).unwrap();
            assert!(!result.is_successful, "{mode}: {result:?}");
            assert_eq!(result.errors.len(), 1, "{mode}");
            assert_eq!(result.errors[0].error_code, 400_000, "{mode}: {result:?}");
            assert!(result.errors[0].error_status.contains("initialTwin"), "{mode}: {result:?}");
            let stored = store.enrollment(&RegistrationId::new("dev-twin").unwrap()).unwrap();
            assert!(stored.is_none(), "{mode}: stored {stored:?}");
        }
    }
}
