//! `kiln-vm`: the jailed VMM process (kiln-jail's child side). Started by the kiln library
//! with its control socket on fd 3; not a user command.

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    kiln_jail::child::main()
}
