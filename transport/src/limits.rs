//! Limits that keep a device endpoint alive under bad or excessive input, shared by MQTT, HTTPS and WebSockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Connections the kernel holds for a listener before it accepts them; the kernel caps it at
/// `net.core.somaxconn` (4096 on Linux since 5.4). `TcpListener::bind` asks for 128, as std does,
/// and a fleet reconnecting at once overflows that: every SYN beyond it is dropped and its device
/// waits for its retransmission (1 s, then 3 s, 7 s, …) before the server ever sees it.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` for a device endpoint, with a [`LISTEN_BACKLOG`] long accept queue
/// (and, as `TcpListener::bind`, `SO_REUSEADDR` on Unix, so a restarted server gets its port back
/// while old connections linger in `TIME_WAIT`).
///
/// # Errors
/// The socket, bind or listen error.
///
/// # Panics
/// Outside a tokio runtime (as `TcpListener::from_std`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resource limits of the device endpoints.
///
/// Clones share one [`Admission`] counter, so give every listener of a server clones of the same
/// `Limits` when `max_concurrent_requests` is meant server-wide.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest MQTT packet accepted (remaining length, bytes); a bigger one cuts the connection.
    /// Default 96 KiB plus headroom for the topic, matching DPS' 96 KB message limit.
    pub max_packet_size: usize,
    /// Largest request body (HTTPS body, MQTT register payload), bytes. Default 96 KiB.
    pub max_body_size: usize,
    /// Time from accepting the TCP connection to a complete CONNECT (TLS handshake included).
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// HTTPS: how long a client may take to send a request's headers, counted from the TLS
    /// handshake or from the previous reply (so it also bounds a silent connection and an idle
    /// kept-alive one), and then its body. A client that misses it is answered 408 or cut off.
    /// Default 10 s, as [`Limits::connect_timeout`] gives an MQTT device for its CONNECT.
    pub request_timeout: Duration,
    /// How long an MQTT connection may stay silent when the client asked for no keep-alive
    /// (keep-alive 0, the C SDK's default). When the client sets a keep-alive,
    /// [`Limits::idle_timeout_for`] uses 1.5 × that instead, as MQTT 3.1.1 §3.1.2.10 says.
    /// Default 300 s.
    pub idle_timeout: Duration,
    /// Requests of one connection being processed at once; further publishes wait in the
    /// socket (back-pressure). Default 8.
    pub max_in_flight_per_connection: usize,
    /// Requests admitted at once, over all connections sharing this `Limits`: running in the
    /// engine or waiting for one of its [`Limits::max_engine_threads`]; beyond it a request is
    /// answered 429 with `retry-after`. A waiting request holds no thread, only its decoded
    /// form, so the cap can absorb the burst of a fleet reconnecting at once. Default 10 000, as
    /// many as [`Limits::max_connections`]: a burst in which every open connection sends its one
    /// request (CONNECT's check, a register) queues instead of being refused; only connections
    /// with several requests in flight can reach it.
    pub max_concurrent_requests: usize,
    /// Engine calls running at once, each on a thread of tokio's blocking pool (stores block);
    /// admitted requests beyond it wait, in arrival order, without a thread. On a few cores a
    /// few dozen threads keep the engine busy, and hundreds only add context switches and
    /// contention on the store's locks. Default 32.
    pub max_engine_threads: usize,
    /// How long an engine call may take, waiting for a thread included, before its request is
    /// answered 500: a store that hangs (a database behind a network partition) then costs each
    /// device one late error, which the SDKs retry, instead of a request that never ends. Below
    /// the SDKs' own 30 s. The call itself cannot be stopped and keeps its thread until it
    /// returns. Default 20 s.
    pub engine_timeout: Duration,
    /// The `retry-after` seconds of a 429 reply. Default 3.
    pub throttle_retry_after_secs: u32,
    /// On shutdown, how long open connections get to finish the request they are processing.
    /// Default 10 s.
    pub shutdown_grace: Duration,
    /// Open connections at once, over all listeners sharing this `Limits` (TLS handshakes
    /// included); a connection beyond it is closed as soon as it is accepted, so the server keeps
    /// file descriptors and memory for the ones it serves. Default 10 000.
    pub max_connections: usize,
    /// The requests currently admitted (shared by clones).
    pub admission: Admission,
    /// The connections currently open (shared by clones).
    pub connections: Admission,
    /// The engine threads in use (shared by clones).
    pub engine_threads: EngineThreads,
    /// The MQTT clients connected now, by client id (shared by clones).
    pub mqtt_clients: ClientIds,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet_size: 96 * 1024 + 1024,
            max_body_size: 96 * 1024,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_in_flight_per_connection: 8,
            max_concurrent_requests: 10_000,
            max_engine_threads: 32,
            engine_timeout: Duration::from_secs(20),
            throttle_retry_after_secs: 3,
            shutdown_grace: Duration::from_secs(10),
            max_connections: 10_000,
            admission: Admission::default(),
            connections: Admission::default(),
            engine_threads: EngineThreads::default(),
            mqtt_clients: ClientIds::default(),
        }
    }
}

