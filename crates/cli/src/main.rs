//! The `kiln` command-line tool; see the `kiln_cli` library (src/lib.rs) and docs/API.md.

fn main() {
    std::process::exit(kiln_cli::main());
}
