//! `kiln mcp`: the Model Context Protocol server (crates/mcp, docs/MCP.md) on stdio, or on
//! streamable HTTP with `--http ADDR`. Logs go to stderr only: on stdio, stdout is the
//! protocol. Exits 0 when the client closes stdin or after ctrl-c / SIGTERM (every sandbox
//! killed), 125 when the listener cannot bind or the server fails.

use std::time::Duration;

use clap::Args;

use super::exit;

/// `kiln mcp` arguments.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Serve streamable HTTP at http://ADDR/mcp instead of stdio (e.g. 127.0.0.1:8765).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Image of sandboxes created without one (e.g. `python`); default: the bare guest.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// Guest RAM of sandboxes created without `memory_mib`.
    #[arg(long, value_name = "MIB", default_value_t = kiln_mcp::state::DEFAULT_MEMORY_MIB,
          value_parser = clap::value_parser!(u32).range(128..=16384))]
    pub memory: u32,
    /// Most sandboxes live at once.
    #[arg(long, value_name = "N", default_value_t = kiln_mcp::state::DEFAULT_MAX_SANDBOXES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub max_sandboxes: usize,
    /// Lifetime of a sandbox created without `timeout_secs`, in seconds.
    #[arg(long, value_name = "SECS", default_value = "3600", value_parser = super::parse_secs)]
    pub sandbox_timeout: Duration,
    /// VM start to the agent's handshake, in seconds.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = super::parse_secs)]
    pub boot_timeout: Duration,
}

impl McpArgs {
    /// The server's settings.
    pub fn config(&self) -> kiln_mcp::McpConfig {
        kiln_mcp::McpConfig {
            default_image: self.image.clone(),
            memory_mib: self.memory,
            max_sandboxes: self.max_sandboxes,
            sandbox_timeout: self.sandbox_timeout,
            boot_timeout: self.boot_timeout,
            ..kiln_mcp::McpConfig::default()
        }
    }
}

/// Runs `kiln mcp`; returns the exit code.
pub fn mcp(args: McpArgs) -> i32 {
    let config = args.config();
    let r = match &args.http {
        Some(addr) => kiln_mcp::serve_http(config, addr),
        None => kiln_mcp::serve_stdio(config),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln mcp: {e}");
            exit::INTERNAL
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Cli, Command};
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn mcp_flags_parse() {
        let cli = Cli::try_parse_from([
            "kiln",
            "mcp",
            "--http",
            "127.0.0.1:0",
            "--image",
            "python",
            "--max-sandboxes",
            "2",
            "--boot-timeout",
            "180",
        ])
        .unwrap();
        let Command::Mcp(a) = cli.command else {
            panic!("not mcp")
        };
        let c = a.config();
        assert_eq!(a.http.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(c.default_image.as_deref(), Some("python"));
        assert_eq!(c.max_sandboxes, 2);
        assert_eq!(c.boot_timeout, Duration::from_secs(180));
        assert_eq!(c.memory_mib, 512);
        for bad in [
            vec!["kiln", "mcp", "--max-sandboxes", "0"],
            vec!["kiln", "mcp", "--memory", "16"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }
}
