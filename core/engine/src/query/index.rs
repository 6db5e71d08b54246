//! An in-memory query source that answers `path = 'text'` filters from hash indexes.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use super::ast::{Collection, CompareOp, Expr, Literal, Path};
use super::exec::{QuerySource, SourceDoc, VecSource};
use crate::error::Error;
use crate::store::PageRequest;

/// Positions (ascending) of the documents whose property holds each string value.
type Postings = HashMap<String, Vec<usize>>;

/// Most indexes one source keeps; the oldest goes when another is built. Each holds a copy of
/// the string values of its property, so paths a query client makes up cannot grow memory
/// without bound.
const MAX_CACHED_INDEXES: usize = 32;

/// Which collection and property an index covers: the segments ASCII-lower-cased, since names
/// match without case and every spelling of a property shares its index.
type IndexKey = (Collection, Vec<String>);

/// The indexes built so far, at most [`MAX_CACHED_INDEXES`], with the order they were built in.
#[derive(Debug, Default)]
struct IndexCache {
    map: HashMap<IndexKey, Arc<Postings>>,
    built: VecDeque<IndexKey>,
}

impl IndexCache {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Keeps `postings` under `key` (or what another thread kept there first), forgetting the
    /// oldest index when the cache is full.
    fn keep(&mut self, key: IndexKey, postings: Arc<Postings>) -> Arc<Postings> {
        if let Some(found) = self.map.get(&key) {
            return Arc::clone(found);
        }
        while self.map.len() >= MAX_CACHED_INDEXES {
            match self.built.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => break,
            }
        }
        self.built.push_back(key.clone());
        self.map.insert(key, Arc::clone(&postings));
        postings
    }
}

/// The collections, each document behind an [`Arc`] so results can share it.
#[derive(Debug, Default)]
struct SharedDocs {
    devices: Vec<Arc<Value>>,
    modules: Vec<Arc<Value>>,
    jobs: Vec<Arc<Value>>,
}

/// An immutable set of documents (the collections of a [`VecSource`]) that keeps one hash index
/// per property a filter has asked for, so a selective `WHERE tags.site = 'x'` visits only the
/// documents holding `'x'` instead of every document.
///
/// An index is built the first time a filter names its property (or by [`IndexedSource::index`])
/// and kept for the life of the source (the documents cannot change underneath it), at most
/// 32 of them, the oldest forgotten first. All spellings of a property share one index, which
/// lists a document under every value it holds at any case variant of the path. Indexes only
/// narrow the scan: [`super::execute`] still evaluates the whole `WHERE` on each visited document,
/// so a query gives the same items in the same order as over the plain [`VecSource`].
///
/// Documents are kept behind [`Arc`] ([`QuerySource::scan_shared`]), so
/// [`super::execute_shared`] hands out `SELECT *` results without copying them.
#[derive(Debug, Default)]
pub struct IndexedSource {
    docs: SharedDocs,
    indexes: RwLock<IndexCache>,
}

impl IndexedSource {
    /// A source over these collections, with no index built yet.
    pub fn new(docs: VecSource) -> Self {
        let share = |docs: Vec<Value>| docs.into_iter().map(Arc::new).collect();
        let docs =
            SharedDocs { devices: share(docs.devices), modules: share(docs.modules), jobs: share(docs.jobs) };
        Self { docs, indexes: RwLock::new(IndexCache::default()) }
    }

    /// The documents of a collection, in scan order.
    pub fn docs(&self, collection: Collection) -> &[Arc<Value>] {
        match collection {
            Collection::Devices => &self.docs.devices,
            Collection::Modules => &self.docs.modules,
            Collection::Jobs => &self.docs.jobs,
        }
    }

