//! The official Azure IoT SDKs (Python `azure-iot-device`, Node `azure-iot-provisioning-device-*`)
//! provision against `zerotouch serve` with only the host name and the CA changed.
//!
//! Each case starts `zerotouch serve` on the SDKs' fixed ports (MQTT 8883, HTTPS/WebSockets 443)
//! with a temporary data directory, imports enrollments with `zerotouch enrollments import`, runs the
//! SDK script of `tests/compat/`, checks the registration result, then checks with `zerotouch devices
//! get` that the identity landed in the hub registry. The ports are fixed by the SDKs, so the cases
//! run one at a time (a process-wide lock) and wait for the ports to be free of other processes.
//!
//! The SDKs come from `scripts/sdk-setup` (run by `scripts/setup`), under
//! `${ZEROTOUCH_SDK_DIR:-$HOME/.cache/zerotouch/sdk}`. `ZEROTOUCH_COMPAT_ADDR` moves the listeners off
//! 127.0.0.1 to another loopback address when 127.0.0.1's ports are taken on a shared machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;
use zerotouch_testkit::certs::{CertSpec, TestCa, TestCert};

const BIN: &str = env!("CARGO_BIN_EXE_zerotouch");
const ID_SCOPE: &str = "0ne00C0FFEE";
/// The one embedded hub every case allocates to.
const HUB: &str = "compat-hub.localhost";
/// The ports the SDKs connect to; none of them can be told another one (toolchain.md §9).
const MQTT_PORT: u16 = 8883;
const HTTPS_PORT: u16 = 443;
/// Long enough for an SDK's retry-after waits (3 s each) several times over.
const SDK_TIMEOUT: Duration = Duration::from_secs(120);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Serialises the cases of this binary: they all need the same two ports.
static PORTS: Mutex<()> = Mutex::new(());

fn ports_lock() -> MutexGuard<'static, ()> {
    // A failed case poisons the lock; the next case may still run.
    PORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn repo_root() -> PathBuf {
    manifest_dir().parent().unwrap().to_path_buf()
}

/// Where `scripts/sdk-setup` installed the SDKs; fails naming the script when it has not run.
fn sdk_dir() -> PathBuf {
    let dir = match std::env::var_os("ZEROTOUCH_SDK_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/zerotouch/sdk"),
    };
    let python = dir.join("venv/bin/python");
    let node_modules = dir.join("node/node_modules/azure-iot-provisioning-device");
    assert!(
        python.exists() && node_modules.exists(),
        "the Azure SDKs are not installed under {} ({} or {} missing): run scripts/sdk-setup",
        dir.display(),
        python.display(),
        node_modules.display()
    );
    dir
}

fn listen_ip() -> IpAddr {
    match std::env::var("ZEROTOUCH_COMPAT_ADDR") {
        Ok(a) => a.parse().expect("ZEROTOUCH_COMPAT_ADDR is an IP address"),
        Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// The host name the SDKs are given: `localhost` on the default address, as a user would type it.
fn sdk_host() -> String {
    let ip = listen_ip();
    if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) {
        "localhost".to_owned()
    } else {
        ip.to_string()
    }
}

/// A development CA and a server certificate for `localhost`, 127.0.0.1 and the listen address:
/// the SDKs check the host name against the certificate's SANs.
struct ServerPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn server_pki() -> &'static ServerPki {
    static PKI: OnceLock<ServerPki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "zerotouch compat test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if listen_ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
            names.push(listen_ip().to_string());
        }
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        ServerPki { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    })
}

/// Which official client registers, and over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sdk {
    /// Python `azure-iot-device` over MQTT/TLS on 8883.
    PythonMqtt,
    /// Python `azure-iot-device` over MQTT over WebSockets on 443.
    PythonWebSockets,
    /// Node `azure-iot-provisioning-device-mqtt` on 8883.
    NodeMqtt,
    /// Node `azure-iot-provisioning-device-mqtt`'s `MqttWs` on 443.
    NodeWebSockets,
    /// Node `azure-iot-provisioning-device-http` on 443.
    NodeHttp,
}

/// What the device holds.
enum Credential {
    /// An individual enrollment's primary key.
    Key(String),
    /// An enrollment group's primary key; the script derives the device key.
    GroupKey(String),
    /// A certificate (leaf first, then intermediates) and its key.
    X509(TestCert),
}

