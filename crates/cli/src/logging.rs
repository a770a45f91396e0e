//! The CLI's log output: a `tracing` subscriber writing the library's and the VMM's events to
//! stderr. `RUST_LOG` (e.g. `RUST_LOG=kiln=debug,kiln_vmm=info`) chooses what is shown;
//! without it warnings and errors are, and `-v` raises that to info.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter without `RUST_LOG`.
pub fn default_filter(verbose: bool) -> &'static str {
    if verbose {
        "info"
    } else {
        "warn"
    }
}

/// Installs the subscriber (once; later calls do nothing).
pub fn init(verbose: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose)));
    // A second subscriber (tests, embedding) is not an error worth reporting.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_raises_the_default_level() {
        assert_eq!(default_filter(false), "warn");
        assert_eq!(default_filter(true), "info");
        init(true);
        // Installed: a second call is harmless.
        init(false);
        assert!(tracing_subscriber::fmt().try_init().is_err());
    }
}
