//! Scenario tests for every combination of {individual, group} × {symmetric key, X.509} ×
//! {hashed, lowest latency, static, custom}: a device registers through the simulator and lands
//! on the hub the policy says, with its identity, credentials and initial twin in that hub.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use zerotouch_engine::allocation::hashed;
use zerotouch_engine::hub::DeviceAuth;
use zerotouch_proto::device::Substatus;
use zerotouch_proto::service::AllocationPolicy;
use zerotouch_proto::RegistrationId;
use zerotouch_testkit::certs::TestCa;

#[derive(Clone, Copy)]
enum Enrollment {
    Individual,
    Group,
}

#[derive(Clone, Copy)]
enum Attestation {
    SymmetricKey,
    X509,
}

/// Enrolls one device the given way, registers it, and checks hub, device id, substatus,
/// credentials and twin.
fn scenario(enrollment: Enrollment, attestation: Attestation, policy: AllocationPolicy) {
    let mut w = world();
    let id = "sensor-0042";
    let o = EnrollOptions {
        policy: Some(policy),
        hubs: (policy == AllocationPolicy::Static).then(|| vec![HUB_C.to_owned()]),
        device_id: matches!(enrollment, Enrollment::Individual).then(|| "line-3-sensor".to_owned()),
        iot_edge: true,
        ..Default::default()
    };
    let payload = (policy == AllocationPolicy::Custom).then(|| json!({ "site": "a" }));
    let ca = TestCa::root("Contoso Root").intermediate("Contoso Line 3");

    let event = match (enrollment, attestation) {
        (Enrollment::Individual, Attestation::SymmetricKey) => {
            let key = enroll_symmetric(&w, id, &o);
            w.register(symmetric_device(id, &key, payload), None)
        }
        (Enrollment::Group, Attestation::SymmetricKey) => {
            let key = enroll_symmetric_group(&w, "line-3", &o);
            w.register(group_device(id, &key, payload), None)
        }
        (Enrollment::Individual, Attestation::X509) => {
            let device = ca.device(id);
            enroll_x509(&w, id, device.pem(), &o);
            w.register(x509_device(id, payload), Some(device.chain_der()))
        }
        (Enrollment::Group, Attestation::X509) => {
            let device = ca.device(id);
            enroll_x509_group(&w, "line-3", ca.pem(), &o);
            w.register(x509_device(id, payload), Some(device.chain_der()))
        }
    };
    let a = assigned(event);

    let expected_hub = match policy {
        AllocationPolicy::Hashed => {
            let hubs = linked_hubs();
            let refs: Vec<_> = hubs.iter().collect();
            hashed(&RegistrationId::new(id).unwrap(), &refs).unwrap().name.to_string()
        }
        AllocationPolicy::GeoLatency => HUB_B.into(),
        AllocationPolicy::Static => HUB_C.to_owned(),
        _ => HUB_A.to_owned(),
    };
    let expected_device = match enrollment {
        Enrollment::Individual => "line-3-sensor",
        Enrollment::Group => id,
    };
    assert_eq!(a.assigned_hub, expected_hub);
    assert_eq!(a.device_id, expected_device);
    assert_eq!(a.substatus, Some(Substatus::InitialAssignment));

    let device = w.hubs.device(&expected_hub, expected_device).expect("identity created in the assigned hub");
    assert!(device.iot_edge, "IoT Edge capability carried to the hub");
    match attestation {
        Attestation::SymmetricKey => assert!(matches!(device.auth, DeviceAuth::SymmetricKey { .. })),
        Attestation::X509 => assert!(matches!(device.auth, DeviceAuth::SelfSigned { .. })),
    }
    if policy == AllocationPolicy::Custom {
        assert_eq!(a.payload, Some(json!({ "welcome": "a" })), "webhook payload returned to the device");
        assert_eq!(
            device.tags.get("site"),
            Some(&json!("a")),
            "webhook initial twin overrides the enrollment's"
        );
    } else {
        assert_eq!(device.tags.get("plan"), Some(&json!("pilot")));
        assert_eq!(device.desired.get("telemetryInterval"), Some(&json!(30)));
    }
    assert_eq!(w.hubs.hubs_of(expected_device).len(), 1, "the device exists in exactly one hub");
}

#[test]
fn individual_symmetric_key_device_lands_on_its_evenly_weighted_hub() {
    scenario(Enrollment::Individual, Attestation::SymmetricKey, AllocationPolicy::Hashed);
}

#[test]
fn individual_symmetric_key_device_lands_on_the_lowest_latency_hub() {
    scenario(Enrollment::Individual, Attestation::SymmetricKey, AllocationPolicy::GeoLatency);
}

#[test]
fn individual_symmetric_key_device_lands_on_its_static_hub() {
    scenario(Enrollment::Individual, Attestation::SymmetricKey, AllocationPolicy::Static);
}

