//! Tier-4: the file methods of the `kiln` API against a real guest — write/read, list, stat,
//! mkdir, rename, exists, remove, typed errors — and a 200 MB file written and read back with
//! matching sha256 on both sides.

mod sandbox_common;

use std::io::Write;

use kiln::{ErrorKind, FileKind};
use sandbox_common::{hex, sandbox, PatternReader};
use sha2::{Digest, Sha256};

#[test]
fn file_operations_round_trip() {
    kiln_tests::require_tier4();
    let sb = sandbox("files-ops", 256, 1);
    sb.mkdir("/tmp/kt/a/b").unwrap();
    assert!(sb.file_exists("/tmp/kt/a/b").unwrap());
    assert_eq!(sb.stat("/tmp/kt/a/b").unwrap().kind, FileKind::Dir);

    sb.write_file("/tmp/kt/a/hello.txt", b"hello\n").unwrap();
    assert_eq!(sb.read_file("/tmp/kt/a/hello.txt").unwrap(), b"hello\n");
    let st = sb.stat("/tmp/kt/a/hello.txt").unwrap();
    assert_eq!((st.kind, st.size), (FileKind::File, 6));
    // The guest's own tools see what the API wrote.
    let r = sb.exec(&["cat", "/tmp/kt/a/hello.txt"]).unwrap();
    assert_eq!(r.stdout, b"hello\n");

    let names: Vec<String> = sb
        .list_dir("/tmp/kt/a")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["b", "hello.txt"]);

    sb.rename("/tmp/kt/a/hello.txt", "/tmp/kt/a/b/moved.txt")
        .unwrap();
    assert!(!sb.file_exists("/tmp/kt/a/hello.txt").unwrap());
    assert_eq!(sb.read_file("/tmp/kt/a/b/moved.txt").unwrap(), b"hello\n");

    // Typed errors from the guest.
    let e = sb.read_file("/tmp/kt/none").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("files-ops"), "{e}");
    let e = sb.remove_file("/tmp/kt/a").unwrap_err();
    assert_eq!(e.guest_kind(), Some(ErrorKind::DirectoryNotEmpty), "{e}");

    sb.remove_file("/tmp/kt/a/b/moved.txt").unwrap();
    sb.remove_all("/tmp/kt").unwrap();
    assert!(!sb.file_exists("/tmp/kt").unwrap());
}

#[test]
fn two_hundred_mb_file_round_trip_with_matching_sha256() {
    kiln_tests::require_tier4();
    const LEN: u64 = 200_000_000;
    // The file lives in the guest's RAM (tmpfs), with room to spare.
    let sb = sandbox("files-200mb", 1024, 1);

    let mut h = Sha256::new();
    std::io::copy(&mut PatternReader::new(2024, LEN), &mut h).unwrap();
    let want = hex(&h.finalize());

    let written = sb
        .write_file_from("/tmp/big.bin", &mut PatternReader::new(2024, LEN))
        .unwrap();
    assert_eq!(written, LEN);
    assert_eq!(sb.stat("/tmp/big.bin").unwrap().size, LEN);

    // The guest computes the same digest...
    let r = sb
        .exec(&["sh", "-c", "sha256sum /tmp/big.bin | cut -d' ' -f1"])
        .unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(r.stdout_str().trim(), want, "digest in the guest");

    // ...and reading it back yields it too.
    struct HashWriter(Sha256, u64);
    impl Write for HashWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            self.1 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Sha256::new(), 0);
    let read = sb.read_file_to("/tmp/big.bin", &mut w).unwrap();
    assert_eq!((read, w.1), (LEN, LEN));
    assert_eq!(hex(&w.0.finalize()), want, "digest read back");
}