/// How the hub identity authenticates afterwards (DPS spec §8.4).
enum HubAuth {
    /// `sas` with this primary key (the enrollment's, or the derived key for a group).
    Sas(String),
    /// `selfSigned` with the leaf's SHA-1 thumbprint.
    SelfSigned(Vec<u8>),
}

struct Case {
    sdk: Sdk,
    registration_id: &'static str,
    enrollments: Value,
    credential: Credential,
    device_id: &'static str,
    hub_auth: HubAuth,
}

/// A base64 symmetric key of 32 bytes, fixed per label so a failing case can be replayed by hand.
fn key(label: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(ring::digest::digest(&ring::digest::SHA256, label.as_bytes()))
}

/// The group derivation of the DPS documentation (spec §4.4), computed independently of the scripts.
fn derived_key(group_key: &str, registration_id: &str) -> String {
    let k = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &base64::engine::general_purpose::STANDARD.decode(group_key).unwrap(),
    );
    base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&k, registration_id.as_bytes()))
}

fn symmetric_individual(sdk: Sdk, registration_id: &'static str, device_id: Option<&'static str>) -> Case {
    let primary = key(&format!("{registration_id} primary"));
    let mut enrollment = json!({
        "registrationId": registration_id,
        "attestation": { "type": "symmetricKey", "symmetricKey": {
            "primaryKey": primary, "secondaryKey": key(&format!("{registration_id} secondary")) } },
        "provisioningStatus": "enabled",
    });
    if let Some(d) = device_id {
        enrollment["deviceId"] = json!(d);
    }
    Case {
        sdk,
        registration_id,
        enrollments: json!([enrollment]),
        credential: Credential::Key(primary.clone()),
        device_id: device_id.unwrap_or(registration_id),
        hub_auth: HubAuth::Sas(primary),
    }
}

fn symmetric_group(sdk: Sdk, group_id: &str, registration_id: &'static str) -> Case {
    let primary = key(&format!("{group_id} primary"));
    Case {
        sdk,
        registration_id,
        enrollments: json!([{
            "enrollmentGroupId": group_id,
            "attestation": { "type": "symmetricKey", "symmetricKey": {
                "primaryKey": primary, "secondaryKey": key(&format!("{group_id} secondary")) } },
            "provisioningStatus": "enabled",
        }]),
        hub_auth: HubAuth::Sas(derived_key(&primary, registration_id)),
        credential: Credential::GroupKey(primary),
        device_id: registration_id,
    }
}

