//! Load generator: N simulated devices register over MQTT+TLS with keys derived from a group key,
//! and in the same run the bare TLS + MQTT CONNECT/CONNACK rate of the same server; reports both
//! rates, p50/p99 latencies and their ratio (issue 5, acceptance 4).
//!
//! Against a running server (see benches/README.md):
//! `cargo run --release -p zerotouch-benches --bin loadgen -- --host 127.0.0.1:8883 --ca ca.pem
//! --id-scope 0ne0000AB12 --group-key KEY --devices 5000 --concurrency 2000`
//!
//! Or self-contained, against `serve_mqtt` in this process over a SQLite store in a temp dir:
//! `cargo run --release -p zerotouch-benches --bin loadgen -- --in-process --devices 5000 --concurrency 2000`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::registration::{DeviceCredential, DEFAULT_API_VERSION};
use zerotouch_proto::device::{RegistrationOperationStatus, RegistrationStatus};
use zerotouch_proto::mqtt::{ConnectUsername, DeviceRequest, ResponseTopic, POLL_PAYLOAD, SUBSCRIBE_FILTER};
use zerotouch_proto::{IdScope, OperationId, RegistrationId};
use zerotouch_transport::client::{ProvisioningClient, Transport, USER_AGENT};

#[derive(Debug, Parser)]
#[command(about = "DPS load generator: registrations/s vs bare TLS+MQTT CONNECT/CONNACK/s")]
struct Args {
    /// MQTT endpoint HOST:PORT of a running server (ignored with --in-process).
    #[arg(long, default_value = "127.0.0.1:8883")]
    host: String,
    /// CA certificate (PEM) the server certificate chains to (ignored with --in-process).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// ID scope of the server (ignored with --in-process).
    #[arg(long)]
    id_scope: Option<String>,
    /// Primary key (base64) of a symmetric-key enrollment group whose devices may register
    /// (ignored with --in-process).
    #[arg(long)]
    group_key: Option<String>,
    /// Devices that register (and, separately, connections that only CONNECT).
    #[arg(long, default_value_t = 5000)]
    devices: usize,
    /// Devices (connections) in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Registration id prefix; ids are `{prefix}-{n}` (registrations) and `{prefix}-c-{n}` (connects).
    #[arg(long, default_value = "loadgen")]
    prefix: String,
    /// Start `serve_mqtt` over a SQLite store in a temp dir inside this process instead of
    /// using a running server.
    #[arg(long)]
    in_process: bool,
    /// With --in-process: `sqlite` (provisioning store and hub on one SQLite file in a temp dir,
    /// as `zerotouch serve` by default) or `memory` (the engine's in-memory stores, to tell the
    /// store's share of the cost).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "memory"])]
    store: String,
    /// With --in-process: `retry-after` seconds of the server's `assigning` replies (the
    /// `--retry-after` of `zerotouch serve`; 3 like Azure DPS by default). Each registration
    /// waits this long before its poll, so it caps the rate at concurrency / retry-after.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=300))]
    retry_after: u32,
    /// Devices of the register phase: `raw` speaks the DPS MQTT flow with the same packet codec
    /// as the connect phase, so both phases cost the load generator alike and the ratio measures
    /// the server; `zerotouch` uses our `ProvisioningClient` (rumqttc), end to end.
    #[arg(long, default_value = "raw", value_parser = ["raw", "zerotouch"])]
    client: String,
    /// Skip the CONNECT/CONNACK phase.
    #[arg(long)]
    skip_connect: bool,
    /// Skip the register phase (to profile the server during bare CONNECTs alone).
    #[arg(long, conflicts_with = "skip_connect")]
    skip_register: bool,
    /// Process id of the server (when it runs on this machine): each phase then also reports the
    /// server's CPU per device, read from `/proc`, beside the load generator's own.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Rounds of the two phases, alternating (connect, register, connect, register, ...), each
    /// round with new devices: every round's ratios are printed, then their medians, so that a
    /// run is not one sample of the machine's noise. Round 1 uses the ids of a one-round run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

/// CPU seconds (user + system) a process has used so far, from `/proc/{pid}/stat` (Linux; the
/// counters are in USER_HZ ticks, 100 a second); `None` elsewhere or when it is gone.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// CPU used by this process and the server since `start`, per device of a phase.
struct CpuMeter {
    server_pid: Option<String>,
    own: Option<f64>,
    server: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> Self {
        let server_pid = server_pid.map(|p| p.to_string());
        let server = server_pid.as_deref().and_then(cpu_seconds);
        Self { own: cpu_seconds("self"), server, server_pid }
    }

