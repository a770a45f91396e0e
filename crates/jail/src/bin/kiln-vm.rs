//! `kiln-vm`: the jailed VMM process (kiln-jail's child side). Started by the kiln library
//! with its control socket on fd 3; not a user command.

fn main() {
    kiln_jail::child::main()
}
