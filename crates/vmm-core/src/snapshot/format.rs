//! The state file: a fixed 128-byte header followed by the payload (a [`VmSnapshot`]
//! encoded with postcard), protected by SHA-256.
//!
//! Header layout (little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KILNSNAP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | header length (128) |
//! | 16 | 32 | Kiln version that wrote the file (UTF-8, NUL padded) |
//! | 48 | 1 | KVM kind: 1 hardware virtualization, 2 PVM |
//! | 49 | 3 | reserved, zero |
//! | 52 | 12 | CPU vendor (CPUID leaf 0, e.g. `GenuineIntel`) |
//! | 64 | 8 | payload length |
//! | 72 | 32 | SHA-256 over the header (this field zeroed) and the payload |
//! | 104 | 24 | reserved, zero |
//!
//! [`decode`] checks, in order: length of the header, magic, format version, Kiln version,
//! KVM kind, CPU vendor, payload length against the file (truncation), the digest, then
//! decodes and [`VmSnapshot::validate`]s the payload. Any failure is a typed error; nothing
//! is built from a file that did not pass every step.

use std::fmt;

use sha2::{Digest, Sha256};

use super::state::VmSnapshot;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";
/// The state file layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 128;
/// Largest payload accepted (a VM of 8 vCPUs needs well under 1 MiB).
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// The Kiln version written into (and required of) state files.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_KILN: usize = 16;
const KILN_LEN: usize = 32;
const OFF_KIND: usize = 48;
const OFF_VENDOR: usize = 52;
const OFF_PAYLOAD_LEN: usize = 64;
const OFF_DIGEST: usize = 72;
const DIGEST_LEN: usize = 32;

/// Which KVM a snapshot was taken on. State from one does not load on the other (PVM guests
/// run with different MSRs and paging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// KVM on VMX or SVM.
    Hardware,
    /// kvm-pvm.
    Pvm,
}

impl KvmKind {
    fn to_byte(self) -> u8 {
        match self {
            KvmKind::Hardware => 1,
            KvmKind::Pvm => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(KvmKind::Hardware),
            2 => Some(KvmKind::Pvm),
            _ => None,
        }
    }

    /// This host's kind (detected once per process), `None` without usable KVM.
    pub fn current() -> Option<KvmKind> {
        static KIND: std::sync::OnceLock<Option<KvmKind>> = std::sync::OnceLock::new();
        *KIND.get_or_init(|| match crate::host::detect() {
            crate::host::HostKind::HardwareVirt { .. } => Some(KvmKind::Hardware),
            crate::host::HostKind::Pvm => Some(KvmKind::Pvm),
            crate::host::HostKind::NoKvm { .. } => None,
        })
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmKind::Hardware => f.write_str("hardware KVM (VMX/SVM)"),
            KvmKind::Pvm => f.write_str("kvm-pvm"),
        }
    }
}

/// This CPU's vendor string from CPUID leaf 0.
pub fn cpu_vendor() -> [u8; 12] {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 exists on every x86_64 CPU and has no side effects.
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
        v
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        [0u8; 12]
    }
}

/// What a state file's header says about where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Kiln version.
    pub kiln_version: String,
    /// KVM kind.
    pub kvm_kind: KvmKind,
    /// CPU vendor string.
    pub cpu_vendor: [u8; 12],
}

impl Origin {
    /// This process: its Kiln version, the host's KVM kind and CPU vendor.
    pub fn current(kvm_kind: KvmKind) -> Self {
        Origin {
            kiln_version: KILN_VERSION.to_owned(),
            kvm_kind,
            cpu_vendor: cpu_vendor(),
        }
    }
}

/// Why a state file was refused (the caller adds the path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header or than the payload length the header gives.
    #[error("truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// Longer than header + payload.
    #[error("{extra} unexpected bytes after the payload")]
    TrailingBytes {
        /// Extra bytes.
        extra: u64,
    },
    /// Not a Kiln state file.
    #[error("not a Kiln snapshot state file (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("state file format version {found}, this Kiln reads version {supported}")]
    FormatVersion {
        /// In the file.
        found: u32,
        /// What we read.
        supported: u32,
    },
    /// Written by another Kiln version.
    #[error("written by Kiln {found}, this is Kiln {current}")]
    KilnVersion {
        /// In the file.
        found: String,
        /// This build.
        current: String,
    },
    /// Taken on another KVM kind.
    #[error("taken on {found}, this host has {current}")]
    KvmKind {
        /// In the file (`None`: an unknown code).
        found: String,
        /// This host.
        current: KvmKind,
    },
    /// Taken on another CPU vendor.
    #[error("taken on a {found} CPU, this host has {current}")]
    CpuVendor {
        /// In the file.
        found: String,
        /// This host.
        current: String,
    },
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// Claimed length.
        len: u64,
    },
    /// The digest does not match.
    #[error("checksum mismatch (SHA-256): the file is corrupted")]
    Checksum,
    /// Header fields that must be fixed are not.
    #[error("malformed header: {0}")]
    Header(String),
    /// The payload fails validation.
    #[error("invalid payload: {0}")]
    Payload(String),
    /// The payload does not encode or decode.
    #[error("invalid payload: {0}")]
    Encoding(#[source] postcard::Error),
}

