//! The `zerotouch` binary.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use zerotouch_server::cli::{self, Cli, LogFormat};

/// mimalloc instead of glibc's malloc: the server allocates and frees small buffers on many
/// threads (connection tasks, engine threads, the SQLite writer), where glibc's per-thread heaps
/// grow and shrink through `mprotect` and page faults (benches/README.md, "End to end").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite's trace output dumps whole WebSocket frames, and the frame that carries an
    // MQTT CONNECT carries the device's SAS token (client and server alike): when RUST_LOG
    // reaches trace anywhere, tungstenite is held at debug. (Only then: the directive would
    // otherwise raise it above what RUST_LOG asks.)
    if filter.max_level_hint().is_none_or(|max| max >= tracing::level_filters::LevelFilter::TRACE) {
        for ceiling in ["tungstenite=debug", "tokio_tungstenite=debug"] {
            if let Ok(directive) = ceiling.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zerotouch: {e}");
            ExitCode::FAILURE
        }
    }
}
