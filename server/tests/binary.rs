//! The `zerotouch` binary as an operator runs it: store commands' output and errors, `serve`
//! printing its endpoints and stopping cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn zerotouch(args: &[&str]) -> Output {
    zerotouch_logging(args, "warn")
}

fn zerotouch_logging(args: &[&str], rust_log: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zerotouch")).args(args).env("RUST_LOG", rust_log).output().unwrap()
}

/// Writes `json` to `enrollments.json` in `dir` and imports it into `data`, which must succeed.
fn import(dir: &std::path::Path, data: &str, json: &str) {
    let file = dir.join("enrollments.json");
    std::fs::write(&file, json).unwrap();
    let out = zerotouch(&["enrollments", "import", "--data-dir", data, file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn import_of_a_bad_file_names_the_entry_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let file = dir.path().join("bad-enrollments.json");
    std::fs::write(
        &file,
        r#"[{"registrationId": "good-1", "attestation": {"type": "symmetricKey"}},
            {"enrollmentGroupId": "bad", "attestation": {"type": "x509"}}]"#,
    )
    .unwrap();
    let out = zerotouch(&["enrollments", "import", "--data-dir", data, file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains(r#"entry 1: enrollmentGroupId "bad": "#), "{stderr}");
    // The file was checked before the store was opened: none was made.
    assert!(!dir.path().join("zerotouch.sqlite").exists());
    let out = zerotouch(&["enrollments", "list", "--data-dir", data]);
    assert_eq!(out.status.code(), Some(4), "no store: {}", String::from_utf8_lossy(&out.stderr));

    // Into a store that exists, nothing of a bad file is written either.
    import(dir.path(), data, "[]");
    let out = zerotouch(&["enrollments", "import", "--data-dir", data, file.to_str().unwrap()]);
    assert!(!out.status.success());
    let out = zerotouch(&["enrollments", "list", "--data-dir", data]);
    assert!(out.status.success());
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, Value::Array(Vec::new()));
}

/// A missing or malformed import file at a mistyped `--data-dir` makes no store there; either is
/// bad input (exit code 3), so a script tells its file's fault from a failing store.
#[test]
fn an_import_whose_file_is_missing_or_not_json_creates_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("typo");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[{").unwrap();
    for file in [dir.path().join("missing.json"), bad] {
        let out = zerotouch(&[
            "enrollments",
            "import",
            "--data-dir",
            data.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{file:?}: {stderr}");
        let named = if file.ends_with("missing.json") { "missing.json" } else { "JSON array" };
        assert!(stderr.contains(named), "{stderr}");
        assert!(!data.join("zerotouch.sqlite").exists(), "{file:?} made a store");
    }
}

#[test]
fn a_device_id_in_no_hub_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let empty = dir.path().join("none.json");
    std::fs::write(&empty, "[]").unwrap();
    assert!(zerotouch(&["enrollments", "import", "--data-dir", data, empty.to_str().unwrap()])
        .status
        .success());
    let out = zerotouch(&["devices", "get", "--data-dir", data, "nobody"]);
    assert_eq!(out.status.code(), Some(4), "not found has its own exit code");
    assert!(String::from_utf8(out.stderr).unwrap().contains("nobody"));
}

#[test]
fn serve_with_a_config_file_prints_its_endpoints_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("zerotouch.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nid-scope = \"0ne00000001\"\nmqtt-listen = \"127.0.0.1:0\"\n\
             https-listen = \"127.0.0.1:0\"\nhub = [\"plant.localhost:2\"]\n",
            dir.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Served(
        Command::new(env!("CARGO_BIN_EXE_zerotouch"))
            .args(["serve", "--config", config.to_str().unwrap(), "--id-scope", "0ne0000BEEF"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("serve.log")).unwrap()))
            .spawn()
            .unwrap(),
    );
    let mut printed = Vec::new();
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.trim_start().starts_with("data");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(text.contains("id scope 0ne0000BEEF"), "{text}");
    assert!(text.contains("embedded hub      plant.localhost (weight 2)"), "{text}");
    assert!(text.contains(dir.path().join("tls").join("ca.pem").to_str().unwrap()), "{text}");
    // The generated server certificate's path too (issue 5: "paths printed").
    assert!(text.contains(dir.path().join("tls").join("server.pem").to_str().unwrap()), "{text}");
    let stored = std::fs::read_to_string(dir.path().join("id-scope")).unwrap();
    assert_eq!(stored.trim(), "0ne0000BEEF", "the data directory names the scope served");

    assert!(child.terminate(), "serve did not stop cleanly on SIGTERM");
    // Text logs written to a file carry no terminal colour codes.
    let logs = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(logs.contains("serving") && logs.contains("stopped"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "escape codes in a log file: {logs:?}");
}

/// A `zerotouch serve` child, killed when dropped so that a failing test leaves no server behind.
struct Served(std::process::Child);

impl Served {
    /// Stops the server with SIGTERM and waits: whether it exited cleanly.
    fn terminate(mut self) -> bool {
        let sent = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().unwrap();
        sent.success() && self.0.wait().unwrap().success()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `zerotouch serve` on ephemeral ports; returns the child, the MQTT and HTTPS ports.
fn serve(data: &str, scope: &str) -> (Served, u16, u16) {
    serve_logging(data, scope, "warn", Stdio::inherit())
}

/// [`serve`] with `RUST_LOG=rust_log`, JSON log lines written to `logs`.
fn serve_logging(data: &str, scope: &str, rust_log: &str, logs: Stdio) -> (Served, u16, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["serve", "--data-dir", data, "--id-scope", scope, "--log-format", "json"])
        .args(["--mqtt-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(logs)
        .spawn()
        .unwrap();
    let (mut mqtt, mut https) = (0, 0);
    let port = |line: &str| line.rsplit(':').next().unwrap().trim().parse::<u16>().unwrap();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        match line.trim_start() {
            l if l.starts_with("MQTT/TLS") => mqtt = port(l),
            l if l.starts_with("HTTPS, MQTT/WS") => https = port(l),
            l if l.starts_with("data") => break,
            _ => {}
        }
    }
    (Served(child), mqtt, https)
}

#[test]
fn device_register_prints_the_registration_state_and_devices_get_finds_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (server, mqtt, https) = serve_logging(data, "0ne0000CAFE", "info", Stdio::from(log));
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    import(
        dir.path(),
        data,
        &format!(
            r#"[{{"enrollmentGroupId": "pumps",
                  "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}}}}]"#
        ),
    );

    let ca = dir.path().join("tls").join("ca.pem");
    for (transport, port, id) in
        [("mqtt", mqtt, "pump-1"), ("https", https, "pump-2"), ("mqtt-ws", https, "pump-3")]
    {
        let port = format!("localhost:{port}");
        let args = [
            "device",
            "register",
            "--provisioning-host",
            &port,
            "--id-scope",
            "0ne0000CAFE",
            "--registration-id",
            id,
            "--group-key",
            key,
            "--transport",
            transport,
            "--ca",
            ca.to_str().unwrap(),
            "--payload",
            r#"{"model": "p100"}"#,
        ];
        // At the most verbose level, no log line carries the token or a key.
        let out = zerotouch_logging(&args, "trace");
        let logs = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{transport}: {logs}");
        assert!(!logs.is_empty(), "{transport}: trace logs expected");
        for secret in ["sig=", "SharedAccessSignature", key] {
            assert!(!logs.contains(secret), "{transport}: the logs show {secret:?}");
        }
        // Holding tungstenite at debug under trace must not raise it under quieter levels.
        if transport == "mqtt-ws" {
            let quiet = zerotouch_logging(&args, "error");
            assert!(quiet.status.success());
            assert!(quiet.stderr.is_empty(), "{}", String::from_utf8_lossy(&quiet.stderr));
        }
        let state: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(state["assignedHub"], "localhost", "{transport}");
        assert_eq!(state["deviceId"], id);
        assert_eq!(state["status"], "assigned");

        let out = zerotouch(&["devices", "get", "--data-dir", data, id]);
        assert!(out.status.success());
        let identity: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(identity["deviceId"], id);
    }

    // The key may come from the environment instead, out of sight of `ps`.
    let port = format!("localhost:{mqtt}");
    let args = ["device", "register", "--provisioning-host", &port, "--id-scope", "0ne0000CAFE"];
    let out = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(args)
        .args(["--registration-id", "pump-4", "--ca", ca.to_str().unwrap()])
        .env("ZEROTOUCH_GROUP_KEY", key)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["deviceId"], "pump-4");

    // A refusal reads with the service's status and error code; a bad host is the user's setting.
    let https_host = format!("localhost:{https}");
    let wrong_key = zerotouch(&[
        "device",
        "register",
        "--provisioning-host",
        &https_host,
        "--transport",
        "https",
        "--id-scope",
        "0ne0000CAFE",
        "--registration-id",
        "pump-5",
        "--ca",
        ca.to_str().unwrap(),
        "--symmetric-key",
        "d3Jvbmc=",
    ]);
    let stderr = String::from_utf8_lossy(&wrong_key.stderr);
    assert!(stderr.contains("HTTP 401, error 401002"), "{stderr}");
    let bad_host = zerotouch(&[
        "device",
        "register",
        "--provisioning-host",
        "localhost:",
        "--id-scope",
        "0ne0000CAFE",
        "--registration-id",
        "pump-6",
        "--symmetric-key",
        "d3Jvbmc=",
    ]);
    let stderr = String::from_utf8_lossy(&bad_host.stderr);
    assert!(stderr.starts_with("zerotouch: configuration: "), "{stderr}");

    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");
    // The operator's log shows each device where it landed, and the refusal, at info.
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = logs.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let assigned: Vec<&Value> =
        lines.iter().filter(|l| l["fields"]["message"] == "device assigned").map(|l| &l["fields"]).collect();
    let ids: Vec<&str> = assigned.iter().map(|f| f["registration_id"].as_str().unwrap()).collect();
    // pump-3 registered twice (the second time with the client's logs quiet).
    assert_eq!(ids, ["pump-1", "pump-2", "pump-3", "pump-3", "pump-4"], "{logs}");
    assert_eq!(assigned[0]["hub"], "localhost");
    assert_eq!(assigned[0]["device_id"], "pump-1");
    assert_eq!(assigned[0]["substatus"], "initialAssignment");
    assert_eq!(
        (&assigned[0]["enrollment_kind"], &assigned[0]["enrollment"]),
        (&"group".into(), &"pumps".into())
    );
    assert!(logs.contains("401002") && logs.contains("pump-5"), "the refusal names its device: {logs}");
    assert!(!logs.contains(key), "no key in the server's log");
}

#[test]
fn a_listing_piped_into_a_reader_that_stops_early_ends_quietly() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let entries: Vec<serde_json::Value> = (0..3000)
        .map(|i| serde_json::json!({ "registrationId": format!("dev-{i}"), "attestation": { "type": "symmetricKey" } }))
        .collect();
    import(dir.path(), data, &serde_json::to_string(&entries).unwrap());

    // Like `zerotouch enrollments list | head -c 10`: far more than a pipe holds, read 10 bytes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["enrollments", "list", "--data-dir", data])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn reading_commands_on_a_data_directory_without_a_database_say_so_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("zerotouch-dta");
    // A directory that exists but holds no database (a mount point before the backup is there).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for data in [&typo, &empty] {
        let data_arg = data.to_str().unwrap();
        for args in [
            &["enrollments", "list", "--data-dir", data_arg][..],
            &["devices", "list", "--data-dir", data_arg],
            &["devices", "get", "--data-dir", data_arg, "dev-1"],
            &["twins", "get", "--data-dir", data_arg, "dev-1"],
            &["twins", "list", "--data-dir", data_arg],
            &["enrollments", "delete", "--data-dir", data_arg, "--registration-id", "dev-1"],
        ] {
            let out = zerotouch(args);
            assert_eq!(out.status.code(), Some(4), "{args:?}: not found");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let database = data.join("zerotouch.sqlite");
            assert!(stderr.contains(&format!("no store at {}", database.display())), "{args:?}: {stderr}");
        }
    }
    assert!(!typo.exists(), "nothing created at the mistyped path");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing created in the empty directory");
}

/// Every file under `dir` with its size and modification time.
fn files(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<std::path::PathBuf, (u64, std::time::SystemTime)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.insert(entry.path(), (0, meta.modified().unwrap()));
            out.extend(files(&entry.path()));
        } else {
            out.insert(entry.path(), (meta.len(), meta.modified().unwrap()));
        }
    }
    out
}

/// A data directory as enrollment imports and registrations leave it with no server running:
/// the individual enrollment `valve-1`, the group `line-9`, and the device `valve-1` in hub
/// `north.localhost`. No `id-scope`, no `tls/`: only `serve` makes those.
fn stopped_data_dir(dir: &std::path::Path) -> std::path::PathBuf {
    use zerotouch_engine::registry::IdentityStore as _;
    use zerotouch_engine::store::Precondition;
    use zerotouch_engine::twin::{TwinDocument, TwinKey, TwinStore as _};
    use zerotouch_server::backend::Backend as _;

    let data = dir.join("data");
    import(
        dir,
        data.to_str().unwrap(),
        r#"[{"registrationId": "valve-1", "attestation": {"type": "symmetricKey"}},
            {"enrollmentGroupId": "line-9", "attestation": {"type": "symmetricKey"}}]"#,
    );
    let backend = zerotouch_server::backend::SqliteBackend::new(&data);
    let id = zerotouch_proto::DeviceId::new("valve-1").unwrap();
    let device = zerotouch_proto::hub::Device::new(id.clone());
    let hub = backend.hub("north.localhost").unwrap();
    hub.identities.put_device(&device, &Precondition::MustNotExist).unwrap();
    let tags = serde_json::json!({"site": "north"}).as_object().unwrap().clone();
    let twin = TwinDocument::with_initial(
        zerotouch_proto::Timestamp::from_unix_secs(1_767_225_600),
        &tags,
        &Default::default(),
    )
    .unwrap();
    hub.twins.put_twin(&TwinKey::device(id), &twin, &Precondition::MustNotExist).unwrap();
    drop(hub);
    drop(backend);
    data
}

