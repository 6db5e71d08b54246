//! Twin limits and validation: key rules, nesting depth, value types and section sizes (spec §5.5).

use serde_json::{Map, Value};
use zerotouch_proto::hub::HubErrorCode;

use crate::error::Error;
use crate::registry::hub_error;

/// Longest property name, in UTF-8 bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Deepest nesting of objects in tags, desired or reported; a top-level property is level 1.
pub const MAX_DEPTH: usize = 10;
/// Longest string value, in UTF-8 bytes.
pub const MAX_STRING_BYTES: usize = 4096;
/// Largest integer a twin stores (2^52 − 1).
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;
/// Smallest integer a twin stores (−2^52).
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;
/// Largest size of the tags, as [`section_size`] counts it.
pub const MAX_TAGS_SIZE: usize = 8 * 1024;
/// Largest size of the desired properties.
pub const MAX_DESIRED_SIZE: usize = 32 * 1024;
/// Largest size of the reported properties.
pub const MAX_REPORTED_SIZE: usize = 32 * 1024;

/// A part of a twin that has its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// `tags`.
    Tags,
    /// `properties.desired`.
    Desired,
    /// `properties.reported`.
    Reported,
}

impl SectionKind {
    /// The section's name as the twin JSON writes it.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Tags => "tags",
            SectionKind::Desired => "properties.desired",
            SectionKind::Reported => "properties.reported",
        }
    }

    /// The largest size the section may reach.
    pub fn max_size(self) -> usize {
        match self {
            SectionKind::Tags => MAX_TAGS_SIZE,
            SectionKind::Desired => MAX_DESIRED_SIZE,
            SectionKind::Reported => MAX_REPORTED_SIZE,
        }
    }
}

/// Why a property name is refused, or `None` when it is allowed.
///
/// Names are case-sensitive UTF-8 of 1 to [`MAX_KEY_BYTES`] bytes without `.`, `$`, space or
/// control characters; `$` also keeps clients from writing the reserved `$metadata` and
/// `$version`.
pub fn key_problem(key: &str) -> Option<String> {
    // Nearly every name is printable ASCII without `.` or `$`: one pass over the bytes settles
    // it; anything else (non-ASCII included) takes the rules below.
    if !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key.bytes().all(|b| b.is_ascii_graphic() && b != b'.' && b != b'$')
    {
        return None;
    }
    if key.is_empty() {
        return Some("is empty".to_owned());
    }
    if key.len() > MAX_KEY_BYTES {
        return Some(format!("is {} bytes long (at most {MAX_KEY_BYTES})", key.len()));
    }
    if key.starts_with('$') {
        return Some("starts with `$`, which is reserved for `$metadata` and `$version`".to_owned());
    }
    key.chars().find_map(|c| match c {
        '.' => Some("contains `.`".to_owned()),
        '$' => Some("contains `$`".to_owned()),
        ' ' => Some("contains a space".to_owned()),
        c if c.is_control() => Some(format!("contains the control character U+{:04X}", u32::from(c))),
        _ => None,
    })
}

/// Checks every name, nesting level and value of a patch or new section before it is applied.
/// `null` is accepted anywhere (it deletes in a patch and is dropped in a replacement).
///
/// # Errors
/// `ArgumentInvalid` (400004) naming the section, the property path and the broken rule.
pub fn validate_patch(kind: SectionKind, patch: &Map<String, Value>) -> Result<(), Error> {
    check_object(kind, patch, 1, None).map(|_| ())
}

/// [`validate_patch`] that also returns the most merging the patch can add to a section's size
/// (see [`check_growth`]), measured in the same walk.
pub(crate) fn validate_growth(kind: SectionKind, patch: &Map<String, Value>) -> Result<usize, Error> {
    check_object(kind, patch, 1, None)
}

/// The names leading to a property, linked through the stack so that validating a valid patch
/// allocates nothing; only an error message spells the path out.
struct Trail<'a> {
    key: &'a str,
    parent: Option<&'a Trail<'a>>,
}

impl Trail<'_> {
    fn dotted(&self) -> String {
        let mut names = Vec::new();
        let mut at = Some(self);
        while let Some(t) = at {
            names.push(t.key);
            at = t.parent;
        }
        names.reverse();
        names.join(".")
    }
}

/// Checks a patch object; returns [`growth_bound`] of it.
fn check_object(
    kind: SectionKind,
    object: &Map<String, Value>,
    depth: usize,
    parent: Option<&Trail<'_>>,
) -> Result<usize, Error> {
    let mut growth = 0;
    for (key, value) in object {
        let here = Trail { key, parent };
        if let Some(problem) = key_problem(key) {
            return Err(refuse(kind, &here, &format!("the property name {problem}")));
        }
        if depth > MAX_DEPTH {
            return Err(refuse(kind, &here, &format!("objects may nest at most {MAX_DEPTH} levels deep")));
        }
        match value {
            Value::Null => {}
            Value::Object(child) => growth += key.len() + check_object(kind, child, depth + 1, Some(&here))?,
            leaf => {
                check_value(kind, leaf, depth, &here)?;
                growth += key.len() + value_size(leaf);
            }
        }
    }
    Ok(growth)
}

