//! Tier-1 tests of the vsock device through the real MMIO transport and guest memory, with
//! a scripted guest driver (`virtio::testutil`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::host::CloseReason;
use super::packet::*;
use super::*;
use crate::virtio::mmio::regs;
use crate::virtio::testutil::*;
use crate::virtio::STATUS_DEVICE_NEEDS_RESET;

const T: Duration = Duration::from_secs(5);
const GPORT: u32 = 5000;

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// Guest connects to a host listener; returns the accepted host stream.
fn guest_connect(g: &mut TestGuest, l: &VsockListener, gport: u32) -> VsockStream {
    g.send(OP_REQUEST, gport, l.port(), &[]);
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RESPONSE], "{p:?}");
    let h = p[0].0;
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, g.cid, l.port(), gport)
    );
    assert!(h.buf_alloc >= 4096);
    l.accept(T).unwrap()
}

/// Host connects to guest port `gport`; the guest answers RESPONSE.
fn host_connect(g: &mut TestGuest, gport: u32) -> VsockStream {
    let t = spawn_connect(g, gport, T);
    let req = g.recv_wait(T).expect("no REQUEST");
    assert_eq!(req.0.op, OP_REQUEST);
    assert_eq!(req.0.dst_port, gport);
    assert!(req.0.src_port >= EPHEMERAL_PORT_BASE);
    g.send(OP_RESPONSE, gport, req.0.src_port, &[]);
    t.join().unwrap().unwrap()
}

/// Posts `rx` RX buffers and connects guest port 40000 to a host listener on port 1024.
/// Keep the listener bound (`_l`, not `_`) where the original test kept it alive.
fn connected(mut g: TestGuest, rx: usize) -> (TestGuest, VsockListener, VsockStream) {
    g.post_rx(rx);
    let l = g.host.listen(1024).unwrap();
    let s = guest_connect(&mut g, &l, 40000);
    (g, l, s)
}

/// A guest whose device has per-connection buffers of `conn_buffer_size` bytes.
fn with_conn_buffer(conn_buffer_size: u32) -> TestGuest {
    TestGuest::with_config(VsockConfig {
        conn_buffer_size,
        ..VsockConfig::default()
    })
}

/// Host connect to guest port `gport` on another thread (the test thread plays the guest).
fn spawn_connect(
    g: &TestGuest,
    gport: u32,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<VsockStream, VsockError>> {
    let host = g.host.clone();
    std::thread::spawn(move || host.connect(gport, timeout))
}

/// The guest sends SHUTDOWN with `flags` on its connection `src` -> `dst`.
fn send_shutdown(g: &mut TestGuest, src: u32, dst: u32, flags: u32) {
    let mut h = g.hdr(OP_SHUTDOWN, src, dst);
    h.flags = flags;
    g.send_hdr(h, &[]);
}

/// `r` failed with an I/O error of `kind`.
#[track_caller]
fn assert_io_err<T: std::fmt::Debug>(r: std::io::Result<T>, kind: std::io::ErrorKind) {
    assert_eq!(r.unwrap_err().kind(), kind);
}

/// Payload bytes carried by the RW packets in `pkts`.
fn rw_bytes(pkts: &[(Header, Vec<u8>)]) -> usize {
    pkts.iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(h, _)| h.len as usize)
        .sum()
}

/// Guest-memory address of the TX buffer slot that belongs to descriptor `idx`.
fn tx_slot(idx: u16) -> u64 {
    TX_BUF + u64::from(idx) * SLOT
}

/// Write header `h` into guest memory at `addr`.
fn write_hdr(g: &TestGuest, h: &Header, addr: u64) {
    g.mem
        .write_slice(&h.to_bytes(), GuestAddress(addr))
        .unwrap();
}

/// The guest sends an RW 40000 -> 1024 whose header claims `claimed_len` payload bytes while
/// its data descriptor is `data_desc_len` long (nothing is written there), and notifies TX.
/// Returns the chain's head index.
fn send_rw_claiming(g: &mut TestGuest, claimed_len: u32, data_desc_len: u32) -> u16 {
    let mut h = g.hdr(OP_RW, 40000, 1024);
    h.len = claimed_len;
    let i = g.tx.take_index();
    let d = g.tx.take_index();
    let slot = tx_slot(i);
    write_hdr(g, &h, slot);
    g.tx.publish_descs(
        &g.mem,
        &[
            (
                i,
                SplitDescriptor::new(slot, HDR_SIZE as u32, VRING_DESC_F_NEXT, d),
            ),
            (d, SplitDescriptor::new(slot + 0x100, data_desc_len, 0, 0)),
        ],
    );
    g.notify(TXQ);
    i
}

#[test]
fn guest_request_to_listener_gets_response_and_stream() {
    let (g, _l, s) = connected(TestGuest::new(), 8);
    assert_eq!((s.local_port(), s.peer_port()), (1024, 40000));
    assert_eq!(g.host.connection_count(), 1);
}

#[test]
fn guest_request_to_unknown_port_gets_rst() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    g.send(OP_REQUEST, 40000, 777, &[]);
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (777, 40000));
    assert_eq!(g.dev.lock().unwrap().stats().muxer.rst_unknown, 1);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn rw_for_unknown_connection_gets_rst_and_data_is_dropped() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let _l = g.host.listen(1024).unwrap();
    g.send(OP_RW, 40000, 1024, b"hello");
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}

#[test]
fn full_lifecycle_guest_initiated() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 16);

    // Guest -> host.
    g.send(OP_RW, 40000, 1024, b"ping from guest");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping from guest");

    // Host -> guest.
    s.write_all(b"pong from host").unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RW]);
    assert_eq!(p[0].1, b"pong from host");
    assert_eq!(p[0].0.fwd_cnt, 15, "our fwd_cnt counts what the host read");

    // Guest closes fully: we answer RST and the host reads EOF.
    send_shutdown(&mut g, 40000, 1024, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_io_err(s.write(b"x"), std::io::ErrorKind::BrokenPipe);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn host_connect_gets_response() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let mut s = host_connect(&mut g, GPORT);
    s.write_all(b"abc").unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RW]);
    assert_eq!(p[0].1, b"abc");
    assert_eq!(p[0].0.dst_port, GPORT);
}