    /// Milliseconds of CPU per device since `start`: (this process, the server).
    fn per_device(&self, devices: u64) -> (Option<f64>, Option<f64>) {
        let per =
            |before: Option<f64>, now: Option<f64>| Some((now? - before?) * 1000.0 / devices.max(1) as f64);
        let server = self.server_pid.as_deref().and_then(cpu_seconds);
        (per(self.own, cpu_seconds("self")), per(self.server, server))
    }
}

/// Where to send load and how to authenticate.
struct Target {
    host: String,
    ca_pem: Vec<u8>,
    id_scope: String,
    group_key: Vec<u8>,
    group_key_b64: String,
}

/// Outcome of one phase.
struct Phase {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// Milliseconds of CPU per device: this process, the server (see [`CpuMeter`]).
    cpu_ms: (Option<f64>, Option<f64>),
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn report(&self, name: &str) {
        println!(
            "{name:<10} ok {:>6}  failed {:>5}  {:>8.1}/s  p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  wall {:.2} s",
            self.ok,
            self.failed,
            self.rate(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            self.latency_us.max() as f64 / 1000.0,
            self.elapsed.as_secs_f64(),
        );
        if let Some(e) = &self.first_error {
            println!("{name:<10} first error: {e}");
        }
        match self.cpu_ms {
            (Some(own), Some(server)) => {
                println!("{name:<10} cpu per device: load generator {own:.3} ms, server {server:.3} ms")
            }
            (Some(own), None) => println!("{name:<10} cpu per device: this process {own:.3} ms"),
            _ => {}
        }
    }

    /// CPU of both processes per device, when both were measured.
    fn cpu_total_ms(&self) -> Option<f64> {
        Some(self.cpu_ms.0? + self.cpu_ms.1?)
    }
}

/// Runs `make(n)` for n in 0..count with at most `concurrency` in flight.
async fn run_phase<F, Fut>(count: usize, concurrency: usize, make: F) -> Phase
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for n in 0..count {
        let permit = Arc::clone(&permits).acquire_owned().await.expect("semaphore open");
        let fut = make(n);
        tasks.spawn(async move {
            let t = Instant::now();
            let r = fut.await;
            drop(permit);
            r.map(|()| t.elapsed())
        });
    }
    let mut phase = Phase {
        ok: 0,
        failed: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        cpu_ms: (None, None),
    };
    while let Some(done) = tasks.join_next().await {
        match done.expect("task panicked") {
            Ok(d) => {
                phase.ok += 1;
                let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, 600_000_000);
                phase.latency_us.record(us).expect("within bounds");
            }
            Err(e) => {
                phase.failed += 1;
                phase.first_error.get_or_insert(e);
            }
        }
    }
    phase.elapsed = started.elapsed();
    phase
}

const MAX_PACKET: usize = 64 * 1024;

/// One device's TLS connection and its MQTT packet buffers.
struct Session {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    inbound: BytesMut,
    outbound: BytesMut,
}

