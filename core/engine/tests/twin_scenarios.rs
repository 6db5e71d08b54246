//! Scenario tests for device and module twins, named after what a back end or device does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Map, Value};
use zerotouch_engine::registry::hub_error_code;
use zerotouch_engine::store::{PageRequest, Precondition};
use zerotouch_engine::twin::{
    update_twin, MemoryTwinStore, SectionChange, TwinDocument, TwinEvent, TwinKey, TwinOperation, TwinStore,
};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::hub::HubErrorCode;
use zerotouch_proto::twin::{TwinChangeOperation, TwinPatch};
use zerotouch_proto::{DeviceId, IfMatch, ModuleId, Timestamp};

const T0: Timestamp = Timestamp::from_unix_secs(1_700_000_000);
const T1: Timestamp = Timestamp::from_unix_secs(1_700_000_060);
const T2: Timestamp = Timestamp::from_unix_secs(1_700_000_120);

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn patch(v: Value) -> TwinPatch {
    serde_json::from_value(v).unwrap()
}

fn key(d: &str) -> TwinKey {
    TwinKey::device(DeviceId::new(d).unwrap())
}

fn rest(doc: &TwinDocument) -> Value {
    serde_json::to_value(doc.to_twin(&DeviceId::new("devA").unwrap(), None)).unwrap()
}

#[test]
fn new_device_twin_looks_like_the_hubs() {
    let doc = TwinDocument::new(T0);
    let ts = T0.to_string();
    assert_eq!(
        rest(&doc),
        json!({
            "deviceId": "devA",
            "etag": "AAAAAAAAAAE=",
            "version": 2,
            "properties": {
                "desired": {"$metadata": {"$lastUpdated": ts}, "$version": 1},
                "reported": {"$metadata": {"$lastUpdated": ts}, "$version": 1}
            }
        })
    );
}

#[test]
fn device_reads_its_twin_over_mqtt_without_metadata_or_tags() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(
        T1,
        &patch(json!({"tags": {"site": "x"}, "properties": {"desired": {"fan": {"speed": 3}}}})),
        &IfMatch::Absent,
    )
    .unwrap();
    doc.patch_reported(T2, &obj(json!({"battery": 55})), &IfMatch::Absent).unwrap();
    let body = serde_json::to_string(&doc.device_view()).unwrap();
    assert_eq!(
        body,
        r#"{"desired":{"fan":{"speed":3},"$version":2},"reported":{"battery":55,"$version":2}}"#
    );
}

#[test]
fn back_end_sets_desired_property_and_device_receives_patch_with_version() {
    let store = MemoryTwinStore::new();
    let k = key("thermo-1");
    store.put_twin(&k, &TwinDocument::new(T0), &Precondition::MustNotExist).unwrap();
    let out = update_twin(
        &store,
        &k,
        T1,
        &TwinOperation::Patch(patch(json!({"properties": {"desired": {"telemetryDelay": 2}}}))),
        &IfMatch::Any,
    )
    .unwrap();
    let TwinEvent::DesiredPropertiesChanged(push) = &out.events[0] else {
        panic!("no desired push: {:?}", out.events)
    };
    assert_eq!(push.device_id.as_str(), "thermo-1");
    assert_eq!(push.module_id, None);
    assert_eq!(push.version, 2);
    assert_eq!(push.topic(), "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(serde_json::to_string(&push.patch).unwrap(), r#"{"telemetryDelay":2,"$version":2}"#);
    assert_eq!(store.twin(&k).unwrap().unwrap(), out.document);
}

#[test]
fn back_end_removes_desired_property_with_null_and_parent_metadata_is_refreshed() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(T1, &patch(json!({"properties": {"desired": {"cfg": {"a": 1, "b": 2}}}})), &IfMatch::Absent)
        .unwrap();
    let change = doc
        .patch(T2, &patch(json!({"properties": {"desired": {"cfg": {"a": null}}}})), &IfMatch::Absent)
        .unwrap();
    assert_eq!(doc.desired(), &obj(json!({"cfg": {"b": 2}})));
    assert_eq!(change.desired, Some(SectionChange { patch: obj(json!({"cfg": {"a": null}})), version: 3 }));
    let twin = rest(&doc);
    let meta = &twin["properties"]["desired"]["$metadata"];
    assert_eq!(meta["cfg"]["$lastUpdated"], T2.to_string());
    assert_eq!(meta["cfg"]["$lastUpdatedVersion"], 3);
    assert_eq!(meta["cfg"]["b"]["$lastUpdated"], T1.to_string());
    assert_eq!(meta["cfg"]["b"]["$lastUpdatedVersion"], 2);
    assert!(meta["cfg"].get("a").is_none());
    assert_eq!(meta["$lastUpdatedVersion"], 3);
}

