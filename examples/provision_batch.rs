//! The main job over the wire: start `zerotouch serve` on the embedded default (SQLite in a
//! fresh data directory, generated ID scope and development CA) with three weighted embedded
//! hubs, import enrollments with `zerotouch enrollments import`, provision a batch of simulated
//! devices (symmetric key and X.509, over MQTT, MQTT over WebSockets and HTTPS) with the Rust
//! device client, then show where each landed and check the hub registries with
//! `zerotouch devices list`.
//!
//! Run: `cargo run -p zerotouch-examples --example provision_batch` (builds the binary first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use zerotouch_testkit::certs::TestCa;
use zerotouch_transport::client::{ProvisioningClient, Transport};

const HUBS: [&str; 3] = ["plant-north.localhost:1", "plant-south.localhost:2", "plant-east.localhost:3"];
const THERMOSTATS: usize = 48;
const CAMERAS: usize = 16;
/// Registrations in flight at once.
const CONCURRENCY: usize = 32;

/// The `zerotouch` binary next to this example's build output, built first (in the example's
/// own profile: `cargo run --release` runs a release server) so the example always runs the
/// current code. `--workspace` resolves features as `cargo test --workspace` does, so after the
/// tests this reuses their build instead of compiling the server again.
fn zerotouch_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // …/debug/examples/provision_batch → …/debug (the profile's output directory)
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "-q", "--workspace", "--bin", "zerotouch"]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(profile) => {
            build.args(["--profile", profile]);
        }
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building zerotouch failed");
    profile_dir.join(format!("zerotouch{}", std::env::consts::EXE_SUFFIX))
}

/// What `zerotouch serve` printed about itself.
struct Running {
    child: Child,
    id_scope: String,
    mqtt_port: u16,
    https_port: u16,
    ca: PathBuf,
}

