//! The bad-credential matrix: every way a device can fail to prove who it is, each rejected with
//! its DPS status and error code — and a good credential next to each, so a rejection is never
//! an accident of the setup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::x509::Certificate;
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::enrollments;
use zerotouch_engine::provisioner::{OperationStatusRequest, RegisterRequest, Response, ResponseBody};
use zerotouch_engine::registration::FailureKind;
use zerotouch_engine::store::{EnrollmentStore as _, RegistrationStore as _};
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::service::{IndividualEnrollment, ProvisioningStatus};
use zerotouch_proto::{IfMatch, RegistrationId, Timestamp};
use zerotouch_testkit::certs::{CertSpec, TestCa};

fn register(w: &mut World, id: &str, credential: Credential) -> Response {
    let now = w.now;
    w.provisioner.handle_register(
        now,
        RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: id.into(),
            body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
            credential,
            api_version: None,
        },
        &mut w.hubs,
    )
}

fn sas(w: &World, key: &[u8], id: &str, ttl: i64) -> Credential {
    Credential::Sas(registration_token(&crypto(), key, SCOPE, id, w.now.unix_secs() + ttl).to_string())
}

fn assert_rejected(r: &Response, status: u16, code: u32) {
    assert_eq!((r.status, r.error_code()), (status, Some(code)), "reply: {r:?}");
}

#[test]
fn a_wrong_symmetric_key_is_unauthorized() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    assert_eq!(
        {
            let c = sas(&w, &key, "dev-1", 60);
            register(&mut w, "dev-1", c)
        }
        .status,
        202
    );
    let c = sas(&w, &[7u8; 32], "dev-1", 60);
    let r = register(&mut w, "dev-1", c);
    assert_rejected(&r, 401, 401002);
}

#[test]
fn the_group_key_itself_is_not_accepted() {
    let mut w = world();
    let group_key = enroll_symmetric_group(&w, "g1", &EnrollOptions::default());
    let r = {
        let c = sas(&w, &group_key, "dev-1", 60);
        register(&mut w, "dev-1", c)
    };
    assert_rejected(&r, 401, 401002);
    let derived = derive_device_key(&crypto(), &group_key, "dev-1");
    assert_eq!(
        {
            let c = sas(&w, &derived, "dev-1", 60);
            register(&mut w, "dev-1", c)
        }
        .status,
        202
    );
}

#[test]
fn an_expired_token_is_unauthorized() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    // Beyond the five-minute clock skew the service allows.
    let r = {
        let c = sas(&w, &key, "dev-1", -301);
        register(&mut w, "dev-1", c)
    };
    assert_rejected(&r, 401, 401002);
    assert_eq!(
        {
            let c = sas(&w, &key, "dev-1", -60);
            register(&mut w, "dev-1", c)
        }
        .status,
        202,
        "within the skew"
    );
}

fn poll(w: &World, id: &str, operation_id: &str, credential: Credential) -> Response {
    w.provisioner.handle_operation_status(
        w.now,
        OperationStatusRequest {
            id_scope: SCOPE.into(),
            registration_id: id.into(),
            operation_id: operation_id.into(),
            credential,
        },
    )
}

fn operation_id(r: &Response) -> String {
    match &r.body {
        ResponseBody::Operation(op) => op.operation_id.to_string(),
        other => panic!("not an operation: {other:?}"),
    }
}

#[test]
fn a_token_that_expires_while_its_operation_is_polled_still_polls_that_operation_only() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    // The Rust identity service signs for 30 s and reuses the token for every poll.
    let token = sas(&w, &key, "dev-1", 30);
    let first = register(&mut w, "dev-1", token.clone());
    assert_eq!(first.status, 202, "{first:?}");
    let first = operation_id(&first);

    // Long past the token's expiry and the five-minute skew.
    w.now = Timestamp::from_unix_secs(w.now.unix_secs() + 30 + 300 + 60);
    let r = poll(&w, "dev-1", &first, token.clone());
    assert_eq!(r.status, 200, "the operation begun with the token: {r:?}");
    // Not a licence for anything else: a new registration, an operation begun after the
    // token expired, a forged signature, a disabled enrollment.
    assert_rejected(&register(&mut w, "dev-1", token.clone()), 401, 401002);
    let fresh = sas(&w, &key, "dev-1", 60);
    let second = operation_id(&register(&mut w, "dev-1", fresh.clone()));
    assert_rejected(&poll(&w, "dev-1", &second, token.clone()), 401, 401002);
    assert_eq!(poll(&w, "dev-1", &second, fresh).status, 200);
    let forged = Credential::Sas(
        registration_token(&crypto(), &[7u8; 32], SCOPE, "dev-1", w.now.unix_secs() - 400).to_string(),
    );
    assert_rejected(&poll(&w, "dev-1", &first, forged), 401, 401002);
    let mut enrollment =
        w.provisioner.store().enrollment(&RegistrationId::new("dev-1").unwrap()).unwrap().unwrap();
    enrollment.provisioning_status = Some(ProvisioningStatus::Disabled);
    enrollments::put_enrollment(w.provisioner.store(), &crypto(), w.now, enrollment, &IfMatch::Absent)
        .unwrap();
    assert_rejected(&poll(&w, "dev-1", &first, token), 401, 401002);
}

