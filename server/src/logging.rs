//! Log set-up: `RUST_LOG` as asked, under ceilings for libraries whose verbose output carries secrets.

use std::io::IsTerminal as _;

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
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

/// The filter for `rust_log` (`RUST_LOG`'s value; `info` when unset), and a warning to show
/// when the value could not be read and `info` is used instead.
pub fn env_filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.filter(|v| !v.trim().is_empty()) {
        None => (EnvFilter::new("info"), None),
        Some(value) => match EnvFilter::builder().parse(value) {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!("RUST_LOG={value:?} is not understood ({e}); logging at info")),
            ),
        },
    }
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
/// ceilings of [`within_ceilings`] applied on top (they only ever hide, never raise).
pub fn init(format: LogFormat) {
    JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let (filter, warning) = env_filter(std::env::var("RUST_LOG").ok().as_deref());
    let ceilings = filter_fn(|meta| within_ceilings(meta.target(), *meta.level()));
    // Colours only for a person at a terminal: a log file or a journal gets plain text.
    let colours = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colours);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(logs.with_filter(ceilings)).init(),
        LogFormat::Json => registry.with(logs.json().with_filter(ceilings)).init(),
    }
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
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
