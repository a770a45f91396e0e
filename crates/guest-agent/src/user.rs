//! Exec users: resolves the `user` of an `ExecRequest` (a name from `/etc/passwd`, or `UID` /
//! `UID:GID`) into the uid, gid, supplementary groups and the login variables (`HOME`,
//! `USER`, `LOGNAME`) the exec's child switches to before `execve`.
//!
//! The files are read from the agent's own root (the guest's, or the host's in host mode).
//! They are bounded in size ([`MAX_DB_BYTES`]): a hostile image cannot make the agent read
//! without end.

use std::io::Read;

/// Most bytes read of `/etc/passwd` or `/etc/group`.
pub const MAX_DB_BYTES: u64 = 4 * 1024 * 1024;
/// Most supplementary groups applied (the kernel's NGROUPS_MAX is 65536; keep it small).
pub const MAX_GROUPS: usize = 256;

/// Errors of resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("exec: unknown user {user:?} (not in /etc/passwd; give a name, UID or UID:GID)")]
    Unknown { user: String },
    #[error("exec: invalid user {user:?} (a name, UID or UID:GID)")]
    Invalid { user: String },
    #[error("exec: user {user:?}: reading {file}: {source}")]
    Read {
        user: String,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Who an exec runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary gid first).
    pub groups: Vec<u32>,
    /// Login name, when the uid has a passwd entry.
    pub name: Option<String>,
    /// Home directory from passwd (`/` when the uid has none).
    pub home: String,
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn read_db(user: &str, file: &'static str) -> Result<String, UserError> {
    let read = || -> std::io::Result<String> {
        let f = std::fs::File::open(file)?;
        let mut s = String::new();
        let mut bytes = Vec::new();
        f.take(MAX_DB_BYTES).read_to_end(&mut bytes)?;
        s.push_str(&String::from_utf8_lossy(&bytes));
        Ok(s)
    };
    match read() {
        Ok(s) => Ok(s),
        // No file: an image without users (the initramfs) only knows numeric ids.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UserError::Read {
            user: user.to_owned(),
            file,
            source,
        }),
    }
}

fn parse_passwd(text: &str) -> impl Iterator<Item = Passwd> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
            return None;
        }
        Some(Passwd {
            name: f[0].to_owned(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_owned(),
        })
    })
}

/// Supplementary groups of `name` from `/etc/group` text (gids listing it as a member).
fn member_groups(text: &str, name: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let gid: u32 = f[2].parse().ok()?;
            f[3].split(',').any(|m| m.trim() == name).then_some(gid)
        })
        .collect()
}

/// Resolve `user` against the given passwd and group texts.
fn resolve_in(user: &str, passwd: &str, group: &str) -> Result<ExecUser, UserError> {
    let invalid = || UserError::Invalid {
        user: user.to_owned(),
    };
    if user.is_empty() || user.contains('\0') {
        return Err(invalid());
    }
    let numeric = |s: &str| -> Result<Option<u32>, UserError> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().map(Some).map_err(|_| invalid())
        } else {
            Ok(None)
        }
    };
    let (who, gid_part) = match user.split_once(':') {
        Some((u, g)) => {
            let g = numeric(g)?.ok_or_else(invalid)?;
            (u, Some(g))
        }
        None => (user, None),
    };
    let entry = match numeric(who)? {
        Some(uid) => parse_passwd(passwd).find(|p| p.uid == uid).map_or(
            Passwd {
                name: String::new(),
                uid,
                gid: uid,
                home: "/".into(),
            },
            |p| p,
        ),
        None => {
            if gid_part.is_some() {
                return Err(invalid());
            }
            parse_passwd(passwd)
                .find(|p| p.name == who)
                .ok_or_else(|| UserError::Unknown {
                    user: user.to_owned(),
                })?
        }
    };
    let gid = gid_part.unwrap_or(entry.gid);
    let mut groups = vec![gid];
    if !entry.name.is_empty() && gid_part.is_none() {
        for g in member_groups(group, &entry.name) {
            if !groups.contains(&g) && groups.len() < MAX_GROUPS {
                groups.push(g);
            }
        }
    }
    Ok(ExecUser {
        uid: entry.uid,
        gid,
        groups,
        name: (!entry.name.is_empty()).then_some(entry.name),
        home: if entry.home.is_empty() {
            "/".into()
        } else {
            entry.home
        },
    })
}

/// Resolve `user` against the agent's `/etc/passwd` and `/etc/group`.
pub fn resolve(user: &str) -> Result<ExecUser, UserError> {
    let passwd = read_db(user, "/etc/passwd")?;
    let group = read_db(user, "/etc/group")?;
    resolve_in(user, &passwd, &group)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        bob:x:1001:100::/home/bob:/bin/sh\n\
        broken:x:notanumber:1:::\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:alice\nwheel:x:10:alice,bob\nalice:x:1000:\n";

    #[test]
    fn names_resolve_with_groups_and_home() {
        let a = resolve_in("alice", PASSWD, GROUP).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, [1000, 100, 10]);
        assert_eq!(a.name.as_deref(), Some("alice"));
        assert_eq!(a.home, "/home/alice");
        let b = resolve_in("bob", PASSWD, GROUP).unwrap();
        assert_eq!(
            (b.uid, b.gid, b.groups.as_slice()),
            (1001, 100, &[100, 10][..])
        );
    }

    #[test]
    fn numeric_ids_work_without_passwd() {
        let u = resolve_in("1000", "", "").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.as_slice()),
            (1000, 1000, &[1000][..])
        );
        assert_eq!((u.name, u.home.as_str()), (None, "/"));
        let u = resolve_in("1234:5678", "", "").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.as_slice()),
            (1234, 5678, &[5678][..])
        );
        // A uid with an entry takes its name and home.
        let u = resolve_in("1000", PASSWD, GROUP).unwrap();
        assert_eq!(u.name.as_deref(), Some("alice"));
        assert_eq!(u.home, "/home/alice");
    }

    #[test]
    fn unknown_and_invalid_users_are_named() {
        let e = resolve_in("mallory", PASSWD, GROUP).unwrap_err();
        assert!(matches!(e, UserError::Unknown { .. }));
        assert!(e.to_string().contains("\"mallory\""), "{e}");
        for bad in ["", "alice:10", "1:x", "99999999999", "1:", "a\0b"] {
            assert!(
                matches!(
                    resolve_in(bad, PASSWD, GROUP),
                    Err(UserError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        // A malformed line is skipped, not an error.
        assert!(matches!(
            resolve_in("broken", PASSWD, GROUP),
            Err(UserError::Unknown { .. })
        ));
    }
}
