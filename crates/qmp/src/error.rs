use std::io;

/// Everything that can go wrong talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading from or writing to the QMP socket failed (including failing
    /// to connect to it).
    #[error("QMP socket I/O failed")]
    Io(#[from] io::Error),

    /// QEMU sent something that is not valid QMP: malformed JSON, a bad
    /// greeting, or a reply of an unexpected shape.
    #[error("QMP protocol error: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
        /// The JSON error behind it, if any.
        #[source]
        source: Option<serde_json::Error>,
    },

    /// QEMU answered the command with an `error` reply.
    #[error("QMP command failed: {class}: {desc}")]
    Command {
        /// The error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The QMP connection is closed (usually because QEMU exited).
    #[error("QMP connection closed")]
    Disconnected,

    /// QEMU did not complete the connection handshake in time.
    #[error("timed out waiting for the QMP handshake")]
    Timeout,
}

impl Error {
    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        Error::Protocol {
            reason: reason.into(),
            source: None,
        }
    }

    pub(crate) fn bad_json(reason: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Protocol {
            reason: reason.into(),
            source: Some(source),
        }
    }
}