#[test]
fn individual_symmetric_key_device_lands_where_the_custom_allocator_says() {
    scenario(Enrollment::Individual, Attestation::SymmetricKey, AllocationPolicy::Custom);
}

#[test]
fn group_enrollment_with_derived_key_assigns_to_the_weighted_hub() {
    scenario(Enrollment::Group, Attestation::SymmetricKey, AllocationPolicy::Hashed);
}

#[test]
fn group_enrollment_with_derived_key_assigns_to_the_lowest_latency_hub() {
    scenario(Enrollment::Group, Attestation::SymmetricKey, AllocationPolicy::GeoLatency);
}

#[test]
fn group_enrollment_with_derived_key_assigns_to_its_static_hub() {
    scenario(Enrollment::Group, Attestation::SymmetricKey, AllocationPolicy::Static);
}

#[test]
fn group_enrollment_with_derived_key_assigns_where_the_custom_allocator_says() {
    scenario(Enrollment::Group, Attestation::SymmetricKey, AllocationPolicy::Custom);
}

#[test]
fn individual_x509_device_lands_on_its_evenly_weighted_hub() {
    scenario(Enrollment::Individual, Attestation::X509, AllocationPolicy::Hashed);
}

#[test]
fn individual_x509_device_lands_on_the_lowest_latency_hub() {
    scenario(Enrollment::Individual, Attestation::X509, AllocationPolicy::GeoLatency);
}

#[test]
fn individual_x509_device_lands_on_its_static_hub() {
    scenario(Enrollment::Individual, Attestation::X509, AllocationPolicy::Static);
}

#[test]
fn individual_x509_device_lands_where_the_custom_allocator_says() {
    scenario(Enrollment::Individual, Attestation::X509, AllocationPolicy::Custom);
}

#[test]
fn x509_group_via_intermediate_ca_assigns_to_the_weighted_hub() {
    scenario(Enrollment::Group, Attestation::X509, AllocationPolicy::Hashed);
}

#[test]
fn x509_group_via_intermediate_ca_assigns_to_the_lowest_latency_hub() {
    scenario(Enrollment::Group, Attestation::X509, AllocationPolicy::GeoLatency);
}

#[test]
fn x509_group_via_intermediate_ca_assigns_to_its_static_hub() {
    scenario(Enrollment::Group, Attestation::X509, AllocationPolicy::Static);
}

#[test]
fn x509_group_via_intermediate_ca_assigns_where_the_custom_allocator_says() {
    scenario(Enrollment::Group, Attestation::X509, AllocationPolicy::Custom);
}

#[test]
fn x509_group_on_the_root_admits_devices_that_send_their_intermediate() {
    let mut w = world();
    let root = TestCa::root("Fabrikam Root");
    let line = root.intermediate("Fabrikam Line 1");
    enroll_x509_group(&w, "fabrikam", root.pem(), &EnrollOptions::default());
    let device = line.device("press-7");
    let a = assigned(w.register(x509_device("press-7", None), Some(device.chain_der())));
    assert_eq!(a.device_id, "press-7");
}

#[test]
fn first_poll_already_finds_the_assignment() {
    let mut w = world();
    let key = enroll_symmetric(&w, "quick-1", &EnrollOptions::default());
    assigned(w.register(symmetric_device("quick-1", &key, None), None));
    assert_eq!(w.requests, 2, "one register and one poll");
}

#[test]
fn group_devices_registering_with_a_lower_cased_id_are_admitted() {
    let mut w = world();
    let key = enroll_symmetric_group(&w, "mixed-case", &EnrollOptions::default());
    // The device derived its key from the lower-cased id but registers with upper case.
    let derived = zerotouch_engine::attestation::symmetric::derive_device_key(&crypto(), &key, "dev-abc");
    let a = assigned(w.register(symmetric_device("DEV-ABC", &derived, None), None));
    assert_eq!(a.device_id, "DEV-ABC");
}

#[test]
fn the_operator_hears_of_every_assignment_and_every_failed_registration() {
    use std::sync::{Arc, Mutex};
    use zerotouch_engine::provisioner::RegistrationOutcome;

    let heard = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&heard);
    let mut w = world_with(|p| {
        p.on_registration(move |outcome| {
            let line = match outcome {
                RegistrationOutcome::Assigned(record) => format!(
                    "assigned {} -> {} as {} ({:?})",
                    record.registration_id,
                    record.state.assigned_hub.as_deref().unwrap_or("?"),
                    record.state.device_id.as_deref().unwrap_or("?"),
                    record.state.substatus,
                ),
                RegistrationOutcome::Failed { registration_id, error_code, message } => {
                    format!("failed {registration_id} {error_code}: {message}")
                }
                other => format!("{other:?}"),
            };
            log.lock().unwrap().push(line);
        })
    });
    let o = EnrollOptions { policy: Some(AllocationPolicy::Custom), ..Default::default() };
    let key = enroll_symmetric_group(&w, "line-3", &o);
    assigned(w.register(group_device("sensor-a1", &key, Some(json!({ "site": "a" }))), None));
    // The custom allocator knows no site "z": the registration is accepted, then fails.
    failed(w.register(group_device("sensor-z1", &key, Some(json!({ "site": "z" }))), None));
    // A refused credential never becomes a registration: the endpoint logs that refusal.
    let wrong = zerotouch_engine::attestation::symmetric::derive_device_key(&crypto(), b"not the key", "x");
    let _ = w.register(symmetric_device("sensor-a2", &wrong, None), None);

    let heard = heard.lock().unwrap();
    assert_eq!(heard.len(), 2, "{heard:?}");
    assert_eq!(heard[0], format!("assigned sensor-a1 -> {HUB_A} as sensor-a1 (Some(InitialAssignment))"));
    assert!(heard[1].starts_with("failed sensor-z1 400"), "{heard:?}");
    assert!(heard[1].contains("no hub for site z"), "{heard:?}");
}