impl Session {
    /// TLS handshake, CONNECT with a valid username and SAS, wait for CONNACK 0.
    async fn open(
        addr: &str,
        server_name: ServerName<'static>,
        tls: Arc<ClientConfig>,
        client_id: String,
        username: String,
        password: String,
    ) -> Result<Self, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("tcp: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream =
            TlsConnector::from(tls).connect(server_name, tcp).await.map_err(|e| format!("tls: {e}"))?;
        let mut session = Session { stream, inbound: BytesMut::new(), outbound: BytesMut::new() };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = 60;
        connect.set_login(username, password);
        session.send(Packet::Connect(connect)).await?;
        match session.read().await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(session),
            other => Err(format!("expected CONNACK 0, got {other:?}")),
        }
    }

    async fn send(&mut self, packet: Packet) -> Result<(), String> {
        self.outbound.clear();
        packet.write(&mut self.outbound, MAX_PACKET).map_err(|e| format!("encode: {e:?}"))?;
        self.stream.write_all(&self.outbound).await.map_err(|e| format!("write: {e}"))
    }

    async fn read(&mut self) -> Result<Packet, String> {
        loop {
            match Packet::read(&mut self.inbound, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if self.stream.read_buf(&mut self.inbound).await.map_err(|e| format!("read: {e}"))? == 0 {
                        return Err("connection closed".into());
                    }
                }
                Err(e) => return Err(format!("bad packet: {e:?}")),
            }
        }
    }

    /// Publishes `payload` on `topic` (QoS 1) and returns the reply on the response topic,
    /// acknowledging it as a device does.
    async fn request(
        &mut self,
        pkid: u16,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(ResponseTopic, bytes::Bytes), String> {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        self.send(Packet::Publish(publish)).await?;
        loop {
            match self.read().await? {
                Packet::PubAck(_) => {}
                Packet::Publish(reply) => {
                    if reply.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(reply.pkid))).await?;
                    }
                    let topic = ResponseTopic::parse(&reply.topic).map_err(|e| e.to_string())?;
                    return Ok((topic, reply.payload));
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }

    async fn close(mut self) {
        let _ = self.send(Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }
}

/// TLS handshake, CONNECT with a valid username and SAS, wait for CONNACK 0, DISCONNECT.
async fn connect_once(
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    client_id: String,
    username: String,
    password: String,
) -> Result<(), String> {
    Session::open(&addr, server_name, tls, client_id, username, password).await?.close().await;
    Ok(())
}

/// The DPS flow of one device over the raw MQTT codec: CONNECT, SUBSCRIBE, register, wait
/// `retry-after` (at least 1 s, as the SDKs clamp it), poll until assigned, DISCONNECT.
async fn register_once(
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    id: String,
    username: String,
    password: String,
) -> Result<(), String> {
    let mut s = Session::open(&addr, server_name, tls, id.clone(), username, password).await?;
    s.send(Packet::Subscribe(Subscribe::new(SUBSCRIBE_FILTER, QoS::AtLeastOnce))).await?;
    match s.read().await? {
        Packet::SubAck(_) => {}
        other => return Err(format!("expected SUBACK, got {other:?}")),
    }
    // Registration ids need no JSON escaping (lower-case letters, digits, `-._:`), and `login`
    // has checked this one.
    let body = format!("{{\"registrationId\":\"{id}\"}}").into_bytes();
    let register = DeviceRequest::Register { rid: "1".to_owned() }.to_string();
    let (mut topic, mut payload) = s.request(2, register, body).await?;
    let mut pkid = 2;
    for poll in 2.. {
        if topic.status >= 300 {
            return Err(format!("status {}: {}", topic.status, String::from_utf8_lossy(&payload)));
        }
        let status: RegistrationOperationStatus =
            serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
        if status.status != RegistrationStatus::Assigning {
            let device = status.registration_state.and_then(|r| r.device_id);
            if status.status != RegistrationStatus::Assigned || device.as_deref() != Some(id.as_str()) {
                return Err(format!("ended {:?} as {device:?}", status.status));
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(u64::from(topic.retry_after.unwrap_or(2).clamp(1, 300))))
            .await;
        let operation_id = OperationId::new(status.operation_id).map_err(|e| e.to_string())?.to_string();
        let request = DeviceRequest::PollStatus { rid: poll.to_string(), operation_id }.to_string();
        pkid += 1;
        (topic, payload) = s.request(pkid, request, POLL_PAYLOAD.as_bytes().to_vec()).await?;
    }
    s.close().await;
    Ok(())
}

/// What every raw device needs: TLS settings, the server name and SAS tokens.
struct RawDevices {
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    crypto: RingCrypto,
    expiry: i64,
}

impl RawDevices {
    fn new(target: &Target) -> Self {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&target.ca_pem) {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        // Every simulated device is a new device: full handshakes in both phases.
        config.resumption = Resumption::disabled();
        let host = target.host.rsplit_once(':').map_or(target.host.as_str(), |(h, _)| h).to_owned();
        Self {
            tls: Arc::new(config),
            server_name: ServerName::try_from(host).expect("server name"),
            crypto: RingCrypto::new(),
            expiry: zerotouch_transport::service::now().unix_secs() + 3600,
        }
    }

    /// CONNECT username and SAS token of device `id` (key derived from the group key).
    fn login(&self, target: &Target, id: &str) -> (String, String) {
        let key = derive_device_key(&self.crypto, &target.group_key, id);
        let token = registration_token(&self.crypto, &key, &target.id_scope, id, self.expiry).to_string();
        let username = ConnectUsername {
            id_scope: IdScope::new(target.id_scope.as_str()).expect("id scope"),
            registration_id: RegistrationId::new(id).expect("registration id"),
            api_version: DEFAULT_API_VERSION.to_owned(),
            client_version: Some(USER_AGENT.to_owned()),
        }
        .to_string();
        (username, token)
    }
}

/// Registration id prefix of round `round` (from 1) of a phase: `{prefix}-{tag}` in the first
/// round, `{prefix}-{tag}{round}` after it, so every round brings new devices.
fn round_prefix(args: &Args, tag: &str, round: u32) -> String {
    match (tag, round) {
        ("", 1) => args.prefix.clone(),
        (_, 1) => format!("{}-{tag}", args.prefix),
        ("", _) => format!("{}-r{round}", args.prefix),
        _ => format!("{}-{tag}{round}", args.prefix),
    }
}

async fn connect_phase(target: &Arc<Target>, args: &Args, round: u32) -> Phase {
    let raw = RawDevices::new(target);
    let prefix = round_prefix(args, "c", round);
    run_phase(args.devices, args.concurrency, |n| {
        let id = format!("{prefix}-{n}");
        let (username, token) = raw.login(target, &id);
        connect_once(target.host.clone(), raw.server_name.clone(), raw.tls.clone(), id, username, token)
    })
    .await
}

async fn register_phase(target: &Arc<Target>, args: &Args, round: u32) -> Phase {
    let prefix = round_prefix(args, "", round);
    if args.client == "raw" {
        let raw = RawDevices::new(target);
        return run_phase(args.devices, args.concurrency, |n| {
            let id = format!("{prefix}-{n}");
            let (username, token) = raw.login(target, &id);
            register_once(target.host.clone(), raw.server_name.clone(), raw.tls.clone(), id, username, token)
        })
        .await;
    }
    run_phase(args.devices, args.concurrency, |n| {
        let id = format!("{prefix}-{n}");
        let target = Arc::clone(target);
        async move {
            let client = ProvisioningClient::builder(target.id_scope.as_str(), id.as_str())
                .provisioning_host(target.host.as_str())
                .transport(Transport::Mqtt)
                .group_key(target.group_key_b64.as_str())
                .ca_pem(target.ca_pem.clone())
                .build()
                .map_err(|e| e.to_string())?;
            let a = client.register().await.map_err(|e| e.to_string())?;
            if a.device_id != id {
                return Err(format!("assigned as {} instead of {id}", a.device_id));
            }
            Ok(())
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (target, _server) = if args.in_process {
        let (target, server) = in_process::start(args.store == "memory", args.retry_after).await;
        (target, Some(server))
    } else {
        let need = |what: &str| -> ! {
            eprintln!("--{what} is required unless --in-process is given");
            std::process::exit(2)
        };
        let ca = args.ca.as_ref().unwrap_or_else(|| need("ca"));
        let ca_pem = std::fs::read(ca).unwrap_or_else(|e| {
            eprintln!("cannot read {}: {e}", ca.display());
            std::process::exit(2)
        });
        let id_scope = args.id_scope.clone().unwrap_or_else(|| need("id-scope"));
        let group_key_b64 = args.group_key.clone().unwrap_or_else(|| need("group-key"));
        let DeviceCredential::SymmetricKey(group_key) =
            DeviceCredential::symmetric_key_base64(&group_key_b64).unwrap_or_else(|e| {
                eprintln!("--group-key: {e}");
                std::process::exit(2)
            })
        else {
            unreachable!("symmetric_key_base64 returns a symmetric key")
        };
        (Target { host: args.host.clone(), ca_pem, id_scope, group_key, group_key_b64 }, None)
    };
    let target = Arc::new(target);
    println!(
        "loadgen: {} devices, concurrency {}, {} client, server {} (scope {}){}",
        args.devices,
        args.concurrency,
        args.client,
        target.host,
        target.id_scope,
        if args.in_process {
            format!(", in process (serve_mqtt over {})", args.store)
        } else {
            String::new()
        }
    );
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("round {round} of {}", args.rounds);
        }
        rounds.push(run_round(&target, &args, round).await);
    }
    if rounds.len() > 1 {
        report_rounds(&rounds);
    }
}

/// What one round measured: rates and CPU per device of both processes, by phase.
#[derive(Default)]
struct Round {
    connects_per_s: Option<f64>,
    registrations_per_s: Option<f64>,
    connect_cpu_ms: Option<f64>,
    register_cpu_ms: Option<f64>,
}

impl Round {
    fn rate_ratio(&self) -> Option<f64> {
        Some(self.registrations_per_s? / self.connects_per_s?)
    }

    fn cpu_ratio(&self) -> Option<f64> {
        Some(self.connect_cpu_ms? / self.register_cpu_ms?)
    }
}

/// Runs one phase with both processes' CPU metered, and reports it as it ends.
async fn metered(args: &Args, label: &str, phase: impl std::future::Future<Output = Phase>) -> Phase {
    let meter = CpuMeter::start(args.server_pid);
    let mut p = phase.await;
    p.cpu_ms = meter.per_device(p.ok + p.failed);
    p.report(label);
    p
}

/// The phases of one round (those not skipped), each reported as it ends, then its ratios.
async fn run_round(target: &Arc<Target>, args: &Args, round: u32) -> Round {
    let connect = if args.skip_connect {
        None
    } else {
        Some(metered(args, "connect", connect_phase(target, args, round)).await)
    };
    let register = if args.skip_register {
        None
    } else {
        Some(metered(args, "register", register_phase(target, args, round)).await)
    };
    let out = Round {
        connects_per_s: connect.as_ref().map(Phase::rate),
        registrations_per_s: register.as_ref().map(Phase::rate),
        connect_cpu_ms: connect.as_ref().and_then(Phase::cpu_total_ms),
        register_cpu_ms: register.as_ref().and_then(Phase::cpu_total_ms),
    };
    if let (Some(c), Some(r)) = (connect, register) {
        println!(
            "ratio registrations/s : connects/s = {:.1} : {:.1} = {:.3}",
            r.rate(),
            c.rate(),
            r.rate() / c.rate()
        );
        // Both processes share the machine's cores: when they are the limit, the ratio tends to
        // what a connect costs both over what a registration costs both.
        if let (Some(c), Some(r)) = (c.cpu_total_ms(), r.cpu_total_ms()) {
            println!("ratio by CPU per device (both processes) = {c:.3} ms : {r:.3} ms = {:.3}", c / r);
        }
    }
    out
}

/// The median of what `value` gives for the rounds that measured it.
fn median(rounds: &[Round], value: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = rounds.iter().filter_map(value).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] })
}

