//! Tier-4: `kiln mcp` driven by the real `mcp` Python client (2.3.0 from PyPI, installed by
//! `cargo xtask test` into `<target>/kiln-mcp/venv`, xtask/src/mcp.rs) running
//! tests/mcp/client.py: over stdio (the client spawns the built `target/<profile>/kiln mcp`)
//! and over streamable HTTP (this test starts `kiln mcp --http` on a free loopback port and
//! stops it with SIGTERM, which must exit 0). One python-image sandbox per transport.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Deadline of one client run (the runner gives each tier-4 test 5 minutes).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(270);

/// `target/<profile>` of this test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn kiln() -> PathBuf {
    let kiln = profile_dir().join("kiln");
    assert!(
        kiln.is_file(),
        "the kiln CLI is not built at {} (`cargo xtask test` builds it)",
        kiln.display()
    );
    kiln
}

/// `$KILN_MCP_PYTHON`, else `<target>/kiln-mcp/venv/bin/python`.
fn venv_python() -> PathBuf {
    let p = match std::env::var_os("KILN_MCP_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => profile_dir()
            .parent()
            .map(|t| t.join("kiln-mcp/venv/bin/python"))
            .unwrap_or_default(),
    };
    assert!(
        p.is_file(),
        "no mcp venv at {} (`cargo xtask test` creates it: xtask/src/mcp.rs)",
        p.display()
    );
    p
}

/// Runs tests/mcp/client.py with `args`; asserts it passed.
fn client(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mcp/client.py");
    let mut cmd = Command::new(venv_python());
    cmd.arg(&script)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("RUST_LOG", "kiln_mcp=info");
    let start = Instant::now();
    let run = kiln_tests::run_collecting(&mut cmd, CLIENT_TIMEOUT);
    println!("{}", run.stdout);
    eprintln!("{}", run.stderr);
    eprintln!("client.py {args:?}: {:.1} s", start.elapsed().as_secs_f64());
    match run.status {
        None => panic!("client.py {args:?} did not finish within {CLIENT_TIMEOUT:?}"),
        Some(s) => assert!(
            s.success() && run.stdout.contains("ALL OK"),
            "client.py {args:?} failed ({s}):\n{}\n{}",
            run.stdout,
            run.stderr
        ),
    }
    run.stderr
}

#[test]
fn mcp_stdio() {
    kiln_tests::require_tier4();
    let kiln = kiln();
    let stderr = client(&["stdio", &kiln.to_string_lossy()]);
    // The server's log is on stderr (stdout is the protocol): the sandbox was created, killed.
    assert!(stderr.contains("sandbox created"), "{stderr}");
}

#[test]
fn mcp_http() {
    kiln_tests::require_tier4();
    let kiln = kiln();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"));
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(&kiln)
        .args([
            "mcp",
            "--http",
            &listen,
            "--max-sandboxes",
            "2",
            "--boot-timeout",
            "180",
        ])
        .env("RUST_LOG", "kiln_mcp=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", kiln.display()));
    let Some(stderr) = child.stderr.take() else {
        panic!("kiln mcp has no piped stderr")
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("kiln mcp: listening on ") => {
                break l.rsplit(' ').next().unwrap_or_default().trim().to_string()
            }
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("kiln mcp --http did not report listening within 30 s");
            }
        }
    };
    assert_eq!(url, format!("http://{listen}/mcp"));
    // The client's own `--image` default is not set here: it asks for "python" itself.
    let result = std::panic::catch_unwind(|| client(&["http", &url]));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() > deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => break None,
        }
    };
    let log: Vec<String> = rx.try_iter().collect();
    let log = log.join("\n");
    eprintln!("--- kiln mcp log ---\n{log}");
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "kiln mcp --http did not exit cleanly on SIGTERM: {status:?}\n{log}"
    );
    assert!(log.contains("sandbox killed"), "{log}");
}
