//! The query language over SQLite: a [`QuerySource`] that pushes simple `WHERE` conjuncts down
//! to SQL and builds the very documents [`zerotouch_engine::hub_engine::EmbeddedHub`] visits.
//!
//! Push-down only ever narrows to a superset of the matching documents: `execute` re-checks
//! every visited document with the engine's evaluator, so a clause that cannot be translated
//! exactly is simply not pushed down. Translated are equality and `IN` with string constants on
//! `deviceId`, `moduleId`, `jobId` and `status` (columns); `tags.… = 'v'` walks the `twin_tags`
//! index (string leaves under lower-cased paths, since property names compare
//! case-insensitively); other tag and desired or reported property tests become a substring
//! test for the JSON-encoded constant on the stored twin, where a match must show it verbatim.

use std::ops::ControlFlow;

use rusqlite::ToSql;
use serde_json::Value;
use zerotouch_engine::hub_engine::{device_twin_value, module_twin_value};
use zerotouch_engine::query::{Collection, Expr, Path, QuerySource};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinDocument;
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::hub::{Device, Module};
use zerotouch_proto::jobs::DeviceJob;

use super::{limit_plus_one, Db, SqliteStore};
use crate::codec::{self, decode_token, encode_token, from_doc};
use crate::pushdown::{string_test, verbatim_twin_path};

/// How one collection is laid out in SQL.
struct Layout {
    /// `SELECT` of the key columns (as many as the token has parts) and the documents, up to
    /// `WHERE`; `?1`.. bind the token parts, then comes the row limit.
    select: &'static str,
    /// Key comparison with the token: rows strictly after it.
    after: &'static str,
    /// The hub column of the driving table (of `select`, then of `by_tag`).
    hub: [&'static str; 2],
    order: &'static str,
    key_parts: usize,
    /// Single-name properties that are a column: (query name, column).
    columns: &'static [(&'static str, &'static str)],
    /// Column holding the JSON text whose string values a document shows verbatim.
    text: &'static str,
    /// Whether every string value of the document is verbatim in `text` (job records), or only
    /// tags and properties (twins).
    whole_document: bool,
    /// The same query driven by the `twin_tags` index, for twins: `FROM` up to `WHERE`, the
    /// conditions on `g` (the path is `?P`, the value `?V`), the key comparison and the order.
    by_tag: Option<[&'static str; 4]>,
}

const DEVICES: Layout = Layout {
    select: "SELECT d.id, d.doc, t.doc FROM devices d
         JOIN twins t ON t.hub = d.hub AND t.device_id = d.id AND t.module_id = ''",
    after: "d.id > ?1",
    hub: ["d.hub", "g.hub"],
    order: "ORDER BY d.id",
    key_parts: 1,
    columns: &[("deviceId", "d.id"), ("status", "d.status")],
    text: "t.doc",
    whole_document: false,
    by_tag: Some([
        "SELECT d.id, d.doc, t.doc FROM twin_tags g
         CROSS JOIN twins t ON t.hub = g.hub AND t.device_id = g.device_id AND t.module_id = g.module_id
         CROSS JOIN devices d ON d.hub = g.hub AND d.id = g.device_id",
        "g.path = ?P AND g.value = ?V AND g.module_id = ''",
        "g.device_id > ?1",
        "ORDER BY g.device_id",
    ]),
};

const MODULES: Layout = Layout {
    select: "SELECT m.device_id, m.module_id, m.doc, t.doc FROM modules m
             JOIN twins t ON t.hub = m.hub AND t.device_id = m.device_id AND t.module_id = m.module_id",
    after: "(m.device_id, m.module_id) > (?1, ?2)",
    hub: ["m.hub", "g.hub"],
    order: "ORDER BY m.device_id, m.module_id",
    key_parts: 2,
    columns: &[("deviceId", "m.device_id"), ("moduleId", "m.module_id")],
    text: "t.doc",
    whole_document: false,
    by_tag: Some([
        "SELECT m.device_id, m.module_id, m.doc, t.doc FROM twin_tags g
         CROSS JOIN twins t ON t.hub = g.hub AND t.device_id = g.device_id AND t.module_id = g.module_id
         CROSS JOIN modules m ON m.hub = g.hub AND m.device_id = g.device_id AND m.module_id = g.module_id",
        "g.path = ?P AND g.value = ?V AND g.module_id <> ''",
        "(g.device_id, g.module_id) > (?1, ?2)",
        "ORDER BY g.device_id, g.module_id",
    ]),
};

const JOBS: Layout = Layout {
    select: "SELECT j.job_id, j.device_id, j.doc FROM device_jobs j",
    after: "(j.job_id, j.device_id) > (?1, ?2)",
    hub: ["j.hub", "j.hub"],
    order: "ORDER BY j.job_id, j.device_id",
    key_parts: 2,
    columns: &[("deviceId", "j.device_id"), ("jobId", "j.job_id")],
    text: "j.doc",
    whole_document: true,
    by_tag: None,
};

fn layout(collection: Collection) -> &'static Layout {
    match collection {
        Collection::Devices => &DEVICES,
        Collection::Modules => &MODULES,
        Collection::Jobs => &JOBS,
    }
}

/// SQL conditions (with their string arguments) implied by the conjuncts of `filter`.
struct Pushdown {
    sql: String,
    args: Vec<String>,
    /// `tags.… = 'value'` answered by the `twin_tags` index: (path row, value).
    by_tag: Option<(String, String)>,
}

impl Pushdown {
    fn of(filter: Option<&Expr>, layout: &Layout, first_arg: usize) -> Self {
        let mut out = Pushdown { sql: String::new(), args: Vec::new(), by_tag: None };
        for conjunct in filter.map(Expr::conjuncts).unwrap_or_default() {
            let Some((path, values)) = string_test(conjunct) else { continue };
            // One value only: a twin may hold the path in two spellings with two values, and
            // an index walk over several values would then visit it twice.
            if let (None, Some(_), [value]) = (&out.by_tag, layout.by_tag, values.as_slice()) {
                if let Some(tag) = codec::tag_path(&path.segments) {
                    out.by_tag = Some((tag, (*value).to_owned()));
                    continue;
                }
            }
            out.push(layout, path, &values, first_arg);
        }
        out
    }

