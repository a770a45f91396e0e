//! The emulated-virtualization harness: QEMU (software mode, emulated AMD SVM) as L1 with
//! kvm-amd loaded, the host filesystem shared in, running one command and returning its status.

use std::time::Duration;

/// What to run inside L1.
#[derive(Debug, Default, Clone)]
pub struct HarnessOptions {
    /// argv of the command, run with the caller's working directory.
    pub command: Vec<String>,
    /// Give up (and fail) after this long; `None` = default.
    pub timeout: Option<Duration>,
    /// Extra environment passed to the command inside L1.
    pub env: Vec<(String, String)>,
}
