//! Fuzzes the snapshot state-file parser (kiln-vmm `snapshot::format::decode`, postcard and
//! `VmSnapshot::validate`). Each input is tried twice: as a whole state file (header checks,
//! lengths, checksum), and as a payload sealed with a correct header and SHA-256 so the
//! postcard decoder and the validation behind the checksum are reached. A payload that is
//! accepted must re-encode to a file that decodes and re-encodes to the same bytes.
#![no_main]

use kiln_vmm::snapshot::format::{
    decode, encode, KvmKind, Origin, FORMAT_VERSION, HEADER_LEN, KILN_VERSION, MAGIC, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

// Header layout (docs/SNAPSHOT.md).
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_KILN: usize = 16;
const OFF_KIND: usize = 48;
const OFF_VENDOR: usize = 52;
const OFF_PAYLOAD_LEN: usize = 64;
const OFF_DIGEST: usize = 72;

fn origin() -> Origin {
    Origin {
        kiln_version: KILN_VERSION.to_owned(),
        kvm_kind: KvmKind::Pvm,
        cpu_vendor: *b"GenuineIntel",
    }
}

fn seal(payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[OFF_KILN..OFF_KILN + KILN_VERSION.len()].copy_from_slice(KILN_VERSION.as_bytes());
    h[OFF_KIND] = 2;
    h[OFF_VENDOR..OFF_VENDOR + 12].copy_from_slice(b"GenuineIntel");
    h[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut d = Sha256::new();
    d.update(h);
    d.update(payload);
    let digest: [u8; 32] = d.finalize().into();
    h[OFF_DIGEST..OFF_DIGEST + 32].copy_from_slice(&digest);
    let mut f = h.to_vec();
    f.extend_from_slice(payload);
    f
}

fuzz_target!(|data: &[u8]| {
    let o = origin();
    let _ = decode(data, &o);
    // A whole file as input: its payload sealed again (a seed can be a real state file).
    let payload = if data.len() >= HEADER_LEN && data[..8] == MAGIC {
        &data[HEADER_LEN..]
    } else {
        data
    };
    if payload.len() as u64 > MAX_PAYLOAD {
        return;
    }
    if let Ok(snap) = decode(&seal(payload), &o) {
        let f = encode(&snap, &o).expect("an accepted snapshot encodes");
        let back = decode(&f, &o).expect("a re-encoded snapshot decodes");
        assert_eq!(
            encode(&back, &o).expect("encodes again"),
            f,
            "encoding is deterministic"
        );
    }
});