#[test]
fn a_token_for_another_registration_id_is_unauthorized() {
    let mut w = world();
    enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    let other = enroll_symmetric(&w, "dev-2", &EnrollOptions::default());
    let r = {
        let c = sas(&w, &other, "dev-2", 60);
        register(&mut w, "dev-1", c)
    };
    assert_rejected(&r, 401, 401002);
}

#[test]
fn a_token_with_another_key_name_is_unauthorized() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    let Credential::Sas(token) = sas(&w, &key, "dev-1", 60) else { unreachable!() };
    let r = register(&mut w, "dev-1", Credential::Sas(token.replace("skn=registration", "skn=iothubowner")));
    assert_rejected(&r, 401, 401002);
}

#[test]
fn no_credential_is_unauthorized() {
    let mut w = world();
    enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    assert_rejected(&register(&mut w, "dev-1", Credential::None), 401, 401002);
}

#[test]
fn a_certificate_from_a_foreign_ca_is_unauthorized() {
    let mut w = world();
    let ours = TestCa::root("Ours").intermediate("Ours Line");
    let foreign = TestCa::root("Foreign").intermediate("Foreign Line");
    enroll_x509_group(&w, "ours", ours.pem(), &EnrollOptions::default());
    assert_eq!(register(&mut w, "cam-1", Credential::X509(ours.device("cam-1").chain_der())).status, 202);
    let r = register(&mut w, "cam-2", Credential::X509(foreign.device("cam-2").chain_der()));
    assert_rejected(&r, 401, 401002);
}

#[test]
fn a_foreign_ca_with_the_same_name_is_unauthorized() {
    let mut w = world();
    let ours = TestCa::root("Same Name");
    let impostor = TestCa::root("Same Name");
    enroll_x509_group(&w, "ours", ours.pem(), &EnrollOptions::default());
    let r = register(&mut w, "cam-1", Credential::X509(impostor.device("cam-1").chain_der()));
    assert_rejected(&r, 401, 401002);
}

#[test]
fn an_expired_device_certificate_is_unauthorized() {
    let mut w = world();
    let ca = TestCa::root("Root").intermediate("Line");
    enroll_x509_group(&w, "line", ca.pem(), &EnrollOptions::default());
    let expired = ca.device_with(CertSpec::new("cam-1").expired_at(w.now));
    assert_rejected(&register(&mut w, "cam-1", Credential::X509(expired.chain_der())), 401, 401002);
}

#[test]
fn a_not_yet_valid_device_certificate_is_unauthorized() {
    let mut w = world();
    let ca = TestCa::root("Root").intermediate("Line");
    enroll_x509_group(&w, "line", ca.pem(), &EnrollOptions::default());
    let early = ca.device_with(CertSpec::new("cam-1").not_yet_valid_at(w.now + Duration::from_secs(600)));
    assert_rejected(&register(&mut w, "cam-1", Credential::X509(early.chain_der())), 401, 401002);
}

#[test]
fn a_certificate_whose_cn_is_not_the_registration_id_is_unauthorized() {
    let mut w = world();
    let ca = TestCa::root("Root").intermediate("Line");
    enroll_x509_group(&w, "line", ca.pem(), &EnrollOptions::default());
    let r = register(&mut w, "cam-2", Credential::X509(ca.device("cam-1").chain_der()));
    assert_rejected(&r, 401, 401002);
}

#[test]
fn a_disabled_enrollment_is_unauthorized() {
    let mut w = world();
    let disabled = EnrollOptions { disabled: true, ..Default::default() };
    let key = enroll_symmetric(&w, "dev-1", &disabled);
    assert_rejected(
        &{
            let c = sas(&w, &key, "dev-1", 60);
            register(&mut w, "dev-1", c)
        },
        401,
        401002,
    );
    let group_key = enroll_symmetric_group(&w, "off", &disabled);
    let derived = derive_device_key(&crypto(), &group_key, "dev-9");
    assert_rejected(
        &{
            let c = sas(&w, &derived, "dev-9", 60);
            register(&mut w, "dev-9", c)
        },
        401,
        401002,
    );
    let ca = TestCa::root("Root");
    enroll_x509_group(&w, "off-x509", ca.pem(), &disabled);
    assert_rejected(
        &register(&mut w, "cam-1", Credential::X509(ca.device("cam-1").chain_der())),
        401,
        401002,
    );
}

