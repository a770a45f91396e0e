//! kiln-testkit: the infrastructure Kiln's tier-4 tests (`tests/`), benchmarks
//! (`crates/bench`, `cargo xtask bench`) and developer flows (`xtask`) share.
//!
//! Modules:
//! - [`qemu`]: the one QEMU command-line builder ([`QemuCommand`]), used by the QEMU peer of
//!   `kiln-bench exec`, the tier-4 QEMU boot test, `cargo xtask bench vmm` and the harness's L1.
//! - [`console`]: bounded console readers ([`read_bounded_line`], [`Console`] with deadlines),
//!   for output of guests and processes that are not trusted.
//! - [`stats`]: percentile statistics ([`Stats`]: n, min, median, nearest-rank p99).
//! - [`bench`]: the benchmark formats: [`BenchRecord`] (one reported metric) and the sample
//!   documents `kiln-bench` writes and `cargo xtask bench` reads.
//! - [`guest`]: facts about the Kiln guest that tests check (PID 1's mounts).
//!
//! It depends on no other Kiln crate.

pub mod bench;
pub mod console;
pub mod guest;
pub mod qemu;
pub mod stats;

pub use bench::BenchRecord;
pub use console::{read_bounded_line, Console, ConsoleError};
pub use qemu::QemuCommand;
pub use stats::Stats;
