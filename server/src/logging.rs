//! Log set-up: `RUST_LOG` as asked, under ceilings for libraries whose verbose output carries secrets,
//! with library noise that our own errors already report held back unless asked for.

use std::io::IsTerminal as _;

use tracing::{Level, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::cli::LogFormat;

/// Libraries (target prefixes) whose output above a level carries secrets, and that level.
const CEILINGS: &[(&str, Level)] = &[
    // tungstenite's trace output dumps whole WebSocket frames, and the frame that carries an MQTT
    // CONNECT carries the device's SAS token (client and server alike).
    ("tungstenite", Level::DEBUG),
    ("tokio_tungstenite", Level::DEBUG),
    // tokio-postgres logs every statement with its parameters at debug: enrollment keys, the
    // device keys of hub identities.
    ("tokio_postgres", Level::INFO),
];

/// Whether an event of `target` at `level` may be logged whatever `RUST_LOG` says.
pub fn within_ceilings(target: &str, level: Level) -> bool {
    CEILINGS.iter().all(|(prefix, ceiling)| {
        let ours = target.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
        // More verbose levels compare greater.
        !ours || level <= *ceiling
    })
}

/// Library targets held back unless `RUST_LOG` names the library (its first path segment), and
/// why: unlike [`CEILINGS`], which nothing raises, these are only defaults.
const QUIETED: &[(&str, &str)] = &[
    // rumqttc logs `ERROR rumqttc::state: Invalid incoming packet = Disconnect` (and unsolicited
    // acknowledgements) when the service sends a packet its state does not expect, then returns
    // the error, which our client handles: it polls again on a new connection, or reports that
    // the service closed the connection. The line would otherwise reach the user of `device
    // register` even when the registration succeeds. Everything else at this target is debug
    // detail of packets.
    ("rumqttc::state", "rumqttc"),
];

/// The filter for `rust_log` (`RUST_LOG`'s value; `info` when unset), with library targets that
/// only repeat errors we report (`rumqttc::state`) off unless it names their library, and a
/// warning to show when the value could not be read and `info` is used instead.
pub fn env_filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let given = rust_log.filter(|v| !v.trim().is_empty());
    let (mut filter, warning) = match given {
        None => (EnvFilter::new("info"), None),
        Some(value) => match EnvFilter::builder().parse(value) {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!("RUST_LOG={value:?} is not understood ({e}); logging at info")),
            ),
        },
    };
    let asked_for = given.filter(|_| warning.is_none()).unwrap_or_default();
    for (target, library) in QUIETED {
        if !names_library(asked_for, library) {
            // More specific than every directive given (none names the library), so it wins.
            if let Ok(off) = format!("{target}=off").parse() {
                filter = filter.add_directive(off);
            }
        }
    }
    (filter, warning)
}

