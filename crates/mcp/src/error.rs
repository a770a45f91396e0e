//! What a tool call can fail with ([`ToolError`]) and how it reaches the client: every
//! failure is an MCP *tool error* (`isError: true` with a text naming what was wrong), never a
//! protocol error, so the model sees the message. Malformed arguments (a missing field, a
//! wrong type) are rejected by rmcp before a tool runs, also as a tool error
//! (`failed to deserialize parameters: ...`).

use kiln::SandboxError;
use rmcp::model::{CallToolResult, ContentBlock};

/// A failed tool call.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// No live sandbox has this id (never created, killed, or expired).
    #[error("unknown sandbox id {id:?}: {hint}")]
    UnknownSandbox {
        /// The id the client sent.
        id: String,
        /// The live ids, or how to get one.
        hint: String,
    },
    /// The server's bound on live sandboxes is reached.
    #[error(
        "too many sandboxes: {live} of at most {max} are live; kill one with kill_sandbox first"
    )]
    TooManySandboxes {
        /// Live (and booting) sandboxes.
        live: usize,
        /// The bound (`kiln mcp --max-sandboxes`).
        max: usize,
    },
    /// An argument is out of range or malformed.
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `run_python` in a sandbox without `python3`.
    #[error(
        "python3 is not installed in sandbox {id:?}; create the sandbox with image \"python\""
    )]
    NoPython {
        /// The sandbox.
        id: String,
    },
    /// The sandbox (the `kiln` library) failed.
    #[error("sandbox {id:?}: {source}")]
    Sandbox {
        /// The sandbox's MCP id.
        id: String,
        /// The library's error (boxed: it is large).
        #[source]
        source: Box<SandboxError>,
    },
    /// A blocking task of the server failed (panicked or was cancelled).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ToolError {
    /// Shorthand for [`ToolError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ToolError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The message a client sees: the error without the guest's serial console tail, which
    /// is for the server's log.
    pub fn client_message(&self) -> String {
        let m = self.to_string();
        match m.find("\n--- last serial console output") {
            Some(i) => m[..i].trim_end().to_string(),
            None => m,
        }
    }

    /// The MCP tool error result (`isError: true`, one text block).
    pub fn into_result(self) -> CallToolResult {
        if let ToolError::Sandbox { source, .. } = &self {
            tracing::warn!(error = %source, "tool call failed");
        }
        CallToolResult::error(vec![ContentBlock::text(self.client_message())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_was_wrong() {
        let e = ToolError::UnknownSandbox {
            id: "sb-9".into(),
            hint: "live sandboxes: sb-1".into(),
        };
        assert_eq!(
            e.client_message(),
            "unknown sandbox id \"sb-9\": live sandboxes: sb-1"
        );
        let r = e.into_result();
        assert_eq!(r.is_error, Some(true));
        let text = r.content[0].as_text().map(|t| t.text.clone());
        assert_eq!(
            text.as_deref(),
            Some("unknown sandbox id \"sb-9\": live sandboxes: sb-1")
        );
        let e = ToolError::TooManySandboxes { live: 4, max: 4 };
        assert!(e.to_string().contains("4 of at most 4"), "{e}");
        let e = ToolError::invalid("timeout_secs", "must be 1..=3600");
        assert_eq!(
            e.to_string(),
            "invalid argument timeout_secs: must be 1..=3600"
        );
    }

    #[test]
    fn the_serial_tail_stays_out_of_client_messages() {
        let e = ToolError::Sandbox {
            id: "sb-1".into(),
            source: Box::new(SandboxError::GuestDied {
                vm: "kiln-mcp-1".into(),
                op: "exec",
                reason: "agent closed the connection".into(),
                serial_tail: "boot noise".into(),
            }),
        };
        let full = e.to_string();
        let m = e.client_message();
        assert!(m.starts_with("sandbox \"sb-1\": "), "{m}");
        assert!(m.contains("agent closed the connection"), "{m}");
        assert!(!m.contains("boot noise"), "{m}\nfull: {full}");
    }
}
