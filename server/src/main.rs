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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
