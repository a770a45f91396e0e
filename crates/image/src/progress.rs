//! Progress reporting: the long operations call a [`Progress`] callback; the CLI turns the
//! events into indicatif bars or log lines.

/// One progress event.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A new step started (`resolving packages`, `applying layer 2/3`, `mkfs.erofs`).
    Step(&'a str),
    /// Bytes of a download so far; `total` when known.
    Bytes {
        what: &'a str,
        done: u64,
        total: Option<u64>,
    },
    /// A line of a tool's output (mmdebstrap's `I:` lines).
    Log(&'a str),
    /// Finished; the image is stored (or was already).
    Done { key: &'a str, cached: bool },
}

/// Receives progress events. `&mut |_| {}` is a silent one.
pub type Progress<'a> = &'a mut dyn FnMut(Event<'_>);
