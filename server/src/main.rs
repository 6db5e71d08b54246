//! The `zerotouch` binary.

use std::process::ExitCode;

use clap::Parser as _;
use zerotouch_server::cli::{self, Cli};
use zerotouch_server::logging;

/// mimalloc instead of glibc's malloc: the server allocates and frees small buffers on many
/// threads (connection tasks, engine threads, the SQLite writer), where glibc's per-thread heaps
/// grow and shrink through `mprotect` and page faults (benches/README.md, "End to end").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    logging::init(cli.initial_log_format());
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::report(&e.to_string(), true);
            ExitCode::from(e.exit_code())
        }
    }
}
