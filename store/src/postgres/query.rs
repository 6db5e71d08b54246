//! The query language over PostgreSQL: a [`QuerySource`] that pushes simple `WHERE` conjuncts
//! down to SQL and builds the very documents [`zerotouch_engine::hub_engine::EmbeddedHub`] visits.
//!
//! Push-down only narrows to a superset of the matching documents: `execute` re-checks every
//! visited document with the engine's evaluator, so what cannot be translated exactly is left
//! to it. The same clauses as the SQLite backend's are translated (equality and `IN` with string
//! constants), with these PostgreSQL forms:
//! - `deviceId`, `moduleId`, `jobId`, `status`: indexed columns;
//! - tags: containment in the `tags_ci` jsonb column (GIN-indexed), which holds the tags with
//!   lower-cased property names, because names compare case-insensitively in the query language;
//! - desired and reported properties: the JSON-encoded constant must appear verbatim in the
//!   stored twin (`strpos`), a cheap server-side prefilter.

use std::ops::ControlFlow;

use postgres::types::ToSql;
use serde_json::{Map, Value};
use zerotouch_engine::hub_engine::{device_twin_value, module_twin_value};
use zerotouch_engine::query::{Collection, Expr, Path, QuerySource};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinDocument;
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::hub::{Device, Module};
use zerotouch_proto::jobs::DeviceJob;

use super::{backend, limit_of, PgStore};
use crate::codec::{decode_token, encode_token, from_doc};
use crate::pushdown::{string_test, verbatim_property_path};

/// The `tags_ci` value of a twin's tags: property names lower-cased at every level. Some tags
/// cannot be indexed: when two names differ only in case the lower-cased object could not hold
/// both, and jsonb cannot hold U+0000 (PostgreSQL refuses `\u0000` in jsonb, SQLSTATE 22P05),
/// which the engine accepts in tag values. Such a row is marked instead, and every tag test
/// lets it through (see [`UNINDEXED`]).
pub(super) fn tags_index(tags: &Map<String, Value>) -> Value {
    fn fold(map: &Map<String, Value>) -> Option<Value> {
        let mut out = Map::new();
        for (k, v) in map {
            let v = match v {
                Value::Object(inner) => fold(inner)?,
                other if holds_nul(other) => return None,
                other => other.clone(),
            };
            if k.contains('\0') || out.insert(k.to_lowercase(), v).is_some() {
                return None;
            }
        }
        Some(Value::Object(out))
    }
    fold(tags).unwrap_or_else(|| serde_json::json!({ UNINDEXED: true }))
}

/// Whether a JSON value holds U+0000 in a string (or a name) anywhere.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Marker member of a `tags_ci` that does not hold the row's tags: their names collide when
/// lower-cased, or they hold U+0000 ([`tags_index`]). `$` cannot start a tag name, so no real
/// tags look like it. (Named for its first use; databases hold this spelling.)
const UNINDEXED: &str = "$collision";

/// How one collection is laid out in SQL.
struct Layout {
    /// `SELECT` of the key columns (as many as the token has parts) and the documents.
    select: &'static str,
    /// Rows strictly after the token; `$1`.. bind its parts. Stated for both sides of a join,
    /// because the planner does not carry a range through the join's equality: without it each
    /// batch would scan the twins from the first one.
    after: &'static str,
    order: &'static str,
    /// The rows of one hub: `{hub}` stands for the placeholder of its name. Stated for both
    /// sides of a join, for the same reason as `after`.
    hub: &'static str,
    key_parts: usize,
    /// Single-name properties that are a column: (query name, column).
    columns: &'static [(&'static str, &'static str)],
    /// Column with the lower-cased tags, if the collection has tags.
    tags: Option<&'static str>,
    /// Column holding the JSON text whose string values a document shows verbatim.
    text: &'static str,
    /// Whether every string value of the document is verbatim in `text` (job records), or only
    /// tags and properties (twins).
    whole_document: bool,
}

const DEVICES: Layout = Layout {
    select: "SELECT d.device_id, d.doc, t.doc FROM devices d \
             JOIN twins t ON t.hub = d.hub AND t.device_id = d.device_id AND t.module_id = ''",
    after: "d.device_id > $1 AND t.device_id > $1",
    order: "ORDER BY d.device_id",
    hub: "d.hub = {hub} AND t.hub = {hub}",
    key_parts: 1,
    columns: &[("deviceId", "d.device_id"), ("status", "d.status")],
    tags: Some("t.tags_ci"),
    text: "t.doc",
    whole_document: false,
};