fn serve(bin: &Path, data: &Path) -> Running {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--data-dir"]).arg(data);
    cmd.args(["--mqtt-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"]);
    for hub in HUBS {
        cmd.args(["--hub", hub]);
    }
    let mut child =
        cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn().expect("start zerotouch serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut id_scope, mut mqtt, mut https, mut ca) = (None, None, None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        println!("  | {line}");
        let last = line.split_whitespace().last().unwrap_or_default().to_owned();
        let port = || last.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        match line.trim_start() {
            l if l.starts_with("zerotouch serving id scope") => id_scope = Some(last.clone()),
            l if l.starts_with("MQTT/TLS") => mqtt = Some(port()),
            l if l.starts_with("HTTPS, MQTT/WS") => https = Some(port()),
            l if l.starts_with("development CA") => ca = Some(PathBuf::from(&last)),
            l if l.starts_with("data") => break,
            _ => {}
        }
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Running {
        child,
        id_scope: id_scope.expect("id scope line"),
        mqtt_port: mqtt.expect("MQTT line"),
        https_port: https.expect("HTTPS line"),
        ca: ca.expect("CA line"),
    }
}

fn zerotouch_json(bin: &Path, args: &[&str]) -> Value {
    let out = Command::new(bin).args(args).env("RUST_LOG", "warn").output().expect("run zerotouch");
    assert!(out.status.success(), "zerotouch {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// A simulated device: registration id, what it presents, transport.
struct Sim {
    id: String,
    kind: &'static str,
    transport: Transport,
    credential: Cred,
}

enum Cred {
    Group(String),
    Own(String),
    X509 { chain: String, key: String },
}

#[tokio::main]
async fn main() {
    let bin = zerotouch_binary();
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();

    println!("1. zerotouch serve --data-dir {} --hub {}", data.path().display(), HUBS.join(" --hub "));
    let mut server = serve(&bin, data.path());

    // 2. Enrollments: a symmetric-key group, an X.509 group on a factory line's intermediate CA,
    //    one individually enrolled gateway; imported while the server runs.
    let group_key = STANDARD.encode([0x5a; 32]);
    let gateway_key = STANDARD.encode([0xa5; 32]);
    let line = TestCa::root("Contoso Root CA").intermediate("Contoso Line 1 CA");
    let sym = |k: &str| json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}});
    let enrollments = json!([
        {"enrollmentGroupId": "thermostats", "attestation": sym(&group_key),
         "initialTwin": {"tags": {"kind": "thermostat"}}},
        {"enrollmentGroupId": "cameras",
         "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": line.pem()}}}},
         "initialTwin": {"tags": {"kind": "camera"}}},
        {"registrationId": "gateway-01", "attestation": sym(&gateway_key)},
    ]);
    let file = data.path().join("enrollments.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&enrollments).unwrap()).unwrap();
    let data_arg = data.path().to_str().unwrap();
    let imported =
        zerotouch_json(&bin, &["enrollments", "import", "--data-dir", data_arg, file.to_str().unwrap()]);
    println!("2. zerotouch enrollments import: {}", imported["imported"]);

    // 3. Provision the batch.
    let transports = [Transport::Mqtt, Transport::MqttWs, Transport::Https];
    let mut sims: Vec<Sim> = (0..THERMOSTATS)
        .map(|i| Sim {
            id: format!("thermostat-{i:03}"),
            kind: "symmetric key (group)",
            transport: transports[i % 3],
            credential: Cred::Group(group_key.clone()),
        })
        .collect();
    sims.extend((0..CAMERAS).map(|i| {
        let id = format!("camera-{i:03}");
        let cert = line.device(&id);
        Sim {
            id,
            kind: "X.509 (group)",
            transport: transports[i % 2],
            credential: Cred::X509 { chain: cert.chain_pem(), key: cert.key_pem().to_owned() },
        }
    }));
    sims.push(Sim {
        id: "gateway-01".into(),
        kind: "symmetric key (individual)",
        transport: Transport::Https,
        credential: Cred::Own(gateway_key),
    });

    println!("3. provisioning {} simulated devices ({CONCURRENCY} at a time)", sims.len());
    let bar = ProgressBar::new(sims.len() as u64).with_style(
        ProgressStyle::with_template("   [{bar:40}] {pos}/{len} {msg}").unwrap().progress_chars("=> "),
    );
    let ca = std::fs::read(&server.ca).unwrap();
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for sim in sims {
        let port = if sim.transport == Transport::Mqtt { server.mqtt_port } else { server.https_port };
        let builder = ProvisioningClient::builder(&server.id_scope, &sim.id)
            .provisioning_host(format!("localhost:{port}"))
            .transport(sim.transport)
            .ca_pem(ca.clone());
        let builder = match &sim.credential {
            Cred::Group(k) => builder.group_key(k.as_str()),
            Cred::Own(k) => builder.symmetric_key(k.as_str()),
            Cred::X509 { chain, key } => builder.x509_pem(chain.as_bytes().to_vec(), key.as_bytes().to_vec()),
        };
        let gate = Arc::clone(&gate);
        let bar = bar.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let result = builder.build().unwrap().register().await;
            bar.set_message(sim.id.clone());
            bar.inc(1);
            (sim, result)
        });
    }
    let mut by_hub: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    let mut by_transport: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (sim, result) = joined.unwrap();
        match result {
            Ok(a) => {
                *by_hub.entry(a.assigned_hub).or_default().entry(sim.kind).or_default() += 1;
                *by_transport.entry(format!("{:?}", sim.transport)).or_default() += 1;
            }
            Err(e) => failed.push(format!("{}: {e}", sim.id)),
        }
    }
    bar.finish_with_message("done");

    // 4. Where they landed, and what the hub registries hold.
    println!("4. where the devices landed (hub weights {})", HUBS.join(", "));
    for (hub, kinds) in &by_hub {
        let total: usize = kinds.values().sum();
        let detail: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!("   {hub:<24} {total:>3}  ({})", detail.join(", "));
    }
    println!("   by transport: {by_transport:?}");
    let listed = zerotouch_json(&bin, &["devices", "list", "--data-dir", data_arg]);
    let registered = listed.as_array().map_or(0, Vec::len);
    println!("   zerotouch devices list: {registered} identities in the embedded hub registries");
    let gateway = zerotouch_json(&bin, &["devices", "get", "--data-dir", data_arg, "gateway-01"]);
    println!(
        "   zerotouch devices get gateway-01: status {}, auth {}",
        gateway["status"], gateway["authentication"]["type"]
    );

    // 5. Graceful stop (SIGTERM), as a service manager would.
    let pid = server.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = server.child.wait().unwrap();
    println!("5. zerotouch serve stopped ({status}); total {:.1} s", started.elapsed().as_secs_f64());

    for f in &failed {
        eprintln!("   failed: {f}");
    }
    assert!(failed.is_empty(), "{} registrations failed", failed.len());
    assert_eq!(registered, THERMOSTATS + CAMERAS + 1, "every provisioned device is in a hub registry");
}