#[test]
fn back_end_tags_a_device_without_touching_desired_version() {
    let mut doc = TwinDocument::new(T0);
    let before = doc.etag();
    let change =
        doc.patch(T1, &patch(json!({"tags": {"location": {"region": "US"}}})), &IfMatch::Absent).unwrap();
    assert!(change.desired.is_none());
    assert_eq!(doc.desired_version(), 1);
    assert_eq!(doc.version(), 3);
    assert_ne!(doc.etag(), before);
    assert_eq!(doc.etag().as_str(), "AAAAAAAAAAI=");
    assert_eq!(rest(&doc)["tags"], json!({"location": {"region": "US"}}));
    let mut k = key("devA");
    k.module_id = None;
    assert!(change.events(&k, &doc).iter().all(|e| matches!(e, TwinEvent::TwinChanged(_))));
}

#[test]
fn device_reports_battery_and_twin_version_advances_but_etag_stays() {
    let mut doc = TwinDocument::new(T0);
    let etag = doc.etag();
    let change =
        doc.patch_reported(T1, &obj(json!({"battery": 55, "fw": {"v": "1.0"}})), &IfMatch::Absent).unwrap();
    assert_eq!(doc.reported_version(), 2);
    assert_eq!(change.reported.as_ref().map(|r| r.version), Some(2));
    assert_eq!(doc.version(), 3);
    assert_eq!(doc.etag(), etag);
    // A back end holding the etag read before the device reported still updates the twin.
    doc.patch(T2, &patch(json!({"tags": {"a": 1}})), &IfMatch::Tag(etag.bare().to_owned())).unwrap();
    let meta = &rest(&doc)["properties"]["reported"]["$metadata"];
    assert_eq!(meta["fw"]["v"]["$lastUpdated"], T1.to_string());
    assert!(meta["fw"].get("$lastUpdatedVersion").is_none());
}

#[test]
fn back_end_with_stale_etag_gets_precondition_failed_and_nothing_changes() {
    let mut doc = TwinDocument::new(T0);
    let stale = doc.etag();
    doc.patch(T1, &patch(json!({"tags": {"a": 1}})), &IfMatch::Absent).unwrap();
    let before = doc.clone();
    let err = doc
        .patch(
            T2,
            &patch(json!({"properties": {"desired": {"x": 1}}})),
            &IfMatch::from_header(Some(&format!("\"{}\"", stale.bare()))),
        )
        .unwrap_err();
    assert_eq!(hub_error_code(&err), HubErrorCode::PreconditionFailed);
    assert_eq!((err.to_wire().http_status, err.to_wire().error_code), (412, 412_001));
    assert_eq!(doc, before);
    let err = doc.replace(T2, &TwinPatch::default(), &IfMatch::Tag("nope".into())).unwrap_err();
    assert_eq!(hub_error_code(&err), HubErrorCode::PreconditionFailed);
}

#[test]
fn python_sdk_wildcard_if_match_updates_twin() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(T1, &patch(json!({"tags": {"a": 1}})), &IfMatch::from_header(Some("\"*\""))).unwrap();
    assert_eq!(doc.tags(), &obj(json!({"a": 1})));
}