const MODULES: Layout = Layout {
    select: "SELECT m.device_id, m.module_id, m.doc, t.doc FROM modules m \
             JOIN twins t ON t.hub = m.hub AND t.device_id = m.device_id AND t.module_id = m.module_id",
    after: "(m.device_id, m.module_id) > ($1, $2) AND (t.device_id, t.module_id) > ($1, $2)",
    order: "ORDER BY m.device_id, m.module_id",
    hub: "m.hub = {hub} AND t.hub = {hub}",
    key_parts: 2,
    columns: &[("deviceId", "m.device_id"), ("moduleId", "m.module_id")],
    tags: Some("t.tags_ci"),
    text: "t.doc",
    whole_document: false,
};

const JOBS: Layout = Layout {
    select: "SELECT j.job_id, j.device_id, j.doc FROM device_jobs j",
    after: "(j.job_id, j.device_id) > ($1, $2)",
    order: "ORDER BY j.job_id, j.device_id",
    hub: "j.hub = {hub}",
    key_parts: 2,
    columns: &[("deviceId", "j.device_id"), ("jobId", "j.job_id")],
    tags: None,
    text: "j.doc",
    whole_document: true,
};

fn layout(collection: Collection) -> &'static Layout {
    match collection {
        Collection::Devices => &DEVICES,
        Collection::Modules => &MODULES,
        Collection::Jobs => &JOBS,
    }
}

/// SQL conditions (with their text arguments) implied by the conjuncts of a filter.
struct Pushdown {
    sql: String,
    args: Vec<String>,
    first_arg: usize,
}

impl Pushdown {
    fn of(filter: Option<&Expr>, layout: &Layout, first_arg: usize) -> Self {
        let mut out = Pushdown { sql: String::new(), args: Vec::new(), first_arg };
        for conjunct in filter.map(Expr::conjuncts).unwrap_or_default() {
            if let Some((path, values)) = string_test(conjunct) {
                out.push(layout, path, &values);
            }
        }
        out
    }

    fn placeholder(&mut self, value: String) -> String {
        self.args.push(value);
        format!("${}", self.first_arg + self.args.len() - 1)
    }

    fn push(&mut self, layout: &Layout, path: &Path, values: &[&str]) {
        // PostgreSQL's text and jsonb cannot hold U+0000: a test whose constant, or a name of
        // whose path (`tags.[[a<U+0000>b]]`, which the jsonb containment below would spell),
        // holds it is left to the evaluator. (The JSON-quoted constants of the `strpos` tests
        // below spell it `\u0000`, as the stored documents do, so those still narrow.)
        let segments = &path.segments;
        let holds_nul = values.iter().any(|v| v.contains('\0')) || segments.iter().any(|s| s.contains('\0'));
        if let [name] = segments.as_slice() {
            if let Some((_, column)) = layout.columns.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                if holds_nul {
                    return;
                }
                let marks: Vec<String> = values.iter().map(|v| self.placeholder((*v).to_owned())).collect();
                self.sql.push_str(&format!(" AND {column} IN ({})", marks.join(", ")));
                return;
            }
        }
        let is_tag = segments.len() >= 2 && segments[0].eq_ignore_ascii_case("tags");
        if let (Some(tags), true) = (layout.tags, is_tag) {
            if holds_nul {
                return;
            }
            let mut tests = Vec::new();
            for v in values {
                // {"a": {"b": "v"}} for tags.A.b = 'v', names lower-cased like the column.
                let mut contained = Value::String((*v).to_owned());
                for name in segments[1..].iter().rev() {
                    let mut m = Map::new();
                    m.insert(name.to_lowercase(), contained);
                    contained = Value::Object(m);
                }
                let mark = self.placeholder(contained.to_string());
                tests.push(format!("{tags} @> {mark}::text::jsonb"));
            }
            let unindexed = self.placeholder(serde_json::json!({ UNINDEXED: true }).to_string());
            tests.push(format!("{tags} @> {unindexed}::text::jsonb"));
            self.sql.push_str(&format!(" AND ({})", tests.join(" OR ")));
            return;
        }
        if !(layout.whole_document || verbatim_property_path(path)) {
            return;
        }
        let mut tests = Vec::new();
        for v in values {
            let Ok(quoted) = serde_json::to_string(v) else { return };
            let mark = self.placeholder(quoted);
            tests.push(format!("strpos({}, {mark}) > 0", layout.text));
        }
        self.sql.push_str(&format!(" AND ({})", tests.join(" OR ")));
    }
}

fn document(collection: Collection, row: &postgres::Row) -> Result<Value, Error> {
    let text = |i: usize| row.try_get::<_, &str>(i).map_err(backend);
    match collection {
        Collection::Devices => {
            device_twin_value(&from_doc::<Device>(text(1)?)?, &from_doc::<TwinDocument>(text(2)?)?)
        }
        Collection::Modules => {
            module_twin_value(&from_doc::<Module>(text(2)?)?, &from_doc::<TwinDocument>(text(3)?)?)
        }
        Collection::Jobs => serde_json::to_value(from_doc::<DeviceJob>(text(2)?)?)
            .map_err(|e| Error::BadRequest(e.to_string())),
    }
}

