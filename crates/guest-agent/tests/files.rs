//! Tier-3: file operations of kiln-agent in host mode, driven through the kiln-proto client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use common::Agent;
use kiln_proto::{ErrorKind, FileKind, Request, Response, MAX_CHUNK};

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn multi_mib_file_round_trips_in_chunks() {
    let agent = Agent::start();
    let c = agent.client();
    let path = agent.path("big.bin");
    let data = pseudo_random(5 * 1024 * 1024 + 12345, 42);
    c.write_file(&path, &data, None).unwrap();
    // Written by the agent, checked directly on disk.
    assert!(
        std::fs::read(&path).unwrap() == data,
        "file on disk differs"
    );
    let back = c.read_file(&path).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "read back differs");
    // Ranges across chunk boundaries.
    let off = MAX_CHUNK as u64 - 10;
    let part = c
        .read_file_range(&path, off, Some(3 * MAX_CHUNK as u64))
        .unwrap();
    assert!(part == data[off as usize..off as usize + 3 * MAX_CHUNK]);
    let tail = c
        .read_file_range(&path, data.len() as u64 - 5, Some(100))
        .unwrap();
    assert_eq!(tail, data[data.len() - 5..]);
    // Overwriting with shorter content truncates.
    c.write_file(&path, b"short", None).unwrap();
    assert_eq!(c.read_file(&path).unwrap(), b"short");
    // Empty files.
    c.write_file(&path, b"", None).unwrap();
    assert_eq!(c.read_file(&path).unwrap(), b"");
    assert_eq!(c.stat(&path).unwrap().size, 0);
}

#[test]
fn a_single_read_is_bounded_by_the_chunk_size() {
    let agent = Agent::start();
    let c = agent.client();
    let path = agent.path("f");
    c.write_file(&path, &vec![1u8; MAX_CHUNK * 2], None)
        .unwrap();
    match c
        .call(
            "read",
            Request::ReadFile {
                path: path.clone(),
                offset: 0,
                len: u64::MAX,
            },
        )
        .unwrap()
    {
        Response::Data { data, eof } => {
            assert_eq!(data.len(), MAX_CHUNK);
            assert!(!eof);
        }
        other => panic!("unexpected {other:?}"),
    }
    match c
        .call(
            "read",
            Request::ReadFile {
                path,
                offset: MAX_CHUNK as u64,
                len: MAX_CHUNK as u64,
            },
        )
        .unwrap()
    {
        Response::Data { data, eof } => assert!(data.len() == MAX_CHUNK && eof),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn stat_list_mkdir_exists_rename_remove() {
    let agent = Agent::start();
    let c = agent.client();
    let root = agent.path("tree");
    let deep = format!("{root}/a/b/c");
    assert!(!c.exists(&root).unwrap());
    // mkdir without parents fails, with parents works.
    let err = c.mkdir(&deep, false).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    c.mkdir(&deep, true).unwrap();
    c.mkdir(&deep, true).unwrap(); // idempotent with parents
    assert!(std::path::Path::new(&deep).is_dir());
    let err = c.mkdir(&deep, false).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::AlreadyExists), "{err}");

    c.write_file(&format!("{root}/a/file.txt"), b"hello", Some(0o600))
        .unwrap();
    std::os::unix::fs::symlink("file.txt", format!("{root}/a/link")).unwrap();
    let st = c.stat(&format!("{root}/a/file.txt")).unwrap();
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, 5, 0o600));
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        (now_ns - st.mtime_ns).abs() < 60_000_000_000,
        "mtime {}",
        st.mtime_ns
    );
    assert_eq!(c.stat(&format!("{root}/a")).unwrap().kind, FileKind::Dir);
    assert_eq!(
        c.stat(&format!("{root}/a/link")).unwrap().kind,
        FileKind::Symlink
    );

    let entries = c.list_dir(&format!("{root}/a")).unwrap();
    let names: Vec<(&str, FileKind)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [
            ("b", FileKind::Dir),
            ("file.txt", FileKind::File),
            ("link", FileKind::Symlink)
        ]
    );
    assert_eq!(entries[1].size, 5);

    c.rename(&format!("{root}/a/file.txt"), &format!("{root}/moved.txt"))
        .unwrap();
    assert!(!c.exists(&format!("{root}/a/file.txt")).unwrap());
    assert_eq!(c.read_file(&format!("{root}/moved.txt")).unwrap(), b"hello");

    let err = c.remove(&format!("{root}/a"), false).unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(ErrorKind::DirectoryNotEmpty),
        "{err}"
    );
    c.remove(&format!("{root}/a"), true).unwrap();
    assert!(!std::path::Path::new(&format!("{root}/a")).exists());
    c.remove(&format!("{root}/moved.txt"), false).unwrap();
    assert!(c.exists(&root).unwrap());
    assert!(c.list_dir(&root).unwrap().is_empty());
}

#[test]
fn errors_name_the_path_and_kind() {
    let agent = Agent::start();
    let c = agent.client();
    let missing = agent.path("missing");
    for err in [
        c.read_file(&missing).unwrap_err(),
        c.stat(&missing).unwrap_err(),
        c.list_dir(&missing).unwrap_err(),
        c.remove(&missing, true).unwrap_err(),
        c.rename(&missing, &agent.path("x")).unwrap_err(),
    ] {
        assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
        assert!(err.to_string().contains(&missing), "{err}");
    }
    let err = c.read_file(agent.dir.path().to_str().unwrap()).unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::IsADirectory), "{err}");
    let err = c
        .write_file(&format!("{missing}/sub/file"), b"x", None)
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    // A path through a regular file.
    let f = agent.path("plain");
    c.write_file(&f, b"x", None).unwrap();
    assert!(!c.exists(&format!("{f}/below")).unwrap());
}

#[test]
fn large_directories_are_listed_in_pages() {
    let agent = Agent::start();
    let c = agent.client();
    let dir = agent.mkdir("many");
    for i in 0..2500 {
        std::fs::write(format!("{dir}/f{i:05}"), b"").unwrap();
    }
    // One page is bounded.
    match c
        .call(
            "list",
            Request::ListDir {
                path: dir.clone(),
                start: 0,
            },
        )
        .unwrap()
    {
        Response::DirEntries { entries, more } => {
            assert_eq!(entries.len(), kiln_proto::MAX_DIR_ENTRIES);
            assert!(more);
        }
        other => panic!("unexpected {other:?}"),
    }
    let all = c.list_dir(&dir).unwrap();
    assert_eq!(all.len(), 2500);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.name, format!("f{i:05}"));
    }
}

#[test]
fn post_restore_in_host_mode() {
    let agent = Agent::start();
    let c = agent.client();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    c.post_restore(now, vec![7; 64]).unwrap();
    let err = c
        .post_restore(now, vec![7; kiln_proto::MAX_SEED + 1])
        .unwrap_err();
    assert!(err.to_string().contains("PostRestore.seed"), "{err}");
}
