//! The benchmark formats, each defined once for its writer and its reader:
//!
//! - [`BenchRecord`]: one reported metric, the JSON line `cargo xtask bench <name> --json`
//!   prints (`name, unit, n, min, median, p99` and optionally `ratio_vs`, `peer`);
//! - the raw sample documents `kiln-bench` (crates/bench) writes and `cargo xtask bench` reads:
//!   [`ExecSamples`] (`kiln-bench exec`), [`PoolSamples`] (`kiln-bench pool`),
//!   [`VmCreateSamples`], [`VmRestoreSamples`], [`VmForksSamples`] (`kiln-bench vm-snapshot`).
//!
//! Samples are milliseconds unless a field says otherwise.

use serde::{Deserialize, Serialize};

use crate::stats::Stats;

/// One reported metric: its summary and, optionally, its ratio against a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    /// Metric name, e.g. `exec.kiln.exec_true`.
    pub name: String,
    /// Unit of the figures (`ms`, `KiB`, `MiB/s`, `ns/op`).
    pub unit: String,
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Our median / the peer's median.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_vs: Option<f64>,
    /// The peer the ratio is against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl BenchRecord {
    /// The record of metric `name` in `unit` with `stats`, and `(peer, ratio)` if compared.
    pub fn new(name: &str, unit: &str, stats: &Stats, peer: Option<(&str, f64)>) -> BenchRecord {
        BenchRecord {
            name: name.to_owned(),
            unit: unit.to_owned(),
            n: stats.n,
            min: stats.min,
            median: stats.median,
            p99: stats.p99,
            ratio_vs: peer.map(|(_, r)| r),
            peer: peer.map(|(p, _)| p.to_owned()),
        }
    }

    /// The summary part.
    pub fn stats(&self) -> Stats {
        Stats {
            n: self.n,
            min: self.min,
            median: self.median,
            p99: self.p99,
        }
    }

    /// The record as one JSON line (without newline).
    pub fn to_json_line(&self) -> String {
        // Serialising plain numbers and strings cannot fail; keep a readable fallback.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Parses one JSON line written by [`BenchRecord::to_json_line`].
    pub fn from_json_line(line: &str) -> Result<BenchRecord, serde_json::Error> {
        serde_json::from_str(line.trim())
    }
}

/// What `kiln-bench exec` writes: exec and ping round trips in one warm sandbox, cold boots,
/// and the same measured on the QEMU microvm peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecSamples {
    /// Which implementation produced them.
    #[serde(default)]
    pub vmm: String,
    /// `Sandbox::create` until the agent's handshake.
    pub boot_ms: f64,
    /// `exec(["true"])` round trips.
    pub exec_true_ms: Vec<f64>,
    /// `ping()` round trips.
    pub ping_ms: Vec<f64>,
    /// Cold boots, create until the agent's handshake.
    pub boot_samples_ms: Vec<f64>,
    /// The QEMU peer's exec `true` round trips in its warm guest.
    #[serde(default)]
    pub qemu_exec_true_ms: Vec<f64>,
    /// The QEMU peer's ping round trips in its warm guest.
    #[serde(default)]
    pub qemu_ping_ms: Vec<f64>,
    /// QEMU boots (the warm guest's first), launch until the agent's `Hello`.
    #[serde(default)]
    pub qemu_microvm_handshake_ms: Vec<f64>,
    /// QEMU boots, launch until `KILN-AGENT-READY` on the console.
    #[serde(default)]
    pub qemu_microvm_ready_ms: Vec<f64>,
    /// Why the QEMU measurement failed or stopped early, if it did (the Kiln samples and
    /// the QEMU samples taken before stay valid).
    pub qemu_error: Option<String>,
}

/// What `kiln-bench pool` writes: the samples and the pool's counters at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolSamples {
    /// How returned sandboxes are replaced (`reboot` or `restore`).
    pub reset_mode: String,
    /// The pool's min_size and max_size.
    pub size: u32,
    /// Whether it ran inside the emulated-virtualization harness (software emulation).
    pub emulated: bool,
    /// `warm(size)`: booting the pool in the caller's thread.
    pub warm_ms: f64,
    /// `acquire()` (hits only, see `misses`).
    pub acquire_ms: Vec<f64>,
    /// `exec(["true"])` in the acquired sandbox.
    pub exec_ms: Vec<f64>,
    /// Dropping the handle (reset or hand-off to the reaper).
    pub release_ms: Vec<f64>,
    /// acquire + exec + release.
    pub total_ms: Vec<f64>,
    /// Boot (reboot mode) or restore (restore mode) time of each sandbox handed out, paid by
    /// the pool in the background.
    pub boot_ms: Vec<f64>,
    /// Untimed waits for the pool to be full again before an iteration.
    pub refill_wait_ms: Vec<f64>,
    /// Measured acquires served by an idle sandbox.
    pub hits: u64,
    /// Measured acquires that had to boot (should be 0).
    pub misses: u64,
    /// The pool's counters at the end.
    pub stats: PoolCounters,
}

