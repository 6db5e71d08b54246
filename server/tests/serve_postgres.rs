//! `zerotouch serve --database-url`: enrollments, registrations and the embedded hub's registry
//! in PostgreSQL. The server comes from `ZEROTOUCH_TEST_DATABASE_URL` (`scripts/test` starts
//! one); each test works in a schema of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::Parser as _;
use serde_json::{json, Value};
use zerotouch_server::backend::PgBackend;
use zerotouch_server::cli::{self, Cli, Command};
use zerotouch_server::config::{HubSpec, ServeConfig};
use zerotouch_server::server;
use zerotouch_transport::client::{ProvisioningClient, Transport};

const URL_VAR: &str = "ZEROTOUCH_TEST_DATABASE_URL";

/// A fresh schema on the test server, dropped on drop; `url` connects into it.
struct Schema {
    server: String,
    name: String,
    url: String,
}

impl Schema {
    fn new() -> Self {
        let server = std::env::var(URL_VAR).unwrap_or_else(|_| {
            panic!("{URL_VAR} is not set: start a server with `scripts/pg start` or run scripts/test")
        });
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("zt_server_{nanos:x}");
        let mut client = postgres::Client::connect(&server, postgres::NoTls).unwrap();
        client.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        let sep = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{sep}options=-csearch_path%3D{name}");
        Self { server, name, url }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn zerotouch(args: &[&str]) -> Value {
    let cli = Cli::try_parse_from(std::iter::once("zerotouch").chain(args.iter().copied())).unwrap();
    let url = args.iter().position(|a| *a == "--database-url").map(|i| args[i + 1]).unwrap();
    // As the binary opens it: read-only for the commands that only read.
    let read_only = !matches!(
        cli.command,
        Command::Enrollments(cli::EnrollmentsCommand::Import { .. } | cli::EnrollmentsCommand::Delete { .. })
    );
    let backend = PgBackend::for_command(url, read_only).unwrap();
    match cli.command {
        Command::Enrollments(c) => cli::enrollments(&backend, &c).unwrap(),
        Command::Devices(c) => cli::devices(&backend, &c).unwrap(),
        Command::Twins(c) => cli::twins(&backend, &c).unwrap(),
        other => panic!("not a store command: {other:?}"),
    }
}

/// Enrolls `registration_id` with symmetric key `key` (base64) through the admin command, then
/// starts `zerotouch serve` on the schema with `hubs` and registers the device over HTTPS with our
/// client; returns the hub it was assigned to.
fn enroll_and_provision(
    schema: &Schema,
    dir: &std::path::Path,
    hubs: &[&str],
    registration_id: &str,
    key: &str,
) -> String {
    let file = dir.join("enrollments.json");
    let sym = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}});
    std::fs::write(&file, json!([{"registrationId": registration_id, "attestation": sym}]).to_string())
        .unwrap();
    let imported =
        zerotouch(&["enrollments", "import", "--database-url", &schema.url, file.to_str().unwrap()]);
    assert_eq!(imported["imported"]["individualEnrollments"], 1);

    let url = schema.url.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut config = ServeConfig::new(dir);
        config.mqtt_listen = "127.0.0.1:0".parse().unwrap();
        config.https_listen = "127.0.0.1:0".parse().unwrap();
        config.hubs = hubs.iter().map(|h| HubSpec { name: (*h).to_owned(), weight: 1 }).collect();
        let backend = tokio::task::spawn_blocking(move || PgBackend::connect(&url).unwrap()).await.unwrap();
        let handle = server::start(&config, backend).await.unwrap();
        let assignment = ProvisioningClient::builder(handle.id_scope().as_str(), registration_id)
            .provisioning_host(format!("localhost:{}", handle.https_addr().port()))
            .transport(Transport::Https)
            .ca_file(handle.ca_cert().unwrap())
            .unwrap()
            .symmetric_key(key)
            .build()
            .unwrap()
            .register()
            .await
            .unwrap();
        handle.shutdown().await;
        assignment.assigned_hub
    })
}

