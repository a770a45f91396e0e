//! [`SandboxConfig`]: what a sandbox VM looks like (vCPUs, memory, guest kernel and initramfs,
//! extra kernel command line, boot deadline, name) and its validation.
//!
//! Validation happens before anything touches KVM, so a bad configuration fails fast with a
//! [`ConfigError`] that names the field, and missing guest assets name the xtask command that
//! builds them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most vCPUs a sandbox may have (the VMM's limit).
pub const MAX_VCPUS: u32 = kiln_vmm::vm::MAX_VCPUS as u32;
/// Least guest memory (MiB): the kernel plus the initramfs unpacked in RAM need about this.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most guest memory (MiB) (the VMM's limit).
pub const MAX_MEMORY_MIB: u32 = kiln_vmm::vm::MAX_MEM_MIB as u32;
/// Longest extra kernel command line (bytes); Linux's x86 limit for the whole line is 2048.
pub const MAX_EXTRA_CMDLINE: usize = 1024;
/// Longest sandbox name (bytes).
pub const MAX_NAME: usize = 64;

/// Default vCPU count.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest memory (MiB).
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default deadline from VM start to the agent's handshake. Generous: under software emulation
/// (the harness) a boot takes seconds.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default deadline of every non-exec request to the agent.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`SandboxConfig::consumer_deadline`].
pub const DEFAULT_CONSUMER_DEADLINE: Duration = Duration::from_secs(30);

/// Errors of configuration validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field is out of range or malformed.
    #[error("invalid sandbox configuration: {field}: {reason}")]
    Invalid {
        /// The field, e.g. `"vcpus"`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A guest asset (kernel or initramfs) does not exist or is not a file.
    #[error("guest {what} not found at {}: {hint}", path.display())]
    MissingAsset {
        /// `"kernel"` or `"initramfs"`.
        what: &'static str,
        /// The path looked at.
        path: PathBuf,
        /// What to run to build it.
        hint: &'static str,
    },
    /// The root-filesystem image cannot be used (unknown, corrupt, bad scratch disk...).
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The default asset location cannot be computed (no `$HOME`...).
    #[error("guest {what}: {source} (set {env} or KILN_ASSETS_DIR)")]
    AssetsDir {
        /// `"kernel"` or `"initramfs"`.
        what: &'static str,
        /// The override variable for this asset.
        env: &'static str,
        /// Why the default location is unknown.
        #[source]
        source: crate::assets::AssetsError,
    },
}

/// How to build the guest kernel.
pub const KERNEL_HINT: &str = "build it with `cargo xtask kernel && cargo xtask build-guest`";
/// How to build the initramfs.
pub const INITRAMFS_HINT: &str = "build it with `cargo xtask build-guest`";