impl QuerySource for PgStore {
    fn scan(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        let layout = layout(collection);
        let after = match &page.continuation {
            None => vec![String::new(); layout.key_parts],
            Some(token) => decode_token(token, layout.key_parts)
                .map_err(|_| zerotouch_engine::query::bad_continuation("invalid continuation token"))?,
        };
        let (max, limit) = limit_of(page);
        // $1.. the token's parts, then the limit, the hub, and the push-down's arguments.
        let hub_mark = format!("${}", layout.key_parts + 2);
        let pushdown = Pushdown::of(filter, layout, layout.key_parts + 3);
        let sql = format!(
            "{} WHERE {} AND {}{} {} LIMIT ${}",
            layout.select,
            layout.hub.replace("{hub}", &hub_mark),
            layout.after,
            pushdown.sql,
            layout.order,
            layout.key_parts + 1
        );
        let hub: &str = self.hub_name();
        let mut args: Vec<&(dyn ToSql + Sync)> = after.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        args.push(&limit);
        args.push(&hub);
        args.extend(pushdown.args.iter().map(|a| a as &(dyn ToSql + Sync)));
        let rows = self.conn()?.query(&sql, &args).map_err(backend)?;
        let batch = &rows[..rows.len().min(max)];
        for row in batch {
            if visit(&document(collection, row)?).is_break() {
                break;
            }
        }
        if rows.len() <= max {
            return Ok(None);
        }
        let Some(last) = batch.last() else { return Ok(None) };
        let parts = (0..layout.key_parts)
            .map(|i| last.try_get::<_, &str>(i).map_err(backend))
            .collect::<Result<Vec<&str>, StoreError>>()?;
        Ok(Some(encode_token(&parts)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn tag_index_lower_cases_names_at_every_level_and_keeps_values() {
        let tags = map(json!({ "Site": "Oslo", "Location": { "Floor": "B2", "n": 3 } }));
        assert_eq!(tags_index(&tags), json!({ "site": "Oslo", "location": { "floor": "B2", "n": 3 } }));
    }

    #[test]
    fn tags_whose_names_collide_in_lower_case_are_marked_so_no_tag_test_drops_them() {
        let tags = map(json!({ "site": "a", "SITE": "b" }));
        assert_eq!(tags_index(&tags), json!({ UNINDEXED: true }));
    }

    #[test]
    fn tags_holding_a_nul_character_anywhere_are_marked_since_jsonb_cannot_hold_it() {
        for tags in [
            json!({ "site": "a\u{0}b", "n": 1 }),
            json!({ "site": { "room": "\u{0}" } }),
            json!({ "codes": ["x", { "y": "\u{0}" }] }),
            json!({ "codes": [{ "\u{0}": 1 }] }),
        ] {
            assert_eq!(tags_index(&map(tags.clone())), json!({ UNINDEXED: true }), "{tags}");
        }
        let kept = json!({ "site": "a\\u0000b" });
        assert_eq!(tags_index(&map(kept.clone())), kept, "a backslash is no U+0000");
    }

    #[test]
    fn a_constant_holding_a_nul_character_is_left_to_the_evaluator_but_a_property_test_stays() {
        let pushed = |condition: &str| {
            let query = zerotouch_engine::query::parse(&format!("SELECT * FROM devices WHERE {condition}"))
                .unwrap_or_else(|e| panic!("{e}"));
            Pushdown::of(query.filter.as_ref(), &DEVICES, 3)
        };
        for condition in [r"tags.a = 'x\u0000'", r"tags.a IN ['x', 'y\u0000']", r"deviceId = 'd\u0000'"] {
            let p = pushed(condition);
            assert_eq!((p.sql.as_str(), p.args.len()), ("", 0), "{condition}");
        }
        let p = pushed(r"properties.desired.a = 'x\u0000' AND tags.a = 'y'");
        assert_eq!(p.args[0], r#""x\u0000""#);
        assert!(p.sql.contains("strpos(t.doc, $3)") && p.sql.contains("t.tags_ci @> $4"), "{}", p.sql);
    }

    #[test]
    fn a_tag_equality_becomes_a_containment_test_with_lower_cased_names() {
        let query = zerotouch_engine::query::parse("SELECT * FROM devices WHERE tags.Location.Site = 'Oslo'")
            .unwrap_or_else(|e| panic!("{e}"));
        let p = Pushdown::of(query.filter.as_ref(), &DEVICES, 3);
        assert!(p.sql.contains("t.tags_ci @> $3::text::jsonb"), "{}", p.sql);
        assert_eq!(p.args[0], r#"{"location":{"site":"Oslo"}}"#);
    }
}