/// The read commands, each with what its output must show.
fn read_commands(data: &str) -> Vec<(Vec<&str>, &'static str)> {
    vec![
        (vec!["enrollments", "list", "--data-dir", data], "line-9"),
        (vec!["enrollments", "list", "--with-keys", "--data-dir", data], "primaryKey"),
        (vec!["devices", "list", "--data-dir", data], "north.localhost"),
        (vec!["devices", "list", "--hub", "north.localhost", "--data-dir", data], "valve-1"),
        (vec!["devices", "get", "--data-dir", data, "valve-1"], "valve-1"),
        (vec!["devices", "get", "--hub", "north.localhost", "--data-dir", data, "valve-1"], "valve-1"),
        (vec!["twins", "get", "--data-dir", data, "valve-1"], "\"site\": \"north\""),
        (vec!["twins", "list", "--data-dir", data], "\"site\": \"north\""),
        (
            vec!["twins", "list", "--hub", "NORTH.localhost", "--data-dir", data],
            "\"hub\": \"north.localhost\"",
        ),
    ]
}

#[test]
fn read_commands_change_no_file_in_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = stopped_data_dir(dir.path());
    let before = files(&data);
    assert_eq!(before.keys().collect::<Vec<_>>(), [&data.join("zerotouch.sqlite")], "{before:?}");
    // Modification times of files written a moment ago could hide a write in the same tick.
    std::thread::sleep(std::time::Duration::from_millis(20));

    for (args, shown) in read_commands(data.to_str().unwrap()) {
        let out = zerotouch(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(shown), "{args:?}");
    }
    // Not found in a hub, or no such hub: still nothing written.
    assert_eq!(
        zerotouch(&["devices", "get", "--data-dir", data.to_str().unwrap(), "nobody"]).status.code(),
        Some(4)
    );
    let out =
        zerotouch(&["devices", "list", "--hub", "south.localhost", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(files(&data), before, "no -wal, no -shm, no id-scope, no tls/, nothing written");
}

/// `chattr +i` on paths, undone when dropped (also when a test fails). Tests run as root, for
/// whom permissions make nothing read-only; an immutable file or directory is read-only to root
/// too.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    /// Makes `dir` and everything in it immutable, or prints why that cannot be done here.
    fn set(dir: &std::path::Path) -> Option<Self> {
        let mut paths: Vec<_> = files(dir).into_keys().collect();
        paths.push(dir.to_owned());
        let mut done = Immutable(Vec::new());
        for path in paths {
            match Command::new("chattr").arg("+i").arg(&path).output() {
                Ok(out) if out.status.success() => done.0.push(path),
                Ok(out) => {
                    eprintln!(
                        "skipped: chattr +i {}: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("skipped: chattr cannot run here: {e}");
                    return None;
                }
            }
        }
        if std::fs::write(dir.join("probe"), b"").is_ok() {
            eprintln!("skipped: an immutable directory still took a new file here");
            return None;
        }
        Some(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

#[test]
fn read_commands_work_on_a_read_only_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = stopped_data_dir(dir.path());
    let Some(_read_only) = Immutable::set(&data) else { return };
    for (args, shown) in read_commands(data.to_str().unwrap()) {
        let out = zerotouch(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(shown), "{args:?}");
    }
}

#[test]
fn read_commands_on_a_store_of_an_older_schema_say_so_and_migrate_nothing() {
    use zerotouch_store::sqlite::SCHEMA_VERSION;
    let dir = tempfile::tempdir().unwrap();
    let data = stopped_data_dir(dir.path());
    let database = data.join("zerotouch.sqlite");
    rusqlite::Connection::open(&database)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION - 1)
        .unwrap();
    let before = files(&data);
    std::thread::sleep(std::time::Duration::from_millis(20));

    for (args, _) in read_commands(data.to_str().unwrap()) {
        let out = zerotouch(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("schema version {}", SCHEMA_VERSION - 1)), "{args:?}: {stderr}");
        assert!(stderr.contains("older") && stderr.contains("zerotouch serve"), "{args:?}: {stderr}");
    }
    assert_eq!(files(&data), before, "migrated or written anyway");
}

#[test]
fn read_commands_beside_a_running_server_see_its_commits_and_add_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (server, _, _) = serve(data, "0ne0000F00D");
    import(dir.path(), data, r#"[{"registrationId": "live-1", "attestation": {"type": "symmetricKey"}}]"#);
    let names = || files(std::path::Path::new(data)).into_keys().collect::<Vec<_>>();
    let before = names();
    let listed: Value =
        serde_json::from_slice(&zerotouch(&["enrollments", "list", "--data-dir", data]).stdout).unwrap();
    assert_eq!(listed[0]["registrationId"], "live-1", "{listed}");
    let out = zerotouch(&["devices", "list", "--data-dir", data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(names(), before, "a read command beside a server made a file");
    // The server and writing commands go on.
    import(dir.path(), data, r#"[{"registrationId": "live-2", "attestation": {"type": "symmetricKey"}}]"#);
    let listed: Value =
        serde_json::from_slice(&zerotouch(&["enrollments", "list", "--data-dir", data]).stdout).unwrap();
    assert_eq!(listed[1]["registrationId"], "live-2", "{listed}");
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");
}

#[test]
fn a_flood_of_refused_requests_writes_a_bounded_number_of_log_lines_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (server, _, https) = serve_logging(data.to_str().unwrap(), "0ne0000F00D", "info", log.into());
    let ca = std::fs::read(data.join("tls").join("ca.pem")).unwrap();

    // Devices nobody enrolled, with a key of their own: each register is refused (404), and each
    // refusal is a line the client chose to cause.
    let refused = |n: usize| {
        let ca = ca.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let tasks = (0..4).map(|task| {
                let ca = ca.clone();
                tokio::spawn(async move {
                    for i in (task..n).step_by(4) {
                        let client = zerotouch_transport::client::ProvisioningClient::builder(
                            "0ne0000F00D",
                            format!("stranger-{i}"),
                        )
                        .provisioning_host(format!("localhost:{https}"))
                        .transport(zerotouch_transport::client::Transport::Https)
                        .ca_pem(ca.clone())
                        .symmetric_key("c3RyYW5nZXJzIG93biBrZXkgb2YgMzIgYnl0ZXMhISE=")
                        .build()
                        .unwrap();
                        let refused = client.register().await.unwrap_err();
                        assert_eq!(refused.status(), Some(404), "{refused}");
                    }
                })
            });
            for task in tasks.collect::<Vec<_>>() {
                task.await.unwrap();
            }
        });
    };
    let started = std::time::Instant::now();
    let flood = 200;
    refused(flood);
    let seconds = started.elapsed().as_secs();
    // Stopping reports how many were held back since the last line.
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");

    let lines: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let message = |line: &Value| line["fields"]["message"].as_str().unwrap_or_default().to_owned();
    let logged = lines.iter().filter(|l| message(l) == "https request refused").count();
    let held_back: u64 = lines
        .iter()
        .filter(|l| message(l).contains("held back"))
        .map(|l| l["fields"]["held_back"].as_u64().unwrap())
        .sum();
    let bound = 20 * (usize::try_from(seconds).unwrap() + 3);
    assert!(logged <= bound, "{logged} refusal lines in {seconds} s, at most {bound} expected");
    assert_eq!(logged + usize::try_from(held_back).unwrap(), flood, "every refusal logged or counted");
}

#[test]
fn a_stopped_server_leaves_everything_in_the_database_file_so_copying_it_is_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (server, _, https) = serve(data, "0ne0000D00D");
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    import(
        dir.path(),
        data,
        &format!(
            r#"[{{"registrationId": "valve-1", "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}}}}]"#
        ),
    );
    let ca = dir.path().join("data").join("tls").join("ca.pem");
    let host = format!("localhost:{https}");
    let registered = zerotouch(&[
        "device",
        "register",
        "--provisioning-host",
        &host,
        "--transport",
        "https",
        "--id-scope",
        "0ne0000D00D",
        "--registration-id",
        "valve-1",
        "--symmetric-key",
        key,
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert!(registered.status.success(), "{}", String::from_utf8_lossy(&registered.stderr));
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");

    // Only the database file, without its write-ahead log.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(dir.path().join("data").join("zerotouch.sqlite"), copy.join("zerotouch.sqlite")).unwrap();
    let copy = copy.to_str().unwrap();
    let listed = zerotouch(&["enrollments", "list", "--data-dir", copy]);
    let enrollments: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(enrollments[0]["registrationId"], "valve-1", "{enrollments}");
    // As a DPS read of the enrollment shows it: with its device's registration.
    assert_eq!(enrollments[0]["registrationState"]["status"], "assigned", "{enrollments}");
    assert_eq!(enrollments[0]["registrationState"]["deviceId"], "valve-1", "{enrollments}");
    let device = zerotouch(&["devices", "get", "--data-dir", copy, "valve-1"]);
    assert!(device.status.success(), "{}", String::from_utf8_lossy(&device.stderr));
}

#[test]
fn an_id_scope_flag_that_replaces_the_kept_one_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (first, _, _) = serve(data, "0ne0000AAAA");
    assert!(first.terminate());
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let (second, _, _) = serve_logging(data, "0ne0000BBBB", "warn", log.into());
    assert!(second.terminate());
    let logs = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    let warned =
        logs.lines().any(|l| l.contains("0ne0000AAAA") && l.contains("0ne0000BBBB") && l.contains("WARN"));
    assert!(warned, "{logs}");
    let kept = std::fs::read_to_string(dir.path().join("data").join("id-scope")).unwrap();
    assert_eq!(kept.trim(), "0ne0000BBBB");

    // A difference in case only is the same scope: no warning. A broken file is repaired.
    let log = std::fs::File::create(dir.path().join("serve2.log")).unwrap();
    let (third, _, _) = serve_logging(data, "0NE0000BBBB", "warn", log.into());
    assert!(third.terminate());
    let logs = std::fs::read_to_string(dir.path().join("serve2.log")).unwrap();
    assert!(!logs.contains("replaces"), "{logs}");
    std::fs::write(dir.path().join("data").join("id-scope"), "garbage\n").unwrap();
    let (fourth, _, _) = serve(data, "0ne0000CCCC");
    assert!(fourth.terminate(), "the flag did not repair a broken id-scope file");
    let kept = std::fs::read_to_string(dir.path().join("data").join("id-scope")).unwrap();
    assert_eq!(kept.trim(), "0ne0000CCCC");
}

#[test]
fn serve_keeps_running_when_its_standard_output_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["serve", "--data-dir", data.to_str().unwrap()])
        .args(["--mqtt-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    // Started once the data directory has its certificates; then give it a moment to print.
    for _ in 0..100 {
        if data.join("tls").join("server.pem").is_file() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(matches!(child.try_wait(), Ok(None)), "serve ended when its standard output closed");
    let server = Served(child);
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");
}

#[test]
fn an_import_with_no_server_running_leaves_its_enrollments_in_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    import(dir.path(), data, r#"[{"enrollmentGroupId": "line-9", "attestation": {"type": "symmetricKey"}}]"#);
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(dir.path().join("data").join("zerotouch.sqlite"), copy.join("zerotouch.sqlite")).unwrap();
    let listed = zerotouch(&["enrollments", "list", "--data-dir", copy.to_str().unwrap()]);
    let enrollments: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(enrollments[0]["enrollmentGroupId"], "line-9", "{enrollments}");
}

#[test]
fn the_database_url_may_come_from_the_environment_and_is_not_shown_in_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["enrollments", "list"])
        .env("ZEROTOUCH_DATABASE_URL", "postgres://nobody:S3cret@127.0.0.1:1/none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("PostgreSQL"), "{stderr}");
    assert!(!stderr.contains("S3cret"), "{stderr}");
    let help = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["serve", "--help"])
        .env("ZEROTOUCH_DATABASE_URL", "postgres://nobody:S3cret@127.0.0.1:1/none")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("ZEROTOUCH_DATABASE_URL") && !help.contains("S3cret"), "{help}");

    // An exported URL does not quietly win over a data directory typed for the command.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["enrollments", "list", "--data-dir", dir.path().to_str().unwrap()])
        .env("ZEROTOUCH_DATABASE_URL", "postgres://nobody:S3cret@127.0.0.1:1/none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("unset the variable"), "{stderr}");

    // A directory whose server keeps its store in PostgreSQL says so to every store command.
    std::fs::write(dir.path().join("store"), "postgresql\n").unwrap();
    for args in [
        &["enrollments", "list"][..],
        &["devices", "list"],
        &["enrollments", "delete", "--registration-id", "d"],
    ] {
        let out = zerotouch(&[args, &["--data-dir", dir.path().to_str().unwrap()]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("give --database-url"), "{args:?}: {stderr}");
    }
}

#[test]
fn enrollments_delete_removes_one_enrollment_and_says_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    import(
        dir.path(),
        data,
        r#"[{"registrationId": "pump-1", "attestation": {"type": "symmetricKey"}},
            {"enrollmentGroupId": "pumps", "attestation": {"type": "symmetricKey"}}]"#,
    );
    let out = zerotouch(&["enrollments", "delete", "--data-dir", data, "--enrollment-group-id", "pumps"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value =
        serde_json::from_slice(&zerotouch(&["enrollments", "list", "--data-dir", data]).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["registrationId"], "pump-1");
    let again = zerotouch(&["enrollments", "delete", "--data-dir", data, "--enrollment-group-id", "pumps"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(!zerotouch(&["enrollments", "delete", "--data-dir", data]).status.success(), "an id is required");
}

#[test]
fn a_registration_that_cannot_be_allocated_shows_as_failed_in_the_enrollment_listing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let log_path = dir.path().join("serve.log");
    let log = Stdio::from(std::fs::File::create(&log_path).unwrap());
    let (server, mqtt, _) = serve_logging(data, "0ne0000FA11", "info", log);
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    // Static allocation to a hub this server does not have.
    import(
        dir.path(),
        data,
        &format!(
            r#"[{{"registrationId": "gate-1", "allocationPolicy": "static", "iotHubs": ["elsewhere.example.net"],
                  "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}}}}]"#
        ),
    );
    let ca = dir.path().join("tls").join("ca.pem");
    let host = format!("localhost:{mqtt}");
    let args = ["device", "register", "--provisioning-host", &host, "--id-scope", "0ne0000FA11"];
    let out = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(args)
        .args(["--registration-id", "gate-1", "--symmetric-key", key, "--ca", ca.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400209"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let listed = zerotouch(&["enrollments", "list", "--data-dir", data]);
    let enrollments: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let state = &enrollments[0]["registrationState"];
    assert_eq!(state["status"], "failed", "{enrollments}");
    assert_eq!(state["errorCode"], 400209, "{enrollments}");
    assert!(state["errorMessage"].as_str().unwrap().contains("elsewhere.example.net"), "{enrollments}");
    assert!(state.get("assignedHub").is_none(), "{enrollments}");
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");
    // The operator's log says why, in a line whose text is still "registration failed".
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let failed: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["fields"]["message"] == "registration failed")
        .collect();
    assert_eq!(failed.len(), 1, "{logs}");
    assert_eq!(failed[0]["fields"]["registration_id"], "gate-1");
    assert_eq!(failed[0]["fields"]["error_code"], 400209);
    assert!(
        failed[0]["fields"]["error_message"].as_str().unwrap().contains("elsewhere.example.net"),
        "{logs}"
    );
}

#[test]
fn a_device_that_refuses_the_server_certificate_shows_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let log_path = dir.path().join("serve.log");
    let log = Stdio::from(std::fs::File::create(&log_path).unwrap());
    let (server, mqtt, _) = serve_logging(data, "0ne0000FA12", "info", log);
    let host = format!("localhost:{mqtt}");
    // No --ca: the device checks the development certificate against the system's roots.
    let out = zerotouch(&[
        "device",
        "register",
        "--provisioning-host",
        &host,
        "--id-scope",
        "0ne0000FA12",
        "--registration-id",
        "gate-2",
        "--symmetric-key",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    ]);
    assert!(!out.status.success());
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let refused = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("TLS handshake refused")));
    let refused = refused.unwrap_or_else(|| panic!("no line about the refused handshake in {logs}"));
    assert_eq!(refused["level"], "INFO");
    assert!(refused["fields"]["error"].as_str().unwrap().contains("alert"), "{refused}");
}

