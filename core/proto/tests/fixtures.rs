//! Every body in `testdata/dps/` parses into its proto type and serializes back to the same JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use zerotouch_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, ErrorDetails, RegistrationOperationStatus,
    RegistrationStatus, Substatus, TpmChallenge,
};
use zerotouch_proto::service::{
    AllocationPolicy, AttestationMechanism, AttestationType, BulkEnrollmentGroupOperation,
    BulkEnrollmentGroupOperationResult, BulkEnrollmentMode, BulkEnrollmentOperation,
    BulkEnrollmentOperationResult, CustomAllocationRequest, CustomAllocationResponse,
    DeviceRegistrationState, DeviceRuntimeContext, EnrollmentGroup, IndividualEnrollment, QuerySpecification,
    ReprovisionPolicy,
};

fn fixture_dir() -> PathBuf {
    manifest_dir().join("../../testdata/dps")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(fixture_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Parses the fixture into `T`, serializes it again and demands the same JSON value back.
fn round_trip<T: DeserializeOwned + Serialize>(name: &str) -> T {
    let text = read(name);
    let original: Value = serde_json::from_str(&text).unwrap();
    let typed: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(back, original, "{name} changed on the way through its proto type");
    typed
}

macro_rules! fixtures {
    ($($test:ident: $ty:ty = $file:literal;)+) => {
        const FIXTURES: &[&str] = &[$($file),+];
        $(
            #[test]
            fn $test() {
                round_trip::<$ty>($file);
            }
        )+
    };
}

fixtures! {
    python_register_request_round_trips: DeviceRegistration = "device_register_request_python.json";
    node_register_request_round_trips: DeviceRegistration = "device_register_request_node.json";
    node_register_request_with_payload_round_trips: DeviceRegistration = "device_register_request_node_payload.json";
    node_tpm_register_request_round_trips: DeviceRegistration = "device_register_request_node_tpm.json";
    register_reply_assigning_round_trips: RegistrationOperationStatus = "device_register_reply_assigning.json";
    poll_reply_assigning_round_trips: RegistrationOperationStatus = "device_poll_reply_assigning.json";
    poll_reply_assigned_symmetric_key_round_trips: RegistrationOperationStatus = "device_poll_reply_assigned_symkey.json";
    poll_reply_assigned_x509_individual_round_trips: RegistrationOperationStatus = "device_poll_reply_assigned_x509_individual.json";
    poll_reply_assigned_x509_group_round_trips: RegistrationOperationStatus = "device_poll_reply_assigned_x509_group.json";
    poll_reply_assigned_tpm_round_trips: RegistrationOperationStatus = "device_poll_reply_assigned_tpm.json";
    poll_reply_assigned_custom_payload_round_trips: RegistrationOperationStatus = "device_poll_reply_assigned_custom_payload.json";
    poll_reply_failed_round_trips: RegistrationOperationStatus = "device_poll_reply_failed.json";
    status_lookup_reply_round_trips: DeviceRegistrationResult = "device_registration_status_lookup_reply.json";
    error_body_401002_round_trips: ErrorDetails = "device_error_401002.json";
    tpm_challenge_round_trips: TpmChallenge = "device_tpm_challenge_401.json";
    symmetric_key_enrollment_round_trips: IndividualEnrollment = "service_enrollment_symkey.json";
    x509_enrollment_round_trips: IndividualEnrollment = "service_enrollment_x509.json";
    x509_enrollment_reply_round_trips: IndividualEnrollment = "service_enrollment_x509_reply.json";
    tpm_enrollment_round_trips: IndividualEnrollment = "service_enrollment_tpm.json";
    symmetric_key_group_round_trips: EnrollmentGroup = "service_group_symkey.json";
    x509_signing_certificate_group_round_trips: EnrollmentGroup = "service_group_x509_signing.json";
    x509_ca_reference_group_round_trips: EnrollmentGroup = "service_group_x509_ca_references.json";
    attestation_mechanism_reply_round_trips: AttestationMechanism = "service_attestation_mechanism_symkey.json";
    bulk_enrollment_operation_round_trips: BulkEnrollmentOperation = "service_bulk_enrollment_operation.json";
    bulk_enrollment_result_round_trips: BulkEnrollmentOperationResult = "service_bulk_enrollment_result.json";
    bulk_group_operation_round_trips: BulkEnrollmentGroupOperation = "service_bulk_group_operation.json";
    bulk_group_result_round_trips: BulkEnrollmentGroupOperationResult = "service_bulk_group_result.json";
    query_specification_round_trips: QuerySpecification = "service_query_specification.json";
    device_registration_state_round_trips: DeviceRegistrationState = "service_device_registration_state.json";
    custom_allocation_request_round_trips: CustomAllocationRequest = "webhook_custom_allocation_request.json";
    custom_allocation_response_round_trips: CustomAllocationResponse = "webhook_custom_allocation_response.json";
}

#[test]
fn every_fixture_file_is_checked() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let listed: BTreeSet<String> = FIXTURES.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(on_disk, listed);
}

#[test]
fn every_fixture_is_listed_in_the_readme() {
    let readme = read("README.md");
    for name in FIXTURES {
        assert!(readme.contains(name), "README.md does not describe {name}");
    }
}

#[test]
fn python_register_request_serializes_in_sorted_key_order() {
    let req: DeviceRegistration = serde_json::from_str(&read("device_register_request_python.json")).unwrap();
    assert_eq!(req.payload.as_deref().map(RawValue::get), Some("null"));
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"payload":null,"registrationId":"my-symkey-device"}"#
    );
}