#[test]
fn a_device_provisions_into_the_postgres_store_and_devices_get_reads_it_back() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let key = STANDARD.encode([0x44u8; 32]);
    let assigned = enroll_and_provision(&schema, dir.path(), &["localhost"], "meter-9", &key);
    assert_eq!(assigned, "localhost");

    let identity = zerotouch(&["devices", "get", "--database-url", &schema.url, "meter-9"]);
    assert_eq!(identity["deviceId"], "meter-9");
    let all = zerotouch(&["devices", "list", "--database-url", &schema.url]);
    assert_eq!(all[0]["hub"], "localhost");
    // Its twin, read one device at a time and a page at a time (PostgreSQL's join).
    let twin = zerotouch(&["twins", "get", "--database-url", &schema.url, "meter-9"]);
    assert_eq!((&twin["deviceId"], &twin["version"]), (&json!("meter-9"), &json!(2)), "{twin:#}");
    assert_eq!(twin["deviceEtag"], identity["etag"], "{twin:#}");
    let twins = zerotouch(&["twins", "list", "--database-url", &schema.url]);
    assert_eq!(twins, json!([{"hub": "localhost", "twin": twin}]));

    // The data directory says where its server's store is: a command given only the directory
    // is refused instead of working on a new, empty SQLite store beside it.
    let marker = std::fs::read_to_string(dir.path().join("store")).unwrap();
    assert_eq!(marker.trim(), "postgresql");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["enrollments", "import", "--data-dir", dir.path().to_str().unwrap()])
        .arg(dir.path().join("enrollments.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("give --database-url"), "{stderr}");
    assert!(!dir.path().join("zerotouch.sqlite").exists());
}

#[test]
fn a_server_with_two_hubs_on_postgres_keeps_each_hubs_devices_apart() {
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::Precondition;
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::DeviceId;
    use zerotouch_server::backend::Backend;

    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let key = STANDARD.encode([0x45u8; 32]);
    let hubs = ["north.localhost", "south.localhost"];
    let assigned = enroll_and_provision(&schema, dir.path(), &hubs, "meter-7", &key);
    assert!(hubs.contains(&assigned.as_str()), "assigned to {assigned}");
    let listed = zerotouch(&["devices", "list", "--database-url", &schema.url]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["hub"], assigned.as_str());

    // The same device id created in the other hub is a second, separate identity.
    let other = hubs.into_iter().find(|h| *h != assigned).unwrap();
    let backend = PgBackend::connect(&schema.url).unwrap();
    assert_eq!(backend.hub_names().unwrap(), hubs);
    let id = DeviceId::new("meter-7").unwrap();
    backend.hub(other).unwrap().identities.put_device(&Device::new(id), &Precondition::MustNotExist).unwrap();
    let listed = zerotouch(&["devices", "list", "--database-url", &schema.url]);
    let mut in_hubs: Vec<&str> =
        listed.as_array().unwrap().iter().map(|d| d["hub"].as_str().unwrap()).collect();
    in_hubs.sort_unstable();
    assert_eq!(in_hubs, hubs);
    let got = zerotouch(&["devices", "get", "--database-url", &schema.url, "--hub", other, "meter-7"]);
    assert_eq!(got["deviceId"], "meter-7");
}

#[test]
fn keys_written_to_postgres_never_reach_the_log_even_at_trace() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let key = STANDARD.encode([0x5au8; 32]);
    let file = dir.path().join("enrollments.json");
    let sym = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}});
    std::fs::write(&file, json!([{"enrollmentGroupId": "secretive", "attestation": sym}]).to_string())
        .unwrap();
    // The first run creates the schema; later imports get the server's notices about it (logged
    // at debug), which shows that verbose logging is on while the keys stay out. The listing
    // opens the database read-only and migrates nothing, so no notice shows its level.
    for (command, level) in [("import", "warn"), ("import", "trace"), ("list", "trace"), ("import", "debug")]
    {
        let mut args = vec!["enrollments", command, "--database-url", &schema.url];
        if command == "import" {
            args.push(file.to_str().unwrap());
        } else {
            args.push("--with-keys");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zerotouch"))
            .args(&args)
            .env("RUST_LOG", level)
            .output()
            .unwrap();
        let logs = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {logs}");
        if command == "import" && level != "warn" {
            assert!(logs.contains("PostgreSQL notice"), "{command} at {level}: debug logs expected:\n{logs}");
        }
        assert!(!logs.contains(&key), "{command} at {level}: the logs show the group key:\n{logs}");
    }
}

