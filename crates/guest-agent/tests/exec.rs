//! Tier-3: the exec engine of kiln-agent in host mode, driven through the kiln-proto client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::time::{Duration, Instant};

use common::{eventually, process_running, Agent};
use kiln_proto::{ErrorKind, ExecEvent, ExecRequest, Stdin};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[test]
fn argv_env_cwd_and_clean_environment() {
    let agent = Agent::start();
    let c = agent.client();
    let dir = agent.mkdir("work");
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        r#"echo "$0|$1|$2"; echo "FOO=$FOO"; pwd; echo "PATH=$PATH"; echo "HOME=$HOME"; echo "LEAK=${KILN_TEST_LEAK:-unset}""#,
        "zero",
        "one two",
        "",
    ]);
    req.env = vec![
        ("FOO".into(), "bar baz".into()),
        ("HOME".into(), "/home/x".into()),
    ];
    req.cwd = Some(dir.clone());
    let out = c.exec(req).unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "zero|one two|");
    assert_eq!(lines[1], "FOO=bar baz");
    assert_eq!(lines[2], dir);
    assert_eq!(
        lines[3],
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(lines[4], "HOME=/home/x");
    assert_eq!(lines[5], "LEAK=unset", "the agent's own environment leaked");
    assert!(out.exec_id.is_some() && out.pid.is_some());
}

#[test]
fn bad_cwd_and_env_are_errors() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some(agent.path("missing"));
    let err = c.exec(req).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    let mut req = ExecRequest::new(["true"]);
    req.env = vec![("A=B".into(), "x".into())];
    let err = c.exec(req).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidRequest), "{err}");
    let err = c.exec(ExecRequest::new(Vec::<String>::new())).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidRequest), "{err}");
}

#[test]
fn stdin_bytes() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = ExecRequest::new(["cat"]);
    let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    req.stdin = Stdin::Bytes(input.clone());
    let out = c.exec(req).unwrap();
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.stdout, input);
    // No stdin: /dev/null, so cat ends at once.
    let out = c.exec(ExecRequest::new(["cat"])).unwrap();
    assert_eq!(out.status.code, Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn stdin_stream() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = sh("cat; echo done >&2");
    req.stdin = Stdin::Stream;
    let mut stream = c.exec_stream(req).unwrap();
    let stdin = stream.stdin().unwrap();
    let input: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    stdin.send(&input).unwrap();
    stdin.close().unwrap();
    // Writing after EOF is refused.
    assert!(stdin.send(b"late").is_err());
    let out = stream.collect_output().unwrap();
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "streamed stdin came back altered");
    assert_eq!(out.stderr, b"done\n");
}

#[test]
fn exit_codes_and_signals() {
    let agent = Agent::start();
    let c = agent.client();
    let out = c.exec(sh("exit 42")).unwrap();
    assert_eq!((out.status.code, out.status.signal), (Some(42), None));
    assert!(!out.status.timed_out);
    let out = c.exec(sh("kill -TERM $$")).unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(15)));
    assert_eq!(out.status.shell_code(), 143);

    // Signal a running exec through the protocol.
    let mut s = c.exec_stream(ExecRequest::new(["sleep", "1000"])).unwrap();
    let (exec_id, pid) = s.started().unwrap().expect("started");
    assert!(process_running(pid));
    c.signal(exec_id, libc::SIGINT).unwrap();
    let out = s.collect_output().unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGINT));
    assert!(eventually(Duration::from_secs(5), || !process_running(pid)));
    // The exec is gone now.
    let err = c.signal(exec_id, libc::SIGKILL).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
}

#[test]
fn timeout_kills_the_whole_group() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = sh("sleep 1000 & echo $!; sleep 1000");
    req.timeout_ms = Some(500);
    let t0 = Instant::now();
    let mut s = c.exec_stream(req).unwrap();
    let (_, leader) = s.started().unwrap().expect("started");
    let out = s.collect_output().unwrap();
    let elapsed = t0.elapsed();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert!(
        elapsed >= Duration::from_millis(450),
        "ended after {elapsed:?}"
    );
    let child: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !process_running(child)
            && !process_running(leader)),
        "background child {child} or leader {leader} survived the timeout"
    );
}