#[test]
fn host_connect_refused_by_guest_rst() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let t = spawn_connect(&g, GPORT, T);
    let req = g.recv_wait(T).unwrap();
    g.send(OP_RST, GPORT, req.0.src_port, &[]);
    match t.join().unwrap() {
        Err(VsockError::ConnectionRefused { port, .. }) => assert_eq!(port, GPORT),
        other => panic!("expected refused, got {other:?}"),
    }
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn host_connect_times_out_and_guest_gets_rst() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let t = spawn_connect(&g, GPORT, Duration::from_millis(200));
    let req = g.recv_wait(T).unwrap();
    assert_eq!(req.0.op, OP_REQUEST);
    let started = Instant::now();
    let r = t.join().unwrap();
    assert!(
        matches!(r, Err(VsockError::ConnectTimeout { port: GPORT, .. })),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let rst = g.recv_wait(T).expect("RST after abandoned connect");
    assert_eq!(rst.0.op, OP_RST);
    assert_eq!(rst.0.src_port, req.0.src_port);
    g.pump();
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn connect_before_driver_ok_waits_for_activation_deadline() {
    // Device never activated: connect must honour its deadline.
    let dev = VsockDevice::new(VsockConfig::default()).unwrap();
    let host = dev.host();
    let r = host.connect(GPORT, Duration::from_millis(50));
    assert!(matches!(r, Err(VsockError::ConnectTimeout { .. })), "{r:?}");
}

#[test]
fn host_write_stops_at_guest_credit_and_resumes_on_credit_update() {
    let mut g = TestGuest::new();
    g.buf_alloc = 8192;
    let (mut g, _l, mut s) = connected(g, 32);
    let data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).unwrap();
    g.pump();
    let p = g.recv_all();
    let rw = rw_bytes(&p);
    assert_eq!(rw, 8192, "host sent exactly the guest's credit");
    assert_eq!(p.last().unwrap().0.op, OP_CREDIT_REQUEST);
    g.pump();
    assert!(g.recv_all().is_empty(), "nothing more without credit");

    // The guest app consumed 8192 bytes: CREDIT_UPDATE.
    g.consume(40000, 8192);
    g.send(OP_CREDIT_UPDATE, 40000, 1024, &[]);
    let p = g.recv_all();
    let rw = rw_bytes(&p);
    assert_eq!(rw, 8192);
    g.consume(40000, 8192);
    g.send(OP_CREDIT_UPDATE, 40000, 1024, &[]);
    let p = g.recv_all();
    let got: Vec<u8> = p
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(got.len(), 20000 - 16384);
    assert_eq!(&got[..], &data[16384..]);
}

#[test]
fn guest_credit_request_gets_credit_update() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.send(OP_RW, 40000, 1024, &[7u8; 1000]);
    let mut b = [0u8; 600];
    s.read_exact(&mut b).unwrap();
    g.send(OP_CREDIT_REQUEST, 40000, 1024, &[]);
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_CREDIT_UPDATE]);
    assert_eq!(p[0].0.fwd_cnt, 600);
    assert_eq!(p[0].0.buf_alloc, VsockConfig::default().conn_buffer_size);
}

#[test]
fn host_reads_return_credit_unprompted() {
    let (mut g, _l, mut s) = connected(with_conn_buffer(16384), 8);
    g.send(OP_RW, 40000, 1024, &[1u8; 16384]);
    let mut b = vec![0u8; 16384];
    s.read_exact(&mut b).unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_CREDIT_UPDATE]);
    assert_eq!(p[0].0.fwd_cnt, 16384);
}

#[test]
fn guest_overrunning_our_buffer_is_reset() {
    let (mut g, _l, mut s) = connected(with_conn_buffer(8192), 8);
    g.send(OP_RW, 40000, 1024, &[1u8; 8192]);
    assert!(g.recv_all().is_empty());
    // One byte past the advertised buffer.
    g.send(OP_RW, 40000, 1024, &[2u8; 1]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    // What was within credit is still readable, then the reset shows.
    let mut b = vec![0u8; 8192];
    s.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionReset);
    assert_eq!(g.dev.lock().unwrap().stats().muxer.protocol_resets, 1);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn unknown_op_on_connection_resets_it() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.send(99, 40000, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    let mut b = [0u8; 4];
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn tx_notifications_are_enabled_when_idle() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    for i in 0..5 {
        g.send(OP_REQUEST, 40000 + i, 99, &[]);
    }
    let flags: u16 = g.mem.read_obj(GuestAddress(g.tx.used_addr())).unwrap();
    assert_eq!(
        flags, 0,
        "VRING_USED_F_NO_NOTIFY must be clear once drained"
    );
    assert_eq!(g.recv_all().len(), 5);
}

#[test]
fn unknown_op_without_connection_gets_rst() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    g.send(99, 40000, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}

#[test]
fn duplicate_request_resets_connection() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let l = g.host.listen(1024).unwrap();
    let _s = guest_connect(&mut g, &l, 40000);
    g.send(OP_REQUEST, 40000, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn seqpacket_type_gets_rst_and_bad_cid_is_dropped() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let _l = g.host.listen(1024).unwrap();
    let mut h = g.hdr(OP_REQUEST, 40000, 1024);
    h.type_ = 2;
    g.send_hdr(h, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    let mut h = g.hdr(OP_REQUEST, 40000, 1024);
    h.src_cid = 99;
    g.send_hdr(h, &[]);
    let mut h = g.hdr(OP_REQUEST, 40000, 1024);
    h.dst_cid = 7;
    g.send_hdr(h, &[]);
    assert!(g.recv_all().is_empty(), "spoofed packets get no answer");
    assert_eq!(g.dev.lock().unwrap().stats().muxer.dropped_bad_addr, 3);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn guest_shutdown_send_gives_eof_but_host_can_still_write() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.send(OP_RW, 40000, 1024, b"last words");
    send_shutdown(&mut g, 40000, 1024, SHUTDOWN_SEND);
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"last words");
    s.write_all(b"reply").unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RW]);
    assert_eq!(p[0].1, b"reply");
}

#[test]
fn host_shutdown_write_sends_shutdown_after_data() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let mut s = host_connect(&mut g, GPORT);
    s.write_all(b"request body").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_RW, OP_SHUTDOWN]);
    assert_eq!(p[1].0.flags, SHUTDOWN_SEND);
    // Reading still works.
    g.send(OP_RW, GPORT, s.local_port(), b"response");
    let mut b = [0u8; 8];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"response");
}

