//! Queries answered by the SQLite store (with `WHERE` push-down) return exactly what the
//! embedded hub returns over the same data, page by page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod query_support;

use query_support::all_results;
use serde_json::json;
use zerotouch_engine::query::{execute, parse, QuerySource};
use zerotouch_engine::store::PageRequest;
use zerotouch_engine::twin::TwinOperation;
use zerotouch_proto::{DeviceId, IfMatch, Timestamp};
use zerotouch_store::sqlite::SqliteStore;

fn fleet() -> (SqliteStore, zerotouch_engine::hub_engine::EmbeddedHub<SqliteStore, SqliteStore, SqliteStore>)
{
    let store = SqliteStore::open_in_memory().unwrap();
    let hub = query_support::fleet(store.clone(), false);
    (store, hub)
}

#[test]
fn queries_over_sqlite_return_what_the_embedded_hub_returns() {
    let (store, hub) = fleet();
    let cases: &[(&str, usize)] = &[
        ("SELECT * FROM devices", 120),
        ("SELECT * FROM devices WHERE deviceId = 'dev-007'", 1),
        ("SELECT * FROM devices WHERE status = 'disabled'", 30),
        ("SELECT * FROM devices WHERE tags.region = 'eu'", 40),
        ("SELECT * FROM devices WHERE TAGS.REGION = 'Eu'", 40),
        ("SELECT deviceId FROM devices WHERE tags.floor.level IN ['f1', 'f3'] AND status = 'enabled'", 36),
        ("SELECT deviceId FROM devices WHERE tags.region = 'us' OR deviceId = 'dev-000'", 41),
        ("SELECT deviceId FROM devices WHERE properties.reported.temp = 'hot'", 20),
        ("SELECT * FROM devices WHERE 'dev-042' = deviceId AND tags.region = 'eu'", 1),
        ("SELECT * FROM devices WHERE tags.region = 'nowhere'", 0),
        ("SELECT COUNT() AS n FROM devices WHERE tags.region = 'us'", 1),
        ("SELECT * FROM devices.modules", 24),
        ("SELECT * FROM devices.modules WHERE moduleId = 'm1' AND properties.reported.mode = 'eco'", 12),
        ("SELECT * FROM devices.modules WHERE deviceId = 'dev-010'", 2),
        ("SELECT * FROM devices.jobs", 36),
        ("SELECT * FROM devices.jobs WHERE jobId = 'job-b' AND status = 'failed'", 9),
    ];
    for (query, expected) in cases {
        for size in [7, 100] {
            let from_hub = all_results(query, &hub, size);
            let from_store = all_results(query, &store, size);
            assert_eq!(from_store.len(), *expected, "{query} (pages of {size}) over SQLite");
            assert_eq!(from_store, from_hub, "{query} (pages of {size}): SQLite and the hub differ");
        }
    }
}

#[test]
fn a_continuation_token_the_store_did_not_issue_is_refused() {
    let (store, _hub) = fleet();
    let q = parse("SELECT * FROM devices").unwrap();
    let first = execute(&q, &store, &PageRequest { continuation: None, max_items: 10 }).unwrap();
    assert_eq!(first.items.len(), 10);
    let bad = PageRequest { continuation: Some("not-a-token".to_owned()), max_items: 10 };
    assert!(execute(&q, &store, &bad).is_err());
}

#[test]
fn a_selective_where_clause_is_answered_without_visiting_the_other_documents() {
    let (store, _hub) = fleet();
    let visited = |condition: &str| {
        let query = parse(&format!("SELECT * FROM devices WHERE {condition}")).unwrap();
        let mut n = 0;
        let page = PageRequest { continuation: None, max_items: 1000 };
        store
            .scan(query.from, query.filter.as_ref(), &page, &mut |_| {
                n += 1;
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        n
    };
    assert_eq!(visited("deviceId = 'dev-007'"), 1);
    assert_eq!(visited("status = 'disabled' AND deviceId IN ['dev-000', 'dev-001']"), 1);
    assert_eq!(visited("tags.region = 'nowhere'"), 0);
    // The tag index: only the 40 twins with region 'eu', not those that hold 'eu' elsewhere.
    assert_eq!(visited("tags.region = 'eu'"), 40);
    assert_eq!(visited("tags.REGION = 'eu' AND status = 'disabled'"), 10);
    // Not translatable: every document is visited and the evaluator decides.
    assert_eq!(visited("tags.region = 'eu' OR deviceId = 'dev-001'"), 120);
}

#[test]
fn the_tag_index_follows_tag_updates_and_deletes() {
    let (store, hub) = fleet();
    let now = Timestamp::from_unix_secs(1_700_000_100);
    let id = DeviceId::new("dev-001").unwrap();
    let patch = serde_json::from_value(json!({"tags": {"Region": "mars"}})).unwrap();
    hub.update_twin(&id, None, &TwinOperation::Patch(patch), &IfMatch::Any, now).unwrap();
    let query = |q: &str| (all_results(q, &store, 10), all_results(q, &hub, 10));
    let (mars, expected) = query("SELECT deviceId FROM devices WHERE tags.region = 'mars'");
    assert_eq!(mars, vec![json!({"deviceId": "dev-001"})]);
    assert_eq!(mars, expected);
    let (us, expected) = query("SELECT deviceId FROM devices WHERE tags.region = 'us'");
    assert_eq!((us.len(), us == expected), (39, true));

    hub.delete_device(&id, &IfMatch::Any, now).unwrap();
    let (mars, _) = query("SELECT deviceId FROM devices WHERE tags.region = 'mars'");
    assert!(mars.is_empty());
}