#[test]
fn output_cap_truncates_and_drains() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = sh("head -c 5000000 /dev/zero; echo after >&2; exit 7");
    req.output_cap = Some(1000);
    let out = c.exec(req).unwrap();
    assert!(out.status.truncated);
    // The child was not blocked by the cap: it wrote everything and exited normally.
    assert_eq!(out.status.code, Some(7));
    assert_eq!(out.stdout.len() + out.stderr.len(), 1000);
    let mut req = sh("echo small");
    req.output_cap = Some(1000);
    let out = c.exec(req).unwrap();
    assert!(!out.status.truncated);
    assert_eq!(out.stdout, b"small\n");
}

#[test]
fn ten_megabytes_of_stdout_intact() {
    let agent = Agent::start();
    let c = agent.client();
    let out = c.exec(ExecRequest::new(["seq", "1", "1500000"])).unwrap();
    assert_eq!(out.status.code, Some(0));
    let mut expected = String::with_capacity(11_000_000);
    for i in 1..=1_500_000u32 {
        expected.push_str(&i.to_string());
        expected.push('\n');
    }
    assert!(expected.len() > 10_000_000);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes(), "stdout differs");
    assert!(!out.status.truncated);
}

#[test]
fn streamed_events_arrive_in_order() {
    let agent = Agent::start();
    let c = agent.client();
    let events: Vec<ExecEvent> = c
        .exec_stream(sh("echo a; sleep 0.2; echo b >&2; sleep 0.2; echo c"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(matches!(events[0], ExecEvent::Started { .. }));
    let rest: Vec<&ExecEvent> = events[1..].iter().collect();
    assert_eq!(rest.len(), 4, "{events:?}");
    assert_eq!(rest[0], &ExecEvent::Stdout(b"a\n".to_vec()));
    assert_eq!(rest[1], &ExecEvent::Stderr(b"b\n".to_vec()));
    assert_eq!(rest[2], &ExecEvent::Stdout(b"c\n".to_vec()));
    assert!(matches!(rest[3], ExecEvent::Exit(s) if s.code == Some(0)));
}

#[test]
fn sixteen_concurrent_execs() {
    let agent = Agent::start();
    let c = agent.client();
    let dir = agent.mkdir("barrier");
    // Each exec checks in, then waits until all 16 have: this only ends if they all run at
    // the same time (a timeout turns a serialised engine into a failure, not a hang).
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let c = c.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut req = sh(
                    r#"touch "$D/$N"; while [ "$(ls "$D" | wc -l)" -lt 16 ]; do sleep 0.05; done; echo $N"#,
                );
                req.env = vec![("N".into(), i.to_string()), ("D".into(), dir)];
                req.timeout_ms = Some(30_000);
                c.exec(req).unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert!(!out.status.timed_out, "exec {i} never saw the other 15");
        assert_eq!(out.status.code, Some(0));
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
    }
}

#[test]
fn background_exec_wait_and_signal() {
    let agent = Agent::start();
    let c = agent.client();
    let (id, pid) = c
        .spawn(sh("echo out; echo err >&2; sleep 0.3; echo late; exit 3"))
        .unwrap();
    assert!(pid > 0);
    c.ping().unwrap();
    let out = c.wait(id).unwrap();
    assert_eq!(out.status.code, Some(3));
    assert_eq!(out.stdout, b"out\nlate\n");
    assert_eq!(out.stderr, b"err\n");
    // Waited once: gone.
    let err = c.wait(id).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");

    // Signal a background exec, then wait for it.
    let (id, pid) = c.spawn(ExecRequest::new(["sleep", "1000"])).unwrap();
    assert!(process_running(pid));
    c.signal(id, libc::SIGKILL).unwrap();
    let out = c.wait(id).unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGKILL));

    // A background exec that already ended keeps its output for the waiter.
    let (id, _) = c.spawn(sh("echo quick")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = c.wait(id).unwrap();
    assert_eq!(
        (out.status.code, out.stdout.as_slice()),
        (Some(0), &b"quick\n"[..])
    );

    // Unknown commands in the background are an ExecFailed error.
    let err = c.spawn(ExecRequest::new(["no-such-cmd-kiln"])).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::ExecFailed), "{err}");
}

#[test]
fn background_exec_outlives_its_connection() {
    let agent = Agent::start();
    let (id, _) = {
        let c1 = agent.client();
        c1.spawn(sh("sleep 0.3; echo survived")).unwrap()
    };
    let c2 = agent.client();
    let out = c2.wait(id).unwrap();
    assert_eq!(out.stdout, b"survived\n");
    assert_eq!(out.status.code, Some(0));
}