#[test]
fn a_disabled_individual_entry_inside_a_group_revokes_that_device() {
    let mut w = world();
    let ca = TestCa::root("Root").intermediate("Line");
    enroll_x509_group(&w, "line", ca.pem(), &EnrollOptions::default());
    let good = ca.device("cam-1");
    let revoked = ca.device("cam-2");
    enroll_x509(&w, "cam-2", revoked.pem(), &EnrollOptions { disabled: true, ..Default::default() });
    assert_eq!(register(&mut w, "cam-1", Credential::X509(good.chain_der())).status, 202);
    assert_rejected(&register(&mut w, "cam-2", Credential::X509(revoked.chain_der())), 401, 401002);

    // The same for a symmetric-key group: the disabled individual entry wins over the group.
    let group_key = enroll_symmetric_group(&w, "sym", &EnrollOptions::default());
    enroll_symmetric(&w, "dev-2", &EnrollOptions { disabled: true, ..Default::default() });
    let derived = derive_device_key(&crypto(), &group_key, "dev-2");
    assert_rejected(
        &{
            let c = sas(&w, &derived, "dev-2", 60);
            register(&mut w, "dev-2", c)
        },
        401,
        401002,
    );
}

#[test]
fn a_deleted_enrollment_is_not_found() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    zerotouch_engine::enrollments::delete_enrollment(
        w.provisioner.store(),
        &zerotouch_proto::RegistrationId::new("dev-1").unwrap(),
        &IfMatch::Any,
    )
    .unwrap();
    assert_rejected(
        &{
            let c = sas(&w, &key, "dev-1", 60);
            register(&mut w, "dev-1", c)
        },
        404,
        404201,
    );
}

#[test]
fn a_body_registration_id_that_differs_from_the_path_is_a_bad_request() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    let now = w.now;
    let r = w.provisioner.handle_register(
        now,
        RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: "dev-1".into(),
            body: DeviceRegistration { payload: None, registration_id: "dev-2".into(), tpm: None, csr: None },
            credential: sas(&w, &key, "dev-1", 60),
            api_version: None,
        },
        &mut w.hubs,
    );
    assert_rejected(&r, 400, 400004);
}

/// The payload is parsed into a tree only for a device that proved who it is: one nested
/// deeper than a tree is built for is refused as a bad request after a good credential, and is
/// never looked at for a bad one (a tree of a hostile payload costs tens of times its bytes).
#[test]
fn a_payload_is_parsed_only_after_the_device_is_authenticated() {
    let mut w = world();
    let key = enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let text = format!(r#"{{"registrationId":"dev-1","payload":{deep}}}"#);
    let register_deep = |w: &mut World, credential| {
        let now = w.now;
        let body: DeviceRegistration = serde_json::from_str(&text).expect("decodes without building a tree");
        let req = RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: "dev-1".into(),
            body,
            credential,
            api_version: None,
        };
        w.provisioner.handle_register(now, req, &mut w.hubs)
    };
    let wrong = sas(&w, &[7u8; 32], "dev-1", 60);
    assert_rejected(&register_deep(&mut w, wrong), 401, 401002);
    assert_rejected(&register_deep(&mut w, Credential::None), 401, 401002);
    let good = sas(&w, &key, "dev-1", 60);
    let r = register_deep(&mut w, good);
    assert_rejected(&r, 400, 400000);
    let ResponseBody::Error(e) = &r.body else { panic!("{r:?}") };
    assert!(e.message.contains("payload"), "{}", e.message);
    assert!(w.provisioner.store().registration(&RegistrationId::new("dev-1").unwrap()).unwrap().is_none());
}

#[test]
fn a_rejected_device_sees_unauthorized_through_its_state_machine() {
    let mut w = world();
    enroll_symmetric(&w, "dev-1", &EnrollOptions::default());
    let f = failed(w.register(symmetric_device("dev-1", &[9u8; 32], None), None));
    assert_eq!((f.kind, f.status, f.error_code), (FailureKind::Unauthorized, Some(401), Some(401002)));
}

