//! `kiln serve`: the E2B-compatible sandbox server (crates/server, docs/SERVER.md) on one
//! port. Exits 0 after ctrl-c / SIGTERM (every sandbox stopped), 2 on a bad configuration,
//! 125 when the listener cannot bind or the server fails.

use std::path::PathBuf;

use clap::Args;

use super::exit;

/// `kiln serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides the config file's `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// TOML configuration file (templates, limits, API keys; docs/SERVER.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs `kiln serve`; returns the exit code.
pub fn serve(args: ServeArgs) -> i32 {
    let mut config = match &args.config {
        Some(p) => match kiln_server::ServerConfig::from_file(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kiln serve: {e}");
                return exit::USAGE;
            }
        },
        None => kiln_server::ServerConfig::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    match kiln_server::serve(config) {
        Ok(()) => 0,
        Err(e @ kiln_server::ServeError::Config(_)) => {
            eprintln!("kiln serve: {e}");
            exit::USAGE
        }
        Err(e) => {
            eprintln!("kiln serve: {e}");
            exit::INTERNAL
        }
    }
}