#[test]
fn back_end_replaces_twin_and_device_receives_whole_desired_document() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(
        T1,
        &patch(json!({"tags": {"old": 1}, "properties": {"desired": {"old": 1, "keep": {"x": 1}}}})),
        &IfMatch::Absent,
    )
    .unwrap();
    doc.patch_reported(T1, &obj(json!({"battery": 10})), &IfMatch::Absent).unwrap();
    let k = TwinKey::module(DeviceId::new("edge-1").unwrap(), ModuleId::new("$edgeAgent").unwrap());
    let change = doc
        .replace(
            T2,
            &patch(json!({"properties": {"desired": {"keep": {"y": 2}, "gone": null}}})),
            &IfMatch::Any,
        )
        .unwrap();
    assert_eq!(doc.tags(), &Map::new());
    assert_eq!(doc.desired(), &obj(json!({"keep": {"y": 2}})));
    assert_eq!(doc.reported(), &obj(json!({"battery": 10})));
    assert_eq!(doc.desired_version(), 3);
    let events = change.events(&k, &doc);
    let TwinEvent::DesiredPropertiesChanged(push) = &events[0] else { panic!() };
    assert_eq!(push.module_id.as_ref().map(ModuleId::as_str), Some("$edgeAgent"));
    assert_eq!(serde_json::to_value(&push.patch).unwrap(), json!({"keep": {"y": 2}, "$version": 3}));
    let TwinEvent::TwinChanged(note) = &events[1] else { panic!() };
    assert_eq!(note.operation, TwinChangeOperation::ReplaceTwin);
    assert_eq!(note.body["deviceId"], "edge-1");
    assert_eq!(note.body["moduleId"], "$edgeAgent");
    assert_eq!(note.body["version"], doc.version());
    assert_eq!(note.body["properties"]["reported"]["battery"], 10);
    let desired_meta = &note.body["properties"]["desired"]["$metadata"];
    assert_eq!(desired_meta["keep"]["y"]["$lastUpdatedVersion"], 3);
}

#[test]
fn twin_change_notification_for_desired_update_carries_only_what_changed() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(T1, &patch(json!({"properties": {"desired": {"a": 1, "b": 2}}})), &IfMatch::Absent).unwrap();
    let change = doc
        .patch(
            T2,
            &patch(json!({"tags": {"t": "x"}, "properties": {"desired": {"a": 5, "b": null}}})),
            &IfMatch::Absent,
        )
        .unwrap();
    let note = change.notification(&key("devA"), &doc);
    assert_eq!(note.operation, TwinChangeOperation::UpdateTwin);
    assert_eq!(note.operation_timestamp, T2);
    let ts = T2.to_string();
    assert_eq!(
        note.body,
        json!({
            "version": 4,
            "tags": {"t": "x"},
            "properties": {"desired": {
                "a": 5,
                "b": null,
                "$metadata": {"$lastUpdated": ts, "$lastUpdatedVersion": 3,
                              "a": {"$lastUpdated": ts, "$lastUpdatedVersion": 3}},
                "$version": 3
            }}
        })
    );
    let props = note.application_properties("myhub");
    assert!(props.contains(&("opType", "updateTwin".to_owned())));
    assert!(props.contains(&("iothub-message-schema", "twinChangeNotification".to_owned())));
    assert!(props.contains(&("operationTimestamp", ts)));
    assert!(!props.iter().any(|(k, _)| *k == "moduleId"));
}

#[test]
fn device_reported_patch_fires_twin_change_notification_without_desired_push() {
    let store = MemoryTwinStore::new();
    let k = key("devA");
    store.put_twin(&k, &TwinDocument::new(T0), &Precondition::MustNotExist).unwrap();
    let out =
        update_twin(&store, &k, T1, &TwinOperation::Reported(obj(json!({"temp": 21.5}))), &IfMatch::Absent)
            .unwrap();
    assert_eq!(out.events.len(), 1);
    let TwinEvent::TwinChanged(note) = &out.events[0] else { panic!() };
    assert_eq!(note.body["properties"]["reported"]["$version"], 2);
    assert_eq!(note.body["properties"]["reported"]["temp"], 21.5);
    assert!(note.body["properties"].get("desired").is_none());
}

#[test]
fn device_reported_patch_with_version_key_is_rejected() {
    let mut doc = TwinDocument::new(T0);
    let before = doc.clone();
    let err = doc.patch_reported(T1, &obj(json!({"a": 1, "$version": 4})), &IfMatch::Absent).unwrap_err();
    assert!(matches!(&err, Error::Hub { message, .. } if message.contains("$version")), "{err}");
    assert_eq!((err.to_wire().http_status, err.to_wire().error_code), (400, 400_004), "observed: 400004");
    assert_eq!(doc, before);
}

#[test]
fn property_names_with_dot_space_dollar_or_control_characters_are_rejected() {
    let mut doc = TwinDocument::new(T0);
    for bad in ["a.b", "a b", "a$b", "a\u{1}"] {
        let mut m = Map::new();
        m.insert(bad.to_owned(), json!(1));
        let p = TwinPatch { tags: Some(m), ..TwinPatch::default() };
        let err = doc.patch(T1, &p, &IfMatch::Absent).unwrap_err();
        assert_eq!(hub_error_code(&err), HubErrorCode::ArgumentInvalid, "{bad:?}");
    }
    assert_eq!(doc.version(), 2);
}