/// The body's payload travels as the device's JSON text and becomes a tree only after the
/// device is authenticated: the custom allocator still tells an absent payload from `null` from
/// a value (its members in the order sent), and what it answers reaches the device.
#[test]
fn the_custom_allocator_sees_the_payload_as_sent_absent_null_or_a_value() {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use zerotouch_engine::allocation::{Allocator, CustomAllocator};
    use zerotouch_engine::attestation::symmetric::registration_token;
    use zerotouch_engine::attestation::Credential;
    use zerotouch_engine::crypto::RingCrypto;
    use zerotouch_engine::memory::MemoryStore;
    use zerotouch_engine::provisioner::{
        OperationStatusRequest, Provisioner, ProvisionerConfig, RegisterRequest, ResponseBody,
    };
    use zerotouch_proto::device::DeviceRegistration;
    use zerotouch_proto::service::{CustomAllocationRequest, CustomAllocationResponse};
    use zerotouch_proto::IdScope;
    use zerotouch_testkit::hubs::SimHubs;
    use zerotouch_testkit::sim::Simulator;

    /// Records each payload it is given and hands it back to the device.
    #[derive(Default)]
    struct Echo(Mutex<Vec<Option<Value>>>);
    impl CustomAllocator for Echo {
        fn allocate(&self, request: &CustomAllocationRequest) -> Result<CustomAllocationResponse, String> {
            let payload = request.device_runtime_context.payload.clone();
            self.0.lock().unwrap().push(payload.clone());
            Ok(CustomAllocationResponse {
                iot_hub_host_name: HUB_B.to_owned(),
                initial_twin: None,
                payload: Some(json!({ "echo": payload })),
            })
        }
    }

    let echo = Arc::new(Echo::default());
    let allocator = Allocator::new(linked_hubs()).with_custom(Arc::clone(&echo) as Arc<dyn CustomAllocator>);
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        Arc::new(MemoryStore::new()),
        Arc::new(RingCrypto::new()),
        allocator,
    );
    let mut w = Simulator::new(provisioner, SimHubs::new());
    let value = r#"{"z":[1,{"y":null}],"a":"é","m":-0.5}"#;
    let members = ["".to_owned(), r#","payload":null"#.to_owned(), format!(r#","payload":{value}"#)];
    let o = EnrollOptions { policy: Some(AllocationPolicy::Custom), ..Default::default() };
    for (i, member) in members.iter().enumerate() {
        let id = format!("dev-{i}");
        let key = enroll_symmetric(&w, &id, &o);
        let credential = Credential::Sas(
            registration_token(&crypto(), &key, SCOPE, &id, w.now.unix_secs() + 60).to_string(),
        );
        let body: DeviceRegistration =
            serde_json::from_str(&format!(r#"{{"registrationId":"{id}"{member}}}"#)).unwrap();
        let req = RegisterRequest {
            id_scope: SCOPE.into(),
            registration_id: id.clone(),
            body,
            credential: credential.clone(),
            api_version: None,
        };
        let now = w.now;
        let reply = w.provisioner.handle_register(now, req, &mut w.hubs);
        let ResponseBody::Operation(op) = reply.body else { panic!("{reply:?}") };
        let poll = OperationStatusRequest {
            id_scope: SCOPE.into(),
            registration_id: id.clone(),
            operation_id: op.operation_id.to_string(),
            credential,
        };
        let reply = w.provisioner.handle_operation_status(w.now, poll);
        let ResponseBody::Operation(op) = reply.body else { panic!("{reply:?}") };
        let state = op.registration_state.unwrap();
        assert_eq!(state.assigned_hub.as_deref(), Some(HUB_B), "{id}");
        let given = echo.0.lock().unwrap()[i].clone();
        assert_eq!(state.payload, Some(json!({ "echo": given })), "{id}: returned to the device");
    }
    let given = echo.0.lock().unwrap();
    assert_eq!(given[..2], [None, Some(Value::Null)]);
    assert_eq!(serde_json::to_string(&given[2]).unwrap(), value, "members in the order sent");
}