#[test]
fn device_register_exit_codes_tell_refused_from_not_found_from_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    import(
        dir.path(),
        data,
        &format!(
            r#"[{{"registrationId": "exit-1", "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}}}}]"#
        ),
    );
    let (server, _, https) = serve(data, "0ne0000E417");
    let ca = dir.path().join("tls").join("ca.pem");
    let host = format!("localhost:{https}");
    let register_trusting = |ca: &std::path::Path, scope: &str, key: &str, host: &str, extra: &[&str]| {
        let mut args = vec!["device", "register", "--transport", "https", "--provisioning-host", host];
        args.extend(["--id-scope", scope, "--registration-id", "exit-1", "--symmetric-key", key]);
        args.extend(["--ca", ca.to_str().unwrap(), "--registration-timeout", "20"]);
        args.extend(extra);
        zerotouch(&args).status.code()
    };
    let register =
        |scope: &str, key: &str, host: &str, extra: &[&str]| register_trusting(&ca, scope, key, host, extra);
    let wrong = "MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=";
    assert_eq!(register("0ne0000E417", key, &host, &[]), Some(0));
    assert_eq!(register("0ne0000E417", wrong, &host, &[]), Some(5), "a refused key");
    assert_eq!(register("0ne00000000", key, &host, &[]), Some(4), "an unknown ID scope");
    assert_eq!(register("0ne0000E417", key, &host, &["--payload", "{not json"]), Some(3), "bad input");
    // Review diff13 #9: neither is cured by waiting, so neither is "try again later" (6).
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, zerotouch_testkit::certs::TestCa::root("another root").pem()).unwrap();
    let untrusted = register_trusting(&other_ca, "0ne0000E417", key, &host, &[]);
    assert_eq!(untrusted, Some(5), "a certificate not trusted");
    let nowhere = "zerotouch-test.invalid:8443";
    let resolver_down = std::net::ToSocketAddrs::to_socket_addrs(nowhere)
        .is_err_and(|e| e.to_string().to_ascii_lowercase().contains("temporary failure"));
    if !resolver_down {
        assert_eq!(register("0ne0000E417", key, nowhere, &[]), Some(3), "a host that does not resolve");
    }
    // Review docs15 #3: an unenrolled id is "not found" (4) only while no symmetric-key group
    // could cover it; once one could, it is refused as a wrong key is (5): DPS cannot tell them
    // apart.
    let unenrolled = || {
        let mut args = vec!["device", "register", "--transport", "https", "--provisioning-host", &host];
        args.extend(["--id-scope", "0ne0000E417", "--registration-id", "nobody", "--symmetric-key", key]);
        args.extend(["--ca", ca.to_str().unwrap(), "--registration-timeout", "20"]);
        zerotouch(&args).status.code()
    };
    assert_eq!(unenrolled(), Some(4), "no enrollment, and no group that could cover it");
    import(dir.path(), data, r#"[{"enrollmentGroupId": "any", "attestation": {"type": "symmetricKey"}}]"#);
    assert_eq!(unenrolled(), Some(5), "no enrollment, but a group that could cover it");
    assert!(server.terminate());
    assert_eq!(register("0ne0000E417", key, &host, &[]), Some(6), "nothing listening any more");
}