fn digest(header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; DIGEST_LEN] {
    let mut h = *header;
    h[OFF_DIGEST..OFF_DIGEST + DIGEST_LEN].fill(0);
    let mut d = Sha256::new();
    d.update(h);
    d.update(payload);
    d.finalize().into()
}

/// Encodes `snap` as a complete state file.
pub fn encode(snap: &VmSnapshot, origin: &Origin) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(snap).map_err(FormatError::Encoding)?;
    let len = payload.len() as u64;
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge { len });
    }
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    let v = origin.kiln_version.as_bytes();
    if v.len() > KILN_LEN {
        return Err(FormatError::Header(format!(
            "Kiln version {:?} longer than {KILN_LEN} bytes",
            origin.kiln_version
        )));
    }
    h[OFF_KILN..OFF_KILN + v.len()].copy_from_slice(v);
    h[OFF_KIND] = origin.kvm_kind.to_byte();
    h[OFF_VENDOR..OFF_VENDOR + 12].copy_from_slice(&origin.cpu_vendor);
    h[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&len.to_le_bytes());
    let d = digest(&h, &payload);
    h[OFF_DIGEST..OFF_DIGEST + DIGEST_LEN].copy_from_slice(&d);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn vendor_str(v: &[u8]) -> String {
    String::from_utf8_lossy(v).trim_end_matches('\0').to_owned()
}