fn check_value(kind: SectionKind, value: &Value, depth: usize, here: &Trail<'_>) -> Result<(), Error> {
    match value {
        Value::Null | Value::Bool(_) => Ok(()),
        Value::Number(n) => {
            let in_range = match n.as_i64() {
                Some(i) => (MIN_INTEGER..=MAX_INTEGER).contains(&i),
                None => n.is_f64(),
            };
            if in_range {
                Ok(())
            } else {
                Err(refuse(kind, here, &format!("the integer {n} is outside {MIN_INTEGER}..={MAX_INTEGER}")))
            }
        }
        Value::String(s) => {
            if s.len() > MAX_STRING_BYTES {
                Err(refuse(
                    kind,
                    here,
                    &format!("the string is {} bytes long (at most {MAX_STRING_BYTES})", s.len()),
                ))
            } else {
                Ok(())
            }
        }
        Value::Array(items) => items.iter().try_for_each(|item| check_value(kind, item, depth, here)),
        Value::Object(child) => check_object(kind, child, depth + 1, Some(here)).map(|_| ()),
    }
}

fn refuse(kind: SectionKind, here: &Trail<'_>, rule: &str) -> Error {
    hub_error(
        HubErrorCode::ArgumentInvalid,
        format!("invalid twin {} property `{}`: {rule}", kind.name(), here.dotted()),
    )
}

/// The size of a section as the hub counts it against its limit: the sum over properties of
/// the name's length and the value's size, where a string counts its UTF-8 bytes except control
/// characters, a number 8, a boolean 4, an object the sum of its properties and an array the
/// sum of its items. `null` (only possible inside arrays once stored) counts 4, like a boolean.
pub fn section_size(section: &Map<String, Value>) -> usize {
    section.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 4,
        Value::Number(_) => 8,
        // ASCII control characters are the same set as `char::is_control` below 0x80.
        Value::String(s) if s.is_ascii() => s.bytes().filter(|b| !b.is_ascii_control()).count(),
        Value::String(s) => s.chars().filter(|c| !c.is_control()).map(char::len_utf8).sum(),
        Value::Array(items) => items.iter().map(value_size).sum(),
        Value::Object(o) => section_size(o),
    }
}

