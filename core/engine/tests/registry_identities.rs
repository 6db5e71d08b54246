//! Device and module identities: generated keys, validation, generation ids and etags, status,
//! listing, statistics, connection state and heartbeats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_support;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use registry_support::*;
use zerotouch_engine::registry::{hub_error_code, ConnectionOperation, HeartbeatTracker, SessionId};
use zerotouch_proto::hub::{
    AuthenticationMechanism, AuthenticationType, ConnectionState, Device, DeviceCapabilities, DeviceStatus,
    HubErrorCode, Module, SymmetricKey, X509Thumbprint,
};
use zerotouch_proto::IfMatch;

fn keys(d: &Device) -> (String, String) {
    let k = &d.authentication.as_ref().unwrap().symmetric_key;
    (k.primary_key.clone().unwrap(), k.secondary_key.clone().unwrap())
}

fn sas(primary: Option<&str>, secondary: Option<&str>) -> AuthenticationMechanism {
    AuthenticationMechanism {
        symmetric_key: SymmetricKey {
            primary_key: primary.map(str::to_owned),
            secondary_key: secondary.map(str::to_owned),
        },
        x509_thumbprint: X509Thumbprint::default(),
        kind: AuthenticationType::Sas,
    }
}

#[test]
fn python_create_without_authentication_gets_two_generated_32_byte_keys() {
    let reg = registry();
    let d = reg.create_device(Device::new(id("py1")), now()).unwrap().value;
    let (p, s) = keys(&d);
    assert_eq!(p.len(), 44);
    assert_eq!(B64.decode(&p).unwrap().len(), 32);
    assert_eq!(B64.decode(&s).unwrap().len(), 32);
    assert_ne!(p, s);
    assert_eq!(d.authentication.unwrap().kind, AuthenticationType::Sas);
}

#[test]
fn node_create_with_empty_string_keys_gets_generated_keys() {
    let reg = registry();
    let body: Device = serde_json::from_str(
        r#"{"deviceId":"node1","status":"enabled","authentication":{"type":"sas","symmetricKey":{"primaryKey":"","secondaryKey":""}}}"#,
    )
    .unwrap();
    let d = reg.create_device(body, now()).unwrap().value;
    let (p, s) = keys(&d);
    assert_eq!(B64.decode(p).unwrap().len(), 32);
    assert_eq!(B64.decode(s).unwrap().len(), 32);
}

#[test]
fn given_keys_are_kept_and_must_decode_to_16_to_64_bytes() {
    let reg = registry();
    let k16 = B64.encode([1u8; 16]);
    let k64 = B64.encode([2u8; 64]);
    let mut body = Device::new(id("k1"));
    body.authentication = Some(sas(Some(&k16), Some(&k64)));
    let d = reg.create_device(body, now()).unwrap().value;
    assert_eq!(keys(&d), (k16.clone(), k64));

    for bad in [B64.encode([1u8; 15]), B64.encode([1u8; 65]), "not base64!".to_owned()] {
        let mut body = Device::new(id("k2"));
        body.authentication = Some(sas(Some(&bad), None));
        let err = reg.create_device(body, now()).unwrap_err();
        assert_eq!(hub_error_code(&err), HubErrorCode::ArgumentInvalid);
        assert_eq!(err.to_wire().http_status, 400);
        assert!(!err.to_string().contains(&bad), "the key is not echoed");
    }
}

#[test]
fn update_without_keys_keeps_the_stored_keys() {
    let reg = registry();
    let d = reg.create_device(Device::new(id("u1")), now()).unwrap().value;
    let mut body = Device::new(id("u1"));
    body.authentication = Some(sas(Some(""), None));
    let updated = reg.update_device(body, &IfMatch::Any, later(1)).unwrap();
    assert_eq!(keys(&updated), keys(&d));
    let updated = reg.update_device(Device::new(id("u1")), &IfMatch::Any, later(2)).unwrap();
    assert_eq!(keys(&updated), keys(&d));
}