#[test]
fn host_drop_sends_shutdown_then_guest_rst_removes() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let s = host_connect(&mut g, GPORT);
    let lp = s.local_port();
    drop(s);
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_SHUTDOWN]);
    assert_eq!(p[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(g.host.connection_count(), 1);
    g.send(OP_RST, GPORT, lp, &[]);
    assert_eq!(g.host.connection_count(), 0);
    assert!(g.recv_all().is_empty());
}

#[test]
fn host_drop_forces_rst_after_close_timeout() {
    let mut g = TestGuest::new();
    g.dev
        .lock()
        .unwrap()
        .set_close_timeout(Duration::from_millis(50));
    g.post_rx(8);
    let s = host_connect(&mut g, GPORT);
    drop(s);
    g.pump();
    assert_eq!(ops(&g.recv_all()), vec![OP_SHUTDOWN]);
    std::thread::sleep(Duration::from_millis(80));
    g.dev
        .lock()
        .unwrap()
        .handle_event(device::DeviceEvent::Timer);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn clone_reads_while_other_handle_writes() {
    let (mut g, _l, s) = connected(TestGuest::new(), 16);
    let mut r = s.try_clone().unwrap();
    let mut w = s;
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 5];
        r.read_exact(&mut b).unwrap();
        (b, r)
    });
    w.write_all(b"out").unwrap();
    g.pump();
    assert_eq!(g.recv_all()[0].1, b"out");
    g.send(OP_RW, 40000, 1024, b"in-ok");
    let (b, r) = reader.join().unwrap();
    assert_eq!(&b, b"in-ok");
    // Dropping one clone does not close the connection.
    drop(w);
    g.pump();
    let p = g.recv_all();
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(g.host.connection_count(), 1);
    // Dropping the last one does.
    drop(r);
    g.pump();
    assert_eq!(ops(&g.recv_all()), vec![OP_SHUTDOWN]);
}

#[test]
fn read_and_write_timeouts() {
    let mut g = TestGuest::new();
    g.buf_alloc = 0;
    // `_g` keeps the device alive to the end of the test.
    let (_g, _l, mut s) = connected(g, 8);
    s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    let mut b = [0u8; 4];
    let t0 = Instant::now();
    assert_io_err(s.read(&mut b), std::io::ErrorKind::TimedOut);
    assert!(t0.elapsed() >= Duration::from_millis(30));
    // Guest advertises no buffer: the host send buffer fills, then writes time out.
    s.set_write_timeout(Some(Duration::from_millis(30)))
        .unwrap();
    let cap = VsockConfig::default().conn_buffer_size as usize;
    s.write_all(&vec![0u8; cap]).unwrap();
    assert_io_err(s.write(b"more"), std::io::ErrorKind::TimedOut);
    assert!(s.set_read_timeout(Some(Duration::ZERO)).is_err());
}

#[test]
fn eight_concurrent_connections_each_way() {
    let mut g = TestGuest::new();
    g.post_rx(64);
    let l = g.host.listen(1024).unwrap();
    let mut streams: Vec<VsockStream> = (0..8)
        .map(|i| guest_connect(&mut g, &l, 41000 + i))
        .collect();
    // Guest -> host, interleaved.
    for round in 0..4u8 {
        for i in 0..8u32 {
            let payload = vec![(i as u8) * 16 + round; 1000];
            g.send(OP_RW, 41000 + i, 1024, &payload);
        }
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let mut b = vec![0u8; 4000];
        s.read_exact(&mut b).unwrap();
        for round in 0..4 {
            assert!(b[round * 1000..(round + 1) * 1000]
                .iter()
                .all(|&x| x == (i as u8) * 16 + round as u8));
        }
    }
    // Host -> guest from 8 threads at once.
    let handles: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || w.write_all(&vec![i as u8; 3000]).unwrap())
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    g.pump();
    let mut got = vec![Vec::new(); 8];
    for _ in 0..50 {
        for (h, d) in g.recv_all() {
            assert_eq!(h.op, OP_RW);
            got[(h.dst_port - 41000) as usize].extend(d);
        }
        g.pump();
    }
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.len(), 3000, "conn {i}");
        assert!(d.iter().all(|&x| x == i as u8));
    }
    assert_eq!(g.host.connection_count(), 8);
}

#[test]
fn connection_cap_refuses_both_directions() {
    let cfg = VsockConfig {
        max_connections: 2,
        ..VsockConfig::default()
    };
    let mut g = TestGuest::with_config(cfg);
    g.post_rx(16);
    let l = g.host.listen(1024).unwrap();
    let _a = guest_connect(&mut g, &l, 40000);
    let _b = guest_connect(&mut g, &l, 40001);
    g.send(OP_REQUEST, 40002, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    let r = g.host.connect(GPORT, Duration::from_millis(10));
    assert!(
        matches!(r, Err(VsockError::TooManyConnections { limit: 2, .. })),
        "{r:?}"
    );
}

#[test]
fn listener_backlog_and_drop() {
    let cfg = VsockConfig {
        listen_backlog: 1,
        ..VsockConfig::default()
    };
    let mut g = TestGuest::with_config(cfg);
    g.post_rx(16);
    let l = g.host.listen(1024).unwrap();
    assert!(matches!(
        g.host.listen(1024),
        Err(VsockError::PortInUse { port: 1024 })
    ));
    g.send(OP_REQUEST, 40000, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RESPONSE]);
    g.send(OP_REQUEST, 40001, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST], "backlog full");
    // Dropping the listener closes the queued connection and frees the port.
    drop(l);
    g.pump();
    assert_eq!(ops(&g.recv_all()), vec![OP_SHUTDOWN]);
    g.send(OP_REQUEST, 40002, 1024, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    let l2 = g.host.listen(1024).unwrap();
    assert!(matches!(
        l2.accept(Duration::from_millis(10)),
        Err(VsockError::AcceptTimeout { .. })
    ));
}