#[test]
fn with_json_logs_every_line_on_stderr_is_json_errors_and_import_warnings_included() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let file = dir.path().join("enrollments.json");
    // Imports `entries` with JSON logs: the exit code and the (level, message) of each line.
    let import_json = |entries: &str| -> (Option<i32>, Vec<(String, String)>) {
        std::fs::write(&file, entries).unwrap();
        let args = ["--log-format", "json", "enrollments", "import", "--data-dir", data];
        let out = zerotouch(&[&args[..], &[file.to_str().unwrap()]].concat());
        let lines = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect(l))
            .map(|l| {
                (l["level"].as_str().unwrap().to_owned(), l["fields"]["message"].as_str().unwrap().to_owned())
            })
            .collect();
        (out.status.code(), lines)
    };
    // A warning (custom allocation), then success.
    let (code, lines) = import_json(
        r#"[{"registrationId": "c-1", "allocationPolicy": "custom", "attestation": {"type": "symmetricKey"}}]"#,
    );
    assert_eq!(code, Some(0));
    assert!(lines.iter().any(|(level, message)| level == "WARN" && message.contains("custom")), "{lines:?}");
    // A fatal error.
    let (code, lines) = import_json(r#"[{"registrationId": "c-2"}]"#);
    assert_eq!(code, Some(3));
    assert!(
        lines.iter().any(|(level, message)| level == "ERROR" && message.contains("entry 0")),
        "{lines:?}"
    );
}

