//! Tier 2: the jailed VMM process running the bare-metal test guest on /dev/kvm. Each test
//! proves a property of the jail from outside, through the child's /proc entries. They need
//! root (namespaces, mounts, setuid) and fail, never skip, without it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_jail::{CgroupLimits, CpuMax, End, JailConfig, JailError, JailedVm, Rlimits, VmSpec};
use kiln_vmm::test_guest::{self, Action};

const T: Duration = Duration::from_secs(10);
const UID: u32 = 64_321;
const GID: u32 = 64_322;

fn guest() -> PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = test_guest::write_to(dir.path()).unwrap();
        (dir, path)
    });
    path.clone()
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the jail tests need root (mount/pid/net namespaces, pivot_root, setuid)"
    );
}

fn jail() -> JailConfig {
    JailConfig {
        uid: UID,
        gid: GID,
        rlimits: Rlimits {
            nofile: 512,
            fsize: Some(1 << 30),
            nproc: 200,
        },
        ..JailConfig::default()
    }
}

fn spawn(name: &str, action: Action, jail: JailConfig) -> JailedVm {
    require_root();
    let mut spec = VmSpec::new(name, guest());
    spec.cmdline_extra = action.cmdline().into();
    spec.vsock_cid = Some(3); // a device thread too
    spec.bridge_ports = vec![1024];
    let vm = JailedVm::spawn(spec, jail, T).unwrap();
    vm.wait_for_serial(test_guest::READY, Instant::now() + T)
        .unwrap();
    vm
}

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
}

#[test]
fn jail_vmm_runs_unprivileged_without_capabilities_and_with_no_new_privs() {
    let vm = spawn("jcap", Action::Spin, jail());
    let st = status(vm.vmm_pid());
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}");
    }
    let ids = |k| {
        field(&st, k)
            .split_whitespace()
            .map(|v| v.parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("Uid"), vec![UID; 4]);
    assert_eq!(ids("Gid"), vec![GID; 4]);
    assert_eq!(field(&st, "Groups"), "");
    // And the VM really runs under it: the guest spins, the VM has not ended.
    assert!(vm.end().is_none());
}

#[test]
fn jail_vmm_threads_run_under_seccomp() {
    let vm = spawn("jsec", Action::Spin, jail());
    let deadline = Instant::now() + T;
    loop {
        let mut threads = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{}/task", vm.vmm_pid())).unwrap() {
            let st = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            threads.push((
                field(&st, "Name").to_owned(),
                field(&st, "Seccomp").to_owned(),
            ));
        }
        let vmm: Vec<_> = threads
            .iter()
            .filter(|(n, _)| n == "jsec-vcpu0" || n == "jsec-dev")
            .collect();
        if vmm.len() == 2 && vmm.iter().all(|(_, s)| s == "2") {
            break;
        }
        assert!(Instant::now() < deadline, "VMM threads: {threads:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn jail_vmm_has_its_own_namespaces() {
    let vm = spawn("jns", Action::Spin, jail());
    for ns in ["mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        let theirs = std::fs::read_link(format!("/proc/{}/ns/{ns}", vm.vmm_pid())).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the parent");
    }
    // PID 1 of its pid namespace.
    let st = status(vm.vmm_pid());
    let nspid: Vec<&str> = field(&st, "NSpid").split_whitespace().collect();
    assert_eq!(nspid, vec![vm.vmm_pid().to_string().as_str(), "1"]);
    // No network interface but loopback (down): /proc/<pid>/net/dev lists only lo.
    let dev = std::fs::read_to_string(format!("/proc/{}/net/dev", vm.vmm_pid())).unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{dev}");
}

#[test]
fn jail_vmm_root_holds_only_the_vm_files() {
    let vm = spawn("jroot", Action::Spin, jail());
    let root = PathBuf::from(format!("/proc/{}/root", vm.vmm_pid()));
    let names: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["dev", "kernel"].iter().map(|s| s.to_string()).collect()
    );
    let devs: BTreeSet<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        devs,
        ["kvm", "null"].iter().map(|s| s.to_string()).collect()
    );
    // The kernel is the test guest, bind-mounted read-only.
    assert_eq!(std::fs::read(root.join("kernel")).unwrap(), test_guest::ELF);
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", vm.vmm_pid())).unwrap();
    let kernel = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/kernel"))
        .unwrap_or_else(|| panic!("{mounts}"));
    let opts = kernel.split_whitespace().nth(3).unwrap();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{kernel}");
    }
    let rootfs = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap();
    assert!(rootfs.starts_with("tmpfs / tmpfs ro,"), "{rootfs}");
    assert!(!root.join("etc").exists() && !root.join("proc/self").exists());
}

#[test]
fn jail_vmm_has_the_configured_rlimits() {
    let vm = spawn("jlim", Action::Spin, jail());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vm.vmm_pid())).unwrap();
    let row = |name: &str| {
        let l = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{limits}"));
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("Max open files"), vec!["512", "512"]);
    assert_eq!(row("Max processes"), vec!["200", "200"]);
    assert_eq!(row("Max file size"), vec!["1073741824", "1073741824"]);
    assert_eq!(row("Max core file size"), vec!["0", "0"]);
}

