//! The child side: the `kiln-vm` process. It reads the `Start` frame from the socketpair the
//! parent left on fd [`CHILD_FD`], then, before it touches any guest data:
//!
//! 1. `unshare`s new mount, pid, ipc, uts, network and cgroup namespaces (the parent already
//!    moved it into its cgroup v2), and forks once — it is single-threaded, having started no
//!    thread — so the VMM is PID 1 of the new pid namespace; the first process only waits for
//!    it and exits with its status;
//! 2. mounts a tmpfs on the parent's empty directory, bind-mounts the kernel, initramfs and
//!    disks into it (read-only unless a disk is writable; all `nosuid,nodev,noexec`), creates
//!    `/dev/kvm` (owned by the jail's uid, 0600) and `/dev/null`, `pivot_root`s into it,
//!    detaches the old root and remounts the new one read-only;
//! 3. sets the hostname, the rlimits, drops every capability from the bounding set and the
//!    ambient set, clears supplementary groups, switches to the jail's gid and uid (which
//!    clears the permitted and effective sets), clears the inheritable set and sets
//!    `PR_SET_NO_NEW_PRIVS`, then checks all of it took;
//! 4. starts the VM (kiln-vmm: each VMM thread installs its seccomp filter as always),
//!    listens on the bridged vsock ports and hands each guest connection to the parent as one
//!    end of a fresh unix socketpair (`SCM_RIGHTS`), copying bytes between the other end and
//!    the vsock stream on threads under kiln-vmm's vsock-proxy filter; streams the serial
//!    console to the parent; ends when the VM ends, the parent says `Stop`, or the parent's
//!    end of the socket closes.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_vmm::seccomp::SeccompMode;
use kiln_vmm::virtio::block::DiskConfig;
use kiln_vmm::virtio::vsock::{VsockError, VsockListener};
use kiln_vmm::{Vm, VmConfig};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Uid};

use crate::proto::{self, StartSpec, ToChild, ToParent, MAX_BRIDGED_PORTS, MAX_DISKS};

/// The fd the parent leaves the socketpair on in the child.
pub const CHILD_FD: i32 = 3;
/// How long the child waits for its `Start` frame.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the child forwards serial output and checks the VM.
const POLL: Duration = Duration::from_millis(20);
/// How long a bridged listener's accept waits before re-checking for the end.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Hostname inside the jail.
const HOSTNAME: &str = "kiln-vm";
/// Exit status of a child whose set-up failed (after it reported `Failed`).
pub const EXIT_SETUP_FAILED: i32 = 3;

/// A failed set-up step.
#[derive(Debug, thiserror::Error)]
#[error("{stage}: {message}")]
pub struct SetupError {
    /// The step.
    pub stage: &'static str,
    /// Why.
    pub message: String,
}

fn fail<E: std::fmt::Display>(stage: &'static str) -> impl FnOnce(E) -> SetupError {
    move |e| SetupError {
        stage,
        message: e.to_string(),
    }
}

/// The `kiln-vm` binary's `main` (its log subscriber is set up by the binary): never returns.
pub fn main() -> ! {
    // SAFETY: fd 3 was dup2'ed there by the parent for us alone; we check it is a socket
    // before using it and own it from here on.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(CHILD_FD, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    };
    if !is_socket {
        eprintln!("kiln-vm: fd {CHILD_FD} is not a socket: this program is started by the kiln library (kiln-jail), not by hand");
        std::process::exit(2);
    }
    // SAFETY: see above.
    let sock = unsafe { UnixStream::from_raw_fd(CHILD_FD) };
    let spec = match read_start(&sock) {
        Ok(s) => s,
        Err(e) => {
            report_failure(&sock, &e);
            std::process::exit(EXIT_SETUP_FAILED);
        }
    };
    if let Err(e) = enter_namespaces() {
        report_failure(&sock, &e);
        std::process::exit(EXIT_SETUP_FAILED);
    }
    // SAFETY: this process is single-threaded (it has spawned no thread: the tracing
    // subscriber spawns none), so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(sock);
            std::process::exit(wait_for(child));
        }
        Ok(ForkResult::Child) => vmm(sock, *spec),
        Err(e) => {
            report_failure(&sock, &fail("fork into the new pid namespace")(e));
            std::process::exit(EXIT_SETUP_FAILED);
        }
    }
}

