//! Directory watching of envd's `filesystem.Filesystem` (`CreateWatcher`, `GetWatcherEvents`,
//! `RemoveWatcher`, as the sync SDK's `files.watch_dir` uses them) by polling: a watcher keeps
//! the last listing of its directory (name, kind, size, mtime through the agent's `ListDir`
//! and `Stat`) and each `GetWatcherEvents` reports the difference to a fresh one as
//! `EVENT_TYPE_CREATE` / `EVENT_TYPE_WRITE` / `EVENT_TYPE_REMOVE`. Changes undone between two
//! calls are not seen (a poll, not inotify). Non-recursive only (the SDK refuses recursive
//! watching at the envd version reported). Watchers belong to one sandbox and go with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kiln::FileKind;
use serde_json::{json, Value};

use crate::backend::{Fail, FailKind, Guest};
use crate::state::{lock, random_hex};

/// Most entries of a watched directory.
pub const MAX_WATCH_ENTRIES: usize = 4096;
/// Most watchers per server.
pub const MAX_WATCHERS: usize = 256;

type Listing = BTreeMap<String, (FileKind, u64, i64)>;

struct Watcher {
    sandbox: String,
    path: String,
    last: Listing,
}

/// Every watcher, by id.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Watcher>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers")
            .field("count", &lock(&self.map).len())
            .finish()
    }
}

fn listing(guest: &dyn Guest, path: &str) -> Result<Listing, Fail> {
    let st = guest.stat(path)?;
    if st.kind != FileKind::Dir {
        return Err(Fail::new(
            FailKind::InvalidArgument,
            format!("path '{path}' is not a directory"),
        ));
    }
    let mut out = Listing::new();
    for e in guest.list_dir(path)?.into_iter().take(MAX_WATCH_ENTRIES) {
        let p = format!("{}/{}", path.trim_end_matches('/'), e.name);
        let mtime = guest.stat(&p).map(|s| s.mtime_ns).unwrap_or(0);
        out.insert(e.name, (e.kind, e.size, mtime));
    }
    Ok(out)
}

/// The events from `old` to `new`, in name order.
fn diff(old: &Listing, new: &Listing) -> Vec<Value> {
    let mut ev = Vec::new();
    for (name, meta) in new {
        match old.get(name) {
            None => ev.push(json!({"name": name, "type": "EVENT_TYPE_CREATE"})),
            Some(m) if m != meta => ev.push(json!({"name": name, "type": "EVENT_TYPE_WRITE"})),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        ev.push(json!({"name": name, "type": "EVENT_TYPE_REMOVE"}));
    }
    ev
}

impl Watchers {
    /// Starts watching `path` of sandbox `sandbox` (blocking: lists it); returns the id.
    pub fn create(&self, sandbox: &str, guest: &dyn Guest, path: &str) -> Result<String, Fail> {
        if lock(&self.map).len() >= MAX_WATCHERS {
            return Err(Fail::new(
                FailKind::InvalidArgument,
                format!("at most {MAX_WATCHERS} watchers"),
            ));
        }
        let last = listing(guest, path)?;
        let id = format!("w{}", random_hex(8));
        lock(&self.map).insert(
            id.clone(),
            Watcher {
                sandbox: sandbox.to_string(),
                path: path.to_string(),
                last,
            },
        );
        Ok(id)
    }

    /// The events of watcher `id` of `sandbox` since the last call (blocking).
    pub fn events(&self, sandbox: &str, guest: &dyn Guest, id: &str) -> Result<Vec<Value>, Fail> {
        let path = match lock(&self.map).get(id) {
            Some(w) if w.sandbox == sandbox => w.path.clone(),
            _ => {
                return Err(Fail::new(
                    FailKind::NotFound,
                    format!("watcher {id} not found"),
                ))
            }
        };
        let now = listing(guest, &path)?;
        let mut map = lock(&self.map);
        let Some(w) = map.get_mut(id) else {
            return Err(Fail::new(
                FailKind::NotFound,
                format!("watcher {id} not found"),
            ));
        };
        let ev = diff(&w.last, &now);
        w.last = now;
        Ok(ev)
    }

    /// Stops watcher `id` of `sandbox`.
    pub fn remove(&self, sandbox: &str, id: &str) -> Result<(), Fail> {
        let mut map = lock(&self.map);
        match map.get(id) {
            Some(w) if w.sandbox == sandbox => {
                map.remove(id);
                Ok(())
            }
            _ => Err(Fail::new(
                FailKind::NotFound,
                format!("watcher {id} not found"),
            )),
        }
    }

    /// Forgets the watchers of a sandbox that went away.
    pub fn forget_sandbox(&self, sandbox: &str) {
        lock(&self.map).retain(|_, w| w.sandbox != sandbox);
    }
}

/// Shared handle.
pub type SharedWatchers = Arc<Watchers>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_reports_create_write_remove() {
        let mut a = Listing::new();
        a.insert("keep".into(), (FileKind::File, 1, 1));
        a.insert("grow".into(), (FileKind::File, 1, 1));
        a.insert("gone".into(), (FileKind::File, 1, 1));
        let mut b = a.clone();
        b.remove("gone");
        b.insert("grow".into(), (FileKind::File, 2, 2));
        b.insert("new".into(), (FileKind::File, 0, 3));
        let ev = diff(&a, &b);
        assert_eq!(
            ev,
            vec![
                json!({"name": "grow", "type": "EVENT_TYPE_WRITE"}),
                json!({"name": "new", "type": "EVENT_TYPE_CREATE"}),
                json!({"name": "gone", "type": "EVENT_TYPE_REMOVE"}),
            ]
        );
        assert!(diff(&b, &b).is_empty());
    }
}