#[test]
fn servers_sharing_a_database_serve_one_id_scope_whatever_their_data_directories() {
    let schema = Schema::new();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let scopes: Vec<String> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let url = schema.url.clone();
            runtime.block_on(async {
                let mut config = ServeConfig::new(dir.path());
                // The first is told its scope: the others follow it.
                if i == 0 {
                    config.id_scope = Some(zerotouch_proto::IdScope::new("0ne00FACADE").unwrap());
                }
                config.mqtt_listen = "127.0.0.1:0".parse().unwrap();
                config.https_listen = "127.0.0.1:0".parse().unwrap();
                let backend =
                    tokio::task::spawn_blocking(move || PgBackend::connect(&url).unwrap()).await.unwrap();
                let handle = server::start(&config, backend).await.unwrap();
                let scope = handle.id_scope().to_string();
                handle.shutdown().await;
                scope
            })
        })
        .collect();
    assert_eq!(
        scopes,
        ["0ne00FACADE", "0ne00FACADE"],
        "a device of one server must be able to use the other"
    );
    for dir in &dirs[1..] {
        // The data directory says what is served, for scripts that read it.
        let file = std::fs::read_to_string(dir.path().join("id-scope")).unwrap();
        assert_eq!(file.trim(), scopes[0]);
    }
}

/// Runs the `zerotouch` binary with `args` in a directory of its own, without the environment's
/// database URL.
fn zerotouch_binary(args: &[&str]) -> std::process::Output {
    let cwd = tempfile::tempdir().unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(args)
        .current_dir(cwd.path())
        .env_remove("ZEROTOUCH_DATABASE_URL")
        .output()
        .unwrap()
}

/// The store commands that only read, on the database at `url`.
fn read_commands(url: &str) -> [Vec<&str>; 5] {
    [
        vec!["enrollments", "list", "--database-url", url],
        vec!["devices", "list", "--database-url", url],
        vec!["devices", "get", "--database-url", url, "old-1"],
        vec!["twins", "list", "--database-url", url],
        vec!["twins", "get", "--database-url", url, "old-1"],
    ]
}

