//! Property tests of the twin laws: merge semantics, deletion by `null`, monotonic versions and
//! metadata that mirrors the document exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Map, Value};
use zerotouch_engine::twin::limits::{merged_size, section_size};
use zerotouch_engine::twin::{TwinDocument, TwinOperation};
use zerotouch_proto::twin::{TwinCollection, TwinPatch, TwinPatchProperties};
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};

/// Few distinct keys, so patches hit existing properties often.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "dd", "é"]).prop_map(str::to_owned)
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from),
        prop::collection::vec(-5i64..5, 0..3).prop_map(Value::from),
    ]
}

/// An object tree (no nulls), at most `depth` levels deep.
fn document(depth: u32) -> impl Strategy<Value = Map<String, Value>> {
    let value = leaf().prop_recursive(depth, 24, 4, |inner| {
        prop::collection::btree_map(key(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map(key(), value, 0..5).prop_map(|m| m.into_iter().collect())
}

/// A merge patch: like a document, but any value may be `null`.
fn patch(depth: u32) -> impl Strategy<Value = Map<String, Value>> {
    let value = prop_oneof![1 => Just(Value::Null), 3 => leaf()].prop_recursive(depth, 24, 4, |inner| {
        prop::collection::btree_map(key(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map(key(), value, 0..5).prop_map(|m| m.into_iter().collect())
}

/// RFC 7396 JSON merge patch, written independently of the engine.
fn merge_patch(target: &Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => {
            let mut t = match target {
                Value::Object(t) => t.clone(),
                _ => Map::new(),
            };
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    let merged = merge_patch(t.get(k).unwrap_or(&Value::Null), v);
                    t.insert(k.clone(), merged);
                }
            }
            Value::Object(t)
        }
        other => other.clone(),
    }
}

fn desired_patch(desired: Map<String, Value>) -> TwinPatch {
    TwinPatch {
        properties: Some(TwinPatchProperties {
            desired: Some(TwinCollection { properties: desired, ..TwinCollection::default() }),
            reported: None,
        }),
        ..TwinPatch::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Tags(Map<String, Value>),
    Desired(Map<String, Value>),
    Replace(Map<String, Value>, Map<String, Value>),
    Reported(Map<String, Value>),
    /// A patch the engine must refuse (a key with a dot).
    Invalid(Map<String, Value>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => patch(3).prop_map(Op::Tags),
        3 => patch(3).prop_map(Op::Desired),
        1 => (document(2), document(3)).prop_map(|(t, d)| Op::Replace(t, d)),
        3 => patch(3).prop_map(Op::Reported),
        1 => patch(2).prop_map(|mut p| {
            p.insert("bad.key".to_owned(), Value::from(1));
            Op::Invalid(p)
        }),
    ]
}

fn to_op(op: &Op) -> TwinOperation {
    match op {
        Op::Tags(t) => TwinOperation::Patch(TwinPatch { tags: Some(t.clone()), ..TwinPatch::default() }),
        Op::Desired(d) => TwinOperation::Patch(desired_patch(d.clone())),
        Op::Replace(t, d) => {
            TwinOperation::Replace(TwinPatch { tags: Some(t.clone()), ..desired_patch(d.clone()) })
        }
        Op::Reported(r) => TwinOperation::Reported(r.clone()),
        Op::Invalid(p) => TwinOperation::Reported(p.clone()),
    }
}

fn etag_counter(doc: &TwinDocument) -> u64 {
    let bytes = base64::engine::general_purpose::STANDARD.decode(doc.etag().as_str()).unwrap();
    u64::from_be_bytes(bytes.try_into().unwrap())
}

fn at(step: usize) -> Timestamp {
    Timestamp::from_unix_secs(1_700_000_000 + i64::try_from(step).unwrap())
}

/// Checks that `meta` has a stamp and exactly one child per property of `props`, recursively,
/// and that desired stamps carry a `$lastUpdatedVersion` no newer than the section.
fn assert_metadata_mirrors(props: &Value, meta: &Value, desired_version: Option<u64>, path: &str) {
    let meta = meta.as_object().unwrap_or_else(|| panic!("metadata of {path} is not an object"));
    assert!(meta.get("$lastUpdated").and_then(Value::as_str).is_some(), "no $lastUpdated at {path}");
    if let Some(section_version) = desired_version {
        if let Some(v) = meta.get("$lastUpdatedVersion") {
            assert!(v.as_u64().unwrap() <= section_version, "$lastUpdatedVersion too new at {path}");
        }
    } else {
        assert!(meta.get("$lastUpdatedVersion").is_none(), "reported metadata has a version at {path}");
    }
    let meta_keys: Vec<&String> = meta.keys().filter(|k| !k.starts_with('$')).collect();
    match props {
        Value::Object(p) => {
            let mut prop_keys: Vec<&String> = p.keys().collect();
            let mut sorted_meta = meta_keys.clone();
            prop_keys.sort();
            sorted_meta.sort();
            assert_eq!(prop_keys, sorted_meta, "metadata keys differ from properties at {path}");
            for (k, v) in p {
                assert_metadata_mirrors(v, &meta[k], desired_version, &format!("{path}.{k}"));
            }
        }
        _ => assert!(meta_keys.is_empty(), "leaf {path} has child metadata"),
    }
}

proptest! {
    #[test]
    fn applying_a_desired_patch_then_reading_gives_the_merge(base in document(3), p in patch(3)) {
        let t0 = at(0);
        let mut doc = TwinDocument::new(t0);
        doc.patch(t0, &desired_patch(base.clone()), &IfMatch::Absent).unwrap();
        doc.patch(at(1), &desired_patch(p.clone()), &IfMatch::Absent).unwrap();
        let expected = merge_patch(&Value::Object(base), &Value::Object(p));
        prop_assert_eq!(Value::Object(doc.desired().clone()), expected);
    }

    #[test]
    fn applying_tags_and_reported_patches_then_reading_gives_the_merge(
        base in document(3), tags in patch(3), reported in patch(3),
    ) {
        let mut doc = TwinDocument::with_initial(at(0), &base, &Map::new()).unwrap();
        doc.patch(at(1), &TwinPatch { tags: Some(tags.clone()), ..TwinPatch::default() }, &IfMatch::Any).unwrap();
        doc.patch_reported(at(1), &base, &IfMatch::Absent).unwrap();
        doc.patch_reported(at(2), &reported, &IfMatch::Absent).unwrap();
        let base = Value::Object(base);
        prop_assert_eq!(Value::Object(doc.tags().clone()), merge_patch(&base, &Value::Object(tags)));
        prop_assert_eq!(Value::Object(doc.reported().clone()), merge_patch(&base, &Value::Object(reported)));
    }

    #[test]
    fn size_limit_is_checked_on_the_merged_section(base in document(3), p in patch(3)) {
        let merged = merge_patch(&Value::Object(base.clone()), &Value::Object(p.clone()));
        prop_assert_eq!(merged_size(&base, &p), section_size(merged.as_object().unwrap()));
    }

    #[test]
    fn null_removes_the_property(base in document(3), k in key()) {
        let mut doc = TwinDocument::new(at(0));
        doc.patch(at(0), &desired_patch(base), &IfMatch::Absent).unwrap();
        let mut p = Map::new();
        p.insert(k.clone(), Value::Null);
        doc.patch(at(1), &desired_patch(p.clone()), &IfMatch::Absent).unwrap();
        doc.patch_reported(at(1), &p, &IfMatch::Absent).unwrap();
        prop_assert!(!doc.desired().contains_key(&k));
        prop_assert!(!doc.reported().contains_key(&k));
        let twin = serde_json::to_value(doc.to_twin(&DeviceId::new("d").unwrap(), None)).unwrap();
        prop_assert!(twin["properties"]["desired"]["$metadata"].get(&k).is_none());
    }

    #[test]
    fn versions_only_increase_and_metadata_mirrors_the_document(ops in prop::collection::vec(op(), 1..12)) {
        let mut doc = TwinDocument::new(at(0));
        for (i, op) in ops.iter().enumerate() {
            let before = doc.clone();
            let result = doc.apply(at(i + 1), &to_op(op), &IfMatch::Absent);
            match (op, result) {
                (Op::Invalid(_), Ok(_)) => prop_assert!(false, "invalid patch accepted"),
                (Op::Invalid(_), Err(_)) => prop_assert_eq!(&doc, &before),
                (_, Err(e)) => prop_assert!(false, "valid op refused: {}", e),
                (op, Ok(change)) => {
                    prop_assert!(doc.version() > before.version());
                    prop_assert_eq!(change.version, doc.version());
                    prop_assert!(doc.desired_version() >= before.desired_version());
                    prop_assert!(doc.reported_version() >= before.reported_version());
                    prop_assert!(etag_counter(&doc) >= etag_counter(&before));
                    match op {
                        Op::Desired(_) | Op::Replace(..) => {
                            prop_assert!(doc.desired_version() > before.desired_version());
                            prop_assert!(etag_counter(&doc) > etag_counter(&before));
                            prop_assert_eq!(change.desired.map(|d| d.version), Some(doc.desired_version()));
                        }
                        Op::Tags(_) => {
                            prop_assert_eq!(doc.desired_version(), before.desired_version());
                            prop_assert!(etag_counter(&doc) > etag_counter(&before));
                        }
                        _ => {
                            prop_assert!(doc.reported_version() > before.reported_version());
                            prop_assert_eq!(doc.etag(), before.etag());
                        }
                    }
                }
            }
            let twin = serde_json::to_value(doc.to_twin(&DeviceId::new("d").unwrap(), None)).unwrap();
            for (section, version) in [("desired", Some(doc.desired_version())), ("reported", None)] {
                let mut props = twin["properties"][section].as_object().unwrap().clone();
                let meta = props.remove("$metadata").unwrap();
                let v = props.remove("$version").unwrap();
                prop_assert_eq!(v.as_u64(), Some(if section == "desired" { doc.desired_version() } else { doc.reported_version() }));
                assert_metadata_mirrors(&Value::Object(props), &meta, version, section);
            }
            let stored: TwinDocument = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
            prop_assert_eq!(&stored, &doc);
        }
    }
}