/// The size [`section_size`] would give for `section` after merging `patch` into it, computed
/// without building the merged section: the current size plus what each patched property adds
/// or removes (only the patch is looked up; the section is walked once, without lookups).
pub fn merged_size(section: &Map<String, Value>, patch: &Map<String, Value>) -> usize {
    let size = isize::try_from(section_size(section)).unwrap_or(isize::MAX);
    usize::try_from(size.saturating_add(size_delta(section, patch))).unwrap_or(0)
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// How much merging `patch` into `section` changes its size.
fn size_delta(section: &Map<String, Value>, patch: &Map<String, Value>) -> isize {
    let empty = Map::new();
    patch
        .iter()
        .map(|(k, p)| {
            let current = section.get(k);
            let old = || current.map_or(0, |v| signed(k.len() + value_size(v)));
            match (p, current) {
                // Merging into an object changes only what the nested patch changes.
                (Value::Object(child_patch), Some(Value::Object(child))) => size_delta(child, child_patch),
                (Value::Object(child_patch), _) => signed(k.len()) + size_delta(&empty, child_patch) - old(),
                (Value::Null, _) => -old(),
                (leaf, _) => signed(k.len() + value_size(leaf)) - old(),
            }
        })
        .sum()
}

/// The most merging `patch` can add to a section's size, whatever the section holds: every
/// property it writes counted as new, nothing it replaces or deletes subtracted.
fn growth_bound(patch: &Map<String, Value>) -> usize {
    patch
        .iter()
        .map(|(k, p)| match p {
            Value::Null => 0,
            Value::Object(child_patch) => k.len() + growth_bound(child_patch),
            leaf => k.len() + value_size(leaf),
        })
        .sum()
}

/// Checks that merging `patch` into `section` keeps it within its limit.
///
/// # Errors
/// `ArgumentInvalid` (400004) when the merged section would exceed its limit.
pub fn check_merged_size(
    kind: SectionKind,
    section: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), Error> {
    check_growth(kind, section, patch, growth_bound(patch))
}

/// [`check_merged_size`] given `growth`, the patch's [`growth_bound`] (from
/// [`validate_growth`]).
///
/// # Errors
/// `ArgumentInvalid` (400004) when the merged section would exceed its limit.
pub(crate) fn check_growth(
    kind: SectionKind,
    section: &Map<String, Value>,
    patch: &Map<String, Value>,
    growth: usize,
) -> Result<(), Error> {
    // Most patches stay under the limit even if all they write were added: only near the limit
    // is the exact size worked out, which looks every patched property up in the section.
    if section_size(section).saturating_add(growth) <= kind.max_size() {
        return Ok(());
    }
    refuse_size(kind, merged_size(section, patch))
}

/// Checks a section's size after a change.
///
/// # Errors
/// `ArgumentInvalid` (400004) when the section exceeds its limit.
pub fn check_size(kind: SectionKind, section: &Map<String, Value>) -> Result<(), Error> {
    refuse_size(kind, section_size(section))
}

fn refuse_size(kind: SectionKind, size: usize) -> Result<(), Error> {
    if size > kind.max_size() {
        Err(hub_error(
            HubErrorCode::ArgumentInvalid,
            format!(
                "twin {} would be {size} bytes, over the limit of {} bytes",
                kind.name(),
                kind.max_size()
            ),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn key_rules() {
        assert!(key_problem("temperature_set-point:1").is_none());
        assert!(key_problem("température").is_none());
        for bad in ["", "a.b", "$version", "a$", "a b", "a\u{7}", "a\u{85}"] {
            assert!(key_problem(bad).is_some(), "{bad:?} should be refused");
        }
        assert!(key_problem(&"k".repeat(MAX_KEY_BYTES)).is_none());
        assert!(key_problem(&"k".repeat(MAX_KEY_BYTES + 1)).is_some());
    }

    #[test]
    fn depth_counts_object_levels() {
        let mut ten = json!(1);
        for i in (0..10).rev() {
            ten = json!({ format!("l{i}"): ten });
        }
        assert!(validate_patch(SectionKind::Desired, &obj(ten.clone())).is_ok());
        let eleven = obj(json!({ "top": ten }));
        let err = validate_patch(SectionKind::Desired, &eleven).unwrap_err();
        assert!(err.to_string().contains("top.l0.l1"), "{err}");
    }

    #[test]
    fn values_are_checked_inside_arrays() {
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": [1, "x", {"b": true}, null]}))).is_ok());
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": [{"b.c": 1}]}))).is_err());
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": MAX_INTEGER}))).is_ok());
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": MAX_INTEGER + 1}))).is_err());
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": u64::MAX}))).is_err());
        assert!(validate_patch(SectionKind::Tags, &obj(json!({"a": 1.5e300}))).is_ok());
        assert!(
            validate_patch(SectionKind::Tags, &obj(json!({"a": "s".repeat(MAX_STRING_BYTES + 1)}))).is_err()
        );
    }

    #[test]
    fn size_counts_keys_and_values() {
        let m = obj(json!({"ab": "cd\u{1}", "n": 1, "b": true, "o": {"x": [1, 2]}}));
        assert_eq!(section_size(&m), (2 + 2) + (1 + 8) + (1 + 4) + (1 + 1 + 16));
    }

    #[test]
    fn merged_size_matches_the_size_of_the_merge() {
        let base = obj(json!({"a": {"x": 1, "y": "yy"}, "b": true, "c": [1]}));
        let patch = obj(json!({"a": {"x": null, "z": {"q": 1}}, "b": {"n": 2}, "c": null, "d": "dd"}));
        let merged = obj(json!({"a": {"y": "yy", "z": {"q": 1}}, "b": {"n": 2}, "d": "dd"}));
        assert_eq!(merged_size(&base, &patch), section_size(&merged));
    }

    #[test]
    fn a_patch_to_a_nearly_full_section_is_measured_exactly() {
        let full = obj(json!({"a": "x".repeat(4000), "b": "x".repeat(4000)}));
        assert_eq!(section_size(&full), 8002);
        // Rewriting a big value with one as big, or deleting to make room, still fits...
        assert!(check_merged_size(SectionKind::Tags, &full, &obj(json!({"a": "y".repeat(4000)}))).is_ok());
        let swap = obj(json!({"a": null, "c": "z".repeat(200)}));
        assert!(check_merged_size(SectionKind::Tags, &full, &swap).is_ok());
        // ...adding to it does not.
        let err =
            check_merged_size(SectionKind::Tags, &full, &obj(json!({"c": "z".repeat(200)}))).unwrap_err();
        assert!(err.to_string().contains("8203 bytes"), "{err}");
    }

    #[test]
    fn validation_measures_the_growth_bound_of_the_patch() {
        for patch in [
            json!({"a": {"x": null, "z": {"q": 1}}, "b": {"n": 2}, "c": null, "d": "dd\u{1}"}),
            json!({"arr": [1, null, {"k": null}], "s": "température", "t": true}),
            json!({}),
        ] {
            let patch = obj(patch);
            assert_eq!(validate_growth(SectionKind::Desired, &patch).unwrap(), growth_bound(&patch));
        }
    }
}
