//! Tier 2: seccomp filters on a running VM's threads (bare-metal test guest on /dev/kvm).
//! The forbidden-call tests run a child copy of this test binary, since a forbidden call
//! ends the process (docs/SECURITY.md).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_vmm::seccomp::{SeccompMode, EXIT_BAD_SYSCALL};
use kiln_vmm::test_guest::{self, Action};
use kiln_vmm::{Vm, VmConfig};

const T: Duration = Duration::from_secs(10);
/// Set in the child copy: which call its vCPU job makes.
const CHILD_ENV: &str = "KILN_SECCOMP_TEST_CHILD";

fn guest() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    test_guest::write_to(dir.path()).unwrap()
}

fn spinning(name: &str, vcpus: u8, mode: SeccompMode) -> Vm {
    let mut c = VmConfig::new(name, guest());
    c.cmdline_extra = Action::Spin.cmdline().into();
    c.vcpus = vcpus;
    c.vsock_cid = Some(3); // so the VM has a device thread
    c.seccomp = mode;
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial(test_guest::READY, Instant::now() + T)
        .unwrap();
    vm
}

fn vm_threads(all: &[(String, u32, u32)], vm: &str) -> Vec<(String, u32, u32)> {
    all.iter()
        .filter(|(n, _, _)| n.starts_with(&format!("{vm}-")))
        .cloned()
        .collect()
}

/// The VM's threads once `n` of them have named themselves and shown `seccomp` (a thread
/// that was just spawned may not have run yet); whatever they show after `T` otherwise.
fn settled_vm_threads(vm: &str, n: usize, seccomp: u32) -> Vec<(String, u32, u32)> {
    let deadline = Instant::now() + T;
    loop {
        let mine = vm_threads(&kiln_vmm::seccomp::task_filters(), vm);
        let settled = mine.len() == n && mine.iter().all(|t| t.1 == seccomp);
        if settled || Instant::now() > deadline {
            return mine;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn seccomp_every_vmm_thread_is_filtered_and_the_callers_are_not() {
    let vm = spinning("scall", 2, SeccompMode::Enforce);
    let mine = settled_vm_threads("scall", 3, 2);
    let mut names: Vec<&str> = mine.iter().map(|(n, _, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["scall-dev", "scall-vcpu0", "scall-vcpu1"],
        "threads {mine:?}"
    );
    for (name, seccomp, nnp) in &mine {
        assert_eq!((*seccomp, *nnp), (2, 1), "{name}: Seccomp/NoNewPrivs");
    }
    // The test harness's threads (the caller's side) stay unfiltered.
    let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(me.lines().any(|l| l == "Seccomp:\t0"), "{me}");
    assert!(me.lines().any(|l| l == "NoNewPrivs:\t0"), "{me}");
    // The guest still runs and is paused / resumed / stopped through its filtered threads.
    vm.pause(T).unwrap();
    vm.resume();
    assert_eq!(vm.stop(), kiln_vmm::ExitReason::Stopped);
}

#[test]
fn seccomp_off_leaves_the_vmm_threads_unfiltered() {
    let vm = spinning("scoff", 1, SeccompMode::Off);
    let mine = settled_vm_threads("scoff", 2, 0);
    assert_eq!(mine.len(), 2, "{mine:?}");
    for (name, seccomp, _) in &mine {
        assert_eq!(*seccomp, 0, "{name}");
    }
    vm.stop();
}

/// Runs the child copy of this binary with `env`; returns (exit code, stderr).
fn run_child(call: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = if call == "trace" {
        "seccomp_child_tracing"
    } else {
        "seccomp_child_vcpu_job"
    };
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        child,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, call)
    .env_remove("KILN_SECCOMP");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn seccomp_forbidden_syscall_on_a_vcpu_thread_ends_the_process_naming_it() {
    let (code, out) = run_child("socket", &[]);
    assert_eq!(code, Some(EXIT_BAD_SYSCALL), "child output:\n{out}");
    // An allowed call (write to stderr) went through first, on the same filtered thread.
    assert!(out.contains("job on vCPU: Seccomp 2"), "{out}");
    let want = format!(
        "thread \"sckill-vcpu0\" (vcpu filter) made forbidden system call {};",
        libc::SYS_socket
    );
    assert!(out.contains(&want), "want {want:?} in:\n{out}");
    assert!(!out.contains("job returned"), "{out}");
}

#[test]
fn seccomp_execve_on_a_vcpu_thread_is_refused_too() {
    let (code, out) = run_child("execve", &[]);
    assert_eq!(code, Some(EXIT_BAD_SYSCALL), "child output:\n{out}");
    assert!(
        out.contains(&format!("forbidden system call {};", libc::SYS_execve)),
        "{out}"
    );
}

#[test]
fn seccomp_env_0_turns_the_filters_off() {
    let (code, out) = run_child("socket", &[("KILN_SECCOMP", "0")]);
    assert_eq!(code, Some(0), "child output:\n{out}");
    assert!(out.contains("job on vCPU: Seccomp 0"), "{out}");
    assert!(out.contains("job returned fd"), "{out}");
}

#[test]
fn seccomp_env_log_lets_the_call_through_under_a_filter() {
    let (code, out) = run_child("socket", &[("KILN_SECCOMP", "log")]);
    assert_eq!(code, Some(0), "child output:\n{out}");
    assert!(out.contains("job on vCPU: Seccomp 2"), "{out}");
    assert!(out.contains("job returned fd"), "{out}");
}

/// The child: a VM configured from the environment (as the kiln library does), whose vCPU 0
/// runs a job making the call named in $KILN_SECCOMP_TEST_CHILD.
#[test]
#[ignore = "run by the seccomp_* tests as a child process"]
fn seccomp_child_vcpu_job() {
    let call = std::env::var(CHILD_ENV).expect("only run as a child");
    let mut c = VmConfig::new("sckill", guest());
    c.cmdline_extra = Action::Spin.cmdline().into();
    let vm = Vm::start(c).unwrap();
    vm.wait_for_serial(test_guest::READY, Instant::now() + T)
        .unwrap();
    vm.pause(T).unwrap();
    // The vCPU thread's filter state, read from here (its filter allows no open).
    let (_, seccomp, _) = vm_threads(&kiln_vmm::seccomp::task_filters(), "sckill")
        .into_iter()
        .find(|(n, _, _)| n == "sckill-vcpu0")
        .unwrap();
    let (tx, rx) = mpsc::channel();
    assert!(vm.post_vcpu_job(
        0,
        kiln_vmm::vcpu::VcpuJob::Test(Box::new(move |_fd| {
            // An allowed call (write) first.
            eprintln!("job on vCPU: Seccomp {seccomp}");
            let rc = match call.as_str() {
                // SAFETY: a plain system call with valid arguments.
                "socket" => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) },
                "execve" => {
                    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                    // SAFETY: NUL-terminated path and argv; a null envp is accepted.
                    unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) }
                }
                other => panic!("unknown call {other}"),
            };
            eprintln!("job returned fd {rc}");
            let _ = tx.send(rc);
        })),
    ));
    let rc = rx.recv_timeout(T).unwrap();
    assert!(rc >= 0, "the call failed: {rc}");
    vm.stop();
}

