//! Schema migrations of the PostgreSQL store: applied once at connect, also when instances
//! start together, and refused when the database is newer than the binary.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use pg_support::TestDb;
use zerotouch_store::postgres::{PgStore, LATEST_SCHEMA_VERSION};

fn applied_versions(url: &str) -> Vec<i32> {
    TestDb::client(url)
        .query("SELECT version FROM zerotouch_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn connecting_to_an_empty_database_migrates_it_to_the_latest_version() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let store = PgStore::connect(&url, 2).unwrap();
    assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected, "baseline row plus one row per version");
}

#[test]
fn reconnecting_applies_nothing_twice_and_keeps_the_data() {
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::Precondition;
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::DeviceId;

    let db = TestDb::new();
    let url = db.fresh_url();
    let first = PgStore::connect(&url, 2).unwrap();
    let device = Device::new(DeviceId::new("kept").unwrap());
    first.put_device(&device, &Precondition::MustNotExist).unwrap();
    drop(first);
    let second = PgStore::connect(&url, 2).unwrap();
    assert!(second.device(&device.device_id).unwrap().is_some(), "the device survived a reconnect");
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected);
}

#[test]
fn four_instances_starting_together_migrate_the_database_once() {
    let db = TestDb::new();
    let url = db.fresh_url();
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    PgStore::connect(&url, 1).map(drop)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    let expected: Vec<i32> = (0..=LATEST_SCHEMA_VERSION).collect();
    assert_eq!(applied_versions(&url), expected);
}

/// A role that may create nothing in the database, only in its own schema.
struct SchemaRole<'db> {
    db: &'db TestDb,
    name: String,
}

impl<'db> SchemaRole<'db> {
    /// A new role with `CREATE` and `USAGE` on `schema` and no other privilege of its own; the
    /// test server's user is made a member, so that its sessions may take the role (a superuser
    /// may anyway, a user with `CREATEROLE` only so).
    fn new(db: &'db TestDb, schema: &str) -> Self {
        let name = format!("zt_role_{:016x}", rand::random::<u64>());
        db.admin()
            .batch_execute(&format!(
                "CREATE ROLE {name} NOLOGIN; GRANT CREATE, USAGE ON SCHEMA {schema} TO {name}; \
                 GRANT {name} TO CURRENT_USER"
            ))
            .unwrap();
        SchemaRole { db, name }
    }

    /// Whether the role holds `privilege` on the database or on `schema`.
    fn may(&self, privilege: &str, schema: Option<&str>) -> bool {
        let (sql, name) = match schema {
            None => ("SELECT has_database_privilege($1, current_database(), $2)", None),
            Some(s) => ("SELECT has_schema_privilege($1, $3, $2)", Some(s)),
        };
        let mut admin = self.db.admin();
        match name {
            None => admin.query_one(sql, &[&self.name, &privilege]),
            Some(s) => admin.query_one(sql, &[&self.name, &privilege, &s]),
        }
        .unwrap()
        .get(0)
    }
}

impl Drop for SchemaRole<'_> {
    fn drop(&mut self) {
        let name = &self.name;
        let _ = self.db.admin().batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE {name}"));
    }
}

/// README: a role needs `CREATE` and `USAGE` on the schema it works in (the first of its search
/// path), nothing on the database; a schema of its own comes with `options=-csearch_path%3D…`
/// in the URL. The sessions take the role at start (`-crole=`, as `SET ROLE`), so the test needs
/// no password or `pg_hba.conf` entry of its own; privileges are checked against that role.
#[test]
fn a_role_with_only_create_and_usage_on_its_own_schema_migrates_it_and_works() {
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::Precondition;
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::DeviceId;

    let db = TestDb::new();
    let schema = db.fresh_schema();
    let role = SchemaRole::new(&db, &schema);
    assert!(!role.may("CREATE", None), "the role may create schemas in the database");
    let url = pg_support::url_with_settings(db.url(), &[("search_path", &schema), ("role", &role.name)]);

    let store = PgStore::connect(&url, 2).unwrap();
    assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
    let hub = store.hub("hub-a.example").unwrap();
    let device = Device::new(DeviceId::new("in-own-schema").unwrap());
    hub.put_device(&device, &Precondition::MustNotExist).unwrap();
    drop((hub, store));
    let reader = PgStore::connect_read_only(&url, 1).unwrap().hub("hub-a.example").unwrap();
    assert!(reader.device(&device.device_id).unwrap().is_some());
    drop(reader);
    let owned: i64 = db
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tableowner = $2",
            &[&schema, &role.name],
        )
        .unwrap()
        .get(0);
    assert!(owned > 0, "the tables are the role's, in its schema");

    // Without the schema in its search path, the role works in `public`, where PostgreSQL 15
    // and later let only the database owner create (older releases let everyone).
    if !role.may("CREATE", Some("public")) {
        let err = PgStore::connect(&pg_support::url_with_settings(db.url(), &[("role", &role.name)]), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("permission denied for schema public"), "{err}");
    }
}