/// Checks a whole state file against `expect` (this process's origin) and decodes it.
pub fn decode(file: &[u8], expect: &Origin) -> Result<VmSnapshot, FormatError> {
    let found = file.len() as u64;
    if file.len() < HEADER_LEN {
        // Too short for a header: say "not a snapshot" if even the magic is wrong.
        if file.len() >= 8 && file[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::Truncated {
            expected: HEADER_LEN as u64,
            found,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&file[..HEADER_LEN]);
    if h[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32_at(&h, OFF_VERSION);
    if version != FORMAT_VERSION {
        return Err(FormatError::FormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let hl = u32_at(&h, OFF_HEADER_LEN);
    if hl as usize != HEADER_LEN {
        return Err(FormatError::Header(format!(
            "header length {hl}, expected {HEADER_LEN}"
        )));
    }
    let kiln = String::from_utf8_lossy(&h[OFF_KILN..OFF_KILN + KILN_LEN])
        .trim_end_matches('\0')
        .to_owned();
    if kiln != expect.kiln_version {
        return Err(FormatError::KilnVersion {
            found: kiln,
            current: expect.kiln_version.clone(),
        });
    }
    match KvmKind::from_byte(h[OFF_KIND]) {
        Some(k) if k == expect.kvm_kind => {}
        other => {
            return Err(FormatError::KvmKind {
                found: other.map_or_else(
                    || format!("unknown KVM kind {}", h[OFF_KIND]),
                    |k| k.to_string(),
                ),
                current: expect.kvm_kind,
            })
        }
    }
    if h[OFF_VENDOR..OFF_VENDOR + 12] != expect.cpu_vendor {
        return Err(FormatError::CpuVendor {
            found: vendor_str(&h[OFF_VENDOR..OFF_VENDOR + 12]),
            current: vendor_str(&expect.cpu_vendor),
        });
    }
    let len = u64_at(&h, OFF_PAYLOAD_LEN);
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge { len });
    }
    let expected = HEADER_LEN as u64 + len;
    if found < expected {
        return Err(FormatError::Truncated { expected, found });
    }
    if found > expected {
        return Err(FormatError::TrailingBytes {
            extra: found - expected,
        });
    }
    let payload = &file[HEADER_LEN..];
    if digest(&h, payload)[..] != h[OFF_DIGEST..OFF_DIGEST + DIGEST_LEN] {
        return Err(FormatError::Checksum);
    }
    let snap: VmSnapshot = postcard::from_bytes(payload).map_err(FormatError::Encoding)?;
    snap.validate().map_err(FormatError::Payload)?;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::state::tests::sample;

    fn origin() -> Origin {
        Origin {
            kiln_version: KILN_VERSION.into(),
            kvm_kind: KvmKind::Pvm,
            cpu_vendor: *b"GenuineIntel",
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let s = sample(256, 2);
        let f = encode(&s, &origin()).unwrap();
        assert_eq!(&f[..8], b"KILNSNAP");
        let back = decode(&f, &origin()).unwrap();
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.rip, 0x1001);
        assert_eq!(back.vcpus[0].msrs[0].data, 42);
        assert_eq!(back.snapshot_id, s.snapshot_id);
        assert_eq!(back.regions, s.regions);
        assert_eq!(back.serial, s.serial);
        // Deterministic: the same state encodes to the same bytes.
        assert_eq!(encode(&back, &origin()).unwrap(), f);
    }

    #[test]
    fn every_truncation_is_refused_as_truncated() {
        let f = encode(&sample(64, 1), &origin()).unwrap();
        for cut in [
            0,
            1,
            8,
            64,
            HEADER_LEN - 1,
            HEADER_LEN,
            f.len() / 2,
            f.len() - 1,
        ] {
            match decode(&f[..cut], &origin()) {
                Err(FormatError::Truncated { expected, found }) => {
                    assert_eq!(found, cut as u64);
                    assert!(expected > found);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let mut long = f.clone();
        long.push(0);
        assert_eq!(
            decode(&long, &origin()).unwrap_err(),
            FormatError::TrailingBytes { extra: 1 }
        );
    }

    #[test]
    fn any_flipped_payload_or_header_byte_is_refused() {
        let f = encode(&sample(64, 1), &origin()).unwrap();
        // Every payload byte, and the header bytes not checked field by field.
        let positions = (HEADER_LEN..f.len())
            .chain(OFF_DIGEST..HEADER_LEN)
            .chain(49..52);
        for i in positions {
            let mut g = f.clone();
            g[i] ^= 0x01;
            assert_eq!(
                decode(&g, &origin()).unwrap_err(),
                FormatError::Checksum,
                "byte {i}"
            );
        }
    }

    #[test]
    fn foreign_origins_are_refused_with_what_differs() {
        let f = encode(&sample(64, 1), &origin()).unwrap();
        let mut o = origin();
        o.kiln_version = "9.9.9".into();
        match decode(&f, &o).unwrap_err() {
            FormatError::KilnVersion { found, current } => {
                assert_eq!(found, KILN_VERSION);
                assert_eq!(current, "9.9.9");
            }
            e => panic!("{e:?}"),
        }
        let mut o = origin();
        o.kvm_kind = KvmKind::Hardware;
        let e = decode(&f, &o).unwrap_err();
        assert!(matches!(e, FormatError::KvmKind { .. }), "{e:?}");
        assert!(e.to_string().contains("kvm-pvm"), "{e}");
        let mut o = origin();
        o.cpu_vendor = *b"AuthenticAMD";
        let e = decode(&f, &o).unwrap_err();
        assert!(e.to_string().contains("GenuineIntel"), "{e}");

        let mut g = f.clone();
        g[OFF_VERSION] = 2;
        assert_eq!(
            decode(&g, &origin()).unwrap_err(),
            FormatError::FormatVersion {
                found: 2,
                supported: 1
            }
        );
        let mut g = f.clone();
        g[0] = b'X';
        assert_eq!(decode(&g, &origin()).unwrap_err(), FormatError::BadMagic);
        assert_eq!(
            decode(b"#!/bin/sh\necho not a snapshot\n", &origin()).unwrap_err(),
            FormatError::BadMagic
        );
        let mut g = f.clone();
        g[OFF_KIND] = 9;
        assert!(decode(&g, &origin())
            .unwrap_err()
            .to_string()
            .contains("unknown KVM kind 9"));
        let mut g = f;
        g[OFF_PAYLOAD_LEN + 7] = 0xff;
        assert!(matches!(
            decode(&g, &origin()).unwrap_err(),
            FormatError::TooLarge { .. }
        ));
    }

    #[test]
    fn checksummed_but_invalid_payload_is_refused() {
        let mut s = sample(64, 1);
        s.memory_file_len = 1;
        let f = encode(&s, &origin()).unwrap();
        match decode(&f, &origin()).unwrap_err() {
            FormatError::Payload(m) => assert!(m.contains("memory file length"), "{m}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn vendor_is_twelve_printable_bytes() {
        let v = cpu_vendor();
        assert!(v.iter().all(|b| b.is_ascii_graphic()), "{v:?}");
    }
}