/// One line per measure over all rounds: each round's value, then their median.
fn report_rounds(rounds: &[Round]) {
    let line = |name: &str, digits: usize, value: &dyn Fn(&Round) -> Option<f64>| {
        let Some(m) = median(rounds, value) else { return };
        let each: Vec<String> = rounds
            .iter()
            .map(|r| value(r).map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}")))
            .collect();
        println!("rounds {name:<34} {}  median {m:.digits$}", each.join(" "));
    };
    line("connects/s", 1, &|r| r.connects_per_s);
    line("registrations/s", 1, &|r| r.registrations_per_s);
    line("connect cpu per device (both), ms", 3, &|r| r.connect_cpu_ms);
    line("register cpu per device (both), ms", 3, &|r| r.register_cpu_ms);
    line("ratio registrations/s : connects/s", 3, &Round::rate_ratio);
    line("ratio by CPU per device", 3, &Round::cpu_ratio);
}

/// A self-contained server: `serve_mqtt` over `EngineService` with the provisioning store and
/// the embedded hub on one SQLite file in a temp dir (or in memory), a fresh CA and server
/// certificate, and one symmetric-key enrollment group.
mod in_process {
    use std::sync::{Arc, Mutex};

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::sync::oneshot;
    use zerotouch_engine::allocation::Allocator;
    use zerotouch_engine::crypto::RingCrypto;
    use zerotouch_engine::enrollments;
    use zerotouch_engine::hub::LinkedHub;
    use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
    use zerotouch_engine::memory::MemoryStore;
    use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
    use zerotouch_engine::store::{EnrollmentGroupStore, ProvisioningStore};
    use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
    use zerotouch_proto::{EnrollmentGroupId, IdScope, IfMatch};
    use zerotouch_store::sqlite::SqliteStore;
    use zerotouch_transport::limits::Limits;
    use zerotouch_transport::service::{now, DpsService, EngineService};