/// The configuration of one sandbox VM. Build it with [`SandboxConfig::default`] and the
/// builder methods, or fill the public fields directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Name used in logs and error messages; `None` = `kiln-<pid>-<n>`.
    pub name: Option<String>,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest memory in MiB ([`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Guest kernel (ELF vmlinux); `None` = `crate::assets::default_kernel()`.
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (newc cpio); `None` = `crate::assets::default_initramfs()`.
    pub initramfs: Option<PathBuf>,
    /// Appended to the kernel command line the VMM builds (space separated, printable ASCII).
    pub extra_cmdline: String,
    /// Boot the guest kernel `quiet` (console log level 4: warnings, errors and panics still
    /// reach the serial console and its tail in error messages). Every console byte is a VM
    /// exit, so the full boot log costs boot time. `false`, or `loglevel=N` in
    /// [`extra_cmdline`](Self::extra_cmdline) (it comes later and wins), logs everything.
    pub quiet_kernel: bool,
    /// Deadline from VM start to the agent's `Hello`.
    pub boot_timeout: Duration,
    /// Deadline of every non-exec request (ping, file operations) and slack added to an exec's
    /// own timeout.
    pub request_timeout: Duration,
    /// How long the output of a request may wait unread in its full buffer (16 MiB) before
    /// that request fails with `ConsumerTooSlow` — meanwhile the guest is throttled and the
    /// other requests of the sandbox wait too. `Duration::MAX` waits as long as it takes: for
    /// a single consumer whose reader may pause at will, like `kiln run | less`.
    pub consumer_deadline: Duration,
    /// Disks (virtio-blk) passed to the VM as they are, the guest's /dev/vda, /dev/vdb, ...
    /// in this order (at most [`kiln_vmm::virtio::block::MAX_DISKS`]).
    pub disks: Vec<kiln_vmm::virtio::block::DiskConfig>,

    // --- root-filesystem image (crate::image, docs/IMAGES.md) ---
    /// Boot this image as the root file system: a name in the image store
    /// ([`crate::assets::images_dir`]) or an image file's path (starts with `/` or `.`, or
    /// ends in `.img`/`.ext4`/`.erofs`). It becomes the read-only /dev/vda (the [`disks`](Self::disks)
    /// follow it) under an overlay; its exec defaults apply to every exec.
    pub image: Option<String>,
    /// Size (MiB) of the tmpfs in guest RAM holding the overlay's writes; `None` = the
    /// kernel's default (half the guest RAM). Ignored with a [`scratch_disk`](Self::scratch_disk).
    pub overlay_size_mib: Option<u32>,
    /// A writable disk file holding the overlay's writes instead of RAM (formatted ext4 on the
    /// host when it has no ext4 file system). Its size is the scratch space.
    pub scratch_disk: Option<PathBuf>,
    /// Network egress through the host proxy (docs/EGRESS.md); `None` = no egress at all.
    /// Builders: [`SandboxConfig::egress`], [`SandboxConfig::secret`] (crate::egress).
    pub egress: Option<crate::egress::EgressSettings>,

    // --- jailed VMM process (kiln-jail, docs/SECURITY.md "The jailed VMM process") ---
    /// Run the VM in its own jailed `kiln-vm` process under this configuration (namespaces,
    /// pivot_root, cgroup v2, rlimits, an unprivileged uid, no capabilities); `None` = in this
    /// process (the default). Builders: [`SandboxConfig::jailed`], [`SandboxConfig::jail`].
    pub jail: Option<kiln_jail::JailConfig>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            name: None,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: None,
            initramfs: None,
            extra_cmdline: String::new(),
            quiet_kernel: true,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            consumer_deadline: DEFAULT_CONSUMER_DEADLINE,
            disks: Vec::new(),
            image: None,
            overlay_size_mib: None,
            scratch_disk: None,
            egress: None,
            jail: None,
        }
    }
}

impl SandboxConfig {
    /// The default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the VM in a jailed child process (with the default [`kiln_jail::JailConfig`]
    /// unless [`jail`](Self::jail) set one), or in this process (`false`, the default).
    pub fn jailed(mut self, jailed: bool) -> Self {
        self.jail = match (jailed, self.jail.take()) {
            (true, Some(j)) => Some(j),
            (true, None) => Some(kiln_jail::JailConfig::default()),
            (false, _) => None,
        };
        self
    }

    /// Runs the VM in a jailed child process configured by `jail`.
    pub fn jail(mut self, jail: kiln_jail::JailConfig) -> Self {
        self.jail = Some(jail);
        self
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets the guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the guest kernel path.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Sets the initramfs path.
    pub fn initramfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(path.into());
        self
    }

    /// Sets the extra kernel command line.
    pub fn extra_cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.extra_cmdline = cmdline.into();
        self
    }

    /// Sets the boot deadline.
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }

    /// Adds a disk backed by the file `path` (opened read-only when `read_only`).
    pub fn disk(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.disks
            .push(kiln_vmm::virtio::block::DiskConfig::new(path, read_only));
        self
    }

    /// Boots the image `name_or_path` as the root file system (see [`SandboxConfig::image`]).
    pub fn image(mut self, name_or_path: impl Into<String>) -> Self {
        self.image = Some(name_or_path.into());
        self
    }

    /// Sets the overlay tmpfs size in MiB (see [`SandboxConfig::overlay_size_mib`]).
    pub fn overlay_size_mib(mut self, mib: u32) -> Self {
        self.overlay_size_mib = Some(mib);
        self
    }

    /// Keeps the overlay's writes on the disk file `path` (see [`SandboxConfig::scratch_disk`]).
    pub fn scratch_disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.scratch_disk = Some(path.into());
        self
    }

    /// Sets whether the guest kernel boots `quiet` (see [`SandboxConfig::quiet_kernel`]).
    pub fn quiet_kernel(mut self, quiet: bool) -> Self {
        self.quiet_kernel = quiet;
        self
    }

    /// Sets the per-request deadline.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Sets how long unread output may block its request (see
    /// [`SandboxConfig::consumer_deadline`]).
    pub fn consumer_deadline(mut self, t: Duration) -> Self {
        self.consumer_deadline = t;
        self
    }

    /// Checks every field and resolves the asset paths (defaults, existence) and the image.
    pub fn validate(&self) -> Result<ResolvedConfig, ConfigError> {
        let mut r = self.validate_with(
            &|what| match what {
                Asset::Kernel => crate::assets::default_kernel(),
                Asset::Initramfs => crate::assets::default_initramfs(),
            },
            &host_mem_total_kib,
        )?;
        if let Some(name) = &self.image {
            let img = crate::image::resolve(name)?;
            self.apply_image(&mut r, img)?;
        }
        Ok(r)
    }

    /// Puts a resolved image into `r`: its disk first (then the scratch disk, then
    /// [`disks`](Self::disks)), the root-switch command line, the exec defaults.
    fn apply_image(
        &self,
        r: &mut ResolvedConfig,
        img: crate::image::ResolvedImage,
    ) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
        if self.overlay_size_mib == Some(0) {
            return Err(invalid(
                "overlay_size_mib",
                "must be greater than zero".into(),
            ));
        }
        if let Some(mib) = self.overlay_size_mib {
            if mib > self.memory_mib {
                return Err(invalid(
                    "overlay_size_mib",
                    format!(
                        "{mib} MiB is more than the guest memory ({} MiB)",
                        self.memory_mib
                    ),
                ));
            }
        }
        if let Some(s) = &self.scratch_disk {
            crate::image::prepare_scratch(s)?;
        }
        let (mut disks, cmdline) =
            crate::image::boot_parts(&img, self.overlay_size_mib, self.scratch_disk.as_deref());
        disks.append(&mut r.disks);
        if disks.len() > kiln_vmm::virtio::block::MAX_DISKS {
            return Err(invalid(
                "disks",
                format!(
                    "{} disks with the image's exceed the limit of {}",
                    disks.len(),
                    kiln_vmm::virtio::block::MAX_DISKS
                ),
            ));
        }
        r.disks = disks;
        r.extra_cmdline = if r.extra_cmdline.is_empty() {
            cmdline
        } else {
            // The caller's words come last: a `kiln.overlay=` of theirs wins.
            format!("{cmdline} {}", r.extra_cmdline)
        };
        r.exec_defaults = img.exec;
        Ok(())
    }

    /// Checks what [`Sandbox::restore`](crate::Sandbox::restore) uses of a configuration:
    /// the name (when set) and the deadlines (vCPUs, memory and the guest come from the
    /// snapshot, so they and the asset paths are not looked at).
    pub fn validate_for_restore(&self) -> Result<(), ConfigError> {
        self.check_deadlines()?;
        if let Some(n) = &self.name {
            check_name(n)?;
        }
        if let Some(e) = &self.egress {
            e.validate()?;
        }
        Ok(())
    }

    fn check_deadlines(&self) -> Result<(), ConfigError> {
        for (field, d) in [
            ("boot_timeout", self.boot_timeout),
            ("request_timeout", self.request_timeout),
            ("consumer_deadline", self.consumer_deadline),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be greater than zero".into(),
                });
            }
        }
        Ok(())
    }

    fn validate_with(
        &self,
        defaults: &dyn Fn(Asset) -> Result<PathBuf, crate::assets::AssetsError>,
        host_mem_kib: &dyn Fn() -> Option<u64>,
    ) -> Result<ResolvedConfig, ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is not in 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        // More guest RAM than the host has cannot be backed: refuse it instead of letting the
        // host swap or OOM-kill the VMM later. Unknown host memory is not checked.
        if let Some(total_kib) = host_mem_kib() {
            if u64::from(self.memory_mib) * 1024 > total_kib {
                return Err(invalid(
                    "memory_mib",
                    format!(
                        "{} MiB is more than this host's memory (MemTotal {} MiB in \
                         /proc/meminfo)",
                        self.memory_mib,
                        total_kib / 1024
                    ),
                ));
            }
        }
        self.check_deadlines()?;
        if self.extra_cmdline.len() > MAX_EXTRA_CMDLINE {
            return Err(invalid(
                "extra_cmdline",
                format!(
                    "{} bytes exceeds the limit of {MAX_EXTRA_CMDLINE}",
                    self.extra_cmdline.len()
                ),
            ));
        }
        if let Some(c) = self
            .extra_cmdline
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' '))
        {
            return Err(invalid(
                "extra_cmdline",
                format!("contains {c:?}; only printable ASCII and spaces are allowed"),
            ));
        }
        let name = match &self.name {
            Some(n) => check_name(n)?,
            None => default_name(),
        };
        if self.disks.len() > kiln_vmm::virtio::block::MAX_DISKS {
            return Err(invalid(
                "disks",
                format!(
                    "{} disks exceed the limit of {}",
                    self.disks.len(),
                    kiln_vmm::virtio::block::MAX_DISKS
                ),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            d.validate()
                .map_err(|e| invalid("disks", format!("disk {i}: {e}")))?;
        }
        if let Some(e) = &self.egress {
            e.validate()?;
        }
        if let Some(j) = &self.jail {
            j.validate().map_err(|reason| invalid("jail", reason))?;
        }
        let kernel = resolve_asset(self.kernel.as_deref(), Asset::Kernel, defaults)?;
        let initramfs = resolve_asset(self.initramfs.as_deref(), Asset::Initramfs, defaults)?;
        Ok(ResolvedConfig {
            name,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel,
            initramfs,
            extra_cmdline: match (self.quiet_kernel, self.extra_cmdline.trim()) {
                (true, "") => "quiet".to_owned(),
                (true, extra) => format!("quiet {extra}"),
                (false, extra) => extra.to_owned(),
            },
            boot_timeout: self.boot_timeout,
            request_timeout: self.request_timeout,
            consumer_deadline: self.consumer_deadline,
            disks: self.disks.clone(),
            exec_defaults: Default::default(),
            egress: self.egress.clone(),
            jail: self.jail.clone(),
        })
    }
}

/// A validated configuration: every path resolved and checked to be a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// The sandbox's name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Extra kernel command line (trimmed), after `quiet` when the kernel boots quiet.
    pub extra_cmdline: String,
    /// Boot deadline.
    pub boot_timeout: Duration,
    /// Request deadline.
    pub request_timeout: Duration,
    /// Unread-output deadline.
    pub consumer_deadline: Duration,
    /// Disks for the VM (with an image: the image's first, then a scratch disk).
    pub disks: Vec<kiln_vmm::virtio::block::DiskConfig>,
    /// The image's exec defaults (empty without an image).
    pub exec_defaults: crate::image::SandboxExecDefaults,
    /// Egress settings (checked).
    pub egress: Option<crate::egress::EgressSettings>,
    /// The jail (checked); `None` = the VM runs in this process.
    pub jail: Option<kiln_jail::JailConfig>,
}

/// Bytes of a kernel file read to recognise it: up to the bzImage header's `HdrS` magic.
const KERNEL_PROBE_BYTES: usize = 0x206;

impl ResolvedConfig {
    /// Checks what the guest files contain, as far as is cheap: the kernel must be an ELF
    /// vmlinux or a bzImage, the initramfs must not be empty. [`Sandbox::create`] calls it
    /// after [`SandboxConfig::validate`] (which only checks that the files exist) and before
    /// the host check, so a wrong file is reported as such and not as a boot failure.
    ///
    /// [`Sandbox::create`]: crate::Sandbox::create
    pub fn check_asset_contents(&self) -> Result<(), ConfigError> {
        check_kernel_image(&self.kernel)?;
        let invalid = |reason: String| ConfigError::Invalid {
            field: "initramfs",
            reason,
        };
        let len = std::fs::metadata(&self.initramfs)
            .map_err(|e| invalid(format!("{}: {e}", self.initramfs.display())))?
            .len();
        if len == 0 {
            return Err(invalid(format!("{} is empty", self.initramfs.display())));
        }
        Ok(())
    }
}

/// Refuses a kernel file that is empty or neither an ELF file nor a bzImage.
fn check_kernel_image(path: &Path) -> Result<(), ConfigError> {
    use std::io::Read;
    let invalid = |reason: String| ConfigError::Invalid {
        field: "kernel",
        reason,
    };
    let io_err = |e: std::io::Error| invalid(format!("{}: {e}", path.display()));
    let mut head = Vec::with_capacity(KERNEL_PROBE_BYTES);
    std::fs::File::open(path)
        .and_then(|f| f.take(KERNEL_PROBE_BYTES as u64).read_to_end(&mut head))
        .map_err(io_err)?;
    if head.is_empty() {
        return Err(invalid(format!("{} is empty", path.display())));
    }
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if !(elf || bzimage) {
        return Err(invalid(format!(
            "{} is not a kernel image (neither an ELF vmlinux nor a bzImage)",
            path.display()
        )));
    }
    Ok(())
}

/// Which guest asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asset {
    Kernel,
    Initramfs,
}

impl Asset {
    fn what(self) -> &'static str {
        match self {
            Asset::Kernel => "kernel",
            Asset::Initramfs => "initramfs",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Asset::Kernel => "KILN_KERNEL",
            Asset::Initramfs => "KILN_INITRAMFS",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Asset::Kernel => KERNEL_HINT,
            Asset::Initramfs => INITRAMFS_HINT,
        }
    }
}

fn resolve_asset(
    explicit: Option<&Path>,
    asset: Asset,
    defaults: &dyn Fn(Asset) -> Result<PathBuf, crate::assets::AssetsError>,
) -> Result<PathBuf, ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => defaults(asset).map_err(|source| ConfigError::AssetsDir {
            what: asset.what(),
            env: asset.env(),
            source,
        })?,
    };
    if path.is_dir() {
        return Err(ConfigError::Invalid {
            field: asset.what(),
            reason: format!("{} is a directory, not a file", path.display()),
        });
    }
    if !path.is_file() {
        return Err(ConfigError::MissingAsset {
            what: asset.what(),
            path,
            hint: asset.hint(),
        });
    }
    Ok(path)
}

/// The host's `MemTotal` (KiB) from /proc/meminfo; `None` when it cannot be read.
fn host_mem_total_kib() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The `MemTotal:` line of a /proc/meminfo text, in KiB.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let rest = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = rest.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(kib),
        Some(_) => None,
    }
}

/// A valid sandbox name: 1..=[`MAX_NAME`] bytes of `[A-Za-z0-9._-]`.
fn check_name(n: &str) -> Result<String, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "name",
        reason,
    };
    if n.is_empty() || n.len() > MAX_NAME {
        return Err(invalid(format!(
            "must be 1..={MAX_NAME} bytes, got {}",
            n.len()
        )));
    }
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(format!(
            "contains {c:?}; use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(n.to_owned())
}

fn default_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "kiln-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_assets() -> (tempfile::TempDir, SandboxConfig) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let i = dir.path().join("initramfs.cpio");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let cfg = SandboxConfig::new().kernel(k).initramfs(i);
        (dir, cfg)
    }

    fn field_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate_with_existing_assets() {
        let (_d, cfg) = with_assets();
        let r = cfg.validate().unwrap();
        assert_eq!(r.vcpus, DEFAULT_VCPUS);
        assert_eq!(r.memory_mib, DEFAULT_MEMORY_MIB);
        assert!(r.name.starts_with(&format!("kiln-{}-", std::process::id())));
    }

    #[test]
    fn the_kernel_boots_quiet_unless_asked_and_user_words_come_after() {
        let (_d, cfg) = with_assets();
        assert_eq!(cfg.clone().validate().unwrap().extra_cmdline, "quiet");
        assert_eq!(
            cfg.clone()
                .extra_cmdline(" loglevel=7 ")
                .validate()
                .unwrap()
                .extra_cmdline,
            "quiet loglevel=7",
            "a later loglevel= overrides quiet"
        );
        assert_eq!(
            cfg.quiet_kernel(false)
                .extra_cmdline("a=b")
                .validate()
                .unwrap()
                .extra_cmdline,
            "a=b"
        );
    }

    #[test]
    fn disks_pass_through_and_are_bounded() {
        let (_d, cfg) = with_assets();
        let r = cfg
            .clone()
            .disk("/a.img", true)
            .disk("/b.img", false)
            .validate()
            .unwrap();
        assert_eq!(
            r.disks,
            vec![
                kiln_vmm::virtio::block::DiskConfig::new("/a.img", true),
                kiln_vmm::virtio::block::DiskConfig::new("/b.img", false),
            ]
        );
        let mut many = cfg.clone();
        for _ in 0..=kiln_vmm::virtio::block::MAX_DISKS {
            many = many.disk("/a.img", true);
        }
        assert_eq!(field_of(many.validate().unwrap_err()), "disks");
        let mut bad = cfg.disk("/a.img", true);
        bad.disks[0].id = Some("x".repeat(21));
        assert_eq!(field_of(bad.validate().unwrap_err()), "disks");
    }

    #[test]
    fn default_names_are_unique() {
        assert_ne!(default_name(), default_name());
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let (_d, cfg) = with_assets();
        assert_eq!(
            field_of(cfg.clone().vcpus(0).validate().unwrap_err()),
            "vcpus"
        );
        assert_eq!(
            field_of(cfg.clone().vcpus(MAX_VCPUS + 1).validate().unwrap_err()),
            "vcpus"
        );
        assert_eq!(
            field_of(cfg.clone().memory_mib(8).validate().unwrap_err()),
            "memory_mib"
        );
        assert_eq!(
            field_of(
                cfg.clone()
                    .boot_timeout(Duration::ZERO)
                    .validate()
                    .unwrap_err()
            ),
            "boot_timeout"
        );
        assert_eq!(
            field_of(
                cfg.clone()
                    .consumer_deadline(Duration::ZERO)
                    .validate()
                    .unwrap_err()
            ),
            "consumer_deadline"
        );
        assert_eq!(
            cfg.clone()
                .consumer_deadline(Duration::MAX)
                .validate()
                .unwrap()
                .consumer_deadline,
            Duration::MAX,
            "waiting without a deadline is a valid choice"
        );
        assert_eq!(
            field_of(cfg.clone().extra_cmdline("a\nb").validate().unwrap_err()),
            "extra_cmdline"
        );
        assert_eq!(
            field_of(
                cfg.clone()
                    .extra_cmdline("x".repeat(MAX_EXTRA_CMDLINE + 1))
                    .validate()
                    .unwrap_err()
            ),
            "extra_cmdline"
        );
        assert_eq!(
            field_of(cfg.clone().name("a b").validate().unwrap_err()),
            "name"
        );
        assert_eq!(field_of(cfg.name("").validate().unwrap_err()), "name");
    }

    #[test]
    fn missing_assets_name_the_xtask_command() {
        let (dir, cfg) = with_assets();
        let missing = dir.path().join("nope");
        let e = cfg.clone().kernel(&missing).validate().unwrap_err();
        let msg = e.to_string();
        assert!(matches!(
            e,
            ConfigError::MissingAsset { what: "kernel", .. }
        ));
        assert!(msg.contains("cargo xtask kernel"), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        let e = cfg.initramfs(&missing).validate().unwrap_err();
        assert!(e.to_string().contains("cargo xtask build-guest"));
    }

    #[test]
    fn guest_memory_beyond_the_host_is_refused() {
        let (dir, _) = with_assets();
        let base = dir.path().to_path_buf();
        let lookup = move |a: Asset| -> Result<PathBuf, crate::assets::AssetsError> {
            Ok(base.join(match a {
                Asset::Kernel => "vmlinux",
                Asset::Initramfs => "initramfs.cpio",
            }))
        };
        // A 24 GiB host, as /proc/meminfo says it.
        let meminfo = "MemTotal:       25165824 kB\nMemFree:         1000000 kB\n";
        let host = || parse_mem_total(meminfo);
        assert_eq!(host(), Some(24 << 20));
        let e = SandboxConfig::new()
            .memory_mib(65536)
            .validate_with(&lookup, &host)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("65536 MiB"), "{msg}");
        assert!(msg.contains("MemTotal 24576 MiB"), "{msg}");
        assert_eq!(field_of(e), "memory_mib");
        // Up to all of it is accepted; unknown host memory is not checked.
        let all = SandboxConfig::new().memory_mib(24576);
        all.validate_with(&lookup, &host).unwrap();
        SandboxConfig::new()
            .memory_mib(65536)
            .validate_with(&lookup, &|| None)
            .unwrap();
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn restore_configurations_check_deadlines_and_name_only() {
        // No assets anywhere: a restore does not need them.
        let cfg = SandboxConfig::new().kernel("/nonexistent/k").memory_mib(1);
        cfg.validate_for_restore().unwrap();
        for (bad, field) in [
            (
                cfg.clone().consumer_deadline(Duration::ZERO),
                "consumer_deadline",
            ),
            (
                cfg.clone().request_timeout(Duration::ZERO),
                "request_timeout",
            ),
            (cfg.clone().boot_timeout(Duration::ZERO), "boot_timeout"),
            (cfg.clone().name("a b"), "name"),
        ] {
            assert_eq!(field_of(bad.validate_for_restore().unwrap_err()), field);
        }
    }

    #[test]
    fn a_directory_is_not_a_guest_file() {
        let (dir, cfg) = with_assets();
        for (e, field) in [
            (cfg.clone().kernel(dir.path()).validate(), "kernel"),
            (cfg.initramfs(dir.path()).validate(), "initramfs"),
        ] {
            let e = e.unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("is a directory"), "{msg}");
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            assert_eq!(field_of(e), field);
        }
    }

    #[test]
    fn asset_contents_are_checked() {
        let (dir, cfg) = with_assets();
        let k = dir.path().join("vmlinux");
        let i = dir.path().join("initramfs.cpio");
        let check = |c: &SandboxConfig| c.validate().unwrap().check_asset_contents();
        // The stand-in "k" is no kernel.
        let e = check(&cfg).unwrap_err();
        assert!(e.to_string().contains("is not a kernel image"), "{e}");
        assert_eq!(field_of(e), "kernel");
        std::fs::write(&k, b"").unwrap();
        let e = check(&cfg).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        assert_eq!(field_of(e), "kernel");
        // An ELF header, and a bzImage's `HdrS` at 0x202, pass.
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        check(&cfg).unwrap();
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&k, &bz).unwrap();
        check(&cfg).unwrap();
        std::fs::write(&i, b"").unwrap();
        let e = check(&cfg).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        assert_eq!(field_of(e), "initramfs");
    }

    #[test]
    fn defaults_come_from_the_lookup() {
        let (dir, _) = with_assets();
        let base = dir.path().to_path_buf();
        let lookup = move |a: Asset| -> Result<PathBuf, crate::assets::AssetsError> {
            Ok(base.join(match a {
                Asset::Kernel => "vmlinux",
                Asset::Initramfs => "initramfs.cpio",
            }))
        };
        let r = SandboxConfig::new()
            .validate_with(&lookup, &|| None)
            .unwrap();
        assert_eq!(r.kernel, dir.path().join("vmlinux"));
        assert_eq!(r.initramfs, dir.path().join("initramfs.cpio"));
        let no_home = |_a: Asset| -> Result<PathBuf, crate::assets::AssetsError> {
            Err(crate::assets::AssetsError::NoAssetsDir)
        };
        let e = SandboxConfig::new()
            .validate_with(&no_home, &|| None)
            .unwrap_err();
        assert!(e.to_string().contains("KILN_KERNEL"), "{e}");
    }
}