#[test]
fn node_register_request_without_payload_sends_no_payload_member() {
    let req: DeviceRegistration = serde_json::from_str(&read("device_register_request_node.json")).unwrap();
    assert!(req.payload.is_none());
    assert!(!serde_json::to_string(&req).unwrap().contains("payload"));
}

#[test]
fn register_payload_of_any_json_type_is_kept() {
    for payload in
        [json!(null), json!("text"), json!(42), json!(-1.5), json!(true), json!([1, "a"]), json!({"a": {}})]
    {
        let body = json!({"registrationId": "dev1", "payload": payload.clone()});
        let req: DeviceRegistration = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(req.parse_payload().unwrap(), Some(payload));
        assert_eq!(serde_json::to_value(&req).unwrap(), body);
    }
}

/// The payload is not parsed into a tree by the body's decoder (which runs before the device is
/// authenticated): it stays the very text the device sent, `null` included, until
/// [`DeviceRegistration::parse_payload`].
#[test]
fn register_payload_is_kept_as_the_text_the_device_sent() {
    let payload = r#"{ "b" : [1, 2.50, 1e3, "\u00e9", -0],"a":{ } ,"b":null}"#;
    let body = format!("{{\"registrationId\":\"dev1\",\"payload\" :  {payload}  }}");
    let req: DeviceRegistration = serde_json::from_slice(body.as_bytes()).unwrap();
    assert_eq!(req.payload.as_deref().map(RawValue::get), Some(payload));
    // Sent on as it came, byte for byte.
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        format!("{{\"payload\":{payload},\"registrationId\":\"dev1\"}}")
    );

    let null: DeviceRegistration =
        serde_json::from_slice(br#"{"payload":null,"registrationId":"d"}"#).unwrap();
    assert_eq!(null.payload.as_deref().map(RawValue::get), Some("null"));
    assert_eq!(null.parse_payload().unwrap(), Some(Value::Null));
    let absent: DeviceRegistration = serde_json::from_slice(br#"{"registrationId":"d"}"#).unwrap();
    assert!(absent.payload.is_none());
    assert_eq!(absent.parse_payload().unwrap(), None);
    assert_ne!(null, absent);
}

/// JSON text serde_json makes no tree of (nested deeper than 128 levels, a number beyond
/// `f64`, a lone surrogate) is only syntax to the decoder: the refusal comes when the payload
/// is parsed, after authentication.
#[test]
fn a_payload_serde_json_makes_no_tree_of_decodes_and_fails_only_when_parsed() {
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    for (payload, why) in
        [(deep.as_str(), "recursion limit"), ("1e400", "out of range"), (r#""\ud800""#, "escape")]
    {
        let body = format!(r#"{{"registrationId":"dev1","payload":{payload}}}"#);
        let req: DeviceRegistration = serde_json::from_str(&body).unwrap();
        assert_eq!(req.payload.as_deref().map(RawValue::get), Some(payload));
        let e = req.parse_payload().unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }

    // Malformed text is still refused by the decoder.
    for bad in [r#"{"registrationId":"d","payload":{"a":}}"#, r#"{"registrationId":"d","payload":[1,]}"#] {
        assert!(serde_json::from_str::<DeviceRegistration>(bad).is_err(), "{bad}");
    }
}

#[test]
fn raw_payload_is_the_json_text_of_a_value() {
    let value = json!({"modelId": "dtmi:contoso:thermostat;1", "hwVersion": 2});
    let raw = zerotouch_proto::device::raw_payload(&value);
    assert_eq!(raw.get(), r#"{"modelId":"dtmi:contoso:thermostat;1","hwVersion":2}"#);
    assert_eq!(zerotouch_proto::device::raw_payload(&Value::Null).get(), "null");
}

#[test]
fn status_in_any_casing_parses_and_is_written_lower_case() {
    let reply: RegistrationOperationStatus = serde_json::from_value(json!({
        "operationId": "4.0f8c2bd7a1e93c56.x",
        "status": "Assigned",
        "registrationState": {"registrationId": "dev1", "status": "ASSIGNED", "substatus": "InitialAssignment"}
    }))
    .unwrap();
    assert_eq!(reply.status, RegistrationStatus::Assigned);
    let state = reply.registration_state.as_ref().unwrap();
    assert_eq!(state.substatus, Some(Substatus::InitialAssignment));
    let back = serde_json::to_value(&reply).unwrap();
    assert_eq!(back["status"], "assigned");
    assert_eq!(back["registrationState"]["substatus"], "initialAssignment");
}

#[test]
fn unknown_members_of_a_real_dps_reply_do_not_break_our_client() {
    let reply: RegistrationOperationStatus = serde_json::from_value(json!({
        "operationId": "5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550",
        "status": "assigned",
        "someFutureMember": {"x": 1},
        "registrationState": {"registrationId": "dev1", "assignedHub": "h.azure-devices.net", "deviceId": "dev1",
            "status": "assigned", "trustBundle": null, "deviceUpdate": {"a": 1}}
    }))
    .unwrap();
    assert_eq!(reply.registration_state.unwrap().assigned_hub.as_deref(), Some("h.azure-devices.net"));
}

#[test]
fn enrollment_members_from_newer_api_versions_are_kept() {
    let mut body: Value = serde_json::from_str(&read("service_enrollment_symkey.json")).unwrap();
    body["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": "contoso-ca"});
    body["deviceInformation"] = json!({"model": "t1000"});
    let enrollment: IndividualEnrollment = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(enrollment.extra.len(), 2);
    assert_eq!(serde_json::to_value(&enrollment).unwrap(), body);

    let mut body: Value = serde_json::from_str(&read("service_group_x509_signing.json")).unwrap();
    body["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": "contoso-ca"});
    let group: EnrollmentGroup = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(serde_json::to_value(&group).unwrap(), body);
}

#[test]
fn enrollment_fixtures_carry_the_documented_shapes() {
    let e: IndividualEnrollment = serde_json::from_str(&read("service_enrollment_tpm.json")).unwrap();
    assert_eq!(e.attestation.kind, AttestationType::Tpm);
    assert_eq!(e.allocation_policy, Some(AllocationPolicy::Custom));
    assert_eq!(e.registration_id.as_str().len(), 52, "TPM registration ids are 52 base32 characters");
    assert!(e.custom_allocation_definition.is_some());
    assert_eq!(
        e.reprovision_policy,
        Some(ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: false })
    );

    let g: EnrollmentGroup = serde_json::from_str(&read("service_group_x509_ca_references.json")).unwrap();
    let refs = g.attestation.x509.unwrap().ca_references.unwrap();
    assert_eq!(refs.primary.as_deref(), Some("zerotouch-test-root"));

    let bulk: BulkEnrollmentOperation =
        serde_json::from_str(&read("service_bulk_enrollment_operation.json")).unwrap();
    assert_eq!(bulk.mode, BulkEnrollmentMode::Create);
    assert!(bulk.enrollments.len() <= 10);
}

#[test]
fn allocation_policy_in_arm_casing_parses() {
    let body = json!({"registrationId": "dev1", "attestation": {"type": "SymmetricKey"}, "allocationPolicy": "Hashed"});
    let e: IndividualEnrollment = serde_json::from_value(body).unwrap();
    assert_eq!(e.allocation_policy, Some(AllocationPolicy::Hashed));
    assert_eq!(e.attestation.kind, AttestationType::SymmetricKey);
    assert_eq!(serde_json::to_value(&e).unwrap()["allocationPolicy"], "hashed");
}

#[test]
fn reprovision_policy_members_default_to_true() {
    let p: ReprovisionPolicy = serde_json::from_value(json!({})).unwrap();
    assert_eq!(p, ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true });
}

#[test]
fn webhook_spellings_from_the_docs_parse() {
    let r: CustomAllocationResponse =
        serde_json::from_value(json!({"iotHubHostname": "h.azure-devices.net"})).unwrap();
    assert_eq!(r.iot_hub_host_name, "h.azure-devices.net");
    let c: DeviceRuntimeContext = serde_json::from_value(
        json!({"registrationId": "d1", "currentIoTHubHostName": "h.azure-devices.net"}),
    )
    .unwrap();
    assert_eq!(c.current_iot_hub_host_name.as_deref(), Some("h.azure-devices.net"));
}

#[test]
fn failed_reply_carries_code_and_message_for_the_rust_client() {
    let reply: RegistrationOperationStatus =
        serde_json::from_str(&read("device_poll_reply_failed.json")).unwrap();
    assert_eq!(reply.status, RegistrationStatus::Failed);
    let state = reply.registration_state.unwrap();
    assert_eq!(state.error_code, Some(401002));
    let nested: Value = serde_json::from_str(state.error_message.as_deref().unwrap()).unwrap();
    assert!(nested["Message"].as_str().unwrap().contains("401002"));
}

#[test]
fn error_body_keeps_info_null() {
    let text = read("device_error_401002.json");
    let e: ErrorDetails = serde_json::from_str(&text).unwrap();
    assert_eq!(e.info, Some(Value::Null));
    assert_eq!(e.error_code / 1000, 401);
}

#[test]
fn error_body_without_tracking_id_still_parses() {
    let e: ErrorDetails =
        serde_json::from_value(json!({"errorCode": 429001, "message": "Throttled"})).unwrap();
    assert_eq!(e.error_code, 429001);
    assert_eq!(e.tracking_id, "");
    assert_eq!(e.info, None);
}

/// This crate's directory as cargo gives it when running the test: a binary reused from a shared
/// build cache may have been compiled in a checkout elsewhere, so the compile-time path is only
/// the fallback.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// A certificate with no well-defined expiration has notAfter 9999-12-31T23:59:59Z (RFC 5280
/// §4.1.2.5), and DPS reports it as such: the body it returns can be sent back.
#[test]
fn an_x509_enrollment_whose_certificate_never_expires_round_trips() {
    let mut body: Value = serde_json::from_str(&read("service_enrollment_x509_reply.json")).unwrap();
    let info = &mut body["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    info["notAfterUtc"] = json!("9999-12-31T23:59:59Z");
    let enrollment: IndividualEnrollment = serde_json::from_value(body.clone()).unwrap();
    let info = enrollment.attestation.x509.as_ref().unwrap().client_certificates.as_ref().unwrap();
    let info = info.primary.as_ref().unwrap().info.as_ref().unwrap();
    assert_eq!(info.not_after_utc.to_string(), "9999-12-31T23:59:59.0000000Z");

    let written = serde_json::to_value(&enrollment).unwrap();
    let info = &mut body["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
    info["notAfterUtc"] = json!("9999-12-31T23:59:59.0000000Z");
    assert_eq!(written, body);
    assert_eq!(serde_json::from_value::<IndividualEnrollment>(written).unwrap(), enrollment);
}
