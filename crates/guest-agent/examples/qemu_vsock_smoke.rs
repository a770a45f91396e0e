//! Tier-4 smoke check of kiln-agent as PID 1 in a real Linux guest, independent of Kiln's
//! VMM: boots the Kiln guest (kernel + initramfs from the assets dir, or `KILN_KERNEL` /
//! `KILN_INITRAMFS`) under QEMU `-M microvm -accel kvm` with a vhost-vsock device, accepts the
//! agent's connection on vsock port `AGENT_PORT` and drives it with the kiln-proto client:
//! PID 1 setup (mounts, hostname, lo), exec, files, concurrency, timeouts, the echo server,
//! reconnection (`restored: true`), post-restore and shutdown.
//!
//! It needs /dev/kvm and /dev/vhost-vsock, so on a PVM host it runs inside the harness, where
//! it loads the vhost-vsock modules from the harness's Debian kernel package itself:
//!
//! ```text
//! cargo build -p kiln-agent --example qemu_vsock_smoke
//! cargo xtask harness -- target/debug/examples/qemu_vsock_smoke
//! ```

use std::error::Error;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::{Client, ClientConfig, ExecRequest, AGENT_PORT, ECHO_PORT};
use kiln_testkit::QemuCommand;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const GUEST_CID: u32 = kiln_proto::GUEST_CID;

/// Load vhost-vsock from the harness's kernel package when /dev/vhost-vsock is missing.
fn ensure_vhost_vsock() -> Result<()> {
    if std::path::Path::new("/dev/vhost-vsock").exists() {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let base = kiln::assets::assets_dir()?
        .join("harness")
        .join(&release)
        .join("pkg/lib/modules")
        .join(&release)
        .join("kernel");
    for m in [
        "net/vmw_vsock/vsock.ko",
        "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
        "drivers/vhost/vhost_iotlb.ko",
        "drivers/vhost/vhost.ko",
        "drivers/vhost/vhost_vsock.ko",
    ] {
        let path = base.join(m);
        let out = Command::new("insmod").arg(&path).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("File exists") {
            return Err(format!("insmod {}: {err}", path.display()).into());
        }
    }
    for _ in 0..100 {
        if std::path::Path::new("/dev/vhost-vsock").exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("/dev/vhost-vsock did not appear".into())
}

fn vsock_stream() -> Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn accept_within(listener: &OwnedFd, within: Duration) -> Result<File> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the agent did not connect within {within:?}").into());
        }
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(listener),
            PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms))? > 0 {
            break;
        }
    }
    let fd = accept(listener.as_raw_fd())?;
    // SAFETY: accept returned a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn client_on(conn: File) -> Result<Client> {
    let reader = conn.try_clone()?;
    Ok(Client::connect(reader, conn, ClientConfig::default())?)
}