/// Every row of the tables `tables` in the schema of `url`, as text.
fn rows(url: &str, tables: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    tables
        .iter()
        .map(|table| {
            let rows =
                client.query(&format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY 1"), &[]).unwrap();
            ((*table).to_owned(), rows.iter().map(|r| r.get(0)).collect())
        })
        .collect()
}

/// The tables in the schema of `url`.
fn tables(url: &str) -> Vec<String> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let query =
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() \
                 ORDER BY 1";
    client.query(query, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

#[test]
fn read_commands_leave_a_database_of_an_older_schema_unmigrated() {
    use zerotouch_store::postgres::{migration_sql, LATEST_SCHEMA_VERSION};

    let schema = Schema::new();
    // A database as servers of the release before left it, which may still be running on it.
    let older = LATEST_SCHEMA_VERSION - 1;
    let mut client = postgres::Client::connect(&schema.url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "CREATE TABLE zerotouch_schema (version integer PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO zerotouch_schema (version, description) VALUES (0, 'baseline');",
        )
        .unwrap();
    for v in 1..=older {
        client.batch_execute(migration_sql(v).unwrap()).unwrap();
        client
            .execute("INSERT INTO zerotouch_schema (version, description) VALUES ($1, 'old')", &[&v])
            .unwrap();
    }
    drop(client);
    let before = tables(&schema.url);
    let versions = rows(&schema.url, &["zerotouch_schema"]);

    for args in read_commands(&schema.url) {
        let out = zerotouch_binary(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("schema version {older}")) && stderr.contains("older"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("zerotouch serve"), "{args:?}: the error says how to migrate: {stderr}");
        assert!(!stderr.contains(&schema.url), "{args:?}: the error shows the URL: {stderr}");
    }
    assert_eq!(rows(&schema.url, &["zerotouch_schema"]), versions, "a read command migrated the database");
    assert_eq!(tables(&schema.url), before);
}

#[test]
fn read_commands_on_a_database_without_zerotouch_say_not_found_and_create_nothing() {
    let schema = Schema::new();
    for args in read_commands(&schema.url) {
        let out = zerotouch_binary(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.contains("no zerotouch store"), "{args:?}: {stderr}");
    }
    assert_eq!(tables(&schema.url), Vec::<String>::new(), "a read command created tables");
}

#[test]
fn read_commands_do_not_move_the_devices_of_the_unnamed_hub() {
    use zerotouch_engine::registry::IdentityStore;
    use zerotouch_engine::store::Precondition;
    use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore};
    use zerotouch_proto::hub::Device;
    use zerotouch_proto::{DeviceId, Timestamp};
    use zerotouch_store::postgres::PgStore;

    let schema = Schema::new();
    // A device of the unnamed hub (written before hubs had names) and one named hub that holds
    // nothing yet: a server opening that hub takes the device into it.
    let store = PgStore::connect(&schema.url, 2).unwrap();
    let old = DeviceId::new("old-1").unwrap();
    store.put_device(&Device::new(old.clone()), &Precondition::MustNotExist).unwrap();
    let twin = TwinDocument::new(Timestamp::from_unix_secs(1_700_000_000));
    store.put_twin(&TwinKey::device(old), &twin, &Precondition::MustNotExist).unwrap();
    drop(store.hub("localhost").unwrap());
    drop(store);
    let watched = ["zerotouch_schema", "devices", "twins", "hubs", "settings"];
    let before = rows(&schema.url, &watched);

    for args in read_commands(&schema.url) {
        let out = zerotouch_binary(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if args[0] == "enrollments" {
            assert!(out.status.success(), "{args:?}: {stderr}");
            continue;
        }
        // Listing the hub without the device would be wrong, moving it is a write: refused.
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("unnamed hub") && stderr.contains("zerotouch serve"), "{args:?}: {stderr}");
    }
    assert_eq!(rows(&schema.url, &watched), before, "a read command wrote to the database");
}

#[test]
fn read_commands_work_on_a_database_a_running_server_writes_to() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let key = STANDARD.encode([0x46u8; 32]);
    let sym = json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}});
    let enroll = |id: &str| {
        let file = dir.path().join(format!("{id}.json"));
        std::fs::write(&file, json!([{"registrationId": id, "attestation": sym}]).to_string()).unwrap();
        let imported =
            zerotouch(&["enrollments", "import", "--database-url", &schema.url, file.to_str().unwrap()]);
        assert_eq!(imported["imported"]["individualEnrollments"], 1);
    };
    let read = |args: &[&str]| -> Value {
        let mut all = args.to_vec();
        all.extend(["--database-url", schema.url.as_str()]);
        let out = zerotouch_binary(&all);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let watched = ["zerotouch_schema", "hubs", "settings"];
    enroll("meter-1");

    let url = schema.url.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let handle = runtime.block_on(async {
        let mut config = ServeConfig::new(dir.path());
        config.mqtt_listen = "127.0.0.1:0".parse().unwrap();
        config.https_listen = "127.0.0.1:0".parse().unwrap();
        config.hubs = vec![HubSpec { name: "localhost".to_owned(), weight: 1 }];
        let backend = tokio::task::spawn_blocking(move || PgBackend::connect(&url).unwrap()).await.unwrap();
        server::start(&config, backend).await.unwrap()
    });
    let register = |id: &str| {
        runtime.block_on(async {
            ProvisioningClient::builder(handle.id_scope().as_str(), id)
                .provisioning_host(format!("localhost:{}", handle.https_addr().port()))
                .transport(Transport::Https)
                .ca_file(handle.ca_cert().unwrap())
                .unwrap()
                .symmetric_key(&key)
                .build()
                .unwrap()
                .register()
                .await
                .unwrap()
        })
    };
    assert_eq!(register("meter-1").assigned_hub, "localhost");
    let before = rows(&schema.url, &watched);

    let devices = read(&["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1, "{devices:#}");
    assert_eq!(
        (&devices[0]["hub"], &devices[0]["identity"]["deviceId"]),
        (&json!("localhost"), &json!("meter-1"))
    );
    let enrollments = read(&["enrollments", "list"]);
    assert_eq!(enrollments[0]["registrationId"], "meter-1", "{enrollments:#}");
    assert_eq!(enrollments[0]["registrationState"]["status"], "assigned", "{enrollments:#}");
    assert_eq!(read(&["twins", "get", "meter-1"])["deviceId"], "meter-1");

    // The server goes on writing; the next reads see it.
    enroll("meter-2");
    assert_eq!(register("meter-2").assigned_hub, "localhost");
    let devices = read(&["devices", "list"]);
    let ids: Vec<&str> =
        devices.as_array().unwrap().iter().map(|d| d["identity"]["deviceId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["meter-1", "meter-2"]);
    assert_eq!(read(&["devices", "get", "meter-2"])["deviceId"], "meter-2");
    assert_eq!(read(&["twins", "list"]).as_array().unwrap().len(), 2);

    runtime.block_on(handle.shutdown());
    assert_eq!(rows(&schema.url, &watched), before, "a read command recorded something");
}
