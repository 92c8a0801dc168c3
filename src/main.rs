//! The vlmserve binary: parses the command line, sets up logging and runs the command.

// `deny`, not `forbid`: ndarray's `s!` expands to an `allow(unsafe_code)` of its own.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vlmserve::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        // actix logs a client's malformed HTTP (answered 400) as ERROR: not ours to alarm about.
        0 => "warn,vlmserve=info,actix_http::h1::dispatcher=off",
        1 => "debug,ort=info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result: anyhow::Result<()> = cli::run(cli).map_err(Into::into);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with the cause chain; no backtrace for user errors.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