#[test]
fn jail_vmm_is_in_its_own_cgroup() {
    let vm = spawn("jcg", Action::Spin, jail());
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.vmm_pid())).unwrap();
    let want = vm
        .cgroup_name()
        .unwrap_or_else(|| panic!("no cgroup v2 for the jail: {:?}", vm.cgroup_warning()));
    assert!(
        cg.lines().any(|l| l == format!("0::{want}")),
        "/proc/<pid>/cgroup:\n{cg}\nwant 0::{want}"
    );
    let procs = std::fs::read_to_string(vm.cgroup().unwrap().join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == vm.vmm_pid().to_string()),
        "{procs}"
    );
}

/// Fails (never skips) on a host whose cgroup v2 has no memory/pids/cpu controllers, saying
/// so: the limits are then not enforced.
#[test]
fn jail_vmm_cgroup_has_the_configured_limits() {
    let mut j = jail();
    j.cgroup = CgroupLimits {
        memory_max: Some(512 << 20),
        pids_max: Some(64),
        cpu_max: Some(CpuMax {
            quota_us: 50_000,
            period_us: 100_000,
        }),
    };
    let vm = spawn("jcgl", Action::Spin, j);
    assert!(
        vm.cgroup_warning().is_none(),
        "this host cannot enforce the jail's cgroup v2 limits: {}",
        vm.cgroup_warning().unwrap_or_default()
    );
    // Read every limit back from the files themselves, v2 or (hybrid hosts) v1.
    let applied = vm.cgroup_applied();
    let value_of = |names: &[&str]| -> Option<String> {
        applied
            .iter()
            .find(|(f, _)| names.iter().any(|n| f.file_name().is_some_and(|x| x == *n)))
            .map(|(f, _)| std::fs::read_to_string(f).unwrap().trim().to_owned())
    };
    assert_eq!(
        value_of(&["memory.max", "memory.limit_in_bytes"]),
        Some((512u64 << 20).to_string()),
        "{applied:?}"
    );
    assert_eq!(value_of(&["pids.max"]), Some("64".into()), "{applied:?}");
    match value_of(&["cpu.max"]) {
        Some(v) => assert_eq!(v, "50000 100000"),
        None => {
            assert_eq!(value_of(&["cpu.cfs_quota_us"]), Some("50000".into()));
            assert_eq!(value_of(&["cpu.cfs_period_us"]), Some("100000".into()));
        }
    }
    // The VMM process is a member of every cgroup holding a limit.
    let member_of = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.vmm_pid())).unwrap();
    for (f, _) in applied {
        let dir = f.parent().unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            member_of
                .lines()
                .any(|l| l.ends_with(&format!("/kiln/{name}"))),
            "not in {}: {member_of}",
            dir.display()
        );
    }
}

#[test]
fn jail_killed_vmm_is_a_dead_vm_with_a_typed_error() {
    let vm = spawn("jkill", Action::Spin, jail());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.vmm_pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = vm.wait_end(T).expect("the death is noticed");
    assert!(
        matches!(&end, End::Died(s) if s.contains("signal 9")),
        "{end:?}"
    );
    let err = vm.wait_for_serial("never", Instant::now() + T).unwrap_err();
    assert!(
        matches!(&err, JailError::Died { serial_tail, .. } if serial_tail.contains(test_guest::READY)),
        "{err:?}"
    );
    assert!(matches!(
        vm.accept(1024, Duration::from_millis(10)),
        Err(JailError::Died { .. })
    ));
}

#[test]
fn jail_guest_shutdown_ends_the_vm_and_the_process() {
    let vm = spawn("jend", Action::Shutdown, jail());
    let end = vm
        .wait_end(T)
        .expect("the guest's triple fault ends the VM");
    assert!(matches!(&end, End::Exited(_)), "{end:?}");
    let launcher = vm.launcher_pid();
    drop(vm);
    // Reaped, and its cgroup removed.
    assert!(!PathBuf::from(format!("/proc/{launcher}")).exists());
}

#[test]
fn jail_refuses_root_and_reports_setup_failures() {
    require_root();
    let root = JailConfig { uid: 0, ..jail() };
    let err = JailedVm::spawn(VmSpec::new("jbad", guest()), root, T).unwrap_err();
    assert!(matches!(err, JailError::Config(_)), "{err:?}");
    // A kernel that does not exist: the child says which step failed.
    let err = JailedVm::spawn(VmSpec::new("jbad", "/nonexistent/vmlinux"), jail(), T).unwrap_err();
    assert!(
        matches!(&err, JailError::Setup { stage, message, .. } if stage.contains("bind-mount") && message.contains("/nonexistent/vmlinux")),
        "{err}"
    );
}