    use super::Target;

    const SCOPE: &str = "0ne0010AD01";
    const HUB: &str = "loadgen-hub.example.net";

    /// Keeps the server and its temp dir alive; dropping it stops the server.
    pub struct Server {
        _stop: oneshot::Sender<()>,
        _dir: tempfile::TempDir,
    }

    /// Enrolls the load group in `store` and returns its primary key (base64).
    fn enroll<S: EnrollmentGroupStore + ?Sized>(store: &S, crypto: &RingCrypto) -> String {
        let group = enrollments::put_enrollment_group(
            store,
            crypto,
            now(),
            EnrollmentGroup::new(
                EnrollmentGroupId::new("loadgen").unwrap(),
                AttestationMechanism::symmetric_key(),
            ),
            &IfMatch::Absent,
        )
        .expect("enroll the load group");
        group.attestation.symmetric_key.and_then(|k| k.primary_key).expect("generated key")
    }

    fn provisioner<S: ProvisioningStore>(
        store: S,
        crypto: Arc<RingCrypto>,
        retry_after: u32,
    ) -> Provisioner<S> {
        let mut config = ProvisionerConfig::new(IdScope::new(SCOPE).unwrap());
        config.retry_after_secs = retry_after;
        Provisioner::new(config, store, crypto, Allocator::new(vec![LinkedHub::new(HUB)]))
    }

