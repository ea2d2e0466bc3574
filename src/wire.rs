//! One framed line protocol for gem's own channels (the control socket, the channel
//! between generations): one JSON message per line, each line bounded.
//! (Placeholder: superseded by the control-socket work.)

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

/// Longest line accepted.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The line was longer than the limit.
    #[error("a line longer than {MAX_LINE} bytes")]
    TooLong,
    /// I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Not the JSON message expected.
    #[error("bad message {line:?}: {source}")]
    Bad {
        /// The line.
        line: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// A bidirectional channel of JSON lines.
#[derive(Debug)]
pub(crate) struct Wire<T> {
    framed: Framed<T, LinesCodec>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Wire<T> {
    /// Wraps `io`.
    pub(crate) fn new(io: T) -> Self {
        Wire {
            framed: Framed::new(io, LinesCodec::new_with_max_length(MAX_LINE)),
        }
    }

    /// Sends one message.
    pub(crate) async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), WireError> {
        let line = serde_json::to_string(msg).map_err(|e| WireError::Io(e.into()))?;
        self.framed.send(line).await.map_err(from_codec)
    }

    /// The next message; `None` at the end. Cancellation-safe.
    pub(crate) async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, WireError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(from_codec(e)),
            Some(Ok(line)) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|source| WireError::Bad { line, source }),
        }
    }
}

fn from_codec(e: LinesCodecError) -> WireError {
    match e {
        LinesCodecError::MaxLineLengthExceeded => WireError::TooLong,
        LinesCodecError::Io(e) => WireError::Io(e),
    }
}