fn sh(c: &Client, script: &str) -> Result<String> {
    let out = c.exec(ExecRequest::new(["sh", "-c", script]))?;
    if out.status.code != Some(0) {
        return Err(format!(
            "{script}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}").into())
    }
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    match run() {
        Ok(()) => println!("qemu_vsock_smoke: all checks passed"),
        Err(e) => {
            eprintln!("qemu_vsock_smoke: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    ensure_vhost_vsock()?;
    // `$KILN_KERNEL` / `$KILN_INITRAMFS`, else the current guest in the assets directory.
    let kernel = kiln::assets::default_kernel()?;
    let initramfs = kiln::assets::default_initramfs()?;

    let listener = vsock_stream()?;
    bind(listener.as_raw_fd(), &VsockAddr::new(u32::MAX, AGENT_PORT))?;
    listen(&listener, Backlog::new(4)?)?;

    let t0 = Instant::now();
    let mut child = QemuCommand::new(&kernel)
        // No ACPI: QEMU then announces the virtio-mmio devices on the kernel command line.
        .machine("microvm,acpi=off")
        .accel("kvm")
        .cpu("host")
        .memory_mib(256)
        .smp(1)
        .arg("-device")
        .arg(format!("vhost-vsock-device,guest-cid={GUEST_CID}"))
        .initrd(&initramfs)
        .append("console=ttyS0 reboot=t panic=-1 quiet kiln.echo=1")
        .command()
        .stderr(Stdio::inherit())
        .spawn()?;
    let serial = child.stdout.take().ok_or("no QEMU stdout")?;
    let qemu = Qemu(child);
    std::thread::spawn(move || {
        for line in BufReader::new(serial).lines().map_while(|l| l.ok()) {
            eprintln!("guest: {line}");
        }
    });

    let conn = accept_within(&listener, Duration::from_secs(120))?;
    println!("agent connected after {:?}", t0.elapsed());
    let c = client_on(conn.try_clone()?)?;
    check(
        c.hello().version == kiln_proto::PROTOCOL_VERSION && !c.hello().restored,
        "hello: version, first connection",
    )?;
    c.ping()?;

    check(
        sh(&c, "cat /proc/1/comm")?.trim() == "init",
        "the agent is PID 1 (/init)",
    )?;
    check(sh(&c, "hostname")?.trim() == "kiln", "hostname")?;
    let mounts = sh(&c, "cat /proc/mounts")?;
    let missing = kiln_testkit::guest::missing_pid1_mounts(&mounts);
    for (target, fstype) in kiln_testkit::guest::PID1_MOUNTS {
        check(
            !missing.contains(&(target, fstype)),
            &format!("{target} mounted as {fstype}"),
        )?;
    }
    let flags = sh(&c, "cat /sys/class/net/lo/flags")?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16)?;
    check(flags & 1 == 1, "lo is up")?;

    // Exec: env, exit codes, timeout of a whole group, 16 concurrent execs.
    let mut req = ExecRequest::new(["sh", "-c", "echo $X; exit 3"]);
    req.env = vec![("X".into(), "y".into())];
    let out = c.exec(req)?;
    check(
        out.stdout == b"y\n" && out.status.code == Some(3),
        "env and exit code",
    )?;
    let out = c.exec(ExecRequest::new(["no-such-command"]))?;
    check(out.status.code == Some(127), "unknown command exits 127")?;
    let mut req = ExecRequest::new(["sh", "-c", "sleep 1000 & echo $!; sleep 1000"]);
    req.timeout_ms = Some(1000);
    let out = c.exec(req)?;
    let pid = String::from_utf8(out.stdout)?.trim().to_owned();
    check(out.status.timed_out, "timeout reported")?;
    std::thread::sleep(Duration::from_millis(300));
    check(
        sh(
            &c,
            &format!("test -e /proc/{pid} && echo alive || echo gone"),
        )?
        .trim()
            == "gone",
        "the timed-out group's background child is gone",
    )?;
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                c.exec(ExecRequest::new(["echo", &i.to_string()]))
                    .map(|o| o.stdout == format!("{i}\n").into_bytes())
                    .unwrap_or(false)
            })
        })
        .collect();
    let all = threads.into_iter().all(|t| t.join().unwrap_or(false));
    check(all, "16 concurrent execs")?;
    let out = c.exec(ExecRequest::new(["head", "-c", "20000000", "/dev/zero"]))?;
    check(out.stdout.len() == 20_000_000, "20 MB of stdout")?;

    // Files.
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    c.write_file("/tmp/blob", &data, None)?;
    check(c.read_file("/tmp/blob")? == data, "8 MiB file round trip")?;
    check(c.stat("/tmp/blob")?.size == data.len() as u64, "stat size")?;

    // The echo server on vsock port ECHO_PORT.
    let echo = vsock_stream()?;
    connect(echo.as_raw_fd(), &VsockAddr::new(GUEST_CID, ECHO_PORT))?;
    let mut echo = File::from(echo);
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 13 % 256) as u8).collect();
    let mut w = echo.try_clone()?;
    let p2 = payload.clone();
    let writer = std::thread::spawn(move || w.write_all(&p2));
    let mut back = vec![0u8; payload.len()];
    echo.read_exact(&mut back)?;
    writer.join().map_err(|_| "echo writer panicked")??;
    check(back == payload, "1 MiB through the echo server")?;

    // Reconnection: drop our side; the agent connects again with restored: true.
    nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Both)?;
    drop(conn);
    let conn2 = accept_within(&listener, Duration::from_secs(30))?;
    let c2 = client_on(conn2)?;
    check(c2.hello().restored, "reconnect announces restored: true")?;
    c2.ping()?;
    check(
        c2.read_file("/tmp/blob")?.len() == data.len(),
        "state kept across reconnects",
    )?;

    // Post-restore: set the clock a day ahead and check it took.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let ahead = now + Duration::from_secs(86_400);
    c2.post_restore(u64::try_from(ahead.as_nanos())?, vec![42; 64])?;
    let guest_now: u64 = sh(&c2, "date +%s")?.trim().parse()?;
    check(
        guest_now.abs_diff(ahead.as_secs()) < 60,
        "post-restore set the clock",
    )?;

    // Shutdown ends the VM.
    c2.shutdown()?;
    let mut qemu = qemu;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = qemu.0.try_wait()? {
            println!("QEMU exited ({status}) after shutdown");
            break;
        }
        if Instant::now() > deadline {
            return Err("QEMU still running 30 s after Shutdown".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("total {:?}", t0.elapsed());
    Ok(())
}