#[test]
fn transport_reset_drops_connections_and_sends_event() {
    let mut g = TestGuest::new();
    g.post_rx(16);
    let l = g.host.listen(1024).unwrap();
    let mut a = guest_connect(&mut g, &l, 40000);
    let mut b = host_connect(&mut g, GPORT);
    assert_eq!(g.host.connection_count(), 2);
    g.host.transport_reset();
    g.pump();
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
    assert_eq!(g.host.connection_count(), 0);
    let mut buf = [0u8; 1];
    assert_io_err(a.read(&mut buf), std::io::ErrorKind::ConnectionAborted);
    assert!(b.write(b"x").is_err());
    // Listeners survive: the guest reconnects.
    let _c = guest_connect(&mut g, &l, 40000);
    // The device-level method does the same.
    g.dev.lock().unwrap().transport_reset();
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
    assert_eq!(g.dev.lock().unwrap().stats().transport_resets, 2);
}

/// A guest with 8 RX buffers that got a TRANSPORT_RESET event and has not handled it yet
/// (its event queue is not refilled).
fn guest_after_unhandled_reset() -> TestGuest {
    let mut g = TestGuest::new();
    g.post_rx(8);
    g.host.transport_reset();
    g.pump();
    assert_eq!(g.events_no_refill(), vec![EVENT_TRANSPORT_RESET]);
    g
}

#[test]
fn host_connect_after_transport_reset_waits_for_the_guest_to_handle_it() {
    let mut g = guest_after_unhandled_reset();
    let t = spawn_connect(&g, GPORT, T);
    std::thread::sleep(Duration::from_millis(50));
    g.pump();
    assert!(
        g.recv_all().is_empty(),
        "REQUEST held until the guest handled the reset"
    );
    // The guest handles the event and refills its event queue: the REQUEST goes out.
    g.ev.add_chain(&g.mem, &[(EV_BUF, 8, true)]).unwrap();
    g.notify(EVQ);
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_REQUEST]);
    g.send(OP_RESPONSE, GPORT, p[0].0.src_port, &[]);
    t.join().unwrap().unwrap();
}

#[test]
fn host_connect_after_transport_reset_proceeds_after_settle_deadline() {
    let mut g = guest_after_unhandled_reset();
    let t0 = Instant::now();
    let t = spawn_connect(&g, GPORT, T);
    // This guest never refills its event queue.
    let req = g.recv_wait(T).expect("REQUEST after the settle deadline");
    assert_eq!(req.0.op, OP_REQUEST);
    assert!(t0.elapsed() >= device::RESET_SETTLE_MAX - Duration::from_millis(50));
    g.send(OP_RESPONSE, GPORT, req.0.src_port, &[]);
    t.join().unwrap().unwrap();
}

#[test]
fn transport_reset_waits_for_an_event_buffer() {
    let mut g = TestGuest::new();
    g.post_rx(4);
    // Use up the 4 posted event buffers.
    for _ in 0..4 {
        g.dev.lock().unwrap().transport_reset();
    }
    assert_eq!(g.events_no_refill().len(), 4);
    g.dev.lock().unwrap().transport_reset();
    assert!(g.events_no_refill().is_empty());
    g.ev.add_chain(&g.mem, &[(EV_BUF, 8, true)]).unwrap();
    g.notify(EVQ);
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
}

#[test]
fn device_reset_drops_connections_and_reinit_works() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.w32(regs::STATUS, 0);
    assert_eq!(g.r32(regs::STATUS), 0);
    assert!(!g.dev.lock().unwrap().is_active());
    let mut b = [0u8; 1];
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionAborted);
    // Full re-initialisation, as a rebooting driver does.
    let mut g2 = TestGuest::with_config(VsockConfig::default());
    g2.post_rx(8);
    let l2 = g2.host.listen(1024).unwrap();
    let _s2 = guest_connect(&mut g2, &l2, 40000);
}

#[test]
fn dropped_device_fails_host_calls() {
    let g = TestGuest::new();
    let host = g.host.clone();
    let l = host.listen(1024).unwrap();
    drop(g);
    assert!(matches!(
        host.connect(GPORT, T),
        Err(VsockError::DeviceGone { .. })
    ));
    assert!(matches!(l.accept(T), Err(VsockError::DeviceGone { .. })));
    assert!(matches!(
        host.listen(1025),
        Err(VsockError::DeviceGone { .. })
    ));
}

// ---- malformed input -------------------------------------------------------------------

#[test]
fn tx_header_descriptor_write_only_is_dropped() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let i = g.tx.take_index();
    let slot = tx_slot(i);
    let h = g.hdr(OP_REQUEST, 40000, 1024);
    write_hdr(&g, &h, slot);
    let hdr = SplitDescriptor::new(slot, HDR_SIZE as u32, VRING_DESC_F_WRITE, 0);
    g.tx.publish_descs(&g.mem, &[(i, hdr)]);
    g.notify(TXQ);
    assert_eq!(g.reclaim_tx(), vec![(i, 0)], "chain returned");
    assert_eq!(g.dev.lock().unwrap().stats().bad_tx_chains, 1);
    assert!(g.recv_all().is_empty());
}

#[test]
fn tx_header_too_short_is_dropped() {
    let mut g = TestGuest::new();
    let i = g.tx.take_index();
    g.tx.publish_descs(&g.mem, &[(i, SplitDescriptor::new(TX_BUF, 20, 0, 0))]);
    g.notify(TXQ);
    assert_eq!(g.reclaim_tx(), vec![(i, 0)]);
    assert_eq!(g.dev.lock().unwrap().stats().bad_tx_chains, 1);
}

#[test]
fn tx_oversize_len_resets_connection() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    // Header claims 1 MiB of payload (> 64 KiB max).
    let i = send_rw_claiming(&mut g, 1 << 20, 1 << 20);
    assert_eq!(g.reclaim_tx().last(), Some(&(i, 0)));
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    let mut b = [0u8; 1];
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn tx_data_descriptor_shorter_than_len_is_dropped() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    send_rw_claiming(&mut g, 4096, 100);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let mut b = [0u8; 1];
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn tx_descriptor_loop_is_dropped() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let _l = g.host.listen(1024).unwrap();
    // Two descriptors pointing at each other, forever.
    let a = g.tx.take_index();
    let b = g.tx.take_index();
    let slot = tx_slot(a);
    let h = g.hdr(OP_REQUEST, 40000, 1024);
    write_hdr(&g, &h, slot);
    let to = |next| SplitDescriptor::new(slot, HDR_SIZE as u32, VRING_DESC_F_NEXT, next);
    g.tx.publish_descs(&g.mem, &[(a, to(b)), (b, to(a))]);
    // And one pointing at itself.
    let c = g.tx.take_index();
    g.tx.publish_descs(&g.mem, &[(c, to(c))]);
    g.notify(TXQ);
    assert_eq!(g.reclaim_tx(), vec![(a, 0), (c, 0)]);
    assert_eq!(g.dev.lock().unwrap().stats().bad_tx_chains, 2);
    // The readable header was a REQUEST to a listening port: it is answered with RST, never
    // accepted.
    let p = g.recv_all();
    assert!(p.iter().all(|(h, _)| h.op == OP_RST), "{p:?}");
    assert_eq!(g.host.connection_count(), 0);
}