#[test]
fn self_signed_device_needs_a_hex_thumbprint_and_has_null_keys() {
    let reg = registry();
    let mut body = Device::new(id("x1"));
    body.authentication = Some(AuthenticationMechanism {
        symmetric_key: SymmetricKey::default(),
        x509_thumbprint: X509Thumbprint {
            primary_thumbprint: Some("AB".repeat(20)),
            secondary_thumbprint: None,
        },
        kind: AuthenticationType::SelfSigned,
    });
    let d = reg.create_device(body.clone(), now()).unwrap().value;
    let auth = d.authentication.unwrap();
    assert_eq!(auth.symmetric_key, SymmetricKey::default());
    assert_eq!(auth.x509_thumbprint.primary_thumbprint, Some("AB".repeat(20)));

    body.device_id = id("x2");
    body.authentication.as_mut().unwrap().x509_thumbprint.primary_thumbprint = None;
    assert_eq!(
        hub_error_code(&reg.create_device(body.clone(), now()).unwrap_err()),
        HubErrorCode::ArgumentNull
    );
    body.authentication.as_mut().unwrap().x509_thumbprint.primary_thumbprint = Some("xyz".into());
    assert_eq!(hub_error_code(&reg.create_device(body, now()).unwrap_err()), HubErrorCode::ArgumentInvalid);
}

#[test]
fn certificate_authority_device_has_no_keys_or_thumbprints() {
    let reg = registry();
    let mut body = Device::new(id("ca1"));
    body.authentication = Some(AuthenticationMechanism {
        kind: AuthenticationType::CertificateAuthority,
        ..sas(Some("x"), None)
    });
    let d = reg.create_device(body, now()).unwrap().value;
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["authentication"]["type"], "certificateAuthority");
    assert!(json["authentication"]["symmetricKey"]["primaryKey"].is_null());
    assert!(json["authentication"]["x509Thumbprint"]["primaryThumbprint"].is_null());
}

#[test]
fn new_device_has_observed_generation_id_and_etag_shapes() {
    let reg = registry();
    let d = reg.create_device(Device::new(id("g1")), now()).unwrap().value;
    let gen = d.generation_id.clone().unwrap();
    assert_eq!(gen.len(), 18);
    // .NET ticks of 2026-11-23T10:00:00.1234567Z.
    assert_eq!(gen, (now().unix_nanos() / 100 + 621_355_968_000_000_000).to_string());
    let etag = d.etag.clone().unwrap();
    let decoded = String::from_utf8(B64.decode(etag.as_str()).unwrap()).unwrap();
    assert!(decoded.parse::<u64>().is_ok(), "etag is base64 of a decimal number, got {decoded:?}");

    let u = reg.update_device(d.clone(), &IfMatch::Any, later(1)).unwrap();
    let next: u64 =
        String::from_utf8(B64.decode(u.etag.unwrap().as_str()).unwrap()).unwrap().parse().unwrap();
    assert_eq!(next, decoded.parse::<u64>().unwrap() + 1);
    assert_eq!(u.generation_id, d.generation_id, "updates keep the generation id");

    reg.delete_device(&id("g1"), &IfMatch::Any, later(2)).unwrap();
    let again = reg.create_device(Device::new(id("g1")), later(3)).unwrap().value;
    assert_ne!(again.generation_id, d.generation_id, "a re-created id gets a new generation");
}