/// Whether a directive of `rust_log` is about `library` or one of its modules.
fn names_library(rust_log: &str, library: &str) -> bool {
    rust_log.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or_default().trim();
        target.strip_prefix(library).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Whether [`init`] chose JSON lines.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says `message` on stderr as the command-line's own line (`zerotouch: …`), or, with
/// `--log-format json`, as a JSON log line at `warn` (`fatal == false`) or `error`, so that a
/// pipeline reading JSON lines never gets one it cannot parse.
pub fn report(message: &str, fatal: bool) {
    match (JSON.load(std::sync::atomic::Ordering::Relaxed), fatal) {
        (true, true) => tracing::error!("{message}"),
        (true, false) => tracing::warn!("{message}"),
        (false, true) => eprintln!("zerotouch: {message}"),
        (false, false) => eprintln!("zerotouch: warning: {message}"),
    }
}

/// Installs the process's logger on stderr: `RUST_LOG` (default `info`) in `format` (text in
/// colour only on a terminal, and not with `NO_COLOR` set), with the
/// ceilings of [`within_ceilings`] applied on top (they only ever hide, never raise). Records
/// of the `log` crate (rumqttc, tungstenite) are logged as events of their target.
pub fn init(format: LogFormat) {
    JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let (filter, warning) = env_filter(std::env::var("RUST_LOG").ok().as_deref());
    // Colours only for a person at a terminal: a log file or a journal gets plain text.
    let colours = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    subscriber(format, filter, std::io::stderr, colours).init();
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
}

/// The subscriber [`init`] installs, writing `format` lines to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    colours: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let ceilings = filter_fn(|meta| within_ceilings(meta.target(), *meta.level()));
    let logs = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(colours);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => Box::new(registry.with(logs.with_filter(ceilings))),
        LogFormat::Json => Box::new(registry.with(logs.json().with_filter(ceilings))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tracing_subscriber::util::SubscriberInitExt as _;

    use super::*;

    #[test]
    fn statement_parameters_and_websocket_frames_never_reach_the_log() {
        assert!(!within_ceilings("tokio_postgres::query", Level::DEBUG));
        assert!(!within_ceilings("tokio_postgres", Level::TRACE));
        assert!(within_ceilings("tokio_postgres::connection", Level::INFO));
        assert!(within_ceilings("tokio_postgres", Level::WARN));
        assert!(!within_ceilings("tungstenite::protocol", Level::TRACE));
        assert!(within_ceilings("tungstenite::protocol", Level::DEBUG));
        assert!(!within_ceilings("tokio_tungstenite", Level::TRACE));
    }

    #[test]
    fn other_targets_log_at_every_level() {
        assert!(within_ceilings("zerotouch_transport::mqtt", Level::TRACE));
        // A prefix of a name is not the library.
        assert!(within_ceilings("tokio_postgresql_fork", Level::TRACE));
        assert!(within_ceilings("postgres::config", Level::DEBUG));
    }

    /// What a [`subscriber`] writes, for reading back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Captured;
        fn make_writer(&self) -> Captured {
            self.clone()
        }
    }

    /// The lines `emit` logs on this thread through the logger [`init`] would install for
    /// `RUST_LOG=rust_log` (`log` records included).
    fn logged(rust_log: Option<&str>, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let (filter, warning) = env_filter(rust_log);
        assert_eq!(warning, None);
        let guard = subscriber(LogFormat::Text, filter, captured.clone(), false).set_default();
        emit();
        drop(guard);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn rumqttcs_error_line_for_a_disconnect_from_the_service_is_held_back_unless_rust_log_names_rumqttc() {
        // What rumqttc's event loop does when the service sends an MQTT DISCONNECT: its state
        // logs an error through `log`, and the error it returns is our client's to report.
        let disconnect = || {
            let mut state = rumqttc::MqttState::new(10, false);
            assert!(state.handle_incoming_packet(rumqttc::Incoming::Disconnect).is_err());
            tracing::error!(target: "zerotouch_server::cli", "registration: the service closed the connection");
        };
        for rust_log in [None, Some("warn"), Some("trace"), Some("error,zerotouch_server=debug")] {
            let text = logged(rust_log, disconnect);
            assert!(!text.contains("Invalid incoming packet"), "RUST_LOG={rust_log:?}: {text}");
            assert!(text.contains("the service closed the connection"), "RUST_LOG={rust_log:?}: {text}");
        }
        for rust_log in ["rumqttc=error", "warn,rumqttc::state=debug"] {
            let text = logged(Some(rust_log), disconnect);
            assert!(
                text.contains("rumqttc::state: Invalid incoming packet = Disconnect"),
                "{rust_log}: {text}"
            );
        }
        // A library is named by its own name, not by one it is a prefix of.
        assert!(names_library("info,rumqttc[span]=trace", "rumqttc"));
        assert!(!names_library("rumqttc_fork=debug,zerotouch=trace", "rumqttc"));
    }

    #[test]
    fn an_unreadable_rust_log_is_reported_and_info_used() {
        let (filter, warning) = env_filter(Some("zerotouch=loud"));
        assert!(warning.is_some_and(|w| w.contains("zerotouch=loud")));
        assert_eq!(filter.max_level_hint(), Some(tracing::level_filters::LevelFilter::INFO));
        let (filter, warning) = env_filter(Some("warn,zerotouch=debug"));
        assert!(warning.is_none());
        assert_eq!(filter.max_level_hint(), Some(tracing::level_filters::LevelFilter::DEBUG));
        assert!(env_filter(None).1.is_none());
    }
}
