//! Tier-3: exec users (`ExecRequest::user`) and limits in host mode. The agent runs as root
//! here (like PID 1 in the guest), so it can switch to any uid; names resolve through the
//! host's /etc/passwd. Host mode has no exec cgroups: limits are accepted and not applied.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::Agent;
use kiln_proto::{ErrorKind, ExecLimits, ExecRequest};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the user tests need root (the agent switches uids); run the tests as root"
    );
}

fn as_user(user: &str, script: &str) -> ExecRequest {
    let mut req = ExecRequest::new(["sh", "-c", script]);
    req.user = Some(user.into());
    req
}

fn stdout_of(c: &kiln_proto::Client, req: ExecRequest) -> String {
    let out = c.exec(req).unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn uid_gid_switches_ids_and_drops_groups() {
    require_root();
    let agent = Agent::start();
    let c = agent.client();
    let out = stdout_of(
        &c,
        as_user(
            "1000:1001",
            r#"id -u; id -g; id -G; echo "HOME=$HOME USER=${USER:-unset}"; grep -E '^(Uid|Gid|Groups):' /proc/self/status"#,
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["1000", "1001", "1001"], "{out}");
    // Real, effective, saved and filesystem ids all switched: no way back to root.
    assert!(out.contains("Uid:\t1000\t1000\t1000\t1000"), "{out}");
    assert!(out.contains("Gid:\t1001\t1001\t1001\t1001"), "{out}");
    // A numeric uid: HOME is that uid's passwd home when it has one, else "/".
    let home = nix::unistd::User::from_uid(1000.into())
        .unwrap()
        .map_or("/".to_owned(), |u| u.dir.to_string_lossy().into_owned());
    assert!(lines[3].starts_with(&format!("HOME={home} ")), "{out}");

    // Without a user the exec still runs as the agent's user (root).
    let out = stdout_of(&c, ExecRequest::new(["id", "-u"]));
    assert_eq!(out.trim(), "0");
}

#[test]
fn a_name_resolves_through_passwd_and_sets_login_variables() {
    require_root();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the host has a user nobody");
    let agent = Agent::start();
    let c = agent.client();
    let out = stdout_of(
        &c,
        as_user("nobody", r#"id -u; id -g; echo "$HOME|$USER|$LOGNAME""#),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], nobody.uid.to_string(), "{out}");
    assert_eq!(lines[1], nobody.gid.to_string(), "{out}");
    assert_eq!(
        lines[2],
        format!("{}|nobody|nobody", nobody.dir.display()),
        "{out}"
    );
    // The request's env wins over the login variables.
    let mut req = as_user("nobody", r#"echo "$HOME|$USER""#);
    req.env = vec![("HOME".into(), "/tmp".into()), ("USER".into(), "x".into())];
    assert_eq!(stdout_of(&c, req), "/tmp|x\n");
}

#[test]
fn unknown_users_are_refused_by_name() {
    require_root();
    let agent = Agent::start();
    let c = agent.client();
    let err = c
        .exec(as_user("no-such-user-kiln", "true"))
        .expect_err("an unknown user must be refused");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("no-such-user-kiln"), "{err}");
    // Background execs too.
    let mut req = as_user("no-such-user-kiln", "true");
    req.background = true;
    let err = c.spawn(req).expect_err("an unknown user must be refused");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    // Malformed specs are invalid requests.
    for bad in ["", "nobody:12", "1000:x", "99999999999"] {
        let err = c.exec(as_user(bad, "true")).expect_err(bad);
        assert_eq!(
            err.remote_kind(),
            Some(ErrorKind::InvalidRequest),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn the_user_switch_happens_before_chdir_and_exec() {
    require_root();
    let agent = Agent::start();
    let c = agent.client();
    // A directory only root may enter: as uid 1000 the chdir fails (126, named).
    let dir = agent.mkdir("root-only");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut req = as_user("1000:1000", "pwd");
    req.cwd = Some(dir.clone());
    let out = c.exec(req).unwrap();
    assert_eq!(out.status.code, Some(126), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dir),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A root-only file is unreadable to the command.
    let secret = agent.path("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = c
        .exec(as_user("1000:1000", &format!("cat {secret}")))
        .unwrap();
    assert_ne!(out.status.code, Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn host_mode_accepts_limits_without_applying_them() {
    let agent = Agent::start();
    let c = agent.client();
    let mut req = ExecRequest::new(["sh", "-c", "echo ok"]);
    req.limits = ExecLimits {
        memory_max: Some(1 << 20),
        pids_max: Some(1),
    };
    let out = c.exec(req).unwrap();
    assert_eq!(out.stdout, b"ok\n");
    assert!(out.status.success());
    assert!(
        !out.status.oom_killed && !out.status.pids_limit_hit,
        "{out:?}"
    );
}