#[test]
fn tx_buffer_outside_guest_memory_is_dropped() {
    let mut g = TestGuest::new();
    let i = g.tx.take_index();
    let outside = SplitDescriptor::new(0xffff_ffff_0000, HDR_SIZE as u32, 0, 0);
    g.tx.publish_descs(&g.mem, &[(i, outside)]);
    g.notify(TXQ);
    let used = g.reclaim_tx();
    assert_eq!(used[0], (i, 0));
    assert!(g.dev.lock().unwrap().stats().bad_tx_chains >= 1);
    // The device keeps working.
    g.post_rx(4);
    g.send(OP_REQUEST, 40000, 99, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}

#[test]
fn head_index_beyond_queue_marks_needs_reset() {
    let mut g = TestGuest::new();
    g.tx.publish(&g.mem, 1000);
    g.notify(TXQ);
    assert_ne!(g.r32(regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(g.reclaim_tx().is_empty());
}

#[test]
fn rx_read_only_buffer_is_returned_unused() {
    let mut g = TestGuest::new();
    let i = g.rx.take_index();
    g.rx.publish_descs(&g.mem, &[(i, SplitDescriptor::new(RX_BUF, 4096, 0, 0))]);
    g.notify(RXQ);
    g.send(OP_REQUEST, 40000, 99, &[]);
    assert_eq!(g.rx.pop_used(&g.mem), Some((i, 0)));
    assert_eq!(g.dev.lock().unwrap().stats().bad_rx_chains, 1);
    // The RST still goes out once a good buffer arrives.
    g.post_rx(1);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}

#[test]
fn avail_index_jump_marks_needs_reset_and_reset_recovers() {
    let mut g = TestGuest::new();
    g.tx.set_avail_idx(&g.mem, 1000);
    g.notify(TXQ);
    assert_ne!(g.r32(regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.dev.lock().unwrap().stats().needs_reset, 1);
    assert_ne!(g.r32(regs::INTERRUPT_STATUS) & crate::virtio::INT_CONFIG, 0);
    // Later notifications are ignored, never panic.
    g.notify(TXQ);
    g.notify(RXQ);
    g.w32(regs::STATUS, 0);
    assert_eq!(g.r32(regs::STATUS), 0);
}

#[test]
fn rst_flood_without_rx_buffers_is_bounded() {
    let mut g = TestGuest::new();
    // No RX buffers: RST replies queue up to RST_QUEUE_MAX, then TX stops being consumed.
    for i in 0..(QSIZE as u32 - 1) {
        let h = g.hdr(OP_RW, 50000 + i, 4242);
        let idx = g.tx.take_index();
        let slot = tx_slot(idx);
        write_hdr(&g, &h, slot);
        let hdr = SplitDescriptor::new(slot, HDR_SIZE as u32, 0, 0);
        g.tx.publish_descs(&g.mem, &[(idx, hdr)]);
    }
    g.notify(TXQ);
    let used = g.reclaim_tx().len();
    assert_eq!(used, RST_QUEUE_MAX.min(QSIZE as usize - 1));
    let flags: u16 = g.mem.read_obj(GuestAddress(g.tx.used_addr())).unwrap();
    assert_eq!(flags, 0, "TX notifications re-enabled while paused");
    // Give RX buffers: the RSTs drain and TX resumes.
    g.post_rx(100);
    let mut rsts = 0;
    for _ in 0..10 {
        rsts += g.recv_all().len();
        g.pump();
    }
    assert_eq!(rsts, QSIZE as usize - 1);
    assert_eq!(g.reclaim_tx().len(), QSIZE as usize - 1 - used);
}

// ---- bulk transfers ------------------------------------------------------------------------

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn multi_mib_host_to_guest_byte_exact() {
    let mut g = TestGuest::new();
    g.rx_data_len = 0xff00;
    g.post_rx(100);
    let s = host_connect(&mut g, GPORT);
    let data = pattern(6 << 20, 1);
    let expected = data.clone();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.flush().unwrap();
    });
    let mut got = Vec::with_capacity(expected.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < expected.len() {
        assert!(Instant::now() < deadline, "stalled at {}", got.len());
        g.pump();
        let mut consumed = 0;
        for (h, d) in g.recv_all() {
            match h.op {
                OP_RW => {
                    assert!(h.len <= MAX_PKT_DATA);
                    consumed += d.len() as u32;
                    got.extend(d);
                }
                OP_CREDIT_REQUEST => {}
                op => panic!("unexpected op {op}"),
            }
        }
        if consumed > 0 {
            g.consume(GPORT, consumed);
            g.send(OP_CREDIT_UPDATE, GPORT, s.local_port(), &[]);
        } else {
            std::thread::yield_now();
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "payload differs");
}

#[test]
fn multi_mib_guest_to_host_byte_exact() {
    let (mut g, _l, s) = connected(TestGuest::new(), 32);
    let data = pattern(6 << 20, 2);
    let expected_len = data.len();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    });
    // The guest respects the host's credit: buf_alloc - (sent - fwd_cnt).
    let mut sent = 0usize;
    let mut peer_buf = VsockConfig::default().conn_buffer_size as usize;
    let mut peer_fwd = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < data.len() {
        assert!(Instant::now() < deadline, "stalled at {sent}");
        let in_flight = (sent as u32).wrapping_sub(peer_fwd) as usize;
        let credit = peer_buf.saturating_sub(in_flight);
        if credit > 0 {
            let n = credit.min(32 * 1024).min(data.len() - sent);
            g.send(OP_RW, 40000, 1024, &data[sent..sent + n]);
            sent += n;
        } else {
            g.send(OP_CREDIT_REQUEST, 40000, 1024, &[]);
            std::thread::sleep(Duration::from_micros(100));
        }
        g.pump();
        for (h, _) in g.recv_all() {
            assert_ne!(h.op, OP_RST);
            peer_buf = h.buf_alloc as usize;
            peer_fwd = h.fwd_cnt;
        }
    }
    send_shutdown(&mut g, 40000, 1024, SHUTDOWN_SEND | SHUTDOWN_RCV);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), expected_len);
    assert!(got == data, "payload differs");
    assert_eq!(g.dev.lock().unwrap().stats().muxer.protocol_resets, 0);
}

