//! `kiln-bench vm-snapshot`: VMM-level snapshots of a bare kernel (no agent), for
//! `cargo xtask bench snapshot` and snapshot checks.
//!
//! - `create`: boot a kernel, wait for a serial line, optionally fill guest RAM with non-zero
//!   bytes, snapshot it `--repeat` times into `--dir`; prints JSON
//!   `{"create_ms":[..],"guest_bytes":N,"written_bytes":N,"state_bytes":N}`.
//! - `restore`: restore `--dir`; prints `RESTORED <ms>` when `Vm::restore` returned (vCPUs
//!   started) and `RUNNING <ms>` when the guest wrote its first line after the restore.
//!   With `--repeat N` it restores N times in this process and prints JSON
//!   `{"restore_ms":[..],"running_ms":[..]}`; with `--prepared` each restore is prepared
//!   first (untimed) and only `PreparedRestore::start` is timed.
//! - `forks`: restore `--count` VMs at once, let them idle, print the process's memory per
//!   fork as JSON (`rss_anon_kib_per_fork`, `pss_kib_per_fork`, ...).
//!
//! Exit status: 0 on success, 1 when a VM failed, 2 on usage errors.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kiln_testkit::bench::{
    VmCreateSamples as CreateOut, VmForksSamples as ForksOut, VmRestoreSamples as RestoreOut,
};
use kiln_testkit::stats::ms;
use kiln_vmm::snapshot::RestoreConfig;
use kiln_vmm::Vm;
use serde::Serialize;

use super::boot::VmArgs;
use super::parse_secs;

/// `kiln-bench vm-snapshot` arguments.
#[derive(Debug, Args)]
pub struct VmSnapshotArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: VmSnapshotAction,
}

/// The actions.
#[derive(Debug, Subcommand)]
pub enum VmSnapshotAction {
    /// Boot a kernel and snapshot it.
    Create(CreateArgs),
    /// Restore a snapshot and time it.
    Restore(RestoreArgs),
    /// Restore many forks of a snapshot and report memory per fork.
    Forks(ForksArgs),
}

/// `kiln-bench vm-snapshot create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Snapshot once this text appeared on the serial console.
    #[arg(long, value_name = "TEXT")]
    pub until_serial: Option<String>,
    /// Write non-zero bytes to every guest page first (a fully used guest).
    #[arg(long)]
    pub fill: bool,
    /// Snapshot directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Snapshots to take (of the same paused VM), each timed.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub timeout: Duration,
}

/// `kiln-bench vm-snapshot restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Restores to do in this process (JSON output when > 1).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Give up after this many seconds per restore.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub timeout: Duration,
    /// Prepare each restore first (`Vm::prepare_restore`, untimed) and time only
    /// `PreparedRestore::start` (a pool keeping restores ready).
    #[arg(long)]
    pub prepared: bool,
}

/// `kiln-bench vm-snapshot forks`.
#[derive(Debug, Args)]
pub struct ForksArgs {
    /// Snapshot directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Forks to keep at once.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Idle time before measuring, in seconds.
    #[arg(long, default_value = "0.5", value_parser = parse_secs)]
    pub settle: Duration,
}