#[test]
fn too_deep_desired_properties_are_rejected_and_twin_is_unchanged() {
    let mut doc = TwinDocument::new(T0);
    let mut deep = json!("leaf");
    for i in 0..11 {
        deep = json!({ format!("l{i}"): deep });
    }
    let before = doc.clone();
    let err = doc
        .patch(T1, &patch(json!({"tags": {"ok": 1}, "properties": {"desired": deep}})), &IfMatch::Absent)
        .unwrap_err();
    assert!(err.to_string().contains("10 levels"), "{err}");
    assert_eq!(doc, before);
}

#[test]
fn desired_properties_over_32_kb_are_rejected_but_arrays_are_fine() {
    let mut doc = TwinDocument::new(T0);
    let chunk = "x".repeat(4000);
    let mut big = Map::new();
    for i in 0..8 {
        big.insert(format!("k{i}"), json!(chunk));
    }
    let p = TwinPatch {
        properties: Some(serde_json::from_value(json!({"desired": big})).unwrap()),
        ..TwinPatch::default()
    };
    doc.patch(T1, &p, &IfMatch::Absent).unwrap();
    let err = doc
        .patch(T2, &patch(json!({"properties": {"desired": {"k8": chunk}}})), &IfMatch::Absent)
        .unwrap_err();
    assert!(err.to_string().contains("over the limit of 32768"), "{err}");
    assert_eq!(doc.desired().len(), 8);
    doc.patch(T2, &patch(json!({"properties": {"desired": {"k0": [1, 2, {"a": true}]}}})), &IfMatch::Absent)
        .unwrap();
    assert_eq!(doc.desired()["k0"], json!([1, 2, {"a": true}]));
}

#[test]
fn tags_over_8_kb_are_rejected() {
    let mut doc = TwinDocument::new(T0);
    let p = patch(json!({"tags": {"a": "y".repeat(4000), "b": "y".repeat(4000), "c": "y".repeat(200)}}));
    let err = doc.patch(T1, &p, &IfMatch::Absent).unwrap_err();
    assert!(matches!(&err, Error::Hub { message, .. } if message.contains("tags")), "{err}");
    assert_eq!(err.to_wire().error_code, 400_004);
}

#[test]
fn provisioned_device_starts_with_initial_tags_and_desired_properties() {
    let doc =
        TwinDocument::with_initial(T0, &obj(json!({"fleet": "a"})), &obj(json!({"mode": "eco"}))).unwrap();
    assert_eq!(doc.version(), 2);
    assert_eq!(doc.desired_version(), 1);
    assert_eq!(doc.etag().as_str(), "AAAAAAAAAAE=");
    let twin = rest(&doc);
    assert_eq!(twin["tags"], json!({"fleet": "a"}));
    assert_eq!(twin["properties"]["desired"]["$metadata"]["mode"]["$lastUpdatedVersion"], 1);
    assert!(TwinDocument::with_initial(T0, &obj(json!({"a.b": 1})), &Map::new()).is_err());
}

#[test]
fn updating_the_twin_of_an_unknown_device_is_not_found() {
    let store = MemoryTwinStore::new();
    let err =
        update_twin(&store, &key("ghost"), T0, &TwinOperation::Patch(TwinPatch::default()), &IfMatch::Any)
            .unwrap_err();
    assert!(matches!(&err, Error::Hub { message, .. } if message.contains("ghost")), "{err}");
    assert_eq!(hub_error_code(&err), HubErrorCode::DeviceNotFound);
    assert_eq!((err.to_wire().http_status, err.to_wire().error_code), (404, 404_001));
}

#[test]
fn concurrent_writer_with_stale_revision_cannot_overwrite_a_reported_patch() {
    let store = MemoryTwinStore::new();
    let k = key("devA");
    store.put_twin(&k, &TwinDocument::new(T0), &Precondition::MustNotExist).unwrap();
    let mut stale = store.twin(&k).unwrap().unwrap();
    let read_revision = stale.revision();
    update_twin(&store, &k, T1, &TwinOperation::Reported(obj(json!({"a": 1}))), &IfMatch::Absent).unwrap();
    stale.patch_reported(T1, &obj(json!({"b": 1})), &IfMatch::Absent).unwrap();
    let err =
        store.put_twin(&k, &stale, &Precondition::Matches(read_revision.bare().to_owned())).unwrap_err();
    assert_eq!(err, StoreError::PreconditionFailed);
    assert_eq!(store.twin(&k).unwrap().unwrap().reported(), &obj(json!({"a": 1})));
    assert_eq!(
        store.put_twin(&k, &TwinDocument::new(T0), &Precondition::MustNotExist).unwrap_err(),
        StoreError::AlreadyExists
    );
}