#[test]
fn event_loop_thread_drives_the_device() {
    let mut g = TestGuest::new();
    let (stop, t) = spawn_event_loop(&mut g);
    g.post_rx(16);
    let l = g.host.listen(1024).unwrap();
    g.send(OP_REQUEST, 40000, 1024, &[]);
    let resp = g.recv_wait(T).unwrap();
    assert_eq!(resp.0.op, OP_RESPONSE);
    let mut s = l.accept(T).unwrap();
    g.send(OP_RW, 40000, 1024, b"via ioeventfd");
    let mut b = [0u8; 13];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"via ioeventfd");
    s.write_all(b"via wake fd").unwrap();
    let p = g.recv_wait(T).unwrap();
    assert_eq!(p.1, b"via wake fd");
    // The interrupt eventfd fired.
    assert!(g.transport.interrupt_evt().read().unwrap() > 0);
    assert_ne!(g.r32(regs::INTERRUPT_STATUS) & crate::virtio::INT_VRING, 0);
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    let _ = CloseReason::Local;
}

/// A new default device and an MMIO transport for it over `mem` (not initialised by a driver).
fn fresh_transport(
    mem: &crate::virtio::GuestMem,
) -> (
    Arc<std::sync::Mutex<VsockDevice>>,
    crate::virtio::mmio::MmioTransport<VsockDevice>,
) {
    let dev = Arc::new(std::sync::Mutex::new(
        VsockDevice::new(VsockConfig::default()).unwrap(),
    ));
    let t = crate::virtio::mmio::MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    (dev, t)
}

#[test]
fn transport_state_save_restore_continues_the_rings() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let l = g.host.listen(1024).unwrap();
    let _s = guest_connect(&mut g, &l, 40000);
    g.send(OP_RW, 40000, 1024, b"before");
    let saved = g.transport.save_state();
    assert!(saved.activated);
    assert_eq!(saved.queues[TXQ].next_index, 2, "REQUEST and RW consumed");
    assert_eq!(saved.queues[RXQ].next_index, 1, "RESPONSE delivered");

    // A fresh device + transport over the same guest memory, as after a restore.
    let (dev, mut t) = fresh_transport(&g.mem);
    t.restore_state(&saved).unwrap();
    assert!(t.is_activated());
    assert_eq!(t.save_state(), saved);
    let host = dev.lock().unwrap().host();
    g.dev = dev;
    g.transport = t;
    g.host = host;
    g.dev.lock().unwrap().transport_reset();
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
    // The guest reconnects through the restored rings.
    let l2 = g.host.listen(1024).unwrap();
    let mut s2 = guest_connect(&mut g, &l2, 40001);
    g.send(OP_RW, 40001, 1024, b"after");
    let mut b = [0u8; 5];
    s2.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after");
}

#[test]
fn transport_restore_rejects_mismatched_or_invalid_state() {
    let g = TestGuest::new();
    let mut saved = g.transport.save_state();
    let fresh = || fresh_transport(&g.mem).1;
    let mut bad = saved.clone();
    bad.queues.pop();
    assert!(fresh().restore_state(&bad).is_err());
    let mut bad = saved.clone();
    bad.queues[0].max_size = 128;
    assert!(fresh().restore_state(&bad).is_err());
    saved.queues[1].size = 3;
    let mut t = fresh();
    assert!(t.restore_state(&saved).is_err());
    assert!(!t.is_activated());
    assert_eq!(t.status(), 0);
}

#[test]
fn guest_shutdown_rcv_makes_host_writes_fail() {
    let mut g = TestGuest::new();
    g.buf_alloc = 0; // keep host data queued
    let (mut g, _l, mut s) = connected(g, 8);
    s.write_all(b"queued").unwrap();
    send_shutdown(&mut g, 40000, 1024, SHUTDOWN_RCV);
    assert_io_err(s.write(b"x"), std::io::ErrorKind::BrokenPipe);
    assert_io_err(s.flush(), std::io::ErrorKind::BrokenPipe);
    // Reading still works.
    g.send(OP_RW, 40000, 1024, b"still here");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
}

#[test]
fn host_shutdown_read_discards_but_keeps_credit_flowing() {
    let (mut g, _l, mut s) = connected(with_conn_buffer(8192), 16);
    s.shutdown(Shutdown::Read).unwrap();
    g.pump();
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_SHUTDOWN]);
    assert_eq!(p[0].0.flags, SHUTDOWN_RCV);
    // Twice the buffer: never an overrun, because nothing is kept.
    g.send(OP_RW, 40000, 1024, &[1u8; 8192]);
    g.send(OP_CREDIT_REQUEST, 40000, 1024, &[]);
    let p = g.recv_all();
    assert_eq!(ops(&p), vec![OP_CREDIT_UPDATE]);
    assert_eq!(p[0].0.fwd_cnt, 8192);
    g.send(OP_RW, 40000, 1024, &[1u8; 8192]);
    assert!(g.recv_all().iter().all(|(h, _)| h.op != OP_RST));
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(s.available(), 0);
}

#[test]
fn zero_length_rw_is_harmless() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.send(OP_RW, 40000, 1024, &[]);
    assert!(g.recv_all().is_empty());
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let mut b = [0u8; 4];
    assert_io_err(s.read(&mut b), std::io::ErrorKind::TimedOut);
}

#[test]
fn buffered_data_survives_transport_reset_then_error() {
    let (mut g, _l, mut s) = connected(TestGuest::new(), 8);
    g.send(OP_RW, 40000, 1024, b"tail");
    g.host.transport_reset();
    g.pump();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"tail");
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionAborted);
}

#[test]
fn listen_refuses_ports_in_use() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let s = host_connect(&mut g, GPORT);
    assert!(matches!(
        g.host.listen(s.local_port()),
        Err(VsockError::PortInUse { .. })
    ));
}