#[test]
fn store_commands_read_the_store_from_the_servers_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let config = etc.join("zerotouch.toml");
    // Relative to the file's folder, as for serve.
    std::fs::write(&config, "data-dir = \"state\"\n").unwrap();
    let file = dir.path().join("enrollments.json");
    std::fs::write(&file, r#"[{"registrationId": "cfg-1", "attestation": {"type": "symmetricKey"}}]"#)
        .unwrap();
    let config = config.to_str().unwrap();
    let out = zerotouch(&["enrollments", "import", "--config", config, file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(etc.join("state").join("zerotouch.sqlite").is_file());
    let listed: Value =
        serde_json::from_slice(&zerotouch(&["enrollments", "list", "--config", config]).stdout).unwrap();
    assert_eq!(listed[0]["registrationId"], "cfg-1");
    // A flag still wins over the file.
    let other = dir.path().join("other");
    let out = zerotouch(&["devices", "list", "--config", config, "--data-dir", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "no store in the flag's directory");
}

#[test]
fn twins_get_prints_the_twin_a_registration_created_from_the_enrollments_initial_twin() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (server, mqtt, _) = serve(data, "0ne0000A1B2");
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    import(
        dir.path(),
        data,
        &format!(
            r#"[{{"registrationId": "boiler-1",
                  "attestation": {{"type": "symmetricKey", "symmetricKey": {{"primaryKey": "{key}", "secondaryKey": "{key}"}}}},
                  "initialTwin": {{"tags": {{"site": "oslo"}},
                                  "properties": {{"desired": {{"setpoint": {{"celsius": 21}}}}}}}}}}]"#
        ),
    );
    let ca = dir.path().join("tls").join("ca.pem");
    let host = format!("localhost:{mqtt}");
    let registered = zerotouch(&[
        "device",
        "register",
        "--provisioning-host",
        &host,
        "--id-scope",
        "0ne0000A1B2",
        "--registration-id",
        "boiler-1",
        "--symmetric-key",
        key,
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert!(registered.status.success(), "{}", String::from_utf8_lossy(&registered.stderr));
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");

    let out = zerotouch(&["twins", "get", "--data-dir", data, "boiler-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let twin: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The service API's twin (hub spec §5.1): a fresh twin's versions and etag, the identity's
    // fields, the initial twin's tags and desired properties with their metadata.
    assert_eq!(twin["deviceId"], "boiler-1", "{twin:#}");
    assert_eq!(twin["etag"], "AAAAAAAAAAE=", "{twin:#}");
    assert_eq!(twin["version"], 2, "{twin:#}");
    assert_eq!(twin["status"], "enabled", "{twin:#}");
    assert_eq!(twin["authenticationType"], "sas", "{twin:#}");
    assert!(twin["deviceEtag"].is_string(), "{twin:#}");
    assert_eq!(twin["capabilities"], serde_json::json!({"iotEdge": false}), "{twin:#}");
    assert_eq!(twin["modelId"], "", "no IoT Plug and Play model announced: {twin:#}");
    assert_eq!(twin["tags"], serde_json::json!({"site": "oslo"}), "{twin:#}");
    let desired = &twin["properties"]["desired"];
    assert_eq!(desired["setpoint"], serde_json::json!({"celsius": 21}), "{twin:#}");
    assert_eq!(desired["$version"], 1, "{twin:#}");
    assert_eq!(desired["$metadata"]["setpoint"]["celsius"]["$lastUpdatedVersion"], 1, "{twin:#}");
    assert!(desired["$metadata"]["$lastUpdated"].is_string(), "{twin:#}");
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["$version"], 1, "{twin:#}");
    assert!(reported["$metadata"]["$lastUpdated"].is_string(), "{twin:#}");
    assert!(twin.get("moduleId").is_none(), "{twin:#}");

    // Every device twin, with its hub, as `devices list` lists identities.
    let out = zerotouch(&["twins", "list", "--data-dir", data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([{"hub": "localhost", "twin": twin}]));
    let out = zerotouch(&["twins", "list", "--data-dir", data, "--hub", "elsewhere.example"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));

    // Not found: exit code 4, naming what was looked for.
    let out = zerotouch(&["twins", "get", "--data-dir", data, "boiler-2"]);
    assert_eq!(out.status.code(), Some(4), "not found has its own exit code");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end(), "zerotouch: not found: device boiler-2 is in no embedded hub");
    let out = zerotouch(&["twins", "get", "--data-dir", data, "boiler-1", "--module", "pump"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("module pump") && stderr.contains("boiler-1"), "{stderr}");
    let out = zerotouch(&["twins", "get", "--data-dir", data, "bad id"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_takes_its_log_format_from_the_config_file_unless_the_flag_gives_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("zerotouch.toml");
    std::fs::write(
        &config,
        "data-dir = \"data\"\nmqtt-listen = \"127.0.0.1:0\"\nhttps-listen = \"127.0.0.1:0\"\nlog-format = \"json\"\n",
    )
    .unwrap();
    // Runs serve with `flags` until it has started, stops it; its log lines.
    let served = |flags: &[&str], name: &str| -> Vec<String> {
        let log = dir.path().join(name);
        let mut child = Served(
            Command::new(env!("CARGO_BIN_EXE_zerotouch"))
                .args(flags)
                .args(["serve", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                .spawn()
                .unwrap(),
        );
        for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
            if line.unwrap().trim_start().starts_with("data") {
                break;
            }
        }
        assert!(child.terminate(), "serve did not stop cleanly on SIGTERM");
        let lines: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_owned).collect();
        assert!(lines.len() >= 2, "{lines:?}");
        lines
    };
    for line in served(&[], "file.log") {
        let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed["fields"]["message"].is_string(), "{line}");
    }
    // The flag wins over the file.
    for line in served(&["--log-format", "text"], "flag.log") {
        assert!(serde_json::from_str::<Value>(&line).is_err(), "a JSON line under --log-format text: {line}");
        assert!(line.contains(" INFO ") || line.contains(" WARN "), "{line}");
    }

    // A bad value is refused, as a misspelt key still is.
    for (text, expected) in
        [("log-format = \"yaml\"\n", "line 1: "), ("log-fromat = \"json\"\n", "log-fromat")]
    {
        std::fs::write(&config, text).unwrap();
        let out = zerotouch(&["serve", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("zerotouch: configuration: ") && stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn serve_reads_a_config_file_given_as_a_pipe_once() {
    use std::io::Write as _;
    // A pipe (`--config <(…)`, `/dev/stdin`) can be read once: the log format and the settings
    // must come from that one read. A misspelt key in it is refused as in a plain file.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
        .args(["serve", "--config", "/dev/stdin"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let text = format!(
        "log-format = \"json\"\ndata-dir = {:?}\nmqtt-listen = \"127.0.0.1:0\"\n\
         https-listen = \"127.0.0.1:0\"\ndata-drr = \"x\"\n",
        dir.path().join("data")
    );
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("serve started with a config read from a pipe that has a misspelt key");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("data-drr"), "{stderr}");
}

/// Certificate and key files swapped, or one of them of the wrong kind: the error names the
/// flag and the file, before any connection.
#[test]
fn device_register_names_the_flag_and_file_of_a_certificate_or_key_of_the_wrong_kind() {
    let dir = tempfile::tempdir().unwrap();
    let device = zerotouch_testkit::certs::TestCa::root("Swap Root").device("swap-1");
    let (cert, key) = (dir.path().join("device.pem"), dir.path().join("device.key"));
    std::fs::write(&cert, device.chain_pem()).unwrap();
    std::fs::write(&key, device.key_pem()).unwrap();
    let register = |cert: &std::path::Path, key: &std::path::Path| {
        let args = ["device", "register", "--provisioning-host", "localhost:9", "--id-scope", "0ne0000CAFE"];
        let out = Command::new(env!("CARGO_BIN_EXE_zerotouch"))
            .args(args)
            .args(["--registration-id", "swap-1", "--cert", cert.to_str().unwrap(), "--key"])
            .arg(key)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let swapped = register(&key, &cert);
    assert!(swapped.contains("--cert") && swapped.contains(key.to_str().unwrap()), "{swapped}");
    let key_is_cert = register(&cert, &cert);
    assert!(key_is_cert.contains("--key") && key_is_cert.contains(cert.to_str().unwrap()), "{key_is_cert}");
    let encrypted = dir.path().join("encrypted.key");
    std::fs::write(
        &encrypted,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let refused = register(&cert, &encrypted);
    assert!(refused.contains("--key") && refused.contains("encrypted"), "{refused}");
}

/// The sample file the README points to (`examples/enrollments.json`) imports without a warning,
/// and its enrollments provision as the README says: the individual one with the key the import
/// generated, a device of the symmetric-key group with the group's generated key
/// (`--group-key`), each with its entry's initial twin; the X.509 group keeps its certificate.
#[test]
fn the_sample_enrollment_file_imports_cleanly_and_its_enrollments_provision() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (server, mqtt, https) = serve(data, "0ne0000E1E1");
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/enrollments.json");
    let out = zerotouch(&["enrollments", "import", "--data-dir", data, sample]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr, "", "the sample imports without a warning");
    let imported: Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary = &imported["imported"];
    assert_eq!(summary["individualEnrollments"], 1, "{summary:#}");
    assert_eq!(summary["enrollmentGroups"], 2, "{summary:#}");
    let generated = |field: &str, id: &str| -> String {
        let keys = summary["generatedKeys"].as_array().unwrap();
        let keys = keys.iter().find(|k| k[field] == id).unwrap_or_else(|| panic!("{id}: {summary:#}"));
        keys["primaryKey"].as_str().unwrap().to_owned()
    };
    let (boiler_key, group_key) =
        (generated("registrationId", "boiler-01"), generated("enrollmentGroupId", "thermostats"));

    let listed: Value =
        serde_json::from_slice(&zerotouch(&["enrollments", "list", "--data-dir", data]).stdout).unwrap();
    let cameras = listed.as_array().unwrap().iter().find(|e| e["enrollmentGroupId"] == "cameras").unwrap();
    let info = &cameras["attestation"]["x509"]["signingCertificates"]["primary"]["info"];
    assert!(info["subjectName"].as_str().unwrap().contains("zerotouch example CA"), "{cameras:#}");

    let ca = dir.path().join("tls").join("ca.pem");
    let (mqtt_host, https_host) = (format!("localhost:{mqtt}"), format!("localhost:{https}"));
    for (id, flag, key, host, transport) in [
        ("boiler-01", "--symmetric-key", &boiler_key, &mqtt_host, "mqtt"),
        ("thermostat-7", "--group-key", &group_key, &https_host, "https"),
    ] {
        let out = zerotouch(&[
            "device",
            "register",
            "--provisioning-host",
            host,
            "--transport",
            transport,
            "--id-scope",
            "0ne0000E1E1",
            "--registration-id",
            id,
            flag,
            key,
            "--ca",
            ca.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(server.terminate(), "serve did not stop cleanly on SIGTERM");

    let twin = |id: &str| -> Value {
        let out = zerotouch(&["twins", "get", "--data-dir", data, id]);
        assert!(out.status.success(), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let boiler = twin("boiler-01");
    assert_eq!(boiler["tags"], serde_json::json!({"site": "oslo", "kind": "boiler"}), "{boiler:#}");
    assert_eq!(boiler["properties"]["desired"]["setpoint"], serde_json::json!({"celsius": 21}), "{boiler:#}");
    let thermostat = twin("thermostat-7");
    assert_eq!(thermostat["tags"], serde_json::json!({"kind": "thermostat"}), "{thermostat:#}");
    assert_eq!(thermostat["properties"]["desired"]["setpoint"], serde_json::json!({"celsius": 20}));
}