fn report_failure(sock: &UnixStream, e: &SetupError) {
    eprintln!("kiln-vm: {e}");
    let _ = proto::send(
        sock,
        &ToParent::Failed {
            stage: e.stage.into(),
            message: e.message.clone(),
        },
        None,
    );
}

/// Waits for the VMM process; its exit status, or 128 + the signal that ended it.
fn wait_for(child: nix::unistd::Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 1,
        }
    }
}

fn read_start(sock: &UnixStream) -> Result<Box<StartSpec>, SetupError> {
    sock.set_read_timeout(Some(START_TIMEOUT))
        .map_err(fail("socket"))?;
    let (msg, _fd) = proto::recv::<ToChild>(sock).map_err(fail("reading the Start frame"))?;
    sock.set_read_timeout(None).map_err(fail("socket"))?;
    let spec = match msg {
        ToChild::Start(s) => s,
        ToChild::Stop => {
            return Err(SetupError {
                stage: "reading the Start frame",
                message: "got Stop first".into(),
            })
        }
    };
    spec.jail.validate().map_err(|message| SetupError {
        stage: "checking the jail configuration",
        message,
    })?;
    if spec.vm.bridge_ports.len() > MAX_BRIDGED_PORTS || spec.vm.disks.len() > MAX_DISKS {
        return Err(SetupError {
            stage: "checking the VM",
            message: "too many bridged ports or disks".into(),
        });
    }
    Ok(spec)
}

fn enter_namespaces() -> Result<(), SetupError> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(fail(
        "unshare (mount, pid, ipc, uts, net, cgroup namespaces)",
    ))
}

/// The VMM process (PID 1 of the new pid namespace).
fn vmm(sock: UnixStream, spec: StartSpec) -> ! {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // /proc is still the host's: /proc/self names us in the parent's pid namespace.
    let vmm_pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        .unwrap_or(0);
    let cfg = match setup(&spec) {
        Ok(c) => c,
        Err(e) => {
            report_failure(&sock, &e);
            std::process::exit(EXIT_SETUP_FAILED);
        }
    };
    std::process::exit(run(sock, cfg, &spec, vmm_pid))
}

/// Jail paths of the VM's files.
fn setup(spec: &StartSpec) -> Result<VmConfig, SetupError> {
    let root = spec.root.as_path();
    let jail = &spec.jail;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(fail("making the mount tree private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=64"),
    )
    .map_err(fail("mounting the jail's tmpfs root"))?;
    let vm = &spec.vm;
    let mut cfg = VmConfig::new(
        vm.name.clone(),
        bind_file(root, &vm.kernel, "kernel", true)?,
    );
    cfg.vcpus = vm.vcpus;
    cfg.mem_mib = vm.mem_mib;
    cfg.initramfs = match &vm.initramfs {
        Some(p) => Some(bind_file(root, p, "initramfs", true)?),
        None => None,
    };
    cfg.cmdline_extra = vm.cmdline_extra.clone();
    cfg.vsock_cid = vm.vsock_cid;
    cfg.serial_ring_bytes = usize::try_from(vm.serial_ring_bytes).unwrap_or(1 << 20);
    cfg.seccomp = SeccompMode::from(vm.seccomp);
    for (i, d) in vm.disks.iter().enumerate() {
        let path = bind_file(root, &d.path, &format!("disk{i}"), d.read_only)?;
        let mut disk = DiskConfig::new(path, d.read_only);
        disk.id = d.id.clone();
        cfg.disks.push(disk);
    }
    make_devices(root, jail.uid, jail.gid)?;
    nix::unistd::sethostname(HOSTNAME).map_err(fail("sethostname"))?;
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(63);
    pivot(root)?;
    set_rlimits(&jail.rlimits)?;
    drop_privileges(jail.uid, jail.gid, last_cap)?;
    Ok(cfg)
}

/// Bind-mounts `host` onto `<root>/<name>`; returns the path inside the jail.
fn bind_file(root: &Path, host: &Path, name: &str, read_only: bool) -> Result<PathBuf, SetupError> {
    let target = root.join(name);
    std::fs::File::create(&target).map_err(fail("creating a bind-mount target"))?;
    mount(
        Some(host),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| SetupError {
        stage: "bind-mounting a VM file",
        message: format!("{}: {e}", host.display()),
    })?;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(fail("remounting a VM file read-only"))?;
    Ok(Path::new("/").join(name))
}