/// The pool's counters in a [`PoolSamples`] document: `kiln::PoolStats` (kiln-pool's
/// `PoolStats`), field for field with the same names and meanings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct PoolCounters {
    pub hit_count: u64,
    pub miss_count: u64,
    pub evict_count: u64,
    pub dead_count: u64,
    pub idle_count: usize,
    pub in_use_count: usize,
    pub created_count: u64,
    pub create_failed_count: u64,
    pub destroyed_count: u64,
}

/// What `kiln-bench vm-snapshot create` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmCreateSamples {
    /// `Vm::snapshot` of the paused VM, each repeat.
    pub create_ms: Vec<f64>,
    /// Guest RAM in bytes.
    pub guest_bytes: u64,
    /// Bytes of guest RAM written to the memory file.
    pub written_bytes: u64,
    /// Size of the state file.
    pub state_bytes: u64,
}

/// What `kiln-bench vm-snapshot restore --repeat N` (N > 1) prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmRestoreSamples {
    /// The restore call (vCPUs started).
    pub restore_ms: Vec<f64>,
    /// Restore start until the guest's first serial line.
    pub running_ms: Vec<f64>,
}

/// What `kiln-bench vm-snapshot forks` prints: the process's memory per idle fork.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmForksSamples {
    /// Forks held at once.
    pub count: usize,
    /// VmRSS per fork, KiB.
    pub rss_kib_per_fork: f64,
    /// RssAnon per fork, KiB.
    pub rss_anon_kib_per_fork: f64,
    /// RssFile per fork, KiB.
    pub rss_file_kib_per_fork: f64,
    /// Pss per fork, KiB.
    pub pss_kib_per_fork: f64,
    /// Threads per fork.
    pub threads_per_fork: f64,
    /// File descriptors per fork.
    pub fds_per_fork: f64,
}

/// What `kiln-bench fork` prints (live fork of a running VM).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ForkSamples {
    /// `ForkSource::spawn` per child (vCPUs started), ms.
    pub per_child_ms: Vec<f64>,
    /// Each child's spawn -> `Vm::stop` returned, ms (teardown).
    pub stop_ms: Vec<f64>,
    /// One source -> 1,000 children started, total ms, each repeat.
    pub children_1000_ms: Vec<f64>,
    /// `ForkSource::spawn_shell` per child, the shells built ahead of time (untimed), ms.
    pub per_child_shell_ms: Vec<f64>,
    /// One source -> 1,000 children started in shells built ahead of time, total ms.
    pub children_1000_shell_ms: Vec<f64>,
    /// Parent pause window of the first fork of a 1 GiB guest with 512 MiB touched, ms.
    pub pause_first_ms: Vec<f64>,
    /// Parent pause window of a second fork after touching 512 MiB again (stacking: the
    /// pages written since the first fork are copied into a layer), ms.
    pub pause_stacked_ms: Vec<f64>,
    /// Bytes copied by the stacked fork.
    pub stacked_copied_bytes: u64,
    /// A full copy of the same touched memory into a new memfd (what flattening costs), ms.
    pub flatten_copy_ms: Vec<f64>,
    /// Idle children held for the memory metric.
    pub idle_children: usize,
    /// RssAnon + RssShmem growth of the process per idle child, KiB.
    pub rss_kib_per_child: f64,
    /// Pss growth per idle child, KiB.
    pub pss_kib_per_child: f64,
    /// Private pages the children wrote (their copy-on-write pages), KiB per child.
    pub touched_kib_per_child: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_omit_an_absent_peer() {
        let s = Stats::from_samples(&[1.0, 2.0, 3.0]).unwrap();
        let r = BenchRecord::new("boot", "ms", &s, None);
        let line = r.to_json_line();
        assert!(
            !line.contains("peer") && !line.contains("ratio_vs"),
            "{line}"
        );
        assert_eq!(BenchRecord::from_json_line(&line).unwrap(), r);
        assert_eq!(r.stats(), s);
        let r = BenchRecord::new("boot", "ms", &s, Some(("firecracker", 1.25)));
        let back = BenchRecord::from_json_line(&r.to_json_line()).unwrap();
        assert_eq!(back.peer.as_deref(), Some("firecracker"));
        assert_eq!(back.ratio_vs, Some(1.25));
    }

    #[test]
    fn sample_documents_round_trip() {
        let e = ExecSamples {
            vmm: "kiln".into(),
            boot_ms: 1.0,
            exec_true_ms: vec![2.0],
            qemu_error: Some("x".into()),
            ..ExecSamples::default()
        };
        let back: ExecSamples = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!((back.vmm.as_str(), back.exec_true_ms), ("kiln", vec![2.0]));
        let p = PoolSamples {
            reset_mode: "restore".into(),
            hits: 3,
            ..PoolSamples::default()
        };
        let back: PoolSamples = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!((back.reset_mode.as_str(), back.hits), ("restore", 3));
    }
}
