//! System setup and control: PID 1 duties (pseudo filesystems, console, hostname, loopback,
//! kernel command line), post-restore clock and RNG refresh, and shutdown.

use std::io::Write;
use std::os::fd::AsRawFd;

use nix::mount::{mount, MsFlags};

/// What the agent does on `Shutdown` and `PostRestore`, by mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the guest.
    Guest,
    /// An ordinary host process (tier-3 tests).
    Host,
}

/// Hostname set by the agent in the guest.
pub const HOSTNAME: &str = "kiln";

/// Errors of PID 1 setup (logged to the console; the agent carries on).
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("bringing up {iface}: {op}: {source}")]
    Link {
        iface: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sethostname {name}: {source}")]
    Hostname {
        name: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// Make sure fds 0, 1 and 2 are open (on /dev/null when nothing else), so pipes created later
/// never land on them.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                // SAFETY: dup2 onto a free low fd; `f` stays valid for the call.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            }
        }
    }
}

/// Mount the pseudo filesystems PID 1 needs. Failures are returned, not fatal.
pub fn mount_all() -> Vec<SysError> {
    let nosuid = MsFlags::MS_NOSUID;
    let mounts: [(&str, &'static str, &'static str, MsFlags, Option<&str>); 7] = [
        (
            "proc",
            "/proc",
            "proc",
            nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", nosuid, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            nosuid | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            nosuid | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    let mut errors = Vec::new();
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(source) = mount(Some(src), target, Some(fstype), flags, data) {
            if source != nix::Error::EBUSY {
                errors.push(SysError::Mount {
                    fstype,
                    target,
                    source,
                });
            }
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    errors
}

/// Point fds 0-2 at /dev/console (PID 1 may start without a console when the initramfs has
/// no /dev/console node).
pub fn open_console() {
    // SAFETY: F_GETFD only queries the fd table.
    let have_stdout = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1
        && std::fs::read_link("/proc/self/fd/1")
            .is_ok_and(|p| p != std::path::Path::new("/dev/null"));
    if have_stdout {
        return;
    }
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of a valid fd onto 0..2.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Set the hostname.
pub fn set_hostname() -> Result<(), SysError> {
    nix::unistd::sethostname(HOSTNAME).map_err(|source| SysError::Hostname {
        name: HOSTNAME,
        source,
    })
}

/// Bring the loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS).
pub fn loopback_up() -> Result<(), SysError> {
    const IFACE: &str = "lo";
    let link = |op: &'static str, source: std::io::Error| SysError::Link {
        iface: IFACE,
        op,
        source,
    };
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| {
            // No IPv4 address yet is fine: any AF_INET datagram socket works for the ioctl.
            // SAFETY: plain socket(2) call; the fd is wrapped below.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh socket we own.
            Ok(unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        })
        .map_err(|e| link("socket", e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(IFACE.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) } < 0 {
        return Err(link("SIOCGIFFLAGS", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled ifru_flags for SIOCGIFFLAGS; we only modify that field.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) } < 0 {
        return Err(link("SIOCSIFFLAGS", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `/proc/cmdline` carries `key=value` (or, for value "1", bare `key`).
pub fn cmdline_has(key: &str, value: &str) -> bool {
    let Ok(c) = std::fs::read_to_string("/proc/cmdline") else {
        return false;
    };
    let want = format!("{key}={value}");
    c.split_whitespace()
        .any(|w| w == want || (value == "1" && w == key))
}

/// Print a line on the console (stdout), flushed.
pub fn console(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `_IOW('R', 0x03, int[2])`: add entropy (and credit it) to the kernel pool.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// After a snapshot restore: set the wall clock and mix `seed` into the kernel RNG.
/// In host mode the clock is left alone and the seed is only written (uncredited) to
/// /dev/urandom.
pub fn post_restore(mode: Mode, unix_time_ns: u64, seed: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    if mode == Mode::Host {
        (&f).write_all(seed)?;
        return Ok(());
    }
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as _,
        tv_nsec: (unix_time_ns % 1_000_000_000) as _,
    };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&size.to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info laid out exactly as built above.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        // Without CAP_SYS_ADMIN: still mix the seed in, uncredited.
        (&f).write_all(seed)?;
    }
    // SAFETY: argument-less ioctl on our fd; failure (older kernels) is harmless.
    unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    Ok(())
}

/// How long the guest waits after answering `Shutdown` before rebooting.
const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// End the VM (guest: sync + reboot, which `reboot=t` turns into a VM exit) or the process.
pub fn shutdown(mode: Mode) {
    match mode {
        Mode::Host => std::process::exit(0),
        Mode::Guest => {
            nix::unistd::sync();
            // Give the transport a moment to deliver the `Ok` before the device resets.
            std::thread::sleep(SHUTDOWN_LINGER);
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            // reboot(2) does not return on success.
            std::process::exit(1);
        }
    }
}