    fn placeholder(&mut self, value: String, first_arg: usize) -> String {
        self.args.push(value);
        format!("?{}", first_arg + self.args.len() - 1)
    }

    fn push(&mut self, layout: &Layout, path: &Path, values: &[&str], first_arg: usize) {
        if let [name] = path.segments.as_slice() {
            if let Some((_, column)) = layout.columns.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                let marks: Vec<String> =
                    values.iter().map(|v| self.placeholder((*v).to_owned(), first_arg)).collect();
                self.sql.push_str(&format!(" AND {column} IN ({})", marks.join(", ")));
                return;
            }
        }
        if !(layout.whole_document || verbatim_twin_path(path)) {
            return;
        }
        let mut tests = Vec::new();
        for v in values {
            let Ok(quoted) = serde_json::to_string(v) else { return };
            let mark = self.placeholder(quoted, first_arg);
            tests.push(format!("instr({}, {mark}) > 0", layout.text));
        }
        self.sql.push_str(&format!(" AND ({})", tests.join(" OR ")));
    }
}

/// One batch of raw rows: key parts and document texts.
type Rows = Vec<Vec<String>>;

impl SqliteStore {
    fn scan_rows(
        &self,
        layout: &Layout,
        filter: Option<&Expr>,
        after: &[String],
        max: usize,
    ) -> Result<Rows, StoreError> {
        let limit = limit_plus_one(max);
        let first_arg = layout.key_parts + 2;
        let pushdown = Pushdown::of(filter, layout, first_arg);
        let limit_arg = layout.key_parts + 1;
        // The hub is bound last, after the tag path and value when there are some.
        let path_arg = first_arg + pushdown.args.len();
        let sql = match (&pushdown.by_tag, layout.by_tag) {
            (Some(_), Some([select, on_tag, after, order])) => {
                let on_tag = on_tag
                    .replace("?P", &format!("?{path_arg}"))
                    .replace("?V", &format!("?{}", path_arg + 1));
                let hub = format!("{} = ?{}", layout.hub[1], path_arg + 2);
                format!(
                    "{select} WHERE {hub} AND {on_tag} AND {after}{} {order} LIMIT ?{limit_arg}",
                    pushdown.sql
                )
            }
            _ => format!(
                "{} WHERE {} = ?{path_arg} AND {}{} {} LIMIT ?{limit_arg}",
                layout.select, layout.hub[0], layout.after, pushdown.sql, layout.order
            ),
        };
        let mut args: Vec<&dyn ToSql> = after.iter().map(|a| a as &dyn ToSql).collect();
        args.push(&limit);
        args.extend(pushdown.args.iter().map(|a| a as &dyn ToSql));
        if let Some((path, value)) = &pushdown.by_tag {
            args.push(path);
            args.push(value);
        }
        let hub = &*self.hub;
        args.push(&hub);
        let width = layout.key_parts + if layout.whole_document { 1 } else { 2 };
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql).db()?;
            let rows = stmt
                .query_map(args.as_slice(), |r| (0..width).map(|i| r.get::<_, String>(i)).collect())
                .db()?;
            rows.map(|r| r.db()).collect()
        })
    }
}

fn document(collection: Collection, row: &[String]) -> Result<Value, Error> {
    match (collection, row) {
        (Collection::Devices, [_, device, twin]) => {
            device_twin_value(&from_doc::<Device>(device)?, &from_doc::<TwinDocument>(twin)?)
        }
        (Collection::Modules, [_, _, module, twin]) => {
            module_twin_value(&from_doc::<Module>(module)?, &from_doc::<TwinDocument>(twin)?)
        }
        (Collection::Jobs, [_, _, record]) => {
            serde_json::to_value(from_doc::<DeviceJob>(record)?).map_err(|e| Error::BadRequest(e.to_string()))
        }
        _ => Err(StoreError::Backend("unexpected query row shape".to_owned()).into()),
    }
}

impl QuerySource for SqliteStore {
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
        let max = page.max_items.max(1);
        let rows = self.scan_rows(layout, filter, &after, max)?;
        let more = rows.len() > max;
        let batch = &rows[..rows.len().min(max)];
        for row in batch {
            if visit(&document(collection, row)?).is_break() {
                break;
            }
        }
        Ok(match (more, batch.last()) {
            (true, Some(last)) => {
                let parts: Vec<&str> = last[..layout.key_parts].iter().map(String::as_str).collect();
                Some(encode_token(&parts))
            }
            _ => None,
        })
    }
}
