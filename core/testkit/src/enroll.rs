//! Enrolling test devices in a provisioning store the way the service API does (keys generated
//! by the service), returning the key bytes a device needs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::store::{EnrollmentGroupStore, EnrollmentStore, RegistrationStore};
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{EnrollmentGroupId, IfMatch, RegistrationId, Timestamp};

/// Enrolls `id` individually with a service-generated symmetric key; returns the primary key.
///
/// # Panics
/// When `id` is not a valid registration id or the store refuses the enrollment.
pub fn symmetric<S: EnrollmentStore + RegistrationStore + ?Sized>(
    store: &S,
    id: &str,
    now: Timestamp,
) -> Vec<u8> {
    let enrollment =
        IndividualEnrollment::new(RegistrationId::new(id).unwrap(), AttestationMechanism::symmetric_key());
    let e =
        enrollments::put_enrollment(store, &RingCrypto::new(), now, enrollment, &IfMatch::Absent).unwrap();
    STANDARD.decode(e.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap()
}

/// Creates a symmetric-key enrollment group with service-generated keys; returns the primary
/// group key (devices derive theirs from it).
///
/// # Panics
/// When `group_id` is not a valid group id or the store refuses the group.
pub fn symmetric_group<S: EnrollmentGroupStore + ?Sized>(
    store: &S,
    group_id: &str,
    now: Timestamp,
) -> Vec<u8> {
    let group = EnrollmentGroup::new(
        EnrollmentGroupId::new(group_id).unwrap(),
        AttestationMechanism::symmetric_key(),
    );
    let g =
        enrollments::put_enrollment_group(store, &RingCrypto::new(), now, group, &IfMatch::Absent).unwrap();
    STANDARD.decode(g.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap()
}