#[test]
fn host_ports_are_reused_after_close() {
    let mut g = TestGuest::new();
    g.post_rx(16);
    let a = host_connect(&mut g, GPORT);
    let pa = a.local_port();
    let b = host_connect(&mut g, GPORT);
    assert_ne!(pa, b.local_port(), "distinct ephemeral ports");
    drop(a);
    g.pump();
    g.recv_all();
    g.send(OP_RST, GPORT, pa, &[]);
    assert_eq!(g.host.connection_count(), 1);
    // The registry no longer holds the port.
    assert!(g.host.listen(pa).is_ok());
}

/// What a vCPU thread does to the device on the guest's MMIO exits — reset with a live
/// connection, the Linux driver's init and activation, config reads, queue notifications
/// without ioeventfds — done under the vCPU seccomp filter.
#[test]
fn seccomp_vcpu_side_transport_work_runs_under_the_vcpu_filter() {
    let (mut g, _l, s) = connected(TestGuest::new(), 8);
    g.direct = false; // device processing belongs to the device thread
    let g = std::thread::Builder::new()
        .name("sc-vcpu-mmio".into())
        .spawn(move || {
            crate::seccomp::install(
                crate::seccomp::ThreadKind::Vcpu,
                crate::seccomp::SeccompMode::Enforce,
            )
            .unwrap();
            g.w32(regs::STATUS, 0); // device reset: the connection is dropped
            g.init_transport();
            let mut cid = [0u8; 8];
            g.transport.read(0x100, &mut cid);
            for q in 0..3 {
                g.notify(q);
            }
            (g, u64::from_le_bytes(cid))
        })
        .unwrap()
        .join()
        .unwrap();
    let (g, cid) = g;
    assert_eq!(cid, g.cid);
    assert!(g.transport.is_activated());
    // The reset reached the host side of the connection.
    let mut b = [0u8; 1];
    let mut s = s;
    assert_io_err(s.read(&mut b), std::io::ErrorKind::ConnectionAborted);
}

/// Run the device on an event-manager thread, as in a VM.
fn spawn_event_loop(g: &mut TestGuest) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let (stop, t, _) = spawn_counting_event_loop(g);
    (stop, t)
}

/// Like `spawn_event_loop`, also counting dispatched events.
fn spawn_counting_event_loop(
    g: &mut TestGuest,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use event_manager::{EventManager, SubscriberOps};
    g.direct = false;
    let mut em = EventManager::<Arc<std::sync::Mutex<VsockDevice>>>::new().unwrap();
    em.add_subscriber(g.dev.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop2, count2) = (stop.clone(), count.clone());
    let t = std::thread::spawn(move || {
        // As on a VM's device thread: every event-loop test runs the device under its filter.
        crate::seccomp::install(
            crate::seccomp::ThreadKind::Device,
            crate::seccomp::SeccompMode::Enforce,
        )
        .unwrap();
        while !stop2.load(Ordering::Acquire) {
            let n = em.run_with_timeout(20).unwrap();
            count2.fetch_add(n, Ordering::Relaxed);
        }
    });
    (stop, t, count)
}

#[test]
fn expired_close_timer_does_not_spin_the_event_loop() {
    let mut g = TestGuest::new();
    g.dev
        .lock()
        .unwrap()
        .set_close_timeout(Duration::from_millis(30));
    let (stop, t, count) = spawn_counting_event_loop(&mut g);
    g.post_rx(8);
    let l = g.host.listen(1024).unwrap();
    g.send(OP_REQUEST, 40000, 1024, &[]);
    assert_eq!(g.recv_wait(T).unwrap().0.op, OP_RESPONSE);
    drop(l.accept(T).unwrap());
    assert_eq!(g.recv_wait(T).unwrap().0.op, OP_SHUTDOWN);
    // The guest never answers: the deadline forces an RST.
    let rst = g.recv_wait(T).unwrap();
    assert_eq!(rst.0.op, OP_RST);
    std::thread::sleep(Duration::from_millis(100));
    let before = count.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let events = count.load(Ordering::Relaxed) - before;
    assert!(events < 5, "{events} events dispatched while idle");
    stop.store(true, Ordering::Release);
    t.join().unwrap();
}

