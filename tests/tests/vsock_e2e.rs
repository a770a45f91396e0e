//! Tier 4: the virtio-vsock data plane against a real Linux guest. Kiln's VMM boots the Kiln
//! guest with `kiln.echo=1`; the agent's byte echo server listens on guest vsock port 5000.
//! Checks: 64 MiB each way byte-exact, 8 concurrent connections, refused port, clean
//! shutdown. Prints throughput (the bench numbers come from `cargo xtask bench`).
//!
//! Runs directly on hosts with hardware virtualization, elsewhere inside the harness:
//! `cargo test -p kiln-tests --no-run`, then `cargo xtask harness -- <test binary> --nocapture`.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use kiln_tests::{guest_initramfs, guest_kernel, READY_LINE};
use kiln_vmm::virtio::vsock::{VsockError, VsockHost, VsockStream};
use kiln_vmm::{Vm, VmConfig};

const ECHO_PORT: u32 = 5000;

fn boot(name: &str, vcpus: u8) -> Vm {
    kiln_tests::require_tier4();
    let mut cfg = VmConfig::new(name, guest_kernel().unwrap());
    cfg.initramfs = Some(guest_initramfs().unwrap());
    cfg.vcpus = vcpus;
    cfg.mem_mib = 256;
    cfg.vsock_cid = Some(kiln_proto::GUEST_CID.into());
    cfg.cmdline_extra = "kiln.echo=1".into();
    let vm = Vm::start(cfg).unwrap();
    vm.wait_for_serial(READY_LINE, Instant::now() + Duration::from_secs(120))
        .unwrap();
    vm
}

/// Connect to the echo server, retrying while the agent is still starting it.
fn connect_echo(host: &VsockHost) -> VsockStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match host.connect(ECHO_PORT, Duration::from_secs(10)) {
            Ok(s) => return s,
            Err(VsockError::ConnectionRefused { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect to echo: {e}"),
        }
    }
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Send `data` through the echo server and return what came back plus the elapsed time.
fn echo_roundtrip(s: VsockStream, data: Vec<u8>, timeout: Duration) -> (Vec<u8>, Duration) {
    let mut r = s.try_clone().unwrap();
    r.set_read_timeout(Some(timeout)).unwrap();
    let mut w = s;
    w.set_write_timeout(Some(timeout)).unwrap();
    let n = data.len();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).unwrap();
        }
        w.flush().unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        w
    });
    let mut got = Vec::with_capacity(n);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
    }
    let elapsed = t0.elapsed();
    drop(writer.join().unwrap());
    (got, elapsed)
}

#[test]
fn echo_64mib_each_way_byte_exact() {
    let vm = boot("vsock-e2e-64m", 1);
    let host = vm.vsock().unwrap().clone();
    let s = connect_echo(&host);
    let data = pattern(64 << 20, 1);
    let (got, elapsed) = echo_roundtrip(s, data.clone(), Duration::from_secs(300));
    assert_eq!(got.len(), data.len(), "echoed length");
    assert!(got == data, "echoed bytes differ");
    let mib = (data.len() >> 20) as f64;
    eprintln!(
        "vsock echo: 64 MiB each way in {:.2} s ({:.1} MiB/s per direction)",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
    vm.stop();
}

#[test]
fn eight_concurrent_echo_connections() {
    let vm = boot("vsock-e2e-8", 1);
    let host = vm.vsock().unwrap().clone();
    let streams: Vec<_> = (0..8).map(|_| connect_echo(&host)).collect();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let data = pattern(4 << 20, 100 + i as u64);
                let (got, _) = echo_roundtrip(s, data.clone(), Duration::from_secs(300));
                assert_eq!(got.len(), data.len(), "connection {i}");
                assert!(got == data, "connection {i}: bytes differ");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    vm.stop();
}

#[test]
fn transport_reset_drops_connections_and_guest_keeps_serving() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>7.3}s] {what}", t0.elapsed().as_secs_f64());
    let vm = boot("vsock-e2e-reset", 1);
    step("guest ready");
    let host = vm.vsock().unwrap().clone();
    let mut s = connect_echo(&host);
    step("connected");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"before reset").unwrap();
    let mut b = [0u8; 12];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"before reset");
    step("echoed before reset");
    host.transport_reset();
    let e = s.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    step("old connection aborted");
    // The guest driver processed the event (its sockets were reset) and still listens.
    let s2 = connect_echo(&host);
    step("reconnected");
    let (got, _) = echo_roundtrip(s2, pattern(1 << 20, 7), Duration::from_secs(60));
    assert!(got == pattern(1 << 20, 7));
    step("echoed 1 MiB after reset");
    vm.stop();
    step("stopped");
}

#[test]
fn connect_to_closed_guest_port_is_refused() {
    let vm = boot("vsock-e2e-refused", 1);
    let host = vm.vsock().unwrap().clone();
    let _ = connect_echo(&host); // the guest's vsock stack is up
    let r = host.connect(5999, Duration::from_secs(10));
    assert!(
        matches!(r, Err(VsockError::ConnectionRefused { port: 5999, .. })),
        "{r:?}"
    );
    vm.stop();
    assert!(matches!(
        host.connect(ECHO_PORT, Duration::from_secs(1)),
        Err(VsockError::DeviceGone { .. })
    ));
}
