//! `kiln-bench fork`: live fork of a running VM (the bare-metal test guest), for
//! `cargo xtask bench fork`. Prints one `kiln_testkit::bench::ForkSamples` JSON document.
//!
//! - per child: one `Vm::fork_source` of a running (halted-in-guest) 128 MiB parent, then
//!   `--children` `ForkSource::spawn` calls, each timed (vCPUs started); the children stay up
//!   idle for the memory metric (RSS and PSS growth of the process per child, and the guest
//!   pages each child touched, from pagemap), then each is stopped and the stop timed;
//! - 1,000 children: `--thousand-repeats` times, one source -> 1,000 spawns, total time (the
//!   children are stopped afterwards, untimed);
//! - pause window: `--pause-repeats` times a fresh 1 GiB parent with 512 MiB written by the
//!   host, then `fork_source` (first fork: the memfd is frozen, nothing copied) and its
//!   `paused_for`; then 512 MiB written again and a second fork (stacked: the written pages
//!   are copied into a layer) and, for comparison, the time a full copy of those 512 MiB into
//!   a new memfd takes (what flattening costs).
//!
//! Exit status: 0 on success, 1 when a VM failed, 2 on usage errors.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_testkit::bench::ForkSamples;
use kiln_testkit::stats::ms;
use kiln_vmm::snapshot::RestoreConfig;
use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use kiln_vmm::{Vm, VmConfig};

/// `kiln-bench fork` arguments.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Directory for the test guest image.
    #[arg(long)]
    pub dir: PathBuf,
    /// Children timed one by one (and held idle for the memory metric).
    #[arg(long, default_value_t = 200)]
    pub children: usize,
    /// Repeats of the 1,000-children total.
    #[arg(long, default_value_t = 3)]
    pub thousand_repeats: usize,
    /// Repeats of the 1 GiB pause-window measurement.
    #[arg(long, default_value_t = 5)]
    pub pause_repeats: usize,
    /// Idle time before the memory metric, in seconds.
    #[arg(long, default_value = "0.5", value_parser = super::parse_secs)]
    pub settle: Duration,
}

/// Runs `kiln-bench fork`; returns the exit code.
pub fn fork(args: &ForkArgs) -> i32 {
    match run(args) {
        Ok(out) => match serde_json::to_string(&out) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                eprintln!("kiln: error: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("kiln: error: {e}");
            1
        }
    }
}

fn config(args: &ForkArgs, name: &str, mem_mib: u64) -> Result<VmConfig, String> {
    let guest = test_guest::write_to(&args.dir).map_err(|e| e.to_string())?;
    let mut c = VmConfig::new(name, guest);
    c.cmdline_extra = Action::Halt.cmdline().into();
    c.mem_mib = mem_mib;
    Ok(c)
}

fn start(args: &ForkArgs, name: &str, mem_mib: u64) -> Result<Vm, String> {
    let vm = Vm::start(config(args, name, mem_mib)?).map_err(|e| e.to_string())?;
    vm.wait_for_serial(test_guest::READY, Instant::now() + Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(vm)
}

/// (RssAnon + RssShmem + RssFile, Pss) of this process, KiB.
fn memory_kib() -> Result<(u64, u64), String> {
    let field = |text: &str, key: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{key} missing"))
    };
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").map_err(|e| e.to_string())?;
    Ok((field(&status, "VmRSS:")?, field(&smaps, "Pss:")?))
}

/// Guest pages of `vm` present in this process's page tables (what its guest touched).
fn present_pages(vm: &Vm) -> Result<u64, String> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
    let mem = vm.memory().ok_or("VM torn down")?;
    let mut n = 0u64;
    for r in mem.iter() {
        let pages = (r.len() / 4096) as usize;
        let first = r.as_ptr() as usize / 4096;
        let mut buf = vec![0u8; 8 * 4096];
        let mut i = 0;
        while i < pages {
            let k = 4096.min(pages - i);
            pagemap
                .read_exact_at(&mut buf[..k * 8], ((first + i) * 8) as u64)
                .map_err(|e| e.to_string())?;
            for c in buf[..k * 8].chunks_exact(8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                if u64::from_le_bytes(a) & (1 << 63) != 0 {
                    n += 1;
                }
            }
            i += k;
        }
    }
    Ok(n)
}

fn touch(vm: &Vm, bytes: u64, byte: u8) -> Result<(), String> {
    let mem = vm.memory().ok_or("VM torn down")?;
    let chunk = vec![byte; 1 << 20];
    // From 16 MiB up (the test guest lives below 2 MiB).
    let mut at = 16u64 << 20;
    while at < (16 << 20) + bytes {
        mem.write_slice(&chunk, GuestAddress(at))
            .map_err(|e| e.to_string())?;
        at += 1 << 20;
    }
    Ok(())
}