#[test]
fn seccomp_vmm_threads_log_through_a_tracing_subscriber() {
    let (code, out) = run_child("trace", &[]);
    assert_eq!(code, Some(0), "child output:\n{out}");
    // Serial lines and the exit are logged on the (filtered) vCPU thread.
    let line = |needle: &str| {
        out.lines()
            .any(|l| l.contains("sctrace-vcpu0") && l.contains(needle))
    };
    assert!(line("serial: READY"), "{out}");
    assert!(line("vCPU exit: shutdown"), "{out}");
}

/// The child: a tracing subscriber (timestamps, thread names, TRACE) writing to stderr, and a
/// VM that logs its serial lines and exit on its vCPU thread.
#[test]
#[ignore = "run by seccomp_vmm_threads_log_through_a_tracing_subscriber as a child process"]
fn seccomp_child_tracing() {
    std::env::var(CHILD_ENV).expect("only run as a child");
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_thread_names(true)
        .with_writer(std::io::stderr)
        .init();
    let mut c = VmConfig::new("sctrace", guest());
    c.cmdline_extra = Action::Shutdown.cmdline().into();
    c.vsock_cid = Some(3);
    c.serial_log = true;
    let vm = Vm::start(c).unwrap();
    vm.wait_exit(T).unwrap();
    // Give the vCPU thread time to log its exit before the VM is torn down.
    let deadline = Instant::now() + T;
    while vm.vcpu_states()[0] == kiln_vmm::vcpu::VcpuState::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.stop();
}