fn make_devices(root: &Path, uid: u32, gid: u32) -> Result<(), SetupError> {
    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(fail("creating /dev"))?;
    let kvm = nix::sys::stat::stat("/dev/kvm").map_err(fail("stat /dev/kvm"))?;
    let nodes = [
        ("kvm", kvm.st_rdev, 0o600, true),
        ("null", makedev(1, 3), 0o666, false),
    ];
    for (name, rdev, mode, owned) in nodes {
        let path = dev.join(name);
        mknod(&path, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), rdev)
            .map_err(fail("creating a device node"))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(fail("chmod of a device node"))?;
        if owned {
            nix::unistd::chown(&path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(fail("chown of /dev/kvm"))?;
        }
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<(), SetupError> {
    nix::unistd::chdir(root).map_err(fail("chdir to the new root"))?;
    std::fs::create_dir(".old").map_err(fail("creating the old-root mount point"))?;
    nix::unistd::pivot_root(".", ".old").map_err(fail("pivot_root"))?;
    nix::unistd::chdir("/").map_err(fail("chdir /"))?;
    umount2("/.old", MntFlags::MNT_DETACH).map_err(fail("detaching the old root"))?;
    std::fs::remove_dir("/.old").map_err(fail("removing the old-root mount point"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(fail("remounting the root read-only"))
}

fn set_rlimits(r: &crate::config::Rlimits) -> Result<(), SetupError> {
    setrlimit(Resource::RLIMIT_NOFILE, r.nofile, r.nofile).map_err(fail("RLIMIT_NOFILE"))?;
    setrlimit(Resource::RLIMIT_NPROC, r.nproc, r.nproc).map_err(fail("RLIMIT_NPROC"))?;
    if let Some(f) = r.fsize {
        setrlimit(Resource::RLIMIT_FSIZE, f, f).map_err(fail("RLIMIT_FSIZE"))?;
    }
    // No core files: guest memory is MADV_DONTDUMP anyway, this covers everything else.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(fail("RLIMIT_CORE"))
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn capset_zero() -> std::io::Result<()> {
    let hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3), both live here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn capget() -> std::io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two data structs (version 3) into `data`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc == 0 {
        Ok(data)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn drop_privileges(uid: u32, gid: u32, last_cap: u32) -> Result<(), SetupError> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(fail("dropping the capability bounding set")(e));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(fail("clearing the ambient capabilities")(
            std::io::Error::last_os_error(),
        ));
    }
    nix::unistd::setgroups(&[]).map_err(fail("setgroups"))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(fail("setresgid"))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(fail("setresuid"))?;
    capset_zero().map_err(fail("clearing the capability sets"))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("PR_SET_NO_NEW_PRIVS")(std::io::Error::last_os_error()));
    }
    // Check, rather than trust, that it all took.
    let caps = capget().map_err(fail("capget"))?;
    let any = caps
        .iter()
        .any(|c| c.effective != 0 || c.permitted != 0 || c.inheritable != 0);
    // SAFETY: prctl with integer arguments only.
    let bset0 = unsafe { libc::prctl(libc::PR_CAPBSET_READ, 0, 0, 0, 0) };
    // SAFETY: prctl with integer arguments only.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    if any || bset0 != 0 || nnp != 1 || nix::unistd::getuid().as_raw() != uid {
        return Err(SetupError {
            stage: "checking the dropped privileges",
            message: format!("capabilities or no_new_privs still set (bset[0]={bset0}, nnp={nnp})"),
        });
    }
    Ok(())
}

/// Runs the VM until it ends, the parent says stop or goes away; the exit status.
fn run(sock: UnixStream, cfg: VmConfig, spec: &StartSpec, vmm_pid: u32) -> i32 {
    let mode = cfg.seccomp;
    let vm = match Vm::start(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            report_failure(
                &sock,
                &SetupError {
                    stage: "starting the VM",
                    message: e.to_string(),
                },
            );
            return EXIT_SETUP_FAILED;
        }
    };
    let mut listeners = Vec::new();
    for &port in &spec.vm.bridge_ports {
        let l = match vm.vsock() {
            Some(v) => v.listen(port).map_err(|e| e.to_string()),
            None => Err("the VM has no vsock device".to_string()),
        };
        match l {
            Ok(l) => listeners.push(l),
            Err(message) => {
                report_failure(
                    &sock,
                    &SetupError {
                        stage: "listening on a bridged vsock port",
                        message: format!("port {port}: {message}"),
                    },
                );
                vm.stop();
                return EXIT_SETUP_FAILED;
            }
        }
    }
    let writer = Arc::new(Mutex::new(sock));
    let send = |w: &Mutex<UnixStream>, msg: &ToParent, fd: Option<i32>| {
        let g = kiln_sync::lock(w);
        proto::send(&g, msg, fd)
    };
    if send(&writer, &ToParent::Running { vmm_pid }, None).is_err() {
        vm.stop();
        return 1;
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Parent -> child frames, on a thread (reads block).
    let (ctl_tx, ctl_rx) = mpsc::channel::<Option<ToChild>>();
    let reader = match kiln_sync::lock(&writer).try_clone() {
        Ok(r) => r,
        Err(_) => {
            vm.stop();
            return 1;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("jail-ctl".into())
        .spawn(move || loop {
            match proto::recv::<ToChild>(&reader) {
                Ok((m, _)) => {
                    if ctl_tx.send(Some(m)).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = ctl_tx.send(None);
                    return;
                }
            }
        });
    if spawned.is_err() {
        vm.stop();
        return 1;
    }
    for l in listeners {
        let writer = writer.clone();
        let stop = stop.clone();
        let _ = std::thread::Builder::new()
            .name(format!("jail-accept-{}", l.port()))
            .spawn(move || bridge(l, &writer, &stop, mode));
    }
    let mut pos = 0u64;
    let reason = loop {
        forward_serial(&vm, &writer, &mut pos);
        if let Some(r) = vm.exit_reason() {
            forward_serial(&vm, &writer, &mut pos);
            stop.store(true, Ordering::Release);
            let _ = vm.stop();
            break r.to_string();
        }
        match ctl_rx.recv_timeout(POLL) {
            Ok(Some(ToChild::Stop)) | Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                stop.store(true, Ordering::Release);
                forward_serial(&vm, &writer, &mut pos);
                break vm.stop().to_string();
            }
            Ok(Some(ToChild::Start(_))) | Err(RecvTimeoutError::Timeout) => {}
        }
    };
    let _ = send(&writer, &ToParent::Exited { reason }, None);
    0
}

fn forward_serial(vm: &Vm, writer: &Mutex<UnixStream>, pos: &mut u64) {
    loop {
        let (data, next) = vm.serial_since(*pos, proto::MAX_SERIAL_CHUNK);
        *pos = next;
        if data.is_empty() {
            return;
        }
        let g = kiln_sync::lock(writer);
        if proto::send(&g, &ToParent::Serial { data }, None).is_err() {
            return;
        }
    }
}

/// Accepts guest connections on one bridged port and hands each to the parent.
fn bridge(l: VsockListener, writer: &Mutex<UnixStream>, stop: &AtomicBool, mode: SeccompMode) {
    let port = l.port();
    while !stop.load(Ordering::Acquire) {
        let stream = match l.accept(ACCEPT_POLL) {
            Ok(s) => s,
            Err(VsockError::AcceptTimeout { .. }) => continue,
            Err(e) => {
                tracing::debug!(port, error = %e, "bridged listener ended");
                return;
            }
        };
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(port, error = %e, "no socketpair for a bridged connection");
                continue;
            }
        };
        let sent = {
            let g = kiln_sync::lock(writer);
            proto::send(&g, &ToParent::Conn { port }, Some(theirs.as_raw_fd()))
        };
        drop(theirs);
        if sent.is_err() {
            return;
        }
        let _ = std::thread::Builder::new()
            .name(format!("jail-bridge-{port}"))
            .spawn(move || {
                if let Err(e) = kiln_vmm::virtio::vsock::unix::proxy(ours, stream, mode) {
                    tracing::debug!(port, error = %e, "bridged connection ended");
                }
            });
    }
}
