//! The `kiln` command-line tool; see [`cli`] and docs/API.md.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