#[test]
fn a_rotated_group_key_admits_with_the_new_key_and_refuses_the_old_one() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use zerotouch_engine::enrollments;
    use zerotouch_engine::store::EnrollmentGroupStore as _;
    use zerotouch_proto::EnrollmentGroupId;

    let mut w = world();
    enroll_symmetric_group(&w, "g1", &EnrollOptions::default());
    let stored = |w: &World| {
        w.provisioner.store().enrollment_group(&EnrollmentGroupId::new("g1").unwrap()).unwrap().unwrap()
    };
    let secondary_of = |w: &World| {
        let g = stored(w);
        STANDARD.decode(g.attestation.symmetric_key.unwrap().secondary_key.unwrap()).unwrap()
    };
    let old_secondary = secondary_of(&w);
    let c = sas(&w, &derive_device_key(&crypto(), &old_secondary, "dev-1"), "dev-1", 60);
    assert_eq!(register(&mut w, "dev-1", c).status, 202, "the secondary key admits before rotation");

    // Rotate only the secondary key: the primary, which the prepared keys are found by, stays.
    let mut group = stored(&w);
    let new_secondary = [42u8; 64];
    group.attestation.symmetric_key.as_mut().unwrap().secondary_key = Some(STANDARD.encode(new_secondary));
    enrollments::put_enrollment_group(w.provisioner.store(), &crypto(), w.now, group, &IfMatch::Absent)
        .unwrap();

    let c = sas(&w, &derive_device_key(&crypto(), &old_secondary, "dev-1"), "dev-1", 60);
    assert_rejected(&register(&mut w, "dev-1", c), 401, 401002);
    let c = sas(&w, &derive_device_key(&crypto(), &new_secondary, "dev-1"), "dev-1", 60);
    assert_eq!(register(&mut w, "dev-1", c).status, 202, "the new secondary key admits");
}

#[test]
fn a_group_ca_whose_path_length_forbids_the_devices_intermediate_is_unauthorized() {
    let mut w = world();
    // pathLen 0: this root may sign devices, not intermediates.
    let strict = TestCa::root_with(CertSpec::new("Strict Root").path_len(0));
    enroll_x509_group(&w, "strict", strict.pem(), &EnrollOptions::default());
    let direct = strict.device("cam-1");
    assert_eq!(register(&mut w, "cam-1", Credential::X509(direct.chain_der())).status, 202);
    let below = strict.intermediate("Line Under Strict").device("cam-2");
    // Refused whether or not the device sends the root along.
    assert_rejected(&register(&mut w, "cam-2", Credential::X509(below.chain_der())), 401, 401002);
    assert_rejected(&register(&mut w, "cam-2", Credential::X509(below.full_chain_der())), 401, 401002);
}

#[test]
fn a_group_signing_certificate_that_is_not_a_ca_admits_no_one() {
    let mut w = world();
    let not_ca = TestCa::root_with(CertSpec::new("Just A Leaf").ca(false));
    enroll_x509_group(&w, "not-ca", not_ca.pem(), &EnrollOptions::default());
    let r = register(&mut w, "cam-1", Credential::X509(not_ca.device("cam-1").chain_der()));
    assert_rejected(&r, 401, 401002);
    let ca = TestCa::root("A Real CA");
    enroll_x509_group(&w, "ca", ca.pem(), &EnrollOptions::default());
    assert_eq!(register(&mut w, "cam-2", Credential::X509(ca.device("cam-2").chain_der())).status, 202);
}

#[test]
fn a_chain_sent_out_of_order_or_with_unrelated_certificates_is_admitted() {
    let mut w = world();
    let root = TestCa::root("Ordered Root");
    let line = root.intermediate("Ordered Line");
    enroll_x509_group(&w, "ordered", root.pem(), &EnrollOptions::default());
    let unrelated = TestCa::root("Unrelated").der().to_vec();
    for (n, order) in [[0, 2, 1, 3], [0, 1, 3, 2], [0, 3, 1, 2]].into_iter().enumerate() {
        let id = format!("cam-{n}");
        let device = line.device(&id);
        let mut sent = device.full_chain_der();
        sent.push(unrelated.clone());
        let reordered: Vec<Vec<u8>> = order.iter().map(|&i| sent[i].clone()).collect();
        let r = register(&mut w, &id, Credential::X509(reordered));
        assert_eq!(r.status, 202, "order {order:?}: {r:?}");
    }
}