fn sha1(der: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref().to_vec()
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped, so a panicking case leaves no server.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // A graceful stop first: that is what an operator's Ctrl-C does.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion with its output in files under `dir` (no pipe can fill up), killing it
/// after `timeout`.
fn run(mut cmd: Command, dir: &Path, name: &str, timeout: Duration) -> Output {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not finish within {timeout:?}: {what}\nstderr:\n{}", tail(&err_path));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    fs::File::open(&out_path).unwrap().read_to_string(&mut stdout).unwrap();
    Output { status, stdout, stderr: fs::read_to_string(&err_path).unwrap_or_default() }
}

/// Waits until no other process holds the SDK ports (another test run on the same machine).
fn wait_for_free_ports(ip: IpAddr) {
    let deadline = Instant::now() + START_TIMEOUT;
    for port in [MQTT_PORT, HTTPS_PORT] {
        loop {
            match TcpListener::bind((ip, port)) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!(
                    "{ip}:{port} stays unavailable ({e}); the SDKs need this port: stop what holds it, run as \
                     root, or set ZEROTOUCH_COMPAT_ADDR to another loopback address"
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

fn start_server(dir: &Path, data_dir: &Path) -> Server {
    let ip = listen_ip();
    wait_for_free_ports(ip);
    let pki = server_pki();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    fs::write(&cert, &pki.cert_pem).unwrap();
    fs::write(&key, &pki.key_pem).unwrap();
    let log = dir.join("serve.log");
    let log_file = fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--id-scope", ID_SCOPE, "--hub", HUB])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--mqtt-listen")
        .arg(SocketAddr::new(ip, MQTT_PORT).to_string())
        .arg("--https-listen")
        .arg(SocketAddr::new(ip, HTTPS_PORT).to_string())
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
        // The log is read back into panic messages: plain text, not terminal colours.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start zerotouch serve");
    let mut server = Server { child, log };
    let deadline = Instant::now() + START_TIMEOUT;
    for port in [MQTT_PORT, HTTPS_PORT] {
        let addr = SocketAddr::new(ip, port);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "zerotouch serve exited with {status} before listening on {addr}:\n{}",
                    server.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "zerotouch serve does not listen on {addr}:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    server
}

fn cli(dir: &Path, name: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    run(cmd, dir, name, CLI_TIMEOUT)
}

/// The command line of the case's SDK script.
fn sdk_command(case: &Case, sdk: &Path, dir: &Path) -> Command {
    let scripts = repo_root().join("tests/compat");
    let ca = dir.join("ca.pem");
    fs::write(&ca, &server_pki().ca_pem).unwrap();
    let mut cmd = match case.sdk {
        Sdk::PythonMqtt | Sdk::PythonWebSockets => {
            let mut c = Command::new(sdk.join("venv/bin/python"));
            c.arg(scripts.join("python/register.py")).arg("--ca").arg(&ca);
            if case.sdk == Sdk::PythonWebSockets {
                c.arg("--websockets");
            }
            c
        }
        Sdk::NodeMqtt | Sdk::NodeWebSockets | Sdk::NodeHttp => {
            let transport = match case.sdk {
                Sdk::NodeMqtt => "mqtt",
                Sdk::NodeWebSockets => "mqtt-ws",
                _ => "http",
            };
            let mut c = Command::new("node");
            c.arg(scripts.join("node/register.js"))
                .args(["--transport", transport])
                // The Node clients take no CA argument: this is how their users trust a private CA.
                .env("NODE_EXTRA_CA_CERTS", &ca);
            c
        }
    };
    cmd.env("ZEROTOUCH_SDK_DIR", sdk).args([
        "--host",
        &sdk_host(),
        "--id-scope",
        ID_SCOPE,
        "--registration-id",
        case.registration_id,
    ]);
    match &case.credential {
        Credential::Key(k) => {
            cmd.args(["--symmetric-key", k]);
        }
        Credential::GroupKey(k) => {
            cmd.args(["--group-key", k]);
        }
        Credential::X509(cert) => {
            let (cert_file, key_file) = (dir.join("device.pem"), dir.join("device.key"));
            fs::write(&cert_file, cert.chain_pem()).unwrap();
            fs::write(&key_file, cert.key_pem()).unwrap();
            cmd.arg("--cert").arg(cert_file).arg("--key").arg(key_file);
        }
    }
    cmd
}

fn last_json_line(text: &str) -> Option<Value> {
    text.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| serde_json::from_str(l).ok())
}

/// One case's run: the server still up, so its store can be inspected.
struct Registered {
    // Declared before `_tmp`: the server stops before its data directory is removed.
    server: Server,
    out: Output,
    dir: PathBuf,
    data: String,
    _tmp: TempDir,
}

impl Registered {
    fn context(&self) -> String {
        format!(
            "SDK stdout:\n{}\nSDK stderr:\n{}\nserver log:\n{}",
            self.out.stdout,
            tail(&self.dir.join("sdk.stderr")),
            self.server.log_tail()
        )
    }

    fn devices_get(&self, device_id: &str) -> Output {
        cli(&self.dir, "devices-get", &["devices", "get", "--data-dir", &self.data, device_id])
    }
}

/// Serves, imports the case's enrollments, runs the SDK script.
fn register(case: &Case) -> Registered {
    let sdk = sdk_dir();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().to_path_buf();
    let data_dir = dir.join("data");
    let data = data_dir.to_str().unwrap().to_owned();

    // Imported into the running server's store, as an operator would: the server must see
    // enrollments written by another process.
    let server = start_server(&dir, &data_dir);
    let file = dir.join("enrollments.json");
    fs::write(&file, serde_json::to_vec_pretty(&case.enrollments).unwrap()).unwrap();
    let import = cli(&dir, "import", &["enrollments", "import", "--data-dir", &data, file.to_str().unwrap()]);
    assert!(
        import.status.success(),
        "enrollments import failed ({}):\n{}{}\nserver log:\n{}",
        import.status,
        import.stdout,
        import.stderr,
        server.log_tail()
    );
    let out = run(sdk_command(case, &sdk, &dir), &dir, "sdk", SDK_TIMEOUT);
    Registered { server, out, dir, data, _tmp: tmp }
}

/// The SDK raises `error` (its own exception or error class name), and no identity appears in the
/// hub registry.
fn refused(case: Case, error: &str) {
    let _ports = ports_lock();
    let run = register(&case);
    let result = last_json_line(&run.out.stdout)
        .unwrap_or_else(|| panic!("the SDK printed no JSON ({})\n{}", run.out.status, run.context()));
    assert!(
        !run.out.status.success() && result["error"] == error,
        "a device with a wrong credential was not refused with {error} ({}):\n{}",
        run.out.status,
        run.context()
    );
    // Shown with --nocapture: which error each SDK surfaced.
    eprintln!("{:?} refused {}: {result}", case.sdk, case.registration_id);
    let got = run.devices_get(case.device_id);
    assert!(!got.status.success(), "a refused device has an identity:\n{}", got.stdout);
}

/// Serves, imports the enrollments, registers with the SDK, checks the result and the hub identity.
fn provision(case: Case) {
    let _ports = ports_lock();
    let run = register(&case);
    let (out, context) = (&run.out, || run.context());
    let result = last_json_line(&out.stdout)
        .unwrap_or_else(|| panic!("the SDK printed no JSON ({})\n{}", out.status, context()));
    assert!(
        out.status.success() && result["status"] == "assigned",
        "registration not assigned ({}):\n{}",
        out.status,
        context()
    );
    assert_eq!(result["assignedHub"], HUB, "{}", context());
    assert_eq!(result["deviceId"], case.device_id, "{}", context());

    let got = run.devices_get(case.device_id);
    assert!(
        got.status.success(),
        "devices get {} failed ({}):\n{}{}\nserver log:\n{}",
        case.device_id,
        got.status,
        got.stdout,
        got.stderr,
        run.server.log_tail()
    );
    let device: Value = serde_json::from_str(&got.stdout)
        .unwrap_or_else(|e| panic!("devices get printed no JSON ({e}):\n{}", got.stdout));
    assert_eq!(device["deviceId"], case.device_id, "{device:#}");
    assert_eq!(device["status"], "enabled", "{device:#}");
    let auth = &device["authentication"];
    match &case.hub_auth {
        HubAuth::Sas(primary) => {
            assert_eq!(auth["type"], "sas", "{device:#}");
            assert_eq!(
                auth["symmetricKey"]["primaryKey"],
                primary.as_str(),
                "the hub identity's key is not the device's"
            );
        }
        HubAuth::SelfSigned(thumbprint) => {
            assert_eq!(auth["type"], "selfSigned", "{device:#}");
            let printed = auth["x509Thumbprint"]["primaryThumbprint"].as_str().unwrap_or_default();
            let expected: String = thumbprint.iter().map(|b| format!("{b:02X}")).collect();
            assert!(
                printed.eq_ignore_ascii_case(&expected),
                "primary thumbprint {printed:?}, want the leaf's SHA-1 {expected}"
            );
        }
    }
}

#[test]
fn python_mqtt_device_with_individual_symmetric_key_is_assigned_under_its_enrollment_device_id() {
    provision(symmetric_individual(Sdk::PythonMqtt, "py-mqtt-sym-1", Some("py-mqtt-sym-device")));
}

#[test]
fn python_mqtt_device_with_group_derived_key_is_assigned() {
    provision(symmetric_group(Sdk::PythonMqtt, "py-sym-group", "py-mqtt-group-1"));
}

#[test]
fn python_mqtt_device_with_individual_x509_certificate_is_assigned() {
    let device = TestCert::self_signed(CertSpec::new("py-mqtt-x509-1"));
    provision(Case {
        sdk: Sdk::PythonMqtt,
        registration_id: "py-mqtt-x509-1",
        enrollments: json!([{
            "registrationId": "py-mqtt-x509-1",
            "attestation": { "type": "x509", "x509": { "clientCertificates": {
                "primary": { "certificate": device.pem() } } } },
            "provisioningStatus": "enabled",
        }]),
        hub_auth: HubAuth::SelfSigned(sha1(device.der())),
        credential: Credential::X509(device),
        device_id: "py-mqtt-x509-1",
    });
}

#[test]
fn python_mqtt_device_with_x509_chain_through_an_intermediate_is_assigned_by_its_root_group() {
    let root = TestCa::root("zerotouch compat root");
    let intermediate = root.intermediate("zerotouch compat intermediate");
    // The device presents leaf + intermediate; the group knows only the root.
    let device = intermediate.device("py-mqtt-x509-group-1");
    provision(Case {
        sdk: Sdk::PythonMqtt,
        registration_id: "py-mqtt-x509-group-1",
        enrollments: json!([{
            "enrollmentGroupId": "py-x509-group",
            "attestation": { "type": "x509", "x509": { "signingCertificates": {
                "primary": { "certificate": root.pem() } } } },
            "provisioningStatus": "enabled",
        }]),
        hub_auth: HubAuth::SelfSigned(sha1(device.der())),
        credential: Credential::X509(device),
        device_id: "py-mqtt-x509-group-1",
    });
}

#[test]
fn python_device_over_websockets_on_443_is_assigned() {
    provision(symmetric_individual(Sdk::PythonWebSockets, "py-ws-sym-1", None));
}

#[test]
fn node_mqtt_device_with_individual_symmetric_key_is_assigned() {
    provision(symmetric_individual(Sdk::NodeMqtt, "node-mqtt-sym-1", None));
}

#[test]
fn node_mqtt_device_with_group_derived_key_is_assigned() {
    provision(symmetric_group(Sdk::NodeMqtt, "node-sym-group", "node-mqtt-group-1"));
}

#[test]
fn node_http_device_with_individual_symmetric_key_is_assigned_over_443() {
    provision(symmetric_individual(Sdk::NodeHttp, "node-http-sym-1", None));
}

#[test]
fn node_device_over_websockets_on_443_with_group_derived_key_is_assigned() {
    provision(symmetric_group(Sdk::NodeWebSockets, "node-ws-group", "node-ws-group-1"));
}

#[test]
fn node_http_device_with_group_derived_key_is_assigned_over_443() {
    provision(symmetric_group(Sdk::NodeHttp, "node-http-group", "node-http-group-1"));
}

#[test]
fn python_mqtt_device_with_a_wrong_symmetric_key_is_refused_and_gets_no_identity() {
    let mut case = symmetric_individual(Sdk::PythonMqtt, "py-mqtt-wrong-key-1", None);
    case.credential = Credential::Key(key("not the enrolled key"));
    // A bad SAS is refused at CONNECT (CONNACK 5), which Python reports as a credential error.
    refused(case, "CredentialError");
}

#[test]
fn node_http_device_with_a_key_derived_from_another_group_key_is_refused_and_gets_no_identity() {
    let mut case = symmetric_group(Sdk::NodeHttp, "node-http-group", "node-http-wrong-group-1");
    case.credential = Credential::GroupKey(key("another group's key"));
    // 401 with errorCode 401002 in the DPS error body.
    refused(case, "UnauthorizedError");
}

#[test]
fn python_mqtt_device_whose_certificate_chains_to_another_root_is_refused_and_gets_no_identity() {
    let enrolled = TestCa::root("zerotouch compat enrolled root");
    let other =
        TestCa::root("zerotouch compat other root").intermediate("zerotouch compat other intermediate");
    let device = other.device("py-mqtt-x509-stranger-1");
    // The TLS handshake accepts any client certificate (group CAs live in enrollments); the register
    // is answered 401, which Python raises as a ClientError.
    refused(
        Case {
            sdk: Sdk::PythonMqtt,
            registration_id: "py-mqtt-x509-stranger-1",
            enrollments: json!([{
                "enrollmentGroupId": "py-x509-group",
                "attestation": { "type": "x509", "x509": { "signingCertificates": {
                    "primary": { "certificate": enrolled.pem() } } } },
                "provisioningStatus": "enabled",
            }]),
            hub_auth: HubAuth::SelfSigned(sha1(device.der())),
            credential: Credential::X509(device),
            device_id: "py-mqtt-x509-stranger-1",
        },
        "ClientError",
    );
}

#[test]
fn sdk_scripts_reject_incomplete_arguments_before_touching_the_network() {
    let sdk = sdk_dir();
    let tmp = TempDir::new().unwrap();
    let scripts = repo_root().join("tests/compat");
    let mut py = Command::new(sdk.join("venv/bin/python"));
    py.arg(scripts.join("python/register.py")).args([
        "--id-scope",
        ID_SCOPE,
        "--registration-id",
        "d",
        "--cert",
        "c.pem",
    ]);
    let out = run(py, tmp.path(), "py", CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--cert needs --key"), "{}", out.stderr);

    let mut node = Command::new("node");
    node.arg(scripts.join("node/register.js")).env("ZEROTOUCH_SDK_DIR", &sdk).args([
        "--id-scope",
        ID_SCOPE,
        "--registration-id",
        "d",
        "--symmetric-key",
        "a",
        "--group-key",
        "b",
    ]);
    let out = run(node, tmp.path(), "node", CLI_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("exactly one of --symmetric-key or --group-key"), "{}", out.stderr);
}

/// This crate's directory as cargo gives it when running the test: a binary reused from a shared
/// build cache may have been compiled in a checkout elsewhere, so the compile-time path is only
/// the fallback.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