    /// The same documents as a source that never uses an index (to compare plans): it visits
    /// every document of the collection, as a [`VecSource`] does, with the same tokens.
    pub fn unindexed(&self) -> impl QuerySource + '_ {
        Unindexed(self)
    }

    /// Visits a batch of the whole collection; tokens are offsets, as [`VecSource`]'s.
    fn scan_all(
        &self,
        collection: Collection,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Arc<Value>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        let docs = self.docs(collection);
        let start = match &page.continuation {
            None => 0,
            Some(t) => t.parse::<usize>().ok().filter(|s| *s <= docs.len()).ok_or_else(bad_token)?,
        };
        let end = start.saturating_add(page.max_items.max(1)).min(docs.len());
        for doc in docs.get(start..end).unwrap_or_default() {
            if visit(doc).is_break() {
                break;
            }
        }
        Ok((end < docs.len()).then(|| end.to_string()))
    }

    /// Visits a batch of the documents the index of the filter's first `path = 'text'`
    /// conjunct lists, or of the whole collection when there is none.
    fn scan_docs(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Arc<Value>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        let Some((path, value)) = filter.and_then(string_equality) else {
            return self.scan_all(collection, page, visit);
        };
        let postings = self.postings(collection, path);
        let hits: &[usize] = postings.get(value).map_or(&[], Vec::as_slice);
        let start = match &page.continuation {
            None => 0,
            Some(t) => t
                .strip_prefix('i')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|s| *s <= hits.len())
                .ok_or_else(bad_token)?,
        };
        let end = start.saturating_add(page.max_items.max(1)).min(hits.len());
        let docs = self.docs(collection);
        for &i in hits.get(start..end).unwrap_or_default() {
            if let Some(doc) = docs.get(i) {
                if visit(doc).is_break() {
                    break;
                }
            }
        }
        Ok((end < hits.len()).then(|| format!("i{end}")))
    }

    /// Builds the index of `path` in `collection` now (instead of on the first query that
    /// filters on it); returns how many distinct string values it holds (at any case variant
    /// of the path). An index forgotten to make room is built again the same way, so the
    /// continuation tokens of its queries stay valid.
    pub fn index(&self, collection: Collection, path: &Path) -> usize {
        self.postings(collection, path).len()
    }

    fn postings(&self, collection: Collection, path: &Path) -> Arc<Postings> {
        let segments: Vec<String> = path.segments.iter().map(|s| s.to_ascii_lowercase()).collect();
        let key = (collection, segments);
        // A poisoned lock only means another reader panicked; the map itself is always whole.
        if let Some(found) = self.indexes.read().unwrap_or_else(|e| e.into_inner()).map.get(&key) {
            return Arc::clone(found);
        }
        let mut postings = Postings::new();
        for (i, doc) in self.docs(collection).iter().enumerate() {
            // Every value at any case variant of the path: whichever one the evaluator's lookup
            // picks for a spelling (the exact name first, else one that differs in case), the
            // document is listed under it.
            each_value(doc, &key.1, &mut |value| {
                if let Value::String(s) = value {
                    match postings.get_mut(s.as_str()) {
                        Some(list) if list.last() == Some(&i) => {}
                        Some(list) => list.push(i),
                        None => {
                            postings.insert(s.clone(), vec![i]);
                        }
                    }
                }
            });
        }
        self.indexes.write().unwrap_or_else(|e| e.into_inner()).keep(key, Arc::new(postings))
    }
}

impl From<VecSource> for IndexedSource {
    fn from(docs: VecSource) -> Self {
        Self::new(docs)
    }
}

/// Visits the value of every property of `doc` at `segments` (ASCII-lower-cased) matched
/// without case: ASCII case-insensitively, or by Unicode lower case for names that are not
/// ASCII (the evaluator's rules, without its preference for an exact match).
fn each_value(doc: &Value, segments: &[String], visit: &mut dyn FnMut(&Value)) {
    let Some((first, rest)) = segments.split_first() else {
        visit(doc);
        return;
    };
    let Some(obj) = doc.as_object() else { return };
    for (_, child) in matching_keys(obj, first) {
        each_value(child, rest, visit);
    }
}

fn matching_keys<'a>(
    obj: &'a Map<String, Value>,
    name: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Value)> {
    let lower = (!name.is_ascii()).then(|| name.to_lowercase());
    obj.iter().filter(move |(k, _)| {
        k.eq_ignore_ascii_case(name) || lower.as_ref().is_some_and(|l| k.to_lowercase() == *l)
    })
}

/// The first conjunct of `filter` of the form `path = 'text'` (either side), if any: every
/// document the whole filter accepts holds `text` at `path`.
fn string_equality(filter: &Expr) -> Option<(&Path, &str)> {
    filter.conjuncts().into_iter().find_map(|c| match c {
        Expr::Compare(CompareOp::Eq, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Path(p), Expr::Literal(Literal::String(s)))
            | (Expr::Literal(Literal::String(s)), Expr::Path(p)) => Some((p, s.as_str())),
            _ => None,
        },
        _ => None,
    })
}