#[test]
fn foreground_exec_dies_with_its_connection() {
    let agent = Agent::start();
    let s = agent.stream();
    let c = kiln_proto::Client::connect(
        s.try_clone().unwrap(),
        s.try_clone().unwrap(),
        Default::default(),
    )
    .unwrap();
    let mut st = c.exec_stream(ExecRequest::new(["sleep", "1000"])).unwrap();
    let (_, pid) = st.started().unwrap().unwrap();
    assert!(process_running(pid));
    s.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !process_running(pid)),
        "exec {pid} outlived its connection"
    );
}

#[test]
fn unknown_command_exits_127_with_message() {
    let agent = Agent::start();
    let c = agent.client();
    let out = c
        .exec(ExecRequest::new(["kiln-no-such-command", "x"]))
        .unwrap();
    assert_eq!(out.status.code, Some(127));
    assert_eq!(out.exec_id, None);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("kiln-no-such-command: command not found"),
        "{err}"
    );

    // Found but not executable: 126.
    let f = agent.path("not-exec");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let out = c.exec(ExecRequest::new([f.as_str()])).unwrap();
    assert_eq!(out.status.code, Some(126));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

    // A missing explicit path: 127.
    let out = c
        .exec(ExecRequest::new([agent.path("nope").as_str()]))
        .unwrap();
    assert_eq!(out.status.code, Some(127));
}

#[test]
fn orphans_are_reaped() {
    let agent = Agent::start();
    let c = agent.client();
    // The double fork leaves an orphan that the agent (child subreaper) must reap.
    let out = c.exec(sh("(sleep 0.2 & echo $!) ; exit 0")).unwrap();
    let orphan: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{orphan}"
        ))
        .exists()),
        "orphan {orphan} was not reaped"
    );
    // And the exec engine still gets its own statuses afterwards.
    assert_eq!(c.exec(sh("exit 5")).unwrap().status.code, Some(5));
}

#[test]
fn huge_timeout_is_no_timeout() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = sh("echo ok");
    req.timeout_ms = Some(u64::MAX);
    let out = c.exec(req).unwrap();
    assert_eq!(out.stdout, b"ok\n");
    assert!(!out.status.timed_out);
}

#[test]
fn leftover_children_holding_the_pipes_do_not_block_the_exit() {
    let agent = Agent::start();
    let c = agent.client();
    let t0 = Instant::now();
    let out = c
        .exec(sh("sleep 30 & echo $!; sleep 0.3; echo bye"))
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(out.status.code, Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let child: u32 = lines.next().unwrap().parse().unwrap();
    // Output written after a quiet spell, right before the exit, is not lost.
    assert_eq!(lines.next(), Some("bye"));
    // The leftover is not killed (only a timeout kills the group)...
    assert!(process_running(child));
    // ...but it can be, via a shell.
    c.exec(ExecRequest::new(["kill", "-9", &child.to_string()]))
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || !process_running(
        child
    )));
}

/// An agent that inherited ignored signals (as a background shell job does: SIGINT and SIGQUIT
/// ignored) must not pass them on: the user's command starts with every signal at its default.
#[test]
fn commands_start_with_default_signal_dispositions() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    cmd.arg("--listen-unix").arg(&sock);
    // SAFETY: the closure runs in the forked child before exec and only calls signal(2), which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            Ok(())
        });
    }
    let agent = Agent::spawn(cmd, dir, sock);
    let c = agent.client();
    let out = c
        .exec(ExecRequest::new(["cat", "/proc/self/status"]))
        .unwrap();
    let status = String::from_utf8(out.stdout).unwrap();
    let ign = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .expect("SigIgn line")
        .trim();
    assert_eq!(
        u64::from_str_radix(ign, 16).unwrap(),
        0,
        "ignored signals: {ign}"
    );
    // And a SIGINT sent through the protocol really ends a command.
    let mut s = c.exec_stream(ExecRequest::new(["sleep", "1000"])).unwrap();
    let (exec_id, _pid) = s.started().unwrap().expect("started");
    c.signal(exec_id, libc::SIGINT).unwrap();
    let out = s.collect_output().unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGINT));
}