#[test]
fn new_device_json_has_every_identity_property() {
    let reg = registry();
    let d = reg.create_device(Device::new(id("j1")), now()).unwrap().value;
    let json = serde_json::to_value(&d).unwrap();
    let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "deviceId",
            "generationId",
            "etag",
            "connectionState",
            "status",
            "statusReason",
            "connectionStateUpdatedTime",
            "statusUpdatedTime",
            "lastActivityTime",
            "cloudToDeviceMessageCount",
            "authentication",
            "capabilities",
            "deviceScope",
            "parentScopes"
        ]
    );
    assert_eq!(json["connectionState"], "Disconnected");
    assert_eq!(json["status"], "enabled");
    assert_eq!(json["statusUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(json["capabilities"]["iotEdge"], false);
    assert_eq!(json["parentScopes"], serde_json::json!([]));
}

#[test]
fn disabling_a_device_stamps_status_updated_time() {
    let reg = registry();
    reg.create_device(Device::new(id("s1")), now()).unwrap();
    let d = reg
        .set_device_status(&id("s1"), DeviceStatus::Disabled, Some("retired".into()), &IfMatch::Any, later(5))
        .unwrap();
    assert_eq!(d.status, DeviceStatus::Disabled);
    assert_eq!(d.status_reason.as_deref(), Some("retired"));
    assert_eq!(d.status_updated_time, Some(later(5)));
    let d = reg.set_device_status(&id("s1"), DeviceStatus::Disabled, None, &IfMatch::Any, later(9)).unwrap();
    assert_eq!(d.status_updated_time, Some(later(5)), "unchanged status keeps its time");
    let stats = reg.statistics().unwrap();
    assert_eq!(
        (stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count),
        (1, 0, 1)
    );
}

#[test]
fn status_reason_longer_than_128_characters_is_rejected() {
    let reg = registry();
    let mut body = Device::new(id("r1"));
    body.status_reason = Some("x".repeat(129));
    assert_eq!(hub_error_code(&reg.create_device(body, now()).unwrap_err()), HubErrorCode::ArgumentInvalid);
}

#[test]
fn body_id_different_from_path_id_is_argument_invalid() {
    let reg = registry();
    let err = reg.put_device(&id("a"), Device::new(id("b")), &IfMatch::Absent, now()).unwrap_err();
    assert_eq!(hub_error_code(&err), HubErrorCode::ArgumentInvalid);
}

#[test]
fn edge_device_gets_an_immutable_scope_and_a_leaf_copies_it_to_parent_scopes() {
    let reg = registry();
    let mut edge = Device::new(id("edge1"));
    edge.capabilities = Some(DeviceCapabilities { iot_edge: true });
    let edge = reg.create_device(edge, now()).unwrap().value;
    let scope = edge.device_scope.clone().unwrap();
    assert_eq!(scope, format!("ms-azure-iot-edge://edge1-{}", edge.generation_id.clone().unwrap()));

    let mut attempt = edge.clone();
    attempt.device_scope = Some("ms-azure-iot-edge://other-1".into());
    let updated = reg.update_device(attempt, &IfMatch::Any, later(1)).unwrap();
    assert_eq!(updated.device_scope.as_deref(), Some(scope.as_str()));

    let mut leaf = Device::new(id("leaf1"));
    leaf.device_scope = Some(scope.clone());
    let leaf = reg.create_device(leaf, now()).unwrap().value;
    assert_eq!(leaf.parent_scopes, vec![scope]);
}

#[test]
fn listing_clamps_top_to_1000_and_pages_to_the_end() {
    let reg = registry();
    for i in 0..1005 {
        reg.create_device(Device::new(id(&format!("d{i:05}"))), now()).unwrap();
    }
    for top in [None, Some(0), Some(-3), Some(5000)] {
        assert_eq!(reg.devices(top, None).unwrap().items.len(), 1000, "top {top:?}");
    }
    let mut seen = Vec::new();
    let mut continuation = None;
    loop {
        let page = reg.devices(Some(300), continuation).unwrap();
        seen.extend(page.items.into_iter().map(|d| d.device_id.to_string()));
        continuation = page.continuation;
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 1005);
    seen.dedup();
    assert_eq!(seen.len(), 1005);
}

#[test]
fn a_device_takes_at_most_50_modules() {
    let reg = registry();
    reg.create_device(Device::new(id("many")), now()).unwrap();
    for i in 0..50 {
        reg.create_module(Module::new(id("many"), mid(&format!("m{i}"))), now()).unwrap();
    }
    let err = reg.create_module(Module::new(id("many"), mid("m50")), now()).unwrap_err();
    assert_eq!(err.to_wire().error_code, 413003);
    assert_eq!(reg.modules(&id("many")).unwrap().len(), 50);
}

#[test]
fn deleting_a_device_removes_its_modules() {
    let reg = registry();
    reg.create_device(Device::new(id("p1")), now()).unwrap();
    reg.create_module(Module::new(id("p1"), mid("m1")), now()).unwrap();
    let out = reg.delete_device(&id("p1"), &IfMatch::Any, later(1)).unwrap();
    assert_eq!(out.events.len(), 2);
    reg.create_device(Device::new(id("p1")), later(2)).unwrap();
    assert!(reg.modules(&id("p1")).unwrap().is_empty());
}

#[test]
fn connecting_sets_connection_state_and_counts_as_connected() {
    let reg = registry();
    let d = reg.create_device(Device::new(id("c1")), now()).unwrap().value;
    let s1 = SessionId::new(1);
    let ev = reg.handle_connected(&id("c1"), None, s1, later(3)).unwrap().unwrap();
    assert_eq!(ev.op_type, ConnectionOperation::DeviceConnected);
    let stored = reg.device(&id("c1")).unwrap();
    assert_eq!(stored.connection_state, ConnectionState::Connected);
    assert_eq!(stored.connection_state_updated_time, Some(later(3)));
    assert_eq!(stored.last_activity_time, Some(later(3)));
    assert_eq!(stored.etag, d.etag, "connection state does not change the identity etag");
    assert_eq!(reg.service_statistics().unwrap().connected_device_count, 1);
    assert!(reg.handle_connected(&id("c1"), None, s1, later(4)).unwrap().is_none());

    let ev2 = reg.handle_disconnected(&id("c1"), None, s1, later(5)).unwrap().unwrap();
    assert_eq!(ev2.op_type, ConnectionOperation::DeviceDisconnected);
    assert!(ev2.sequence_number > ev.sequence_number);
    assert_eq!(ev2.sequence_number.len(), 64);
    assert_eq!(reg.service_statistics().unwrap().connected_device_count, 0);
}

#[test]
fn a_replaced_session_that_closes_late_leaves_the_device_connected() {
    let reg = registry();
    reg.create_device(Device::new(id("c2")), now()).unwrap();
    reg.create_module(Module::new(id("c2"), mid("m1")), now()).unwrap();
    for module in [None, Some(mid("m1"))] {
        let m = module.as_ref();
        assert!(reg.handle_connected(&id("c2"), m, SessionId::new(1), later(1)).unwrap().is_some());
        // Session 2 of the same identity kicks session 1, whose close the transport reports after.
        assert!(reg.handle_connected(&id("c2"), m, SessionId::new(2), later(2)).unwrap().is_none());
        assert!(reg.handle_disconnected(&id("c2"), m, SessionId::new(1), later(2)).unwrap().is_none());
        let state = match m {
            None => reg.device(&id("c2")).unwrap().connection_state,
            Some(m) => reg.module(&id("c2"), m).unwrap().connection_state,
        };
        assert_eq!(state, ConnectionState::Connected, "{module:?}");

        let ev = reg.handle_disconnected(&id("c2"), m, SessionId::new(2), later(3)).unwrap().unwrap();
        assert_eq!(ev.op_type, ConnectionOperation::DeviceDisconnected);
    }
    assert_eq!(reg.service_statistics().unwrap().connected_device_count, 0);
}

#[test]
fn a_silent_device_is_reported_once_as_missed_heartbeat() {
    let mut hb = HeartbeatTracker::new(Duration::from_secs(3600));
    assert_eq!(hb.poll_timeout(), None);
    hb.record_activity(&id("a"), None, now());
    hb.record_activity(&id("b"), None, later(600));
    assert_eq!(hb.poll_timeout(), Some(later(3600)));
    assert!(hb.handle_timeout(later(3599)).is_empty());

    let missed = hb.handle_timeout(later(3600));
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0].device_id.as_str(), "a");
    assert_eq!(missed[0].last_seen, now());
    assert_eq!(missed[0].deadline, later(3600));
    assert!(hb.handle_timeout(later(3700)).is_empty(), "reported once per silence");

    hb.record_activity(&id("b"), None, later(4000));
    assert_eq!(hb.poll_timeout(), Some(later(7600)));
    hb.record_activity(&id("a"), None, later(4100));
    let missed = hb.handle_timeout(later(9000));
    let names: Vec<&str> = missed.iter().map(|m| m.device_id.as_str()).collect();
    assert_eq!(names, ["b", "a"]);
    hb.forget(&id("a"), None);
    assert_eq!(hb.last_seen(&id("a"), None), None);
    assert_eq!(hb.last_seen(&id("b"), None), Some(later(4000)));
}