impl Limits {
    /// How long an MQTT connection may stay silent given the keep-alive (seconds) of its CONNECT.
    pub fn idle_timeout_for(&self, keep_alive_secs: u16) -> Duration {
        if keep_alive_secs == 0 {
            self.idle_timeout
        } else {
            Duration::from_millis(u64::from(keep_alive_secs) * 1500)
        }
    }

    /// Admits one request if fewer than `max_concurrent_requests` are being processed; the
    /// request counts until the permit is dropped. `None` means answer 429.
    pub fn admit(&self) -> Option<AdmissionPermit> {
        self.admission.try_admit(self.max_concurrent_requests)
    }

    /// Runs the engine call `f` of an admitted request on the blocking pool once one of the
    /// [`Limits::max_engine_threads`] is free (waiting without a thread until then), and returns
    /// its result; `None` (the cause logged) when `f` panicked or did not return within
    /// [`Limits::engine_timeout`]. The request's `permit` is held until `f` returns.
    pub async fn run_engine<T: Send + 'static>(
        &self,
        permit: AdmissionPermit,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let call = async {
            let thread = self.engine_threads.acquire(self.max_engine_threads).await;
            tokio::task::spawn_blocking(move || {
                let _held = (permit, thread);
                f()
            })
            .await
        };
        match tokio::time::timeout(self.engine_timeout, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "provisioning call failed");
                None
            }
            Err(_) => {
                static SLOW_CALLS: LogBudget =
                    LogBudget::new(1, "warnings about slow provisioning calls held back");
                if SLOW_CALLS.allows() {
                    tracing::warn!(
                        secs = self.engine_timeout.as_secs_f64(),
                        "a provisioning call did not finish in time (is the store reachable?); answered 500"
                    );
                }
                None
            }
        }
    }

    /// Admits one accepted connection if fewer than `max_connections` are open; it counts until
    /// the permit is dropped. `None` means close it. Logs refusals at most once a second.
    pub fn admit_connection(&self, peer: std::net::SocketAddr) -> Option<AdmissionPermit> {
        let permit = self.connections.try_admit(self.max_connections);
        if permit.is_none() {
            static LIMIT_WARNINGS: LogBudget = LogBudget::new(1, "connection-limit warnings held back");
            if LIMIT_WARNINGS.allows() {
                tracing::warn!(%peer, max = self.max_connections, "connection limit reached; closing new connections");
            }
        }
        permit
    }
}

/// A counter of requests being processed (or connections open), shared by the clones of one
/// [`Limits`].
#[derive(Debug, Clone, Default)]
pub struct Admission {
    active: Arc<AtomicUsize>,
}

impl Admission {
    /// Admits one request when fewer than `max` are active.
    pub fn try_admit(&self, max: usize) -> Option<AdmissionPermit> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| AdmissionPermit { active: Arc::clone(&self.active) })
    }

    /// Requests being processed now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// The engine threads in use, shared by the clones of one [`Limits`]: a semaphore sized by the
/// first [`Limits::max_engine_threads`] that uses it.
#[derive(Debug, Clone, Default)]
pub struct EngineThreads {
    slots: Arc<OnceLock<Arc<Semaphore>>>,
}

impl EngineThreads {
    /// Waits for a free engine thread (first come, first served).
    async fn acquire(&self, max: usize) -> Option<OwnedSemaphorePermit> {
        let slots = self.slots.get_or_init(|| Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))));
        // The semaphore is never closed, so this only fails if that changes; then the call
        // runs unthrottled rather than not at all.
        Arc::clone(slots).acquire_owned().await.ok()
    }
}

