//! [`ConnWriter`]: the write half of one kiln-proto connection, shared by the connection's
//! reader ([`crate::conn`]) and the exec workers ([`crate::exec`]) that stream output on it.
//! A leaf module, so neither of those imports the other for it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kiln_proto::{encode_frame, ErrorKind, Message, Response};

/// The write half of a connection. Sends whole frames; remembers when the peer is gone.
pub struct ConnWriter {
    w: Mutex<Box<dyn Write + Send>>,
    alive: AtomicBool,
}

impl std::fmt::Debug for ConnWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnWriter")
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl ConnWriter {
    /// Wrap a stream's write half.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self {
            w: Mutex::new(w),
            alive: AtomicBool::new(true),
        }
    }

    /// Send one response; false when the connection is gone.
    pub fn send(&self, id: u64, body: Response) -> bool {
        self.send_msg(&Message::Response { id, body })
    }

    /// Send one message (the `Hello`, or a response); false when the connection is gone.
    pub fn send_msg(&self, msg: &Message) -> bool {
        if !self.is_alive() {
            return false;
        }
        let frame = match encode_frame(msg) {
            Ok(f) => f,
            Err(e) => {
                // Only an over-large message can fail to encode; answer with an error instead.
                let Message::Response { id, .. } = msg else {
                    return false;
                };
                match encode_frame(&Message::Response {
                    id: *id,
                    body: Response::error(ErrorKind::TooLarge, e.to_string()),
                }) {
                    Ok(f) => f,
                    Err(_) => return false,
                }
            }
        };
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        if w.write_all(&frame).and_then(|()| w.flush()).is_err() {
            self.alive.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// False once a write failed or the reader saw the end of the connection.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Marks the connection gone (the reader saw its end).
    pub fn mark_dead(&self) {
        self.alive.store(false, Ordering::Release);
    }
}