#[test]
fn event_loop_many_small_writes_from_several_threads_never_stall() {
    let mut g = TestGuest::new();
    let (stop, t) = spawn_event_loop(&mut g);
    g.post_rx(128);
    let l = g.host.listen(1024).unwrap();
    let mut streams = Vec::new();
    for i in 0..4u32 {
        g.send(OP_REQUEST, 42000 + i, 1024, &[]);
        assert_eq!(g.recv_wait(T).unwrap().0.op, OP_RESPONSE);
        streams.push(l.accept(T).unwrap());
    }
    const PER_CONN: usize = 1 << 20;
    let writers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let data = pattern(PER_CONN, 10 + i as u32);
                for c in data.chunks(1000) {
                    w.write_all(c).unwrap();
                }
                w.flush().unwrap();
            })
        })
        .collect();
    let mut got = vec![Vec::new(); 4];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.iter().any(|v| v.len() < PER_CONN) {
        assert!(
            Instant::now() < deadline,
            "stalled: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let Some((h, d)) = g.recv_wait(Duration::from_millis(100)) else {
            continue;
        };
        if h.op == OP_RW {
            let i = (h.dst_port - 42000) as usize;
            got[i].extend_from_slice(&d);
            g.consume(h.dst_port, d.len() as u32);
            g.send(OP_CREDIT_UPDATE, h.dst_port, 1024, &[]);
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    for (i, v) in got.iter().enumerate() {
        assert!(*v == pattern(PER_CONN, 10 + i as u32), "conn {i} differs");
    }
    stop.store(true, Ordering::Release);
    t.join().unwrap();
}

#[test]
fn tx_indirect_table_loop_and_nesting_are_dropped() {
    const VRING_DESC_F_INDIRECT: u16 = 4;
    let mut g = TestGuest::new();
    g.post_rx(8);
    let table = TX_BUF + 0x80_0000;
    let hdr_addr = table + 0x1000;
    let h = g.hdr(OP_REQUEST, 40000, 77);
    write_hdr(&g, &h, hdr_addr);
    // Indirect table of 8 entries, each pointing to the next, the last back to the first.
    for i in 0..8u16 {
        let d = SplitDescriptor::new(hdr_addr, HDR_SIZE as u32, VRING_DESC_F_NEXT, (i + 1) % 8);
        g.mem
            .write_obj(
                virtio_queue::desc::RawDescriptor::from(d),
                GuestAddress(table + u64::from(i) * 16),
            )
            .unwrap();
    }
    let a = g.tx.take_index();
    let indirect = SplitDescriptor::new(table, 8 * 16, VRING_DESC_F_INDIRECT, 0);
    g.tx.publish_descs(&g.mem, &[(a, indirect)]);
    // An indirect descriptor inside an indirect table.
    let nested = table + 0x2000;
    let d = SplitDescriptor::new(table, 8 * 16, VRING_DESC_F_INDIRECT, 0);
    g.mem
        .write_obj(
            virtio_queue::desc::RawDescriptor::from(d),
            GuestAddress(nested),
        )
        .unwrap();
    let b = g.tx.take_index();
    let indirect = SplitDescriptor::new(nested, 16, VRING_DESC_F_INDIRECT, 0);
    g.tx.publish_descs(&g.mem, &[(b, indirect)]);
    g.notify(TXQ);
    assert_eq!(g.reclaim_tx(), vec![(a, 0), (b, 0)]);
    assert_eq!(g.dev.lock().unwrap().stats().bad_tx_chains, 2);
    assert_eq!(g.dev.lock().unwrap().stats().needs_reset, 0);
    // Still serving.
    g.send(OP_REQUEST, 40000, 77, &[]);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}

// ---- the same device driven by virtio-queue's own MockSplitQueue -------------------------

mod with_mock_split_queue {
    use super::*;
    use crate::virtio::{GuestMem, VirtioDevice, VIRTIO_F_VERSION_1};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// RX, TX and event queues of 16 entries at 0x1_0000, 0x2_0000 and 0x3_0000.
    fn mock_queues(mem: &GuestMem) -> [MockSplitQueue<'_, GuestMem>; 3] {
        [0x1_0000, 0x2_0000, 0x3_0000].map(|a| MockSplitQueue::create(mem, GuestAddress(a), 16))
    }

    /// A default device activated on the mock queues.
    fn activate(mem: &GuestMem, mocks: &[MockSplitQueue<'_, GuestMem>; 3]) -> VsockDevice {
        let mut dev = VsockDevice::new(VsockConfig::default()).unwrap();
        let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
        dev.activate(mem.clone(), queues, VIRTIO_F_VERSION_1)
            .unwrap();
        dev
    }

    #[test]
    fn request_to_unknown_port_gets_rst() {
        let mem = test_mem();
        let mocks = mock_queues(&mem);
        let [rxm, txm, _] = &mocks;
        rxm.add_desc_chains(
            &[
                raw(0x10_0000, 44, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                raw(0x10_1000, 4096, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 40000,
            dst_port: 4444,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 65536,
            ..Header::default()
        };
        mem.write_slice(&h.to_bytes(), GuestAddress(0x20_0000))
            .unwrap();
        txm.add_desc_chains(&[raw(0x20_0000, 44, 0, 0)], 0).unwrap();
        let mut dev = activate(&mem, &mocks);
        dev.handle_event(device::DeviceEvent::TxQueue);
        assert_eq!(txm.used().idx().load(), 1);
        assert_eq!(rxm.used().idx().load(), 1);
        let e = rxm.used().ring().ref_at(0).unwrap().load();
        assert_eq!((e.id(), e.len()), (0, HDR_SIZE as u32));
        let mut b = [0u8; HDR_SIZE];
        mem.read_slice(&mut b, GuestAddress(0x10_0000)).unwrap();
        let r = Header::from_bytes(&b);
        assert_eq!(
            (r.op, r.src_port, r.dst_port, r.dst_cid),
            (OP_RST, 4444, 40000, 3)
        );
    }

    #[test]
    fn self_referencing_descriptor_is_dropped() {
        let mem = test_mem();
        let mocks = mock_queues(&mem);
        let [_, txm, _] = &mocks;
        // Descriptor 0 chains to itself.
        txm.add_desc_chains(&[raw(0x20_0000, 44, VRING_DESC_F_NEXT, 0)], 0)
            .unwrap();
        let mut dev = activate(&mem, &mocks);
        dev.handle_event(device::DeviceEvent::TxQueue);
        assert_eq!(txm.used().idx().load(), 1);
        assert_eq!(txm.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(dev.stats().bad_tx_chains, 1);
        assert!(!dev.interrupt().needs_reset());
    }
}

#[test]
fn event_loop_settle_deadline_fires_through_the_timer() {
    let mut g = TestGuest::new();
    let (stop, t) = spawn_event_loop(&mut g);
    g.post_rx(8);
    g.host.transport_reset();
    let deadline = Instant::now() + T;
    let mut ev = Vec::new();
    while ev.is_empty() && Instant::now() < deadline {
        ev = g.events_no_refill();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ev, vec![EVENT_TRANSPORT_RESET]);
    let c = spawn_connect(&g, GPORT, T);
    let req = g
        .recv_wait(T)
        .expect("REQUEST once the settle deadline passed");
    assert_eq!(req.0.op, OP_REQUEST);
    g.send(OP_RESPONSE, GPORT, req.0.src_port, &[]);
    c.join().unwrap().unwrap();
    stop.store(true, Ordering::Release);
    t.join().unwrap();
}

#[test]
fn interrupts_honour_vring_avail_f_no_interrupt() {
    let mut g = TestGuest::new();
    g.post_rx(8);
    let _ = g.transport.interrupt_evt().read();
    // The driver polls RX itself: no interrupt for the RST, but the packet is there.
    g.mem
        .write_obj(1u16, GuestAddress(g.rx.avail_addr()))
        .unwrap();
    g.mem
        .write_obj(1u16, GuestAddress(g.tx.avail_addr()))
        .unwrap();
    g.send(OP_REQUEST, 40000, 99, &[]);
    assert!(
        g.transport.interrupt_evt().read().is_err(),
        "no interrupt while suppressed"
    );
    assert_eq!(g.dev.lock().unwrap().stats().suppressed_interrupts, 2);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
    // Interrupts back on.
    g.mem
        .write_obj(0u16, GuestAddress(g.rx.avail_addr()))
        .unwrap();
    g.send(OP_REQUEST, 40001, 99, &[]);
    assert!(g.transport.interrupt_evt().read().unwrap() >= 1);
    assert_eq!(ops(&g.recv_all()), vec![OP_RST]);
}