fn bad_token() -> Error {
    super::bad_continuation("invalid continuation token")
}

impl QuerySource for IndexedSource {
    /// Tokens are `i{n}` (the n-th document holding the value) when the filter is answered
    /// from an index, plain offsets otherwise. The filter of a query never changes between its
    /// pages, so a token is always read back the way it was written.
    fn scan(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.scan_docs(collection, filter, page, &mut |doc| visit(doc))
    }

    fn scan_shared(
        &self,
        collection: Collection,
        filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(SourceDoc<'_>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.scan_docs(collection, filter, page, &mut |doc| visit(SourceDoc::Shared(doc)))
    }
}

/// [`IndexedSource::unindexed`]: every document of the collection, no index.
struct Unindexed<'a>(&'a IndexedSource);

impl QuerySource for Unindexed<'_> {
    fn scan(
        &self,
        collection: Collection,
        _filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.0.scan_all(collection, page, &mut |doc| visit(doc))
    }

    fn scan_shared(
        &self,
        collection: Collection,
        _filter: Option<&Expr>,
        page: &PageRequest,
        visit: &mut dyn FnMut(SourceDoc<'_>) -> ControlFlow<()>,
    ) -> Result<Option<String>, Error> {
        self.0.scan_all(collection, page, &mut |doc| visit(SourceDoc::Shared(doc)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::query::{execute, execute_shared, parse};

    fn fleet(n: usize) -> VecSource {
        VecSource::with_devices(
            (0..n)
                .map(|i| {
                    json!({
                        "deviceId": format!("d{i:04}"),
                        "tags": {"site": format!("s{}", i % 7), "floor": i % 3},
                    })
                })
                .collect(),
        )
    }

    fn all_pages(query: &str, source: &dyn QuerySource, size: usize) -> Vec<Value> {
        let q = parse(query).unwrap();
        let mut page = PageRequest { continuation: None, max_items: size };
        let mut out = Vec::new();
        loop {
            let p = execute(&q, source, &page).unwrap();
            out.extend(p.items);
            match p.continuation {
                Some(c) => page.continuation = Some(c),
                None => return out,
            }
        }
    }

    #[test]
    fn indexed_query_pages_give_the_same_items_as_a_full_scan() {
        let plain = fleet(2000);
        let indexed = IndexedSource::new(plain.clone());
        for query in [
            "SELECT * FROM devices WHERE tags.site = 's3'",
            "SELECT deviceId FROM devices WHERE 's3' = tags.Site AND tags.floor = 1",
            "SELECT * FROM devices WHERE tags.floor = 1 AND tags.site = 's5'",
            "SELECT TOP 5 * FROM devices WHERE tags.site = 's1'",
            "SELECT * FROM devices WHERE tags.site = 'nowhere'",
            "SELECT * FROM devices WHERE tags.floor = 2",
        ] {
            for size in [1, 7, 100, 1000] {
                assert_eq!(
                    all_pages(query, &indexed, size),
                    all_pages(query, &plain, size),
                    "{query} {size}"
                );
            }
        }
    }

    #[test]
    fn shared_pages_give_the_items_and_tokens_of_copied_pages_and_share_whole_twins() {
        let indexed = IndexedSource::new(fleet(500));
        for query in [
            "SELECT * FROM devices WHERE tags.site = 's3'",
            "SELECT deviceId, tags.floor AS f FROM devices WHERE tags.site = 's3' AND tags.floor > 0",
            "SELECT TOP 9 * FROM devices WHERE tags.floor = 2",
            "SELECT tags.site, COUNT() AS n FROM devices GROUP BY tags.site",
        ] {
            let q = parse(query).unwrap();
            let mut page = PageRequest { continuation: None, max_items: 7 };
            loop {
                let copied = execute(&q, &indexed, &page).unwrap();
                let shared = execute_shared(&q, &indexed, &page).unwrap();
                let items: Vec<Value> = shared.items.iter().map(|v| Value::clone(v)).collect();
                assert_eq!(items, copied.items, "{query}");
                assert_eq!(shared.continuation, copied.continuation, "{query}");
                assert_eq!(shared.item_type, copied.item_type, "{query}");
                match copied.continuation {
                    Some(c) => page.continuation = Some(c),
                    None => break,
                }
            }
        }
        let q = parse("SELECT * FROM devices WHERE tags.site = 's3'").unwrap();
        let first = execute_shared(&q, &indexed, &PageRequest { continuation: None, max_items: 1 }).unwrap();
        let doc = &indexed.docs(Collection::Devices)[3];
        assert!(Arc::ptr_eq(&first.items[0], doc), "SELECT * hands out the stored twin itself");
    }

    #[test]
    fn a_grouped_count_over_an_indexed_filter_counts_the_matching_devices() {
        let indexed = IndexedSource::new(fleet(700));
        let rows = all_pages("SELECT COUNT() AS n FROM devices WHERE tags.site = 's2'", &indexed, 10);
        assert_eq!(rows, vec![json!({"n": 100})]);
    }

    #[test]
    fn spellings_of_one_property_share_one_index() {
        let src = IndexedSource::new(VecSource::with_devices(
            (0..1000).map(|i| json!({"deviceId": format!("d{i}")})).collect(),
        ));
        let page = PageRequest { continuation: None, max_items: 1 };
        for v in ["deviceId", "DeviceId", "DEVICEID", "deviceID", "DeViCeId"] {
            let q = parse(&format!("SELECT * FROM devices WHERE {v} = 'd7'")).unwrap();
            assert_eq!(execute(&q, &src, &page).unwrap().items.len(), 1, "{v}");
        }
        assert_eq!(src.indexes.read().unwrap().len(), 1);
    }

    #[test]
    fn properties_whose_names_differ_only_in_case_are_all_found_through_a_shared_index() {
        let docs = VecSource::with_devices(vec![
            json!({"deviceId": "a", "tags": {"site": "x", "Site": "y"}}),
            json!({"deviceId": "b", "tags": {"SITE": "y"}}),
            json!({"deviceId": "c", "tags": {"site": "y"}}),
        ]);
        let indexed = IndexedSource::new(docs.clone());
        for query in [
            "SELECT deviceId FROM devices WHERE tags.site = 'x'",
            "SELECT deviceId FROM devices WHERE tags.Site = 'y'",
            "SELECT deviceId FROM devices WHERE tags.site = 'y'",
            "SELECT deviceId FROM devices WHERE tags.SITE = 'y'",
            "SELECT deviceId FROM devices WHERE tags.sItE = 'y'",
        ] {
            assert_eq!(all_pages(query, &indexed, 10), all_pages(query, &docs, 10), "{query}");
        }
        assert_eq!(indexed.indexes.read().unwrap().len(), 1);
    }

    #[test]
    fn the_number_of_cached_indexes_is_bounded() {
        let src = IndexedSource::new(fleet(50));
        let page = PageRequest { continuation: None, max_items: 10 };
        for k in 0..(MAX_CACHED_INDEXES * 4) {
            let q = parse(&format!("SELECT * FROM devices WHERE tags.k{k} = 'x'")).unwrap();
            assert!(execute(&q, &src, &page).unwrap().items.is_empty());
        }
        assert_eq!(src.indexes.read().unwrap().len(), MAX_CACHED_INDEXES);
        // Evicted indexes are built again when asked for, with the same answers.
        let q = parse("SELECT * FROM devices WHERE tags.site = 's3'").unwrap();
        assert_eq!(execute(&q, &src, &page).unwrap().items.len(), 7);
    }

    #[test]
    fn a_token_from_an_unindexed_scan_is_refused_by_an_indexed_one() {
        let indexed = IndexedSource::new(fleet(10));
        let q = parse("SELECT * FROM devices WHERE tags.site = 's1'").unwrap();
        let filter = q.filter.as_ref();
        let page = PageRequest { continuation: Some("3".to_owned()), max_items: 5 };
        assert!(indexed
            .scan(Collection::Devices, filter, &page, &mut |_| ControlFlow::Continue(()))
            .is_err());
        let path = Path { segments: vec!["tags".to_owned(), "site".to_owned()] };
        assert_eq!(indexed.index(Collection::Devices, &path), 7);
    }
}