#[test]
fn a_certificate_that_never_expires_is_accepted_and_its_enrollment_keeps_its_date() {
    // RFC 5280 §4.1.2.5: notAfter 99991231235959Z, as IEEE 802.1AR device certificates carry.
    let mut w = world();
    let factory = TestCa::root_with(CertSpec::new("Factory CA").without_expiry());
    let cam = factory.device_with(CertSpec::new("cam-1").without_expiry());

    // The enrollment as Azure DPS returns it (its `info` with the certificate's own date), PUT
    // back with the certificate.
    let attestation = x509_individual_attestation(cam.pem());
    let mut body = serde_json::to_value(individual("cam-1", attestation, &EnrollOptions::default())).unwrap();
    let mut info = serde_json::to_value(Certificate::from_der(cam.der()).unwrap().info(&crypto())).unwrap();
    info["notAfterUtc"] = serde_json::json!("9999-12-31T23:59:59Z");
    body["attestation"]["x509"]["clientCertificates"]["primary"]["info"] = info;
    let enrollment: IndividualEnrollment = serde_json::from_value(body).unwrap();
    let written =
        enrollments::put_enrollment(w.provisioner.store(), &crypto(), w.now, enrollment, &IfMatch::Absent)
            .unwrap();
    let written = serde_json::to_value(&written).unwrap();
    assert_eq!(
        written["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["notAfterUtc"],
        "9999-12-31T23:59:59.0000000Z"
    );
    assert_eq!(register(&mut w, "cam-1", Credential::X509(cam.chain_der())).status, 202);

    // Through a group whose CA never expires either.
    enroll_x509_group(&w, "factory", factory.pem(), &EnrollOptions::default());
    let cam2 = factory.device_with(CertSpec::new("cam-2").without_expiry());
    assert_eq!(register(&mut w, "cam-2", Credential::X509(cam2.chain_der())).status, 202);
}

#[test]
fn a_certificate_issued_moments_ahead_of_the_server_clock_is_accepted_within_the_clock_skew() {
    // A factory station mints the certificate with a clock a minute ahead of the server's.
    let mut w = world();
    let ca = TestCa::root("Root").intermediate("Line");
    enroll_x509_group(&w, "line", ca.pem(), &EnrollOptions::default());
    let year = Duration::from_secs(365 * 86_400);
    let now = w.now;
    let minted = |ahead: Duration| CertSpec::new("cam-1").validity(now + ahead, now + ahead + year);
    let ahead = ca.device_with(minted(Duration::from_secs(60)));
    assert_eq!(register(&mut w, "cam-1", Credential::X509(ahead.chain_der())).status, 202);
    // Beyond the configured skew (5 minutes) it is not valid yet.
    let later = ca.device_with(minted(Duration::from_secs(301)));
    assert_rejected(&register(&mut w, "cam-1", Credential::X509(later.chain_der())), 401, 401002);
    // And one that expired a minute ago still counts within the skew, as an expired SAS token does.
    let ended =
        ca.device_with(CertSpec::new("cam-1").validity(w.now - year, w.now - Duration::from_secs(60)));
    assert_eq!(register(&mut w, "cam-1", Credential::X509(ended.chain_der())).status, 202);
    let long_ended =
        ca.device_with(CertSpec::new("cam-1").validity(w.now - year, w.now - Duration::from_secs(301)));
    assert_rejected(&register(&mut w, "cam-1", Credential::X509(long_ended.chain_der())), 401, 401002);
}

/// Two groups anchored on the same CA, one disabled (the old batch's) and one enabled: the
/// enabled one admits the device, whichever of the two a store lists first. Disabled only when
/// every group that signed at that level is.
#[test]
fn an_enabled_group_beside_a_disabled_one_on_the_same_ca_admits_the_device() {
    let disabled = EnrollOptions { disabled: true, ..Default::default() };
    for (old, new) in [("a-old", "b-new"), ("z-old", "a-new"), ("m-old", "m-new")] {
        let mut w = world();
        let ca = TestCa::root("Shared Root").intermediate("Shared Line");
        enroll_x509_group(&w, old, ca.pem(), &disabled);
        enroll_x509_group(&w, new, ca.pem(), &EnrollOptions::default());
        let r = register(&mut w, "cam-1", Credential::X509(ca.device("cam-1").chain_der()));
        assert_eq!(r.status, 202, "{old} disabled, {new} enabled: {r:?}");
    }
    let mut w = world();
    let ca = TestCa::root("Shared Root").intermediate("Shared Line");
    enroll_x509_group(&w, "one", ca.pem(), &disabled);
    enroll_x509_group(&w, "two", ca.pem(), &disabled);
    let r = register(&mut w, "cam-1", Credential::X509(ca.device("cam-1").chain_der()));
    assert_rejected(&r, 401, 401002);
}
