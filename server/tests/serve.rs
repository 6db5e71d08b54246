//! `zerotouch serve` end to end, in process and as the binary: enrollments imported through the
//! CLI code path, devices provisioned over the wire with our client, identities read back with
//! `devices get`, restarts that keep the ID scope and certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::Parser as _;
use serde_json::{json, Value};
use zerotouch_server::backend::SqliteBackend;
use zerotouch_server::cli::{self, Cli, Command};
use zerotouch_server::config::{HubSpec, ServeConfig};
use zerotouch_server::server::{self, ServerHandle};
use zerotouch_testkit::certs::TestCa;
use zerotouch_transport::client::{ProvisioningClient, Transport};

const DEVICE_KEY: [u8; 32] = [0x11; 32];
const GROUP_KEY: [u8; 32] = [0x22; 32];

fn ephemeral(dir: &Path, hubs: &[&str]) -> ServeConfig {
    let mut config = ServeConfig::new(dir);
    config.mqtt_listen = "127.0.0.1:0".parse().unwrap();
    config.https_listen = "127.0.0.1:0".parse().unwrap();
    if !hubs.is_empty() {
        config.hubs = hubs.iter().map(|h| HubSpec::parse(h).unwrap()).collect();
    }
    config
}

async fn start(dir: &Path, hubs: &[&str]) -> ServerHandle<SqliteBackend> {
    server::start(&ephemeral(dir, hubs), SqliteBackend::new(dir)).await.unwrap()
}

/// Runs a store sub-command the way the binary parses and executes it, returning its JSON.
fn zerotouch(args: &[&str]) -> Value {
    let cli = Cli::try_parse_from(std::iter::once("zerotouch").chain(args.iter().copied())).unwrap();
    let dir = args.iter().position(|a| *a == "--data-dir").map(|i| args[i + 1]).unwrap();
    let backend = SqliteBackend::new(dir);
    match cli.command {
        Command::Enrollments(c) => cli::enrollments(&backend, &c).unwrap(),
        Command::Devices(c) => cli::devices(&backend, &c).unwrap(),
        other => panic!("not a store command: {other:?}"),
    }
}

