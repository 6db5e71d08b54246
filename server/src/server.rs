//! `zerotouch serve` as a library: bind the listeners, run the endpoints over one engine,
//! stop gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_proto::IdScope;
use zerotouch_transport::limits::Limits;
use zerotouch_transport::service::{now, DpsService};

use crate::backend::Backend;
use crate::config::{ServeConfig, TlsFiles};
use crate::datadir;
use crate::error::ServerError;
use crate::service::{self, Service};

/// How often expired operations are purged and queued hub lifecycle events are drained.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

/// A running server. Stop it with [`ServerHandle::shutdown`]; dropping the handle also stops
/// the endpoints, but without waiting for them or closing the stores off the runtime.
pub struct ServerHandle<B: Backend> {
    mqtt_addr: SocketAddr,
    https_addr: SocketAddr,
    id_scope: IdScope,
    ca_cert: Option<PathBuf>,
    tls: TlsFiles,
    service: Arc<Service<B>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl<B: Backend> std::fmt::Debug for ServerHandle<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("https_addr", &self.https_addr)
            .field("id_scope", &self.id_scope)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> ServerHandle<B> {
    /// The bound MQTT/TLS address (the real port when 0 was asked for).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The bound HTTPS (and MQTT over WebSockets) address.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The ID scope devices must name.
    pub fn id_scope(&self) -> &IdScope {
        &self.id_scope
    }

    /// The development CA devices must trust; `None` when the operator gave a certificate.
    pub fn ca_cert(&self) -> Option<&PathBuf> {
        self.ca_cert.as_ref()
    }

    /// The server certificate chain and key in use.
    pub fn tls_files(&self) -> &TlsFiles {
        &self.tls
    }

    /// The engine the endpoints call (provisioner and embedded hubs).
    pub fn service(&self) -> &Arc<Service<B>> {
        &self.service
    }

    /// Stops accepting, lets open connections finish their requests (within the endpoints'
    /// grace period) and waits for every task.
    pub async fn shutdown(self) {
        let ServerHandle { service, stop, tasks, .. } = self;
        let _ = stop.send(true);
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a server task failed");
            }
        }
        // The last reference closes the stores, and a database client may block doing so.
        let closed = tokio::task::spawn_blocking(move || {
            let closed = B::close(service.provisioner().store());
            drop(service);
            closed
        });
        match closed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the stores failed"),
            Err(e) => tracing::warn!(error = %e, "closing the stores failed"),
        }
        zerotouch_transport::limits::report_held_back_log_lines();
        tracing::info!("stopped");
    }
}

/// Starts a server on `backend`: resolves the ID scope and certificates in the data directory,
/// binds both listeners and runs the endpoints until [`ServerHandle::shutdown`].
///
/// # Errors
/// Data directory, certificate, store and bind failures.
pub async fn start<B: Backend>(config: &ServeConfig, backend: B) -> Result<ServerHandle<B>, ServerError> {
    start_with_limits(
        config,
        backend,
        Limits { max_connections: config.max_connections, ..Limits::default() },
    )
    .await
}