/// The MQTT clients connected now, by ID scope and client id (the registration id, matched
/// case-insensitively as registration ids are), shared by the clones of one [`Limits`]: a client
/// that connects with the id of a connected client takes over from it, and the older connection
/// is closed (MQTT 3.1.1 §3.1.4-2), as a device that reconnects after losing its network would
/// otherwise leave a half-open connection holding a slot until its keep-alive ran out.
#[derive(Debug, Clone, Default)]
pub struct ClientIds {
    connected: Arc<Mutex<HashMap<String, Holder>>>,
    next: Arc<AtomicU64>,
}

impl ClientIds {
    /// Records the connection of `client_id` in `id_scope`, which `taken_over` will tell when a
    /// newer connection claims the same id, and tells the connection that held it before (if any)
    /// through its own. The claim lasts until the returned [`ClientClaim`] is dropped.
    pub fn claim(&self, id_scope: &str, client_id: &str, taken_over: &Arc<Notify>) -> ClientClaim {
        let key = format!("{}/{}", id_scope.to_ascii_lowercase(), client_id.to_ascii_lowercase());
        let serial = self.next.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), (serial, Arc::clone(taken_over)));
        if let Some((_, earlier)) = previous {
            // Stored if that connection is not waiting yet: it sees it on its next pass.
            earlier.notify_one();
        }
        ClientClaim { clients: self.clone(), key, serial }
    }

    /// Clients connected now.
    pub fn len(&self) -> usize {
        self.connected.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The connection holding a client id: its serial number, and how to tell it to close.
type Holder = (u64, Arc<Notify>);

/// A connection's hold on its client id (see [`ClientIds::claim`]); dropping it releases the id
/// unless a newer connection has taken it over.
#[derive(Debug)]
pub struct ClientClaim {
    clients: ClientIds,
    key: String,
    serial: u64,
}

impl Drop for ClientClaim {
    fn drop(&mut self) {
        let mut connected = self.clients.connected.lock().unwrap_or_else(PoisonError::into_inner);
        if connected.get(&self.key).is_some_and(|(serial, _)| *serial == self.serial) {
            connected.remove(&self.key);
        }
    }
}

/// One admitted request or connection; dropping it frees the slot.
#[derive(Debug)]
pub struct AdmissionPermit {
    active: Arc<AtomicUsize>,
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lines a second that clients may cause in the log (refused requests and CONNECTs, cut
/// connections), all endpoints together. Each is one info line an operator wants to see; a flood
/// of bogus requests would otherwise write one per request (40 MB in 25 s) and fill the disk.
pub const CLIENT_LOG_LINES_PER_SECOND: u32 = 20;

/// The budget of the lines clients cause, shared by every endpoint of the process.
pub(crate) static CLIENT_LOG: LogBudget =
    LogBudget::new(CLIENT_LOG_LINES_PER_SECOND, "log lines about refused requests and connections held back");

/// Logs how many lines about refused requests and connections were held back since the last
/// one logged: for a server that stops, whose last held-back count no later line would report.
pub fn report_held_back_log_lines() {
    let held_back = CLIENT_LOG.take_held_back();
    if held_back > 0 {
        tracing::info!(held_back, per_second = CLIENT_LOG.per_second, "{}", CLIENT_LOG.held_back_message);
    }
}

/// A cap of log lines a second. Lines over it are held back and counted; the count is logged
/// before the next line that fits (a flood followed by silence leaves its count unreported
/// until the next line).
#[derive(Debug)]
pub(crate) struct LogBudget {
    per_second: u32,
    /// The message of the line that reports the lines held back.
    held_back_message: &'static str,
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Start of the current one-second window.
    window: Option<std::time::Instant>,
    /// Lines logged in it.
    logged: u32,
    /// Lines held back since the last one logged.
    held_back: u64,
}

impl LogBudget {
    pub(crate) const fn new(per_second: u32, held_back_message: &'static str) -> Self {
        Self {
            per_second,
            held_back_message,
            state: std::sync::Mutex::new(BudgetState { window: None, logged: 0, held_back: 0 }),
        }
    }

    /// Whether a line may be logged at `now`: `Some(n)` with the `n` lines held back before
    /// it, `None` when it is to be held back (and counted).
    fn take_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.window.is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1)) {
            state.window = Some(now);
            state.logged = 0;
        }
        if state.logged >= self.per_second {
            state.held_back += 1;
            return None;
        }
        state.logged += 1;
        Some(std::mem::take(&mut state.held_back))
    }

    /// Takes the count of lines held back since the last one logged.
    fn take_held_back(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).held_back)
    }

    /// Whether a line may be logged now; first logs how many were held back, if any.
    pub(crate) fn allows(&self) -> bool {
        match self.take_at(std::time::Instant::now()) {
            Some(0) => true,
            Some(held_back) => {
                tracing::info!(held_back, per_second = self.per_second, "{}", self.held_back_message);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_holds_back_what_exceeds_its_rate_and_counts_it() {
        let budget = LogBudget::new(3, "held back");
        let start = std::time::Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let taken: Vec<_> = (0..5).map(|i| budget.take_at(at(i * 10))).collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None]);
        // The next window starts a second after the last one did, and hears of the two.
        assert_eq!(budget.take_at(at(999)), None);
        assert_eq!(budget.take_at(at(1_000)), Some(3));
        assert_eq!(budget.take_at(at(1_001)), Some(0));
        // A clock that seems to go back (another thread's `now`) does not open a window.
        assert_eq!(budget.take_at(at(500)), Some(0));
        assert_eq!(budget.take_at(at(500)), None);
        // What is held back when nothing more comes can be taken (a server that stops).
        assert_eq!(budget.take_held_back(), 1);
        assert_eq!(budget.take_held_back(), 0);
    }

    #[tokio::test]
    async fn connections_made_before_the_server_accepts_wait_in_the_listen_queue() {
        let listener = listen(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        // None accepted yet: each connect completes in the kernel's queue (a dropped SYN would
        // leave it waiting a second for its retransmission, past the timeout). More than std's
        // 128 when the kernel allows it (it caps the queue at `net.core.somaxconn`).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(128);
        let mut clients = Vec::new();
        for _ in 0..cap.min(200) {
            let client =
                tokio::time::timeout(Duration::from_millis(900), tokio::net::TcpStream::connect(addr));
            clients.push(client.await.expect("queued, not dropped").unwrap());
        }
        for _ in 0..clients.len() {
            tokio::time::timeout(Duration::from_secs(5), listener.accept()).await.unwrap().unwrap();
        }
        // The port can be bound again as soon as the listener is gone, connections or not.
        drop(listener);
        drop(listen(addr).unwrap());
    }

    #[test]
    fn admission_refuses_beyond_the_cap_and_frees_on_drop() {
        let limits = Limits { max_concurrent_requests: 2, ..Limits::default() };
        let shared = limits.clone();
        let a = limits.admit();
        let b = shared.admit();
        assert!(a.is_some() && b.is_some());
        assert!(limits.admit().is_none());
        drop(a);
        assert_eq!(shared.admission.active(), 1);
        assert!(shared.admit().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_beyond_the_engine_threads_wait_for_one_instead_of_being_refused() {
        let limits = Limits { max_engine_threads: 1, ..Limits::default() };
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = (0..4).map(|i| {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            let permit = limits.admit().unwrap();
            let limits = limits.clone();
            tokio::spawn(async move {
                limits
                    .run_engine(permit, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                    .await
            })
        });
        let calls: Vec<_> = calls.collect();
        // All four were admitted at once, although one thread serves them.
        assert_eq!(limits.admission.active(), 4);
        let mut answered = Vec::new();
        for call in calls {
            answered.push(call.await.unwrap().unwrap());
        }
        assert_eq!(answered, [0, 1, 2, 3]);
        assert_eq!(most.load(Ordering::SeqCst), 1, "one engine call at a time");
        assert_eq!(limits.admission.active(), 0, "every permit released");
    }

    #[test]
    fn keep_alive_sets_idle_timeout_to_one_and_a_half_times() {
        let limits = Limits::default();
        assert_eq!(limits.idle_timeout_for(60), Duration::from_secs(90));
        assert_eq!(limits.idle_timeout_for(0), limits.idle_timeout);
    }
}