#[test]
fn a_database_newer_than_the_binary_is_refused_with_a_clear_error() {
    let db = TestDb::new();
    let (url, future) = db.newer_schema_url();
    let err = PgStore::connect(&url, 1).unwrap_err().to_string();
    assert!(err.contains(&format!("version {future}")) && err.contains("newer"), "unclear error: {err}");
}

#[test]
fn a_missing_server_fails_with_a_backend_error() {
    // Port 9 (discard) on loopback has no PostgreSQL; the pool gives up after its timeout.
    let err = PgStore::connect("postgres://postgres@127.0.0.1:9/postgres?connect_timeout=1", 1).unwrap_err();
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}

#[test]
fn a_database_from_before_hubs_keeps_its_rows_in_the_unnamed_hub_until_its_one_hub_claims_them() {
    use zerotouch_engine::jobs::JobStore;
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::PageRequest;
    use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
    use zerotouch_proto::{DeviceId, Timestamp};
    use zerotouch_store::postgres::migration_sql;

    let db = TestDb::new();
    let url = db.fresh_url();
    // A database as the release before hubs left it: version 1 with a device, a module, its
    // twin and a device job.
    let mut client = TestDb::client(&url);
    client
        .batch_execute(
            "CREATE TABLE zerotouch_schema (version integer PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO zerotouch_schema (version, description) VALUES (0, 'baseline'), (1, 'v1');",
        )
        .unwrap();
    client.batch_execute(migration_sql(1).unwrap()).unwrap();
    client
        .batch_execute(
            r#"INSERT INTO devices (device_id, etag, doc, status, connected) VALUES
                 ('old-1', 'e1', '{"deviceId":"old-1","status":"enabled"}', 'enabled', false);
               INSERT INTO modules (device_id, module_id, etag, doc) VALUES
                 ('old-1', 'm1', 'e2', '{"deviceId":"old-1","moduleId":"m1"}');
               INSERT INTO device_jobs (job_id, device_id, doc) VALUES
                 ('job-1', 'old-1', '{"deviceId":"old-1","jobId":"job-1","jobType":"scheduleUpdateTwin","status":"completed","startTimeUtc":"2023-11-14T22:13:20Z","endTimeUtc":"2023-11-14T22:13:20Z","createdDateTimeUtc":"2023-11-14T22:13:20Z","lastUpdatedDateTimeUtc":"2023-11-14T22:13:20Z","outcome":{}}');"#,
        )
        .unwrap();
    let twin = serde_json::to_string(&TwinDocument::new(Timestamp::from_unix_secs(1_700_000_000))).unwrap();
    client
        .execute(
            "INSERT INTO twins (device_id, module_id, etag, doc, tags_ci) VALUES ('old-1', '', 'r1', $1, '{}')",
            &[&twin],
        )
        .unwrap();
    drop(client);

    let store = PgStore::connect(&url, 2).unwrap();
    assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
    let id = DeviceId::new("old-1").unwrap();
    let device = store.device(&id).unwrap().expect("the old device is in the unnamed hub");
    assert_eq!(device.device_id, id);
    assert_eq!(store.modules(&id).unwrap().len(), 1);
    let page = PageRequest { continuation: None, max_items: 10 };
    let filter = zerotouch_engine::jobs::DeviceJobFilter { job_id: None, device_id: None };
    assert_eq!(store.device_jobs(&filter, &page).unwrap().items.len(), 1);
    assert!(store.twin(&TwinKey::device(id.clone())).unwrap().is_some());
    // The old device is no named hub's until the first hub opened on the database claims it.
    let named = store.hub("localhost").unwrap();
    assert!(named.device(&id).unwrap().is_none());
    let later = store.hub("later.example.net").unwrap();
    assert_eq!(later.claim_unnamed_hub().unwrap(), 0, "only the one named hub may claim");
    drop(later);
    // Forget that hub, as if it had never been opened: now localhost is the only one.
    TestDb::client(&url).execute("DELETE FROM hubs WHERE name = 'later.example.net'", &[]).unwrap();
    assert_eq!(named.claim_unnamed_hub().unwrap(), 1);
    assert!(named.device(&id).unwrap().is_some());
    assert_eq!(named.modules(&id).unwrap().len(), 1, "modules follow their device");
    assert!(named.twin(&TwinKey::device(id.clone())).unwrap().is_some());
    assert_eq!(named.device_jobs(&filter, &page).unwrap().items.len(), 1);
    assert!(store.device(&id).unwrap().is_none(), "the unnamed hub is empty now");
    assert_eq!(named.claim_unnamed_hub().unwrap(), 0, "claiming twice moves nothing");
    assert_eq!(store.hub_names().unwrap(), vec!["localhost"]);
}