fn run(args: &ForkArgs) -> Result<ForkSamples, String> {
    if args.children == 0 {
        return Err("--children must be at least 1".into());
    }
    let mut out = ForkSamples::default();
    // Warm-up (KVM fd, MSR list, signal handler, allocator arenas).
    {
        let p = start(args, "warm", 128)?;
        let (_s, kids) = p.fork(2, "warm-").map_err(|e| e.to_string())?;
        drop(kids);
    }

    // Per child, and the memory of idle children.
    let parent = start(args, "parent", 128)?;
    let src = parent.fork_source().map_err(|e| e.to_string())?;
    let (rss0, pss0) = memory_kib()?;
    let mut kids = Vec::with_capacity(args.children);
    for i in 0..args.children {
        let t = Instant::now();
        let k = src
            .spawn(RestoreConfig::new(format!("c{i}")))
            .map_err(|e| format!("child {i}: {e}"))?;
        out.per_child_ms.push(ms(t.elapsed()));
        kids.push(k);
    }
    std::thread::sleep(args.settle);
    if let Some(k) = kids.iter().find(|k| k.exit_reason().is_some()) {
        return Err(format!("{} exited: {:?}", k.name(), k.exit_reason()));
    }
    let (rss1, pss1) = memory_kib()?;
    let mut touched = 0u64;
    for k in &kids {
        touched += present_pages(k)?;
    }
    let n = kids.len() as f64;
    out.idle_children = kids.len();
    out.rss_kib_per_child = (rss1 as f64 - rss0 as f64) / n;
    out.pss_kib_per_child = (pss1 as f64 - pss0 as f64) / n;
    out.touched_kib_per_child = touched as f64 * 4.0 / n;
    for k in kids {
        let t = Instant::now();
        k.stop();
        out.stop_ms.push(ms(t.elapsed()));
    }

    // 1,000 children from one source.
    for r in 0..args.thousand_repeats {
        let src = parent.fork_source().map_err(|e| e.to_string())?;
        let mut kids = Vec::with_capacity(1000);
        let t = Instant::now();
        for i in 0..1000 {
            kids.push(
                src.spawn(RestoreConfig::new(format!("k{r}-{i}")))
                    .map_err(|e| format!("child {i}: {e}"))?,
            );
        }
        out.children_1000_ms.push(ms(t.elapsed()));
        drop(kids);
    }
    drop(src);

    // The same with the children's VMs built ahead of time (ForkShell): only mapping the
    // layers, loading the state and starting the threads is on the fork's path.
    let shells = (0..args.children)
        .map(|i| parent.fork_shell(RestoreConfig::new(format!("s{i}"))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let src = parent.fork_source().map_err(|e| e.to_string())?;
    let mut kids = Vec::with_capacity(args.children);
    for s in shells {
        let t = Instant::now();
        let (k, ()) = src.spawn_shell(s, |_| Ok(())).map_err(|e| e.to_string())?;
        out.per_child_shell_ms.push(ms(t.elapsed()));
        kids.push(k);
    }
    drop(kids);
    for r in 0..args.thousand_repeats.min(1) {
        let shells = (0..1000)
            .map(|i| parent.fork_shell(RestoreConfig::new(format!("t{r}-{i}"))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let src = parent.fork_source().map_err(|e| e.to_string())?;
        let mut kids = Vec::with_capacity(1000);
        let t = Instant::now();
        for s in shells {
            kids.push(src.spawn_shell(s, |_| Ok(())).map_err(|e| e.to_string())?.0);
        }
        out.children_1000_shell_ms.push(ms(t.elapsed()));
        drop(kids);
    }
    parent.stop();

    // Pause window of a 1 GiB guest with 512 MiB touched.
    for r in 0..args.pause_repeats {
        let big = start(args, &format!("big{r}"), 1024)?;
        touch(&big, 512 << 20, 0x5a)?;
        let s1 = big.fork_source().map_err(|e| e.to_string())?;
        out.pause_first_ms.push(ms(s1.info().paused_for));
        touch(&big, 512 << 20, 0xa5)?;
        let s2 = big.fork_source().map_err(|e| e.to_string())?;
        out.pause_stacked_ms.push(ms(s2.info().paused_for));
        out.stacked_copied_bytes = s2.info().copied_bytes;
        // What flattening would copy: the same 512 MiB into a new memfd.
        let mem = big.memory().ok_or("VM torn down")?;
        let f = kiln_vmm::memory::new_memfd("flatten-probe", 1 << 30).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 16u64 << 20;
        while at < (16 << 20) + (512 << 20) {
            mem.read_slice(&mut buf, GuestAddress(at))
                .map_err(|e| e.to_string())?;
            f.write_all_at(&buf, at).map_err(|e| e.to_string())?;
            at += 1 << 20;
        }
        out.flatten_copy_ms.push(ms(t.elapsed()));
        drop((s1, s2));
        big.stop();
    }
    Ok(out)
}