/// Runs `kiln-bench vm-snapshot`; returns the exit code.
pub fn vm_snapshot(args: &VmSnapshotArgs) -> i32 {
    let r = match &args.action {
        VmSnapshotAction::Create(a) => create(a),
        VmSnapshotAction::Restore(a) => restore(a),
        VmSnapshotAction::Forks(a) => forks(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            1
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), String> {
    let s = serde_json::to_string(v).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

fn create(a: &CreateArgs) -> Result<(), String> {
    if a.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let vm = Vm::start(a.vm.config("snap-create".into())).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + a.timeout;
    if let Some(t) = &a.until_serial {
        vm.wait_for_serial(t, deadline).map_err(|e| e.to_string())?;
    }
    vm.pause(a.timeout).map_err(|e| e.to_string())?;
    if a.fill {
        use kiln_vmm::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let mem = vm.memory().ok_or("VM has no memory")?;
        // Fill every page, but leave the first MiB (the guest's code and tables) alone.
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 | 1).collect();
        for r in mem.iter() {
            let start = r.start_addr().0.max(1 << 20);
            let end = r.start_addr().0 + r.len();
            let mut a = start;
            while a < end {
                mem.write_slice(&page, GuestAddress(a))
                    .map_err(|e| e.to_string())?;
                a += 4096;
            }
        }
    }
    let mut out = CreateOut {
        create_ms: Vec::with_capacity(a.repeat),
        guest_bytes: 0,
        written_bytes: 0,
        state_bytes: 0,
    };
    for _ in 0..a.repeat {
        let t0 = Instant::now();
        let info = vm.snapshot(&a.dir).map_err(|e| e.to_string())?;
        out.create_ms.push(ms(t0.elapsed()));
        out.guest_bytes = info.guest_bytes;
        out.written_bytes = info.written_bytes;
        out.state_bytes = info.state_bytes;
    }
    vm.stop();
    print_json(&out)
}

fn restore(a: &RestoreArgs) -> Result<(), String> {
    if a.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let mut out = RestoreOut {
        restore_ms: Vec::with_capacity(a.repeat),
        running_ms: Vec::with_capacity(a.repeat),
    };
    for i in 0..a.repeat {
        let cfg = RestoreConfig::new(format!("restore{i}"));
        let prepared = if a.prepared {
            Some(Vm::prepare_restore(&a.dir, cfg.clone()).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let t0 = Instant::now();
        let vm = match prepared {
            Some(p) => p.start(),
            None => Vm::restore(&a.dir, cfg),
        }
        .map_err(|e| e.to_string())?;
        let restored = ms(t0.elapsed());
        if a.repeat == 1 {
            let mut o = std::io::stdout().lock();
            // The parent (bench) times these lines; nothing to do if stdout is gone.
            let _ = writeln!(o, "RESTORED {restored:.3}");
            let _ = o.flush();
        }
        // The restored console starts empty: its first newline is the guest running.
        vm.wait_for_serial("\n", t0 + a.timeout)
            .map_err(|e| e.to_string())?;
        let running = ms(t0.elapsed());
        if a.repeat == 1 {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "RUNNING {running:.3}");
            let _ = o.flush();
        }
        out.restore_ms.push(restored);
        out.running_ms.push(running);
        vm.stop();
    }
    if a.repeat > 1 {
        print_json(&out)?;
    }
    Ok(())
}

/// (VmRSS, RssAnon, RssFile) in KiB and Pss in KiB of this process.
fn memory_kib() -> Result<(u64, u64, u64, u64), String> {
    let field = |text: &str, key: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{key} missing"))
    };
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").map_err(|e| e.to_string())?;
    Ok((
        field(&status, "VmRSS:")?,
        field(&status, "RssAnon:")?,
        field(&status, "RssFile:")?,
        field(&smaps, "Pss:")?,
    ))
}

fn count_dir(p: &str) -> Result<usize, String> {
    Ok(std::fs::read_dir(p).map_err(|e| e.to_string())?.count())
}

fn forks(a: &ForksArgs) -> Result<(), String> {
    if a.count == 0 {
        return Err("--count must be at least 1".into());
    }
    // Warm up process-wide state (KVM fd, MSR list, allocator arenas) with one fork.
    Vm::restore(&a.dir, RestoreConfig::new("fork-warm"))
        .map_err(|e| e.to_string())?
        .stop();
    let (rss0, anon0, file0, pss0) = memory_kib()?;
    let (threads0, fds0) = (count_dir("/proc/self/task")?, count_dir("/proc/self/fd")?);
    let mut vms = Vec::with_capacity(a.count);
    for i in 0..a.count {
        vms.push(
            Vm::restore(&a.dir, RestoreConfig::new(format!("fork{i}")))
                .map_err(|e| format!("fork {i}: {e}"))?,
        );
    }
    std::thread::sleep(a.settle);
    if let Some(vm) = vms.iter().find(|v| v.exit_reason().is_some()) {
        return Err(format!("{} exited: {:?}", vm.name(), vm.exit_reason()));
    }
    let (rss1, anon1, file1, pss1) = memory_kib()?;
    let (threads1, fds1) = (count_dir("/proc/self/task")?, count_dir("/proc/self/fd")?);
    let n = a.count as f64;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n;
    let out = ForksOut {
        count: a.count,
        rss_kib_per_fork: per(rss0, rss1),
        rss_anon_kib_per_fork: per(anon0, anon1),
        rss_file_kib_per_fork: per(file0, file1),
        pss_kib_per_fork: per(pss0, pss1),
        threads_per_fork: per(threads0 as u64, threads1 as u64),
        fds_per_fork: per(fds0 as u64, fds1 as u64),
    };
    drop(vms);
    print_json(&out)
}