#[test]
fn listing_twins_pages_through_devices_and_modules_in_order() {
    let store = MemoryTwinStore::new();
    let mut expected = Vec::new();
    for d in ["d1", "d2", "d3"] {
        let dk = key(d);
        store.put_twin(&dk, &TwinDocument::new(T0), &Precondition::None).unwrap();
        expected.push(dk.clone());
        for m in ["m1", "m2"] {
            let mk = TwinKey::module(dk.device_id.clone(), ModuleId::new(m).unwrap());
            store.put_twin(&mk, &TwinDocument::new(T0), &Precondition::None).unwrap();
            expected.push(mk);
        }
    }
    let mut seen = Vec::new();
    let mut req = PageRequest { continuation: None, max_items: 4 };
    loop {
        let page = store.twins(&req).unwrap();
        assert!(page.items.len() <= 4);
        seen.extend(page.items.into_iter().map(|t| t.key));
        match page.continuation {
            Some(c) => req.continuation = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    let of_d2: Vec<_> =
        store.device_twins(&DeviceId::new("d2").unwrap()).unwrap().into_iter().map(|t| t.key).collect();
    assert_eq!(of_d2, expected[3..6].to_vec());
    let bad = PageRequest { continuation: Some("bad token\u{0}".into()), max_items: 4 };
    assert!(store.twins(&bad).is_err());
}

#[test]
fn deleting_a_device_twin_removes_it_once() {
    let store = MemoryTwinStore::new();
    let k = key("devA");
    store.put_twin(&k, &TwinDocument::new(T0), &Precondition::None).unwrap();
    assert_eq!(
        store.delete_twin(&k, &Precondition::Matches("999".into())).unwrap_err(),
        StoreError::PreconditionFailed
    );
    store.delete_twin(&k, &Precondition::MustExist).unwrap();
    assert_eq!(store.twin(&k).unwrap(), None);
    assert_eq!(store.delete_twin(&k, &Precondition::None).unwrap_err(), StoreError::NotFound);
}

#[test]
fn twin_document_survives_a_store_round_trip_through_json() {
    let mut doc = TwinDocument::new(T0);
    doc.patch(
        T1,
        &patch(json!({"tags": {"t": [1]}, "properties": {"desired": {"a": {"b": 1}}}})),
        &IfMatch::Absent,
    )
    .unwrap();
    doc.patch_reported(T2, &obj(json!({"r": "x"})), &IfMatch::Absent).unwrap();
    let saved = serde_json::to_string(&doc).unwrap();
    let loaded: TwinDocument = serde_json::from_str(&saved).unwrap();
    assert_eq!(loaded, doc);
    assert_eq!(rest(&loaded), rest(&doc));
}

#[test]
fn dps_enrollment_initial_twin_becomes_the_new_devices_twin() {
    let initial: zerotouch_proto::service::InitialTwin =
        serde_json::from_value(json!({"tags": {"plant": "b"}, "properties": {"desired": {"interval": 30}}}))
            .unwrap();
    let doc = TwinDocument::from_initial_twin(T0, &initial).unwrap();
    assert_eq!(doc.tags(), &obj(json!({"plant": "b"})));
    assert_eq!(doc.desired(), &obj(json!({"interval": 30})));
    let bad: zerotouch_proto::service::InitialTwin = serde_json::from_value(json!({"tags": [1]})).unwrap();
    let err = TwinDocument::from_initial_twin(T0, &bad).unwrap_err();
    assert_eq!(hub_error_code(&err), HubErrorCode::ArgumentInvalid);
}

#[test]
fn device_sends_reported_patch_bytes_over_mqtt() {
    let body = br#"{"firmware":{"state":"downloading","progress":10}}"#;
    let mut doc = TwinDocument::new(T0);
    let change = doc
        .patch_reported(T1, &zerotouch_proto::twin::parse_patch_body(body).unwrap(), &IfMatch::Absent)
        .unwrap();
    assert_eq!(change.reported.map(|r| r.version), Some(2));
    assert_eq!(doc.reported()["firmware"]["progress"], 10);
}