fn write_enrollments(dir: &Path, line: &TestCa) -> String {
    let file = dir.join("enrollments.json");
    let key = |k: &[u8]| json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": STANDARD.encode(k), "secondaryKey": STANDARD.encode(k)}});
    let entries = json!([
        {"registrationId": "boiler-1", "attestation": key(&DEVICE_KEY), "initialTwin": {"tags": {"site": "north"}}},
        {"enrollmentGroupId": "thermostats", "attestation": key(&GROUP_KEY)},
        {"enrollmentGroupId": "cameras", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": line.pem()}}}}},
    ]);
    std::fs::write(&file, serde_json::to_vec_pretty(&entries).unwrap()).unwrap();
    file.to_str().unwrap().to_owned()
}

fn client(
    handle: &ServerHandle<SqliteBackend>,
    registration_id: &str,
    transport: Transport,
) -> zerotouch_transport::client::ProvisioningClientBuilder {
    let port = match transport {
        Transport::Mqtt => handle.mqtt_addr().port(),
        _ => handle.https_addr().port(),
    };
    ProvisioningClient::builder(handle.id_scope().as_str(), registration_id)
        .provisioning_host(format!("localhost:{port}"))
        .transport(transport)
        .ca_file(handle.ca_cert().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_devices_provision_over_every_transport_and_land_in_the_hub_registry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let handle = start(dir.path(), &[]).await;
    let line = TestCa::root("Plant Root CA").intermediate("Line 1 CA");
    let file = write_enrollments(dir.path(), &line);

    let imported = zerotouch(&["enrollments", "import", "--data-dir", data, &file]);
    assert_eq!(
        imported["imported"],
        json!({"individualEnrollments": 1, "enrollmentGroups": 2, "replaced": 0})
    );
    let listed = zerotouch(&["enrollments", "list", "--data-dir", data]);
    assert_eq!(listed.as_array().unwrap().len(), 3);

    let boiler = client(&handle, "boiler-1", Transport::Mqtt).symmetric_key(STANDARD.encode(DEVICE_KEY));
    let thermostat = client(&handle, "thermostat-7", Transport::Https).group_key(STANDARD.encode(GROUP_KEY));
    let camera_cert = line.device("camera-3");
    let camera = client(&handle, "camera-3", Transport::MqttWs)
        .x509_pem(camera_cert.chain_pem(), camera_cert.key_pem().as_bytes().to_vec());
    // Concurrently: every register is answered `assigning` with retry-after 3 s, as DPS does.
    let mut registering = tokio::task::JoinSet::new();
    for (builder, id) in [(boiler, "boiler-1"), (thermostat, "thermostat-7"), (camera, "camera-3")] {
        registering.spawn(async move { (id, builder.build().unwrap().register().await) });
    }
    while let Some(joined) = registering.join_next().await {
        let (id, assignment) = joined.unwrap();
        let assignment = assignment.unwrap();
        assert_eq!(assignment.assigned_hub, "localhost", "{id}");
        assert_eq!(assignment.device_id, id);
    }

    let boiler = zerotouch(&["devices", "get", "--data-dir", data, "boiler-1"]);
    assert_eq!(boiler["deviceId"], "boiler-1");
    assert_eq!(boiler["authentication"]["type"], "sas");
    assert_eq!(boiler["status"], "enabled");
    let camera = zerotouch(&["devices", "get", "--data-dir", data, "camera-3"]);
    assert_eq!(camera["authentication"]["type"], "selfSigned");
    let all = zerotouch(&["devices", "list", "--data-dir", data]);
    let ids: Vec<&str> =
        all.as_array().unwrap().iter().map(|d| d["identity"]["deviceId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["boiler-1", "camera-3", "thermostat-7"]);
    assert!(all.as_array().unwrap().iter().all(|d| d["hub"] == "localhost"));
    // The list leaves the devices' keys out unless asked for them (`get` shows one device's).
    let keys = |d: &Value| d["identity"]["authentication"]["symmetricKey"].clone();
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .all(|d| keys(d) == json!({"primaryKey": null, "secondaryKey": null})));
    let with_keys = zerotouch(&["devices", "list", "--with-keys", "--data-dir", data]);
    assert_eq!(keys(&with_keys[0]), boiler["authentication"]["symmetricKey"]);
    assert!(boiler["authentication"]["symmetricKey"]["primaryKey"].is_string());

    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_over_the_wire_and_creates_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let handle = start(dir.path(), &[]).await;
    let file = write_enrollments(dir.path(), &TestCa::root("Unused CA"));
    zerotouch(&["enrollments", "import", "--data-dir", data, &file]);

    let wrong = STANDARD.encode([0x33u8; 32]);
    let over_mqtt = client(&handle, "boiler-1", Transport::Mqtt)
        .symmetric_key(wrong.as_str())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap_err();
    assert!(over_mqtt.to_string().contains("not authorized"), "{over_mqtt}");
    let over_https = client(&handle, "boiler-1", Transport::Https)
        .symmetric_key(wrong.as_str())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap_err();
    assert!(over_https.to_string().contains("unauthorized"), "{over_https}");
    assert_eq!(zerotouch(&["devices", "list", "--data-dir", data]), json!([]));
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_hubs_each_keep_their_own_registry() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let handle = start(dir.path(), &["north.localhost:1", "south.localhost:3"]).await;
    let file = write_enrollments(dir.path(), &TestCa::root("Unused CA"));
    zerotouch(&["enrollments", "import", "--data-dir", data, &file]);

    let mut registering = tokio::task::JoinSet::new();
    for i in 0..8 {
        let id = format!("thermostat-{i}");
        let device =
            client(&handle, &id, Transport::Mqtt).group_key(STANDARD.encode(GROUP_KEY)).build().unwrap();
        registering.spawn(async move { (id, device.register().await.unwrap().assigned_hub) });
    }
    let mut landed = Vec::new();
    while let Some(joined) = registering.join_next().await {
        landed.push(joined.unwrap());
    }
    for (id, hub) in &landed {
        let only_there = zerotouch(&["devices", "get", "--data-dir", data, "--hub", hub, id]);
        assert_eq!(only_there["deviceId"], id.as_str());
    }
    let all = zerotouch(&["devices", "list", "--data-dir", data]);
    assert_eq!(all.as_array().unwrap().len(), 8);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_id_scope_certificates_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let first = start(dir.path(), &[]).await;
    let scope = first.id_scope().clone();
    let ca = std::fs::read_to_string(first.ca_cert().unwrap()).unwrap();
    let file = write_enrollments(dir.path(), &TestCa::root("Unused CA"));
    zerotouch(&["enrollments", "import", "--data-dir", data, &file]);
    client(&first, "boiler-1", Transport::Mqtt)
        .symmetric_key(STANDARD.encode(DEVICE_KEY))
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    first.shutdown().await;

    let second = start(dir.path(), &[]).await;
    assert_eq!(second.id_scope(), &scope);
    assert_eq!(std::fs::read_to_string(second.ca_cert().unwrap()).unwrap(), ca);
    assert_eq!(zerotouch(&["devices", "get", "--data-dir", data, "boiler-1"])["deviceId"], "boiler-1");
    // The device registers again against the restarted server with the CA it already trusts.
    let again = client(&second, "boiler-1", Transport::Https)
        .symmetric_key(STANDARD.encode(DEVICE_KEY))
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    assert_eq!(again.assigned_hub, "localhost");
    second.shutdown().await;
}
