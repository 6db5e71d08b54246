//! Running a parsed query over a document source, one page at a time.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Number, Value};

use super::ast::{Aggregate, Collection, Expr, ItemType, Path, Projection, Query, Select, SelectItem};
use super::bad_continuation;
use super::eval::{eval, lookup, matches};
use crate::error::Error;
use crate::store::PageRequest;

/// Largest page [`execute`] returns, whatever the request asks (spec §9.1, our choice).
pub const MAX_PAGE_SIZE: usize = 1000;

/// Documents read from the source per call. Fixed, because a continuation token records a
/// position inside a batch and must find the same batch when resumed.
const SCAN_BATCH: usize = 256;

/// Where the documents of a collection come from.
///
/// `scan` walks one batch of a collection, in a stable order, handing each document to `visit`
/// by reference (so an in-memory store clones nothing). Batches are addressed by the source's own
/// opaque tokens: `page.continuation` names where the batch starts, `page.max_items` bounds it,
/// and the same token and size must yield the same batch while the data is unchanged.
///
/// The `filter` is a hint so durable stores can push simple clauses down (see
/// [`Expr::conjuncts`]): a source may skip documents that cannot satisfy it, or ignore it;
/// [`execute`] re-checks every visited document either way.
pub trait QuerySource {
    /// Visits up to `page.max_items` documents after `page.continuation`, stopping early when
    /// `visit` breaks. Returns the token of the next batch, `None` when the collection ends.
    ///
    /// # Errors
    /// Backend failures, or [`super::bad_continuation`] for a token the source did not issue.
    fn scan(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error>;

    /// [`scan`](Self::scan) for sources that keep their documents behind [`Arc`], so that
    /// [`execute_shared`] can hand a document out by reference count instead of copying it.
    /// Visits the same documents in the same order, with the same tokens, as `scan`; the
    /// default passes `scan`'s borrowed documents through.
    ///
    /// # Errors
    /// As [`scan`](Self::scan).
    fn scan_shared(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(SourceDoc<'_>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.scan(collection, filter, page, &mut |doc| visit(SourceDoc::Borrowed(doc)))
    }
}

/// A document as [`QuerySource::scan_shared`] visits it.
#[derive(Debug, Clone, Copy)]
pub enum SourceDoc<'a> {
    /// Borrowed for the visit only: a result must copy it.
    Borrowed(&'a Value),
    /// Kept by the source behind an [`Arc`]: a result may share it.
    Shared(&'a Arc<Value>),
}

impl SourceDoc<'_> {
    /// The document.
    pub fn value(&self) -> &Value {
        match self {
            SourceDoc::Borrowed(v) => v,
            SourceDoc::Shared(v) => v,
        }
    }
}

/// An in-memory source: one vector of JSON documents per collection. Its tokens are offsets.
#[derive(Debug, Clone, Default)]
pub struct VecSource {
    /// Device twins (`FROM devices`).
    pub devices: Vec<Value>,
    /// Module twins (`FROM devices.modules`).
    pub modules: Vec<Value>,
    /// Device job records (`FROM devices.jobs`).
    pub jobs: Vec<Value>,
}

impl VecSource {
    /// A source holding these device twins and nothing else.
    pub fn with_devices(devices: Vec<Value>) -> Self {
        VecSource { devices, ..VecSource::default() }
    }

    fn docs(&self, collection: Collection) -> &[Value] {
        match collection {
            Collection::Devices => &self.devices,
            Collection::Modules => &self.modules,
            Collection::Jobs => &self.jobs,
        }
    }
}

impl QuerySource for VecSource {
    fn scan(
        &self,
        collection: Collection,
        _filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        let docs = self.docs(collection);
        let start = match &page.continuation {
            None => 0,
            Some(t) => t
                .parse::<usize>()
                .ok()
                .filter(|s| *s <= docs.len())
                .ok_or_else(|| bad_continuation("invalid continuation token"))?,
        };
        let end = start.saturating_add(page.max_items.max(1)).min(docs.len());
        for doc in docs.get(start..end).unwrap_or_default() {
            if visit(doc).is_break() {
                break;
            }
        }
        Ok((end < docs.len()).then(|| end.to_string()))
    }
}

/// One page of query results: owned items from [`execute`], shared ones
/// (`QueryPage<Arc<Value>>`) from [`execute_shared`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage<T = Value> {
    /// The result items (twins, job records or projected objects).
    pub items: Vec<T>,
    /// Token for the next page; `None` on the last page, so the `x-ms-continuation` header is
    /// omitted (spec §0 trap 6).
    pub continuation: Option<String>,
    /// The `x-ms-item-type` of the items.
    pub item_type: ItemType,
}

/// Runs `query` over `source` and returns the page after `page.continuation`.
///
/// Pages hold at most `page.max_items` items (1 to [`MAX_PAGE_SIZE`]); `TOP n` caps the total
/// over all pages. Continuation tokens are opaque, tied to the query, and only returned when
/// another result exists.
///
/// # Errors
/// `ArgumentInvalid` ([`super::bad_continuation`]) for a token that does not belong to this
/// query; source failures.
pub fn execute(query: &Query, source: &dyn QuerySource, page: &PageRequest) -> Result<QueryPage, Error> {
    run(query, source, page, &mut |select, doc| project(select, doc.value()), &mut |row| row)
}

/// [`execute`] with items shared instead of copied: a `SELECT *` item is the source's own
/// document when the source keeps it behind an [`Arc`] (see [`QuerySource::scan_shared`]),
/// so a page costs a reference count per result instead of a deep copy of each twin. Items,
/// order and continuation tokens are those of [`execute`] (tokens are interchangeable).
///
/// # Errors
/// As [`execute`].
pub fn execute_shared(
    query: &Query,
    source: &dyn QuerySource,
    page: &PageRequest,
) -> Result<QueryPage<Arc<Value>>, Error> {
    run(
        query,
        source,
        page,
        &mut |select, doc| match (select, doc) {
            (Select::All, SourceDoc::Shared(shared)) => Arc::clone(shared),
            _ => Arc::new(project(select, doc.value())),
        },
        &mut Arc::new,
    )
}

/// The paging engine behind [`execute`] and [`execute_shared`]: `item` builds the result of a
/// matching document, `row` wraps an aggregate row.
fn run<T>(
    query: &Query,
    source: &dyn QuerySource,
    page: &PageRequest,
    item: &mut dyn FnMut(&Select, SourceDoc<'_>) -> T,
    row: &mut dyn FnMut(Value) -> T,
) -> Result<QueryPage<T>, Error> {
    let hash = query_hash(query);
    let cursor = match &page.continuation {
        None => Cursor::default(),
        Some(t) => Cursor::decode(t, hash)?,
    };
    let top = query.top.map_or(usize::MAX, |t| usize::try_from(t).unwrap_or(usize::MAX));
    let want = page.max_items.clamp(1, MAX_PAGE_SIZE).min(top.saturating_sub(cursor.emitted));
    let item_type = query.item_type();
    if want == 0 {
        return Ok(QueryPage { items: Vec::new(), continuation: None, item_type });
    }
    if query.is_aggregate() {
        let rows = aggregate(query, source)?;
        let limit = rows.len().min(top);
        let end = cursor.emitted.saturating_add(want).min(limit);
        let start = cursor.emitted.min(end);
        let items = rows.into_iter().skip(start).take(end - start).map(row).collect();
        let continuation = (end < limit).then(|| Cursor { emitted: end, source: None, skip: 0 }.encode(hash));
        return Ok(QueryPage { items, continuation, item_type });
    }

    let mut items = Vec::with_capacity(want);
    let mut src_token = cursor.source;
    let mut skip = cursor.skip;
    // Set when the page is full and another result exists (its index in the current batch),
    // or when TOP is reached.
    let mut resume_at = None;
    let mut done = false;
    loop {
        let req = PageRequest { continuation: src_token.clone(), max_items: SCAN_BATCH };
        let mut index = 0;
        let next = source.scan_shared(query.from, query.filter.as_ref(), &req, &mut |doc| {
            let i = index;
            index += 1;
            if i < skip || !query.filter.as_ref().is_none_or(|f| matches(f, doc.value())) {
                return ControlFlow::Continue(());
            }
            if items.len() == want {
                resume_at = Some(i);
                return ControlFlow::Break(());
            }
            items.push(item(&query.select, doc));
            if cursor.emitted + items.len() >= top {
                done = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        if let Some(i) = resume_at {
            let next = Cursor { emitted: cursor.emitted + items.len(), source: src_token, skip: i };
            return Ok(QueryPage { items, continuation: Some(next.encode(hash)), item_type });
        }
        match next {
            Some(t) if !done => {
                src_token = Some(t);
                skip = 0;
            }
            _ => return Ok(QueryPage { items, continuation: None, item_type }),
        }
    }
}

/// The result object of one document.
fn project(select: &Select, doc: &Value) -> Value {
    let Select::Items(items) = select else { return doc.clone() };
    let mut out = Map::new();
    let mut unnamed = 0;
    for item in items {
        let Projection::Expr(e) = &item.projection else { continue };
        if item.alias.is_none() && !matches!(e, Expr::Path(_)) {
            unnamed += 1;
        }
        let (key, value) = match (e, &item.alias) {
            (Expr::Path(p), alias) => match lookup(doc, p) {
                Some((k, v)) => (alias.clone().unwrap_or_else(|| k.to_owned()), v.clone()),
                None => continue,
            },
            (_, alias) => match eval(e, doc) {
                Some(v) => (alias.clone().unwrap_or_else(|| format!("${unnamed}")), v.into_owned()),
                None => continue,
            },
        };
        out.insert(key, value);
    }
    Value::Object(out)
}

/// Running state of one aggregate.
#[derive(Debug, Clone, Default)]
struct Acc {
    count: u64,
    int_sum: Option<i64>,
    float_sum: f64,
    numbers: u64,
    min: Option<Number>,
    max: Option<Number>,
}

impl Acc {
    fn add(&mut self, agg: &Aggregate, doc: &Value) {
        self.count += 1;
        let p = match agg {
            Aggregate::Count => return,
            Aggregate::Sum(p) | Aggregate::Avg(p) | Aggregate::Min(p) | Aggregate::Max(p) => p,
        };
        let Some((_, Value::Number(n))) = lookup(doc, p) else { return };
        let Some(f) = n.as_f64() else { return };
        self.int_sum = match (self.numbers, self.int_sum, n.as_i64()) {
            (0, _, Some(i)) => Some(i),
            (_, Some(s), Some(i)) => s.checked_add(i),
            _ => None,
        };
        self.numbers += 1;
        self.float_sum += f;
        let lt = |a: &Number, b: &Number| {
            super::eval::compare(
                super::ast::CompareOp::Lt,
                &Value::Number(a.clone()),
                &Value::Number(b.clone()),
            ) == Some(true)
        };
        if self.min.as_ref().is_none_or(|m| lt(n, m)) {
            self.min = Some(n.clone());
        }
        if self.max.as_ref().is_none_or(|m| lt(m, n)) {
            self.max = Some(n.clone());
        }
    }

    fn result(&self, agg: &Aggregate) -> Option<Value> {
        let n = match agg {
            Aggregate::Count => Some(Number::from(self.count)),
            Aggregate::Sum(_) if self.numbers == 0 => Some(Number::from(0)),
            Aggregate::Sum(_) => self.int_sum.map(Number::from).or_else(|| Number::from_f64(self.float_sum)),
            #[allow(clippy::cast_precision_loss)] // an average is approximate by nature
            Aggregate::Avg(_) if self.numbers > 0 => Number::from_f64(self.float_sum / self.numbers as f64),
            Aggregate::Avg(_) => None,
            Aggregate::Min(_) => self.min.clone(),
            Aggregate::Max(_) => self.max.clone(),
        };
        n.map(Value::Number)
    }
}

/// One group of a GROUP BY (or the single group of an aggregate query without one).
struct Group {
    key_name: Option<String>,
    value: Option<Value>,
    accs: Vec<Acc>,
}

fn aggregate(query: &Query, source: &dyn QuerySource) -> Result<Vec<Value>, Error> {
    let items: &[SelectItem] = match &query.select {
        Select::Items(items) => items,
        Select::All => &[],
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if query.group_by.is_none() {
        groups.push(Group { key_name: None, value: None, accs: vec![Acc::default(); items.len()] });
    }
    let mut token = None;
    loop {
        let req = PageRequest { continuation: token, max_items: SCAN_BATCH };
        token = source.scan(query.from, query.filter.as_ref(), &req, &mut |doc| {
            if !query.filter.as_ref().is_none_or(|f| matches(f, doc)) {
                return ControlFlow::Continue(());
            }
            let g = match &query.group_by {
                None => 0,
                Some(path) => group_of(&mut groups, &mut index, path, doc, items.len()),
            };
            if let Some(group) = groups.get_mut(g) {
                for (acc, item) in group.accs.iter_mut().zip(items) {
                    if let Projection::Aggregate(a) = &item.projection {
                        acc.add(a, doc);
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
        if token.is_none() {
            break;
        }
    }
    Ok(groups.iter().map(|g| group_row(g, items)).collect())
}

fn group_of(
    groups: &mut Vec<Group>,
    index: &mut HashMap<String, usize>,
    path: &Path,
    doc: &Value,
    n: usize,
) -> usize {
    let found = lookup(doc, path);
    // Serialised JSON never is the empty string, so "" can stand for undefined.
    let key = found.map_or_else(String::new, |(_, v)| v.to_string());
    *index.entry(key).or_insert_with(|| {
        groups.push(Group {
            key_name: found.map(|(k, _)| k.to_owned()),
            value: found.map(|(_, v)| v.clone()),
            accs: vec![Acc::default(); n],
        });
        groups.len() - 1
    })
}

fn group_row(group: &Group, items: &[SelectItem]) -> Value {
    let mut out = Map::new();
    let mut unnamed = 0;
    for (item, acc) in items.iter().zip(&group.accs) {
        match &item.projection {
            Projection::Aggregate(a) => {
                unnamed += usize::from(item.alias.is_none());
                if let Some(v) = acc.result(a) {
                    out.insert(item.alias.clone().unwrap_or_else(|| format!("${unnamed}")), v);
                }
            }
            Projection::Expr(e) => {
                let (Some(v), Expr::Path(p)) = (&group.value, e) else { continue };
                let fallback =
                    || group.key_name.clone().or_else(|| p.segments.last().cloned()).unwrap_or_default();
                out.insert(item.alias.clone().unwrap_or_else(fallback), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Position of the next result: results already returned, the source token of the batch holding
/// the next document, and that document's index in the batch.
#[derive(Debug, Default)]
struct Cursor {
    emitted: usize,
    source: Option<String>,
    skip: usize,
}

impl Cursor {
    fn encode(&self, hash: u64) -> String {
        let src = self.source.as_ref().map_or_else(String::new, |s| format!("~{s}"));
        URL_SAFE_NO_PAD.encode(format!("q1.{hash:016x}.{}.{}.{src}", self.emitted, self.skip))
    }

    fn decode(token: &str, hash: u64) -> Result<Cursor, Error> {
        let bad = || bad_continuation("invalid continuation token for this query");
        let raw = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = text.splitn(5, '.');
        let (Some("q1"), Some(h), Some(emitted), Some(skip), Some(src)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if u64::from_str_radix(h, 16).ok() != Some(hash) {
            return Err(bad());
        }
        let source = match src {
            "" => None,
            s => Some(s.strip_prefix('~').ok_or_else(bad)?.to_owned()),
        };
        Ok(Cursor {
            emitted: emitted.parse().map_err(|_| bad())?,
            skip: skip.parse().map_err(|_| bad())?,
            source,
        })
    }
}

/// FNV-1a over the query's structure, so a token is refused when replayed with another query.
/// The canonical text is stable across builds, so tokens survive a rolling upgrade.
fn query_hash(query: &Query) -> u64 {
    query
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