    pub async fn start(memory: bool, retry_after: u32) -> (Target, Server) {
        let dir = tempfile::tempdir().expect("temp dir");
        let crypto = Arc::new(RingCrypto::new());
        let (service, group_key_b64): (Arc<dyn DpsService>, String) = if memory {
            let store = Arc::new(MemoryStore::new());
            let key = enroll(store.as_ref(), &crypto);
            let mut hubs = EmbeddedHubs::new();
            hubs.insert(EmbeddedHub::in_memory(HUB, crypto.clone()).expect("embedded hub"));
            let provisioner = provisioner(store, crypto, retry_after);
            (Arc::new(EngineService::new(provisioner, Arc::new(Mutex::new(hubs)))), key)
        } else {
            let store = SqliteStore::open(dir.path().join("zerotouch.db")).expect("SQLite store");
            let key = enroll(&store, &crypto);
            let mut hubs = EmbeddedHubs::new();
            hubs.insert(EmbeddedHub::over(HUB, store.clone(), crypto.clone()).expect("embedded hub"));
            let provisioner = provisioner(store, crypto, retry_after);
            (Arc::new(EngineService::new(provisioner, Arc::new(Mutex::new(hubs)))), key)
        };

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "zerotouch loadgen CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let tls = zerotouch_transport::tls::server_config(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server TLS config");

        let listener = zerotouch_transport::limits::listen(([127, 0, 0, 1], 0).into()).expect("bind");
        let host = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(zerotouch_transport::mqtt::serve_mqtt(
            listener,
            Arc::new(tls),
            service,
            Limits::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let group_key = STANDARD.decode(&group_key_b64).expect("base64 key");
        let target = Target {
            host,
            ca_pem: ca.pem().into_bytes(),
            id_scope: SCOPE.to_owned(),
            group_key,
            group_key_b64,
        };
        (target, Server { _stop: stop, _dir: dir })
    }
}