/// [`start`] with endpoint limits other than the defaults.
///
/// # Errors
/// As [`start`].
pub async fn start_with_limits<B: Backend>(
    config: &ServeConfig,
    mut backend: B,
    limits: Limits,
) -> Result<ServerHandle<B>, ServerError> {
    let data_dir = &config.store.data_dir;
    datadir::ensure_dir(data_dir)?;
    match backend.store_kind() {
        Some(kind) => datadir::mark_store(data_dir, kind)?,
        None => datadir::refuse_other_store(data_dir)?,
    }
    if let Some(limit) = open_files_limit() {
        // Each connection holds a descriptor; the stores, listeners and logs a few more.
        if config.max_connections.saturating_add(64) > limit {
            tracing::warn!(
                max_connections = config.max_connections,
                open_files = limit,
                "more connections are allowed than this process may open files (ulimit -n): raise the limit or lower --max-connections"
            );
        }
    }
    // Servers sharing a database serve its ID scope: the first one's, given or generated.
    let proposed = match &config.id_scope {
        Some(given) => given.clone(),
        None => datadir::id_scope(data_dir)?,
    };
    let asked = proposed.clone();
    // Reading a database blocks.
    let (returned, shared) = tokio::task::spawn_blocking(move || {
        let shared = backend.shared_id_scope(&asked);
        (backend, shared)
    })
    .await
    .map_err(|e| ServerError::Store(format!("reading the shared ID scope: {e}")))?;
    backend = returned;
    let id_scope = match shared? {
        Some(shared) if shared != proposed && config.id_scope.is_some() => {
            tracing::warn!(
                id_scope = %proposed,
                database = %shared,
                "--id-scope differs from the ID scope of the shared database: devices of the other servers cannot use this one"
            );
            proposed
        }
        Some(shared) if shared != proposed => {
            tracing::info!(
                id_scope = %shared,
                replaced = %proposed,
                "serving the ID scope of the shared database; the data directory's id-scope follows it"
            );
            datadir::set_id_scope(data_dir, &shared)?;
            shared
        }
        _ => proposed,
    };
    if config.id_scope.is_some() {
        // The data directory's `id-scope` names what this server serves, given or not, so that
        // scripts reading it (and the next start without --id-scope) use the same. Replacing
        // another one is worth a warning: its devices are answered 404 from now on.
        match datadir::kept_id_scope(data_dir) {
            // Scopes are matched case-insensitively: a difference in case refuses nobody.
            Ok(Some(kept)) if !kept.as_str().eq_ignore_ascii_case(id_scope.as_str()) => tracing::warn!(
                id_scope = %id_scope,
                kept = %kept,
                "--id-scope {id_scope} replaces the data directory's ID scope {kept}: devices that name {kept} are refused (404) from now on"
            ),
            // An unreadable kept scope is what the flag repairs.
            Err(e) => {
                tracing::warn!(error = %e, "--id-scope {id_scope} replaces the data directory's unreadable ID scope")
            }
            _ => {}
        }
        datadir::set_id_scope(data_dir, &id_scope)?;
    }
    let (tls, ca_cert) = match &config.tls {
        Some(files) => (files.clone(), None),
        None => {
            let dev = datadir::dev_certificates(data_dir)?;
            if dev.generated {
                tracing::info!(ca = %dev.ca_cert.display(), "generated a development CA and server certificate");
            } else if dev.reissued {
                tracing::info!(
                    server_cert = %dev.server_cert.display(),
                    "issued a new development server certificate from the kept CA (devices keep trusting it)"
                );
            }
            if config.store.database_url.is_some() {
                tracing::warn!(
                    "the development certificates are this data directory's: servers sharing the \
                     database serve one ID scope but other certificates unless every one is given \
                     the same --tls-cert and --tls-key"
                );
            }
            (dev.tls_files(), Some(dev.ca_cert))
        }
    };
    let tls_config =
        zerotouch_transport::tls::server_config_from_files(&tls.cert, &tls.key).map_err(|e| {
            ServerError::Certificate(format!("{} with {}: {e}", tls.cert.display(), tls.key.display()))
        })?;
    if let Some(warning) =
        std::fs::read_to_string(&tls.cert).ok().and_then(|pem| validity_warning(&pem, now()))
    {
        tracing::warn!(cert = %tls.cert.display(), "{warning}");
    }
    let tls_config = Arc::new(tls_config);

    let bind = |addr: SocketAddr| {
        zerotouch_transport::limits::listen(addr)
            .map_err(|source| ServerError::Listen { addr: addr.to_string(), source })
    };
    let mqtt = bind(config.mqtt_listen)?;
    let https = bind(config.https_listen)?;
    let local = |l: &TcpListener, a: SocketAddr| {
        l.local_addr().map_err(|source| ServerError::Listen { addr: a.to_string(), source })
    };
    let mqtt_addr = local(&mqtt, config.mqtt_listen)?;
    let https_addr = local(&https, config.https_listen)?;

    let crypto = Arc::new(RingCrypto::new());
    let hubs = config.hubs.clone();
    let scope = id_scope.clone();
    let retry_after = config.retry_after_secs;
    // Opening a database blocks.
    let service =
        tokio::task::spawn_blocking(move || service::build(&backend, scope, &hubs, crypto, retry_after))
            .await
            .map_err(|e| ServerError::Store(format!("opening the stores: {e}")))??;
    let service = Arc::new(service);
    let dps: Arc<dyn DpsService> = service.clone();

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the handle was dropped: stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let tasks = vec![
        tokio::spawn(zerotouch_transport::mqtt::serve_mqtt(
            mqtt,
            Arc::clone(&tls_config),
            Arc::clone(&dps),
            limits.clone(),
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(zerotouch_transport::http::serve_https(
            https,
            Arc::clone(&tls_config),
            Arc::clone(&dps),
            limits,
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(maintenance::<B>(Arc::clone(&service), config.hubs.clone(), stopped)),
    ];

    tracing::info!(
        %mqtt_addr,
        %https_addr,
        id_scope = %id_scope,
        hubs = ?config.hubs.iter().map(|h| format!("{}:{}", h.name, h.weight)).collect::<Vec<_>>(),
        "serving"
    );
    Ok(ServerHandle { mqtt_addr, https_addr, id_scope, ca_cert, tls, service, stop, tasks })
}

/// Purges operations past their retention and drains the hubs' lifecycle events, which no
/// route consumes yet, so they do not pile up in memory.
async fn maintenance<B: Backend>(
    service: Arc<Service<B>>,
    hubs: Vec<crate::config::HubSpec>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let service = Arc::clone(&service);
        let hubs = hubs.clone();
        let work = tokio::task::spawn_blocking(move || {
            match service.provisioner().purge_operations(now()) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "expired operations purged"),
                Err(e) => tracing::warn!(error = %e, "purging operations failed"),
            }
            if let Ok(embedded) = service.hubs().lock() {
                for spec in &hubs {
                    if let Some(hub) = embedded.hub(&spec.name) {
                        let events = hub.take_lifecycle_events();
                        if !events.is_empty() {
                            tracing::debug!(hub = %spec.name, events = events.len(), "device lifecycle events");
                        }
                    }
                }
            }
        });
        if let Err(e) = work.await {
            tracing::warn!(error = %e, "maintenance failed");
        }
    }
}

/// The soft limit on open files of this process, where the system says (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// What is wrong with the validity window of the first certificate of `pem` at `now`, if
/// anything: devices refuse a server certificate that has expired or is not valid yet.
fn validity_warning(pem: &str, now: zerotouch_proto::Timestamp) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let first = &pem[..pem.find(END)? + END.len()];
    let cert = zerotouch_engine::attestation::x509::Certificate::from_text(first).ok()?;
    if now > cert.not_after() {
        Some(format!("the server certificate expired at {}: devices will refuse it", cert.not_after()))
    } else if now < cert.not_before() {
        Some(format!(
            "the server certificate is valid only from {}: devices will refuse it",
            cert.not_before()
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use zerotouch_proto::Timestamp;
    use zerotouch_testkit::certs::{CertSpec, TestCa};

    use super::validity_warning;

    #[test]
    fn the_open_files_limit_is_read_where_the_system_tells_it() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(super::open_files_limit().is_some_and(|n| n > 0));
        }
    }

    #[test]
    fn a_server_certificate_outside_its_validity_is_reported() {
        let now = Timestamp::from_unix_secs(1_780_272_000);
        let ca = TestCa::root("Server CA");
        let chain = |spec: CertSpec| {
            let leaf = ca.device_with(spec);
            format!("{}{}", leaf.pem(), ca.pem())
        };
        assert_eq!(validity_warning(&chain(CertSpec::new("localhost")), now), None);
        let expired = validity_warning(&chain(CertSpec::new("localhost").expired_at(now)), now).unwrap();
        assert!(expired.contains("expired"), "{expired}");
        let early = CertSpec::new("localhost").not_yet_valid_at(now + std::time::Duration::from_secs(60));
        assert!(validity_warning(&chain(early), now).unwrap().contains("valid only from"));
    }
}
