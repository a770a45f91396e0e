//! Tier-3: handshake, multiplexing and hostile input against kiln-agent in host mode.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::Agent;
use kiln_proto::{
    encode_frame, read_frame, ErrorKind, ExecRequest, Message, Request, Response, MAX_FRAME,
    PROTOCOL_VERSION,
};

#[test]
fn hello_and_ping() {
    let agent = Agent::start();
    let c = agent.client();
    let h = c.hello();
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert!(h.capabilities.iter().any(|c| c == "exec"));
    assert!(h.capabilities.iter().any(|c| c == "files"));
    assert!(!h.restored);
    for _ in 0..100 {
        c.ping().unwrap();
    }
    // A second connection is a reconnect.
    let c2 = agent.client();
    assert!(c2.hello().restored);
    c2.ping().unwrap();
}

fn raw_conn(agent: &Agent) -> std::os::unix::net::UnixStream {
    let mut s = agent.stream();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match read_frame(&mut s).unwrap() {
        Message::Hello(h) => assert_eq!(h.version, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}"),
    }
    s
}

fn expect_response(s: &mut impl Read) -> (u64, Response) {
    match read_frame(s).unwrap() {
        Message::Response { id, body } => (id, body),
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Sends `msg` as one frame.
fn send(s: &mut impl Write, msg: &Message) {
    s.write_all(&encode_frame(msg).unwrap()).unwrap();
}

/// Sends `payload` framed by its length only (it need not be a valid message).
fn send_payload(s: &mut impl Write, payload: &[u8]) {
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

/// `r` is an error response of `kind`.
#[track_caller]
fn assert_error_kind(r: &Response, kind: ErrorKind) {
    assert!(
        matches!(r, Response::Error { kind: k, .. } if *k == kind),
        "{r:?}"
    );
}

#[test]
fn responses_echo_request_ids() {
    let agent = Agent::start();
    let mut s = raw_conn(&agent);
    for id in [7u64, 0, u64::MAX] {
        send(
            &mut s,
            &Message::Request {
                id,
                body: Request::Ping,
            },
        );
        assert_eq!(expect_response(&mut s), (id, Response::Pong));
    }
}

#[test]
fn garbage_payload_gets_an_error_and_the_connection_survives() {
    let agent = Agent::start();
    let mut s = raw_conn(&agent);
    // A well-framed payload that is not a message.
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
    send_payload(&mut s, &garbage);
    let (id, r) = expect_response(&mut s);
    assert_eq!(id, 0);
    assert_error_kind(&r, ErrorKind::Malformed);
    // A request with a recoverable id but an unknown request variant.
    let payload = [1u8, 42, 0x7f];
    send_payload(&mut s, &payload);
    let (id, r) = expect_response(&mut s);
    assert_eq!(id, 42);
    match &r {
        Response::Error {
            kind: ErrorKind::Malformed,
            message,
        } => assert!(
            message.contains("Request 42: unknown variant 127"),
            "{message}"
        ),
        other => panic!("unexpected {other:?}"),
    }
    // A message the host must not send.
    send(
        &mut s,
        &Message::Response {
            id: 3,
            body: Response::Pong,
        },
    );
    let (_, r) = expect_response(&mut s);
    assert_error_kind(&r, ErrorKind::InvalidRequest);
    // An out-of-bounds request.
    let mut req = ExecRequest::new(["true"]);
    req.argv = vec!["x".into(); kiln_proto::MAX_ARGS + 1];
    send(
        &mut s,
        &Message::Request {
            id: 5,
            body: Request::Exec(req),
        },
    );
    let (id, r) = expect_response(&mut s);
    assert_eq!(id, 5);
    assert_error_kind(&r, ErrorKind::TooLarge);
    // Still serving.
    send(
        &mut s,
        &Message::Request {
            id: 9,
            body: Request::Ping,
        },
    );
    assert_eq!(expect_response(&mut s), (9, Response::Pong));
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let mut agent = Agent::start();
    let good = agent.client();
    let mut s = raw_conn(&agent);
    s.write_all(&((MAX_FRAME as u32) + 1).to_le_bytes())
        .unwrap();
    // Trailing bytes may find the connection already closed (the agent answers and closes as
    // soon as it has read the length): a broken pipe here is the behaviour under test.
    let _ = s.write_all(&[0u8; 64]);
    let (_, r) = expect_response(&mut s);
    assert_error_kind(&r, ErrorKind::Malformed);
    // Then the agent closes the connection.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Other connections, old and new, are unaffected.
    good.ping().unwrap();
    agent.client().ping().unwrap();
    assert!(agent.alive());
}

#[test]
fn random_bytes_and_truncation_never_kill_the_agent() {
    let mut agent = Agent::start();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..20 {
        let mut s = raw_conn(&agent);
        let len = 1 + round * 97;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
        // Half the time, close mid-frame.
        if round % 2 == 0 {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        drop(s);
    }
    let c = agent.client();
    c.ping().unwrap();
    let out = c.exec(ExecRequest::new(["echo", "alive"])).unwrap();
    assert_eq!(out.stdout, b"alive\n");
    assert!(agent.alive());
}

#[test]
fn requests_are_multiplexed() {
    let agent = Agent::start();
    let c = agent.client();
    // A slow exec does not hold up pings or file ops on the same connection.
    let mut slow = c.exec_stream(ExecRequest::new(["sleep", "30"])).unwrap();
    let (exec_id, pid) = slow.started().unwrap().unwrap();
    c.ping().unwrap();
    assert!(c.exists("/").unwrap());
    // Answered while the exec is still running: not queued behind it.
    assert!(common::process_running(pid));
    c.signal(exec_id, libc::SIGKILL).unwrap();
    let out = slow.collect_output().unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
}

#[test]
fn shutdown_ends_a_host_mode_agent() {
    let mut agent = Agent::start();
    let c = agent.client();
    c.shutdown().unwrap();
    assert!(common::eventually(Duration::from_secs(5), || !agent.alive()));
    assert!(c.ping().is_err());
}

#[test]
fn connect_mode_reconnects_with_restored() {
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("host.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if tx.send(s.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    cmd.arg("--connect-unix").arg(&sock);
    let _agent = Agent::spawn(cmd, dir, sock.clone());

    let s = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("agent connected");
    let c = kiln_proto::Client::connect(
        s.try_clone().unwrap(),
        s.try_clone().unwrap(),
        Default::default(),
    )
    .unwrap();
    assert!(!c.hello().restored);
    let out = c.exec(ExecRequest::new(["echo", "first"])).unwrap();
    assert_eq!(out.stdout, b"first\n");
    // Lose the connection: the agent comes back on its own and says so.
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    let s2 = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("agent reconnected");
    let c2 = kiln_proto::Client::connect(s2.try_clone().unwrap(), s2, Default::default()).unwrap();
    assert!(c2.hello().restored);
    c2.ping().unwrap();
    assert!(c.ping().is_err());
}

/// A slow host (back-pressure on the connection) must not lose output still buffered in the
/// pipe when the command exits: the drain grace counts idle pipes, not time blocked in send.
#[test]
fn slow_reader_gets_every_byte_after_the_leader_exits() {
    const TOTAL: usize = 3 * 1024 * 1024;
    let agent = Agent::start();
    let mut s = raw_conn(&agent);
    let req = ExecRequest::new(["head", "-c", &TOTAL.to_string(), "/dev/zero"]);
    send(
        &mut s,
        &Message::Request {
            id: 1,
            body: Request::Exec(req),
        },
    );
    let mut got = 0usize;
    let exit = loop {
        let (id, body) = expect_response(&mut s);
        assert_eq!(id, 1);
        match body {
            Response::ExecStarted { .. } => {}
            Response::Stdout(d) => {
                got += d.len();
                // Read slower than `head` writes, so the agent blocks in send for longer than
                // its drain grace while the leader has already exited.
                std::thread::sleep(Duration::from_millis(350));
            }
            Response::Exit(e) => break e,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(exit.code, Some(0));
    assert_eq!(got, TOTAL, "stdout bytes lost");
}
